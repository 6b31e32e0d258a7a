"""Evaluation metrics of issue 3 (folds, inverse consistency, EPE-noc, PCK, corner error, descriptor
mAP) against hand-computed cases and other libraries, and score_case on tiny cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from alignkit.data.case import Case
from alignkit.errors import InputError, ShapeError
from alignkit.evaluate.method import Prediction
from alignkit.evaluate.scoring import score_case
from alignkit.image import Image
from alignkit.metrics import (
    corner_error,
    corner_errors,
    descriptor_ap,
    descriptor_map,
    flow_error_stats,
    homography_point_error,
    image_corners,
    inverse_consistency_error,
    jacobian_determinant_from_map,
    jacobian_stats,
    pck,
    success_rates,
)
from alignkit.spatial import Grid, jacobian_determinant


def _affine_map(grid: Grid, matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``(ndim, *S)`` world map ``x -> matrix @ x + offset`` on ``grid``."""
    ident = grid.world_points(dtype=torch.float64)[0].numpy()
    return np.einsum("ij,j...->i...", matrix, ident) + offset.reshape(-1, *([1] * grid.ndim))


# -- Jacobian: folds, severity, determinant of a map ------------------------------------------------
def test_jacobian_stats_folds_and_severity_002() -> None:
    det = np.array([[2.0, -0.5], [-1.5, 0.0]])
    stats = jacobian_stats(torch.from_numpy(det)[None, None])
    # folds are J < 0 strictly (002 Table 1): -0.5 and -1.5; J = 0 is non-positive but not a fold
    assert stats["folds"] == 2 and stats["num_nonpositive"] == 3
    assert stats["fold_percent"] == pytest.approx(50.0)
    assert stats["fold_severity"] == pytest.approx(1.0)  # mean(|-0.5|, |-1.5|)
    assert stats["fold_severity_max"] == pytest.approx(1.5)
    assert stats["sdlogj"] == pytest.approx(np.log(np.clip(det.ravel(), 1e-9, 1e9)).std())
    json.dumps(stats)
    clean = jacobian_stats(np.array([0.5, 1.0, 2.0]))
    assert (clean["folds"], clean["fold_severity"], clean["fold_severity_max"]) == (0, 0.0, 0.0)
    masked = jacobian_stats(det, mask=np.array([[0, 1], [0, 0]]))
    assert (masked["folds"], masked["fold_severity"], masked["n"]) == (1, 0.5, 1)


def test_jacobian_determinant_from_map_hand_and_torch() -> None:
    # 2D raster grid with anisotropic spacing; a linear map has det(A) everywhere, border included
    grid = Grid.from_spacing(
        (5, 6), (2.0, 0.5), origin=(1.0, -3.0), direction=torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    )
    a = np.array([[1.5, 0.4], [-0.2, 0.8]])
    det = jacobian_determinant_from_map(_affine_map(grid, a, np.array([3.0, 1.0])), grid)
    assert det.shape == (5, 6)
    np.testing.assert_allclose(det, np.linalg.det(a), rtol=1e-12)
    # map (x + x^2, y) on a unit grid: central differences are exact for a quadratic -> 1 + 2x inside
    grid = Grid.from_spacing((6, 4))
    ident = grid.world_points(dtype=torch.float64)[0].numpy()
    quad = np.stack([ident[0] + ident[0] ** 2, ident[1]])
    det = jacobian_determinant_from_map(quad, grid.world_from_voxel)
    np.testing.assert_allclose(det[1:-1], 1.0 + 2.0 * ident[0][1:-1])
    # batched 3D input gives the torch implementation's numbers, border included
    rng = np.random.default_rng(0)
    grid3 = Grid.from_spacing((4, 5, 6), (1.0, 2.0, 0.7))
    maps = grid3.world_points(dtype=torch.float64).numpy() + rng.normal(0, 0.4, size=(2, 3, 4, 5, 6))
    expected = jacobian_determinant(torch.from_numpy(maps), grid3)[:, 0].numpy()
    np.testing.assert_allclose(
        jacobian_determinant_from_map(torch.from_numpy(maps), grid3), expected, atol=1e-12
    )
    with pytest.raises(ShapeError):
        jacobian_determinant_from_map(maps[:, :2], grid3)
    with pytest.raises(ShapeError):
        jacobian_determinant_from_map(maps, Grid.from_spacing((4, 5, 7)))


