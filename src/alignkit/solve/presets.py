"""Named configurations, like ANTs' ``antsRegistrationSyNQuick.sh``: stages, objective, levels, iterations.

Presets are starting points tuned on several pairs of several data sets, never on one pair; every
field can be overridden (``--transform``, ``--similarity``, ``--config``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

from alignkit.errors import ConfigError
from alignkit.solve.config import FIELD_MODELS, LINEAR_MODELS, RegistrationConfig, StageConfig, load_config_file


def _brain() -> RegistrationConfig:
    """Mono-modal 3D MRI, native space: centre-of-mass start, affine (NCC) then diffeomorphic SVF (LNCC)."""
    return RegistrationConfig(
        name="brain",
        init="com",
        stages=[
            StageConfig(
                transform="affine",
                similarity="ncc",
                levels=(8, 4, 2),
                iterations=(200, 100, 50),
                learning_rate=1e-2,
                tolerance=1e-5,
                patience=20,
            ),
            StageConfig(
                # Tuned on OASIS-TRT-20 pairs 01→02, 03→04, 05→06 (mean Dice over 99 labels):
                # a 5-voxel window at 1/4 and 1/2 resolution and light regularisation gave
                # 0.640 / 0.621 / 0.601 with no folds; weaker (0.05) produced a few folds,
                # stronger (0.5 + smoothing 1.0) lost 0.05 Dice. A full-resolution level with the
                # field at half resolution cost 30 % more time and scored lower.
                transform="svf",
                similarity="lncc",
                similarity_options={"window": 5},
                # 2^7 squarings: with 5, one voxel in 10M folded (det -0.03) on pair 03→04; with 6, one
                # (det -0.0013) on pair 01→02; with 7 none on either (min det 0.034), for ~7 s more
                transform_options={"steps": 7},
                regularizer="diffusion",
                regularizer_weight=0.1,
                levels=(4, 2),
                iterations=(100, 50),
                learning_rate=0.5,
                field_smoothing=0.5,
                tolerance=1e-5,
                patience=20,
            ),
        ],
    )


def _multimodal() -> RegistrationConfig:
    """Different contrasts (T1↔PD, CT↔MR): Mattes mutual information for every stage."""
    return RegistrationConfig(
        name="multimodal",
        init="center",
        stages=[
            StageConfig(
                # similarity (rigid + isotropic scale) rather than rigid: voxel sizes of two
                # modalities are often miscalibrated, and rigid alone got stuck on a 12 % scale.
                transform="similarity",
                similarity="mi",
                levels=(8, 4, 2),
                iterations=(150, 100, 50),
                learning_rate=1e-2,
                patience=20,
                # MI on a random 100k-voxel sample, as ITK/ANTs do for linear stages: a step
                # then costs the same on a 3D head as on a 2D slice
                sample_points=100_000,
            ),
            StageConfig(
                transform="affine",
                similarity="mi",
                levels=(4, 2, 1),
                iterations=(100, 50, 30),
                learning_rate=5e-3,
                patience=20,
                sample_points=100_000,
            ),
            StageConfig(
                transform="svf",
                similarity="mi",
                regularizer="diffusion",
                regularizer_weight=3.0,
                levels=(4, 2, 1),
                iterations=(100, 60, 30),
                learning_rate=0.3,
                field_smoothing=2.0,
                patience=20,
                # a dense MI field on every voxel of a 3D head (9M) costs many minutes on a CPU;
                # the smooth inter-modality field is fitted on at most 262k voxels (about 3 mm on a
                # head, 2 px on a 1k x 1k slice) and interpolated to the full grid
                max_level_voxels=1 << 18,
            ),
        ],
    )


def _photo() -> RegistrationConfig:
    """2D photographs: a homography started from SIFT matches (MAGSAC++, when OpenCV is installed;
    else from the centres) and refined coarse to fine with NCC on grey levels."""
    return RegistrationConfig(
        name="photo",
        init="features",
        stages=[
            StageConfig(
                transform="affine",
                similarity="ncc",
                levels=(16, 8, 4),
                iterations=(200, 150, 100),
                learning_rate=1e-2,
                grey=True,
                patience=25,
            ),
            StageConfig(
                transform="homography",
                similarity="ncc",
                # no full-resolution level: on the four 1-1.5 Mpx homogr pairs it cost ~1.5x the time
                # for a landmark error that was not better (mean 2.72 px with it, 2.88 px without)
                levels=(8, 4, 2),
                iterations=(150, 100, 60),
                learning_rate=5e-3,
                grey=True,
                patience=25,
            ),
        ],
    )


def _flow() -> RegistrationConfig:
    """Classical variational optical flow (000 §1.2), TV-L1 style: a robust Charbonnier data term on
    colour plus gradient constancy (``flow-data``), total-variation smoothness, coarse to fine over a
    deep pyramid with Sun et al.'s 5×5 median filter of the flow after every level.

    Tuned on all four Middlebury sequences with public ground truth (mean EPE ~0.16 px against
    ~0.62 for OpenCV's Farneback and ~0.24 for DIS-medium; ``benchmarks/flow_middlebury.py``) and
    checked on the MPI-Sintel sample pairs; ~10-20 s per 640×480 pair on two CPU cores.
    """
    return RegistrationConfig(
        name="flow",
        init="none",
        stages=[
            StageConfig(
                transform="displacement",
                similarity="flow-data",
                similarity_options={"eps": 1e-3, "alpha": 0.45, "gradient_weight": 1.0},
                regularizer="tv",
                regularizer_weight=0.05,
                levels=(16, 8, 4, 2, 1),
                iterations=(120, 120, 120, 80, 40),
                smoothing=(8.0, 4.0, 2.0, 1.0, 0.5),
                learning_rate=0.4,
                field_median=5,
                tolerance=1e-6,
                patience=30,
            )
        ],
    )


def _default2d() -> RegistrationConfig:
    """2D mono-modal (slices): affine then SVF with LNCC."""
    config = _brain()
    config.name = "default2d"
    config.stages[0].levels, config.stages[0].iterations = (8, 4, 2, 1), (200, 150, 100, 50)
    config.stages[1].levels, config.stages[1].iterations = (4, 2, 1), (150, 100, 60)
    config.stages[1].similarity_options = {"window": 9}
    return config


PRESETS = {
    "brain": _brain,
    "multimodal": _multimodal,
    "photo": _photo,
    "flow": _flow,
    "default2d": _default2d,
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> RegistrationConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}")
    return PRESETS[name]()


def default_preset(ndim: int) -> str:
    return "brain" if ndim == 3 else "default2d"


def override(
    config: RegistrationConfig, *, transforms: Sequence[str] | None = None, similarity: str | None = None
) -> RegistrationConfig:
    """Replace a preset's chain of models and/or its similarity.

    Each requested model takes the settings of the preset's stage of the same kind (linear or
    field), so ``--transform rigid,affine,svf`` on ``brain`` gives two linear stages tuned like the
    preset's affine stage and an SVF stage tuned like its SVF stage.
    """
    config = copy.deepcopy(config)
    if transforms:
        linear_template = next((s for s in config.stages if s.is_linear), None)
        field_template = next((s for s in config.stages if not s.is_linear), None)
        stages = []
        for name in transforms:
            name = name.strip().lower()
            if name in LINEAR_MODELS:
                template = linear_template or get_preset("brain").stages[0]
            elif name in FIELD_MODELS:
                template = field_template or get_preset("brain").stages[1]
            else:
                raise ConfigError(f"unknown transform {name!r}; choose from {', '.join(LINEAR_MODELS + FIELD_MODELS)}")
            stage = copy.deepcopy(template)
            stage.transform = name
            stage.transform_options = {}
            stages.append(stage)
        config.stages = stages
    if similarity:
        for stage in config.stages:
            stage.similarity = similarity
            stage.similarity_options = {}
    RegistrationConfig.__post_init__(config)
    return config


def resolve_config(
    ndim: int,
    *,
    preset: str | None = None,
    transform: str | list[str] | None = None,
    similarity: str | None = None,
    config: RegistrationConfig | dict[str, Any] | str | os.PathLike | None = None,
) -> RegistrationConfig:
    """Preset (or the default for the dimension) → config file → ``transform``/``similarity`` overrides."""
    if isinstance(config, RegistrationConfig):
        base = config
    elif config is not None:
        data = load_config_file(os.fspath(config)) if isinstance(config, (str, os.PathLike)) else dict(config)
        if "stages" in data:
            base = RegistrationConfig.from_dict(data)
        else:  # a partial file: preset plus top-level options
            base = get_preset(data.pop("preset", preset or default_preset(ndim)))
            for key, value in data.items():
                if not hasattr(base, key):
                    raise ConfigError(f"unknown configuration key {key!r}")
                setattr(base, key, value)
    else:
        base = get_preset(preset or default_preset(ndim))
    transforms = transform.split(",") if isinstance(transform, str) else transform
    result = override(base, transforms=transforms, similarity=similarity)
    if ndim == 3 and any(s.transform == "homography" for s in result.stages):
        raise ConfigError("homography is a 2D model; use affine for 3D images")
    return result
