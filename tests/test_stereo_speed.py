"""The compiled (numba) path of semi-global matching agrees with the torch/numpy reference (issue 16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.stereo import compiled, match
from alignkit.stereo.cost import census_signature, cost_volume
from alignkit.stereo.sgm import (
    COST_LEVELS,
    aggregate,
    quantise,
    right_volume,
    step_penalties,
    winner_take_all,
)

needs_numba = pytest.mark.skipif(not compiled.available(), reason="numba not installed (pip install alignkit[fast])")


def _pair(seed: int = 0, size: tuple[int, int] = (48, 72)) -> tuple[np.ndarray, np.ndarray]:
    from alignkit.data.synthetic_stereo import render_stereo_pair, training_photographs

    rng = np.random.default_rng(seed)
    pair = render_stereo_pair(training_photographs()[seed % 3], size, rng=rng, max_disparity=12, layers=3)
    return pair.left, pair.right


def _grey01(image: np.ndarray) -> torch.Tensor:
    from alignkit.stereo.cost import grey

    g = grey(image)
    return (g - g.min()) / (g.max() - g.min())


@needs_numba
def test_census_cost_equals_quantised_reference() -> None:
    left, right = (_grey01(x) for x in _pair())
    disparities = np.arange(-3, 15)
    reference = quantise(cost_volume(left, right, disparities, cost="census")).permute(1, 2, 0).numpy()
    ours = compiled.census_cost(census_signature(left), census_signature(right), -3, len(disparities), 62, COST_LEVELS)
    np.testing.assert_array_equal(ours, reference)
    padded = compiled.census_cost(census_signature(left), census_signature(right), -3, len(disparities), 62,
                                  COST_LEVELS, padded=32)
    assert padded.shape == (*reference.shape[:2], 32)
    np.testing.assert_array_equal(padded[:, :, : len(disparities)], reference)
    assert (padded[:, :, len(disparities) :] == compiled.PAD_COST).all()
    small = compiled.census_cost(census_signature(left), census_signature(right), -3, len(disparities), 62,
                                 COST_LEVELS, padded=24, dtype=np.uint8)
    assert small.dtype == np.uint8
    np.testing.assert_array_equal(small[:, :, : len(disparities)], reference)
    assert (small[:, :, len(disparities) :] == compiled.PAD_COST_U8).all()


@needs_numba
@pytest.mark.parametrize("directions", [4, 8])
def test_aggregation_and_selection_equal_reference(directions: int) -> None:
    left, right = (_grey01(x) for x in _pair(1))
    disparities = np.arange(0, 13)
    volume = cost_volume(left, right, disparities, cost="zncc")
    reference = aggregate(volume, left, p1=0.05, p2=0.6, tau=0.05, directions=directions)
    steps = step_penalties(left, 0.05, 0.6, 0.05, directions)
    ours = compiled.aggregate(quantise(volume).permute(1, 2, 0).numpy(), [p.numpy() for _, p in steps],
                              [r for r, _ in steps], round(0.05 * COST_LEVELS))
    np.testing.assert_array_equal(ours, reference.permute(1, 2, 0).numpy())
    left_d, right_d = compiled.select(ours, 0)
    np.testing.assert_allclose(left_d, winner_take_all(reference, 0)[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(right_d, winner_take_all(right_volume(reference, 0), 0)[0].numpy(), atol=1e-5)


@needs_numba
@pytest.mark.parametrize(("directions", "low", "lanes", "p1", "p2"),
                         [(8, 0, 8, 0.05, 0.6), (8, -3, 16, 0.05, 0.6), (4, 2, 32, 0.05, 0.6), (8, 0, 8, 0.0, 16.0)])
def test_fused_sweeps_equal_aggregate_and_select(directions: int, low: int, lanes: int, p1: float, p2: float) -> None:
    """The two-sweep fused kernel (the matcher's path) against the per-direction kernels it replaces:
    the same integer sums, the same sub-pixel disparities bit for bit (same float arithmetic); the last
    case has the largest P2 the matcher accepts and P1 = 0 (the padding's bound, compiled.PAD_COST)."""
    left, right = (_grey01(x) for x in _pair(5, (37, 61)))
    disparities = np.arange(low, low + 19)
    volume = quantise(cost_volume(left, right, disparities, cost="census")).permute(1, 2, 0).numpy()
    steps = step_penalties(left, p1, p2, 0.05, directions)
    penalties, paths = [p.numpy() for _, p in steps], [r for r, _ in steps]
    total = compiled.aggregate(volume, penalties, paths, round(p1 * COST_LEVELS))
    left_d, right_d, fused_total = compiled.sgm_sweeps(volume, penalties, paths, round(p1 * COST_LEVELS), low,
                                                       keep_total=True, lanes=lanes)
    np.testing.assert_array_equal(fused_total, total)
    reference_left, reference_right = compiled.select(total, low)
    np.testing.assert_array_equal(left_d, reference_left)
    np.testing.assert_array_equal(right_d, reference_right)
    # the cost given already padded (the matcher's layout, as census_cost writes it): the same results
    padded = np.full((*volume.shape[:2], compiled.padded_count(volume.shape[2], lanes)), compiled.PAD_COST, np.int16)
    padded[:, :, : volume.shape[2]] = volume
    left_p, right_p, _ = compiled.sgm_sweeps(padded, penalties, paths, round(p1 * COST_LEVELS), low,
                                             count=volume.shape[2], lanes=lanes)
    np.testing.assert_array_equal(left_p, reference_left)
    np.testing.assert_array_equal(right_p, reference_right)
    # a uint8 volume (the matcher's, where the penalties allow it; else it is re-padded as int16)
    small = np.full(padded.shape, compiled.PAD_COST_U8, np.uint8)
    small[:, :, : volume.shape[2]] = volume
    assert compiled.uint8_costs_fit(round(p1 * COST_LEVELS), round(p2 * COST_LEVELS)) == (p2 < 1)
    left_s, right_s, total_s = compiled.sgm_sweeps(small, penalties, paths, round(p1 * COST_LEVELS), low,
                                                   count=volume.shape[2], lanes=lanes, keep_total=True)
    np.testing.assert_array_equal(total_s, total)
    np.testing.assert_array_equal(left_s, reference_left)
    np.testing.assert_array_equal(right_s, reference_right)
    # ties and flat rows: the first minimum wins in both (a constant volume selects the lowest disparity)
    flat = np.full_like(volume, 7)
    left_f, right_f, _ = compiled.sgm_sweeps(flat, penalties, paths, 3, low)
    np.testing.assert_array_equal(left_f, compiled.select(compiled.aggregate(flat, penalties, paths, 3), low)[0])
    np.testing.assert_array_equal(right_f, compiled.select(compiled.aggregate(flat, penalties, paths, 3), low)[1])


@needs_numba
def test_fused_sweeps_padding_never_wins() -> None:
    """Uniform random costs and the largest P2 (path costs spread up to 64 + P2 apart, the bound
    compiled.PAD_COST is set by): the padded disparity axis changes nothing."""
    rng = np.random.default_rng(11)
    volume = rng.integers(0, COST_LEVELS + 1, (29, 41, 23)).astype(np.int16)
    image = torch.from_numpy(rng.random((29, 41)).astype(np.float32))
    steps = step_penalties(image, 0.0, 16.0, 0.0, 8)  # tau 0: P2 = 1024 everywhere
    penalties, paths = [p.numpy() for _, p in steps], [r for r, _ in steps]
    total = compiled.aggregate(volume, penalties, paths, 0)
    left_d, right_d, fused_total = compiled.sgm_sweeps(volume, penalties, paths, 0, 0, keep_total=True)
    np.testing.assert_array_equal(fused_total, total)
    np.testing.assert_array_equal(left_d, compiled.select(total, 0)[0])
    np.testing.assert_array_equal(right_d, compiled.select(total, 0)[1])


@needs_numba
@pytest.mark.parametrize("window", [(7, 9), (5, 5)])
def test_census_signature_equals_reference(window) -> None:
    image = _grey01(_pair(4)[0])
    np.testing.assert_array_equal(compiled.census_signature(image.numpy(), window), census_signature(image, window))


@needs_numba
def test_median_equals_reference() -> None:
    from alignkit.stereo import _median3

    rng = np.random.default_rng(3)
    for shape in ((17, 23), (1, 6), (3, 3)):
        for image in (rng.normal(size=shape), np.round(rng.normal(size=shape) * 2)):  # the second with ties
            image = torch.from_numpy(image.astype(np.float32))
            np.testing.assert_array_equal(compiled.median3(image.numpy()), _median3(image).numpy())


@needs_numba
@pytest.mark.parametrize("cost", ["census", "learned"])
def test_match_backends_agree(cost: str) -> None:
    """The whole matcher, census and a callable (learned-style) cost: same disparities, same occlusions."""
    left, right = _pair(2)

    def learned(left_g: torch.Tensor, right_g: torch.Tensor, disparities: np.ndarray) -> torch.Tensor:
        return cost_volume(left_g, right_g, disparities, cost="zncc")

    chosen = "census" if cost == "census" else learned
    reference = match(left, right, min_disparity=-2, max_disparity=14, cost=chosen, backend="torch")
    ours = match(left, right, min_disparity=-2, max_disparity=14, cost=chosen, backend="numba")
    np.testing.assert_allclose(ours.raw.numpy(), reference.raw.numpy(), atol=1e-5)
    np.testing.assert_allclose(ours.disparity.numpy(), reference.disparity.numpy(), atol=1e-5)
    assert torch.equal(ours.occluded, reference.occluded)


def test_unknown_backend_is_a_config_error() -> None:
    left, right = _pair(0, (24, 40))
    with pytest.raises(ConfigError, match="backend"):
        match(left, right, max_disparity=8, backend="cuda-magic")


def test_metrics_reuse_the_engines_normalised_pair() -> None:
    """register hands the engine's normalised pair to compute_metrics: the same metrics as normalising again."""
    import alignkit
    from alignkit.image import Image
    from alignkit.registration import compute_metrics

    left, right = _pair(6, (40, 64))
    fixed, moving = (Image.from_array(np.moveaxis(x, 0, -1) if x.ndim == 3 else x) for x in (left, right))
    result = alignkit.register(fixed, moving, preset="stereo", min_disparity=0, max_disparity=12)
    again = compute_metrics(result)
    for key in ("ncc_before", "ncc_after", "mse_before", "mse_after", "jacobian"):
        assert result.metrics[key] == again[key], key
    # and the classical method does hand them over (Engine.normalised -> MethodOutput.normalised)
    from alignkit.methods import get_method
    from alignkit.registration import prepare_inputs

    output = get_method("classical").create(preset="stereo").run(
        prepare_inputs(fixed, moving, None, None, None, None), device=torch.device("cpu"), seed=0, progress=None)
    assert output.normalised is not None and output.normalised[0].shape == (1, 3, 40, 64)


@pytest.mark.parametrize("raster", [True, False])
def test_disparity_transform_points_equals_field_sampling(raster: bool) -> None:
    """DisparityField samples its one-channel disparity: the same points as sampling the displacement
    (FieldTransform's path) -- bit for bit on a raster, to float rounding with anisotropic spacing."""
    from alignkit.spatial.grid import Grid
    from alignkit.transforms.base import FieldTransform
    from alignkit.transforms.disparity import DisparityField

    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    grid = Grid.raster_2d((23, 31)) if raster else Grid.from_spacing((23, 31), (0.7, 1.3), direction=swap)
    rng = np.random.default_rng(7)
    model = DisparityField.from_pixels(torch.from_numpy(rng.uniform(0, 9, (23, 31)).astype(np.float32)), grid)
    world = grid.world_points() + torch.from_numpy(rng.normal(scale=2.0, size=(1, 2, 23, 31)).astype(np.float32))
    points = torch.from_numpy(rng.uniform(-3, 35, size=(1, 2, 50)).astype(np.float32))  # a point list, some outside
    for where in (world, points):
        ours, reference = model.transform_points(where), FieldTransform.transform_points(model, where)
        if raster:
            assert torch.equal(ours, reference)
        else:
            torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-5)


def test_world_map_is_kept_until_the_transform_changes() -> None:
    """Registration.world_map keeps the fixed grid's map (metrics, flow and disparity read it) and
    recomputes it once a parameter of the transform is modified."""
    import alignkit
    from alignkit.image import Image

    left, right = _pair(7, (32, 48))
    result = alignkit.register(Image.from_array(np.moveaxis(left, 0, -1)), Image.from_array(np.moveaxis(right, 0, -1)),
                               preset="stereo", min_disparity=0, max_disparity=10)
    first = result.world_map()
    first.zero_()  # a caller's in-place change does not reach the kept map
    kept = result.world_map()
    assert torch.equal(kept, result.transform.map_on(result.fixed.grid))
    parameter = next(p for p in result.transform.parameters())
    with torch.no_grad():
        parameter.add_(0.5)
    assert torch.equal(result.world_map(), result.transform.map_on(result.fixed.grid))
    assert not torch.equal(result.world_map(), kept)


@pytest.mark.parametrize("tau", [0.05, 0.0])
def test_step_penalties_of_opposite_paths_equal_the_direct_ones(tau: float) -> None:
    """step_penalties rolls one direction's map for the opposite one: the same integers as computing it."""
    from alignkit.stereo.sgm import _step_penalty

    image = _grey01(_pair(8, (31, 45))[0])
    for (dy, dx), penalty in step_penalties(image, 0.05, 0.6, tau, 8):
        assert torch.equal(penalty, _step_penalty(image, dy, dx, round(0.05 * COST_LEVELS), round(0.6 * COST_LEVELS), tau))


@needs_numba
@pytest.mark.parametrize("tau", [0.05, 0.013])
@pytest.mark.parametrize("directions", [4, 8])
def test_compiled_step_penalties_equal_reference(tau: float, directions: int) -> None:
    """One kernel for every direction's adaptive P2: the integers of step_penalties (its reference), on a
    photograph and on an image of few grey levels (many equal changes, rounding ties)."""
    rng = np.random.default_rng(5)
    images = (_grey01(_pair(6, (33, 47))[0]), torch.from_numpy((rng.integers(0, 9, (29, 38)) / 8).astype(np.float32)))
    for image in images:
        reference = step_penalties(image, 0.05, 0.6, tau, directions)
        ours = compiled.step_penalties(image.numpy(), [r for r, _ in reference], round(0.05 * COST_LEVELS),
                                       round(0.6 * COST_LEVELS), tau)
        assert ours.dtype == np.int16 and ours.shape == (directions, *image.shape)
        for (_, penalty), fast in zip(reference, ours, strict=True):
            np.testing.assert_array_equal(fast, penalty.numpy())


@needs_numba
def test_compiled_check_and_fill_equal_reference() -> None:
    """The left-right check and the filling in one kernel: the references' masks and values exactly,
    with rounding ties (x - d at half pixels), differences at the tolerance, matches outside the image,
    and rows where every pixel is rejected (they keep their values)."""
    from alignkit.stereo.sgm import fill_invalid, left_right_check

    rng = np.random.default_rng(11)
    height, width = 23, 31
    left = (rng.integers(-8, 60, (height, width)) / 4).astype(np.float32)  # quarter pixels: ties of round()
    right = left + (rng.integers(-3, 4, (height, width)) / 2).astype(np.float32)  # |seen - d| at 1.0 exactly
    left[5] = 40.0  # every match of this row leaves the image on the left: all rejected
    for tolerance in (1.0, 0.5):
        occluded = left_right_check(torch.from_numpy(left), torch.from_numpy(right), tolerance)
        filled = fill_invalid(torch.from_numpy(left), occluded)
        ours_occluded, ours_filled = compiled.check_and_fill(left, right, tolerance)
        assert occluded.any() and (~occluded).any() and bool(occluded[5].all())
        np.testing.assert_array_equal(ours_occluded, occluded.numpy())
        np.testing.assert_array_equal(ours_filled, filled.numpy())


@needs_numba
def test_compiled_grey_pair_equals_reference() -> None:
    """The grey pair rescaled by its joint range in one kernel: the values of grey + min/max + the two
    tensor operations, for 1 to 4 channels, float and 8-bit data, and an (H, W) pair."""
    from alignkit.stereo import _channels_first, _unit_pair
    from alignkit.stereo.cost import grey

    rng = np.random.default_rng(2)
    cases = [tuple(rng.uniform(-3.7, 250.3, (c, 19, 26)).astype(np.float32) for _ in range(2)) for c in (1, 2, 3, 4)]
    cases.append(tuple(rng.integers(0, 256, (3, 19, 26)).astype(np.uint8) for _ in range(2)))
    cases.append(tuple(rng.uniform(0, 1, (19, 26)) for _ in range(2)))  # float64, (H, W)
    cases.append(_pair(3))
    for left, right in cases:
        reference = _unit_pair(grey(left), grey(right))
        ours = compiled.grey_pair_unit(_channels_first(left), _channels_first(right))
        for fast, slow in zip(ours, reference, strict=True):
            np.testing.assert_array_equal(fast, slow.numpy())


@needs_numba
def test_compiled_feature_cost_equals_the_torch_reference() -> None:
    from alignkit.nets.stereo import MatchingFeatures

    generator = torch.Generator().manual_seed(0)
    left = torch.nn.functional.normalize(torch.randn(1, 7, 9, 13, generator=generator), dim=1)
    right = torch.nn.functional.normalize(torch.randn(1, 7, 9, 13, generator=generator), dim=1)
    disparities = np.array([-14, -13, -3, 0, 1, 5, 12, 13, 20])  # beyond the width on both sides, and inside
    reference = MatchingFeatures.cost_volume_reference(left, right, disparities)
    with torch.no_grad():
        fast = MatchingFeatures.cost_volume(left, right, disparities)
    assert fast.shape == reference.shape and fast.dtype == reference.dtype
    assert torch.allclose(fast, reference, atol=1e-6, rtol=0)
    assert bool((fast[[0, 1, -2, -1]] == 1).all())  # no right pixel at x - d: the worst cost
    # with autograd on features that need it, the differentiable reference runs
    grad_left = left.clone().requires_grad_(True)
    MatchingFeatures.cost_volume(grad_left, right, disparities).sum().backward()
    assert grad_left.grad is not None
