"""Score a :class:`~alignkit.evaluate.method.Prediction` against a :class:`~alignkit.data.case.Case`.

One function for every method, so no tool is judged by its own code: the prediction's map (or
matrix) is the only thing read from the method. Which metrics are computed depends on the ground
truth the case carries (labels → Dice/HD95; points → TRE; flow → EPE/Fl; matrix → corner error);
the Jacobian statistics of the map are always reported. Keys are flat (``results.csv`` columns).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from alignkit.data.case import Case
from alignkit.errors import ShapeError
from alignkit.evaluate.method import Prediction
from alignkit.spatial import Grid, apply_matrix, jacobian_determinant, sample_world


def world_map_of(prediction: Prediction, grid: Grid) -> torch.Tensor:
    """The prediction's map as a ``(1, ndim, *S)`` float64 tensor on ``grid``."""
    if prediction.world_map is not None:
        world = torch.as_tensor(np.asarray(prediction.world_map), dtype=torch.float64)
        if tuple(world.shape) != (grid.ndim, *grid.shape):
            raise ShapeError(f"prediction map {tuple(world.shape)} is not (ndim, *fixed_shape) = {(grid.ndim, *grid.shape)}")
        return world.unsqueeze(0)
    if prediction.matrix is None:
        raise ShapeError("a prediction needs world_map or matrix")
    matrix = torch.as_tensor(np.asarray(prediction.matrix), dtype=torch.float64)
    return map_points_through(matrix, grid.world_points(dtype=torch.float64))


def map_points_through(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply a homogeneous matrix (affine or projective) to ``(B, ndim, *S)`` points."""
    ndim = matrix.shape[0] - 1
    flat = points.reshape(points.shape[0], ndim, -1)
    ones = torch.ones_like(flat[:, :1])
    out = torch.einsum("ij,bjn->bin", matrix.to(flat), torch.cat([flat, ones], 1))
    return (out[:, :ndim] / out[:, ndim:]).reshape(points.shape)


def _points_through_map(world: torch.Tensor, grid: Grid, points: np.ndarray) -> np.ndarray:
    """Linear interpolation of the dense map at ``(N, ndim)`` world points of the fixed grid."""
    pts = torch.as_tensor(points, dtype=torch.float64).T.unsqueeze(0)  # (1, ndim, N)
    return sample_world(world, grid, pts, padding="border")[0].T.numpy()


def score_case(case: Case, prediction: Prediction) -> dict[str, Any]:
    """Every metric the case's ground truth allows, as a flat ``{name: float}`` dict."""
    from alignkit.metrics import dice_per_label, flow_error_stats, hd95_per_label, jacobian_stats, tre

    grid = case.fixed.grid
    world = world_map_of(prediction, grid)
    scores: dict[str, Any] = {}
    det = jacobian_determinant(world, grid)[0, 0].numpy()
    jac = jacobian_stats(det)
    scores.update(
        nonpositive_jacobian_percent=jac["percent_nonpositive"],
        folds=jac["num_nonpositive"],
        sdlogj=jac["sdlogj"],
        jacobian_min=jac["min"],
    )
    if case.fixed_labels is not None and case.moving_labels is not None:
        if prediction.warped_labels is not None:
            warped = np.asarray(prediction.warped_labels)
        else:
            moving_labels = case.moving_labels.batch(dtype=torch.float64)
            warped = sample_world(moving_labels, case.moving_labels.grid, world, mode="nearest")[0, 0].numpy()
        warped = np.rint(warped).astype(np.int64)
        fixed = np.rint(case.fixed_labels.data[0].numpy()).astype(np.int64)
        dice = dice_per_label(warped, fixed, case.label_ids)
        spacing = [float(s) for s in case.fixed_labels.grid.spacing]
        hd = hd95_per_label(warped, fixed, spacing, case.label_ids)
        finite = [v for v in hd.values() if math.isfinite(v)]
        scores.update(
            dice_mean=float(np.mean(list(dice.values()))) if dice else math.nan,
            hd95_mean=float(np.mean(finite)) if finite else math.nan,
            n_labels=len(dice),
        )
    if case.fixed_points is not None and case.moving_points is not None:
        mapped = _points_through_map(world, grid, np.asarray(case.fixed_points, dtype=np.float64))
        err = tre(mapped, np.asarray(case.moving_points, dtype=np.float64))
        before = tre(np.asarray(case.fixed_points), np.asarray(case.moving_points))
        scores.update(tre_mean=err["mean"], tre_median=err["median"], tre_max=err["max"], tre_before=before["mean"])
    if case.flow is not None:
        identity = grid.world_points(dtype=torch.float64)
        # flow in voxels of the fixed grid, world-axis order (x, y): world displacement / spacing
        spacing = grid.spacing.to(torch.float64).view(1, -1, *([1] * grid.ndim))
        flow = ((world - identity) / spacing)[0].numpy()
        gt = np.asarray(case.flow, dtype=np.float64)
        valid = np.ones(grid.shape, bool) if case.valid is None else np.asarray(case.valid, bool)
        stats = flow_error_stats(np.moveaxis(flow, 0, -1), np.moveaxis(gt, 0, -1), valid)
        scores.update(epe=stats["epe"], fl_all=stats["fl_all"], px1=stats["1px"], px3=stats["3px"])
        if case.occluded is not None:
            noc = valid & ~np.asarray(case.occluded, bool)
            scores["epe_noc"] = flow_error_stats(np.moveaxis(flow, 0, -1), np.moveaxis(gt, 0, -1), noc)["epe"]
    if case.matrix is not None:
        corners = _corner_points(grid)
        true = map_points_through(torch.as_tensor(case.matrix, dtype=torch.float64), corners)
        if prediction.matrix is not None:
            pred = map_points_through(torch.as_tensor(np.asarray(prediction.matrix), dtype=torch.float64), corners)
        else:
            pred = torch.as_tensor(_points_through_map(world, grid, corners[0].T.numpy()).T).unsqueeze(0)
        errors = torch.linalg.norm(pred - true, dim=1)[0].numpy()
        scores["corner_error"] = float(errors.mean())
        identity_err = torch.linalg.norm(corners - true, dim=1)[0].numpy()
        scores["corner_error_before"] = float(identity_err.mean())
    return scores


def _corner_points(grid: Grid) -> torch.Tensor:
    """World coordinates of the centres of the grid's corner voxels, ``(1, ndim, 2**ndim)``."""
    import itertools

    corners = [list(c) for c in itertools.product(*[(0.0, float(s - 1)) for s in grid.shape])]
    voxel = torch.tensor(corners, dtype=torch.float64).T.unsqueeze(0)
    return apply_matrix(grid.world_from_voxel, voxel)