def test_jacobian_determinant_from_map_matches_simpleitk() -> None:
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(1)
    shape, spacing_xyz, origin = (6, 7, 8), (1.5, 1.0, 2.0), (3.0, -2.0, 5.0)
    # alignkit grid of a numpy array read from ITK: array axes (z, y, x), world components (x, y, z)
    affine = np.zeros((4, 4))
    affine[0, 2], affine[1, 1], affine[2, 0], affine[3, 3] = (
        spacing_xyz[0],
        spacing_xyz[1],
        spacing_xyz[2],
        1.0,
    )
    affine[:3, 3] = origin
    grid = Grid(shape, torch.from_numpy(affine))
    displacement = rng.normal(0, 0.3, size=(3, *shape))
    det = jacobian_determinant_from_map(
        grid.world_points(dtype=torch.float64)[0].numpy() + displacement, grid
    )
    field = sitk.GetImageFromArray(np.moveaxis(displacement, 0, -1), isVector=True)
    field.SetSpacing(spacing_xyz)
    field.SetOrigin(origin)
    itk_det = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field, True))
    # ITK pads the border by replication (half-size differences there): compare the interior
    np.testing.assert_allclose(det[1:-1, 1:-1, 1:-1], itk_det[1:-1, 1:-1, 1:-1], atol=1e-10)
    assert np.abs(det - itk_det).max() > 1e-3  # the comparison above is not vacuous


# -- inverse consistency ------------------------------------------------------------------------------
def test_inverse_consistency_translation_hand_and_margin() -> None:
    grid = Grid.from_spacing((12, 14), (1.5, 1.0), origin=(2.0, 1.0))
    t, e = np.array([0.6, -0.3]), np.array([0.3, 0.4])
    forward = _affine_map(grid, np.eye(2), t)
    backward = _affine_map(grid, np.eye(2), -t + e)  # off by e everywhere -> error |e| = 0.5
    out = inverse_consistency_error(forward, backward, grid, margin=2)
    assert out["mean"] == pytest.approx(0.5) and out["max"] == pytest.approx(0.5)
    assert out["rms"] == pytest.approx(0.5) and out["log_mse"] == pytest.approx(math.log(0.25))
    assert out["n"] == (12 - 4) * (14 - 4)
    # corrupt the backward map on its first row of voxels only: interior voxels never sample it
    corrupted = backward.copy()
    corrupted[:, 0, :] += 10.0
    assert inverse_consistency_error(forward, corrupted, grid, margin=2)["max"] == pytest.approx(0.5)
    # without a margin, fixed voxel row 0 lands 0.4 voxel into the backward grid -> 60 % of the jump
    assert inverse_consistency_error(forward, corrupted, grid, margin=0)["max"] > 5.0
    with pytest.raises(InputError):
        inverse_consistency_error(forward, backward, grid, margin=6)
    with pytest.raises(ShapeError):
        inverse_consistency_error(forward[:, :-1], backward, grid)


