"""Metrics against hand-computed values and brute-force cross-checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from alignkit.errors import InputError, ShapeError
from alignkit.metrics import (
    average_surface_distance,
    dice_per_label,
    endpoint_error,
    fl_all,
    flow_error_stats,
    hausdorff_distance,
    hd95,
    hd95_per_label,
    jacobian_stats,
    mean_dice,
    tre,
)
from alignkit.spatial import Grid

scipy_ndimage = pytest.importorskip("scipy.ndimage")
cdist = pytest.importorskip("scipy.spatial.distance").cdist


# -- Dice -------------------------------------------------------------------------------------------
def test_dice_hand_count() -> None:
    fixed = np.array([[0, 1, 1, 2], [0, 1, 2, 2], [3, 3, 0, 0]])
    warped = np.array([[0, 1, 2, 2], [1, 1, 2, 0], [0, 0, 0, 5]])
    # label 1: |F|=3, |W|=3, |F∩W|=2 -> 4/6; label 2: |F|=3, |W|=3, ∩=2 -> 4/6; label 3: |W|=0 -> 0
    scores = dice_per_label(warped, fixed)
    assert scores == pytest.approx({1: 4 / 6, 2: 4 / 6, 3: 0.0})
    assert mean_dice(warped, fixed) == pytest.approx((4 / 6 + 4 / 6 + 0.0) / 3)
    # explicit labels: 5 is only in warped -> 0; 7 is in neither -> skipped; 0 only when asked
    scores = dice_per_label(warped, fixed, labels=[5, 7, 0, 1])
    assert set(scores) == {0, 1, 5}
    assert scores[5] == 0.0
    assert scores[0] == pytest.approx(2 * 2 / (4 + 5))  # background: F has 4, W has 5, overlap 2
    json.dumps(scores)  # plain Python types


def test_dice_matches_per_label_loop_and_accepts_torch_and_float_labels() -> None:
    rng = np.random.default_rng(1)
    fixed = rng.integers(0, 6, size=(7, 9, 5))
    warped = np.where(rng.random(fixed.shape) < 0.7, fixed, rng.integers(0, 6, size=fixed.shape))
    expected = {
        k: 2 * np.sum((fixed == k) & (warped == k)) / (np.sum(fixed == k) + np.sum(warped == k))
        for k in range(1, 6)
    }
    got = dice_per_label(torch.from_numpy(warped), fixed.astype(np.float32))
    assert got == pytest.approx(expected)
    assert all(type(k) is int and type(v) is float for k, v in got.items())


def test_dice_identical_is_one_and_errors() -> None:
    labels = np.array([[1, 2], [2, 0]])
    assert mean_dice(labels, labels) == 1.0
    assert math.isnan(mean_dice(np.zeros((2, 2), int), np.zeros((2, 2), int)))
    with pytest.raises(ShapeError):
        dice_per_label(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(InputError):
        dice_per_label(np.full((2, 2), 0.5), np.zeros((2, 2)))


# -- surface distances ------------------------------------------------------------------------------
def _brute_surface_distances(
    a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    structure = scipy_ndimage.generate_binary_structure(a.ndim, 1)
    sa = a & ~scipy_ndimage.binary_erosion(a, structure=structure, border_value=0)
    sb = b & ~scipy_ndimage.binary_erosion(b, structure=structure, border_value=0)
    pa = np.argwhere(sa) * np.asarray(spacing)
    pb = np.argwhere(sb) * np.asarray(spacing)
    d = cdist(pa, pb)
    return d.min(axis=1), d.min(axis=0)


@pytest.mark.parametrize("shape, spacing", [((17, 23), (0.7, 1.9)), ((9, 12, 14), (2.5, 0.8, 1.3))])
def test_hd95_and_asd_match_brute_force(shape: tuple[int, ...], spacing: tuple[float, ...]) -> None:
    rng = np.random.default_rng(len(shape))
    a = scipy_ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.5
    b = scipy_ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.5
    assert a.any() and b.any() and (a != b).any()
    d_ab, d_ba = _brute_surface_distances(a, b, spacing)
    expected_hd95 = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    assert hd95(a, b, spacing) == pytest.approx(expected_hd95, rel=1e-9)
    assert hd95(torch.from_numpy(b), torch.from_numpy(a), spacing) == pytest.approx(expected_hd95, rel=1e-9)
    assert hausdorff_distance(a, b, spacing) == pytest.approx(max(d_ab.max(), d_ba.max()))
    pooled = np.concatenate([d_ab, d_ba]).mean()
    assert average_surface_distance(a, b, spacing) == pytest.approx(pooled)
    assert average_surface_distance(a, b, spacing, symmetric=False) == pytest.approx(d_ab.mean())
    # a Grid gives the same spacing
    grid = Grid.from_spacing(shape, spacing)
    assert hd95(a, b, grid) == pytest.approx(expected_hd95, rel=1e-9)


def test_hd_of_shifted_square_is_the_shift_in_world_units() -> None:
    a = np.zeros((30, 30), bool)
    a[5:15, 5:15] = True
    b = np.roll(a, 4, axis=1)  # shifted 4 voxels along axis 1 (spacing 0.5 mm -> 2 mm)
    assert hausdorff_distance(a, b, (3.0, 0.5)) == pytest.approx(2.0)
    assert hd95(a, a, (1.0, 1.0)) == 0.0


def test_surface_distance_empty_and_bad_inputs() -> None:
    a = np.zeros((5, 5), bool)
    b = a.copy()
    b[2, 2] = True
    assert math.isnan(hd95(a, b, 1.0))
    assert math.isnan(average_surface_distance(b, a, 1.0))
    with pytest.raises(ShapeError):
        hd95(b, b, (1.0, 1.0, 1.0))
    with pytest.raises(InputError):
        hd95(b, b, (1.0, -1.0))
    with pytest.raises(ShapeError):
        hd95(np.ones((3, 3)), np.ones((3, 4)), 1.0)


def test_hd95_per_label() -> None:
    fixed = np.zeros((20, 20), int)
    fixed[2:8, 2:8] = 1
    fixed[10:18, 10:18] = 2
    warped = np.zeros_like(fixed)
    warped[2:8, 5:11] = 1  # shifted by 3 along axis 1
    warped[1:4, 1:4] = 4  # only in warped
    out = hd95_per_label(warped, fixed, (1.0, 2.0), labels=[1, 2, 3, 4])
    assert set(out) == {1, 2, 4}  # 3 is absent from both
    assert out[1] == pytest.approx(hd95(warped == 1, fixed == 1, (1.0, 2.0)))
    assert 0 < out[1] <= 6.0
    assert math.isnan(out[2]) and math.isnan(out[4])


# -- Jacobian statistics and TRE ---------------------------------------------------------------------
def test_jacobian_stats_hand_values() -> None:
    det = torch.tensor([[[[2.0, 0.5], [-1.0, 0.0]]]])  # (1, 1, 2, 2) like jacobian_determinant
    stats = jacobian_stats(det)
    logs = np.log(np.clip([2.0, 0.5, -1.0, 0.0], 1e-9, 1e9))
    assert stats["percent_nonpositive"] == 50.0
    assert stats["num_nonpositive"] == 2
    assert stats["sdlogj"] == pytest.approx(logs.std())
    assert (stats["min"], stats["max"], stats["n"]) == (-1.0, 2.0, 4)
    masked = jacobian_stats(det, mask=np.array([[1, 1], [0, 0]]))
    assert masked["percent_nonpositive"] == 0.0
    assert masked["sdlogj"] == pytest.approx(np.log(2.0))  # std of {log 2, -log 2}
    json.dumps(stats)
    with pytest.raises(InputError):
        jacobian_stats(np.array([1.0, np.nan]))
    with pytest.raises(ShapeError):
        jacobian_stats(det, mask=np.ones((3, 3)))


def test_tre_hand_values() -> None:
    mapped = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [3.0, 4.0, 0.0]])
    target = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 3.0], [0.0, 0.0, 0.0]])
    out = tre(torch.from_numpy(mapped), target)  # errors 0, 2, 5
    assert (out["mean"], out["median"], out["max"], out["n"]) == (pytest.approx(7 / 3), 2.0, 5.0, 3)
    with pytest.raises(ShapeError):
        tre(mapped, target[:, :2])


# -- optical flow -----------------------------------------------------------------------------------
def test_endpoint_error_and_validity_rules() -> None:
    gt = np.zeros((2, 3, 2))
    flow = np.zeros((2, 3, 2))
    flow[0, 0] = [3.0, 4.0]  # EPE 5
    flow[0, 1] = [1.0, 0.0]  # EPE 1
    gt[1, 0] = [np.nan, 0.0]  # unknown (NaN)
    flow[1, 0] = [100.0, 0.0]
    gt[1, 1] = [2e9, 0.0]  # unknown (Middlebury > 1e9)
    flow[1, 1] = [100.0, 0.0]
    # valid pixels: (0,0) 5, (0,1) 1, (0,2) 0, (1,2) 0 -> mean 1.5
    assert endpoint_error(flow, gt) == pytest.approx(1.5)
    valid = np.ones((2, 3))
    valid[0, 0] = 0
    assert endpoint_error(torch.from_numpy(flow), torch.from_numpy(gt), valid) == pytest.approx(1 / 3)
    assert math.isnan(endpoint_error(flow, gt, np.zeros((2, 3))))
    with pytest.raises(ShapeError):
        endpoint_error(flow, gt, np.ones((3, 2)))
    with pytest.raises(ShapeError):
        endpoint_error(np.zeros((2, 3, 3)), np.zeros((2, 3, 3)))


def test_fl_all_kitti_rule() -> None:
    gt = np.zeros((1, 4, 2))
    gt[0, :, 0] = [10.0, 100.0, 100.0, 0.0]
    flow = gt.copy()
    flow[0, 0, 0] += 4.0  # EPE 4 > 3 and > 0.5 -> outlier
    flow[0, 1, 0] += 4.0  # EPE 4 > 3 but < 5 -> inlier
    flow[0, 2, 0] += 6.0  # EPE 6 > 3 and > 5 -> outlier
    flow[0, 3, 0] += 2.0  # EPE 2 < 3 -> inlier
    assert fl_all(flow, gt) == pytest.approx(50.0)
    assert fl_all(flow, gt, valid=np.array([[1, 1, 0, 1]])) == pytest.approx(100 / 3)
    stats = flow_error_stats(flow, gt)
    assert stats["epe"] == pytest.approx(4.0)
    assert stats["3px"] == pytest.approx(25.0)
    assert stats["5px"] == pytest.approx(75.0)
    assert stats["fl_all"] == pytest.approx(50.0)
    json.dumps(stats)


# -- the one Jacobian determinant and the one global NCC match the implementations they replaced ----
def _old_numpy_jacobian_determinant(values, matrix):
    """metrics.jacobian's numpy twin before it delegated to alignkit.spatial (kept as the reference)."""
    ndim = matrix.shape[0] - 1
    d_map_d_voxel = np.stack(np.gradient(values, axis=tuple(range(2, 2 + ndim))), axis=2)
    jac = np.einsum("bia...,aj->bij...", d_map_d_voxel, np.linalg.inv(matrix[:ndim, :ndim]))
    return np.linalg.det(np.moveaxis(jac, (1, 2), (-2, -1)))


