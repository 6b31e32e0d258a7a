"""The iterative registration engine (multi-scale, any transform x any objective)."""

from alignkit.solve.config import (
    FIELD_MODELS,
    LINEAR_MODELS,
    RegistrationConfig,
    StageConfig,
    load_config_file,
)
from alignkit.solve.engine import Engine, normalize_intensity, resolve_device

__all__ = [
    "FIELD_MODELS",
    "LINEAR_MODELS",
    "Engine",
    "RegistrationConfig",
    "StageConfig",
    "load_config_file",
    "normalize_intensity",
    "resolve_device",
]