def test_inverse_consistency_exact_affine_pair_is_zero_across_grids() -> None:
    fixed = Grid.from_spacing((10, 11), (1.0, 1.2))
    moving = Grid.from_spacing((13, 12), (0.9, 1.5), origin=(-1.0, 0.5))
    angle = 0.1
    a = 1.05 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    b = np.array([0.4, -0.2])
    forward = _affine_map(fixed, a, b)
    backward = _affine_map(moving, np.linalg.inv(a), -np.linalg.inv(a) @ b)  # on the moving grid
    out = inverse_consistency_error(
        torch.from_numpy(forward), backward, fixed, margin=2, backward_grid=moving
    )
    assert out["max"] < 1e-9  # linear interpolation reproduces an affine map exactly
    # the backward map read as if it sat 0.5 mm further along x: off by about that much
    shifted = Grid.from_spacing((13, 12), (0.9, 1.5), origin=(-0.5, 0.5))
    wrong = inverse_consistency_error(forward, backward, fixed, margin=2, backward_grid=shifted)
    assert 0.4 < wrong["mean"] < 0.6
    with pytest.raises(ShapeError):  # the backward map does not fit the fixed grid
        inverse_consistency_error(forward, backward, fixed, margin=2)


def test_inverse_consistency_matches_scipy_map_coordinates() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(2)
    grid = Grid.from_spacing((7, 8, 9), (1.0, 1.5, 0.8), origin=(0.5, 0.0, -1.0))
    ident = grid.world_points(dtype=torch.float64).numpy()  # (1, 3, *S)
    forward = ident + ndimage.gaussian_filter(rng.normal(0, 2.0, size=(2, 3, 7, 8, 9)), (0, 0, 1, 1, 1))
    backward = ident - ndimage.gaussian_filter(rng.normal(0, 2.0, size=(2, 3, 7, 8, 9)), (0, 0, 1, 1, 1))
    out = inverse_consistency_error(forward, backward, grid, margin=1)
    # reference: trilinear interpolation of each backward component at the forward points' voxel coords
    inv = np.linalg.inv(grid.world_from_voxel.numpy())
    errors = []
    for b in range(2):
        pts = forward[b][(slice(None), slice(1, -1), slice(1, -1), slice(1, -1))].reshape(3, -1)
        voxel = inv[:3, :3] @ pts + inv[:3, 3:]
        composed = np.stack(
            [ndimage.map_coordinates(backward[b, c], voxel, order=1, mode="nearest") for c in range(3)]
        )
        target = ident[0][(slice(None), slice(1, -1), slice(1, -1), slice(1, -1))].reshape(3, -1)
        errors.append(np.linalg.norm(composed - target, axis=0))
    ref = np.concatenate(errors)
    assert out["n"] == ref.size
    assert out["mean"] == pytest.approx(ref.mean(), rel=1e-9)
    assert out["max"] == pytest.approx(ref.max(), rel=1e-9)
    assert out["p95"] == pytest.approx(np.percentile(ref, 95), rel=1e-9)


# -- flow: EPE over non-occluded / occluded pixels --------------------------------------------------------
def test_flow_error_stats_occluded_split() -> None:
    gt = np.zeros((2, 3, 2))
    flow = np.zeros((2, 3, 2))
    flow[0, 0] = [3.0, 4.0]  # EPE 5, occluded
    flow[0, 1] = [0.0, 2.0]  # EPE 2, visible
    flow[1, 2] = [1.0, 0.0]  # EPE 1, visible but invalid -> nowhere
    occluded = np.zeros((2, 3), bool)
    occluded[0, 0] = occluded[1, 1] = True
    valid = np.ones((2, 3), bool)
    valid[1, 2] = False
    stats = flow_error_stats(flow, torch.from_numpy(gt), valid, occluded)
    # valid: (0,0)=5 occ, (0,1)=2, (0,2)=0, (1,0)=0, (1,1)=0 occ
    assert stats["epe"] == pytest.approx(7 / 5)
    assert stats["epe_noc"] == pytest.approx(2 / 3) and stats["n_noc"] == 3
    assert stats["epe_occ"] == pytest.approx(5 / 2) and stats["n_occ"] == 2
    assert "epe_noc" not in flow_error_stats(flow, gt, valid)
    all_occluded = flow_error_stats(flow, gt, valid, np.ones((2, 3)))
    assert math.isnan(all_occluded["epe_noc"]) and all_occluded["epe_occ"] == pytest.approx(7 / 5)
    with pytest.raises(ShapeError):
        flow_error_stats(flow, gt, valid, np.ones((3, 2)))


