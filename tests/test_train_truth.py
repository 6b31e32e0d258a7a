"""Ground truth of training pairs in the one convention of training: voxels of the fixed network grid,
array-axis order (``flow``), and the matching homogeneous ``matrix``."""

from __future__ import annotations

import torch
from phantoms import phantom

from alignkit.data.synthetic import random_affine, random_smooth_deformation
from alignkit.image import Image
from alignkit.methods.heads import matrix_displacement
from alignkit.spatial import Grid, apply_matrix, sample_voxels, sample_world
from alignkit.train import SyntheticAffinePairs, prepare_subject
from alignkit.train.subjects import case_truth, to_network_grid, truth_on_network_grid

SIZE = (24, 28)


def _on_network_grid(case):
    """Fixed and moving of ``case`` on the fixed network grid (moving through the world identity)."""
    fixed, grid = to_network_grid(case.fixed.batch(), case.fixed.grid, SIZE)
    moving, moving_grid = to_network_grid(case.moving.batch(), case.moving.grid, SIZE)
    return fixed, sample_world(moving, moving_grid, grid.world_points()), grid


def _warp(moving, displacement):
    points = Grid.from_spacing(tuple(moving.shape[2:]), 1.0).voxel_points() + displacement
    return sample_voxels(moving, points, padding="border")


def _inner(t):
    return t[..., 3:-3, 3:-3]


def test_a_case_matrix_becomes_the_network_grid_matrix_that_warps_moving_onto_fixed():
    image = Image.from_array(phantom(0), spacing=1.3)  # anisotropic world units on purpose
    case = random_affine(image, seed=4, rotation=8.0, scale=0.05, translation=0.05)
    fixed, moving, grid = _on_network_grid(case)
    truth = truth_on_network_grid(case_truth(case), grid)
    # exact: a network voxel p goes where the world matrix sends its world point
    voxels = grid.voxel_points(dtype=torch.float64)
    through_voxels = apply_matrix(grid.world_from_voxel, apply_matrix(truth["matrix"].double(), voxels))
    through_world = apply_matrix(torch.as_tensor(case.matrix), apply_matrix(grid.world_from_voxel, voxels))
    torch.testing.assert_close(through_voxels, through_world, atol=1e-4, rtol=0)
    # and it warps the moving image onto the fixed one (its inverse does not)
    warped = _warp(moving, matrix_displacement(truth["matrix"][None], SIZE))
    backwards = _warp(moving, matrix_displacement(torch.linalg.inv(truth["matrix"])[None], SIZE))
    after = (_inner(warped) - _inner(fixed)).abs().mean()
    assert after < 0.3 * (_inner(moving) - _inner(fixed)).abs().mean()
    assert after < 0.3 * (_inner(backwards) - _inner(fixed)).abs().mean()


def test_a_case_flow_becomes_the_network_grid_flow_that_warps_moving_onto_fixed():
    case = random_smooth_deformation(Image.from_array(phantom(1)), seed=2, translation=2.0, amplitude=3.0)
    fixed, moving, grid = _on_network_grid(case)
    truth = truth_on_network_grid(case_truth(case), grid)
    assert truth["flow"].shape == (2, *SIZE) and truth["flow_mask"].shape == (1, *SIZE)
    assert bool(truth["flow_mask"].bool().all())
    warped = _warp(moving, truth["flow"][None])
    before = (_inner(moving) - _inner(fixed)).abs().mean()
    after = (_inner(warped) - _inner(fixed)).abs().mean()
    assert after < 0.35 * before


def test_synthetic_affine_pairs_hold_their_matrix_and_field():
    subject = prepare_subject(Image.from_array(phantom(2)), (32, 32), name="p2")
    pairs = SyntheticAffinePairs([subject], length=2, magnitude=2.0, rotation=6.0)
    item = pairs[0]
    torch.testing.assert_close(matrix_displacement(item["matrix"][None], (32, 32))[0], item["flow"], atol=1e-4, rtol=0)
    warped = _warp(item["moving"][None], item["flow"][None])[0]
    torch.testing.assert_close(_inner(warped), _inner(item["fixed"]), atol=1e-4, rtol=0)
    assert not torch.equal(item["matrix"], torch.eye(3))
    pairs.set_epoch(1)
    assert not torch.equal(pairs[0]["matrix"], item["matrix"])  # redrawn every epoch
