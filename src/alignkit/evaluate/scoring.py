"""Score a :class:`~alignkit.evaluate.method.Prediction` against a :class:`~alignkit.data.case.Case`.

One function for every method, so no tool is judged by its own code: the prediction's map (or
matrix) is the only thing read from the method. Which metrics are computed depends on the ground
truth the case carries (labels → Dice/HD95; points → TRE, and PCK in 2D; flow → EPE/Fl of the map's
flow against ``Case.flow``, both as :mod:`alignkit.spatial` defines a flow, and EPE over
non-occluded pixels when occlusions are known; matrix → corner error, and success flags in 2D); the
Jacobian statistics of the map (folds and their severity, Shen et al. 2019 Table 1; SDlogJ) are always
reported. Inverse consistency (Shen et al. 2019 Fig. 7) needs the backward registration too, so it is not scored
from one prediction. Keys are flat (``results.csv`` columns); the 0/1 success flags average to a
success rate in a summary.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from alignkit.data.case import Case
from alignkit.errors import ShapeError
from alignkit.evaluate.method import Prediction
from alignkit.spatial import (
    Grid,
    apply_matrix,
    flow_from_world_map,
    jacobian_determinant,
    sample_world,
    xy_from_flow,
)

PCK_THRESHOLDS_PX = (1.0, 3.0, 5.0)
"""PCK@k thresholds in pixels of the moving image (Zampieri et al. 2018 §4 uses absolute pixel thresholds)."""

SUCCESS_THRESHOLDS_PX = (1.0, 3.0, 5.0)
"""Corner-error thresholds of the homography success flags (the HPatches 1/3/5 px rates)."""


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
    from alignkit.metrics import (
        corner_error,
        dice_per_label,
        flow_error_stats,
        hd95_per_label,
        jacobian_stats,
        pck,
        success_rates,
        tre,
    )

    grid = case.fixed.grid
    world = world_map_of(prediction, grid)
    scores: dict[str, Any] = {}
    det = jacobian_determinant(world, grid)[0, 0].numpy()
    jac = jacobian_stats(det)
    scores.update(
        nonpositive_jacobian_percent=jac["percent_nonpositive"],
        folds=jac["folds"],  # Shen et al. 2019's |{x : J(x) < 0}|
        fold_severity=jac["fold_severity"],  # mean |J| over those voxels (Shen et al. 2019 Table 1 brackets)
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
        if grid.ndim == 2:
            # k pixels of the moving image, where the errors live (a photograph's pixel is 1 world unit)
            pixel = float(case.moving.grid.spacing.mean())
            for k in PCK_THRESHOLDS_PX:
                scores[f"pck_{k:g}px"] = pck(mapped, case.moving_points, threshold=k * pixel)
    if case.flow is not None:
        # both as flows (voxels of the fixed grid, array-axis order; alignkit.spatial), handed to the
        # metrics in their (H, W, 2) x-then-y layout
        flow = flow_from_world_map(world, grid)[0].numpy()
        gt = np.asarray(case.flow, dtype=np.float64)
        valid = np.ones(grid.shape, bool) if case.valid is None else np.asarray(case.valid, bool)
        occluded = None if case.occluded is None else np.asarray(case.occluded, bool)
        stats = flow_error_stats(xy_from_flow(flow), xy_from_flow(gt), valid, occluded)
        scores.update(epe=stats["epe"], fl_all=stats["fl_all"], px1=stats["1px"], px3=stats["3px"])
        if occluded is not None:
            scores.update(epe_noc=stats["epe_noc"], epe_occ=stats["epe_occ"])
    if case.matrix is not None:
        corners = _corner_points(grid)
        corner_list = corners[0].T.numpy()  # (2**ndim, ndim) world points: pixel-centre corners of a photo
        true_matrix = np.asarray(case.matrix, dtype=np.float64)
        if prediction.matrix is not None:
            predicted = np.asarray(prediction.matrix, dtype=np.float64)
            scores["corner_error"] = corner_error(predicted, true_matrix, corners=corner_list)
        else:
            true = map_points_through(torch.as_tensor(true_matrix), corners)
            pred = torch.as_tensor(_points_through_map(world, grid, corner_list).T).unsqueeze(0)
            scores["corner_error"] = float(torch.linalg.norm(pred - true, dim=1)[0].mean())
        no_motion = np.eye(grid.ndim + 1)
        scores["corner_error_before"] = corner_error(no_motion, true_matrix, corners=corner_list)
        if grid.ndim == 2:
            # one pair -> each rate is 0 or 1; their mean over cases is the success rate
            rates = success_rates([scores["corner_error"]], SUCCESS_THRESHOLDS_PX)
            scores.update({f"success_{key}": value for key, value in rates.items()})
    return scores


def _corner_points(grid: Grid) -> torch.Tensor:
    """World coordinates of the centres of the grid's corner voxels, ``(1, ndim, 2**ndim)``."""
    import itertools

    corners = [list(c) for c in itertools.product(*[(0.0, float(s - 1)) for s in grid.shape])]
    voxel = torch.tensor(corners, dtype=torch.float64).T.unsqueeze(0)
    return apply_matrix(grid.world_from_voxel, voxel)
