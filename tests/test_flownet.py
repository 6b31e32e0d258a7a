"""FlowNet-style learned optical flow: networks, losses, occlusion masks, the methods end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from alignkit.cli import main as cli_main
from alignkit.data.synthetic_flow import (
    FlowLayer,
    random_scene,
    render_scene,
    reverse_scene,
    synthetic_flow_pair,
)
from alignkit.errors import ConfigError, ShapeError
from alignkit.losses.unsupervised_flow import (
    UnsupervisedFlowLoss,
    census_transform,
    forward_backward_occlusion,
    multiscale_epe,
)
from alignkit.nets import build_network, network_config
from alignkit.nets.flownet import (
    FlowNetC,
    FlowNetS,
    FlowNetStack,
    downsample_flow,
    pad_to_multiple,
    upsample_flow,
)
from tests.conftest import data_path

TINY = {"features": [8, 8, 16], "kernels": [3, 3, 3]}


# -- networks ---------------------------------------------------------------------------------------
def test_networks_shapes_rebuild_and_size_rule():
    torch.manual_seed(0)
    a, b = torch.rand(2, 1, 32, 48), torch.rand(2, 1, 32, 48)
    s = FlowNetS(ndim=2, **TINY, output_level=1)
    c = FlowNetC(ndim=2, **TINY, correlation_level=2, max_displacement=2, output_level=1)
    stack = FlowNetStack(ndim=2, first=network_config(c), second=network_config(
        FlowNetS(ndim=2, in_channels=6, **TINY, output_level=1)))
    for net in (s, c, stack):
        flows = net(a, b)
        # coarsest first: levels 3, 2, 1 of a 32 x 48 input
        assert [tuple(f.shape) for f in flows] == [(2, 2, 4, 6), (2, 2, 8, 12), (2, 2, 16, 24)]
        assert net.full_resolution(flows).shape == (2, 2, 32, 48)
        twin = build_network(network_config(net))
        twin.load_state_dict(net.state_dict())
        assert torch.equal(twin(a, b)[-1], flows[-1])
    with pytest.raises(ShapeError):
        c(torch.rand(1, 1, 30, 48), torch.rand(1, 1, 30, 48))  # not a multiple of 2**levels
    padded, size = pad_to_multiple(torch.rand(1, 1, 30, 45), 8)
    assert padded.shape == (1, 1, 32, 48) and size == (30, 45)
    with pytest.raises(ConfigError):
        FlowNetStack(ndim=2, first=network_config(c), second=network_config(FlowNetS(ndim=2, in_channels=2, **TINY)))


def test_flownet_c_runs_in_3d():
    net = FlowNetC(ndim=3, features=[4, 4, 8], kernels=[3, 3, 3], correlation_level=2, max_displacement=1,
                   output_level=1)
    flows = net(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16))
    assert flows[-1].shape == (1, 3, 8, 8, 8) and net.full_resolution(flows).shape == (1, 3, 16, 16, 16)


def test_flow_between_levels():
    constant = torch.tensor([1.5, -2.0]).view(1, 2, 1, 1).expand(1, 2, 8, 8)
    assert torch.allclose(upsample_flow(constant, 4), constant.new_tensor([6.0, -8.0]).view(1, 2, 1, 1).expand(1, 2, 32, 32))
    assert torch.allclose(downsample_flow(upsample_flow(constant, 2), 2), constant)
    # FlowNet's loss is zero at the truth, at every level
    truth = torch.randn(1, 2, 32, 32)
    flows = [downsample_flow(truth, 2**level) for level in (3, 2)]
    total, errors = multiscale_epe(flows, truth, output_level=2)
    assert float(total) < 1e-5 and len(errors) == 2
    total, _ = multiscale_epe([torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 8, 8)], truth, output_level=2)
    assert float(total) > 0.1


# -- losses and occlusion ---------------------------------------------------------------------------------
def _strip_flows(size=(40, 60), shift=10.0):
    """A square (rows 10..29, columns 15..34) moving ``shift`` columns right on a static background:
    forward flow on frame 1, backward flow on frame 2."""
    forward = torch.zeros(1, 2, *size)
    backward = torch.zeros(1, 2, *size)
    forward[0, 1, 10:30, 15:35] = shift
    backward[0, 1, 10:30, 15 + int(shift):35 + int(shift)] = -shift
    return forward, backward


def test_forward_backward_consistency_flags_the_occluded_strip():
    forward, backward = _strip_flows()
    occluded = forward_backward_occlusion(forward, backward)[0, 0].bool()
    expected = torch.zeros_like(occluded)
    expected[10:30, 35:45] = True  # the background the square covers in frame 2
    assert torch.equal(occluded, expected)
    # and the other way round, the background the square uncovers
    disoccluded = forward_backward_occlusion(backward, forward)[0, 0].bool()
    expected = torch.zeros_like(disoccluded)
    expected[10:30, 15:25] = True
    assert torch.equal(disoccluded, expected)


def test_forward_backward_consistency_matches_the_generators_occlusion():
    layers = random_scene(torch.Generator().manual_seed(4), [torch.rand(1, 64, 64) for _ in range(3)], (64, 80),
                          layers=(2, 3), max_motion=8.0, photometric=False)
    ahead, back = render_scene(layers, (64, 80)), render_scene(reverse_scene(layers), (64, 80))
    # the reversed scene starts where the forward one ends (up to the one-pixel soft edges, whose width
    # follows each frame's own scale)
    assert float((back["frame1"] - ahead["frame2"]).abs().mean()) < 2e-3
    found = forward_backward_occlusion(ahead["flow"][None], back["flow"][None])[0, 0].bool()
    # points that leave the image are occluded in the generator's truth but invisible to the check
    target = torch.stack(torch.meshgrid(torch.arange(64.0), torch.arange(80.0), indexing="ij")) + ahead["flow"]
    inside = (target[0] >= 0) & (target[0] <= 63) & (target[1] >= 0) & (target[1] <= 79)
    truth = ahead["occluded"] & inside
    assert truth.sum() > 20
    recall = (found & truth).sum() / truth.sum()
    assert recall > 0.9, f"recall {float(recall):.2f}"
    # what it flags beyond the truth lies within two pixels of an occlusion or a motion boundary
    layer = ahead["layer"].float()[None, None]
    boundary = (F.max_pool2d(layer, 3, 1, 1) != -F.max_pool2d(-layer, 3, 1, 1))[0, 0]
    near = F.max_pool2d((truth | boundary).float()[None, None], 5, 1, 2)[0, 0] > 0
    assert not (found & inside & ~near).any()


def test_census_ignores_brightness_offsets():
    image = torch.rand(1, 1, 20, 20)
    assert torch.allclose(census_transform(image), census_transform(image + 0.2), atol=1e-4)
    assert census_transform(image).shape == (1, 48, 20, 20)


def test_unsupervised_loss_is_lower_at_the_true_flows():
    layers = random_scene(torch.Generator().manual_seed(2), [torch.rand(1, 64, 64).mul(0.8).add(0.1)
                                                              for _ in range(3)], (48, 64), max_motion=6.0,
                          photometric=False)
    ahead, back = render_scene(layers, (48, 64)), render_scene(reverse_scene(layers), (48, 64))
    first, second = ahead["frame1"][None], ahead["frame2"][None]
    loss = UnsupervisedFlowLoss()
    true_total, parts = loss(first, second, ahead["flow"][None], back["flow"][None])
    zero_total, _ = loss(first, second, torch.zeros(1, 2, 48, 64), torch.zeros(1, 2, 48, 64))
    assert float(true_total) < 0.5 * float(zero_total)
    assert set(parts) == {"photometric", "smoothness", "occluded", "consistency"}
    assert 0.0 < float(parts["occluded"]) < 0.5


# -- the methods -------------------------------------------------------------------------------------------
def _train_tiny(tmp_path, method="flownet-c", **extra):
    from alignkit.methods import train_method

    network = {"features": [8, 8, 16], "kernels": [3, 3, 3]}
    if method == "flownet-c":
        network.update(correlation_level=2, max_displacement=2)
    config = {"method": method, "dataset": "synthetic-flow", "size": 32, "epochs": 1, "synthetic_length": 4,
              "batch_size": 2, "quiet": True, "val_fraction": 0.5, **({} if "networks" in extra else {"network": network}),
              **extra}
    return train_method(config, tmp_path / method)


def _middlebury_crop(tmp_path):
    """A 120 x 184 crop of Middlebury's RubberWhale frames (real frames, small enough for a fast test)."""
    from PIL import Image as PILImage

    frames = data_path("flow", "middlebury", "RubberWhale")
    paths = []
    for name in ("frame10.png", "frame11.png"):
        with PILImage.open(frames / name) as opened:
            opened.crop((200, 150, 384, 270)).save(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def test_train_register_refine_from_the_cli(tmp_path):
    first, second = _middlebury_crop(tmp_path)
    run = _train_tiny(tmp_path)
    assert run.history[0]["val_epe"] > 0
    out = tmp_path / "out"
    code = cli_main(["register", str(first), str(second), "--method", "flownet-c", "--checkpoint",
                     str(tmp_path / "flownet-c"), "--refine", "2", "-o", str(out), "--quiet"])
    assert code == 0
    from alignkit.io import read_flo

    flow = read_flo(out / "flow.flo")
    assert flow.shape == (120, 184, 2) and (out / "qc.png").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["refine_iterations"] == 2
    # the refinement is the flow preset's variational stage, not the default preset's SVF
    import alignkit

    result = alignkit.register(first, second, method="flownet-c", checkpoint=tmp_path / "flownet-c", refine=1,
                               scale=0.5)
    assert result.description["refine"]["stage"]["similarity"] == "flow-data"
    assert result.flow().shape == (2, 120, 184)
    with pytest.raises(ConfigError):
        alignkit.register(first, second, method="flownet-c", checkpoint=tmp_path / "flownet-c", tile=64)
    assert cli_main(["register", str(first), str(second), "--method", "flownet-c", "--checkpoint",
                     str(tmp_path / "flownet-c"), "--option", "scale=100", "-o", str(out), "--quiet"]) == 2


def test_unsupervised_fine_tuning_on_unlabelled_frames(tmp_path):
    data_path("flow", "sintel")
    from alignkit.data.datasets import load_dataset
    from alignkit.data.frame_pairs import find_frame_pairs, scored_pairs
    from alignkit.methods import train_method

    root = load_dataset("flow/sintel").root
    scored = scored_pairs("flow/sintel")
    kept = find_frame_pairs(root, exclude=scored)
    assert len(kept) == len(find_frame_pairs(root)) - len(scored) and kept
    assert not {(str(a), str(b)) for a, b in kept} & {tuple(map(str, p)) for p in scored}
    base = _train_tiny(tmp_path)
    config = {"method": "flownet-c", "dataset": "flow/sintel", "size": 32, "epochs": 1, "synthetic_length": 4,
              "batch_size": 2, "quiet": True, "val_fraction": 0.5, "init_from": str(tmp_path / "flownet-c"),
              "method_options": {"unsupervised": True},
              "network": {"features": [8, 8, 16], "kernels": [3, 3, 3], "correlation_level": 2, "max_displacement": 2}}
    tuned = train_method(config, tmp_path / "tuned")
    row = tuned.history[-1]
    assert {"photometric", "val_epe"} <= set(row) or "val_epe" in row
    assert math.isfinite(row["train_loss"]) and base.history[-1]["val_epe"] > 0
    # through the coarse-to-fine inference (one halving below the crop), as users run the model
    config = dict(config, size=64, method_options={"unsupervised": True, "train_coarse_levels": 1})
    pyramid = train_method(config, tmp_path / "tuned-pyramid")
    assert math.isfinite(pyramid.history[-1]["train_loss"]) and pyramid.history[-1]["val_epe"] > 0
    assert pyramid.history[-1]["train_loss"] != row["train_loss"]
    supervised = _train_tiny(tmp_path, method_options={"train_coarse_levels": 1}, size=64)
    assert math.isfinite(supervised.history[-1]["train_loss"]) and supervised.history[-1]["val_epe"] > 0


def test_stacked_network_trains_on_a_frozen_flownet_c(tmp_path):
    from alignkit.methods import load_model

    _train_tiny(tmp_path)
    stacked = _train_tiny(tmp_path, "flownet-cs", method_options={"first_from": str(tmp_path / "flownet-c")},
                          networks={"first": {"features": [8, 8, 16], "kernels": [3, 3, 3], "correlation_level": 2,
                                              "max_displacement": 2},
                                    "second": {"features": [8, 8, 16], "kernels": [3, 3, 3]}})
    assert [row["stage"] for row in stacked.history] == ["second", "second"]
    first = load_model(tmp_path / "flownet-c").network.state_dict()
    for key, value in load_model(tmp_path / "flownet-cs").first.state_dict().items():
        assert torch.equal(value, first[key]), key


@pytest.mark.slow
def test_a_small_network_halves_its_error_in_a_few_hundred_steps():
    """A tiny FlowNetC (the flownet-c method's model and loss), 400 steps of 8 pairs of 32 x 32 from the
    generator (a textured background, nearly translational affine motions up to 8 px;
    a pool of 256 training pairs), halves its end-point error on held-out pairs of another seed stream."""
    from torch.utils.data import default_collate

    from alignkit.methods import build_model

    torch.manual_seed(0)
    textures = [torch.nn.functional.avg_pool2d(torch.rand(1, 1, 160, 160, generator=torch.Generator().manual_seed(k)),
                                               3, 1, 1)[0] for k in range(4)]

    def pairs(seed: int, count: int) -> dict[str, torch.Tensor]:
        items = []
        for k in range(count):
            pair = synthetic_flow_pair(torch.Generator().manual_seed(seed * 100_003 + k), (32, 32), textures=textures,
                                       layers=(0, 0), max_motion=8.0, background_motion=1.0, max_rotation=3.0,
                                       max_scale=1.03)
            items.append({"fixed": pair["frame1"], "moving": pair["frame2"], "flow": pair["flow"]})
        return default_collate(items)

    model = build_model("flownet-c", ndim=2, size=(32, 32), network={
        "features": [8, 16, 24], "kernels": [5, 3, 3], "correlation_level": 2, "max_displacement": 3,
        "output_level": 1})
    held_out = pairs(999, 32)

    def error() -> float:
        model.eval()
        with torch.no_grad():
            return float(model.validation_metrics(held_out, model(held_out))["epe"].mean())

    before = error()
    pool = pairs(1, 256)
    order = torch.randint(256, (400, 8), generator=torch.Generator().manual_seed(2))
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for step in range(400):
        batch = {key: value[order[step]] for key, value in pool.items()}
        loss, _ = model.loss(batch, model(batch), epoch=1)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = error()
    assert after < 0.5 * before, f"held-out EPE {before:.2f} -> {after:.2f}"


def test_synthetic_pair_keys():
    out = synthetic_flow_pair(torch.Generator().manual_seed(0), (32, 32))
    assert set(out) == {"frame1", "frame2", "flow", "occluded", "layer"}
    assert isinstance(FlowLayer, type)


def test_pyramid_depth_keeps_the_coarsest_side_above_the_minimum():
    from alignkit.methods.flownet import pyramid_depth

    assert pyramid_depth([654, 1536], 48) == 3  # 654 -> 327 -> 163 -> 81 (40 would be below 48)
    assert pyramid_depth([75, 75], 48) == 0
    assert pyramid_depth([96, 200], 48) == 1


def test_the_finest_level_is_capped_in_pixels():
    from alignkit.methods.flownet import FlowNetRunner

    runner = FlowNetRunner()
    assert runner.finest_scale((480, 640)) == 1.5
    assert abs(runner.finest_scale((2160, 3840)) ** 2 * 2160 * 3840 - (1 << 22)) < 1.0
    assert FlowNetRunner(max_pixels=0).finest_scale((2160, 3840)) == 1.5
    with pytest.raises(ConfigError):
        FlowNetRunner(max_pixels=-1)


def test_coarse_to_fine_inference_reaches_motion_beyond_the_training_range():
    """The shipped flownet-c learnt motions of at most 12 px; a photograph moved by 28 px is out of its
    reach at one scale and recovered by the pyramid (each level's residual within reach)."""
    from skimage import data as skdata

    import alignkit
    from alignkit.image import Image
    from alignkit.methods.shipped import shipped_for

    model = shipped_for("flownet-c", 2)
    if model is None or not model.available():
        pytest.skip("no shipped flownet-c model in this install")
    photo = torch.as_tensor(skdata.camera()[::2, ::2].astype("float32"))  # 256 x 256
    shift = (-20.0, 20.0)  # rows, columns: 28 px
    moving = torch.roll(photo, shifts=(int(shift[0]), int(shift[1])), dims=(0, 1))
    # fixed(p) = moving(p + flow): rolling by +s moves content by +s, so the flow is +s
    fixed, moved = Image.from_array(photo.numpy()), Image.from_array(moving.numpy())
    inner = (slice(40, -40), slice(40, -40))  # away from the wrapped border
    errors = {}
    for name, options in (("pyramid", {}), ("single", {"coarse_to_fine": False, "scale": 1.0})):
        flow = torch.as_tensor(alignkit.register(fixed, moved, method="flownet-c", **options).flow())
        truth = torch.tensor(shift).view(2, 1, 1)
        errors[name] = float(torch.linalg.vector_norm(flow - truth, dim=0)[inner].median())
    assert errors["pyramid"] < 1.0, errors
    assert errors["single"] > 8.0, errors


def test_training_can_start_from_a_shipped_model(tmp_path):
    from alignkit.methods import load_model, train_method
    from alignkit.methods.shipped import get_shipped

    shipped = get_shipped("flownet_c_synthetic2d")
    if not shipped.available():
        pytest.skip("no shipped flownet-c model in this install")
    config = {"method": "flownet-c", "dataset": "synthetic-flow", "size": 64, "epochs": 1, "synthetic_length": 2,
              "batch_size": 2, "quiet": True, "val_fraction": 0.0, "lr": 1e-12,
              "init_from": "shipped:flownet_c_synthetic2d"}
    train_method(config, tmp_path / "continued")
    start = load_model(shipped.path()).network.state_dict()
    for key, value in load_model(tmp_path / "continued").network.state_dict().items():
        assert torch.allclose(value.float(), start[key].float(), atol=1e-3), key
    with pytest.raises(ConfigError):
        train_method(dict(config, init_from="shipped:no_such_model"), tmp_path / "bad")
