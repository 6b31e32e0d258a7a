"""Configuration of the iterative engine: one :class:`StageConfig` per transform model in the chain."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from alignkit.errors import ConfigError
from alignkit.losses.regularizers import RegularizerName, build_regularizer
from alignkit.losses.similarity import SimilarityName, build_similarity
from alignkit.transforms import TransformName

#: ``greedy``: PICSL Greedy's update of a dense field (:mod:`alignkit.solve.greedy`), for
#: ``displacement`` and ``svf`` stages; the others minimise the objective over any model's parameters
OptimizerName = Literal["adam", "sgd", "lbfgs", "greedy"]
InitName = Literal["none", "center", "com", "features", "dis", "sgm"]
#: what the engine can add to a stage's objective: a field regulariser, called
#: ``regularizer(field, spacing)`` on the model's field, or ``"energy"``, the vector-momentum SVF's
#: own ``<m, K m>`` (``vsvf`` only). Losses that need more than one field and its spacing (inverse
#: consistency needs both directions, the affine priors a matrix, the fold penalty a grid: see
#: ``fold_weight``) belong to learned methods' losses, not here.
StageRegularizerName = Literal["diffusion", "bending", "laplacian", "tv", "energy"]  # FieldRegularizerName + energy

LINEAR_MODELS = ("translation", "rigid", "similarity", "affine", "homography")
FIELD_MODELS = ("displacement", "svf", "vsvf", "bspline", "disparity")
#: the dense models whose field the greedy update moves directly
GREEDY_MODELS = ("displacement", "svf")


def check_choice(value: object, choices: object, what: str) -> None:
    """Raise a one-line :class:`ConfigError` naming ``value`` and the names of the ``Literal`` ``choices``."""
    names = get_args(choices)
    if value not in names:
        raise ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(names)}")
#: similarities computed voxel by voxel (no windows), which can be evaluated on a point sample
POINTWISE_SIMILARITIES = ("mse", "ncc", "mi", "l1", "charbonnier")


@dataclass
class StageConfig:
    """One stage of a registration: a transform model fitted by multi-scale optimisation.

    ``levels`` are shrink factors of the fixed grid (coarse first); ``iterations`` and ``smoothing``
    (Gaussian sigma in voxels of the full-resolution grid; None → ``0.5 * factor``) have one entry
    per level. ``field_shrink`` places a field model's parameters on a grid ``field_shrink`` times
    coarser than the level's (2 = half resolution, as Shen et al. 2019 does to save memory).

    ``field_median`` (odd window in voxels, 0 = off) median-filters a field
    model's parameters at the end of every level, before they are carried to the next one -- the
    flow median filtering of Sun et al. ("Secrets of optical flow", the deep-learning registration survey §1.2) that removes outliers
    a coarse level would otherwise propagate.
    """

    transform: TransformName = "affine"
    similarity: SimilarityName = "lncc"
    similarity_options: dict[str, Any] = field(default_factory=dict)
    regularizer: StageRegularizerName | None = None
    regularizer_weight: float = 0.0
    regularizer_options: dict[str, Any] = field(default_factory=dict)
    fold_weight: float = 0.0
    levels: tuple[float, ...] = (4, 2, 1)
    iterations: tuple[int, ...] = (100, 50, 25)
    smoothing: tuple[float | None, ...] | None = None
    #: ``"greedy"`` (displacement and svf stages; :mod:`alignkit.solve.greedy`): PICSL Greedy's
    #: update instead of a gradient optimiser. Its settings are the fields below read Greedy's way:
    #: ``gradient_smoothing`` is sigma_pre and ``field_smoothing`` sigma_post (Greedy's ``-s``, voxels
    #: of the level), ``learning_rate`` the largest displacement of one update in voxels of the level
    #: (Greedy's ``-e``), ``iterations`` its schedule (``-n``); the step is halved on a plateau like
    #: the learning rate of the others. An ``svf`` stage adds the updates to its velocity (Greedy's
    #: ``-sv``), with the squarings chosen so that no voxel folds (``steps="auto"``, unless
    #: ``transform_options`` fixes them). The smoothings are its regularisation: ``regularizer``, ``fold_weight`` and
    #: ``field_shrink`` stay at their defaults.
    optimizer: OptimizerName = "adam"
    learning_rate: float = 1e-2
    tolerance: float = 1e-5
    patience: int = 15
    #: on a plateau the step is halved up to this many times before the level stops
    lr_reductions: int = 3
    field_shrink: float = 1.0
    field_smoothing: float = 0.0
    #: Gaussian sigma (voxels of the field) applied to the field's gradient before each step:
    #: a smoothing preconditioner like ANTs' update-field sigma, which (unlike smoothing the
    #: field itself) does not shrink the accumulated deformation
    gradient_smoothing: float = 0.0
    transform_options: dict[str, Any] = field(default_factory=dict)
    grey: bool = False
    field_median: int = 0
    #: linear stages with a voxel-wise similarity (mse, ncc, mi, l1, charbonnier): evaluate it at
    #: this many fixed voxels drawn at random (seeded, the same set for a whole level) instead of
    #: all of them -- ITK's metric sampling. Only those points are warped, so a step costs
    #: O(samples), not O(voxels). 0 = every voxel.
    sample_points: int = 0
    #: levels are never finer than this many voxels (0 = no cap): the shrink factor of a level is
    #: raised until it fits, and the model is carried to the full grid by interpolation. It bounds
    #: the cost of a dense stage on big inputs (a 9M-voxel head for a multimodal field).
    max_level_voxels: int = 0
    #: the greedy smoothings (``gradient_smoothing``, ``field_smoothing``) keep their physical width on a
    #: level that ``max_level_voxels`` made coarser than ``levels`` asked: their voxel sigmas shrink by
    #: the same ratio (Greedy's sigmas are voxels of a level at the asked spacing; on a capped 1 mm brain
    #: the finest level is ~1.15 mm, where the same voxel sigmas would smooth ~15 % wider)
    capped_smoothing_physical: bool = False

    def __post_init__(self) -> None:
        check_choice(self.transform, TransformName, "transform")
        check_choice(self.similarity, SimilarityName, "similarity")
        if self.regularizer is not None and self.regularizer not in get_args(StageRegularizerName):
            # name the losses the engine cannot call apart from typos: they exist, just not here
            why = " (it needs more than the model's field: use it in a learned method's loss)" if (
                self.regularizer in get_args(RegularizerName)
            ) else ""
            raise ConfigError(
                f"stage regularizer {self.regularizer!r} is not one the solver can call{why}; "
                f"choose one of {', '.join(get_args(StageRegularizerName))} or None"
            )
        if self.regularizer == "energy" and self.transform != "vsvf":
            raise ConfigError(f"stage {self.transform}: regularizer 'energy' is the vsvf model's own; use a field regularizer")
        # building the losses once checks their option names and values now, not mid-registration
        build_similarity(self.similarity, **self.similarity_options)
        if self.regularizer not in (None, "energy"):
            build_regularizer(self.regularizer, **self.regularizer_options)
        elif self.regularizer_options:
            raise ConfigError(f"regularizer_options {sorted(self.regularizer_options)} given without a field regularizer")
        self.levels = tuple(float(f) for f in self.levels)
        self.iterations = tuple(int(i) for i in self.iterations)
        if len(self.iterations) != len(self.levels):
            raise ConfigError(f"stage {self.transform}: {len(self.levels)} levels but {len(self.iterations)} iteration counts")
        if self.smoothing is not None and len(self.smoothing) != len(self.levels):
            raise ConfigError(f"stage {self.transform}: smoothing needs one sigma per level")
        check_choice(self.optimizer, OptimizerName, "optimizer")
        if self.optimizer == "greedy":
            if self.transform not in GREEDY_MODELS:
                raise ConfigError(
                    f"stage {self.transform}: optimizer 'greedy' updates a dense field ({', '.join(GREEDY_MODELS)}); "
                    "use adam, sgd or lbfgs for this model"
                )
            if self.regularizer_weight > 0 or self.fold_weight > 0 or self.field_shrink != 1:
                raise ConfigError(
                    f"stage {self.transform}: optimizer 'greedy' is regularised by its smoothings (gradient_smoothing, "
                    "field_smoothing); leave regularizer_weight and fold_weight at 0 and field_shrink at 1"
                )
            if self.learning_rate <= 0:
                raise ConfigError(f"stage {self.transform}: the greedy step (learning_rate, voxels) must be > 0")
        if self.field_median < 0 or (self.field_median > 0 and self.field_median % 2 == 0):
            raise ConfigError(f"field_median must be 0 (off) or an odd window, got {self.field_median}")
        if self.max_level_voxels < 0:
            raise ConfigError(f"max_level_voxels must be >= 0 (0 = no cap), got {self.max_level_voxels}")
        if self.sample_points < 0:
            raise ConfigError(f"sample_points must be >= 0 (0 = every voxel), got {self.sample_points}")
        if self.sample_points and (self.transform not in LINEAR_MODELS or self.similarity not in POINTWISE_SIMILARITIES):
            raise ConfigError(
                f"stage {self.transform}: sample_points needs a linear transform and a voxel-wise similarity "
                f"({', '.join(POINTWISE_SIMILARITIES)}), got {self.transform} with {self.similarity}"
            )

    @property
    def is_linear(self) -> bool:
        return self.transform in LINEAR_MODELS


@dataclass
class RegistrationConfig:
    """A whole registration: stages chained by composition, plus test-time prompt weights."""

    stages: list[StageConfig]
    init: InitName = "com"
    dice_weight: float = 0.0
    landmark_weight: float = 0.0
    name: str = "custom"
    #: fit on the bounding box of the foreground (plus a margin) when the background is empty,
    #: e.g. skull-stripped MRI: same answer, a third of the voxels
    crop_foreground: bool = True
    #: options of the start: for ``init="sgm"`` those of :func:`alignkit.stereo.sgm_start`
    #: (``min_disparity``, ``max_disparity``, ``cost``, ``directions`` ...)
    init_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("a registration needs at least one stage")
        check_choice(self.init, InitName, "init")
        if self.init == "sgm":
            from alignkit.stereo import check_sgm_options

            check_sgm_options(self.init_options)
        elif self.init_options:
            raise ConfigError(f"init_options {sorted(self.init_options)} given for init {self.init!r}, which takes none")
        self.stages = [s if isinstance(s, StageConfig) else StageConfig(**s) for s in self.stages]
        for stage in self.stages:
            # a stage edited after construction (a preset's greedy stage given another model by
            # --transform) is caught here, before anything runs
            if stage.optimizer == "greedy" and stage.transform not in GREEDY_MODELS:
                raise ConfigError(
                    f"stage {stage.transform}: optimizer 'greedy' updates a dense field ({', '.join(GREEDY_MODELS)}); "
                    f"give this model a stage with optimizer adam, sgd or lbfgs (--config)"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RegistrationConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        stage_fields = {f.name for f in dataclasses.fields(StageConfig)}
        stages = []
        for i, stage in enumerate(data.get("stages", [])):
            bad = set(stage) - stage_fields
            if bad:
                raise ConfigError(f"stage {i}: unknown keys {', '.join(sorted(bad))}")
            stages.append(StageConfig(**stage))
        return cls(**{**dict(data), "stages": stages})


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML configuration file into a dict (validated by the caller)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: configuration file not found")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            return tomllib.loads(text)
        return json.loads(text)
    except ValueError as exc:  # JSON and TOML decode errors; their own messages are precise, kept on one line
        raise ConfigError(f"{path}: cannot parse configuration ({str(exc).splitlines()[0]})") from None