# -- PCK ------------------------------------------------------------------------------------------------
def test_pck_hand_values_001() -> None:
    true = np.zeros((4, 2))
    pred = np.array([[0.5, 0.0], [0.0, 1.0], [0.0, 2.0], [3.0, 4.0]])  # errors 0.5, 1, 2, 5
    assert pck(pred, true, threshold=1.0) == pytest.approx(25.0)  # "smaller than": 1.0 is not < 1.0
    assert pck(torch.from_numpy(pred), true, threshold=2.5) == pytest.approx(75.0)
    assert pck(pred, true, alpha=0.1, reference_size=20.0) == pytest.approx(50.0)  # tau = 2: only 0.5, 1
    assert pck(pred, true, alpha=0.1, reference_size=20.000001) == pytest.approx(75.0)
    # batched, one reference size per item: item 0 tau=1.5 (2 of 4), item 1 tau=10 (4 of 4)
    both = pck(np.stack([pred, pred]), np.stack([true, true]), alpha=0.5, reference_size=[3.0, 20.0])
    assert both == pytest.approx(100 * 6 / 8)
    lost = pred.copy()
    lost[0] = np.nan  # a point the method lost is not matched
    assert pck(lost, true, threshold=2.5) == pytest.approx(50.0)
    with pytest.raises(InputError):
        pck(pred, true, threshold=1.0, alpha=0.1, reference_size=10.0)
    with pytest.raises(InputError):
        pck(pred, true, alpha=0.1)
    with pytest.raises(ShapeError):
        pck(pred, true[:3], threshold=1.0)


# -- homography corner error and success rates ----------------------------------------------------------
def test_corner_error_hand_values() -> None:
    np.testing.assert_array_equal(image_corners(10, 20), [[0, 0], [9, 0], [9, 19], [0, 19]])
    shift = np.array([[1.0, 0.0, 3.0], [0.0, 1.0, 4.0], [0.0, 0.0, 1.0]])
    assert corner_error(shift, np.eye(3), 10, 20) == pytest.approx(5.0)
    zoom = np.diag([2.0, 2.0, 1.0])  # corners move by their own distance to the origin
    assert corner_error(torch.from_numpy(zoom), np.eye(3), 10, 20) == pytest.approx(
        (0 + 9 + math.hypot(9, 19) + 19) / 4
    )
    # a projective matrix written with a different scale is the same homography
    assert corner_error(7.0 * shift, shift, 10, 20) == pytest.approx(0.0, abs=1e-12)
    # 3D: explicit corners
    corners = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    shift3 = np.eye(4)
    shift3[:3, 3] = [0.0, 0.0, 2.0]
    assert corner_error(shift3, np.eye(4), corners=corners) == pytest.approx(2.0)
    assert corner_errors(np.stack([shift, zoom]), np.stack([np.eye(3)] * 2), 10, 20) == pytest.approx(
        [5.0, (0 + 9 + math.hypot(9, 19) + 19) / 4]
    )
    # a corner sent to infinity is an infinitely bad estimate
    singular = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, -9.0]])  # w = x - 9 = 0 at x = 9
    assert corner_error(singular, np.eye(3), 10, 20) == math.inf
    with pytest.raises(InputError):
        corner_error(shift, np.eye(3))
    with pytest.raises(ShapeError):
        corner_error(np.stack([shift, shift]), np.stack([shift, shift]), 10, 20)


def test_corner_error_matches_opencv_perspective_transform() -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(3)
    width, height = 320, 240
    corners = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], np.float64)
    for _ in range(5):
        h_true = np.eye(3) + rng.normal(0, [[1e-2, 1e-2, 5.0], [1e-2, 1e-2, 5.0], [1e-5, 1e-5, 0.0]])
        h_pred = h_true + rng.normal(0, [[1e-3, 1e-3, 1.0], [1e-3, 1e-3, 1.0], [1e-6, 1e-6, 0.0]])
        a = cv2.perspectiveTransform(corners[None], h_pred)[0]
        b = cv2.perspectiveTransform(corners[None], h_true)[0]
        expected = np.linalg.norm(a - b, axis=1).mean()
        assert corner_error(h_pred, h_true, width, height) == pytest.approx(expected, rel=1e-9)


