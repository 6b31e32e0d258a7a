"""Conventions of alignkit.spatial on asymmetric shapes, with float64 gradchecks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alignkit.spatial import (
    Grid,
    apply_matrix,
    box_sum,
    cubic_bspline,
    cubic_bspline_taps,
    downsample,
    gaussian_blur,
    jacobian_determinant,
    normalized_from_voxel,
    pixel_flow_from_world_map,
    pixel_from_voxel,
    resize_field,
    sample_voxels,
    sample_world,
    unit_from_voxel,
    voxel_matrix_from_unit_matrix,
    world_from_pixel,
    world_map_from_pixel_flow,
    world_matrix_from_pixel_matrix,
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


# -- frame conversions (alignkit.spatial.frames) ---------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 7), (3, 7, 5)])
def test_unit_frame_keeps_array_axis_order_and_corners(shape):
    ndim = len(shape)
    last = torch.tensor([[s - 1.0 for s in shape]], dtype=torch.float64).T.unsqueeze(0)  # (1, ndim, 1)
    first = torch.zeros(1, ndim, 1, dtype=torch.float64)
    unit = unit_from_voxel(shape)
    torch.testing.assert_close(apply_matrix(unit, first), -torch.ones(1, ndim, 1, dtype=torch.float64))
    torch.testing.assert_close(apply_matrix(unit, last), torch.ones(1, ndim, 1, dtype=torch.float64))
    # one voxel along axis 0 is 2 / (shape[0] - 1) in component 0, nothing else
    step = apply_matrix(unit, first + torch.eye(ndim, dtype=torch.float64)[0].view(1, ndim, 1)) - apply_matrix(unit, first)
    expected = torch.zeros(1, ndim, 1, dtype=torch.float64)
    expected[0, 0, 0] = 2.0 / (shape[0] - 1)
    torch.testing.assert_close(step, expected)
    # grid_sample's frame is the unit frame with its components reversed
    torch.testing.assert_close(normalized_from_voxel(shape), pixel_from_voxel(ndim) @ unit)


@pytest.mark.parametrize("ndim", [2, 3])
def test_pixel_frame_reverses_components(ndim):
    voxel = torch.arange(1.0, ndim + 1, dtype=torch.float64).view(1, ndim, 1)  # (1, 2[, 3])
    pixel = apply_matrix(pixel_from_voxel(ndim), voxel)
    torch.testing.assert_close(pixel, voxel.flip(1))
    torch.testing.assert_close(pixel_from_voxel(ndim) @ pixel_from_voxel(ndim), torch.eye(ndim + 1, dtype=torch.float64))


def test_unit_matrix_to_voxel_matrix_on_different_shapes():
    fixed_shape, moving_shape = (5, 9), (7, 4)
    identity = torch.eye(2, 3, dtype=torch.float64).unsqueeze(0)
    corners = torch.tensor([[[0.0, 4.0], [0.0, 8.0]]], dtype=torch.float64)  # fixed (0, 0) and (4, 8)
    moved = apply_matrix(voxel_matrix_from_unit_matrix(identity, fixed_shape, moving_shape), corners)
    torch.testing.assert_close(moved, torch.tensor([[[0.0, 6.0], [0.0, 3.0]]], dtype=torch.float64))
    # a unit shift of 2 / (7 - 1) along axis 0 is one moving voxel along axis 0
    shift = identity.clone()
    shift[0, 0, 2] = 2.0 / 6.0
    delta = apply_matrix(voxel_matrix_from_unit_matrix(shift, fixed_shape, moving_shape), corners) - moved
    torch.testing.assert_close(delta, torch.tensor([[[1.0, 1.0], [0.0, 0.0]]], dtype=torch.float64))


def test_world_from_pixel_on_raster_and_array_aligned_grids():
    raster = Grid.raster_2d((4, 7))
    torch.testing.assert_close(world_from_pixel(raster), torch.eye(3, dtype=torch.float64))
    aligned = Grid.from_spacing((4, 7), (2.0, 3.0))  # world x along rows (axis 0), y along columns
    pixel = torch.tensor([[[1.0], [0.0]]], dtype=torch.float64)  # x = column 1, y = row 0
    torch.testing.assert_close(apply_matrix(world_from_pixel(aligned), pixel), torch.tensor([[[0.0], [3.0]]], dtype=torch.float64))
    # a pixel translation by 2 columns is a world translation along the columns' world axis
    pixel_shift = torch.eye(3, dtype=torch.float64)
    pixel_shift[0, 2] = 2.0
    expected = torch.eye(3, dtype=torch.float64)
    expected[1, 2] = 6.0
    torch.testing.assert_close(world_matrix_from_pixel_matrix(pixel_shift, aligned, aligned), expected)
    expected_raster = torch.eye(3, dtype=torch.float64)
    expected_raster[0, 2] = 2.0
    torch.testing.assert_close(world_matrix_from_pixel_matrix(pixel_shift, raster, raster), expected_raster)


@pytest.mark.parametrize("shape", [(4, 7), (3, 5, 6)])
def test_pixel_flow_and_world_map_are_inverse_and_x_is_the_last_axis(shape):
    ndim = len(shape)
    fixed, moving = oblique_grid(shape), Grid.from_spacing(shape, [1.5] * ndim, origin=[3.0] * ndim)
    flow = torch.zeros(1, ndim, *shape, dtype=torch.float64)
    flow[:, 0] = 1.0  # dx = 1: one column (last array axis) to the right
    world = world_map_from_pixel_flow(flow, fixed, moving)
    voxel = apply_matrix(moving.voxel_from_world, world)
    expected = fixed.voxel_points(dtype=torch.float64)
    expected[:, ndim - 1] += 1.0
    torch.testing.assert_close(voxel, expected)
    random_flow = torch.randn(1, ndim, *shape, dtype=torch.float64)
    round_trip = pixel_flow_from_world_map(world_map_from_pixel_flow(random_flow, fixed, moving), fixed, moving)
    torch.testing.assert_close(round_trip, random_flow)


def test_bspline_taps_match_the_kernel_and_its_derivative():
    t = (torch.rand(50, dtype=torch.float64) * 20 - 10).requires_grad_(True)
    first, weights, derivatives = cubic_bspline_taps(t)
    offsets = t.unsqueeze(-1) - (first.unsqueeze(-1) + torch.arange(4)).to(t)
    kernel = cubic_bspline(offsets)
    torch.testing.assert_close(weights, kernel)
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(t))  # partition of unity
    (grad,) = torch.autograd.grad(kernel.sum(), t, create_graph=False)
    # d/dt of sum_i B3(t - k_i) is the sum of the tap derivatives (and 0: partition of unity)
    torch.testing.assert_close(derivatives.sum(-1), grad, atol=1e-12, rtol=0)
    for i in range(4):
        (gi,) = torch.autograd.grad(cubic_bspline(offsets[:, i]).sum(), t, retain_graph=True)
        torch.testing.assert_close(derivatives[:, i], gi)
    # the old kernel formula (transforms.bspline and losses.similarity each had one) gives the same values
    a = offsets.detach().abs()
    old = torch.where(a < 1.0, 2.0 / 3.0 - a**2 + 0.5 * a**3, (2.0 - a).clamp(min=0.0) ** 3 / 6.0)
    torch.testing.assert_close(kernel.detach(), old)


@pytest.mark.parametrize("shape", [(40, 30, 20), (9, 50, 40), (100, 200)])
def test_jacobian_determinant_in_slabs_equals_the_whole(monkeypatch, shape):
    """The slab-wise determinant (one-voxel halos) gives the whole map's values exactly, whatever the slab."""
    from alignkit.spatial import jacobian

    grid = Grid.from_spacing(shape, 1.3)
    generator = torch.Generator().manual_seed(0)
    world = grid.world_points(dtype=torch.float64) + 0.3 * torch.randn(1, len(shape), *shape, generator=generator,
                                                                         dtype=torch.float64)
    whole = jacobian.small_determinant(jacobian.jacobian_matrix(world, grid)).unsqueeze(1)
    for slab in (7, 64, 1000):
        monkeypatch.setattr(jacobian, "DETERMINANT_SLAB_VOXELS", slab)
        assert torch.equal(jacobian.jacobian_determinant(world, grid), whole)
