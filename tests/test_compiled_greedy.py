"""The compiled kernels of the greedy iteration (:mod:`alignkit.spatial.compiled`) against their torch
references: Gaussians and window sums, the warp and its derivative (autograd through ``grid_sample``),
the composition, the LNCC force, and a whole greedy registration, in 2D and 3D."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("numba", reason="the compiled kernels need numba (pip install alignkit[fast])")

import alignkit
from alignkit.image import Image
from alignkit.losses import LNCC
from alignkit.solve import RegistrationConfig, StageConfig
from alignkit.solve.greedy import (
    LNCCForce,
    blur,
    compose_displacement,
    normalised_step,
    smooth_field,
    update_displacement,
)
from alignkit.spatial import Grid, apply_matrix, gaussian_blur, sample_voxels
from alignkit.spatial import compiled as kernels
from alignkit.spatial.banded import fast_box_sum, fast_gaussian_blur

SHAPES = [(13, 11, 9), (3, 17, 20), (21, 18)]
#: ... and one whose depth pass has rows longer than the row filter's block (H * W > ROW_BLOCK)
FILTER_SHAPES = [*SHAPES, (5, 40, 37)]


def _random(shape, channels: int, seed: int) -> torch.Tensor:
    return torch.rand(1, channels, *shape, generator=torch.Generator().manual_seed(seed))


def _volumes(tensor: torch.Tensor) -> np.ndarray:
    array = tensor[0].numpy()
    return array if array.ndim == 4 else array[:, None]


def _oblique_grid(shape, spacing: float, shift: float) -> Grid:
    """A grid whose axes are rotated in the world and whose origin is off the voxel lattice."""
    ndim = len(shape)
    angle = 0.3
    rotation = torch.eye(ndim, dtype=torch.float64)
    rotation[0, 0] = rotation[1, 1] = np.cos(angle)
    rotation[0, 1], rotation[1, 0] = -np.sin(angle), np.sin(angle)
    return Grid.from_spacing(shape, spacing, origin=[shift * (i + 1) for i in range(ndim)], direction=rotation)


@pytest.mark.parametrize("shape", FILTER_SHAPES)
@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_gaussian_matches_the_banded_filter(shape, sigma):
    field = _random(shape, 3, 0)
    expected = fast_gaussian_blur(field, sigma)
    assert torch.allclose(blur(field, sigma, backend="compiled"), expected, atol=1e-6)
    assert torch.allclose(blur(field, sigma, backend="torch"), expected)


@pytest.mark.parametrize("shape", FILTER_SHAPES)
def test_window_sums_match_the_reference(shape):
    volume = _random(shape, 5, 1)
    found = kernels.box_sum(_volumes(volume), 5).reshape(volume.shape[1:])
    assert np.allclose(found, fast_box_sum(volume, 5)[0].numpy(), atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_warp_and_derivative_match_autograd_through_grid_sample(shape):
    ndim = len(shape)
    grid = _oblique_grid(shape, 1.5, 0.37)
    moving_grid = Grid.from_spacing([s + 2 for s in shape], 1.2, origin=[-1.1] * ndim)
    moving = _random(moving_grid.shape, 1, 2)
    displacement = (torch.rand(1, ndim, *shape, generator=torch.Generator().manual_seed(3)) - 0.5) * 4
    # the reference: the engine's warp (world points + displacement -> moving voxels -> grid_sample)
    current = displacement.clone().requires_grad_(True)
    voxel = apply_matrix(moving_grid.voxel_from_world, grid.world_points() + current)
    warped = sample_voxels(moving, voxel, padding="border")
    (derivative,) = torch.autograd.grad(warped.sum(), current)
    size = torch.tensor(moving_grid.shape, dtype=voxel.dtype).view(1, -1, *([1] * ndim))
    inside = ((voxel >= 0) & (voxel <= size - 1)).all(dim=1)

    vectors = displacement[0].numpy() if ndim == 3 else np.concatenate([np.zeros((1, 1, *shape)), displacement[0].numpy()[:, None]])
    found, found_derivative, found_inside = kernels.warp_with_gradient(
        moving[0, 0].numpy() if ndim == 3 else moving[0, 0].numpy()[None], vectors.astype(np.float32),
        grid.world_from_voxel.numpy(), moving_grid.voxel_from_world.numpy(),
    )
    found_derivative = found_derivative if ndim == 3 else found_derivative[1:, 0]
    assert np.allclose(found.reshape(shape), warped[0, 0].detach().numpy(), atol=1e-5)
    assert np.array_equal(found_inside.reshape(shape) > 0, inside[0].numpy())
    # the derivative jumps across cell faces: compare where no coordinate is within 1e-3 of an integer
    fractional = (voxel.detach() - voxel.detach().round()).abs().min(dim=1).values[0]
    smooth = (fractional > 1e-3).numpy()
    assert smooth.mean() > 0.95
    assert np.allclose(found_derivative[:, smooth], derivative[0][:, torch.from_numpy(smooth)].numpy(), atol=1e-4)


def test_border_voxels_have_no_derivative_across_the_border():
    """As in ``grid_sample``'s backward: on the first or last voxel of an axis the derivative along it is 0,
    and coordinates a rounding error from a voxel centre take the cell above it."""
    moving = (np.arange(5, dtype=np.float32) ** 2)[None, None, :].repeat(3, 0).repeat(3, 1)  # x^2 along axis 2
    identity = np.eye(4)
    displacement = np.zeros((3, 3, 3, 5), dtype=np.float32)
    displacement[2] = -1e-7  # rounding noise below every voxel centre
    warped, derivative, inside = kernels.warp_with_gradient(moving, displacement, identity, identity)
    assert inside.all()
    assert np.allclose(warped, moving, atol=1e-5)
    assert np.allclose(derivative[2, :, :, 1:4], [3.0, 5.0, 7.0])  # (x + 1)^2 - x^2: the cell above
    assert np.allclose(derivative[2, :, :, [0, 4]], 0.0)
    assert np.allclose(derivative[:2], 0.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_compose_matches_the_reference(shape):
    ndim = len(shape)
    grid = _oblique_grid(shape, 1.3, 0.2)
    field = gaussian_blur(_random(shape, ndim, 4) - 0.5, 1.0) * 6
    step = (_random(shape, ndim, 5) - 0.5) * 2
    expected = compose_displacement(field, step, grid, backend="torch")
    assert torch.allclose(compose_displacement(field, step, grid, backend="compiled"), expected, atol=2e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("oblique", [False, True])
def test_fused_update_is_the_three_steps(shape, oblique):
    """update_displacement = smooth_field(compose_displacement(field, normalised_step(gradient))) on the
    compiled kernels: to the bit on an axis-aligned grid (the same float32 operations in the same
    order), to rounding on an oblique one (the world -> voxel products are summed in another order)."""
    ndim = len(shape)
    grid = _oblique_grid(shape, 1.3, 0.2) if oblique else Grid.from_spacing(shape, 1.3)
    field = gaussian_blur(_random(shape, ndim, 4) - 0.5, 1.0) * 3
    gradient = (_random(shape, ndim, 5) - 0.5) * 1e-3
    for step, sigma_pre, sigma_post in ((1.0, 2.0, 0.5), (0.37, 0.0, 0.0)):
        step_field = normalised_step(gradient, grid, sigma_pre, step, backend="compiled")
        expected = smooth_field(compose_displacement(field, step_field, grid, backend="compiled"), sigma_post,
                                backend="compiled")
        found = field.clone()
        version = found._version
        update_displacement(found, kernels.volumes(gradient) if ndim == 3 else
                            np.concatenate([np.zeros_like(kernels.volumes(gradient)[:1]), kernels.volumes(gradient)]),
                            grid, sigma_pre, step, sigma_post)
        assert found._version > version  # written in place, and autograd's version counter knows it
        if oblique:
            assert torch.allclose(found, expected, atol=1e-6)
        else:
            assert torch.equal(found, expected)
    # no gradient, no step (as normalised_step): the field composed with zero, then smoothed
    still = field.clone()
    zero = np.zeros((3, *((1,) if ndim == 2 else ()), *shape), dtype=np.float32)
    update_displacement(still, zero, grid, 2.0, 1.0, 0.5)
    unmoved = compose_displacement(field, torch.zeros_like(field), grid, backend="compiled")
    assert torch.equal(still, smooth_field(unmoved, 0.5, backend="compiled"))


def test_longest_vector_and_filter_output_checks():
    grid = _oblique_grid((9, 8, 7), 1.7, 0.3)
    vectors = (_random((9, 8, 7), 3, 12) - 0.5) * 4
    from alignkit.spatial import world_to_voxel_vectors

    expected = float(world_to_voxel_vectors(vectors, grid).square().sum(dim=1).max())
    assert kernels.longest_squared(kernels.volumes(vectors), grid.voxel_from_world.numpy()) == pytest.approx(expected, rel=1e-6)
    vectors[0, 1, 4, 4, 4] = float("nan")
    assert np.isnan(kernels.longest_squared(kernels.volumes(vectors), grid.voxel_from_world.numpy()))
    volume = kernels.volumes(_random((5, 6, 7), 2, 13))
    taps = np.array([0.25, 0.5, 0.25], dtype=np.float32)
    out = np.empty_like(volume)
    assert kernels.gaussian(volume, taps, out=out) is out
    assert np.array_equal(out, kernels.gaussian(volume, taps))
    with pytest.raises(ValueError, match="separate"):
        kernels.gaussian(volume, taps, out=volume)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("squared", [True, False])
def test_lncc_force_matches_the_closed_form_and_autograd(shape, squared):
    ndim = len(shape)
    grid = _oblique_grid(shape, 1.5, 0.41)
    fixed = gaussian_blur(_random(shape, 1, 6), 1.0)
    moving = gaussian_blur(_random(shape, 1, 7), 1.0)
    prior = torch.eye(ndim + 1, dtype=torch.float64)
    prior[:ndim, :ndim] += 0.05 * torch.randn(ndim, ndim, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    prior[:ndim, ndim] = 0.7
    similarity = LNCC(window=5, squared=squared)
    displacement = (_random(shape, ndim, 9) - 0.5) * 2
    assert LNCCForce.applies(similarity, fixed, moving, prior)
    value, gradient = LNCCForce(fixed, grid, moving, grid, prior, similarity)(displacement)

    current = displacement.clone().requires_grad_(True)
    points = apply_matrix(prior, grid.world_points() + current)
    voxel = apply_matrix(grid.voxel_from_world, points)
    warped = sample_voxels(moving, voxel, padding="border")
    size = torch.tensor(shape, dtype=voxel.dtype).view(1, -1, *([1] * ndim))
    inside = ((voxel >= 0) & (voxel <= size - 1)).all(dim=1, keepdim=True).to(warped.dtype)
    expected_value = similarity(warped, fixed, inside)
    (expected,) = torch.autograd.grad(expected_value, current)
    assert float(value) == pytest.approx(float(expected_value.detach()), abs=1e-5)
    scale = float(expected.abs().max())
    assert torch.allclose(gradient, expected, atol=1e-3 * scale)


def test_the_force_is_not_used_where_it_does_not_apply():
    fixed, moving = _random((8, 9, 10), 1, 0), _random((8, 9, 10), 1, 1)
    assert not LNCCForce.applies(LNCC(window=5, dilation=2), fixed, moving, None)
    assert not LNCCForce.applies(LNCC(window=5), fixed.double(), moving.double(), None)
    assert not LNCCForce.applies(LNCC(window=5), _random((8, 9, 10), 2, 0), moving, None)
    projective = torch.eye(4, dtype=torch.float64)
    projective[3, 0] = 1e-3
    assert not LNCCForce.applies(LNCC(window=5), fixed, moving, projective)


def test_the_switch_turns_the_compiled_path_off(monkeypatch):
    assert kernels.available()
    monkeypatch.setenv("ALIGNKIT_COMPILED", "0")
    assert not kernels.available()
    field = _random((6, 7, 8), 3, 0)
    with pytest.raises(ValueError, match="compiled"):
        blur(field, 1.0, backend="compiled")
    assert torch.equal(blur(field, 1.0), fast_gaussian_blur(field, 1.0))


def _compiled_and_reference_maps(monkeypatch, fixed: Image, moving: Image, stage: StageConfig):
    """The maps of one stage registered with the compiled kernels, then with ``ALIGNKIT_COMPILED=0``."""
    config = RegistrationConfig(stages=[stage], init="none", crop_foreground=False)
    compiled = alignkit.register(fixed, moving, config=config, seed=0, quiet=True)
    monkeypatch.setenv("ALIGNKIT_COMPILED", "0")
    reference = alignkit.register(fixed, moving, config=config, seed=0, quiet=True)
    with torch.no_grad():
        return compiled.world_map(), reference.world_map()


@pytest.mark.parametrize("ndim", [2, 3])
def test_greedy_registration_takes_the_same_steps(monkeypatch, ndim):
    """A whole greedy displacement stage, compiled against torch: the same field to float rounding."""
    shape = (24, 26, 22)[:ndim]
    grid = Grid.from_spacing(shape, 1.5)
    # the moving grid off the fixed one by a fraction of a voxel: no sampling coordinate sits on a voxel
    # centre, where the derivative jumps and the two paths' float rounding may pick different cells
    moving_grid = Grid.from_spacing(shape, 1.5, origin=[0.37] * ndim)
    fixed = Image(gaussian_blur(_random(shape, 1, 10), 1.5)[0], grid)
    moving = Image(gaussian_blur(_random(shape, 1, 11), 1.5)[0], moving_grid)
    stage = StageConfig(
        transform="displacement", optimizer="greedy", similarity="lncc", similarity_options={"window": 5},
        levels=(2, 1), iterations=(4, 3), learning_rate=0.5, gradient_smoothing=1.5, field_smoothing=0.5, tolerance=0.0,
    )
    found, expected = _compiled_and_reference_maps(monkeypatch, fixed, moving, stage)
    assert float((found - expected).abs().max()) < 1e-3
    assert float((expected - grid.world_points()).abs().max()) > 0.1  # the stage moved the field


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("squared", [True, False])
def test_lncc_value_without_autograd_is_the_reference(monkeypatch, shape, squared):
    """LNCC's forward without autograd takes the compiled loops: the same value as the torch path."""
    warped, fixed = gaussian_blur(_random(shape, 1, 12), 1.0), gaussian_blur(_random(shape, 1, 13), 1.0)
    mask = (_random(shape, 1, 14) > 0.2).float()
    similarity = LNCC(window=5, squared=squared)
    with torch.no_grad():
        assert similarity._compiled_value_applies(warped, fixed, mask)
        found = similarity(warped, fixed, mask)
        monkeypatch.setenv("ALIGNKIT_COMPILED", "0")
        assert not similarity._compiled_value_applies(warped, fixed, mask)
        expected = similarity(warped, fixed, mask)
    assert float(found) == pytest.approx(float(expected), abs=1e-5)
    assert not similarity._compiled_value_applies(warped.requires_grad_(True), fixed, mask)


