"""dio: feature networks, training step through the solver layer, test-time flexibility, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import alignkit
from alignkit.errors import ConfigError
from alignkit.image import Image
from alignkit.methods import build_model, get_method
from alignkit.methods.dio import DIO, feature_grid, feature_network, variant_of
from alignkit.spatial import Grid


def _disc(grid: Grid, centre: tuple[float, float], radius: float) -> torch.Tensor:
    world = grid.world_points()[0]
    return (((world[0] - centre[0]) ** 2 + (world[1] - centre[1]) ** 2) < radius**2).float()


def _model(variant: str = "unet", **options) -> DIO:
    torch.manual_seed(0)
    network = feature_network(variant, ndim=2, channels=4, features=[4, 8, 8], levels=[2, 1])
    return build_model("dio", ndim=2, size=(32, 32), network=network, iterations=[15, 10], **options)


@pytest.mark.parametrize("variant", ["unet", "lku", "unet-e", "lku-e"])
def test_feature_networks_give_one_map_per_level_on_the_strided_grid(variant):
    model = _model(variant)
    assert variant_of(model.network_specs()["features"]) == variant
    grid = Grid.from_spacing((29, 34), (1.5, 0.5))
    maps, grids = model.feature_pyramid(torch.rand(1, 1, 29, 34), grid)
    assert [tuple(m.shape) for m in maps] == [(1, 4, 8, 9), (1, 4, 15, 17)]
    # a stride-2 convolution keeps the first voxel centre and doubles the spacing
    assert torch.allclose(grids[0].spacing, torch.tensor([6.0, 2.0], dtype=torch.float64))
    assert torch.allclose(grids[1].world_from_voxel[:2, 2], grid.world_from_voxel[:2, 2])


def test_feature_network_and_options_are_checked():
    with pytest.raises(ConfigError, match="coarse first"):
        feature_network("unet", ndim=2, levels=[1, 2])
    with pytest.raises(ConfigError, match="unknown DIO feature network"):
        feature_network("vit", ndim=2)
    with pytest.raises(ConfigError, match="level_weights"):
        _model(level_weights=[1.0])
    with pytest.raises(ConfigError, match="transform"):
        _model(transform="spline")
    assert feature_grid(Grid.from_spacing((8, 8), 1.0), 1, (4, 4)).spacing.tolist() == [2.0, 2.0]


def test_a_training_step_reaches_the_feature_network_through_the_solver():
    """One Adam step of the loss through the solver layer (JFB): every feature head gets a finite,
    non-zero gradient, and the loss has a similarity and a Dice part per level."""
    model = _model(label_ids=[1])
    grid = Grid.from_spacing((32, 32), 1.0)
    fixed, moving = _disc(grid, (15.0, 16.0), 7.0), _disc(grid, (17.0, 18.0), 7.0)
    batch = {"fixed": fixed[None, None], "moving": moving[None, None], "fixed_labels": fixed[None, None].long(),
             "moving_labels": moving[None, None].long()}
    output = model(batch)
    assert output["displacement"].shape == (1, 2, 32, 32)
    assert float(output["displacement"].detach().abs().max()) > 0.1  # the solver moved
    loss, parts = model.loss(batch, output)
    assert sorted(parts) == ["dice_l1", "dice_l2", "similarity_l1", "similarity_l2"]
    loss.backward()
    for head in model.features.heads:
        grad = head.weight.grad
        assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def _pair(tmp_path):
    """A 2D pair of different sizes and spacings over one field of view, moving content shifted."""
    fixed_grid = Grid.from_spacing((40, 44), 1.0)
    moving_grid = Grid.from_spacing((27, 30), 1.5)
    fixed = _disc(fixed_grid, (19.0, 21.0), 9.0) + 0.5 * _disc(fixed_grid, (19.0, 21.0), 4.0)
    moving = _disc(moving_grid, (21.0, 23.5), 9.0) + 0.5 * _disc(moving_grid, (21.0, 23.5), 4.0)
    return Image(fixed[None], fixed_grid), Image(moving[None], moving_grid)


@pytest.mark.parametrize("transform", ["svf", "displacement", "bspline", "affine"])
def test_the_same_network_registers_with_any_transform_model(transform, tmp_path):
    """Test-time flexibility: one (untrained) network, four solver models; the images differ in size
    and spacing and are not resampled onto each other before the network. The result is the
    pre-alignment-free solver stage of the asked model, and it moves the pair closer."""
    model = _model()
    fixed, moving = _pair(tmp_path)
    result = alignkit.register(fixed, moving, method="dio", checkpoint=model, transform=transform,
                               prealign="none", iterations=[30, 20])
    assert result.stages == [f"dio:{transform}"]
    assert result.metrics["mse_after"] < result.metrics["mse_before"]


def test_label_and_landmark_prompts_enter_the_solver(tmp_path):
    model = _model()
    fixed, moving = _pair(tmp_path)
    labels_f = fixed.with_data((fixed.data > 0.1).float())
    labels_m = moving.with_data((moving.data > 0.1).float())
    points_f = torch.tensor([[19.0, 21.0]])
    points_m = torch.tensor([[21.0, 23.5]])
    plain = alignkit.register(fixed, moving, method="dio", checkpoint=model, prealign="none", transform="affine")
    prompted = alignkit.register(fixed, moving, method="dio", checkpoint=model, prealign="none", transform="affine",
                                 fixed_labels=labels_f, moving_labels=labels_m, fixed_landmarks=points_f,
                                 moving_landmarks=points_m, dice_weight=1.0, landmark_weight=1.0)
    assert plain.description["prompts"] == []
    assert prompted.description["prompts"] == ["labels", "landmarks"]
    assert prompted.description["solver"]["dice_weight"] == 1.0
    # the landmark prompt pulls the mapped point onto its match
    error = lambda r: float((r.transform.transform_points(points_f.T[None, :, :, None]).view(2) - points_m[0]).norm())
    assert error(prompted) < error(plain)


def test_dio_options_and_errors():
    method = get_method("dio")
    assert {"transform", "prealign", "regularizer", "dice_weight", "landmark_weight"} <= set(method.option_names())
    with pytest.raises(ConfigError, match="dio transform"):
        method.create(transform="rigid-body")


@pytest.mark.slow  # three CLI processes: ~10 s alone, ~35 s on a loaded machine
def test_cli_register_and_train_with_dio(tmp_path):
    """`alignkit train --method dio` on a folder of 2D images, then `alignkit register --method dio
    --transform svf` with the run; a bad transform is a one-line error with exit status 2."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    folder.mkdir()
    for k in range(3):
        grid = Grid.from_spacing((32, 32), 1.0)
        image = _disc(grid, (15.0 + k, 16.0 - k), 8.0) + 0.05 * torch.from_numpy(rng.random((32, 32))).float()
        nib.save(nib.Nifti1Image(image.numpy()[:, :, None], np.eye(4)), folder / f"s{k}.nii.gz")
    run = tmp_path / "run"
    config = tmp_path / "dio.json"  # the feature network variant is chosen in a configuration file
    config.write_text(json.dumps({"network": feature_network("unet-e", ndim=2, channels=4, features=[4, 8, 8],
                                                             levels=[2, 1])}))
    train = subprocess.run(
        [sys.executable, "-m", "alignkit", "train", "--method", "dio", "--dataset", str(folder), "--layout", "folder",
         "--size", "32", "--epochs", "1", "--config", str(config), "--option", "iterations=[10,5]", "-o", str(run),
         "--quiet", "--device", "cpu"], check=False, capture_output=True, text=True)
    assert train.returncode == 0, train.stderr[-2000:]
    out = tmp_path / "reg"
    reg = subprocess.run(
        [sys.executable, "-m", "alignkit", "register", str(folder / "s0.nii.gz"), str(folder / "s1.nii.gz"),
         "--method", "dio", "--checkpoint", str(run), "--transform", "svf", "-o", str(out), "--quiet"],
        check=False, capture_output=True, text=True)
    assert reg.returncode == 0, reg.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "dio" and metrics["stages"][-1] == "dio:svf"
    bad = subprocess.run(
        [sys.executable, "-m", "alignkit", "register", str(folder / "s0.nii.gz"), str(folder / "s1.nii.gz"),
         "--method", "dio", "--checkpoint", str(run), "--transform", "spline", "-o", str(out), "--quiet"],
        check=False, capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


@pytest.mark.slow  # two full-resolution 3D registrations (~1 min each on one core)
def test_shipped_model_registers_real_brains_without_a_checkpoint():
    """`--method dio` works after install: the shipped model on the held-out OASIS pair
    subject12<-subject11 at full resolution beats its own affine pre-alignment (card: 0.487 vs 0.430
    mean Dice), and with an SVF at test time it does not fold."""
    from conftest import data_path

    from alignkit.data.datasets import load_dataset
    from alignkit.methods.shipped import shipped_for

    data_path("brain3d-oasis-trt20")  # skips when the shared data are absent
    assert shipped_for("dio", 3) is not None
    case = load_dataset("brain3d-oasis-trt20")["subject12<-subject11"]
    labels = {"fixed_labels": case.fixed_labels, "moving_labels": case.moving_labels}
    result = alignkit.register(case.fixed, case.moving, method="dio", **labels)
    assert result.stages == ["affine", "dio:displacement"]
    assert result.metrics["dice_mean"] > 0.46
    svf = alignkit.register(case.fixed, case.moving, method="dio", transform="svf", **labels)
    assert svf.stages[-1] == "dio:svf" and svf.metrics["nonpositive_jacobian_percent"] == 0.0
    assert svf.metrics["dice_mean"] > 0.45
