"""alignkit's own configurations as :class:`~alignkit.evaluate.method.Method` s: ``alignkit:<preset>``.

Each preset is run through :func:`alignkit.register` exactly as a user would run it, with the case's
images only: the ground truth (labels, landmarks) is never passed, because ``register`` would use
labels and landmarks as prompt terms when a configuration weights them, and a method must not see
what it is scored on.
"""

from __future__ import annotations

from typing import Any

from alignkit.data.case import Case
from alignkit.errors import ConfigError
from alignkit.evaluate.method import Method
from alignkit.evaluate.registered import RegisteredMethod

#: case kinds each preset is meant for (others are reported "n/a" by the runner, not run)
PRESET_KINDS: dict[str, tuple[str, ...]] = {
    "brain": ("deformable", "affine"),
    "multimodal": ("deformable", "affine"),
    "photo": ("homography", "affine"),
    "flow": ("flow", "stereo", "deformable"),
    "stereo": ("stereo",),
    "default2d": ("flow", "stereo", "deformable"),
}

#: image dimensionalities of each preset (homography and the 2D pyramids are 2D-only)
PRESET_NDIMS: dict[str, tuple[int, ...]] = {
    "brain": (2, 3),
    "multimodal": (2, 3),
    "photo": (2,),
    "flow": (2,),
    "stereo": (2,),
    "default2d": (2,),
}

#: what ``AlignkitMethod(..., **options)`` accepts
OPTIONS = ("transform", "similarity", "config", "max_iterations")

PREFIX = "alignkit:"


class AlignkitMethod(RegisteredMethod):
    """``alignkit:<preset>``: :func:`alignkit.register` with a preset, optionally overridden.

    Options (all optional):

    * ``transform``: chain of models replacing the preset's, e.g. ``"affine"`` or ``"rigid,affine,svf"``;
    * ``similarity``: replaces every stage's similarity;
    * ``config``: a configuration (dict, file or :class:`~alignkit.solve.config.RegistrationConfig`)
      as :func:`alignkit.register` takes it; a partial one is applied on top of the preset;
    * ``max_iterations``: caps every level's iteration count (quick benchmark runs and tests).
    """

    def __init__(self, preset: str, **options: Any) -> None:
        from alignkit.solve.presets import preset_names

        preset = preset.removeprefix(PREFIX)
        if preset not in preset_names():
            raise ConfigError(f"unknown alignkit preset {preset!r}; choose one of {', '.join(preset_names())}")
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"{PREFIX}{preset}: unknown options {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
        super().__init__("classical", name=f"{PREFIX}{preset}", **options)
        self.preset = preset
        self.kinds = PRESET_KINDS.get(preset, Method.kinds)
        self.ndims = PRESET_NDIMS.get(preset, Method.ndims)
        self.description = f'alignkit.register(preset="{preset}")' + (f" with {options}" if options else "")

    def config_for(self, ndim: int, kind: str | None = None) -> Any:
        """The :class:`~alignkit.solve.config.RegistrationConfig` this method runs on ``ndim``-D images
        of a case of ``kind``.

        A case that says its pairs are related by an affine map (``kind="affine"``, e.g. VIS-NIR)
        runs a homography preset (``photo``) with an affine chain unless ``transform`` is given: the
        OpenCV peers fit the case's model class the same way (``estimateAffine2D``, ``MOTION_AFFINE``),
        so every method is told the same thing about the case."""
        from alignkit.solve.presets import get_preset, resolve_config

        transform = self.options.get("transform")
        if transform is None and kind == "affine" and any(
            s.transform == "homography" for s in get_preset(self.preset).stages
        ):
            transform = "affine"
        config = resolve_config(
            ndim,
            preset=self.preset,
            transform=transform,
            similarity=self.options.get("similarity"),
            config=self.options.get("config"),
        )
        cap = self.options.get("max_iterations")
        if cap is not None:
            if int(cap) < 1:
                raise ConfigError(f"{self.name}: max_iterations must be >= 1, got {cap}")
            for stage in config.stages:
                stage.iterations = tuple(min(int(i), int(cap)) for i in stage.iterations)
        return config

    def register_options(self, case: Case) -> dict[str, Any]:
        return {"config": self.config_for(case.ndim, case.kind)}


def alignkit_method_names() -> list[str]:
    from alignkit.solve.presets import preset_names

    return [f"{PREFIX}{name}" for name in preset_names()]
