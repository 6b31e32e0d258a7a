"""The classical engine end to end: recovery of known transforms on real images, world-space
registration across grids, determinism, saving and re-applying."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import alignkit
from alignkit.data.demo import random_true_transform
from alignkit.image import Image
from alignkit.io import read_image
from alignkit.io.flo import read_flo
from alignkit.solve import RegistrationConfig, StageConfig
from alignkit.spatial import Grid, flow_from_xy, sample_world, xy_from_flow
from alignkit.transforms import ComposedTransform, MatrixTransform


def warp_real(image: Image, truth) -> Image:
    """fixed = image ∘ truth: registering (fixed, image) must recover ``truth``."""
    with torch.no_grad():
        data = sample_world(image.batch(), image.grid, truth.map_on(image.grid))[0]
    return Image(data, image.grid)


def map_error(result: alignkit.Registration, truth, mask: torch.Tensor) -> float:
    with torch.no_grad():
        found = result.world_map()[0]
        expected = truth.map_on(result.fixed.grid)[0]
    return float((found - expected).norm(dim=0)[mask].mean())


def foreground(image: Image) -> torch.Tensor:
    grey = image.data.float().mean(0)
    inner = torch.zeros_like(grey, dtype=torch.bool)
    inner[8:-8, 8:-8] = True  # ignore the border, where nothing constrains the map
    return (grey > 0.1 * grey.max()) & inner


def test_recovers_known_affine_on_real_slice(brain_slice):
    generator = torch.Generator().manual_seed(1)
    truth = random_true_transform(brain_slice.grid, generator, displacement_mm=0.0).stages[0]
    fixed = warp_real(brain_slice, truth)
    result = alignkit.register(fixed, brain_slice, transform="affine", seed=0)
    start = float((truth.map_on(fixed.grid)[0] - fixed.grid.world_points()[0]).norm(dim=0)[foreground(fixed)].mean())
    error = map_error(result, truth, foreground(fixed))
    assert start > 3.0  # the test is meaningful: the truth moves pixels by several mm
    assert error < 0.25, f"affine recovered with mean error {error:.3f} px (start {start:.2f})"


def test_recovers_known_smooth_deformation_on_real_slice(brain_slice):
    generator = torch.Generator().manual_seed(2)
    truth = random_true_transform(brain_slice.grid, generator, displacement_mm=4.0)
    fixed = warp_real(brain_slice, truth)
    result = alignkit.register(fixed, brain_slice, preset="default2d", seed=0)
    mask = foreground(fixed)
    start = float((truth.map_on(fixed.grid)[0] - fixed.grid.world_points()[0]).norm(dim=0)[mask].mean())
    error = map_error(result, truth, mask)
    assert error < 0.25 * start and error < 1.5, f"map error {error:.3f} (start {start:.2f})"
    assert result.metrics["nonpositive_jacobian_percent"] == 0.0
    assert result.metrics["ncc_after"] > result.metrics["ncc_before"]


def test_registration_happens_in_world_space(brain_slice):
    """Moving on a coarser, shifted grid of the same anatomy: the answer is the world identity."""
    grid = brain_slice.grid
    coarse = Grid(
        (64, 80),
        grid.world_from_voxel
        @ torch.tensor([[2.0, 0, 3.0], [0, 1.6, -5.0], [0, 0, 1]], dtype=torch.float64),
    )
    with torch.no_grad():
        data = sample_world(brain_slice.batch(), grid, coarse.world_points())[0]
    moving = Image(data, coarse)
    result = alignkit.register(brain_slice, moving, transform="affine", seed=0)
    mask = foreground(brain_slice)
    # the moving grid covers only part of the fixed field of view: compare where it has data
    inside = sample_world(torch.ones(1, 1, *coarse.shape), coarse, grid.world_points(), padding="zeros")[0, 0] > 0.99
    identity = ComposedTransform([MatrixTransform(torch.eye(3))])
    error = map_error(result, identity, mask & inside)
    assert error < 0.5, f"world identity missed by {error:.3f} mm"


def tiny_config() -> RegistrationConfig:
    return RegistrationConfig(
        stages=[
            StageConfig(transform="affine", similarity="ncc", levels=(4, 2), iterations=(30, 20)),
            StageConfig(
                transform="svf",
                similarity="lncc",
                regularizer="diffusion",
                regularizer_weight=0.5,
                levels=(2,),
                iterations=(20,),
                learning_rate=0.5,
            ),
        ]
    )


def test_seed_makes_cpu_runs_repeatable(brain_slice):
    moving = read_image(_r64())
    a = alignkit.register(brain_slice, moving, config=tiny_config(), seed=3)
    b = alignkit.register(brain_slice, moving, config=tiny_config(), seed=3)
    assert torch.equal(a.world_map(), b.world_map())


def test_metrics_are_computed_when_first_read(brain_slice, monkeypatch):
    from alignkit import registration as registration_module
    from alignkit.methods import api

    calls = []
    real = registration_module.compute_metrics

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "compute_metrics", counting)
    moving = read_image(_r64())
    result = alignkit.register(brain_slice, moving, config=tiny_config(), seed=0)
    assert calls == []  # register itself does not resample the images for its metrics
    metrics = result.metrics
    assert calls == [1]
    # the computed entries and those the run recorded, together; computed once
    assert metrics["ncc_after"] > metrics["ncc_before"]
    assert "stage_seconds" in metrics and metrics["seconds"] > 0
    assert result.metrics is metrics and calls == [1]
    # an assignment replaces everything, pending computation included
    fresh = alignkit.register(brain_slice, moving, config=tiny_config(), seed=0)
    fresh.metrics = {"mine": 1}
    assert fresh.metrics == {"mine": 1} and calls == [1]


def _r64():
    from conftest import data_path

    return data_path("brain2d", "r64slice.jpg")


def test_save_apply_and_flow_convention(brain_slice, tmp_path):
    moving = read_image(_r64())
    result = alignkit.register(brain_slice, moving, config=tiny_config(), seed=0)
    out = result.save(tmp_path / "out", moving_suffix=".png")
    names = {p.name for p in out.iterdir()}
    assert {"warped.png", "transform", "metrics.json", "qc.png", "flow.flo"} <= names
    assert not [n for n in names if n.startswith(".")], "temporary files left behind"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ncc_after"] > metrics["ncc_before"]

    # the saved transform, read back, reproduces the warped image
    from alignkit.registration import resample_image
    from alignkit.transforms.folder import load_transform

    transform, grid, manifest = load_transform(out / "transform")
    again = resample_image(transform, grid, moving)
    assert float((again.data - result.warped.data).abs().max()) < 1e-3 * float(moving.data.max()), float((again.data - result.warped.data).abs().max())
    assert manifest["files"] == {"linear": "affine.txt", "warp": "warp.nii.gz"}

    # result.flow(): fixed pixel p corresponds to the moving point at p + flow(p), written in pixels
    # of the fixed grid (the grids differ here: 128 px of 2.01 against 256 px of 1), (row, column)
    # order; flow.flo holds the same numbers as (x = column, y = row)
    assert not moving.grid.same_as(brain_slice.grid)
    flow = result.flow()
    assert flow.shape == (2, *brain_slice.shape) and flow.dtype == np.float32
    rows, cols = 60, 70
    moving_world = result.world_map()[0, :, rows, cols]
    as_fixed_voxel = (brain_slice.grid.voxel_from_world.float() @ torch.cat([moving_world, torch.ones(1)]))[:2]
    fixed_voxel = torch.tensor([rows, cols], dtype=torch.float32)
    np.testing.assert_allclose(flow[:, rows, cols], (as_fixed_voxel - fixed_voxel).numpy(), atol=1e-3)
    flo = read_flo(out / "flow.flo")
    np.testing.assert_allclose(flo[rows, cols], flow[::-1, rows, cols], atol=1e-6)
    np.testing.assert_array_equal(flow_from_xy(flo), flow)


def test_flow_means_one_thing_on_an_asymmetric_raster(tmp_path):
    """A known translation of a 24x37 raster, (dy, dx) = (2, -3): a loader's Case.flow (from a .flo
    file), a generator's Case.flow, Registration.flow() and the saved flow.flo all agree -- (2, -3) in
    array-axis order, (x, y) = (-3, 2) in the file -- and the scorer finds EPE 0 between them."""
    from PIL import Image as PILImage

    from alignkit.data.flow import MiddleburyDataset, StereoDataset
    from alignkit.data.synthetic import random_smooth_deformation
    from alignkit.evaluate.method import Prediction
    from alignkit.evaluate.scoring import score_case
    from alignkit.io.flo import write_flo
    from alignkit.registration import Registration

    shape, shift = (24, 37), np.array([2.0, -3.0], np.float32)  # (dy, dx)
    expected = np.broadcast_to(shift.reshape(2, 1, 1), (2, *shape))
    texture = (np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8)
    moving = texture[5:29, 5:42]
    fixed = texture[7:31, 2:39]  # fixed(r, c) = moving(r + 2, c - 3)
    assert np.array_equal(fixed[:22, 3:], moving[2:, :34])

    # Registration.flow() of the true map (world x = column, y = row on a raster), and flow.flo
    truth = MatrixTransform(torch.tensor([[1.0, 0.0, -3.0], [0.0, 1.0, 2.0], [0.0, 0.0, 1.0]]))
    reg = Registration(Image.from_array(fixed.astype(np.float32)), Image.from_array(moving.astype(np.float32)), truth)
    assert reg.flow().shape == (2, *shape) and reg.flow().dtype == np.float32
    np.testing.assert_allclose(reg.flow(), expected, atol=1e-5)
    warped = reg.warped.data[0].numpy()
    np.testing.assert_allclose(warped[:22, 3:], fixed[:22, 3:], atol=1e-3)  # fixed(p) = moving(p + flow(p))
    flo = read_flo(reg.save(tmp_path / "out", qc=False) / "flow.flo")
    assert flo.shape == (*shape, 2)
    np.testing.assert_allclose(flo, np.broadcast_to([-3.0, 2.0], (*shape, 2)), atol=1e-5)  # x, y
    np.testing.assert_array_equal(flow_from_xy(flo), reg.flow())
    np.testing.assert_array_equal(xy_from_flow(reg.flow()), flo)

    # a loader's Case.flow, read from a .flo file written in the file's (x, y) layout
    seq = tmp_path / "middlebury" / "seq"
    seq.mkdir(parents=True)
    PILImage.fromarray(fixed).save(seq / "frame10.png")
    PILImage.fromarray(moving).save(seq / "frame11.png")
    write_flo(seq / "flow10.flo", xy_from_flow(np.ascontiguousarray(expected)))
    case = MiddleburyDataset(tmp_path / "middlebury")["seq"]
    assert case.flow.shape == (2, *shape) and case.flow.dtype == np.float32
    np.testing.assert_array_equal(case.flow, expected)
    world = reg.world_map()[0].double().numpy()
    assert score_case(case, Prediction(world_map=world))["epe"] == pytest.approx(0.0, abs=1e-5)
    assert score_case(case, Prediction(world_map=case.fixed.grid.world_points()[0].double().numpy()))["epe"] == \
        pytest.approx(math.hypot(2.0, 3.0), abs=1e-5)

    # a stereo disparity d = 3 (left(x) = right(x - d)) is the flow (0, -3)
    stereo = tmp_path / "stereo" / "pair"
    stereo.mkdir(parents=True)
    PILImage.fromarray(fixed).save(stereo / "a_left.png")
    PILImage.fromarray(moving).save(stereo / "a_right.png")
    np.save(stereo / "a_disp.npy", np.full(shape, 3.0, np.float32))
    np.testing.assert_array_equal(StereoDataset(tmp_path / "stereo")["pair"].flow,
                                  np.broadcast_to(np.array([0.0, -3.0], np.float32).reshape(2, 1, 1), (2, *shape)))

    # a generator's Case.flow: a world translation (3, 3) on a grid whose x is minus the column and
    # y is 1.5 x the row is 2 rows and -3 columns
    grid = Grid.from_spacing(shape, (1.5, 1.0), direction=torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64))
    image = Image(torch.from_numpy(moving.astype(np.float32))[None], grid)
    synthetic = random_smooth_deformation(image, seed=0, translation=(3.0, 3.0), n_gaussians=0)
    np.testing.assert_allclose(synthetic.flow, expected, atol=1e-5)
    np.testing.assert_allclose(synthetic.fixed.data[0].numpy()[:22, 3:], fixed[:22, 3:], atol=1e-3)


def test_flow_of_a_3d_registration_is_in_voxels_of_the_fixed_grid():
    """Registration.flow() is 3D too: a world translation on an anisotropic volume whose world axes
    are a permutation of its array axes comes back in voxels, array-axis order."""
    from alignkit.registration import Registration

    direction = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    grid = Grid.from_spacing((5, 6, 7), (2.0, 1.0, 0.5), direction=direction)  # x = axis 2, z = axis 0
    image = Image(torch.rand(1, 5, 6, 7), grid)
    shift = torch.eye(4)
    shift[:3, 3] = torch.tensor([1.0, -3.0, 4.0])  # world (x, y, z)
    flow = Registration(image, image, MatrixTransform(shift)).flow()
    assert flow.shape == (3, 5, 6, 7) and flow.dtype == np.float32
    expected = np.array([4.0 / 2.0, -3.0 / 1.0, 1.0 / 0.5]).reshape(3, 1, 1, 1)  # (axis 0, 1, 2) in voxels
    np.testing.assert_allclose(flow, np.broadcast_to(expected, flow.shape), atol=1e-5)


def test_points_follow_the_map(brain_slice):
    moving = read_image(_r64())
    result = alignkit.register(brain_slice, moving, config=tiny_config(), seed=0)
    voxel = torch.tensor([[40.0, 50.0], [90.0, 64.0]])
    world = (brain_slice.grid.world_from_voxel.float() @ torch.cat([voxel, torch.ones(2, 1)], 1).t())[:2].t()
    mapped = result.apply_points(world)
    expected = result.world_map()[0][:, voxel[:, 0].long(), voxel[:, 1].long()].t()
    assert torch.allclose(mapped, expected, atol=1e-3)


@pytest.mark.parametrize("bad", ["nan", "constant"])
def test_unusable_images_raise_input_error(brain_slice, bad):
    data = brain_slice.data.clone()
    if bad == "nan":
        data[0, 3, 3] = float("nan")
    else:
        data[:] = 1.0
    with pytest.raises(alignkit.InputError, match="NaN|constant"):
        alignkit.register(brain_slice, Image(data, brain_slice.grid, path="bad.png"), config=tiny_config())


def test_unknown_options_raise_config_error(brain_slice):
    with pytest.raises(alignkit.ConfigError, match="unknown preset"):
        alignkit.register(brain_slice, brain_slice, preset="nope")
    with pytest.raises(alignkit.ConfigError, match="unknown transform"):
        alignkit.register(brain_slice, brain_slice, transform="affine,warpy")
    with pytest.raises(alignkit.ConfigError, match="homography is a 2D model"):
        volume = Image(torch.rand(1, 8, 8, 8), Grid.from_spacing((8, 8, 8)))
        alignkit.register(volume, volume, transform="homography")


def test_recovers_known_affine_in_3d():
    """A real 3D brain (OASIS subject01, downsampled to 4 mm) and a known affine."""
    from conftest import data_path

    from alignkit.spatial import downsample

    image = read_image(data_path("brain3d-oasis-trt20", "subject01", "t1weighted_brain.nii.gz"))
    data, grid = downsample(image.batch(), image.grid, 4)
    small = Image(data[0], grid)
    truth = random_true_transform(grid, torch.Generator().manual_seed(4), displacement_mm=0.0).stages[0]
    fixed = warp_real(small, truth)
    result = alignkit.register(fixed, small, transform="affine", seed=0)
    mask = fixed.data[0] > 0.1 * fixed.data.max()
    error = map_error(result, truth, mask)
    assert error < 1.0, f"3D affine recovered with mean error {error:.3f} mm (voxels are 4 mm)"


def test_sampled_metric_recovers_a_known_affine_across_contrasts(brain_slice):
    """ITK-style metric sampling: a linear MI stage on 3000 of the ~65k pixels (and only those warped)
    still recovers a known affine when the moving image's contrast is inverted; the run is seeded."""
    truth = random_true_transform(brain_slice.grid, torch.Generator().manual_seed(1), displacement_mm=0.0).stages[0]
    fixed = warp_real(brain_slice, truth)
    inverted = Image(brain_slice.data.max() - brain_slice.data, brain_slice.grid)
    stage = StageConfig(
        transform="affine", similarity="mi", levels=(4, 2, 1), iterations=(100, 60, 30), sample_points=3000
    )
    config = RegistrationConfig(stages=[stage], init="center")
    result = alignkit.register(fixed, inverted, config=config, seed=0)
    error = map_error(result, truth, foreground(fixed))
    assert error < 0.5, f"sampled MI affine: mean map error {error:.3f} px"
    again = alignkit.register(fixed, inverted, config=config, seed=0)
    assert torch.equal(again.world_map(), result.world_map())
    with pytest.raises(alignkit.ConfigError, match="sample_points"):
        StageConfig(transform="svf", similarity="mi", sample_points=100)
    with pytest.raises(alignkit.ConfigError, match="sample_points"):
        StageConfig(transform="affine", similarity="lncc", sample_points=100)


