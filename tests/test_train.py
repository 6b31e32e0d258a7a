"""Training: pairs, the VoxelMorph method, checkpoints, resume, determinism, DDP, CLI and inference.

Everything runs on tiny 2D problems (32² phantoms, a 3-level U-Net with 4-8 channels) so the whole
file stays well under a minute on two CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from phantoms import phantom, phantom_blob_centres
from PIL import Image as PILImage

import alignkit
from alignkit.cli import main
from alignkit.errors import ConfigError
from alignkit.image import Image
from alignkit.methods import build_model, load_model, train_method
from alignkit.methods.voxelmorph import VoxelMorph
from alignkit.spatial import Grid
from alignkit.train import (
    InterSubjectPairs,
    SyntheticPairs,
    TrainConfig,
    build_pairs,
    load_checkpoint,
    prepare_subject,
)
from alignkit.train.checkpoint import decode, encode

TINY_NET = {"features": [4, 8, 8]}
SIZE = 32


def _subject(seed: int = 0):
    return prepare_subject(Image.from_array(phantom(seed)), (SIZE, SIZE), name=f"phantom{seed}")


def _config(**overrides) -> TrainConfig:
    values = {
        "size": SIZE, "network": TINY_NET, "epochs": 3, "batch_size": 2, "lr": 3e-3, "quiet": True,
        "device": "cpu", "method_options": {"similarity": "mse", "regularizer_weight": 0.01},
    }
    values.update(overrides)
    return TrainConfig(**values)


def _synthetic(length: int = 8, seed: int = 0):
    subjects = [_subject(0), _subject(1)]
    return (
        SyntheticPairs(subjects, length=length, magnitude=2.5, seed=seed),
        SyntheticPairs(subjects, length=2, magnitude=2.5, per_epoch=False, seed=seed + 99),
    )


def _state(method) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


def _assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


# -- pairs and the method's conventions --------------------------------------------------------
def test_synthetic_pairs_hold_their_true_field_and_redraw_each_epoch():
    pairs, _ = _synthetic(length=3)
    item = pairs[1]
    assert item["fixed"].shape == (1, SIZE, SIZE) and item["flow"].shape == (2, SIZE, SIZE)
    assert float(item["flow"].norm(dim=0).max()) > 1.0
    # the method warps with the same convention the pairs are built with: fixed = moving ∘ (id + flow)
    method = build_model("voxelmorph", ndim=2, size=(SIZE, SIZE), network=TINY_NET)
    warped = method.warp(item["moving"][None], item["flow"][None])
    torch.testing.assert_close(warped[0], item["fixed"], atol=1e-5, rtol=0)
    again = pairs[1]
    assert torch.equal(again["flow"], item["flow"])  # a pure function of (seed, epoch, index)
    pairs.set_epoch(1)
    assert not torch.equal(pairs[1]["flow"], item["flow"])
    static = SyntheticPairs(pairs.subjects, length=3, per_epoch=False)
    first = static[2]["flow"]
    static.set_epoch(5)
    assert torch.equal(static[2]["flow"], first)  # a data set and its warped copy: fixed per index


def test_inter_subject_pairs_hold_out_subjects_for_validation():
    subjects = [_subject(k) for k in range(5)]
    train_set, val_set = build_pairs("inter", subjects, val_fraction=0.2, seed=0)
    assert isinstance(train_set, InterSubjectPairs) and len(train_set) == 4 * 3
    assert val_set is not None
    held_out = {s.name for s in val_set.subjects} - {s.name for s in train_set.subjects}
    assert len(held_out) == 1
    for i, j in val_set.pairs:  # every validation pair involves the unseen subject
        assert held_out & {val_set.subjects[i].name, val_set.subjects[j].name}
    subset = InterSubjectPairs(subjects, max_pairs=7, seed=3)
    assert len(subset) == 7 and len(set(subset.pairs)) == 7
    assert subset.pairs == InterSubjectPairs(subjects, max_pairs=7, seed=3).pairs


def test_pose_augment_moves_the_moving_subject_anew_every_epoch():
    """``pose_augment``: a training pair's moving image (and labels, alike) is resampled through a random affine
    that is a pure function of (seed, epoch, index); validation pairs are never augmented; bad bounds are refused."""
    subjects = [_subject(k) for k in range(5)]
    plain, _ = build_pairs("inter", subjects, val_fraction=0.2, seed=0)
    bounds = {"rotation": 15.0, "translation": 3.0}
    train_set, val_set = build_pairs("inter", subjects, val_fraction=0.2, seed=0, pose_augment=bounds)
    assert isinstance(val_set, InterSubjectPairs) and val_set.pose_augment is None
    item, reference = train_set[2], plain[2]
    assert torch.equal(item["fixed"], reference["fixed"])  # only the moving subject moves
    assert not torch.allclose(item["moving"], reference["moving"], atol=1e-3)
    assert torch.equal(train_set[2]["moving"], item["moving"])  # the same draw for the same (epoch, index)
    train_set.set_epoch(1)
    assert not torch.allclose(train_set[2]["moving"], item["moving"], atol=1e-3)
    # the same affine for both: resampling the original through it reproduces the augmented image
    from alignkit.spatial import apply_matrix, sample_voxels
    from alignkit.train.pairs import item_generator, random_voxel_affine

    matrix = random_voxel_affine((SIZE, SIZE), item_generator(0, 0x905E, 1, 2), **train_set.pose_augment)
    points = apply_matrix(matrix, Grid.from_spacing((SIZE, SIZE), 1.0).voxel_points(dtype=torch.float64)).float()
    expected = sample_voxels(reference["moving"][None], points, padding="zeros")[0]
    torch.testing.assert_close(train_set[2]["moving"], expected)
    assert TrainConfig(pose_augment={"rotation": 5}).pose_augment == {"rotation": 5.0, "scaling": 0.0, "shear": 0.0,
                                                                       "translation": 0.0}
    for bad in ({"spin": 1.0}, {"rotation": -1.0}, {"rotation": "x"}, 3):
        with pytest.raises(ConfigError, match="pose_augment"):
            TrainConfig(pose_augment=bad)
    with pytest.raises(ConfigError, match="pose_augment"):
        build_pairs("synthetic", subjects, pose_augment=bounds)


def test_named_validation_subjects_are_never_trained_on():
    subjects = [_subject(k) for k in range(5)]
    train_set, val_set = build_pairs("inter", subjects, val_subjects=["phantom[34]"], seed=0)
    assert [s.name for s in train_set.subjects] == ["phantom0", "phantom1", "phantom2"]
    assert len(train_set) == 6
    assert val_set is not None
    for i, j in val_set.pairs:  # every validation pair involves a named subject
        assert {"phantom3", "phantom4"} & {val_set.subjects[i].name, val_set.subjects[j].name}
    # synthetic pairs deform the training subjects only; validation stays on the named ones
    synthetic, synthetic_val = build_pairs("synthetic", subjects, val_subjects=["phantom4"], seed=0)
    assert {s.name for s in synthetic.subjects} == {"phantom0", "phantom1", "phantom2", "phantom3"}
    assert synthetic_val is not None and "phantom4" in {s.name for s in synthetic_val.subjects}
    with pytest.raises(ConfigError, match="match none"):
        build_pairs("inter", subjects, val_subjects=["phantom9"])
    with pytest.raises(ConfigError, match="no training subject"):
        build_pairs("inter", subjects, val_subjects=["phantom*"])


def test_subject_patterns_select_images_before_the_reference_is_chosen():
    from alignkit.train.subjects import load_subjects

    images = [Image.from_array(phantom(k), path=f"img{k}") for k in range(4)]
    data = load_subjects(images, SIZE, include=["img[13]"])
    assert [s.name for s in data.subjects] == ["img1", "img3"]
    with pytest.raises(ConfigError, match="img7"):
        load_subjects(images, SIZE, include=["img7"])


def test_unlabelled_training_subjects_validate_on_labelled_held_out_ones(tmp_path):
    """Train on unlabelled images, validate on two labelled held-out ones (the brain2d protocol):
    the validation Dice is scored, and the affine pre-alignment is recorded in the model, so
    ``alignkit.register`` with the checkpoint runs it before the network."""
    folder = tmp_path / "slices"
    folder.mkdir()
    for k in range(5):
        PILImage.fromarray(phantom(k).astype(np.uint8)).save(folder / f"s{k}.png")
    for k in (3, 4):
        labels = (phantom(k) > 40).astype(np.uint8) + (phantom(k) > 120)
        PILImage.fromarray(labels.astype(np.uint8)).save(folder / f"s{k}_seg.png")
    PILImage.fromarray(np.zeros((20, 30), np.uint8)).save(folder / "other.png")  # not a subject of the run
    out = tmp_path / "run"
    config = _config(dataset=str(folder), layout="folder", subjects="s*", val_subjects=["s3", "s4"],
                     prealign="affine", epochs=1)
    result = train_method(config, out)
    assert result.method.config["prealign"] == "affine" and result.method.label_ids == [1, 2]
    assert 0.0 < result.history[0]["val_dice"] <= 1.0 and 0.0 < result.history[-1]["val_dice"] <= 1.0
    assert TrainConfig.from_dict(json.loads((out / "config.json").read_text())).val_subjects == ["s3", "s4"]
    registered = alignkit.register(folder / "s3.png", folder / "s4.png", method="voxelmorph", checkpoint=out)
    assert registered.metrics["stages"][0] == "affine"


def test_real_folder_labels_on_another_grid_are_resampled_through_the_world():
    """brain2d's landmark blobs are an ITK-written NIfTI whose voxel axes are the JPEG's transposed;
    they must land on the blobs of the JPEG rendering of the same landmarks."""
    from conftest import data_path

    from alignkit.io import read_image
    from alignkit.spatial import resize_image
    from alignkit.train.subjects import load_subjects

    folder = data_path("brain2d")
    data = load_subjects(folder, 64, layout="folder")
    r16 = next(s for s in data.subjects if s.name == "r16slice")
    assert r16.labels is not None and sorted(torch.unique(r16.labels).tolist()) == [0, 1, 2]
    rendered = resize_image(read_image(folder / "r16sliceLM.jpg").batch(), (64, 64))[0, 0] > 64
    blobs = r16.labels[0] > 0
    dice = 2 * float((blobs & rendered).sum()) / float(blobs.sum() + rendered.sum())
    assert dice > 0.7
    unlabelled = next(s for s in data.subjects if s.name == "r27slice")
    assert unlabelled.labels is None
    pairs = InterSubjectPairs(data.subjects, seed=0)
    assert pairs.has_labels and int(pairs[0]["fixed_labels"].shape[0]) == 1  # empty maps fill the gaps


def test_affine_prealignment_runs_once_per_subject_and_is_cached(tmp_path, monkeypatch):
    from alignkit.train.subjects import load_subjects

    reference = Image.from_array(phantom(0), path="ref")
    shifted = Image.from_array(np.roll(phantom(0), (3, -2), axis=(0, 1)), path="shifted")
    plain = load_subjects([reference, shifted], SIZE)
    aligned = load_subjects([reference, shifted], SIZE, prealign="affine", cache_dir=tmp_path)

    def mse(data):
        return float(((data.subjects[0].image - data.subjects[1].image) ** 2).mean())

    assert mse(aligned) < 0.25 * mse(plain)
    assert len(list(tmp_path.glob("*.json"))) == 1  # the reference is not registered to itself

    def no_registration(*args, **kwargs):
        raise AssertionError("the cached matrix should have been used")

    monkeypatch.setattr(alignkit, "register", no_registration)
    again = load_subjects([reference, shifted], SIZE, prealign="affine", cache_dir=tmp_path)
    assert torch.equal(again.subjects[1].image, aligned.subjects[1].image)


def test_subject_based_data_sets_read_each_subject_once():
    from conftest import data_path

    from alignkit.train.subjects import dataset_data

    data_path("brain3d-aseg-pair")
    data = dataset_data("brain3d-aseg-pair")
    assert len(data.images) == 2 and data.case_pairs is None
    assert data.label_ids is not None and len(data.label_ids) == 30
    assert all(labels is not None and labels.grid.same_as(image.grid) for _, image, labels in data.images)


def test_training_runs_in_3d(tmp_path):
    volume = torch.zeros(1, 18, 16, 20)
    zz, yy, xx = torch.meshgrid(*(torch.linspace(-1, 1, n) for n in (18, 16, 20)), indexing="ij")
    volume[0] = torch.exp(-(zz**2 + (yy - 0.2) ** 2 + xx**2) * 3) + 0.5 * torch.exp(-((zz + 0.4) ** 2 + xx**2) * 20)
    image = Image(volume, Grid.from_spacing((18, 16, 20), (1.0, 1.2, 0.9)))
    subject = prepare_subject(image, (16, 16, 16))
    pairs = SyntheticPairs([subject], length=2, magnitude=1.5)
    config = _config(size=16, epochs=1, batch_size=2, network={"features": [4, 8], "output_scale": 0.5})
    result = train_method(config, tmp_path / "run3d", train_set=pairs, val_set=pairs)
    assert result.method.ndim == 3 and np.isfinite(result.history[-1]["val_loss"])
    transform = load_model(tmp_path / "run3d").predict(image, image)
    assert transform.map_on(image.grid).shape == (1, 3, 18, 16, 20)


class _ConstantVelocity(torch.nn.Module):
    """Outputs one fixed velocity whatever the input: to pin the conventions of predict()."""

    def __init__(self, velocity: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("v", velocity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v.expand(x.shape[0], *self.v.shape[1:])


def test_predict_maps_fixed_world_points_like_training_warps_voxels():
    # an asymmetric grid with anisotropic spacing and a swapped (raster) direction
    shape = (24, 32)
    grid = Grid.raster_2d(shape, spacing=1.5)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, shape[0]), torch.linspace(-1, 1, shape[1]), indexing="ij")
    velocity = torch.stack([1.5 * torch.sin(2 * xx), -1.0 * torch.cos(3 * yy)])[None]  # voxels, (row, col)
    method = VoxelMorph(networks={"network": _ConstantVelocity(velocity)}, ndim=2, size=shape, steps=5)
    fixed = Image(torch.rand(1, *shape), grid)
    moving = Image(torch.rand(1, *shape), grid)
    transform = method.predict(fixed, moving)
    world_map = transform.map_on(grid)
    displacement = method({"fixed": fixed.batch(), "moving": moving.batch()})["displacement"]  # voxels, array-axis order
    expected_voxels = grid.voxel_points() + displacement
    expected = alignkit.spatial.apply_matrix(grid.world_from_voxel, expected_voxels)
    torch.testing.assert_close(world_map, expected, atol=1e-4, rtol=0)
    # the inverse prediction undoes it (SVF: exp(-v) ∘ exp(v) = id), away from the border
    back = transform.inverse().transform_points(world_map)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    torch.testing.assert_close(back[inner], grid.world_points()[inner], atol=0.05, rtol=0)


def test_loss_is_a_per_pair_mean_so_batch_gradients_average_pair_gradients():
    """The property DDP equality rests on: grad(loss of a batch of 2) = mean of the 2 pair grads."""
    pairs, _ = _synthetic(length=2)
    subjects = [_subject(0), _subject(1)]
    for s, k in zip(subjects, (1, 2)):  # labels, so the Dice term is part of the check
        s.labels = (s.image > 0.3).long() * k
    pairs = SyntheticPairs(subjects, length=2, magnitude=2.5)
    torch.manual_seed(0)
    method = build_model(
        "voxelmorph", ndim=2, size=(SIZE, SIZE), network={**TINY_NET, "final_zero_init": False},
        similarity="lncc", window=5, dice_weight=0.5, flow_weight=0.1, label_ids=pairs.label_ids,
    )
    items = [pairs[0], pairs[1]]

    def grads(batch_items):
        batch = {k: torch.stack([it[k] for it in batch_items]) for k in ("fixed", "moving", "flow", "fixed_labels", "moving_labels")}
        method.zero_grad()
        loss, parts = method.loss(batch, method(batch))
        assert set(parts) == {"similarity", "diffusion", "dice", "flow"}
        loss.backward()
        return [p.grad.clone() for p in method.parameters()]

    both = grads(items)
    single = [grads([it]) for it in items]
    for g, g0, g1 in zip(both, *single):
        torch.testing.assert_close(g, (g0 + g1) / 2, atol=1e-6, rtol=1e-4)


def test_validation_scores_an_oracle_perfectly():
    """Validation Dice/EPE/similarity are measured against the truth: a method that returns the true
    field of each pair scores Dice 1, EPE 0 and similarity 0 (labels warped like the image)."""
    from alignkit.train import validate

    subjects = [_subject(0), _subject(1)]
    for s in subjects:
        s.labels = (s.image > 0.3).long()
    pairs = SyntheticPairs(subjects, length=4, magnitude=3.0, per_epoch=False)
    oracle = VoxelMorph(networks={"network": torch.nn.Identity()}, ndim=2, size=(SIZE, SIZE), steps=0, label_ids=[1], similarity="mse")
    truth = {pairs[i]["fixed"].numpy().tobytes(): pairs[i]["flow"] for i in range(len(pairs))}
    oracle.velocity = lambda fixed, moving: torch.stack([truth[f.numpy().tobytes()] for f in fixed])  # type: ignore[method-assign]
    scores = validate(oracle, pairs, batch_size=2, device=torch.device("cpu"))
    assert scores["val_dice"] == pytest.approx(1.0) and scores["val_epe"] == pytest.approx(0.0, abs=1e-6)
    assert scores["val_similarity"] == pytest.approx(0.0, abs=1e-8)
    identity = build_model("voxelmorph", ndim=2, size=(SIZE, SIZE), network=TINY_NET, label_ids=[1])
    before = validate(identity, pairs, batch_size=2, device=torch.device("cpu"))
    assert before["val_dice"] < 0.95 and before["val_epe"] > 0.5


# -- the training loop -------------------------------------------------------------------------
def test_a_few_epochs_lower_the_loss_and_the_field_error(tmp_path):
    # a fixed set of deformed copies (validation on the same pairs measures the fit, which a few
    # dozen steps can show; generalising to new deformations takes thousands)
    subjects = [_subject(0), _subject(1)]
    pairs = SyntheticPairs(subjects, length=8, magnitude=2.5, per_epoch=False)
    config = _config(epochs=6, batch_size=4, lr=1e-2, schedule="constant")
    result = train_method(config, tmp_path / "run", train_set=pairs, val_set=pairs)
    rows = result.history
    assert [r["epoch"] for r in rows] == list(range(7))
    assert rows[-1]["val_loss"] < 0.9 * rows[0]["val_loss"]
    assert rows[-1]["val_epe"] < rows[0]["val_epe"] - 0.01  # closer to the true field, not just blurrier
    assert rows[-1]["train_loss"] < rows[1]["train_loss"]
    header = (tmp_path / "run" / "log.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["epoch", "stage", "train_loss", "val_loss"] and "pairs_per_s" in header and "val_epe" in header
    assert len((tmp_path / "run" / "log.csv").read_text().splitlines()) == 1 + 7


class Interrupted(Exception):
    """Raised by :func:`_stop_after_first`: a training run cut off after its first epoch."""


def _stop_after_first(epoch, row):
    if epoch == 1:
        raise Interrupted


def test_tensorboard_events_hold_the_log_rows_when_tensorboard_is_installed(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard not installed (pip install alignkit[train])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_set, val_set = _synthetic(length=4)
    with pytest.raises(Interrupted):  # an interrupted run, then its resumption: one event per epoch
        train_method(_config(epochs=3), tmp_path / "run", train_set=train_set, val_set=val_set, callbacks=[_stop_after_first])
    result = train_method(_config(epochs=3), tmp_path / "run", train_set=train_set, val_set=val_set, resume=True)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"train_loss", "val_loss", "val_epe"} <= set(events.Tags()["scalars"])
    steps = [e.step for e in events.Scalars("val_loss")]
    assert sorted(steps) == [row["epoch"] for row in result.history] == [0, 1, 2, 3]
    logged = {e.step: e.value for e in events.Scalars("val_loss")}
    for row in result.history:
        assert logged[row["epoch"]] == pytest.approx(row["val_loss"], rel=1e-6)


def test_checkpoint_rebuilds_the_model_without_its_config_and_never_unpickles(tmp_path):
    train_set, val_set = _synthetic(length=4)
    result = train_method(_config(epochs=1), tmp_path / "run", train_set=train_set, val_set=val_set)
    (tmp_path / "run" / "config.json").unlink()  # load_model() must not need it
    path = result.checkpoint
    assert path is not None and path.parent == tmp_path / "run"
    if path.suffix == ".pt":  # the plain container: strings and tensors only
        raw = torch.load(path, weights_only=True)
        assert set(raw) == {"skeleton", "tensors"} and all(isinstance(t, torch.Tensor) for t in raw["tensors"].values())
    loaded = load_model(tmp_path / "run")
    assert type(loaded) is VoxelMorph and loaded.config == result.method.config
    item = val_set[0]
    fixed, moving = item["fixed"][None], item["moving"][None]
    with torch.no_grad():
        assert torch.equal(loaded({"fixed": fixed, "moving": moving})["displacement"], result.method({"fixed": fixed, "moving": moving})["displacement"])
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and state["networks"]["network"]["name"] == "unet" and state["networks"]["network"]["features"] == [4, 8, 8]
    assert set(state["optimizer"]["state"]) == set(range(len(list(loaded.parameters()))))  # int keys survive


def test_checkpoint_encoding_is_exact():
    payload = {"a": (1, 2.5, "x", None, True), 3: [torch.arange(3), {"n": float("inf")}], "t": torch.ones(2, 2)[:, 0]}
    skeleton, tensors = encode(payload)
    back = decode(skeleton, tensors)
    assert back["a"] == (1, 2.5, "x", None, True) and back[3][1]["n"] == float("inf")
    assert torch.equal(back[3][0], torch.arange(3)) and torch.equal(back["t"], torch.ones(2))
    with pytest.raises(TypeError):
        encode({"bad": object()})


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    train_set, val_set = _synthetic(length=4)
    whole = train_method(_config(epochs=3), tmp_path / "whole", train_set=train_set, val_set=val_set)

    train_set, val_set = _synthetic(length=4)
    with pytest.raises(Interrupted):
        train_method(_config(epochs=3), tmp_path / "cut", train_set=train_set, val_set=val_set, callbacks=[_stop_after_first])
    assert load_checkpoint(tmp_path / "cut")["epoch"] == 1
    torch.manual_seed(1234)  # the resumed run must not depend on the process's RNG state
    resumed = train_method(_config(epochs=3), tmp_path / "cut", train_set=train_set, val_set=val_set, resume=True)
    _assert_states_equal(_state(whole.method), _state(resumed.method))
    assert [r.get("train_loss") for r in whole.history] == [r.get("train_loss") for r in resumed.history]
    assert (tmp_path / "cut" / "log.csv").read_text().count("\n") == 1 + 4
    with pytest.raises(alignkit.ConfigError, match="lr"):
        train_method(_config(epochs=4, lr=1e-2), tmp_path / "cut", train_set=train_set, val_set=val_set, resume=True)


def test_same_seed_same_model_other_seed_other_model(tmp_path):
    runs = []
    for k, seed in enumerate((5, 5, 6)):
        train_set, _ = _synthetic(length=4, seed=seed)
        runs.append(train_method(_config(epochs=1, seed=seed), tmp_path / f"r{k}", train_set=train_set))
    _assert_states_equal(_state(runs[0].method), _state(runs[1].method))
    assert not torch.equal(runs[0].method.network.head.weight, runs[2].method.network.head.weight)


# -- command line ------------------------------------------------------------------------------
@pytest.fixture
def dataset_dir(tmp_path):
    folder = tmp_path / "phantoms"
    folder.mkdir()
    for k in range(4):
        PILImage.fromarray(phantom(k).astype(np.uint8)).save(folder / f"s{k}.png")
        labels = (phantom(k) > 40).astype(np.uint8) + (phantom(k) > 120)  # 1 = body, 2 = blobs
        PILImage.fromarray(labels.astype(np.uint8)).save(folder / f"s{k}_seg.png")
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"network": TINY_NET, "lr": 3e-3, "val_fraction": 0.25}))
    return folder, config


def _train_args(folder, config, out, batch):
    return ["train", "--dataset", folder, "-o", out, "--size", SIZE, "--epochs", 1, "--batch-size", batch,
            "--config", config, "--device", "cpu", "--seed", 3, "--quiet"]


def test_cli_train_writes_model_and_log_and_matches_two_gloo_processes(dataset_dir, tmp_path, capsys):
    """`alignkit train` in one process with batch 2 gives the model that `torchrun --nproc-per-node 2
    -m alignkit train` gives with batch 1 per process (DDP averages the per-process gradients)."""
    folder, config = dataset_dir
    single = tmp_path / "single"
    assert main([str(a) for a in _train_args(folder, config, single, 2)]) == 0
    assert (single / "config.json").is_file() and (single / "log.csv").is_file()
    rows = (single / "log.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("0,")  # header, untrained baseline, epoch 1
    state_single = load_checkpoint(single)
    assert state_single["method"]["config"]["label_ids"] == [1, 2]  # labels found next to the images
    assert 0.0 < state_single["history"][-1]["val_dice"] <= 1.0  # mean Dice of the held-out subject's pairs

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "alignkit", *[str(a) for a in _train_args(folder, config, ddp, 1)]]
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    state_ddp = load_checkpoint(ddp)
    initial = build_model("voxelmorph", ndim=2, size=(SIZE, SIZE), network=TINY_NET)
    moved = 0
    for key, value in state_single["model"].items():
        torch.testing.assert_close(state_ddp["model"][key], value, atol=2e-6, rtol=1e-5)
        moved += int(not torch.allclose(value, initial.state_dict()[key]))
    assert moved > 0  # the comparison is between trained models, not two copies of the start
    assert state_ddp["history"][-1]["train_loss"] == pytest.approx(state_single["history"][-1]["train_loss"], rel=1e-5)


def test_python_dash_m_alignkit_runs_the_cli():
    command = [sys.executable, "-m", "alignkit", "--version"]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("alignkit")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vxm")
    subjects = [_subject(k) for k in range(3)]
    train_set = SyntheticPairs(subjects, length=4, magnitude=2.5)
    train_method(_config(epochs=1, method_options={"similarity": "lncc", "window": 5}), out, train_set=train_set)
    return out


def _pair_files(tmp_path):
    fixed = tmp_path / "fixed.png"
    moving = tmp_path / "moving.png"
    PILImage.fromarray(phantom(0).astype(np.uint8)).save(fixed)
    PILImage.fromarray(phantom(1).astype(np.uint8)).save(moving)
    return fixed, moving


def test_cli_register_with_a_checkpoint_writes_the_classical_outputs(trained_run, tmp_path, capsys):
    fixed, moving = _pair_files(tmp_path)
    learned = tmp_path / "learned"
    code = main(["register", str(fixed), str(moving), "-o", str(learned), "--method", "voxelmorph",
                 "--checkpoint", str(trained_run / "model.pt" if (trained_run / "model.pt").exists() else trained_run)])
    assert code == 0, capsys.readouterr().err
    fast = tmp_path / "fast.json"
    # a small step: a stage whose objective rises is rejected by the engine (and would write no warp)
    fast.write_text(json.dumps({"stages": [{"transform": "svf", "levels": [1], "iterations": [2], "learning_rate": 0.1}]}))
    classical = tmp_path / "classical"
    assert main(["register", str(fixed), str(moving), "-o", str(classical), "--config", str(fast), "--quiet"]) == 0

    def names(folder):
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))

    assert names(learned) == names(classical)
    assert {"warped.png", "metrics.json", "qc.png", "flow.flo", "transform/warp.nii.gz", "transform/affine.txt"} <= set(names(learned))
    metrics = json.loads((learned / "metrics.json").read_text())
    assert metrics["method"] == "voxelmorph" and metrics["preset"] == "voxelmorph"
    # the written transform is the predicted one: `alignkit apply` reproduces the warped image
    applied = tmp_path / "applied.png"
    assert main(["apply", str(learned / "transform"), str(moving), "-o", str(applied)]) == 0
    a = np.asarray(PILImage.open(applied), dtype=np.float64)
    b = np.asarray(PILImage.open(learned / "warped.png"), dtype=np.float64)
    assert np.abs(a - b).max() <= 1.0


def test_refine_improves_the_similarity_over_the_raw_prediction(trained_run, tmp_path):
    fixed, moving = _pair_files(tmp_path)
    raw = alignkit.register(fixed, moving, method="voxelmorph", checkpoint=trained_run)
    refined = alignkit.register(fixed, moving, method="voxelmorph", checkpoint=trained_run, refine=30)
    assert refined.metrics["ncc_after"] > raw.metrics["ncc_after"] + 0.01
    assert refined.metrics["stages"] == ["svf", "svf"] and refined.metrics["refine_iterations"] == 30
    assert refined.metrics["nonpositive_jacobian_percent"] < 1.0
    # with a linear pre-alignment the transform files hold it as an ITK affine
    aligned = alignkit.register(fixed, moving, method="voxelmorph", checkpoint=trained_run, transform="affine")
    assert aligned.metrics["stages"] == ["affine", "svf"]
    saved = aligned.save(tmp_path / "aligned")
    manifest = json.loads((saved / "transform" / "manifest.json").read_text())
    assert manifest["stages"][-2:] == ["affine", "svf"] and manifest["method"] == "voxelmorph"
    assert all(kind.startswith("init:") for kind in manifest["stages"][:-2])  # the engine's starting translation
    assert manifest["matrix"] != np.eye(3).tolist()


def test_refinement_of_a_big_volume_is_fitted_on_a_capped_grid():
    """Instance optimisation at full resolution of a 1 mm head costs minutes an iteration on a CPU:
    its SVF level is capped at REFINE_MAX_VOXELS, small inputs stay at full resolution."""
    from alignkit.methods.api import REFINE_MAX_VOXELS, refine_config
    from alignkit.solve.engine import level_factor

    stage = refine_config(3, 20)
    assert stage.iterations == (20,) and stage.levels == (1.0,) and not stage.is_linear
    head = (256, 256, 160)
    factor = level_factor(stage.levels[0], head, stage.max_level_voxels)
    assert factor > 1.0 and np.prod([n / factor for n in head]) <= REFINE_MAX_VOXELS * (1 + 1e-9)
    assert level_factor(refine_config(2, 5).levels[0], (512, 512), refine_config(2, 5).max_level_voxels) == 1.0


def test_cli_errors_are_one_line_with_exit_code_2(trained_run, dataset_dir, tmp_path, capsys):
    fixed, moving = _pair_files(tmp_path)
    cases = [
        ["register", fixed, moving, "-o", tmp_path / "a", "--method", "voxelmorph"],
        ["register", fixed, moving, "-o", tmp_path / "b", "--method", "voxelmorph", "--preset", "brain"],
        ["register", fixed, moving, "-o", tmp_path / "c", "--method", "nonesuch", "--checkpoint", trained_run],
        ["register", fixed, moving, "-o", tmp_path / "d", "--method", "voxelmorph", "--checkpoint", tmp_path / "none.pt"],
        ["train", "--dataset", tmp_path / "missing", "-o", tmp_path / "e"],
        ["train", "--dataset", dataset_dir[0], "-o", tmp_path / "f", "--size", "4"],
        ["train", "--dataset", tmp_path / "missing", "--layout", "folder", "-o", tmp_path / "g"],
    ]
    for argv in cases:
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 2, argv
        assert err.startswith("alignkit: error:") and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists()


def test_a_plain_folder_is_found_by_name_under_the_data_root_and_another_network_keeps_its_defaults(
    dataset_dir, tmp_path, monkeypatch
):
    """``--dataset NAME --layout folder`` looks NAME up under the data root like a registered data
    set; a ``network`` of another name than the method's default gets none of the default's options
    (the U-Net's ``residual`` means nothing to the LKU-Net)."""
    folder, config = dataset_dir
    monkeypatch.setenv("ALIGNKIT_DATA", str(folder.parent))
    monkeypatch.chdir(tmp_path / "..")
    config.write_text(json.dumps({"network": {"name": "lkunet", "features": [4, 8]}, "val_fraction": 0.25}))
    argv = ["train", "--dataset", folder.name, "--layout", "folder", "-o", tmp_path / "run", "--size", SIZE,
            "--epochs", 1, "--config", config, "--quiet"]
    assert main([str(a) for a in argv]) == 0
    model = load_model(tmp_path / "run")
    assert type(model.network).__name__ == "LKUNet"
    specs = VoxelMorph.network_specs_for(2, {"network": {"name": "lkunet"}})
    assert specs == {"network": {"name": "lkunet", "ndim": 2, "in_channels": 2, "out_channels": 2}}
    assert VoxelMorph.network_specs_for(3, {"network": {"features": [8]}})["network"]["residual"] is False


def test_landmark_error_is_zero_for_the_true_shift_and_nan_without_landmarks():
    from alignkit.methods.heads import landmark_errors

    p = torch.tensor([[[3.0, 4.0], [10.0, 7.5], [5.0, 12.0]]] * 2)  # (B=2, N=3, ndim=2)
    shift = torch.tensor([1.5, -2.0])
    q = p + shift
    true_field = shift.view(1, 2, 1, 1).expand(2, 2, 16, 16)
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    exact = landmark_errors(true_field, p, q, mask)
    assert exact[0].abs() < 1e-5 and torch.isnan(exact[1])
    identity = landmark_errors(torch.zeros(2, 2, 16, 16), p, q, torch.ones(2, 3))
    assert torch.allclose(identity, torch.full((2,), 2.5))  # |(1.5, -2)| = 2.5 voxels


def _landmark_folder(folder, shifts, *, shape=(40, 44)):
    """Shifted copies ``s<k>.png`` of one phantom with its blob centres as ``s<k>_landmarks.csv``
    (world x, y via the image grid): landmarks that truly correspond."""
    from alignkit.io import read_image
    from alignkit.spatial import apply_matrix, points_to_tensor, tensor_to_points

    folder.mkdir()
    for k, shift in enumerate(shifts):
        image = np.roll(phantom(0, shape), shift, axis=(0, 1))
        PILImage.fromarray(image.astype(np.uint8)).save(folder / f"s{k}.png")
        grid = read_image(folder / f"s{k}.png").grid
        voxels = torch.as_tensor(phantom_blob_centres(0, shape) + np.asarray(shift), dtype=torch.float64)
        world = tensor_to_points(apply_matrix(grid.world_from_voxel, points_to_tensor(voxels)))
        rows = "\n".join(",".join(f"{v:.6f}" for v in point) for point in world.tolist())
        (folder / f"s{k}_landmarks.csv").write_text("x,y\n" + rows + "\n")


def test_landmarks_follow_the_prealignment_into_the_reference_space(tmp_path):
    """A subject that is the reference shifted by (3, -2) px: after affine pre-alignment its
    landmarks, carried through the inverse of the pre-alignment matrix, land on the reference's."""
    from alignkit.io import read_points
    from alignkit.train import load_subjects

    folder = tmp_path / "lm"
    _landmark_folder(folder, [(0, 0), (3, -2)], shape=(56, 60))
    subjects = load_subjects(folder, 32, layout="folder", prealign="affine", cache_dir=tmp_path / "cache").subjects
    a, b = subjects
    assert torch.allclose(a.points.double(), read_points(folder / "s0_landmarks.csv", 2), atol=1e-4)
    assert (b.points - a.points).norm(dim=1).max() < 0.5  # was sqrt(13) = 3.6 px apart before


def test_training_with_landmark_supervision_lowers_the_landmark_error(tmp_path, capsys):
    """Folder images with ``<stem>_landmarks.csv``: the pairs carry the points, the loss has a
    landmark term, and log.csv a ``val_tre`` column that training lowers."""
    folder = tmp_path / "lm"
    _landmark_folder(folder, [(0, 0), (2, -3), (-3, 2), (1, 3)])
    config = tmp_path / "train.json"
    config.write_text(json.dumps({
        "network": TINY_NET, "lr": 1e-2, "val_subjects": ["s3"],
        "method_options": {"similarity": "mse", "regularizer_weight": 0.01, "landmark_weight": 0.05},
    }))
    # (without the landmark term, MSE alone leaves the held-out TRE where it was at this budget)
    argv = ["train", "--dataset", folder, "-o", tmp_path / "run", "--size", SIZE, "--epochs", 12,
            "--config", config, "--quiet"]
    assert main([str(a) for a in argv]) == 0
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    tre = [float(r.split(",")[header.index("val_tre")]) for r in rows[1:]]
    assert len(tre) == 13 and tre[-1] < 0.9 * tre[0], tre


def test_torch_load_of_a_pickled_object_is_refused(tmp_path):
    """A .pt file holding arbitrary Python objects is rejected, not unpickled."""
    evil = tmp_path / "model.pt"
    torch.save({"skeleton": "{}", "tensors": {}, "obj": shutil.copy}, evil)
    with pytest.raises(alignkit.InputError):
        load_model(evil)