def test_success_rates_and_point_error() -> None:
    errors = [0.5, 1.0, 2.9, 4.0, math.nan, math.inf]
    rates = success_rates(errors)
    assert rates == pytest.approx({"1px": 2 / 6, "3px": 3 / 6, "5px": 4 / 6})  # <= t; NaN/inf fail
    assert success_rates(np.array([0.2, 7.0]), thresholds=(0.5, 10)) == {"0.5px": 0.5, "10px": 1.0}
    assert math.isnan(success_rates([])["1px"])
    shift = np.array([[1.0, 0.0, 3.0], [0.0, 1.0, 4.0], [0.0, 0.0, 1.0]])
    a = np.array([[0.0, 0.0], [10.0, 10.0]])
    b = np.array([[3.0, 4.0], [13.0, 14.0 + 10.0]])  # errors 0 and 10
    assert homography_point_error(shift, a, b) == pytest.approx(5.0)
    assert homography_point_error(shift, a, b, image_size=100.0) == pytest.approx(0.05)


# -- descriptor mAP (004 §6) ------------------------------------------------------------------------------
def test_descriptor_ap_hand_values_004() -> None:
    a = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    b = np.array([[0.1, 0.0], [2.0, 0.0], [9.0, 9.0]])
    # a0 -> b0 (0.1) right; a1 -> b0 (0.9 < 1.0) wrong; a2 -> b2 (5.657 < 5.831 to b1) right
    out = descriptor_ap(a, torch.from_numpy(b))
    assert out["ap"] == pytest.approx(2 / 3) and out["n"] == 3
    # ranked by NN distance: 0.1 right, 0.9 wrong, 5.657 right -> (1/3)(1 + 2/3)
    assert out["ranked_ap"] == pytest.approx(5 / 9)
    # a tie between the true match and another descriptor is not a found nearest neighbour
    tie = descriptor_ap(np.array([[0.0], [10.0]]), np.array([[1.0], [-1.0]]))
    assert tie["ap"] == 0.0
    # extra rows of B are distractors: b3 is closer to a2 than b2 is
    distracted = descriptor_ap(a, np.vstack([b, [[5.0, 5.5]]]))
    assert distracted["ap"] == pytest.approx(1 / 3)
    # the metric matters: a0's match b0 is far in L2 but points the same way
    a2, b2 = np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[10.0, 1.0], [0.5, 0.6]])
    assert descriptor_ap(a2, b2)["ap"] == 0.5
    assert descriptor_ap(a2, b2, metric="cosine")["ap"] == 1.0
    many = descriptor_map([a, a[:2]], [b, b[:2]])
    assert (
        many["map"] == pytest.approx((2 / 3 + 1 / 2) / 2) and many["n_pairs"] == 2 and many["n_queries"] == 5
    )
    assert descriptor_map(np.stack([a, a]), np.stack([b, b]))["ap"] == pytest.approx([2 / 3, 2 / 3])
    json.dumps(many)
    with pytest.raises(ShapeError):
        descriptor_ap(a, b[:2])
    with pytest.raises(ShapeError):
        descriptor_map([a], [b, b])


