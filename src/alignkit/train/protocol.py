"""What the training loop needs from a learned method -- and nothing about any method by name.

The loop (:func:`alignkit.train.loop.train`) is handed a :class:`TrainableMethod` (or a factory
that builds one once the data fixes the dimension and size) and calls, per step::

    output = method(batch)                                   # forward: dict of tensors
    total, parts = method.loss(batch, output, epoch=epoch)   # parts are logged by name

Batches are dicts of tensors (:mod:`alignkit.train.pairs`): ``fixed``, ``moving``, and, where the
data have them, ``fixed_labels``/``moving_labels``, ``flow`` (true displacement), ``matrix`` (true
linear map), ``fixed_points``/``moving_points``/``points_mask``. ``epoch`` is the global epoch
(1-based), so a method can schedule its loss weights per epoch (e.g. AVSM's affine-regulariser
weight).

Training in stages: :meth:`TrainableMethod.training_stages` lists :class:`TrainingStage` s run one
after the other; each trains only the named networks (the others are frozen), with its own
optimiser and learning-rate schedule, and the method is told which stage runs
(:meth:`~TrainableMethod.set_stage`) -- train an affine network, freeze it, then train a field
network on top; or train the blocks of a scale chain one scale at a time. A method with one stage
trains everything for ``epochs`` epochs. Multi-step prediction with different step counts at
training and test time is the method's business (``self.training`` tells which).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from alignkit.errors import ConfigError


@dataclass(frozen=True)
class TrainingStage:
    """One stage of training: ``networks`` (names in :meth:`TrainableMethod.networks`; None = all)
    are trained for ``epochs`` epochs (None: the run's ``epochs``; ``TrainConfig.stage_epochs``
    overrides by name) at ``lr_scale`` times the run's learning rate."""

    name: str
    networks: tuple[str, ...] | None = None
    epochs: int | None = None
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a training stage needs a name")
        if self.epochs is not None and int(self.epochs) < 1:
            raise ConfigError(f"training stage {self.name!r}: epochs must be >= 1, got {self.epochs}")
        if self.lr_scale <= 0:
            raise ConfigError(f"training stage {self.name!r}: lr_scale must be > 0, got {self.lr_scale}")


@runtime_checkable
class TrainableMethod(Protocol):
    """The learned-method side of training (see the module docstring). An ``nn.Module``."""

    method_name: str

    @property
    def config(self) -> dict[str, Any]:
        """JSON-safe options that rebuild the method (with its network specs)."""

    def networks(self) -> Mapping[str, nn.Module]:
        """The trainable networks by name (parameter groups; stages name them)."""

    def network_specs(self) -> dict[str, dict[str, Any]]:
        """``{name: {"name": registered network, **arguments}}``: what rebuilds each network."""

    def training_stages(self) -> Sequence[TrainingStage]:
        """The stages, in order (one stage that trains everything is the usual case)."""

    def set_stage(self, name: str) -> None:
        """Called before the epochs of stage ``name`` (and on resume)."""

    def __call__(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Training-time outputs for a batch (on the network grid)."""

    def loss(self, batch: Mapping[str, Tensor], output: Mapping[str, Tensor], *, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        """(total, named parts): batch means of per-pair values, so batches and DDP processes average."""

    def validation_metrics(self, batch: Mapping[str, Tensor], output: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``val_<name>`` values: per pair ``(B,)`` (NaN = not applicable to that pair) or a batch mean."""