def test_landmark_prompt_pulls_the_solution(brain_slice):
    """Test-time prompt (003): with a landmark weight, points the images do not support still move."""
    config = RegistrationConfig(
        stages=[StageConfig(transform="translation", similarity="ncc", levels=(4, 2), iterations=(80, 40))],
        landmark_weight=50.0,
        init="none",
    )
    fixed_points = torch.tensor([[100.0, 120.0], [150.0, 90.0]])
    moving_points = fixed_points + torch.tensor([6.0, -4.0])
    result = alignkit.register(
        brain_slice, brain_slice, config=config, fixed_landmarks=fixed_points, moving_landmarks=moving_points
    )
    assert result.metrics["tre_before"]["mean"] == pytest.approx(float(np.hypot(6, 4)), abs=1e-4)
    assert result.metrics["tre"]["mean"] < 0.5 * result.metrics["tre_before"]["mean"]


@pytest.mark.parametrize("optimizer, learning_rate", [("sgd", 2e-3), ("lbfgs", 1.0)])
def test_other_optimisers_recover_a_known_affine(brain_slice, optimizer, learning_rate):
    truth = random_true_transform(brain_slice.grid, torch.Generator().manual_seed(1), displacement_mm=0.0).stages[0]
    fixed = warp_real(brain_slice, truth)
    config = RegistrationConfig(
        stages=[
            StageConfig(
                transform="affine",
                similarity="ncc",
                levels=(4, 2, 1),
                iterations=(60, 40, 20),
                optimizer=optimizer,
                learning_rate=learning_rate,
            )
        ]
    )
    result = alignkit.register(fixed, brain_slice, config=config, seed=0)
    error = map_error(result, truth, foreground(fixed))
    assert error < 0.5, f"{optimizer}: mean map error {error:.3f} mm"


