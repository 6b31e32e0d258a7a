"""Points, maps and resampling.

A **map** is a tensor ``(B, ndim, *spatial)`` holding, for each point of a grid, the world
coordinates ``(x, y[, z])`` (LPS) of the point to sample in another image. A **displacement field**
is ``map - identity`` in world units. Warping reads ``warped = moving ∘ map``.

:func:`voxel_to_normalized` is the only function that knows ``grid_sample``'s frame (components in
reversed array-axis order, ``[-1, 1]`` with ``align_corners=True``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.errors import ShapeError
from alignkit.spatial.grid import Grid

InterpMode = Literal["linear", "nearest"]
PaddingMode = Literal["zeros", "border", "reflection"]


def apply_matrix(matrix: Tensor, points: Tensor) -> Tensor:
    """Apply a homogeneous ``(ndim+1, ndim+1)`` or batched ``(B, ndim+1, ndim+1)`` matrix to
    points ``(B, ndim, *spatial)`` (or ``(B, ndim, N)``). Projective matrices divide by the last row."""
    ndim = points.shape[1]
    if matrix.shape[-2:] != (ndim + 1, ndim + 1):
        raise ShapeError(f"apply_matrix: matrix {tuple(matrix.shape)} does not fit {ndim}D points")
    matrix = matrix.to(dtype=points.dtype, device=points.device)
    if matrix.dim() == 2:
        matrix = matrix.unsqueeze(0)
    flat = points.reshape(points.shape[0], ndim, -1)
    out = matrix[:, :ndim, :ndim] @ flat + matrix[:, :ndim, ndim:]
    last = matrix[:, ndim:, :]
    is_projective = bool((last[..., :ndim] != 0).any()) or bool((last[..., ndim] != 1).any())
    if is_projective:
        w = last[:, :, :ndim] @ flat + last[:, :, ndim:]
        out = out / w
    return out.reshape(points.shape[0], ndim, *points.shape[2:])


def voxel_to_normalized(voxel: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Voxel coordinates ``(B, ndim, *S)`` of a grid of ``shape`` -> ``grid_sample`` grid ``(B, *S, ndim)``."""
    ndim = len(shape)
    size = torch.tensor(shape, dtype=voxel.dtype, device=voxel.device).view(1, ndim, *([1] * (voxel.dim() - 2)))
    normalized = 2.0 * voxel / (size - 1).clamp(min=1) - 1.0
    # grid_sample wants the last dimension in reversed axis order (x = last array axis).
    return normalized.flip(1).movedim(1, -1)


def sample_voxels(
    tensor: Tensor,
    voxel: Tensor,
    *,
    mode: InterpMode = "linear",
    padding: PaddingMode = "zeros",
) -> Tensor:
    """Sample ``tensor (B, C, *S_in)`` at voxel coordinates ``voxel (B, ndim, *S_out)`` of its grid.

    ``S_out`` may have any number of dimensions (e.g. a point list ``(B, ndim, N)``); the result is
    ``(B, C, *S_out)``."""
    ndim = voxel.shape[1]
    if tensor.dim() != ndim + 2:
        raise ShapeError(f"sample_voxels: tensor {tuple(tensor.shape)} is not (B, C, *spatial) with {ndim} spatial dims")
    if voxel.dim() != ndim + 2:
        # grid_sample wants as many output dims as input dims: sample a flat (N, 1[, 1]) block.
        flat = voxel.reshape(voxel.shape[0], ndim, -1, *([1] * (ndim - 1)))
        out = sample_voxels(tensor, flat, mode=mode, padding=padding)
        return out.reshape(out.shape[0], out.shape[1], *voxel.shape[2:])
    if voxel.shape[0] != tensor.shape[0]:
        if voxel.shape[0] == 1:
            voxel = voxel.expand(tensor.shape[0], *voxel.shape[1:])
        elif tensor.shape[0] == 1:
            tensor = tensor.expand(voxel.shape[0], *tensor.shape[1:])
        else:
            raise ShapeError(f"sample_voxels: batch {tensor.shape[0]} vs {voxel.shape[0]}")
    grid = voxel_to_normalized(voxel.to(tensor.dtype), tuple(tensor.shape[2:]))
    torch_mode = "bilinear" if mode == "linear" else "nearest"
    return F.grid_sample(tensor, grid, mode=torch_mode, padding_mode=padding, align_corners=True)


def sample_world(
    tensor: Tensor,
    grid: Grid,
    world: Tensor,
    *,
    mode: InterpMode = "linear",
    padding: PaddingMode = "zeros",
) -> Tensor:
    """Sample ``tensor (B, C, *grid.shape)`` living on ``grid`` at world points ``(B, ndim, *S_out)``."""
    voxel = apply_matrix(grid.voxel_from_world, world)
    return sample_voxels(tensor, voxel, mode=mode, padding=padding)


def resize_field(field: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Resize a map or displacement field ``(B, ndim, *S)`` to ``shape`` keeping corner voxels fixed.

    World-unit fields keep their values (units do not depend on the grid), so no rescaling is needed.
    """
    if tuple(field.shape[2:]) == tuple(shape):
        return field
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(field, size=tuple(shape), mode=mode, align_corners=True)


def resize_image(tensor: Tensor, shape: tuple[int, ...], *, mode: InterpMode = "linear") -> Tensor:
    if tuple(tensor.shape[2:]) == tuple(shape):
        return tensor
    if mode == "nearest":
        # Same corner-aligned geometry as the linear path, read with nearest-neighbour lookups.
        ndim = len(shape)
        scale = torch.tensor([(o - 1) / max(n - 1, 1) for o, n in zip(tensor.shape[2:], shape)], dtype=torch.float32)
        target = Grid(tuple(shape), torch.eye(ndim + 1, dtype=torch.float64))
        voxel = target.voxel_points(device=tensor.device) * scale.to(tensor.device).view(1, ndim, *([1] * ndim))
        return sample_voxels(tensor.float(), voxel, mode="nearest", padding="border").to(tensor.dtype)
    torch_mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(tensor, size=tuple(shape), mode=torch_mode, align_corners=True)


def points_to_tensor(points: Tensor) -> Tensor:
    """Landmark lists ``(N, ndim)`` -> the ``(1, ndim, N)`` layout that transforms accept."""
    if points.dim() != 2:
        raise ShapeError(f"points must be (N, ndim), got {tuple(points.shape)}")
    return points.t().unsqueeze(0)


def tensor_to_points(tensor: Tensor) -> Tensor:
    """Inverse of :func:`points_to_tensor`."""
    return tensor[0].t()