@pytest.mark.parametrize("shape", [(6, 9), (4, 7, 5)])
def test_jacobian_determinant_from_map_matches_the_old_numpy_twin(shape):
    from alignkit.metrics import jacobian_determinant_from_map
    from alignkit.spatial import Grid, jacobian_determinant

    ndim = len(shape)
    rng = np.random.default_rng(3)
    grid = Grid.from_spacing(shape, rng.uniform(0.5, 2.0, ndim), origin=rng.normal(size=ndim))
    world = grid.world_points(dtype=torch.float64).numpy() + 0.4 * rng.normal(size=(2, ndim, *shape))
    new = jacobian_determinant_from_map(world, grid)
    np.testing.assert_allclose(new, _old_numpy_jacobian_determinant(world, grid.world_from_voxel.numpy()), atol=1e-10)
    np.testing.assert_allclose(new, jacobian_determinant(torch.from_numpy(world), grid)[:, 0].numpy(), atol=1e-12)
    assert (new < 0).any() and (new > 0).any()  # the random map folds somewhere: not a trivial comparison


def _old_classical_ncc(a, b, mask=None):
    """methods.classical._ncc as it was (the reference for alignkit.metrics.ncc)."""
    if mask is not None:
        mask = mask.expand_as(a)
    a, b = a.double().flatten(), b.double().flatten()
    if mask is not None:
        keep = mask.flatten() > 0
        a, b = a[keep], b[keep]
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def test_metric_ncc_fast_path_equals_global_ncc_reference():
    """alignkit.metrics.ncc (centred dot products on the selected voxels) against the weighted reference."""
    from alignkit.losses.similarity import global_ncc
    from alignkit.metrics import ncc

    gen = torch.Generator().manual_seed(1)
    for shape in ((1, 3, 17, 23), (2, 1, 5, 6, 7)):
        a = torch.rand(*shape, generator=gen)
        b = 0.3 * a + torch.rand(*shape, generator=gen)
        mask = torch.rand(1, 1, *shape[2:], generator=gen) > 0.3
        weights = mask.expand_as(a).double().reshape(1, 1, -1)
        reference = global_ncc(a.double().reshape(1, 1, -1), b.double().reshape(1, 1, -1), weights,
                               eps=torch.finfo(torch.float64).tiny)
        assert ncc(a, b, mask) == pytest.approx(float(reference), abs=1e-12)
        plain = global_ncc(a.double().reshape(1, 1, -1), b.double().reshape(1, 1, -1), eps=torch.finfo(torch.float64).tiny)
        assert ncc(a, b) == pytest.approx(float(plain), abs=1e-12)
    assert ncc(a, b, torch.zeros_like(mask)) == 0.0