def test_feature_init_recovers_wide_baseline_homography() -> None:
    """A 100° rotation with 1.6x zoom and perspective is out of reach of intensity optimisation from the
    centres; SIFT matches + MAGSAC put the photo preset's solver on it (OpenCV installed only)."""
    pytest.importorskip("cv2")
    skdata = pytest.importorskip("skimage.data")
    import math

    from alignkit.data.case import Case
    from alignkit.evaluate.method import Prediction
    from alignkit.evaluate.scoring import score_case
    from alignkit.image import Image
    from alignkit.solve.engine import normalize_intensity
    from alignkit.solve.features import feature_matrix
    from alignkit.spatial import Grid, sample_world

    moving = Image.from_array(skdata.camera()[::2, ::2].astype(np.float32) / 255.0)
    h, w = moving.shape
    c, s = math.cos(math.radians(100)), math.sin(math.radians(100))
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    linear = 1.0 / 1.6 * np.array([[c, -s], [s, c]])
    truth = np.eye(3)
    truth[:2, :2] = linear
    truth[:2, 2] = centre - linear @ centre
    truth[2, :2] = [2e-4, -1e-4]  # perspective
    grid = Grid.raster_2d((h, w))
    pts = grid.world_points(dtype=torch.float64)
    hom = torch.einsum("ij,bjhw->bihw", torch.as_tensor(truth), torch.cat([pts, torch.ones_like(pts[:, :1])], 1))
    fixed_data = sample_world(moving.batch(dtype=torch.float64), moving.grid, hom[:, :2] / hom[:, 2:])
    fixed = Image(fixed_data[0].float(), grid)
    case = Case("camera", fixed, moving, kind="homography", matrix=truth)

    matrix, stats = feature_matrix(normalize_intensity(fixed.batch()), grid, normalize_intensity(moving.batch()), grid)
    assert stats["inliers"] >= 12
    assert stats["model"] == 0.0 and stats["simpler_preferred"] == 0.0  # real perspective: a homography
    assert score_case(case, Prediction(matrix=matrix.numpy()))["corner_error"] < 1.5
    result = alignkit.register(fixed, moving, preset="photo", quiet=True)
    scores = score_case(case, Prediction(world_map=result.world_map()[0].numpy()))
    assert scores["corner_error_before"] > 40
    assert scores["corner_error"] < 1.0
    # without the feature start the same solver stays far away
    from alignkit.solve.presets import get_preset

    config = get_preset("photo")
    config.init = "center"
    far = alignkit.register(fixed, moving, config=config, quiet=True)
    assert score_case(case, Prediction(world_map=far.world_map()[0].numpy()))["corner_error"] > 5.0


