"""Transform heads of learned methods: what a network's output becomes, on the network grid and in
world space.

Convention
----------
Networks see images on the **network grid** of the fixed image (:func:`alignkit.train.subjects.to_network_grid`:
the fixed field of view resampled to the method's ``size``). Everything a network predicts is in
**voxels of that grid, array-axis order** (the convention of :mod:`alignkit.spatial`); a
displacement ``u`` maps fixed → moving: ``warped(p) = moving(p + u(p))``; a matrix ``M`` maps
fixed voxel points to moving voxel points, ``q = M [p; 1]``. At inference these become alignkit
transforms in world units (:class:`LearnedSVF`, :func:`voxel_matrix_transform`), so the result is
used, saved and refined like the classical engine's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from alignkit.errors import ShapeError
from alignkit.spatial import Grid, apply_matrix, resize_field, sample_voxels, voxel_to_world_vectors
from alignkit.transforms import FieldTransform, MatrixTransform, Transform, scaling_and_squaring


def voxel_grid(size: Sequence[int]) -> Grid:
    """The network grid in its own voxel frame (world = voxel): training works in voxel units."""
    return Grid.from_spacing(tuple(int(s) for s in size), 1.0)


def integrate_velocity(velocity: Tensor, size: Sequence[int], steps: int) -> Tensor:
    """Displacement ``exp(v) - id`` on the network grid of ``size``, voxels, array-axis order.

    ``velocity (B, ndim, *S_out)`` is in voxels of the network grid and may be coarser than ``size``
    (corner-aligned): it is integrated on its own grid by scaling and squaring and the displacement
    is then resized to ``size`` -- VoxelMorph's ``int_downsize``. ``steps = 0`` uses ``v`` as the
    displacement (no diffeomorphism, a plain displacement head).
    """
    size = tuple(int(s) for s in size)
    low = voxel_grid(size).resized(tuple(velocity.shape[2:]))
    disp = scaling_and_squaring(velocity, low, steps) if steps > 0 else velocity
    return resize_field(disp, size)


def landmark_errors(displacement: Tensor, fixed_points: Tensor, moving_points: Tensor, mask: Tensor) -> Tensor:
    """Per pair, the mean distance ``|p + u(p) - q|`` over the landmarks where ``mask`` is 1:
    ``displacement (B, ndim, *S)`` in voxels, points ``(B, N, ndim)`` voxel coordinates (array-axis
    order) of the same grid, ``mask (B, N)``. NaN for a pair without landmarks. ``u`` is sampled
    linearly (border values outside), so the error is differentiable in the displacement."""
    if fixed_points.shape != moving_points.shape or fixed_points.dim() != 3:
        raise ShapeError(f"landmarks must be two (B, N, ndim) tensors, got {tuple(fixed_points.shape)} and {tuple(moving_points.shape)}")
    p = fixed_points.to(displacement.dtype).transpose(1, 2)  # (B, ndim, N)
    moved = p + sample_voxels(displacement, p, padding="border")
    distance = (moved - moving_points.to(displacement.dtype).transpose(1, 2)).norm(dim=1)  # (B, N)
    weight = mask.to(distance.dtype)
    return (distance * weight).sum(1) / weight.sum(1)  # 0/0 = NaN: no landmarks in that pair


def matrix_displacement(matrix: Tensor, size: Sequence[int]) -> Tensor:
    """The displacement ``(B, ndim, *size)`` (voxels, array-axis order) of voxel matrices
    ``(B, ndim+1, ndim+1)`` on the network grid: ``u(p) = M [p; 1] - p`` (projective rows divide)."""
    size = tuple(int(s) for s in size)
    ndim = len(size)
    if matrix.shape[-2:] != (ndim + 1, ndim + 1):
        raise ShapeError(f"matrix must be (B, {ndim + 1}, {ndim + 1}), got {tuple(matrix.shape)}")
    matrix = matrix if matrix.dim() == 3 else matrix.unsqueeze(0)
    points = voxel_grid(size).voxel_points(dtype=matrix.dtype, device=matrix.device)  # (1, ndim, *S)
    points = points.expand(matrix.shape[0], *points.shape[1:])
    return apply_matrix(matrix, points) - points


def voxel_matrix_transform(matrix: Tensor, grid: Grid, *, kind: str = "affine") -> Transform:
    """A voxel matrix ``(ndim+1, ndim+1)`` of the network grid ``grid`` (fixed voxel → moving voxel,
    both in ``grid``'s frame) as a world :class:`MatrixTransform` (fixed world → moving world) whose
    :attr:`~alignkit.transforms.Transform.kind` says what was predicted (``affine``, ``homography`` ...)."""
    if matrix.dim() == 3:
        matrix = matrix[0]
    world_from_voxel = grid.world_from_voxel.to(torch.float64)
    world = world_from_voxel @ matrix.detach().cpu().double() @ torch.linalg.inv(world_from_voxel)
    out = MatrixTransform(world.float())
    out.kind = kind
    return out


class _Prediction(FieldTransform):
    """A frozen predicted field: moved onto another grid (coarse-to-fine refinement levels) it becomes
    a plain frozen :class:`~alignkit.transforms.DisplacementField` of its displacement."""

    def resampled(self, grid: Grid) -> FieldTransform:
        from alignkit.transforms import DisplacementField, resample_field

        displacement = self.displacement()
        out = DisplacementField(grid).to(displacement.device)
        with torch.no_grad():
            out.field.copy_(resample_field(displacement, self.grid, grid))
        out.requires_grad_(False)
        return out


class LearnedSVF(_Prediction):
    """The transform a learned SVF method predicts: a stationary velocity in voxels of the network
    grid ``grid`` (world-placed, the fixed image's field of view), integrated like at training time.

    ``displacement()`` is in world units on ``grid``; outside it the border value is kept (like every
    :class:`~alignkit.transforms.FieldTransform`). The velocity is a buffer, not a parameter: the
    prediction is frozen; refinement (``refine=K``) fits a new field on top of it.
    """

    kind = "svf"
    velocity: Tensor

    def __init__(self, grid: Grid, velocity: Tensor, *, steps: int = 7) -> None:
        super().__init__(grid)
        if velocity.dim() != grid.ndim + 2 or velocity.shape[:2] != (1, grid.ndim):
            raise ShapeError(f"velocity must be (1, {grid.ndim}, *S), got {tuple(velocity.shape)}")
        self.steps = int(steps)
        self.register_buffer("velocity", velocity.detach().clone())
        self._cache: tuple[tuple[Any, ...], Tensor] | None = None

    def displacement(self) -> Tensor:
        key = (self.velocity.device, self.velocity.dtype, self.velocity._version)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        with torch.no_grad():  # a frozen prediction: the engine calls this every iteration
            disp_voxels = integrate_velocity(self.velocity, self.grid.shape, self.steps)
            disp = voxel_to_world_vectors(disp_voxels, self.grid)
        self._cache = (key, disp)
        return disp

    def inverse(self) -> Transform:
        """``exp(-v)``: the inverse map (the SVF's group property)."""
        return LearnedSVF(self.grid, -self.velocity, steps=self.steps)

    def regularizer_field(self) -> tuple[Tensor, Grid]:
        low = self.grid.resized(tuple(self.velocity.shape[2:]))
        return voxel_to_world_vectors(self.velocity, self.grid), low


    def extra_repr(self) -> str:
        return f"grid={self.grid!r}, velocity={tuple(self.velocity.shape[2:])}, steps={self.steps}"


class LearnedDisplacement(_Prediction):
    """A predicted displacement in voxels of the network grid ``grid`` (frozen, like :class:`LearnedSVF`)."""

    kind = "displacement"
    voxels: Tensor

    def __init__(self, grid: Grid, displacement_voxels: Tensor) -> None:
        super().__init__(grid)
        expected = (1, grid.ndim, *grid.shape)
        if tuple(displacement_voxels.shape) != expected:
            raise ShapeError(f"displacement must be {expected} (voxels of the grid), got {tuple(displacement_voxels.shape)}")
        self.register_buffer("voxels", displacement_voxels.detach().clone())

    def displacement(self) -> Tensor:
        return voxel_to_world_vectors(self.voxels, self.grid)