def test_metric_ncc_matches_the_old_masked_global_ncc():
    from alignkit.metrics import ncc

    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1, 2, 6, 9, generator=gen)
    b = 0.5 * a + torch.rand(1, 2, 6, 9, generator=gen)
    mask = torch.rand(1, 1, 6, 9, generator=gen) > 0.4
    assert ncc(a, b) == pytest.approx(_old_classical_ncc(a, b), abs=1e-12)
    assert ncc(a, b, mask) == pytest.approx(_old_classical_ncc(a, b, mask), abs=1e-12)
    assert ncc(a, b, mask) != pytest.approx(ncc(a, b), abs=1e-6)  # the mask matters
    assert ncc(a, -a) == pytest.approx(-1.0)
    assert ncc(a, torch.ones_like(a)) == 0.0  # constant image: 0, not NaN
    assert ncc(a.numpy(), b.numpy()) == pytest.approx(ncc(a, b))
    with pytest.raises(ShapeError):
        ncc(a, b[..., :5])


def test_ncc_loss_matches_its_old_implementation():
    from alignkit.losses import NCC

    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 3, 5, 7, 4, generator=gen), torch.rand(2, 3, 5, 7, 4, generator=gen)
    w = torch.rand(2, 1, 5, 7, 4, generator=gen)
    xf, yf, wf = x.flatten(2), y.flatten(2), w.flatten(2)
    wf = wf / wf.sum(2, keepdim=True)
    dx, dy = xf - (wf * xf).sum(2, keepdim=True), yf - (wf * yf).sum(2, keepdim=True)
    old = 1.0 - ((wf * dx * dy).sum(2) / torch.sqrt(((wf * dx * dx).sum(2) * (wf * dy * dy).sum(2)).clamp_min(1e-8))).mean()
    torch.testing.assert_close(NCC()(x, y, w), old)
