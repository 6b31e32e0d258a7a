"""stereo-net (issue 16): the MC-CNN-style learned matching cost in the SGM pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import alignkit
from alignkit.data.synthetic_stereo import render_stereo_pair
from alignkit.image import Image
from alignkit.metrics import disparity_errors
from alignkit.nets import build_network


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny stereo-net trained briefly on synthetic layered pairs (one thread: repeatable)."""
    pytest.importorskip("skimage")
    from alignkit.methods import train_method

    out = tmp_path_factory.mktemp("stereo-net")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train_method({"method": "stereo-net", "size": [40, 56], "epochs": 2, "synthetic_length": 16,
                               "batch_size": 4, "lr": 2e-3, "network": {"features": 16},
                               "method_options": {"max_disparity": 12, "samples": 256}, "quiet": True,
                               "device": "cpu"}, out)
    finally:
        torch.set_num_threads(threads)
    return out, result


def test_briefly_trained_cost_lowers_bad2_on_held_out_synthetic_pairs(tiny_run):
    _, result = tiny_run
    first, last = result.history[0], result.history[-1]
    # validation pairs are rendered from another seed stream than the training pairs
    assert last["val_bad2"] < 0.6 * first["val_bad2"], (first, last)
    assert last["val_loss"] < first["val_loss"]


def test_stereo_net_registers_a_pair_through_the_api(tiny_run):
    run, _ = tiny_run
    from alignkit.data.synthetic_stereo import training_photographs

    pair = render_stereo_pair(training_photographs()[2], (64, 96), rng=np.random.default_rng(11), max_disparity=12)
    left, right = (Image.from_array(a.transpose(1, 2, 0)) for a in (pair.left, pair.right))
    registration = alignkit.register(left, right, method="stereo-net", checkpoint=run, max_disparity=12)
    assert registration.stages == ["disparity"] and registration.is_stereo
    disparity, occluded = registration.disparity()
    assert occluded is not None and disparity.shape == pair.disparity.shape
    errors = disparity_errors(disparity, pair.disparity, mask=~pair.occluded)
    assert errors["bad2"] < 0.5, errors  # a 2-epoch net: far from good, far from chance (~0.85)
    with pytest.raises(alignkit.InputError, match="one size"):
        alignkit.register(left, Image.from_array(pair.right[:, :, :90].transpose(1, 2, 0)), method="stereo-net",
                          checkpoint=run)


def test_feature_cost_volume_is_one_minus_cosine_over_two():
    features = build_network({"name": "mccnn_fast", "features": 8, "layers": 2})
    image = torch.rand(1, 1, 12, 20)
    shifted = torch.roll(image, shifts=-3, dims=3)  # right(x - 3) = left(x): disparity 3
    with torch.no_grad():
        left, right = features(image), features(shifted)
        volume = features.cost_volume(left, right, np.arange(0, 6))
    assert volume.shape == (6, 12, 20)
    assert bool((volume[:, :, :0] == 1).all()) and bool((volume[5, :, :5] == 1).all())  # outside the right image
    inner = volume[:, 2:-2, 8:-5]  # away from the padded border and the roll's wrap-around
    assert float(inner[3].abs().max()) < 1e-5 and bool((inner.argmin(0) == 3).float().mean() > 0.95)
    assert float(volume.min()) >= -1e-6 and float(volume.max()) <= 1 + 1e-6


def test_the_shipped_model_runs_without_a_checkpoint(tmp_path):
    from alignkit.cli import main
    from alignkit.methods.shipped import MAX_BYTES, get_shipped, shipped_for

    shipped = get_shipped("stereo_net_synthetic2d")
    assert shipped.available(), "the shipped model file is missing (benchmarks/ship_stereo_net.py writes it)"
    assert shipped.path().stat().st_size <= MAX_BYTES and shipped_for("stereo-net", 2) == shipped
    card = shipped.card()
    assert card["method"] == "stereo-net" and shipped.recipe()["method"] == "stereo-net"
    assert card["scores"]["aloe"]["role"] == "held out"
    from PIL import Image as PILImage

    from alignkit.data.synthetic_stereo import training_photographs

    pair = render_stereo_pair(training_photographs()[3], (72, 104), rng=np.random.default_rng(5), max_disparity=14)
    left, right = tmp_path / "l.png", tmp_path / "r.png"
    for path, array in ((left, pair.left), (right, pair.right)):
        PILImage.fromarray(np.clip(array.transpose(1, 2, 0), 0, 255).astype(np.uint8)).save(path)
    assert main(["register", str(left), str(right), "--method", "stereo-net", "--max-disparity", "14", "-o",
                 str(tmp_path / "out"), "--quiet"]) == 0
    from alignkit.io import read_pfm

    disparity = read_pfm(tmp_path / "out" / "disparity.pfm")
    errors = disparity_errors(disparity, pair.disparity, mask=~pair.occluded)
    assert errors["bad2"] < 0.25, errors


