"""Issue-17 peers: PICSL Greedy (affine, deformable), ConvexAdam after Greedy's affine, ANTs SyNCC.

Same recovery cases as ``tests/test_peers.py`` (the 3D phantom on two non-trivial grids with a known
rigid map and landmark TRE; 2D real-image cases with a known similarity or smooth deformation),
plus a check of Greedy's frame conventions against Greedy's own reslicing: the moving image's
world coordinates, resliced by Greedy through its matrix and warp, are exactly the moving points
the adapter reports (linear interpolation of a linear function is exact). Tests skip with the
reason when the tool is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_peers import (
    THREADS,
    _assert_corners,
    _assert_epe,
    _assert_tre,
    _method,
    case_grid,
    matrix_case_2d,
    phantom_case_3d,
    similarity_2d,
    smooth_case_2d,
)

from alignkit.data.case import Case
from alignkit.errors import ShapeError
from alignkit.evaluate.method import MethodUnavailable
from alignkit.evaluate.peers import PEERS
from alignkit.evaluate.peers._common import apply_homogeneous, world_points
from alignkit.evaluate.scoring import score_case
from alignkit.image import Image
from alignkit.io.itk import lps_matrix_from_ras


@pytest.fixture(scope="module")
def phantom() -> Case:
    return phantom_case_3d()


# ------------------------------------------------------------------------------------------------
# frames and registry (no registration)
# ------------------------------------------------------------------------------------------------
def test_lps_matrix_from_ras_golden_and_involution():
    ras = np.array([[1.0, 0.2, 0.3, 5.0], [0.1, 1.0, 0.4, 6.0], [0.5, 0.6, 1.0, 7.0], [0.0, 0.0, 0.0, 1.0]])
    lps = lps_matrix_from_ras(ras)
    # a RAS point p is the LPS point (-p0, -p1, p2): mapping through either matrix must agree
    p_ras = np.array([3.0, -4.0, 2.0, 1.0])
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    np.testing.assert_allclose(lps @ (flip @ p_ras), flip @ (ras @ p_ras))
    np.testing.assert_allclose(lps[:, 3], [-5.0, -6.0, 7.0, 1.0])
    np.testing.assert_allclose(lps_matrix_from_ras(lps), ras)
    m2 = np.array([[1.0, 0.2, 3.0], [0.1, 1.0, 4.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(lps_matrix_from_ras(m2), [[1.0, 0.2, -3.0], [0.1, 1.0, -4.0], [0.0, 0.0, 1.0]])
    with pytest.raises(ShapeError, match="homogeneous"):
        lps_matrix_from_ras(np.eye(5))


def test_options_kinds_and_dimensions():
    for name in ("greedy:affine", "greedy:deformable", "convexadam"):
        with pytest.raises(ValueError, match="unknown options"):
            PEERS[name](not_an_option=1)
    flat = Image.from_array(torch.rand(40, 48))
    case2d = Case("c", flat, flat, kind="deformable")
    assert "3D" in (PEERS["convexadam"]().applicable(case2d) or "")
    assert PEERS["greedy:deformable"]().applicable(case2d) is None
    assert PEERS["ants:syncc"]().applicable(case2d) is None
    assert "flow" not in PEERS["greedy:affine"]().kinds


@pytest.mark.parametrize(("name", "package"), [("greedy:deformable", "picsl-greedy"), ("convexadam", "convexadam")])
def test_missing_package_is_method_unavailable(monkeypatch, name, package):
    import importlib.util

    module = {"picsl-greedy": "picsl_greedy", "convexadam": "convexAdam"}[package]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == module else real(m, *a))
    with pytest.raises(MethodUnavailable, match=f"{package} not installed"):
        PEERS[name]().check_available()


# ------------------------------------------------------------------------------------------------
# Greedy's conventions against Greedy's own reslicing
# ------------------------------------------------------------------------------------------------
def _resliced_moving_world(session, case: Case, transforms: str) -> np.ndarray:
    """Greedy's ``-r transforms`` applied to images holding the moving grid's world coordinates:
    the moving LPS point Greedy samples for each fixed voxel ``(ndim, *fixed shape)``."""
    import SimpleITK as sitk

    from alignkit.evaluate.peers._common import itk_layout, sitk_image

    layout = itk_layout(case.moving.grid)
    world = world_points(case.moving.grid)
    out = []
    for d in range(case.ndim):
        session.execute(f"-rf fixed -rm coord resliced -r {transforms}", coord=sitk_image(case.moving, layout, array=world[d]),
                        resliced=None)
        out.append(session.fixed_layout.from_sitk_order(sitk.GetArrayFromImage(session.greedy["resliced"])))
    return np.stack(out).astype(np.float64)


def _inside(case: Case, world_map: np.ndarray, margin: float = 1.0) -> np.ndarray:
    """Fixed voxels whose moving point lies ``margin`` voxels inside the moving grid (where the
    reslice is interpolated, not padded)."""
    voxel = apply_homogeneous(case.moving.grid.voxel_from_world.numpy(), world_map)
    return np.all([(voxel[a] > margin) & (voxel[a] < case.moving.shape[a] - 1 - margin) for a in range(case.ndim)], axis=0)


@pytest.mark.parametrize("ndim", [3, 2])
def test_greedy_frames_match_greedy_reslicing(phantom, brain_slice, ndim):
    _method("greedy:deformable")
    from alignkit.evaluate.peers.greedy import DEFAULTS, GreedySession

    if ndim == 3:
        case = phantom
    else:
        case = matrix_case_2d(brain_slice, similarity_2d(case_grid(brain_slice), 0.1, 1.05, (6.0, -4.0)), "affine")
    settings = {**DEFAULTS, "affine_iterations": "20x10", "iterations": "20x10"}
    session = GreedySession(case, settings, seed=0, threads=THREADS)
    matrix = session.affine()
    session.deformable()
    x = world_points(case.fixed.grid)
    linear = apply_homogeneous(matrix, x)
    inside = _inside(case, linear)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(_resliced_moving_world(session, case, "affine")[:, inside], linear[:, inside], atol=1e-3)

    world_map = x + session.composed_displacement()
    assert np.abs(world_map - linear).max() > 0.3  # the warp moved points: the check below can fail
    inside = _inside(case, world_map)
    resliced = _resliced_moving_world(session, case, "warp affine")
    np.testing.assert_allclose(resliced[:, inside], world_map[:, inside], atol=1e-3)


# ------------------------------------------------------------------------------------------------
# recovery of known transforms
# ------------------------------------------------------------------------------------------------
def test_greedy_affine_3d(phantom):
    scores = _assert_tre(phantom, _method("greedy:affine"), limit=0.7)
    assert scores["folds"] == 0


def test_greedy_deformable_3d(phantom):
    scores = _assert_tre(phantom, _method("greedy:deformable"), limit=0.4)
    assert scores["folds"] == 0


def test_greedy_affine_2d_similarity(brain_slice):
    case = matrix_case_2d(brain_slice, similarity_2d(case_grid(brain_slice), 0.1, 1.05, (6.0, -4.0)), "affine")
    _assert_corners(case, _method("greedy:affine"), limit=1.0)


def test_greedy_deformable_2d_deformation(brain_slice):
    _assert_epe(smooth_case_2d(brain_slice, amplitude=4.0, sigma=10.0), _method("greedy:deformable"), limit=0.8)


def test_convexadam_3d(phantom):
    prediction = _method("convexadam").register(phantom, seed=0, threads=THREADS)
    scores = score_case(phantom, prediction)
    assert scores["tre_mean"] < 0.4 and scores["tre_mean"] < 0.25 * scores["tre_before"], scores
    assert scores["folds"] == 0
    assert prediction.extra["devices"] == "greedy=cpu,convexadam=cpu"


@pytest.mark.slow
def test_ants_syncc_3d(phantom):
    _assert_tre(phantom, _method("ants:syncc"), limit=0.5)
