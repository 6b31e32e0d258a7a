"""Jacobian-determinant statistics of a deformation: folds, fold severity, SDlogJ.

Conventions
-----------
* A **map** is alignkit's (see :mod:`alignkit.spatial`): ``(ndim, *S)`` or ``(B, ndim, *S)`` world
  points, one per voxel of a grid placed by ``world_from_voxel``; components in world order
  ``(x, y[, z])``. Its Jacobian is ``d map / d world`` (so spacing and direction cosines are taken
  into account and the identity map has determinant 1 on any grid).
* Derivatives are central differences, one-sided at the border: the determinant is
  :func:`alignkit.spatial.jacobian_determinant`'s (alignkit has one).
* **Folds** follow Shen et al., Networks for Joint Affine and Non-parametric Image Registration, CVPR 2019 (§3 and Table 1): a voxel is folded where
  ``J(x) < 0`` (strictly), the fold count is ``|{x : J(x) < 0}|``, and the fold **severity** is the
  absolute determinant at those voxels (Shen et al. 2019 reports its average in square brackets next to the count).
* Determinant arrays given to :func:`jacobian_stats` may have any shape, e.g. the ``(B, 1, *S)``
  output of :func:`alignkit.spatial.jacobian_determinant`; every voxel of every batch item is pooled.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from alignkit.errors import InputError, ShapeError
from alignkit.metrics.overlap import to_numpy
from alignkit.spatial.grid import Grid
from alignkit.spatial.jacobian import jacobian_determinant


def _matrix_of(world_from_voxel: Any) -> np.ndarray:
    if isinstance(world_from_voxel, Grid):
        return to_numpy(world_from_voxel.world_from_voxel, "world_from_voxel").astype(np.float64)
    matrix = to_numpy(world_from_voxel, "world_from_voxel").astype(np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] not in (3, 4):
        raise ShapeError(f"world_from_voxel must be a 3x3 (2D) or 4x4 (3D) matrix, got {matrix.shape}")
    return matrix


def jacobian_determinant_from_map(world_map: Any, world_from_voxel: Any) -> np.ndarray:
    """Determinant of ``d map / d world`` at every voxel of a world map (numpy, float64).

    ``world_map`` is ``(ndim, *S)`` or ``(B, ndim, *S)`` (numpy or torch); ``world_from_voxel`` is the
    grid's ``(ndim + 1, ndim + 1)`` homogeneous matrix or a :class:`~alignkit.spatial.Grid`. Returns
    ``(*S)`` or ``(B, *S)``: 1 for the identity (on any grid), ``<= 0`` where the map folds. A numpy
    front of :func:`alignkit.spatial.jacobian_determinant`, the one Jacobian determinant, run in float64.
    """
    matrix = _matrix_of(world_from_voxel)
    ndim = matrix.shape[0] - 1
    given = to_numpy(world_map, "world_map").astype(np.float64)
    batched = given.ndim == ndim + 2
    values = given if batched else given[None]
    if values.ndim != ndim + 2 or values.shape[1] != ndim:
        raise ShapeError(f"world_map must be (ndim, *S) or (B, ndim, *S) with ndim={ndim}, got {given.shape}")
    if isinstance(world_from_voxel, Grid) and tuple(values.shape[2:]) != world_from_voxel.shape:
        raise ShapeError(f"world_map shape {values.shape[2:]} is not the grid's {world_from_voxel.shape}")
    if min(values.shape[2:]) < 2:
        raise ShapeError(f"finite differences need >= 2 voxels along every axis, got {values.shape[2:]}")
    grid = world_from_voxel if isinstance(world_from_voxel, Grid) else Grid(tuple(values.shape[2:]), matrix)
    det = jacobian_determinant(torch.from_numpy(values), grid)[:, 0].numpy()
    return det if batched else det[0]


def jacobian_stats(det: Any, mask: Any | None = None, *, clip: float = 1e-9) -> dict[str, float]:
    """Summary of a Jacobian-determinant map (restricted to ``mask != 0`` when given).

    Returns

    * ``percent_nonpositive`` (0-100) and ``num_nonpositive``: voxels with ``det <= 0``;
    * ``folds``: ``|{x : det(x) < 0}|`` and ``fold_percent`` (0-100) -- Shen et al. 2019's fold count (Table 1);
    * ``fold_severity``: mean ``|det|`` over the folded voxels and ``fold_severity_max`` their largest
      ``|det|`` -- Shen et al. 2019's "absolute value of the determinant of the Jacobian in these cases indicating
      the severity of the fold" (§3, Table 1 brackets). Both are ``0.0`` when nothing folds (Shen et al. 2019 prints
      a bare 0 for those methods), so an average over cases stays finite;
    * ``sdlogj``: standard deviation of ``log(clip(det, clip, 1e9))`` (Learn2Reg's SDlogJ; folded
      voxels enter as ``log(clip)``);
    * ``min``, ``max``, ``mean`` of ``det`` and ``n`` (voxels counted).

    ``mask`` must broadcast to ``det`` (e.g. ``(*S)`` against ``(1, 1, *S)``).
    """
    values = to_numpy(det, "det").astype(np.float64)
    if mask is not None:
        m = to_numpy(mask, "mask") != 0
        try:
            m = np.broadcast_to(m.reshape((1,) * max(values.ndim - m.ndim, 0) + m.shape), values.shape)
        except ValueError as exc:
            raise ShapeError(f"mask {m.shape} does not broadcast to det {values.shape}") from exc
        values = values[m]
    values = values.reshape(-1)
    if values.size == 0:
        raise InputError("jacobian_stats: no voxel to summarise (empty det or mask)")
    if not np.all(np.isfinite(values)):
        raise InputError("jacobian_stats: det contains NaN or Inf")
    nonpositive = int((values <= 0).sum())
    folded = np.abs(values[values < 0])
    return {
        "percent_nonpositive": 100.0 * nonpositive / values.size,
        "num_nonpositive": nonpositive,
        "folds": int(folded.size),
        "fold_percent": 100.0 * folded.size / values.size,
        "fold_severity": float(folded.mean()) if folded.size else 0.0,
        "fold_severity_max": float(folded.max()) if folded.size else 0.0,
        "sdlogj": float(np.log(np.clip(values, clip, 1e9)).std()),
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean()),
        "n": int(values.size),
    }