def _shifted_pair_features(shift: int, channels: int = 6, height: int = 10, width: int = 40):
    """Unit features of a left image and of a right image with ``right(x - shift) = left(x)``."""
    torch.manual_seed(0)
    left = torch.nn.functional.normalize(torch.randn(1, channels, height, width), dim=1)
    right = torch.roll(left, shifts=-shift, dims=3)
    return left, right


def _stereo_net(**options):
    from alignkit.methods.learned import build_model

    return build_model("stereo-net", ndim=2, size=[10, 40], network={"features": 6, "layers": 1}, **options)


@pytest.mark.parametrize("objective", ["hinge", "softmax"])
def test_the_training_loss_prefers_the_true_disparity(objective):
    model = _stereo_net(objective=objective, samples=512)
    left, right = _shifted_pair_features(5)
    output = {"left_features": left, "right_features": right}
    valid = torch.ones(1, 1, 10, 40, dtype=torch.bool)
    valid[..., 35:] = False  # the roll's wrap-around
    losses, parts = {}, {}
    for name, d in (("true", 5.0), ("off", 8.0)):
        batch = {"disparity": torch.full((1, 1, 10, 40), d), "valid": valid}
        losses[name], parts[name] = model.loss(batch, output)
    # (the softmax's soft target spreads over +-2 px: its loss has a floor above 0)
    assert float(losses["true"]) < float(losses["off"]) - 0.15, losses
    if objective == "softmax":
        assert float(parts["true"]["wta_within2"]) == 1.0 and float(parts["off"]["wta_within2"]) == 0.0, parts


def test_the_softmax_loss_uses_every_usable_pixel_and_has_gradients():
    model = _stereo_net(objective="softmax", temperature=0.2)
    left, right = _shifted_pair_features(3)
    left.requires_grad_(True)
    valid = torch.zeros(1, 1, 10, 40, dtype=torch.bool)
    valid[..., 2, 10:20] = True  # ten pixels only: the loss is their mean, nothing else counts
    batch = {"disparity": torch.full((1, 1, 10, 40), 3.0), "valid": valid}
    loss, _ = model.loss(batch, {"left_features": left, "right_features": right})
    loss.backward()
    touched = left.grad.abs().sum(1)[0] > 0
    assert bool(touched[2, 10:20].all()) and int(touched.sum()) == 10


def test_the_learned_cost_sees_the_pair_as_in_training_whatever_its_intensity_scale():
    # match() hands the cost its min-max rescaled images; the network was trained on the pair's
    # percentile normalisation: the cost volume must not depend on the pair's gain and offset
    model = _stereo_net()
    cost = model.cost_function()
    pair = render_stereo_pair(np.linspace(0, 255, 80 * 120, dtype=np.float32).reshape(80, 120) % 37 * 7,
                              (32, 48), rng=np.random.default_rng(1), max_disparity=8)
    left, right = torch.from_numpy(pair.left[0]), torch.from_numpy(pair.right[0])
    disparities = np.arange(0, 8)
    first = cost(left, right, disparities)
    second = cost(left * 0.25 + 3.0, right * 0.25 + 3.0, disparities)
    assert float((first - second).abs().max()) < 1e-4


