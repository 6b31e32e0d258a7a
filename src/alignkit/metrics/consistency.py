"""Inverse consistency of a pair of registrations (forward fixed → moving, backward moving → fixed).

Conventions
-----------
* Maps are alignkit maps (see :mod:`alignkit.spatial`): ``(ndim, *S)`` or ``(B, ndim, *S)`` world
  points. ``forward_map`` lives on ``grid`` (the fixed grid) and holds, for each fixed voxel, the
  moving world point it maps to; ``backward_map`` lives on ``backward_grid`` (the moving grid; by
  default the same grid) and holds, for each moving voxel, the fixed world point it maps to.
* The composition ``backward ∘ forward`` is evaluated at the fixed voxel centres by sampling
  ``backward_map`` at the world points of ``forward_map`` with (bi/tri)linear interpolation
  (:func:`alignkit.spatial.sample_world`); points that land outside the backward grid take the
  nearest border value. Linear interpolation is exact for affine maps, so an exact affine pair gives
  zero error.
* Errors ``||backward(forward(x)) - x||`` are in world units (mm, pixels for photographs) and are
  measured only ``margin`` voxels or more away from the border of ``grid`` along every axis, as in
  Shen et al. 2019 (§3, Fig. 7: "we only evaluate this measure in the interior of the image
  volume (10 voxels away from the boundary)"), because methods treat the border differently.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from alignkit.errors import InputError, ShapeError
from alignkit.metrics.overlap import to_numpy
from alignkit.spatial.grid import Grid
from alignkit.spatial.points import sample_world


def _batched_map(world_map: Any, grid: Grid, name: str) -> torch.Tensor:
    values = torch.as_tensor(to_numpy(world_map, name), dtype=torch.float64)
    if values.dim() == grid.ndim + 1:
        values = values.unsqueeze(0)
    if values.dim() != grid.ndim + 2 or tuple(values.shape[1:]) != (grid.ndim, *grid.shape):
        raise ShapeError(
            f"{name} must be (ndim, *S) or (B, ndim, *S) with ndim={grid.ndim}, S={grid.shape}, "
            f"got {tuple(values.shape)}"
        )
    if not torch.isfinite(values).all():
        raise InputError(f"{name} contains NaN or Inf")
    return values


def inverse_consistency_error(
    forward_map: Any,
    backward_map: Any,
    grid: Grid,
    margin: int = 10,
    *,
    backward_grid: Grid | None = None,
) -> dict[str, float]:
    """Inverse-consistency error ``||φ_ts ∘ φ_st - id||`` in world units, away from the border.

    ``forward_map`` (``φ_st``, on ``grid``) and ``backward_map`` (``φ_ts``, on ``backward_grid``,
    default ``grid``) follow the module conventions; both may carry a batch size ``B`` (equal, or 1 on
    one side to pair one map with many), whose voxels are pooled. ``margin`` (voxels, ``>= 0``) drops
    that many voxels at each end of every axis of ``grid``; Shen et al. 2019 uses 10.

    Returns ``mean``, ``rms``, ``median``, ``p95``, ``max`` of the per-voxel error, ``log_mse`` =
    ``ln(mean ||·||²)`` -- the quantity Shen et al. 2019 plots in Fig. 7 (``ln(1/|V| ||Φ⁻¹∘(Φts)⁻¹ - id||²)``,
    here in world units, so it differs from Shen et al. 2019's by a constant for another unit) -- and ``n`` (voxels
    measured). ``log_mse`` is ``-inf`` for an exact pair.
    """
    if margin < 0:
        raise InputError(f"margin must be >= 0 voxels, got {margin}")
    back_grid = grid if backward_grid is None else backward_grid
    if back_grid.ndim != grid.ndim:
        raise ShapeError(f"backward_grid is {back_grid.ndim}D but grid is {grid.ndim}D")
    forward = _batched_map(forward_map, grid, "forward_map")
    backward = _batched_map(backward_map, back_grid, "backward_map")
    if forward.shape[0] != backward.shape[0] and 1 not in (forward.shape[0], backward.shape[0]):
        raise ShapeError(f"batch sizes differ: forward {forward.shape[0]}, backward {backward.shape[0]}")
    inner = tuple(slice(margin, s - margin) for s in grid.shape)
    if any(s - 2 * margin <= 0 for s in grid.shape):
        raise InputError(f"margin {margin} leaves no voxel of a grid of shape {grid.shape}")
    # only the interior is composed: sampling the whole map and then cropping would cost more
    points = forward[(slice(None), slice(None), *inner)]
    composed = sample_world(backward, back_grid, points, mode="linear", padding="border")
    identity = grid.world_points(dtype=torch.float64)[(slice(None), slice(None), *inner)]
    errors = torch.linalg.norm(composed - identity, dim=1).reshape(-1).numpy()
    mse = float(np.mean(errors**2))
    return {
        "mean": float(errors.mean()),
        "rms": math.sqrt(mse),
        "median": float(np.median(errors)),
        "p95": float(np.percentile(errors, 95.0)),
        "max": float(errors.max()),
        "log_mse": math.log(mse) if mse > 0 else -math.inf,
        "n": int(errors.size),
    }
