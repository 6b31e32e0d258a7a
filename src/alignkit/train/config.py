"""The training configuration: every key of ``alignkit train --config FILE`` (JSON/TOML)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from alignkit.errors import ConfigError

ScheduleName = Literal["cosine", "step", "constant"]
PairChoice = Literal["auto", "inter", "atlas", "synthetic", "warped-copy", "synthetic-affine", "cases"]


@dataclass
class TrainConfig:
    """Everything a training run needs; stored in every checkpoint and in ``RUNDIR/config.json``.

    ``method`` is a name of the method registry (:mod:`alignkit.methods`; the loop itself knows none).
    ``network`` overrides the default network spec of a one-network method (e.g. ``{"features": [8,
    16, 16]}``); ``networks`` overrides the specs of several by name (``{"affine": {...}, "field":
    {...}}``); ``method_options`` go to the method (``similarity``, ``regularizer_weight``,
    ``dice_weight`` ...). ``stage_epochs`` sets the epochs of the method's training stages by name
    (default: each stage's own, else ``epochs``; 0 skips the stage, e.g. the multi-step affine stage
    alone from an ``init_from`` run); ``stages`` runs only some of them (a name selects
    that stage and those named ``<name>-...``: ``["affine"]`` runs ``affine-1step`` and ``affine``);
    ``init_from`` (a checkpoint file or run folder) initialises the weights, e.g. a field stage
    trained on top of an earlier run's affine network.
    ``pairs="auto"`` trains on the data set's own pairs when it defines them (flow, multimodal),
    else on inter-subject pairs when it has two images or more, else on synthetic deformations.
    ``layout="folder"`` reads ``dataset`` as a plain folder of images (labels ``<stem>_seg``).
    ``subjects`` (shell-style patterns of subject names: file stems of a folder, ``subject01`` ...)
    keeps only the matching images; ``val_subjects`` names the held-out validation subjects instead
    of the seeded ``val_fraction`` split (:func:`~alignkit.train.pairs.build_pairs`). ``prealign`` is
    also recorded in the method, so :func:`alignkit.register` runs the same pre-alignment before the
    network unless ``method_options`` says otherwise. ``amp`` (mixed precision) applies on CUDA only;
    None = on when the device is CUDA. ``schedule`` steps per optimisation step: ``cosine`` decays
    to 0 over the run, ``step`` multiplies by ``gamma`` every ``step_epochs`` epochs.
    ``intensity_percentiles`` (low, high) map to 0 and 1 on the network grid; None = the method's own
    (:attr:`alignkit.methods.LearnedModel.intensity_percentiles`). ``pose_augment`` (``{"rotation": degrees,
    "scaling": fraction, "shear": fraction, "translation": voxels}``, inter-subject pairs only): every epoch the
    training pairs' moving subject is resampled through a new random affine within those bounds.
    """

    method: str = "voxelmorph"
    method_options: dict[str, Any] = field(default_factory=dict)
    network: dict[str, Any] = field(default_factory=dict)
    networks: dict[str, dict[str, Any]] = field(default_factory=dict)
    stage_epochs: dict[str, int] = field(default_factory=dict)
    stages: list[str] | None = None
    init_from: str | None = None
    dataset: str | None = None
    layout: str | None = None
    subjects: list[str] | None = None
    val_subjects: list[str] | None = None
    pairs: PairChoice = "auto"
    size: list[int] | int | str = 64  # stored as a list: [64] (every axis) or one value per axis
    prealign: str | None = None
    intensity_percentiles: list[float] | None = None
    max_pairs: int | None = None
    synthetic_length: int | None = None
    magnitude: float = 3.0
    pose_augment: dict[str, float] | None = None
    val_fraction: float = 0.2
    epochs: int = 10
    batch_size: int = 1
    lr: float = 1e-3  # 10x VoxelMorph's 1e-4: short CPU runs; the cosine schedule brings it down
    schedule: ScheduleName = "cosine"
    step_epochs: int = 10
    gamma: float = 0.5
    weight_decay: float = 0.0
    grad_clip: float | None = None
    amp: bool | None = None
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    quiet: bool = False

    def __post_init__(self) -> None:
        # one spelling of the size ("64", 64, [64] are the same run): a list of ints, broadcast per
        # axis later (parse_size), so a resumed run compares equal to the stored one
        if isinstance(self.size, str):
            try:
                self.size = [int(v) for v in self.size.replace("x", ",").split(",") if v.strip()]
            except ValueError:
                raise ConfigError(f"size must be integers like 64 or 64,80, got {self.size!r}") from None
        elif isinstance(self.size, int):
            self.size = [self.size]
        else:
            self.size = [int(v) for v in self.size]
        if isinstance(self.stages, str):  # "affine,vsvf" or "all" from a command line
            self.stages = [v.strip() for v in self.stages.split(",") if v.strip()]
        if self.stages is not None and (not self.stages or "all" in self.stages):
            self.stages = None
        for name in ("subjects", "val_subjects"):
            value = getattr(self, name)
            if isinstance(value, str):  # "r27*,r30*" from a command line
                value = [v.strip() for v in value.split(",") if v.strip()]
            if value is not None:
                value = [str(v) for v in value]
                if not value:
                    raise ConfigError(f"{name} must name at least one subject pattern")
            setattr(self, name, value)
        if self.intensity_percentiles is not None:
            low, high = (float(v) for v in self.intensity_percentiles)
            if not 0.0 <= low < high <= 100.0:
                raise ConfigError(f"intensity_percentiles must be 0 <= low < high <= 100, got {self.intensity_percentiles}")
            self.intensity_percentiles = [low, high]
        from alignkit.train.pairs import check_pose_augment

        self.pose_augment = check_pose_augment(self.pose_augment)
        if self.pairs not in get_args(PairChoice):
            raise ConfigError(f"pairs must be one of {', '.join(get_args(PairChoice))}, got {self.pairs!r}")
        if self.schedule not in get_args(ScheduleName):
            raise ConfigError(f"schedule must be one of {', '.join(get_args(ScheduleName))}, got {self.schedule!r}")
        for name in ("epochs", "batch_size", "step_epochs"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.network and self.networks:
            raise ConfigError("give network (one-network methods) or networks (by name), not both")
        for name, value in self.stage_epochs.items():
            if int(value) < 0:
                raise ConfigError(f"stage_epochs[{name!r}] must be >= 0 (0 skips it), got {value}")
        self.stage_epochs = {str(k): int(v) for k, v in self.stage_epochs.items()}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training configuration keys: {', '.join(unknown)}")
        return cls(**dict(data))
