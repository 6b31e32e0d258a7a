"""The registration contract shared by every transform model.

Contract
--------
A :class:`Transform` maps **fixed-world points to moving-world points** (LPS, ``(x, y[, z])``).
Applied to a grid of the fixed image it gives a *map*; ``warped = moving ∘ map`` is the moving
image resampled on the fixed grid. Its learnable parameters are ``nn.Parameter``s, so any
PyTorch optimiser fits it. Stages are chained with :class:`ComposedTransform`, which evaluates
the chain point-wise so an image is resampled once however many stages ran.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from alignkit.errors import NotInvertibleError
from alignkit.spatial.grid import Grid
from alignkit.spatial.points import sample_world

if TYPE_CHECKING:
    from alignkit.image import Image


class Transform(nn.Module):
    """Base class: subclasses implement :meth:`transform_points`."""

    ndim: int
    #: True for models whose map is ``matrix() @ [x; 1]`` (translation ... homography).
    is_linear: bool = False
    #: what the model is, as manifests, metrics and ``alignkit evaluate`` name it
    #: (``translation``, ``rigid``, ``affine``, ``homography``, ``displacement``, ``svf`` ...)
    kind: str = "transform"

    def __init__(self, ndim: int) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"transforms are 2D or 3D, got ndim={ndim}")
        self.ndim = ndim

    def transform_points(self, world: Tensor) -> Tensor:
        """Map fixed-world points ``(B, ndim, *S)`` (or ``(B, ndim, N)``) to moving-world points."""
        raise NotImplementedError

    def forward(self, world: Tensor) -> Tensor:
        return self.transform_points(world)

    def map_on(self, grid: Grid, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
        """The map ``(1, ndim, *grid.shape)`` of world points to sample, on ``grid``."""
        return self.transform_points(grid.world_points(dtype=dtype, device=device))

    def displacement_on(self, grid: Grid, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        """``map - identity`` on ``grid``, world units: ITK's displacement-field convention."""
        identity = grid.world_points(dtype=dtype, device=device)
        return self.transform_points(identity) - identity

    def inverse(self) -> Transform:
        raise NotInvertibleError(f"{type(self).__name__} has no inverse")

    def flat_stages(self) -> list[Transform]:
        """The stages in order with nested compositions expanded (``[self]`` for a single model), so
        the leading linear stages of a chain are visible (to the ITK affine writer, to stage
        listings) whatever nesting built it."""
        return flatten_stages(self)

    def matrix(self) -> Tensor:
        """``(ndim+1, ndim+1)`` moving-from-fixed world matrix (linear models only)."""
        raise NotInvertibleError(f"{type(self).__name__} is not a linear transform")

    def regularizer_field(self) -> tuple[Tensor, Grid] | None:
        """The field the regulariser acts on (displacement, velocity or momentum) and its grid;
        None for linear models."""
        return None

    def warp(self, moving: Image, fixed_grid: Grid, *, mode: str = "linear", padding: str = "zeros") -> Tensor:
        """Resample ``moving`` on ``fixed_grid`` through this transform: ``(1, C, *fixed_grid.shape)``."""
        param = next(iter(self.parameters()), None)
        device = param.device if param is not None else moving.data.device
        world = self.map_on(fixed_grid, device=device)
        data = moving.batch(device=device)
        return sample_world(data, moving.grid, world, mode=mode, padding=padding)  # type: ignore[arg-type]


class FieldTransform(Transform):
    """Base of models whose map is identity plus a displacement field stored on a grid."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid.ndim)
        self.grid = grid

    def displacement(self) -> Tensor:
        """``(1, ndim, *self.grid.shape)`` world displacement on the transform's own grid."""
        raise NotImplementedError

    def resampled(self, grid: Grid) -> FieldTransform:
        """The same model with its parameters moved onto ``grid`` (coarse-to-fine levels)."""
        raise NotImplementedError

    def transform_points(self, world: Tensor) -> Tensor:
        disp = self.displacement()
        # Outside its grid the field keeps its border value (the usual ITK/ANTs behaviour is zero,
        # but border is smoother for points that the linear stage moves just past the edge).
        return world + sample_world(disp.expand(world.shape[0], *disp.shape[1:]), self.grid, world, padding="border")


class ComposedTransform(Transform):
    """Stages in registration order; a point goes through the *last* stage first:
    ``y = stages[0](stages[1](... stages[-1](x)))``. E.g. ``[affine, svf]``: ``y = affine(svf(x))``."""

    def __init__(self, stages: list[Transform]) -> None:
        if not stages:
            raise ValueError("ComposedTransform needs at least one stage")
        super().__init__(stages[0].ndim)
        self.stages = nn.ModuleList(stages)

    kind = "composed"

    def stage_list(self) -> list[Transform]:
        """The stages, typed (``nn.ModuleList`` items are plain modules to a type checker)."""
        return [s for s in self.stages if isinstance(s, Transform)]


    @property
    def is_linear(self) -> bool:  # type: ignore[override]
        return all(s.is_linear for s in self.stage_list())

    def transform_points(self, world: Tensor) -> Tensor:
        for stage in reversed(self.stage_list()):
            world = stage.transform_points(world)
        return world

    def matrix(self) -> Tensor:
        # on the first stage's device: a chain fitted on a GPU may start with a stage made on the CPU
        out: Tensor | None = None
        for stage in self.stage_list():
            matrix = stage.matrix().to(torch.float64)
            out = matrix if out is None else out @ matrix.to(out.device)
        return torch.eye(self.ndim + 1, dtype=torch.float64) if out is None else out

    def inverse(self) -> Transform:
        return ComposedTransform([s.inverse() for s in reversed(self.stage_list())])

    def linear_part(self) -> list[Transform]:
        """The leading linear stages (what an ITK affine file holds)."""
        out: list[Transform] = []
        for stage in self.stage_list():
            if not stage.is_linear:
                break
            out.append(stage)
        return out


def flatten_stages(transform: Transform) -> list[Transform]:
    """``transform``'s stages in application order with nested compositions expanded (a single
    transform is a one-stage chain)."""
    if isinstance(transform, ComposedTransform):
        return [s for stage in transform.stage_list() for s in flatten_stages(stage)]
    return [transform]


def stage_kinds(transform: Transform) -> list[str]:
    """The :attr:`Transform.kind` of each stage of ``transform`` (nested chains expanded)."""
    return [stage.kind for stage in flatten_stages(transform)]