@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) == 3])
@pytest.mark.parametrize("as_points", [False, True])
def test_compiled_sampler_matches_grid_sample_and_its_backward(shape, as_points):
    """sample_voxels_with_inside's compiled path against grid_sample (values, inside mask, gradient with
    respect to the coordinates), at off-lattice coordinates that reach beyond the border."""
    from alignkit.spatial.points import sample_voxels_with_inside

    ndim = len(shape)
    image = gaussian_blur(_random(shape, 1, 14), 1.0)
    size = torch.tensor(shape, dtype=torch.float32).view(1, ndim, *([1] * ndim))
    voxel = _random(shape, ndim, 15) * (size + 2) - 1.0  # some coordinates outside [0, n - 1]
    if as_points:  # a voxel sample, as the sampled metrics lay it out: (1, ndim, N, 1[, 1])
        voxel = voxel.flatten(2)[..., :50].reshape(1, ndim, 50, *([1] * (ndim - 1)))
    weights = _random(tuple(voxel.shape[2:]), 1, 16)
    results = []
    for compiled in (True, False):
        coordinates = voxel.clone().requires_grad_(True)
        samples, inside = sample_voxels_with_inside(image, coordinates, compiled=compiled)
        (gradient,) = torch.autograd.grad((samples * weights).sum(), coordinates)
        results.append((samples.detach(), inside, gradient))
    (found, found_inside, found_gradient), (expected, expected_inside, expected_gradient) = results
    assert found.shape == expected.shape and found_gradient.shape == expected_gradient.shape
    assert torch.allclose(found, expected, atol=1e-5)
    assert torch.equal(found_inside, expected_inside) and 0 < float(expected_inside.mean()) < 1
    assert not found_inside.requires_grad  # a constant, as the reference's
    assert torch.allclose(found_gradient, expected_gradient, atol=1e-4)


