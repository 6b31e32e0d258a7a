"""Jacobians of maps (``(B, ndim, *S)`` world points on a grid), in world units."""

from __future__ import annotations

import torch
from torch import Tensor

from alignkit.spatial.grid import Grid


def spatial_gradient(field: Tensor, spacing: Tensor | None = None) -> Tensor:
    """Central differences (one-sided at the border) of ``field (B, C, *S)`` along each array axis.

    Returns ``(B, C, ndim, *S)``; divided by ``spacing`` (per array axis) when given.
    """
    ndim = field.dim() - 2
    grads = torch.gradient(field, dim=tuple(range(2, 2 + ndim)))
    out = torch.stack(grads, dim=2)
    if spacing is not None:
        out = out / spacing.to(field).view(1, 1, ndim, *([1] * ndim))
    return out


def jacobian_matrix(world_map: Tensor, grid: Grid) -> Tensor:
    """d(map)/d(world) for a map on ``grid``: ``(B, ndim, ndim, *S)`` (row = map component)."""
    ndim = grid.ndim
    d_map_d_voxel = spatial_gradient(world_map)  # (B, ndim, ndim_axes, *S)
    voxel_from_world_linear = torch.linalg.inv(grid.world_from_voxel[:ndim, :ndim]).to(world_map)
    # chain rule: d map / d world = (d map / d voxel) @ (d voxel / d world), written out over the
    # ndim x ndim matrix: ``torch.einsum("bia...,aj->bij...")`` does the same sums ~4x slower (a 741x500
    # 2D map, one thread: 6.8 ms against 1.8 ms)
    return torch.stack([sum(d_map_d_voxel[:, :, a] * voxel_from_world_linear[a, j] for a in range(ndim))
                        for j in range(ndim)], dim=2)


#: voxels per slab of :func:`jacobian_determinant` (the whole Jacobian of a 1.35M-voxel float64 map is
#: ~100 MB, and its product terms as much again; a slab's is a few MB)
DETERMINANT_SLAB_VOXELS = 1 << 17


def jacobian_determinant(world_map: Tensor, grid: Grid) -> Tensor:
    """Determinant of :func:`jacobian_matrix`: ``(B, 1, *S)``; 1 for the identity, <= 0 where it folds.

    Large maps are taken in slabs along the first array axis, each with a one-voxel halo so that its
    central differences are those of the whole map: the same values, without the whole ``(B, ndim,
    ndim, *S)`` Jacobian in memory at once (it set the peak memory of a 3D registration)."""
    shape = world_map.shape[2:]
    plane = max(1, world_map[0, 0, 0].numel())
    rows = max(1, DETERMINANT_SLAB_VOXELS // plane)
    if rows >= shape[0] or shape[0] < 3:
        return small_determinant(jacobian_matrix(world_map, grid)).unsqueeze(1)
    slabs = []
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])
        low, high = max(start - 1, 0), min(stop + 1, shape[0])
        if high - low < 2:  # a one-row slab at the end: one-sided differences need two rows
            low = high - 2
        piece = small_determinant(jacobian_matrix(world_map[:, :, low:high], grid))
        slabs.append(piece[:, start - low : stop - low])
    return torch.cat(slabs, dim=1).unsqueeze(1)


def small_determinant(matrix: Tensor) -> Tensor:
    """Determinant of a field of 2x2 or 3x3 matrices ``(B, n, n, *S)`` -> ``(B, *S)``.

    Written out (cofactors) because batched ``torch.linalg.det`` on millions of tiny matrices is
    ~10x slower and needs a copy into ``(..., n, n)`` layout.
    """
    n = matrix.shape[1]
    m = [[matrix[:, i, j] for j in range(n)] for i in range(n)]
    if n == 2:
        return m[0][0] * m[1][1] - m[0][1] * m[1][0]
    if n == 3:
        return (
            m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
        )
    return torch.linalg.det(matrix.movedim(1, -1).movedim(1, -1))


def nonpositive_jacobian_percent(world_map: Tensor, grid: Grid, mask: Tensor | None = None) -> float:
    det = jacobian_determinant(world_map, grid)
    if mask is not None:
        values = det[mask.expand_as(det) > 0]
    else:
        values = det.flatten()
    if values.numel() == 0:
        return 0.0
    return float((values <= 0).float().mean() * 100.0)
