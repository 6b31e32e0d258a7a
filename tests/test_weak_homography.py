"""weak-homography (Dong et al., "Learning to Align Images using Weak Geometric Supervision"): the patch
sampler, the keypoint warp, the loss, the parameterisation, recovery of known homographies on real
images, the never-worse rule, the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import alignkit
from alignkit.errors import ConfigError
from alignkit.image import Image
from alignkit.methods.patches import Keypoints, contrastive_loss, sample_patches, warp_keypoints
from alignkit.methods.weak_homography import ConditionedHomography
from alignkit.metrics.homography import corner_error
from alignkit.spatial.grid import Grid
from tests.conftest import data_path


def _photo(size: int = 256) -> np.ndarray:
    """A real photograph (scikit-image's astronaut), RGB uint8, cropped to ``size`` square."""
    from skimage import data

    image = data.astronaut()
    return np.ascontiguousarray(image[40 : 40 + size, 150 : 150 + size])


def _warp(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``moving(matrix @ x) = image(x)``: the pair (image, moving) is related by ``matrix`` (fixed pixel
    to moving pixel), alignkit's direction."""
    import cv2

    return cv2.warpPerspective(image, matrix, (image.shape[1], image.shape[0]), flags=cv2.INTER_LINEAR)


def test_patch_gradient_wrt_homography_matches_finite_differences():
    generator = torch.Generator().manual_seed(1)
    # a smooth real-valued image, so that bilinear interpolation is differentiable almost everywhere
    y, x = torch.meshgrid(torch.arange(40.0), torch.arange(48.0), indexing="ij")
    image = (torch.sin(x / 5.0) * torch.cos(y / 7.0) + 0.01 * x).double()[None, None]
    keypoints = Keypoints(
        torch.tensor([[20.3, 17.6], [24.1, 22.9], [15.5, 19.2]], dtype=torch.float64),
        torch.rand(3, generator=generator, dtype=torch.float64) * 6.0 - 3.0,
        torch.tensor([0.8, 1.1, 1.3], dtype=torch.float64),
    )
    base = torch.tensor([[1.01, 0.02, 0.4], [-0.03, 0.99, -0.3], [1e-4, -2e-4, 1.0]], dtype=torch.float64)

    def patches(entries: torch.Tensor) -> torch.Tensor:
        matrix = torch.cat([entries, entries.new_ones(1)]).reshape(3, 3)
        return sample_patches(image, warp_keypoints(matrix, keypoints), 8)

    entries = base.flatten()[:8].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(patches, (entries,), eps=1e-7, atol=1e-5, rtol=1e-3)


def test_patch_sampler_conventions():
    """A patch at orientation 0 and scale 1 is the image block around the centre; orientation pi/2
    turns it (row r of the patch runs along -x)."""
    image = torch.arange(30 * 40, dtype=torch.float64).reshape(1, 1, 30, 40)
    keypoints = Keypoints(torch.tensor([[20.5, 10.5]], dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                          torch.ones(1, dtype=torch.float64))
    patch = sample_patches(image, keypoints, 4)[0, 0]
    assert torch.allclose(patch, image[0, 0, 9:13, 19:23])
    turned = sample_patches(image, Keypoints(keypoints.xy, torch.full((1,), math.pi / 2, dtype=torch.float64),
                                             keypoints.scale), 4)[0, 0]
    # turned[r, c] samples (x, y) = centre + (-u_y, u_x): block[c, 3 - r], numpy's rot90
    assert torch.allclose(turned, torch.rot90(patch, 1), atol=1e-9)


def test_keypoint_warp_follows_a_similarity():
    """Under a rotation by a and scaling by s, orientations turn by a and scales grow by s (eqs. 10-12)."""
    angle, scale = 0.3, 1.7
    matrix = torch.tensor([[scale * math.cos(angle), -scale * math.sin(angle), 5.0],
                           [scale * math.sin(angle), scale * math.cos(angle), -2.0], [0.0, 0.0, 1.0]],
                          dtype=torch.float64)
    keypoints = Keypoints(torch.tensor([[3.0, 4.0], [10.0, -2.0]], dtype=torch.float64),
                          torch.tensor([0.1, -2.0], dtype=torch.float64), torch.tensor([1.0, 2.5], dtype=torch.float64))
    warped = warp_keypoints(matrix, keypoints)
    turned = torch.remainder(warped.orientation - keypoints.orientation - angle + math.pi, 2 * math.pi) - math.pi
    assert torch.allclose(turned, torch.zeros(2, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(warped.scale, keypoints.scale * scale)
    assert torch.allclose(warped.xy, keypoints.xy @ matrix[:2, :2].T + matrix[:2, 2])


def test_contrastive_loss_zero_when_separated_and_positive_otherwise():
    a = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    far = -a  # squared distance 4 >= margin 1
    loss, parts = contrastive_loss(a, a.clone(), a, far, margin=1.0)
    assert float(loss) == 0.0 and float(parts["positive"]) == 0.0 and float(parts["negative"]) == 0.0
    loss, parts = contrastive_loss(a, far, a, a.clone(), margin=1.0)
    assert float(parts["positive"]) == pytest.approx(4.0, rel=1e-5)
    assert float(parts["negative"]) == pytest.approx(1.0, rel=1e-5)
    # a positive pair whose correspondence left the image counts as the largest distance, 4
    flags = torch.tensor([True] * 6 + [False] * 2)
    loss, parts = contrastive_loss(a, a.clone(), a, far, positive_inside=flags)
    assert float(loss) == pytest.approx(4.0 * 2 / 8)


def test_conditioned_homography_round_trip_and_identity():
    grid = Grid.raster_2d((300, 400))
    frame = ConditionedHomography.frame_of(grid, 0.5)  # the method's default frame_scale
    assert torch.allclose(ConditionedHomography(frame, torch.eye(3, dtype=torch.float64)).theta,
                          torch.zeros(8, dtype=torch.float64))
    start = torch.tensor([[1.05, 0.1, 12.0], [-0.08, 0.97, -7.0], [3e-5, -1e-5, 1.0]], dtype=torch.float64)
    model = ConditionedHomography(frame, start)
    assert torch.allclose(model.world().detach(), start, atol=1e-12)
    # scale-normalised: a translation by 1 % of the half-width is 0.01 in theta
    shift = torch.eye(3, dtype=torch.float64)
    shift[0, 2] = 0.01 * 399 / 2
    assert float(ConditionedHomography(frame, shift).theta[2].detach()) == pytest.approx(0.01)


def test_recovers_a_known_homography_on_a_real_photograph():
    """One level, from the identity: about 5 px of shift, rotation and perspective at the corners."""
    fixed = _photo(160)
    truth = np.array([[1.01, 0.02, 3.0], [-0.02, 1.0, 2.0], [5e-5, -3e-5, 1.0]])
    moving = _warp(fixed, truth)
    assert corner_error(np.eye(3), truth, 160, 160) > 4.0
    result = alignkit.register(Image.from_array(fixed), Image.from_array(moving), method="weak-homography",
                               start="identity", keypoints=400, iterations=150, coarsest=160, seed=0)
    estimate = result.transform.matrix().detach().double().numpy()
    assert corner_error(estimate, truth, 160, 160) < 1.0
    assert result.metrics["start"] == "identity" and result.metrics["levels"][0]["kept"] != "start"


@pytest.mark.slow
def test_recovers_a_known_homography_coarse_to_fine():
    """Two levels, from the identity, 11 px at the corners of a 256 px photograph."""
    fixed = _photo(256)
    truth = np.array([[1.02, 0.04, 6.0], [-0.03, 0.99, 4.0], [4e-5, -2e-5, 1.0]])
    moving = _warp(fixed, truth)
    assert corner_error(np.eye(3), truth, 256, 256) > 8.0
    result = alignkit.register(Image.from_array(fixed), Image.from_array(moving), method="weak-homography",
                               start="identity", keypoints=600, iterations=[120, 160], coarsest=128, seed=0)
    estimate = result.transform.matrix().detach().double().numpy()
    assert corner_error(estimate, truth, 256, 256) < 1.0
    assert len(result.metrics["levels"]) == 2


def test_never_worse_than_the_start():
    """A homography step so large that the optimisation runs away: every level keeps the start, and
    the result is the start (here the truth) itself."""
    fixed = _photo(128)
    truth = np.array([[1.0, 0.02, 3.0], [-0.02, 1.0, 2.0], [0.0, 0.0, 1.0]])
    moving = _warp(fixed, truth)
    result = alignkit.register(Image.from_array(fixed), Image.from_array(moving), method="weak-homography",
                               initial=truth, keypoints=200, iterations=40, homography_learning_rate=1e6,
                               homography_max_step=200.0, warmup=0.0, coarsest=128, seed=0)
    levels = result.metrics["levels"]
    assert all(level["held_out_loss"]["start"] < level["held_out_loss"]["last"] for level in levels)
    assert all(level["kept"] == "start" for level in levels)
    assert np.allclose(result.transform.matrix().detach().double().numpy(), truth, atol=1e-9)


def test_iteration_counts_of_skipped_levels_are_dropped():
    """Counts are given for the whole pyramid; a trusted SIFT+MAGSAC start runs only the finest level,
    with the finest count (a harvest recipe's counts must fit pairs of either start)."""
    fixed = _photo(256)
    moving = _warp(fixed, np.array([[1.0, 0.01, 2.0], [-0.01, 1.0, 1.0], [0.0, 0.0, 1.0]]))
    result = alignkit.register(Image.from_array(fixed), Image.from_array(moving), method="weak-homography",
                               keypoints=128, iterations=[3, 7], coarsest=128, seed=0)
    assert result.metrics["start"] == "features"
    assert [level["iterations"] for level in result.metrics["levels"]] == [7]
    assert "kept_learnt" in result.metrics["inlier_check"]  # in metrics.json, not only the manifest
    assert result.transform.kind == "homography"
    affine = alignkit.register(Image.from_array(fixed), Image.from_array(moving), method="weak-homography",
                               keypoints=128, iterations=2, coarsest=128, seed=0, model="affine")
    assert affine.transform.kind == "affine"


def test_siamese_grey_and_bad_options():
    fixed = _photo(128)
    moving = _warp(fixed, np.array([[1.0, 0.0, 1.5], [0.0, 1.0, -1.0], [0.0, 0.0, 1.0]]))
    result = alignkit.register(Image.from_array(fixed), Image.from_array(moving[..., 0]), method="weak-homography",
                               network="siamese", colour="grey", start="identity", keypoints=128, iterations=5,
                               coarsest=128)
    assert result.description["network"] == "siamese"
    with pytest.raises(ConfigError, match="network"):
        alignkit.register(fixed, moving, method="weak-homography", network="triplet")
    with pytest.raises(ConfigError, match="takes no option"):
        alignkit.register(fixed, moving, method="weak-homography", sigma=3)


def test_cli_register_and_bad_option(tmp_path, capsys):
    import imageio.v3 as iio

    from alignkit.cli import main

    fixed = _photo(128)
    moving = _warp(fixed, np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]))
    iio.imwrite(tmp_path / "a.png", fixed)
    iio.imwrite(tmp_path / "b.png", moving)
    out = tmp_path / "out"
    code = main(["register", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--method", "weak-homography", "-o",
                 str(out), "--quiet", "--seed", "3", "--option", "iterations=10", "--option", "keypoints=128",
                 "--option", "coarsest=128"])
    assert code == 0, capsys.readouterr().err
    assert any(out.iterdir())
    code = main(["register", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--method", "weak-homography", "-o",
                 str(tmp_path / "bad"), "--quiet", "--option", "network=\"triplet\""])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_recovers_a_vis_nir_pair_at_a_known_perturbation():
    """A VIS <-> NIR pair (vis-nir/field), started 1 % of the image size off its true affine (7.7 px at the
    corners) by a given ``initial`` (the paper's protocol: no SIFT or MI start), with the learnt objective
    alone: under 1 px (the issue's target) given the budget precision needs -- the finest level only,
    1500 iterations (measured 0.37 px in 52 s, one thread). The default budget (three levels, 250
    iterations at the finest, for speed) ended at 3.86 px here. The budget was chosen on this pair; on
    four others at the same perturbation (forest/0003, indoor/0002, mountain/0002, field/0006) it gave
    0.49 / 0.83 / 0.59 / 1.25 px against the default's 0.41 / 1.15 / 3.60 / 1.88 (session 11)."""
    data_path("vis-nir", "field")
    from alignkit.data.datasets import load_dataset

    case = load_dataset("vis-nir", root=data_path())["field/0007"]
    rows, cols = case.fixed.shape[-2:]
    shift = np.eye(3)
    shift[0, 2], shift[1, 2] = 0.01 * cols * 0.6, 0.01 * rows * 0.8
    start = case.matrix @ shift
    assert corner_error(start, case.matrix, cols, rows) > 5.0
    result = alignkit.register(case.fixed, case.moving, method="weak-homography", initial=start, model="affine",
                               coarsest=1024, iterations=1500, seed=0)
    assert result.metrics["start"] == "initial" and len(result.metrics["levels"]) == 1
    estimate = result.transform.matrix().detach().double().numpy()
    assert corner_error(estimate, case.matrix, cols, rows) < 1.0


def _shifted_vis_nir(name: str, fraction: float) -> tuple:
    """A vis-nir test pair whose RGB image is resampled onto the NIR frame through its true affine composed
    with a shift of ``fraction`` x the image size (direction (0.6, 0.8)): (fixed, moving, truth, cols,
    rows); the pair then differs by the shift alone (moving'(x) = moving(H T x), so the truth is T^-1)."""
    import cv2

    data_path("vis-nir", name.split("/")[0])
    from alignkit.data.datasets import load_dataset

    case = load_dataset("vis-nir", root=data_path())[name]
    rows, cols = case.fixed.shape[-2:]
    shift = np.eye(3)
    shift[0, 2], shift[1, 2] = fraction * cols * 0.6, fraction * rows * 0.8
    moving = case.moving.data.permute(1, 2, 0).numpy().astype(np.float32)
    resampled = cv2.warpPerspective(moving, case.matrix @ shift, (cols, rows),
                                    flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    return case.fixed, Image.from_array(resampled), np.linalg.inv(shift), cols, rows


@pytest.mark.slow
def test_recovers_a_vis_nir_pair_at_a_known_perturbation_from_its_default_start():
    """The same pair as users run the method: the moving image resampled 5 % of the image size (41 px at
    the corners) off its true affine, default options (SIFT+MAGSAC start when trusted, one learnt
    level, the inlier test): under 1 px (measured 0.51 px -- the SIFT start itself: the learnt level kept
    its start by the held-out loss; the learnt objective's own precision is the test above)."""
    fixed, moving, truth, cols, rows = _shifted_vis_nir("field/0007", 0.05)
    assert corner_error(np.eye(3), truth, cols, rows) > 40.0
    result = alignkit.register(fixed, moving, method="weak-homography", seed=0)
    assert result.metrics["start"] == "features"
    assert corner_error(result.transform.matrix().detach().double().numpy(), truth, cols, rows) < 1.0


def test_the_start_inliers_rule_out_a_learnt_matrix_they_contradict():
    from alignkit.methods.weak_homography import WeakHomography
    from alignkit.solve.features import FeatureFit

    rng = np.random.default_rng(0)
    fixed_points = torch.from_numpy(rng.uniform(0, 200, size=(60, 2)))
    start = torch.tensor([[1.0, 0.02, 3.0], [-0.01, 1.0, -2.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    moving_points = fixed_points @ start[:2, :2].T + start[:2, 2] + torch.from_numpy(rng.normal(0, 0.5, (60, 2)))
    fit = FeatureFit(matrix=start, stats={"inliers": 60.0, "noise_px": 0.5}, fixed_points=fixed_points,
                     moving_points=moving_points)
    grid = Grid.from_spacing((200, 200))
    near = start.clone()
    near[0, 2] += 0.05  # within the matches' noise: the learnt matrix stays
    record: dict = {}
    assert torch.equal(WeakHomography._check_inliers(fit, start, near, grid, record), near)
    assert record["inlier_check"]["kept_learnt"] and record["inlier_check"]["chi2_rise"] < 26.12
    far = start.clone()
    far[0, 2] += 2.0  # 4 noise sigmas at every inlier: ruled out, the start comes back
    assert torch.equal(WeakHomography._check_inliers(fit, start, far, grid, record), start)
    assert not record["inlier_check"]["kept_learnt"]
    assert record["inlier_check"]["inlier_median_px_learnt"] > record["inlier_check"]["inlier_median_px_start"] + 1


def test_affine_model_keeps_the_perspective_at_zero_and_evaluate_asks_for_it_on_affine_cases():
    from alignkit.data.case import Case
    from alignkit.evaluate.registered import RegisteredMethod

    grid = Grid.from_spacing((64, 80))
    start = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0], [1e-4, 2e-4, 1.0]], dtype=torch.float64)
    model = ConditionedHomography(ConditionedHomography.frame_of(grid, 0.5), start, affine=True)
    model.world().sum().backward()
    assert torch.equal(model.theta[6:].detach(), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(model.theta.grad[6:], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(model.world()[2, :2].detach(), torch.zeros(2, dtype=torch.float64))
    method = RegisteredMethod("weak-homography")
    image = Image.from_array(np.zeros((16, 16), np.float32))
    affine_case = Case(name="a", fixed=image, moving=image, kind="affine")
    homography_case = Case(name="h", fixed=image, moving=image, kind="homography")
    assert method.register_options(affine_case) == {"model": "affine"}
    assert method.register_options(homography_case) == {}
    assert RegisteredMethod("weak-homography", model="homography").register_options(affine_case) == {"model": "homography"}


def test_falls_back_to_the_mutual_information_start_when_sift_is_not_trusted():
    """No SIFT fit is trusted (``min_inliers`` out of reach): the start is the engine's MI similarity +
    affine chain, from which only the finest level runs; on a contrast-inverted photograph shifted 16 px
    (beyond what the learnt objective recovers from the identity at this size) the result is within 1 px.
    ``fallback="identity"`` keeps the paper's identity start."""
    fixed = _photo(160)
    truth = np.array([[1.0, 0.0, 12.0], [0.0, 1.0, -10.0], [0.0, 0.0, 1.0]])
    moving = 255 - _warp(fixed, truth)  # another "modality": inverted intensities
    assert corner_error(np.eye(3), truth, 160, 160) > 15.0
    options = {"method": "weak-homography", "keypoints": 256, "iterations": [5, 30], "coarsest": 80,
               "min_inliers": 10**6, "model": "affine", "seed": 0}
    result = alignkit.register(Image.from_array(fixed), Image.from_array(moving), **options)
    assert result.metrics["start"] == "mi" and len(result.metrics["levels"]) == 1
    assert {"mi_start", "mi_learnt", "kept_learnt"} <= set(result.metrics["mi_check"])
    assert corner_error(result.transform.matrix().detach().double().numpy(), truth, 160, 160) < 1.0
    plain = alignkit.register(Image.from_array(fixed), Image.from_array(moving), fallback="identity",
                              **(options | {"iterations": [1, 1]}))
    assert plain.metrics["start"] == "identity" and len(plain.metrics["levels"]) == 2
    with pytest.raises(ConfigError, match="fallback"):
        alignkit.register(Image.from_array(fixed), Image.from_array(moving), fallback="sift", **options)


def test_the_mutual_information_of_an_mi_start_rules_out_a_learnt_matrix_with_less():
    from alignkit.methods.weak_homography import WeakHomography
    from alignkit.registration import Inputs

    fixed = _photo(128)
    truth = np.array([[1.0, 0.0, 6.0], [0.0, 1.0, -4.0], [0.0, 0.0, 1.0]])
    inputs = Inputs(Image.from_array(fixed), Image.from_array(255 - _warp(fixed, truth)))
    right, wrong = torch.from_numpy(truth), torch.from_numpy(truth @ np.array([[1, 0, 3.0], [0, 1, 2.0], [0, 0, 1]]))
    record: dict = {}
    assert torch.equal(WeakHomography._check_mi(inputs, wrong, right, record), right)
    assert record["mi_check"]["kept_learnt"] and record["mi_check"]["mi_learnt"] > record["mi_check"]["mi_start"]
    assert torch.equal(WeakHomography._check_mi(inputs, right, wrong, record), right)
    assert not record["mi_check"]["kept_learnt"]


@pytest.mark.slow
def test_a_vis_nir_pair_sift_does_not_trust_starts_from_mutual_information():
    """vis-nir/field/0002 (SIFT+MAGSAC finds 5-9 inliers, under ``min_inliers``) resampled 10 % of the image
    size off its true affine: default options take the MI start and end within the benchmark's 3 px success
    threshold (measured 2.06 px in this direction, 1.04 px in part c's); with the identity fallback it
    ended 27 px off at that shift (session 10, part c)."""
    fixed, moving, truth, cols, rows = _shifted_vis_nir("field/0002", 0.1)
    assert corner_error(np.eye(3), truth, cols, rows) > 80.0
    result = alignkit.register(fixed, moving, method="weak-homography", model="affine", seed=0)
    assert result.metrics["start"] == "mi"
    assert corner_error(result.transform.matrix().detach().double().numpy(), truth, cols, rows) < 3.0