@pytest.mark.parametrize("sample_points", [0, 2000])
def test_affine_stage_with_the_compiled_sampler_finds_the_reference_transform(monkeypatch, sample_points):
    """An affine NCC stage (every voxel, or a voxel sample) fitted through the compiled sampler and through
    grid_sample: the same optimum to well under a voxel."""
    shape = (22, 24, 20)
    grid = Grid.from_spacing(shape, 2.0)
    truth = torch.eye(4, dtype=torch.float64)
    truth[:3, :3] += 0.04 * torch.randn(3, 3, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
    truth[:3, 3] = torch.tensor([1.5, -2.0, 1.0], dtype=torch.float64)
    fixed_tensor = gaussian_blur(_random(shape, 1, 18), 2.0)
    moving_grid = Grid(shape, torch.linalg.inv(truth) @ grid.world_from_voxel)  # fixed world -> moving world: truth^-1
    fixed, moving = Image(fixed_tensor[0], grid), Image(fixed_tensor[0], moving_grid)
    stage = StageConfig(transform="affine", similarity="ncc", levels=(2, 1), iterations=(60, 40), learning_rate=1e-2,
                        sample_points=sample_points)
    found, expected = _compiled_and_reference_maps(monkeypatch, fixed, moving, stage)
    assert float((found - expected).abs().max()) < 0.2  # mm, voxels of 2 mm
    assert float((expected - grid.world_points()).abs().max()) > 1.0  # the stage moved


def test_compiled_sampler_leaves_2d_images_to_grid_sample(monkeypatch):
    from alignkit.spatial import points

    def refuse(*args, **kwargs):
        raise AssertionError("the compiled sampler ran on a 2D image")

    monkeypatch.setattr(points._CompiledSample, "apply", refuse)
    image = _random((12, 15), 1, 19)
    voxel = _random((12, 15), 2, 20) * 18 - 1.5  # some points outside
    samples, inside = points.sample_voxels_with_inside(image, voxel)
    assert torch.equal(samples, sample_voxels(image, voxel, padding="border"))
    assert 0 < float(inside.mean()) < 1


def test_capped_smoothing_physical_scales_the_sigmas_of_a_capped_level():
    """capped_smoothing_physical: on a level max_level_voxels made coarser, the greedy sigmas shrink by the
    asked / used shrink factor -- the same field as the plain stage given those sigmas; an uncapped level
    is unchanged."""
    import math

    from alignkit.solve.engine import level_factor

    shape = (24, 26, 22)
    grid = Grid.from_spacing(shape, 1.5)
    fixed = Image(gaussian_blur(_random(shape, 1, 20), 1.5)[0], grid)
    moving = Image(gaussian_blur(_random(shape, 1, 21), 1.5)[0], Grid.from_spacing(shape, 1.5, origin=[0.37] * 3))
    cap = math.prod(shape) // 3
    ratio = 1.0 / level_factor(1, shape, cap)
    assert ratio < 0.8

    def field(capped: bool, sigma_pre: float, sigma_post: float, max_voxels: int) -> torch.Tensor:
        stage = StageConfig(
            transform="displacement", optimizer="greedy", similarity="lncc", similarity_options={"window": 5},
            levels=(1,), iterations=(4,), learning_rate=0.5, gradient_smoothing=sigma_pre, field_smoothing=sigma_post,
            tolerance=0.0, max_level_voxels=max_voxels, capped_smoothing_physical=capped,
        )
        config = RegistrationConfig(stages=[stage], init="none")
        with torch.no_grad():
            return alignkit.register(fixed, moving, config=config, seed=0, quiet=True).world_map()

    scaled = field(True, 1.5, 0.6, cap)
    assert torch.allclose(scaled, field(False, 1.5 * ratio, 0.6 * ratio, cap), atol=1e-5)
    assert float((scaled - field(False, 1.5, 0.6, cap)).abs().max()) > 1e-3
    assert torch.equal(field(True, 1.5, 0.6, 0), field(False, 1.5, 0.6, 0))  # no cap: nothing scaled