def test_refinement_that_leaves_the_keypoint_matches_is_dropped() -> None:
    """A refinement that agrees with the SIFT inliers is kept; one that moves them (here: a 15 px shift
    appended to the refined chain, standing in for NCC pulled off by inverted contrast, as between
    visible and near-infrared photographs) is dropped in favour of the feature fit."""
    pytest.importorskip("cv2")
    skdata = pytest.importorskip("skimage.data")
    from alignkit.solve.engine import Engine
    from alignkit.solve.presets import get_preset

    moving = Image.from_array(skdata.camera()[::2, ::2].astype(np.float32) / 255.0)
    fixed_data = moving.data.clone()
    engine = Engine(get_preset("photo"), device="cpu", seed=0, progress=None)
    chain = engine.run(Image(fixed_data, moving.grid), moving)
    info = engine.init_info
    assert info["init"] == "features"
    assert info["inlier_median_px_refined"] < 1.0  # identical images: refinement agrees
    assert "refinement_dropped" not in info
    assert len(chain.stage_list()) == len(get_preset("photo").stages) + 1

    # a refinement that wanders off: force one by making the solver optimise a shifted target
    from alignkit.solve import engine as engine_module

    class Shifted(engine_module.Engine):
        def _fit_stage(self, cfg, *args, **kwargs):  # type: ignore[no-untyped-def]
            shift = MatrixTransform(torch.tensor([[1.0, 0.0, 12.0], [0.0, 1.0, -9.0], [0.0, 0.0, 1.0]]))
            return ComposedTransform([super()._fit_stage(cfg, *args, **kwargs), shift])

    shifted = Shifted(get_preset("photo"), device="cpu", seed=0, progress=None)
    chain = shifted.run(Image(fixed_data, moving.grid), moving)
    assert shifted.init_info["refinement_dropped"] == 1.0
    for check in shifted.stage_checks:
        assert not check["kept"] and check["inlier_median_px_end"] > 10.0
        assert "keypoint inliers" in check["reason"]
    assert shifted.init_info["inlier_median_px_refined"] < 1.0  # the feature fit is what is returned
    assert len(chain.stage_list()) == 1


def test_pyramid_levels_are_capped_on_small_images() -> None:
    from alignkit.solve.engine import MIN_LEVEL_SIZE, level_factor

    assert level_factor(8, (256, 256, 160)) == 8.0
    assert level_factor(8, (44, 59, 41)) == pytest.approx(41 / MIN_LEVEL_SIZE)
    assert level_factor(4, (10, 12)) == 1.0
    # a voxel budget raises fine levels only: a 9M-voxel head keeps its coarse levels and gets a
    # finest level of at most 2M voxels; a small volume is untouched
    head = (188, 256, 190)
    assert level_factor(4, head, 1 << 21) == 4.0
    fine = level_factor(1, head, 1 << 21)
    assert fine > 1.0 and math.prod(round(s / fine) for s in head) <= (1 << 21) * 1.01
    assert level_factor(1, (44, 59, 41), 1 << 21) == 1.0
