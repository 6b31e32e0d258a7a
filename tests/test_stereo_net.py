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
