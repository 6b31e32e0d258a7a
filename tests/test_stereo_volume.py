"""stereo-volume (issue 16): the cost-volume stereo network, supervised and self-supervised."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import alignkit
from alignkit.data.synthetic_stereo import render_stereo_pair
from alignkit.errors import ConfigError
from alignkit.image import Image
from alignkit.methods.learned import build_model
from alignkit.metrics import disparity_errors
from alignkit.nets import build_network


@pytest.mark.parametrize("volume", ["correlation", "concat"])
def test_network_gives_a_disparity_inside_the_range_at_any_size(volume):
    torch.manual_seed(0)
    net = build_network({"name": "stereo_volume", "volume": volume, "features": 8, "aggregation": 4})
    left, right = torch.rand(2, 1, 37, 61), torch.rand(2, 1, 37, 61)
    disparity = net(left, right, 3, 13)
    assert disparity.shape == (2, 1, 37, 61)
    assert float(disparity.min()) >= 3 - 1e-4 and float(disparity.max()) <= 13 + 1e-4
    disparity.mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def _shifted_pair(shift: int, size=(40, 80), seed=0):
    """left(x) = right(x - shift) everywhere (a fronto-parallel textured plane)."""
    texture = torch.from_numpy(np.random.default_rng(seed).random((size[0], size[1] + 40), np.float32))
    texture = torch.nn.functional.avg_pool2d(texture[None, None], 3, 1, 1)[0, 0]
    left = texture[:, 20 : 20 + size[1]]
    right = texture[:, 20 + shift : 20 + shift + size[1]]
    return left[None, None], right[None, None]


def test_self_supervised_loss_is_lowest_at_the_true_disparity():
    """The photometric + smoothness + left-right loss, fed the true disparities, beats a wrong one
    (and the sign conventions of the left and right flows are right)."""
    model = build_model("stereo-volume", ndim=2, size=(40, 80), supervision="self", max_disparity=16)
    left, right = _shifted_pair(6)
    batch = {"fixed": left, "moving": right}
    losses = {}
    for guess in (0.0, 3.0, 6.0, 9.0):
        d = torch.full_like(left, guess)
        losses[guess], _ = model.loss(batch, {"disparity": d, "right_disparity": d})
    assert min(losses, key=lambda g: float(losses[g])) == 6.0, losses


def test_options_are_checked():
    with pytest.raises(ConfigError, match="supervision"):
        build_model("stereo-volume", ndim=2, size=(32, 32), supervision="weak")
    with pytest.raises(ConfigError, match="volume"):
        build_network({"name": "stereo_volume", "volume": "cosine"})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny stereo-volume net trained briefly (supervised) on synthetic layered pairs, one thread."""
    pytest.importorskip("skimage")
    from alignkit.methods import train_method

    out = tmp_path_factory.mktemp("stereo-volume")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train_method({"method": "stereo-volume", "size": [48, 64], "epochs": 4, "synthetic_length": 16,
                               "batch_size": 4, "lr": 3e-3, "network": {"features": 8, "aggregation": 4},
                               "method_options": {"max_disparity": 12}, "quiet": True, "device": "cpu", "seed": 0},
                              out)
    finally:
        torch.set_num_threads(threads)
    return out, result


def test_brief_training_lowers_the_held_out_error(tiny_run):
    _, result = tiny_run
    first, last = result.history[0], result.history[-1]
    assert last["val_epe"] < first["val_epe"], (first, last)


def test_registers_through_the_cli_and_writes_the_disparity(tiny_run, tmp_path):
    from PIL import Image as PILImage

    from alignkit.cli import main
    from alignkit.data.synthetic_stereo import training_photographs
    from alignkit.io import read_pfm

    run, _ = tiny_run
    pair = render_stereo_pair(training_photographs()[3], (56, 80), rng=np.random.default_rng(5), max_disparity=10)
    left, right = tmp_path / "l.png", tmp_path / "r.png"
    for path, array in ((left, pair.left), (right, pair.right)):
        PILImage.fromarray(np.clip(array.transpose(1, 2, 0), 0, 255).astype(np.uint8)).save(path)
    assert main(["register", str(left), str(right), "--method", "stereo-volume", "--checkpoint", str(run),
                 "--max-disparity", "12", "-o", str(tmp_path / "out"), "--quiet"]) == 0
    disparity = read_pfm(tmp_path / "out" / "disparity.pfm")
    assert disparity.shape == pair.disparity.shape
    assert (tmp_path / "out" / "occlusion.png").exists()
    errors = disparity_errors(disparity, pair.disparity, mask=~pair.occluded)
    assert errors["epe"] < 4.0, errors  # a 4-epoch toy; chance (uniform in [0, 12]) is ~4-5 px
    # the Python API gives the same disparity
    images = [Image.from_array(a.transpose(1, 2, 0)) for a in (pair.left, pair.right)]
    registration = alignkit.register(*images, method="stereo-volume", checkpoint=run, max_disparity=12)
    assert registration.is_stereo and registration.stages == ["disparity"]