def test_photometric_jitter_changes_the_right_camera_only_within_bounds():
    from alignkit.methods.stereo_net import photometric_jitter

    rng = np.random.default_rng(3)
    left = rng.uniform(10, 200, (2, 16, 24)).astype(np.float32)
    out_left, out_right = photometric_jitter(left, left.copy(), 0.2, np.random.default_rng(4))
    assert out_left.shape == left.shape and out_right.shape == left.shape
    assert 0 <= float(out_left.min()) and float(max(out_left.max(), out_right.max())) <= 1
    assert float(np.abs(out_left - out_right).max()) > 1e-3  # the two cameras now differ
    again = photometric_jitter(left, left.copy(), 0.2, np.random.default_rng(4))
    assert np.array_equal(again[0], out_left) and np.array_equal(again[1], out_right)
    # the order of the intensities is kept (gain > 0, gamma > 0): a monotone response change
    order = np.argsort(left.ravel())
    assert bool((np.diff(out_left.ravel()[order]) >= -1e-6).all())


def test_the_hybrid_cost_is_the_census_share_of_the_census_cost_plus_the_rest_of_the_network():
    from alignkit.stereo.cost import cost_volume

    model = _stereo_net(census_weight=0.25)
    pair = render_stereo_pair(np.random.default_rng(2).uniform(0, 255, (60, 90)).astype(np.float32), (32, 48),
                              rng=np.random.default_rng(1), max_disparity=8)
    left, right = torch.from_numpy(pair.left[0]), torch.from_numpy(pair.right[0])
    disparities = np.arange(0, 8)
    network = model.cost_function(census_weight=0.0)(left, right, disparities)
    census = cost_volume(left, right, disparities, cost="census")
    hybrid = model.cost_function()(left, right, disparities)  # the model's own weight, 0.25
    assert float((hybrid - (0.75 * network + 0.25 * census)).abs().max()) < 1e-6
    assert float((model.cost_function(census_weight=1.0)(left, right, disparities) - census).abs().max()) < 1e-6
    assert float((network - census).abs().max()) > 0.1  # the two parts differ: the mix is not trivially equal
    with pytest.raises(alignkit.ConfigError, match="census_weight"):
        _stereo_net(census_weight=1.5)


def test_the_method_option_overrides_the_models_census_weight(tiny_run):
    run, _ = tiny_run
    from alignkit.data.synthetic_stereo import training_photographs

    pair = render_stereo_pair(training_photographs()[2], (48, 80), rng=np.random.default_rng(12), max_disparity=10)
    left, right = (Image.from_array(a.transpose(1, 2, 0)) for a in (pair.left, pair.right))
    results = {w: alignkit.register(left, right, method="stereo-net", checkpoint=run, max_disparity=10, census_weight=w)
               for w in (0.0, 1.0)}
    from alignkit.methods.stereo_net import normalise_pair

    # the pair as the method hands it to match() (the adaptive P2's rounding sees these intensities)
    normalised = normalise_pair(torch.from_numpy(pair.left), torch.from_numpy(pair.right))
    census = alignkit.stereo.match(*normalised, min_disparity=0, max_disparity=10, backend="torch")
    network_only, census_only = (results[w].disparity()[0] for w in (0.0, 1.0))
    # all census: the classical matcher's disparity (the same cost volume, the model's SGM penalties =
    # match()'s defaults; the compiled and torch sub-pixel steps round differently); no census: something else
    assert np.allclose(census_only, census.disparity.numpy(), atol=1e-3)
    assert float(np.abs(network_only - census_only).max()) > 0.5
    with pytest.raises(alignkit.ConfigError, match="census_weight"):
        alignkit.register(left, right, method="stereo-net", checkpoint=run, census_weight=-0.1)


def test_synthetic_training_pairs_reach_the_slant_they_are_given():
    from alignkit.data.synthetic_stereo import training_photographs
    from alignkit.methods.stereo_net import StereoPairs

    photos = training_photographs()[:2]
    slopes = {}
    for slant in (0.0, 0.1):
        pairs = StereoPairs(photos, (48, 96), synthetic=6, max_disparity=40, slant=slant)
        steepest = 0.0
        for index in range(len(pairs)):
            disparity = pairs[index]["disparity"][0].numpy()
            step = np.abs(np.diff(disparity, axis=1))
            steepest = max(steepest, float(np.median(step[step < 0.5])) if (step < 0.5).any() else 0.0)
        slopes[slant] = steepest
    assert slopes[0.0] < 1e-6 and 0.02 < slopes[0.1] <= 0.1 + 1e-6, slopes
