"""The greedy update of dense stages (``optimizer="greedy"``, :mod:`alignkit.solve.greedy`), adaptive
squaring of the SVF, the engine's plain Adam and the stacked LNCC window sums: recovery of known smooth
deformations in 2D and 3D, no folds in the diffeomorphic setting, fast paths against references."""

from __future__ import annotations

import pytest
import torch

import alignkit
from alignkit.data.demo import random_true_transform
from alignkit.errors import ConfigError
from alignkit.image import Image
from alignkit.losses.similarity import LNCC
from alignkit.solve import RegistrationConfig, StageConfig
from alignkit.solve.greedy import compose_displacement, normalised_step
from alignkit.solve.optim import PlainAdam
from alignkit.spatial import Grid, gaussian_blur, jacobian_determinant, sample_world, world_to_voxel_vectors
from alignkit.spatial.filters import box_sum
from alignkit.transforms import DisplacementField, StationaryVelocityField
from alignkit.transforms.dense import scaling_and_squaring, squarings_needed


def _textured(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Smooth random texture with a bright blob: structure everywhere, so every voxel constrains the map."""
    generator = torch.Generator().manual_seed(seed)
    noise = gaussian_blur(torch.rand(1, 1, *shape, generator=generator), 1.5)
    return (noise - noise.min()) / (noise.max() - noise.min())


def _deformation(grid: Grid, seed: int, mm: float) -> StationaryVelocityField:
    """The smooth diffeomorphic part of the demo's random truth (no affine)."""
    truth = random_true_transform(grid, torch.Generator().manual_seed(seed), displacement_mm=mm)
    return truth.stages[-1]


def _pair(ndim: int, shape: tuple[int, ...], mm: float, seed: int = 3):
    grid = Grid.from_spacing(shape, (1.5,) * ndim)
    moving = Image(_textured(shape, seed)[0], grid)
    truth = _deformation(grid, seed, mm)
    with torch.no_grad():
        fixed = Image(sample_world(moving.batch(), grid, truth.map_on(grid))[0], grid)
    return fixed, moving, truth


def _greedy_config(transform: str, iterations: tuple[int, ...], **options) -> RegistrationConfig:
    stage = StageConfig(
        transform=transform, optimizer="greedy", similarity="lncc", similarity_options={"window": 5},
        levels=(2, 1), iterations=iterations, learning_rate=0.5, gradient_smoothing=1.5, field_smoothing=0.5,
        tolerance=0.0, **options,
    )
    return RegistrationConfig(stages=[stage], init="none", crop_foreground=False)


def _errors(result, truth, grid: Grid, margin: int) -> tuple[float, float]:
    """(mean map error, mean true displacement) in mm inside ``margin`` voxels of the border."""
    with torch.no_grad():
        found, expected = result.world_map()[0], truth.map_on(grid)[0]
        identity = grid.world_points()[0]
    inner = (slice(None),) + (slice(margin, -margin),) * grid.ndim
    error = (found - expected).norm(dim=0)[inner[1:]].mean()
    start = (expected - identity).norm(dim=0)[inner[1:]].mean()
    return float(error), float(start)


@pytest.mark.parametrize("transform", ["displacement", "svf"])
def test_greedy_recovers_a_known_smooth_deformation_in_2d(transform):
    fixed, moving, truth = _pair(2, (72, 80), mm=7.0)
    options = {"transform_options": {"steps": "auto"}} if transform == "svf" else {}
    result = alignkit.register(fixed, moving, config=_greedy_config(transform, (60, 40), **options), seed=0)
    error, start = _errors(result, truth, fixed.grid, margin=8)
    assert start > 1.0  # the truth moves voxels (1.5 mm wide) by about a voxel on average, up to several
    assert error < 0.1 * start, f"{transform}: map error {error:.3f} mm of {start:.3f} mm"
    assert result.metrics["nonpositive_jacobian_percent"] == 0.0


def test_greedy_recovers_a_known_smooth_deformation_in_3d():
    fixed, moving, truth = _pair(3, (28, 32, 30), mm=6.0, seed=5)
    result = alignkit.register(fixed, moving, config=_greedy_config("displacement", (40, 25)), seed=0)
    error, start = _errors(result, truth, fixed.grid, margin=5)
    assert start > 1.0
    assert error < 0.2 * start, f"map error {error:.3f} mm of {start:.3f} mm"


def test_diffeomorphic_setting_has_no_folds_where_a_fixed_squaring_count_folds():
    """A large, rough velocity (up to 12 voxels): 1 or 2 squarings fold, the automatic count (4) none."""
    grid = Grid.from_spacing((40, 44), (1.0, 1.0))
    velocity = gaussian_blur(torch.randn(1, 2, 40, 44, generator=torch.Generator().manual_seed(0)), 2.0)
    velocity = velocity / velocity.abs().amax() * 12.0
    identity = grid.world_points()

    def folded(steps: int | None) -> int:
        # inside the outer ring of voxels: on the ring itself the one-sided differences meet the border
        # padding of the squarings (the field keeps its edge value outside its grid), and a velocity that
        # is not tangent to the border can show a fold there however many squarings (seed 0: one corner)
        det = jacobian_determinant(identity + scaling_and_squaring(velocity, grid, steps), grid)
        return int((det[..., 1:-1, 1:-1] <= 0).sum())

    assert folded(1) > 0 and folded(2) > 0  # the test is meaningful: too few squarings fold this velocity
    needed = squarings_needed(velocity, grid)
    assert needed > 2
    assert folded(None) == 0
    svf = StationaryVelocityField(grid, steps="auto")
    with torch.no_grad():
        svf.velocity.copy_(velocity)
        det = jacobian_determinant(identity + svf.displacement(), grid)
    assert bool((det[..., 1:-1, 1:-1] > 0).all())


def test_squarings_needed_grows_with_the_velocity_and_is_zero_for_none():
    grid = Grid.from_spacing((24, 24, 24), (2.0, 2.0, 2.0))
    small = gaussian_blur(torch.randn(1, 3, 24, 24, 24, generator=torch.Generator().manual_seed(1)), 3.0)
    assert squarings_needed(torch.zeros_like(small), grid) == 0
    counts = [squarings_needed(small * scale, grid) for scale in (1.0, 10.0, 100.0)]
    assert counts == sorted(counts) and counts[-1] > counts[0]


def test_svf_steps_must_be_a_count_or_auto():
    with pytest.raises(ConfigError, match="steps"):
        StationaryVelocityField(Grid.from_spacing((8, 8)), steps="many")  # type: ignore[arg-type]


def test_normalised_step_moves_at_most_the_step_and_descends():
    grid = Grid.from_spacing((20, 22, 18), (2.0, 1.0, 1.5))
    gradient = torch.randn(1, 3, 20, 22, 18, generator=torch.Generator().manual_seed(2))
    step = normalised_step(gradient, grid, sigma_pre=1.0, step=0.75)
    longest = world_to_voxel_vectors(step, grid).norm(dim=1).max()
    assert float(longest) == pytest.approx(0.75, rel=1e-5)
    assert float((step * gaussian_blur(gradient, 1.0)).sum()) < 0  # a descent direction
    assert bool((normalised_step(torch.zeros_like(gradient), grid, 1.0, 0.75) == 0).all())


def test_compose_displacement_matches_point_wise_composition():
    """The fast composition on the grid against the reference: the two models chained point by point."""
    grid = Grid.from_spacing((16, 18, 14), (1.2, 1.0, 0.8))
    generator = torch.Generator().manual_seed(3)
    u = gaussian_blur(torch.randn(1, 3, 16, 18, 14, generator=generator), 2.0) * 2.0
    s = gaussian_blur(torch.randn(1, 3, 16, 18, 14, generator=generator), 2.0) * 0.5
    first, second = DisplacementField(grid), DisplacementField(grid)
    with torch.no_grad():
        first.field.copy_(u)
        second.field.copy_(s)
        world = grid.world_points()
        reference = first.transform_points(second.transform_points(world)) - world
    fast = compose_displacement(u, s, grid)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


def test_greedy_config_is_checked():
    with pytest.raises(ConfigError, match="dense field"):
        StageConfig(transform="affine", optimizer="greedy")
    with pytest.raises(ConfigError, match="smoothings"):
        StageConfig(transform="svf", optimizer="greedy", regularizer="diffusion", regularizer_weight=0.1)
    with pytest.raises(ConfigError, match="smoothings"):
        StageConfig(transform="displacement", optimizer="greedy", field_shrink=2)
    with pytest.raises(ConfigError, match="step"):
        StageConfig(transform="displacement", optimizer="greedy", learning_rate=0.0)


def test_plain_adam_is_torch_adam_bit_for_bit():
    """The engine's Adam (no torch._dynamo import) against torch.optim.Adam: the same parameters after
    every step, including after the engine's plateau rule halves the learning rate."""
    generator = torch.Generator().manual_seed(4)
    start = torch.randn(2, 3, 5, generator=generator)
    target = torch.randn(2, 3, 5, generator=generator)
    ours_p = torch.nn.Parameter(start.clone())
    ref_p = torch.nn.Parameter(start.clone())
    ours = PlainAdam([ours_p], lr=0.05)
    reference = torch.optim.Adam([ref_p], lr=0.05)
    for step in range(30):
        for p, opt in ((ours_p, ours), (ref_p, reference)):
            opt.zero_grad()
            ((p - target) ** 2 * torch.linspace(0.1, 3, 5)).sum().backward()
            opt.step()
        if step == 12:
            for opt in (ours, reference):
                for group in opt.param_groups:
                    group["lr"] *= 0.5
        assert torch.equal(ours_p.detach(), ref_p.detach()), f"step {step}"


def test_stacked_lncc_window_sums_match_the_reference():
    """LNCC's five window sums computed as one stacked tensor against the plain per-quantity sums."""
    generator = torch.Generator().manual_seed(5)
    x = torch.rand(2, 2, 12, 13, 11, generator=generator)
    y = torch.rand(2, 2, 12, 13, 11, generator=generator)
    count = box_sum(torch.ones(1, 1, 12, 13, 11), 5)
    sx, sy, sxx, syy, sxy = (box_sum(t, 5) for t in (x, y, x * x, y * y, x * y))
    cross = sxy - sx * sy / count
    var_x = (sxx - sx * sx / count).clamp_min(1e-5)
    var_y = (syy - sy * sy / count).clamp_min(1e-5)
    reference = 1.0 - (cross * cross / (var_x * var_y)).flatten(1).mean(1).mean()
    assert torch.equal(LNCC(window=5)(x, y), reference)


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("shape", [(2, 2, 10, 11, 9), (1, 1, 24, 22)])
@pytest.mark.parametrize("masked", [False, True])
def test_lncc_closed_form_gradient_matches_autograd(squared, shape, masked):
    """The greedy update's fast path (LNCC's closed-form gradient) against autograd through the loss,
    in float64, with a flat patch (clamped variance) and a mask of excluded voxels."""
    generator = torch.Generator().manual_seed(6)
    x = torch.rand(*shape, generator=generator, dtype=torch.float64)
    y = torch.rand(*shape, generator=generator, dtype=torch.float64)
    x[..., :4, :4] = 0.5
    mask = (torch.rand(shape[0], 1, *shape[2:], generator=generator) > 0.3).double() if masked else None
    loss = LNCC(window=5, squared=squared)
    leaf = x.clone().requires_grad_(True)
    value = loss(leaf, y, mask)
    (reference,) = torch.autograd.grad(value, leaf)
    fast_value, fast = loss.value_and_gradient(x, y, mask)
    torch.testing.assert_close(fast_value, value.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 3, 17, 20, 15), (2, 1, 31, 26), (1, 2, 3, 40)])