def test_descriptor_ap_matches_opencv_and_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    cv2 = pytest.importorskip("cv2")
    metrics = pytest.importorskip("sklearn.metrics")
    from alignkit.metrics import descriptors

    rng = np.random.default_rng(4)
    base = rng.normal(size=(300, 16)).astype(np.float32)
    a = base + rng.normal(0, 0.6, size=base.shape).astype(np.float32)
    b = base + rng.normal(0, 0.6, size=base.shape).astype(np.float32)
    out = descriptor_ap(a, b)
    matches = cv2.BFMatcher(cv2.NORM_L2).match(a, b)  # exact nearest neighbour of each row of a
    found = np.array([m.trainIdx == m.queryIdx for m in sorted(matches, key=lambda m: m.queryIdx)])
    assert 0.2 < found.mean() < 0.95  # a case where the metric is informative
    assert out["ap"] == pytest.approx(found.mean())
    nn_dist = np.array([m.distance for m in sorted(matches, key=lambda m: m.queryIdx)])
    # sklearn's AP counts recall against the correct matches only; 004's ranked list against all N
    expected = metrics.average_precision_score(found, -nn_dist) * found.mean()
    assert out["ranked_ap"] == pytest.approx(expected, rel=1e-5)
    monkeypatch.setattr(descriptors, "_CHUNK", 7)  # block boundaries do not change the answer
    assert descriptor_ap(a, b) == pytest.approx(out)


# -- score_case ------------------------------------------------------------------------------------------
def _raster_image(shape: tuple[int, int]) -> Image:
    return Image.from_array(np.zeros(shape, np.float32))


def test_score_case_homography_success_pck_and_folds() -> None:
    fixed, moving = _raster_image((20, 30)), _raster_image((20, 30))
    truth = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    points = np.array([[3.0, 4.0], [10.0, 12.0], [20.0, 5.0], [25.0, 15.0]])
    case = Case(
        "toy",
        fixed,
        moving,
        kind="homography",
        matrix=truth,
        fixed_points=points,
        moving_points=points + [0.5, 0.0],
    )
    off = truth.copy()
    off[0, 2] += 2.0  # predicted 2 px too far right
    scores = score_case(case, Prediction(matrix=off))
    assert scores["corner_error"] == pytest.approx(2.0)
    assert scores["corner_error_before"] == pytest.approx(0.5)
    assert (scores["success_1px"], scores["success_3px"], scores["success_5px"]) == (0.0, 1.0, 1.0)
    assert (scores["pck_1px"], scores["pck_3px"], scores["pck_5px"]) == (0.0, 100.0, 100.0)
    assert scores["tre_mean"] == pytest.approx(2.0)
    assert (scores["folds"], scores["fold_severity"]) == (0, 0.0)
    # the same prediction as a dense map only: corners read through the map give the same answer
    grid = fixed.grid
    dense = _affine_map(grid, off[:2, :2], off[:2, 2])
    assert score_case(case, Prediction(world_map=dense))["corner_error"] == pytest.approx(2.0)
    json.dumps(scores)


def test_score_case_flow_noc_and_fold_severity() -> None:
    fixed, moving = _raster_image((6, 8)), _raster_image((6, 8))
    occluded = np.zeros((6, 8), bool)
    occluded[:, :2] = True
    case = Case("flow", fixed, moving, kind="flow", flow=np.zeros((2, 6, 8), np.float32), occluded=occluded)
    world = fixed.grid.world_points(dtype=torch.float64)[0].numpy()
    world[0][occluded] += 1.0  # wrong by 1 px, only where the pixels are occluded
    scores = score_case(case, Prediction(world_map=world))
    assert scores["epe"] == pytest.approx(12 / 48)
    assert scores["epe_noc"] == pytest.approx(0.0) and scores["epe_occ"] == pytest.approx(1.0)
    # a mirrored map folds everywhere with |J| = 1 (world x -> -x)
    mirrored = fixed.grid.world_points(dtype=torch.float64)[0].numpy()
    mirrored[0] *= -1.0
    folded = score_case(Case("mirror", fixed, moving), Prediction(world_map=mirrored))
    assert folded["folds"] == 48 and folded["fold_severity"] == pytest.approx(1.0)
    assert folded["nonpositive_jacobian_percent"] == pytest.approx(100.0)
    assert "epe" not in folded and "corner_error" not in folded
