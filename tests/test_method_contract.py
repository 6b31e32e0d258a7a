"""The method contract, exercised by toy methods of each shape the papers need, written here from the
public API only (``alignkit.methods``, ``alignkit.train``, ``alignkit.nets``):

* ``toy-affine``: a recurrent network predicting an affine matrix, trained on pairs whose truth is a
  matrix, one step at training and two at test time; evaluated on an affine case;
* ``toy-flow``: a two-input (two-stream) network predicting a displacement, supervised by the true
  field; evaluated on a flow case;
* ``toy-per-pair``: a network and a translation optimised together on the pair itself (no training
  set, ``learned-per-pair``); evaluated on an affine case;
* ``toy-two-stage``: an affine network then a field network, trained in stages (the second with the
  first frozen); evaluated on a deformable case.

Each trains briefly, registers (Python and CLI), saves, applies (``alignkit apply``), exports (ITK
affine / displacement field) and is scored by ``alignkit evaluate``'s runner.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from phantoms import phantom
from torch import nn

import alignkit
from alignkit.cli import main
from alignkit.data.synthetic import random_affine, random_smooth_deformation
from alignkit.evaluate.registered import RegisteredMethod
from alignkit.evaluate.runner import evaluate
from alignkit.image import Image
from alignkit.io import read_image
from alignkit.methods import (
    LearnedModel,
    Method,
    MethodInfo,
    MethodOutput,
    learned_method,
    load_model,
    register_method,
    train_method,
)
from alignkit.methods.heads import LearnedDisplacement, matrix_displacement, voxel_matrix_transform
from alignkit.spatial import apply_matrix, sample_world, voxel_matrix_from_unit_matrix
from alignkit.train import SyntheticAffinePairs, SyntheticPairs, TrainingStage, prepare_subject
from alignkit.transforms import ComposedTransform, build_transform
from alignkit.transforms.folder import load_transform

SIZE = 32
AFFINE_NET = {"name": "recurrent_affine", "features": [4, 8, 8], "num_steps": 1, "hidden": 16, "pool_size": 2}


def _subjects(n: int = 3):
    return [prepare_subject(Image.from_array(phantom(k)), (SIZE, SIZE), name=f"p{k}") for k in range(n)]


def _config(**overrides):
    values = {"size": SIZE, "epochs": 2, "batch_size": 2, "lr": 3e-3, "quiet": True, "device": "cpu", "seed": 0}
    values.update(overrides)
    return values


def _mse(a, b):
    return ((a - b) ** 2).flatten(1).mean(1).mean()


# -- the toy methods (built from the public contract only) -----------------------------------------
@learned_method(MethodInfo(name="toy-affine", kind="learned", summary="test: recurrent affine network",
                           ndims=(2,), case_kinds=("affine",), needs_checkpoint=True))
class ToyAffine(LearnedModel):
    """Matrix head; ``train_steps`` recurrent steps when training, ``test_steps`` at inference."""

    @classmethod
    def default_networks(cls, ndim):
        return {"affine": {**AFFINE_NET, "ndim": ndim}}

    def __init__(self, *, networks, ndim, size, train_steps: int = 1, test_steps: int = 2):
        super().__init__(networks=networks, ndim=ndim, size=size)
        self.options = {"train_steps": int(train_steps), "test_steps": int(test_steps)}

    def forward(self, batch):
        fixed, moving = batch["fixed"].float(), batch["moving"].float()
        steps = self.options["train_steps"] if self.training else self.options["test_steps"]
        theta = self.affine(fixed, moving, steps=steps)[-1]
        matrix = voxel_matrix_from_unit_matrix(theta, fixed.shape[2:], moving.shape[2:])
        displacement = matrix_displacement(matrix, fixed.shape[2:])
        return {"matrix": matrix, "displacement": displacement, "warped": self.warp(moving, displacement)}

    def loss(self, batch, output, *, epoch):
        parts = {"similarity": _mse(output["warped"], batch["fixed"])}
        if "matrix" in batch:  # supervised by the true matrix, through the field it makes
            truth = matrix_displacement(batch["matrix"], batch["fixed"].shape[2:])
            parts["matrix"] = ((output["displacement"] - truth) ** 2).sum(1).flatten(1).mean(1).mean()
        total = parts["similarity"] + 0.01 * parts.get("matrix", 0.0)
        return total, {k: v.detach() for k, v in parts.items()}

    def predict_transform(self, grid, fixed, moving):
        return voxel_matrix_transform(self({"fixed": fixed, "moving": moving})["matrix"][0], grid, kind="affine")


@learned_method(MethodInfo(name="toy-flow", kind="learned", summary="test: two-stream displacement network",
                           ndims=(2,), case_kinds=("flow", "deformable"), needs_checkpoint=True))
class ToyFlow(LearnedModel):
    @classmethod
    def default_networks(cls, ndim):
        return {"flow_net": {"name": "pyramid_unet", "ndim": ndim, "stream_features": [4, 8],
                             "merge_features": [4, 8], "decoder_features": [8], "head_features": 4,
                             "first_kernel": 3}}

    def forward(self, batch):
        fixed, moving = batch["fixed"].float(), batch["moving"].float()
        displacement = self.flow_net(fixed, moving)  # two inputs, one per stream
        return {"displacement": displacement, "warped": self.warp(moving, displacement)}

    def loss(self, batch, output, *, epoch):
        parts = {"similarity": _mse(output["warped"], batch["fixed"])}
        if "flow" in batch:
            parts["flow"] = ((output["displacement"] - batch["flow"]) ** 2).sum(1).flatten(1).mean(1).mean()
        total = parts["similarity"] + 0.1 * parts.get("flow", 0.0)
        return total, {k: v.detach() for k, v in parts.items()}

    def predict_transform(self, grid, fixed, moving):
        return LearnedDisplacement(grid, self({"fixed": fixed, "moving": moving})["displacement"])


@learned_method(MethodInfo(name="toy-two-stage", kind="learned", summary="test: affine then field, in stages",
                           ndims=(2,), case_kinds=("deformable",), needs_checkpoint=True))
class ToyTwoStage(LearnedModel):
    """``y = A(p + u(p))``: an affine network, then a field network on the affinely aligned pair."""

    @classmethod
    def default_networks(cls, ndim):
        return {"affine": {**AFFINE_NET, "ndim": ndim},
                "field": {"name": "unet", "ndim": ndim, "in_channels": 2, "out_channels": ndim, "features": [4, 8]}}

    def training_stages(self):
        return [TrainingStage("affine", networks=("affine",)), TrainingStage("field", networks=("field",))]

    def forward(self, batch):
        fixed, moving = batch["fixed"].float(), batch["moving"].float()
        theta = self.affine(fixed, moving)[-1]
        matrix = voxel_matrix_from_unit_matrix(theta, fixed.shape[2:], moving.shape[2:])
        affine_only = matrix_displacement(matrix, fixed.shape[2:])
        field = torch.zeros_like(affine_only)
        if self.stage == "field" or not self.training:
            field = self.field(torch.cat([self.warp(moving, affine_only), fixed], 1))
        # moving sampled at A [p + u(p); 1]: the field acts first, then the matrix
        identity = self._identity_on(field)
        displacement = apply_matrix(matrix, identity + field) - identity
        return {"matrix": matrix, "field": field, "displacement": displacement,
                "warped": self.warp(moving, displacement)}

    def loss(self, batch, output, *, epoch):
        parts = {"similarity": _mse(output["warped"], batch["fixed"])}
        total = parts["similarity"]
        if self.stage == "field":
            parts["smooth"] = sum((output["field"].diff(dim=d) ** 2).mean() for d in (2, 3))
            total = total + 0.1 * parts["smooth"]
        return total, {k: v.detach() for k, v in parts.items()}

    def predict_transform(self, grid, fixed, moving):
        output = self({"fixed": fixed, "moving": moving})
        return ComposedTransform([voxel_matrix_transform(output["matrix"][0], grid),
                                  LearnedDisplacement(grid, output["field"])])


@register_method
class ToyPerPair(Method):
    """A 1x1-convolution intensity map and a translation, optimised together on the pair (MSE)."""

    info = MethodInfo(name="toy-per-pair", kind="learned-per-pair", summary="test: network + translation per pair",
                      ndims=(2,), case_kinds=("affine",))

    def __init__(self, *, iterations: int = 60):
        self.iterations = int(iterations)

    def run(self, inputs, *, device, seed, progress):
        torch.manual_seed(0 if seed is None else seed)
        fixed, moving = inputs.fixed, inputs.moving
        network = nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            network.weight.fill_(1.0)
            network.bias.zero_()
        translation = build_transform("translation", fixed.grid)
        optimizer = torch.optim.Adam([*network.parameters(), *translation.parameters()], lr=0.02)
        target = fixed.batch() / fixed.data.max()
        source = moving.batch() / moving.data.max()
        for _ in range(self.iterations):
            optimizer.zero_grad()
            warped = sample_world(source, moving.grid, translation.map_on(fixed.grid))
            loss = _mse(network(warped), target)
            loss.backward()
            optimizer.step()
        translation.requires_grad_(False)
        return MethodOutput(transform=translation, name="toy-per-pair", stages=["translation"],
                            description={"iterations": self.iterations, "final_loss": float(loss.detach())})


# -- cases -----------------------------------------------------------------------------------------
def _image(seed=0):
    return Image.from_array(phantom(seed))


def _affine_case():
    return random_affine(_image(), seed=3, rotation=4.0, scale=0.04, shear=0.0, translation=0.06)


def _translation_case():
    return random_affine(_image(), seed=5, rotation=0.0, scale=0.0, shear=0.0, translation=0.08)


def _flow_case():
    case = random_smooth_deformation(_image(), seed=1, translation=1.0, amplitude=2.0)
    return dataclasses.replace(case, kind="flow", name="flow-phantom")


def _deformable_case():
    return random_smooth_deformation(_image(1), seed=2, translation=1.0, amplitude=2.0)


def _save_apply_export(result, tmp_path, *, expect_warp: bool):
    """save → transform files (ITK affine and/or ANTs warp) → `alignkit apply` reproduces `warped`."""
    out = result.save(tmp_path / "out", moving_suffix=".npy", qc=False)
    manifest = json.loads((out / "transform" / "manifest.json").read_text())
    assert manifest["method"] == result.method and manifest["stages"] == [s.kind for s in result.transform.flat_stages()]
    assert (out / "transform" / "affine.txt").is_file()
    assert (out / "transform" / "warp.nii.gz").is_file() == expect_warp
    moving_file = tmp_path / "moving.npy"
    np.save(moving_file, result.moving.data[0].numpy())
    assert main(["apply", str(out / "transform"), str(moving_file), "-o", str(tmp_path / "applied.npy")]) == 0
    applied = read_image(tmp_path / "applied.npy").data
    np.testing.assert_allclose(applied.numpy(), result.warped.data.numpy(), atol=1e-3 * float(result.moving.data.max()))
    transform, grid, _ = load_transform(out / "transform")
    np.testing.assert_allclose(transform.map_on(grid).numpy(), result.world_map().numpy(), atol=1e-3)


def _evaluated(case, method, tmp_path, **options):
    (row,) = evaluate([case], [method], out_dir=tmp_path / "eval", isolate=False, threads=1, progress=False, **options)
    assert row["status"] == "ok", row.get("message")
    return row


# -- the tests ---------------------------------------------------------------------------------------
def test_registry_lists_every_kind_with_what_it_handles():
    infos = {info.name: info for info in alignkit.methods.available()}
    assert infos["classical"].kind == "optimisation" and not infos["classical"].needs_checkpoint
    assert infos["voxelmorph"].kind == "learned" and infos["voxelmorph"].trainable
    assert infos["toy-per-pair"].kind == "learned-per-pair" and not infos["toy-per-pair"].trainable
    assert infos["toy-affine"].case_kinds == ("affine",) and infos["toy-flow"].ndims == (2,)


def test_a_network_predicting_an_affine_matrix(tmp_path):
    subjects = _subjects()
    train_set = SyntheticAffinePairs(subjects, length=8, magnitude=2.0, rotation=5.0, scaling=0.05)
    val_set = SyntheticAffinePairs(subjects, length=4, magnitude=2.0, rotation=5.0, scaling=0.05, per_epoch=False, seed=9)
    item = train_set[0]
    assert item["matrix"].shape == (3, 3) and item["flow"].shape == (2, SIZE, SIZE)
    result = train_method(_config(method="toy-affine", epochs=3), tmp_path / "run", train_set=train_set, val_set=val_set)
    rows = result.history
    assert rows[-1]["val_matrix_error"] < rows[0]["val_matrix_error"]  # it learned the matrices
    model = load_model(tmp_path / "run")
    assert isinstance(model, ToyAffine) and model.options == {"train_steps": 1, "test_steps": 2}
    batch = {k: v[None] for k, v in val_set[0].items() if torch.is_tensor(v) and v.dim() > 0}
    model.train()
    one_step = model(batch)["matrix"]
    model.eval()
    two_steps = model(batch)["matrix"]
    assert not torch.allclose(one_step, two_steps)  # test time runs more steps than training

    case = _affine_case()
    registration = alignkit.register(case.fixed, case.moving, method="toy-affine", checkpoint=tmp_path / "run")
    assert registration.transform.is_linear and registration.stages == ["affine"]
    _save_apply_export(registration, tmp_path, expect_warp=False)
    row = _evaluated(case, f"toy-affine:{tmp_path / 'run'}", tmp_path)
    assert np.isfinite(row["corner_error"]) and row["corner_error_before"] > 0  # scored from the exact matrix


def test_a_two_input_network_predicting_a_displacement(tmp_path):
    subjects = _subjects()
    train_set = SyntheticPairs(subjects, length=8, magnitude=2.0)
    val_set = SyntheticPairs(subjects, length=4, magnitude=2.0, per_epoch=False, seed=9)
    result = train_method(_config(method="toy-flow", epochs=3), tmp_path / "run", train_set=train_set, val_set=val_set)
    assert result.history[-1]["val_epe"] < result.history[0]["val_epe"]
    case = _flow_case()
    registration = alignkit.register(case.fixed, case.moving, method="toy-flow", checkpoint=tmp_path / "run")
    assert registration.stages == ["displacement"]
    _save_apply_export(registration, tmp_path, expect_warp=True)
    # the CLI runs it too, and writes the same files
    fixed_file, moving_file = tmp_path / "f.npy", tmp_path / "m.npy"
    np.save(fixed_file, case.fixed.data[0].numpy())
    np.save(moving_file, case.moving.data[0].numpy())
    argv = ["register", fixed_file, moving_file, "-o", tmp_path / "cli", "--method", "toy-flow", "--checkpoint",
            tmp_path / "run", "--quiet", "--no-qc"]
    assert main([str(a) for a in argv]) == 0 and (tmp_path / "cli" / "flow.flo").is_file()
    row = _evaluated(case, f"toy-flow:{tmp_path / 'run'}", tmp_path)
    assert np.isfinite(row["epe"])
    refined = _evaluated(case, f"toy-flow:{tmp_path / 'run'}+refine3", tmp_path / "r")
    assert refined["extra_refine_iterations"] == 3


def test_a_method_that_learns_per_pair_without_a_training_set(tmp_path):
    case = _translation_case()
    registration = alignkit.register(case.fixed, case.moving, method="toy-per-pair", iterations=80)
    truth = torch.as_tensor(case.matrix, dtype=torch.float64)
    found = registration.transform.matrix().double()
    assert float((found[:2, 2] - truth[:2, 2]).abs().max()) < 1.0  # within a pixel of the true shift
    _save_apply_export(registration, tmp_path, expect_warp=False)
    with pytest.raises(alignkit.ConfigError, match="takes no option 'checkpoint'"):
        alignkit.register(case.fixed, case.moving, method="toy-per-pair", checkpoint="x")
    row = _evaluated(case, RegisteredMethod("toy-per-pair", iterations=80), tmp_path)
    assert row["corner_error"] < 1.5 < row["corner_error_before"]


def test_a_two_stage_model_trains_its_parts_in_stages(tmp_path):
    subjects = _subjects()
    train_set = SyntheticAffinePairs(subjects, length=8, magnitude=2.0, rotation=5.0, scaling=0.05)
    val_set = SyntheticAffinePairs(subjects, length=2, magnitude=2.0, per_epoch=False, seed=9)
    snapshots = {}

    def remember(epoch, row):
        snapshots[epoch] = {k: v.detach().clone() for k, v in result_model[0].state_dict().items()}

    from alignkit.methods import build_model

    torch.manual_seed(0)
    model = build_model("toy-two-stage", ndim=2, size=(SIZE, SIZE))
    result_model = [model]
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = _config(method="toy-two-stage", epochs=1, stage_epochs={"affine": 2, "field": 2})
    result = train_method(config, tmp_path / "run", model=model, train_set=train_set, val_set=val_set,
                          callbacks=[remember])
    assert [row.get("stage") for row in result.history] == ["affine", "affine", "affine", "field", "field"]
    field_keys = [k for k in initial if k.startswith("field.")]
    affine_keys = [k for k in initial if k.startswith("affine.")]
    # stage 1 trains the affine network only; stage 2 the field network only (the affine one frozen)
    assert all(torch.equal(snapshots[2][k], initial[k]) for k in field_keys)
    assert any(not torch.equal(snapshots[2][k], initial[k]) for k in affine_keys)
    assert all(torch.equal(snapshots[4][k], snapshots[2][k]) for k in affine_keys)
    assert any(not torch.equal(snapshots[4][k], snapshots[2][k]) for k in field_keys)
    header = (tmp_path / "run" / "log.csv").read_text().splitlines()[0]
    assert header.startswith("epoch,stage,train_loss,val_loss")

    case = _deformable_case()
    registration = alignkit.register(case.fixed, case.moving, method="toy-two-stage", checkpoint=tmp_path / "run")
    assert registration.stages == ["affine", "displacement"]
    _save_apply_export(registration, tmp_path, expect_warp=True)
    row = _evaluated(case, f"toy-two-stage:{tmp_path / 'run'}", tmp_path)
    assert np.isfinite(row["nonpositive_jacobian_percent"])


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("stop_after", [2, 3])  # at a stage boundary, and inside the second stage
def test_resuming_a_staged_run_repeats_the_uninterrupted_one(tmp_path, stop_after):
    subjects = _subjects(2)
    train_set = SyntheticAffinePairs(subjects, length=4, magnitude=2.0, rotation=5.0, scaling=0.05)
    config = _config(method="toy-two-stage", epochs=1, stage_epochs={"affine": 2, "field": 2})
    whole = train_method(config, tmp_path / "whole", train_set=train_set)

    def stop(epoch, row):
        if epoch == stop_after:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        train_method(config, tmp_path / "cut", train_set=train_set, callbacks=[stop])
    torch.manual_seed(99)  # the resumed run must not depend on the process's RNG state
    resumed = train_method(config, tmp_path / "cut", train_set=train_set, resume=True)
    assert [r["stage"] for r in resumed.history] == ["affine", "affine", "field", "field"]
    for key, value in whole.method.state_dict().items():
        assert torch.equal(value, resumed.method.state_dict()[key]), key
    assert [r["train_loss"] for r in whole.history] == [r["train_loss"] for r in resumed.history]


def test_the_loss_sees_the_epoch_for_per_epoch_weight_schedules(tmp_path):
    subjects = _subjects(2)
    train_set = SyntheticAffinePairs(subjects, length=4, magnitude=2.0)
    from alignkit.methods import build_model

    torch.manual_seed(0)
    model = build_model("toy-affine", ndim=2, size=(SIZE, SIZE))
    seen = []
    original = model.loss

    def recording_loss(batch, output, *, epoch):
        seen.append((epoch, model.training))
        return original(batch, output, epoch=epoch)

    model.loss = recording_loss  # type: ignore[method-assign]
    train_method(_config(method="toy-affine", epochs=3), tmp_path / "run", model=model, train_set=train_set,
                 val_set=train_set)
    training_epochs = sorted({epoch for epoch, training in seen if training})
    assert training_epochs == [1, 2, 3]  # every step knows its epoch (AVSM's eq. 13 weight needs it)
    assert {epoch for epoch, training in seen if not training} == {0, 1, 2, 3}  # and so does validation