@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_matrix_gaussian_blur_matches_the_reference(shape, sigma):
    from alignkit.spatial.banded import fast_gaussian_blur

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(fast_gaussian_blur(x, sigma), gaussian_blur(x, sigma), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 5, 17, 20, 15), (2, 1, 31, 26), (1, 1, 3, 40)])
@pytest.mark.parametrize("window", [3, 5, 9])
def test_matrix_box_sum_matches_the_reference(shape, window):
    """Window sums by matrix products against the running sums (zero padding; windows longer than an
    axis against the convolution LNCC uses there)."""
    from alignkit.losses.similarity import _window_sum
    from alignkit.spatial.banded import fast_box_sum

    x = torch.rand(*shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    torch.testing.assert_close(fast_box_sum(x, window), _window_sum(x, window, 1), rtol=1e-12, atol=1e-12)


def test_matrix_filters_fall_back_on_long_axes():
    from alignkit.spatial.banded import MAX_MATRIX_AXIS, fast_box_sum, fast_gaussian_blur

    x = torch.rand(1, 1, 4, MAX_MATRIX_AXIS + 1, generator=torch.Generator().manual_seed(9))
    assert torch.equal(fast_gaussian_blur(x, 1.0), gaussian_blur(x, 1.0))
    assert torch.equal(fast_box_sum(x, 3), box_sum(x, 3))


def test_a_greedy_preset_stage_given_another_model_is_refused_before_running():
    from alignkit.solve.presets import resolve_config

    assert resolve_config(3, preset="brain", transform="affine,svf").stages[1].optimizer == "greedy"
    with pytest.raises(ConfigError, match="optimizer 'greedy' updates a dense field"):
        resolve_config(3, preset="brain", transform="affine,bspline")


def _mi_greedy_config(iterations: tuple[int, ...]) -> RegistrationConfig:
    stage = StageConfig(
        transform="displacement", optimizer="greedy", similarity="mi", levels=(2, 1), iterations=iterations,
        learning_rate=0.5, gradient_smoothing=1.5, field_smoothing=0.5, tolerance=0.0,
    )
    return RegistrationConfig(stages=[stage], init="none", crop_foreground=False)


def _inverted_contrast_pair():
    """The 2D pair of the LNCC tests with the fixed image's contrast inverted and bent (MI's case)."""
    fixed, moving, truth = _pair(2, (72, 80), mm=7.0)
    return Image(1.0 - fixed.data**2, fixed.grid), moving, truth


def test_greedy_mi_force_recovers_a_known_deformation_across_contrasts():
    """The greedy update with the mutual-information force (MattesMI's closed-form gradient) recovers a
    smooth deformation between images whose intensities are related by a non-linear, inverting map."""
    fixed, moving, truth = _inverted_contrast_pair()
    result = alignkit.register(fixed, moving, config=_mi_greedy_config((60, 40)), seed=0)
    error, start = _errors(result, truth, fixed.grid, margin=8)
    assert start > 1.0
    assert error < 0.3 * start, f"map error {error:.3f} mm of {start:.3f} mm"
    assert result.metrics["nonpositive_jacobian_percent"] == 0.0


def test_greedy_mi_closed_form_path_matches_the_autograd_path(monkeypatch):
    """The engine's fast path (MattesMI.value_and_gradient, autograd through the warp only) takes the
    same steps as autograd through the whole objective (the reference, used when a similarity has no
    closed form): a few iterations, maps equal to float32 rounding."""
    from alignkit.losses.similarity import MattesMI

    fixed, moving, _ = _inverted_contrast_pair()
    config = _mi_greedy_config((4, 3))
    fast = alignkit.register(fixed, moving, config=config, seed=0).world_map()
    monkeypatch.delattr(MattesMI, "value_and_gradient")
    reference = alignkit.register(fixed, moving, config=config, seed=0).world_map()
    moved = (reference - fixed.grid.world_points()).norm(dim=1).max()
    assert moved > 0.5  # the steps really move the map (0.5 voxel of 1.5 mm per step)
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-3)
