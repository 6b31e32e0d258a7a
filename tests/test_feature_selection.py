"""The feature start's match filtering, local optimisation and GRIC model selection
(:mod:`alignkit.solve.features`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignkit import Image
from alignkit.solve import features
from alignkit.spatial import Grid, sample_world


def _warped_pair(linear: np.ndarray, shift: np.ndarray) -> tuple[Image, Image, np.ndarray]:
    """skimage's camera as the moving image and, as the fixed one, the moving image read through the
    pixel map ``x -> linear @ x + shift`` (about the image centre): returns the pair and that 3x3 map."""
    skdata = pytest.importorskip("skimage.data")
    moving = Image.from_array(skdata.camera()[::2, ::2].astype(np.float32) / 255.0)
    h, w = moving.shape
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    truth = np.eye(3)
    truth[:2, :2] = linear
    truth[:2, 2] = centre - linear @ centre + shift
    grid = Grid.raster_2d((h, w))
    pts = grid.world_points(dtype=torch.float64)  # (1, 2, H, W) world = (x, y) pixels on a raster grid
    mapped = torch.einsum("ij,bjhw->bihw", torch.as_tensor(truth[:2, :2]), pts) + torch.as_tensor(truth[:2, 2]).view(1, 2, 1, 1)
    fixed = Image(sample_world(moving.batch(dtype=torch.float64), moving.grid, mapped)[0].float(), grid)
    return fixed, moving, truth


def _corner_error(matrix: torch.Tensor, truth: np.ndarray, shape: tuple[int, int]) -> float:
    h, w = shape
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [w - 1, h - 1, 1], [0, h - 1, 1]], dtype=np.float64).T
    predicted, true = matrix.numpy() @ corners, truth @ corners
    return float(np.linalg.norm(predicted[:2] / predicted[2] - true[:2] / true[2], axis=0).mean())


def test_a_rotation_and_zoom_is_fitted_as_a_similarity():
    pytest.importorskip("cv2")
    angle = np.radians(12.0)
    linear = 1.1 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    fixed, moving, truth = _warped_pair(linear, np.array([6.0, -4.0]))
    fit = features.feature_fit(fixed.batch(), fixed.grid, moving.batch(), moving.grid, model="affine")
    assert fit.stats["model"] == 2.0 and fit.stats["simpler_preferred"] == 1.0
    assert _corner_error(fit.matrix, truth, fixed.shape) < 1.0


def test_a_shear_keeps_the_affine_model():
    """GRIC must not trade a real shear for the similarity's fewer parameters."""
    pytest.importorskip("cv2")
    fixed, moving, truth = _warped_pair(np.array([[1.0, 0.25], [0.0, 0.9]]), np.array([3.0, 2.0]))
    fit = features.feature_fit(fixed.batch(), fixed.grid, moving.batch(), moving.grid, model="affine")
    assert fit.stats["model"] == 1.0 and fit.stats["simpler_preferred"] == 0.0
    assert _corner_error(fit.matrix, truth, fixed.shape) < 1.0


def test_gric_prefers_fewer_parameters_only_when_the_residuals_allow():
    rng = np.random.default_rng(0)
    small = np.abs(rng.normal(0.0, 0.5, 200))
    # the same residuals: the simpler model wins by its parameter penalty
    assert features._gric(small, 0.5, 4) < features._gric(small, 0.5, 6)
    # residuals several noise units larger for the simpler model: the general one wins
    assert features._gric(small + 2.0, 0.5, 4) > features._gric(small, 0.5, 6)
    # an outlier costs a capped amount, however far it lands
    assert features._gric(np.r_[small, 1e3], 0.5, 4) == pytest.approx(features._gric(np.r_[small, 10.0], 0.5, 4))


def test_one_match_per_moving_keypoint():
    class Match:
        def __init__(self, query: int, train: int, distance: float) -> None:
            self.queryIdx, self.trainIdx, self.distance = query, train, distance

    hub = [Match(q, 7, 10.0 + q) for q in range(25)]  # 25 fixed keypoints whose nearest neighbour is one moving point
    kept = features._one_to_one(hub + [Match(30, 1, 5.0), Match(31, 2, 5.0)])
    assert [(m.queryIdx, m.trainIdx) for m in kept] == [(0, 7), (30, 1), (31, 2)]


def test_local_optimisation_polishes_the_minimal_sample_fit():
    """On noisy correspondences the least-squares refits on the inliers land at least as close to the
    truth as the robust estimator's own output."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    truth = np.array([[0.95, -0.2, 30.0], [0.2, 0.95, -12.0], [0.0, 0.0, 1.0]])
    pts_f = rng.uniform(0, 500, (300, 2))
    pts_m = pts_f @ truth[:2, :2].T + truth[:2, 2] + rng.normal(0, 0.8, (300, 2))
    pts_m[:90] = rng.uniform(0, 500, (90, 2))  # 30 % outliers
    cv2.setRNGSeed(0)
    polished = features._fit_model(cv2, "similarity", pts_f, pts_m, 3.0)
    assert polished is not None
    assert np.allclose(polished[2], [0.0, 0.0, 1.0])
    # the similarity's structure: equal diagonal, opposite off-diagonal
    assert polished[0, 0] == pytest.approx(polished[1, 1]) and polished[0, 1] == pytest.approx(-polished[1, 0])
    corners = np.array([[0, 0, 1], [500, 0, 1], [500, 500, 1], [0, 500, 1]], dtype=np.float64).T
    error = np.linalg.norm((polished @ corners - truth @ corners)[:2], axis=0).mean()
    assert error < 0.5
