"""Conventions of alignkit.spatial on asymmetric shapes, with float64 gradchecks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alignkit.spatial import (
    Grid,
    apply_matrix,
    box_sum,
    downsample,
    gaussian_blur,
    jacobian_determinant,
    resize_field,
    sample_voxels,
    sample_world,
)


def oblique_grid(shape):
    ndim = len(shape)
    angle = 0.3
    direction = torch.eye(ndim, dtype=torch.float64)
    direction[0, 0], direction[0, 1], direction[1, 0], direction[1, 1] = (
        torch.cos(torch.tensor(angle)),
        -torch.sin(torch.tensor(angle)),
        torch.sin(torch.tensor(angle)),
        torch.cos(torch.tensor(angle)),
    )
    spacing = [0.7, 1.3, 2.1][:ndim]
    return Grid.from_spacing(shape, spacing, origin=[5.0, -3.0, 2.0][:ndim], direction=direction)


@pytest.mark.parametrize("shape", [(7, 11), (5, 6, 9)])
def test_identity_is_a_noop(shape):
    grid = oblique_grid(shape)
    image = torch.rand(2, 3, *shape)
    out = sample_world(image, grid, grid.world_points().expand(2, -1, *shape))
    assert torch.allclose(out, image, atol=1e-5)


@pytest.mark.parametrize("shape", [(9, 13), (6, 8, 11)])
def test_known_translation_shifts_by_exactly_that(shape):
    grid = oblique_grid(shape)
    ndim = len(shape)
    image = torch.rand(1, 1, *shape)
    shift_voxels = torch.tensor([2.0, -1.0, 3.0][:ndim], dtype=torch.float64)
    shift_world = grid.world_from_voxel[:ndim, :ndim] @ shift_voxels
    world = grid.world_points(dtype=torch.float64) + shift_world.view(1, ndim, *([1] * ndim))
    out = sample_world(image.double(), grid, world)
    # out[v] = image[v + shift] where defined
    src = [slice(max(0, int(s)), n + min(0, int(s))) for s, n in zip(shift_voxels.tolist(), shape)]
    dst = [slice(max(0, -int(s)), n - max(0, int(s))) for s, n in zip(shift_voxels.tolist(), shape)]
    assert torch.allclose(out[(0, 0, *dst)], image.double()[(0, 0, *src)], atol=1e-10)


def test_grid_sample_frame_is_reversed_and_corner_aligned():
    """Sampling voxel (0, last) of a (3, 5) image reads row 0, column 4."""
    image = torch.arange(15.0).view(1, 1, 3, 5)
    voxel = torch.tensor([[0.0, 4.0], [2.0, 1.0]]).t().reshape(1, 2, 2, 1)
    out = sample_voxels(image, voxel)
    assert out.flatten().tolist() == [4.0, 11.0]


def test_raster_grid_puts_x_along_columns():
    grid = Grid.raster_2d((4, 6))
    world = apply_matrix(grid.world_from_voxel, torch.tensor([[[1.0], [5.0]]], dtype=torch.float64))
    assert world.flatten().tolist() == [5.0, 1.0]


def test_sampling_gradcheck_float64():
    grid = oblique_grid((4, 5))
    image = torch.rand(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    world = (grid.world_points(dtype=torch.float64) + 0.31).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda i, w: sample_world(i, grid, w), (image, world))


def test_jacobian_of_affine_map_is_its_determinant():
    grid = oblique_grid((6, 7, 8))
    matrix = torch.tensor(
        [[1.1, 0.2, 0.0, 1.0], [0.0, 0.9, 0.1, -2.0], [0.05, 0.0, 1.2, 0.5], [0, 0, 0, 1]], dtype=torch.float64
    )
    world = apply_matrix(matrix, grid.world_points(dtype=torch.float64))
    det = jacobian_determinant(world, grid)
    assert torch.allclose(det, torch.linalg.det(matrix[:3, :3]).expand_as(det), atol=1e-8)


def test_downsampled_grid_keeps_corners_in_place():
    grid = oblique_grid((17, 12, 9))
    image = torch.rand(1, 1, 17, 12, 9)
    small, small_grid = downsample(image, grid, 2)
    assert small.shape[2:] == small_grid.shape == (9, 7, 5)
    corners = torch.tensor([[0, 0, 0, 1.0], [16, 11, 8, 1.0]], dtype=torch.float64).t()
    small_corners = torch.tensor([[0, 0, 0, 1.0], [8, 6, 4, 1.0]], dtype=torch.float64).t()
    assert torch.allclose(grid.world_from_voxel @ corners, small_grid.world_from_voxel @ small_corners)


def test_box_sum_matches_dense_convolution():
    x = torch.rand(1, 2, 6, 9, 7, dtype=torch.float64)
    reference = F.conv3d(x.view(2, 1, 6, 9, 7), torch.ones(1, 1, 5, 3, 9, dtype=torch.float64), padding=(2, 1, 4))
    assert torch.allclose(box_sum(x, (5, 3, 9)), reference.view(1, 2, 6, 9, 7))


def test_gaussian_blur_preserves_constants_and_mass_direction():
    x = torch.full((1, 1, 10, 11), 3.0)
    assert torch.allclose(gaussian_blur(x, 1.5), x)
    impulse = torch.zeros(1, 1, 21, 21)
    impulse[0, 0, 10, 10] = 1
    blurred = gaussian_blur(impulse, (2.0, 0.0))
    assert torch.allclose(blurred.sum(), torch.tensor(1.0)) and torch.count_nonzero(blurred[0, 0, :, 9]) == 0


def test_resize_field_is_corner_aligned_and_keeps_linear_fields():
    grid = Grid.from_spacing((5, 9))
    field = grid.world_points() * 0.5
    big = resize_field(field, (9, 17))
    assert torch.allclose(big, grid.resized((9, 17)).world_points() * 0.5, atol=1e-5)


def test_the_two_descriptions_of_grid_samples_frame_agree():
    """voxel_to_normalized (used per point) and normalized_from_voxel (used by the fused affine path)."""
    from alignkit.spatial.points import normalized_from_voxel, voxel_to_normalized

    shape = (4, 7, 9)
    voxel = torch.rand(1, 3, 5, 1, 1, dtype=torch.float64) * 6
    as_function = voxel_to_normalized(voxel, shape)  # (1, 5, 1, 1, 3)
    as_matrix = apply_matrix(normalized_from_voxel(shape), voxel).movedim(1, -1)
    assert torch.allclose(as_function, as_matrix)
