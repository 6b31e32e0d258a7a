"""AVSM (Shen et al., Networks for Joint Affine and Non-parametric Image Registration, CVPR 2019): the
affine update rule, identity at initialisation, the symmetry losses, eq. 13's schedule, and a tiny
model trained in its three stages on affinely and smoothly deformed real brain slices."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import data_path

import alignkit
from alignkit.errors import ConfigError
from alignkit.image import Image
from alignkit.io import read_image
from alignkit.losses import AffineInverseConsistency, InverseConsistency
from alignkit.methods import build_model, load_model, train_method
from alignkit.methods.avsm import AVSM, affine_regularizer_weight
from alignkit.methods.heads import matrix_displacement, voxel_grid
from alignkit.nets.affine import RecurrentAffineHead
from alignkit.train import SyntheticAffinePairs, prepare_subject

SIZE = 40
TINY = {"affine": {"features": [4, 8, 8], "hidden": 16, "pool_size": 2}, "vsvf": {"features": [4, 8, 8]}}


def _model(**options) -> AVSM:
    torch.manual_seed(0)
    model = build_model("avsm", ndim=2, size=(SIZE, SIZE), networks=TINY, **options)
    assert isinstance(model, AVSM)
    return model


def test_two_affine_steps_compose_to_the_product_of_their_updates():
    head = RecurrentAffineHead(ndim=2, features=[4, 8], hidden=8, pool_size=2)
    updates = [torch.tensor([[[1.05, 0.02, 0.1], [-0.03, 0.98, -0.05]]]),
               torch.tensor([[[0.97, -0.04, -0.02], [0.01, 1.02, 0.07]]])]
    calls = iter(updates)
    head.update = lambda fixed, warped: next(calls)  # type: ignore[method-assign]
    fixed = moving = torch.rand(1, 1, 16, 16)
    composed = head(fixed, moving, steps=2)[-1]
    def h(m):
        return torch.cat([m[0], torch.tensor([[0.0, 0.0, 1.0]])])
    torch.testing.assert_close(composed[0], (h(updates[0]) @ h(updates[1]))[:2], atol=1e-6, rtol=0)


def test_the_untrained_model_is_the_identity():
    model = _model().eval()
    batch = {"fixed": torch.rand(2, 1, SIZE, SIZE), "moving": torch.rand(2, 1, SIZE, SIZE)}
    with torch.no_grad():
        out = model(batch)
    torch.testing.assert_close(out["matrix"], torch.eye(3).expand(2, 3, 3), atol=1e-6, rtol=0)
    # the momentum head starts at N(0, 1e-5) in unit-cube coordinates: ~1e-3 voxels of motion
    assert float(out["displacement"].abs().max()) < 1e-2


def test_symmetry_losses_vanish_for_an_exact_inverse_pair_only():
    angle = math.radians(6.0)
    matrix = torch.tensor([[math.cos(angle), -math.sin(angle), 0.05], [math.sin(angle), math.cos(angle), -0.1],
                           [0.0, 0.0, 1.0]], dtype=torch.float64)
    inverse = torch.linalg.inv(matrix)
    affine = AffineInverseConsistency()
    assert float(affine(matrix, inverse)) < 1e-20 and float(affine(matrix, matrix)) > 1e-3
    grid = voxel_grid((SIZE, SIZE))
    scale = torch.diag(torch.tensor([SIZE / 2, SIZE / 2, 1.0], dtype=torch.float64))
    forward = matrix_displacement((scale @ matrix @ torch.linalg.inv(scale))[None].float(), (SIZE, SIZE))
    backward = matrix_displacement((scale @ inverse @ torch.linalg.inv(scale))[None].float(), (SIZE, SIZE))
    dense = InverseConsistency()
    exact, wrong = float(dense(forward, backward, grid)), float(dense(forward, forward, grid))
    assert exact < 1e-3 * wrong and wrong > 0.1


def test_the_affine_regulariser_weight_follows_eq_13():
    assert affine_regularizer_weight(0) == pytest.approx(10 * 4 / (4 + 1))
    weights = [affine_regularizer_weight(n) for n in range(0, 60, 5)]
    assert all(a > b for a, b in itertools.pairwise(weights)) and weights[-1] < 1e-4


def test_a_short_run_needs_eq_13_compressed_or_its_loss_prefers_the_identity_to_the_true_affine():
    """Why the affine network learnt only translations (issue 11): eq. 13 counts the paper's epochs
    (80,000 iterations per part). In a run of a few epochs, lambda_ar stays 7.6 ... 5.9, and the affine
    stage's loss of a real slice moved by 12 degrees and 0.15 (unit frame) is lower at the identity
    than at the exact answer; compressed 8x (``ar_epoch_scale``), the exact answer wins from epoch 2."""
    from alignkit.nets.affine import warp_affine
    from alignkit.spatial import homogeneous

    fixed = prepare_subject(read_image(data_path("brain2d", "r16slice.jpg")), (SIZE, SIZE),
                            percentiles=AVSM.intensity_percentiles).image[None]
    angle = math.radians(12.0)
    true = torch.tensor([[[math.cos(angle), -math.sin(angle), 0.15], [math.sin(angle), math.cos(angle), -0.15]]])
    inverse = torch.linalg.inv(homogeneous(true))[:, :2]
    moving = warp_affine(fixed, inverse, (SIZE, SIZE), padding="border")  # moving ∘ true = fixed
    batch = {"fixed": fixed, "moving": moving}

    def losses(model, matrix, matrix_ts):
        output = {"unit_matrix": homogeneous(matrix), "unit_matrix_ts": homogeneous(matrix_ts),
                  "warped": warp_affine(moving, matrix, (SIZE, SIZE)), "warped_ts": warp_affine(fixed, matrix_ts, (SIZE, SIZE))}
        return [float(model.loss(batch, output, epoch=epoch)[0]) for epoch in (1, 2, 3, 4)]

    eye = torch.eye(2, 3)[None]
    paper, compressed = _model(), _model(ar_epoch_scale=8.0)
    paper.set_stage("affine-1step")
    compressed.set_stage("affine-1step")
    at_identity = losses(paper, eye, eye)
    assert all(t > i for t, i in zip(losses(paper, true, inverse), at_identity))  # measured 2.02 ... 1.59 vs 0.62
    assert all(t < 0.5 * i for t, i in zip(losses(compressed, true, inverse)[1:], at_identity[1:]))  # 0.20 ... 0.02
    assert compressed.affine_regularizer_weight(3) == pytest.approx(affine_regularizer_weight(24))
    continued = _model(ar_epoch_scale=8.0, ar_epoch_offset=48.0)  # a multi-step run on top of 6 such epochs
    assert continued.affine_regularizer_weight(1) == pytest.approx(affine_regularizer_weight(56))
    with pytest.raises(ConfigError, match="ar_epoch_scale"):
        _model(ar_epoch_scale=-1.0)


def _known_vsvf_pair(size: int):
    """A real slice and its copy moved by a known smooth vSVF deformation (up to 3 voxels), with the
    fields the network should find for (fixed, moving) and for the swapped pair."""
    from alignkit.spatial import sample_voxels
    from alignkit.transforms.dense import advect_map

    image = prepare_subject(read_image(data_path("brain2d", "r16slice.jpg")), (size, size)).image[None]
    grid = voxel_grid((size, size))
    identity = grid.voxel_points()
    coarse = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    velocity = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
    velocity = 3.0 * velocity / velocity.abs().max()  # voxels
    moving = sample_voxels(image, identity + advect_map(-velocity, grid, 10), padding="border")
    return [({"fixed": image, "moving": moving}, advect_map(velocity, grid, 10)),
            ({"fixed": moving, "moving": image}, advect_map(-velocity, grid, 10))]


def test_the_vsvf_loss_is_eq_11_the_same_for_a_pair_and_its_swap():
    """Eq. 11: l_v(I0, I1) + l_v(I1, I0) + the symmetry term. The stage used to score only the
    forward direction (the reverse pass fed nothing but the 1e-4 symmetry term)."""
    (batch, _), (swapped, _) = _known_vsvf_pair(32)
    torch.manual_seed(0)
    model = build_model("avsm", ndim=2, size=(32, 32), networks=TINY, lambda_vs=0.0, vsvf_train_steps=1)
    model.set_stage("vsvf")
    with torch.no_grad():
        model.vsvf.head.weight.normal_(0.0, 0.05)  # a momentum of a few voxels, not the identity
        forward, parts = model.loss(batch, model(batch), epoch=0)
        backward, _ = model.loss(swapped, model(swapped), epoch=0)
    assert float(parts["momentum_energy"]) > 0
    assert float(forward) == pytest.approx(float(backward), rel=1e-5)
    one_way = build_model("avsm", ndim=2, size=(32, 32), networks=TINY, lambda_vs=0.0, vsvf_train_steps=1,
                          vsvf_both_directions=False)
    one_way.load_state_dict(model.state_dict())
    one_way.set_stage("vsvf")
    with torch.no_grad():
        assert float(one_way.loss(batch, one_way(batch), epoch=0)[0]) != pytest.approx(float(forward), rel=1e-3)


def test_a_tiny_vsvf_network_learns_a_known_deformation_and_its_inverse():
    """The vSVF network (affine frozen at the identity), trained 60 steps at the recipe's lr 1e-3 on a
    real slice moved by a known smooth deformation, shown in both orders: the field error of both
    predictions falls below 92 % of the identity's (measured 0.88 and 0.83; scoring one direction
    per step as before eq. 11 was followed: 0.98 and 0.98)."""
    pairs = _known_vsvf_pair(32)
    torch.manual_seed(0)
    model = build_model("avsm", ndim=2, size=(32, 32), networks=TINY, vsvf_train_steps=1, vsvf_test_steps=1)
    model.set_stage("vsvf")
    optimizer = torch.optim.Adam(model.vsvf.parameters(), lr=1e-3)
    for step in range(60):
        batch, _ = pairs[step % 2]
        loss, _ = model.loss(batch, model(batch), epoch=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        errors = [float((model(batch)["field"] - truth).norm(dim=1).mean() / truth.norm(dim=1).mean())
                  for batch, truth in pairs]
    assert max(errors) < 0.92, errors


def test_the_centre_of_mass_start_finds_a_translation_and_the_prior_ignores_it():
    """Native-space subjects are tens of mm apart (OASIS 11 <-> 12: Dice 0.03 at the identity, 0.32
    after the centre-of-mass shift): ``centre_of_mass_start`` starts the affine steps there."""
    from alignkit.nets.affine import warp_affine

    fixed = prepare_subject(read_image(data_path("brain2d", "r16slice.jpg")), (SIZE, SIZE),
                            percentiles=AVSM.intensity_percentiles).image[None]
    shift = torch.tensor([[[1.0, 0.0, 0.12], [0.0, 1.0, -0.08]]])  # unit frame: 2.3 and 1.6 px
    moving = warp_affine(fixed, torch.tensor([[[1.0, 0.0, -0.12], [0.0, 1.0, 0.08]]]), (SIZE, SIZE))  # moving ∘ shift = fixed
    model = _model(centre_of_mass_start=True).eval()
    with torch.no_grad():
        unit = model.unit_matrix(fixed, moving)  # untrained: the start alone
    assert float((unit[0, :2] - shift[0]).abs().max()) < 0.01
    torch.testing.assert_close(model.learned_part(unit, fixed, moving), torch.eye(3)[None], atol=1e-6, rtol=0)
    assert _model().affine_start(fixed, moving) is None  # the paper's default: the identity


def test_intensities_are_clipped_at_the_papers_percentiles():
    from alignkit.errors import ConfigError
    from alignkit.spatial import Grid
    from alignkit.train import TrainConfig
    from alignkit.train.subjects import to_network_grid

    assert AVSM.intensity_percentiles == (0.1, 99.9)
    values = torch.linspace(0.0, 1.0, 1001) ** 3  # skewed: the percentiles matter
    image = values[:1000].reshape(1, 1, 40, 25)
    grid = Grid.from_spacing((40, 25), 1.0)
    paper, _ = to_network_grid(image, grid, (40, 25), percentiles=(0.1, 99.9))
    default, _ = to_network_grid(image, grid, (40, 25))
    low, high = torch.quantile(image.flatten(), torch.tensor([0.001, 0.999]))
    torch.testing.assert_close(paper, (image - low) / (high - low), atol=1e-5, rtol=0)
    assert float((paper - default).abs().max()) > 1e-3
    with pytest.raises(ConfigError, match="intensity_percentiles"):
        TrainConfig(intensity_percentiles=[99.0, 1.0])


class _SameAffine(SyntheticAffinePairs):
    """Every slice moved by one fixed random affine: a relation a few dozen steps can learn."""

    def _draw(self, index, stream):
        subject, _ = super()._draw(index, stream)
        return subject, torch.Generator().manual_seed(7)


SLICES = ("r16slice.jpg", "r27slice.jpg", "r30slice.jpg", "r62slice.jpg", "r64slice.jpg", "r85slice.jpg")


def test_a_tiny_avsm_trained_in_stages_recovers_the_affine_and_registers(tmp_path):
    """Trained on four real slices, scored on two others (same affine, unseen anatomy)."""
    subjects = [prepare_subject(read_image(data_path("brain2d", name)), (SIZE, SIZE), name=name) for name in SLICES]
    train_set = _SameAffine(subjects[:4], length=16, magnitude=3.0, rotation=8.0, scaling=0.06)
    val_set = _SameAffine(subjects[4:], length=2, magnitude=3.0, rotation=8.0, scaling=0.06, per_epoch=False)
    # a few dozen steps instead of the paper's 200 epochs: eq. 13 keeps its C_ar (10) and K_ar (4), its
    # epoch count compressed 8x (lambda_ar 3.5, 0.68, 0.09, ... from epoch 1). (At the paper's own count
    # this small affine is still recovered -- matrix error 3.37 -> 0.84 voxels -- but lambda_ar 0.68 at
    # epoch 16 adds to the affine stage's val loss, so the vSVF check below compares other sums.)
    config = {"method": "avsm", "size": SIZE, "networks": TINY, "batch_size": 4, "lr": 1e-2, "quiet": True,
              "device": "cpu", "epochs": 1, "stage_epochs": {"affine-1step": 12, "affine": 4, "vsvf": 4},
              "method_options": {"affine_train_steps": 2, "affine_test_steps": 3, "ar_epoch_scale": 8.0}}
    result = train_method(config, tmp_path / "run", train_set=train_set, val_set=val_set)
    rows = {row["epoch"]: row for row in result.history}
    assert [row["stage"] for row in result.history] == ["affine-1step"] * 13 + ["affine"] * 4 + ["vsvf"] * 4
    # the affine stages recover the matrix on unseen slices: its field error (voxels) falls below 20 %
    # (measured 3.37 -> 0.46; with C_ar scaled down to 0.1 instead of the schedule, 40 % was the bound)
    assert rows[16]["val_matrix_error"] < 0.2 * rows[0]["val_matrix_error"]
    # the vSVF stage (affine frozen) lowers its loss after its first epoch's jolt (0.053 -> 0.042); on
    # top of this affine it does not beat the affine alone (0.035): the pairs are affine, nothing is
    # left for it to register
    assert rows[20]["val_loss"] < 0.9 * rows[17]["val_loss"]

    model = load_model(tmp_path / "run")
    assert isinstance(model, AVSM) and model.options["affine_test_steps"] == 3
    fixed_item = val_set[0]  # an unseen slice and its affinely moved copy
    fixed = Image.from_array(fixed_item["fixed"][0].numpy())
    moving = Image.from_array(fixed_item["moving"][0].numpy())
    registration = alignkit.register(fixed, moving, method="avsm", checkpoint=tmp_path / "run")
    assert registration.stages == ["affine", "vsvf"]
    assert registration.metrics["ncc_after"] > registration.metrics["ncc_before"]
    out = registration.save(tmp_path / "out", moving_suffix=".npy", qc=False)
    assert (out / "transform" / "affine.txt").is_file() and (out / "transform" / "warp.nii.gz").is_file()
    refined = alignkit.register(fixed, moving, method="avsm", checkpoint=tmp_path / "run", refine=5)
    assert refined.stages == ["affine", "vsvf", "svf"] and np.isfinite(refined.metrics["ncc_after"])


def test_cli_trains_the_affine_then_the_vsvf_stage_on_top_and_registers(tmp_path, capsys):
    import json

    from phantoms import phantom
    from PIL import Image as PILImage

    from alignkit.cli import main
    from alignkit.train import load_checkpoint

    folder = tmp_path / "slices"
    folder.mkdir()
    for k in range(4):
        PILImage.fromarray(phantom(k).astype(np.uint8)).save(folder / f"s{k}.png")
    config = tmp_path / "avsm.json"
    config.write_text(json.dumps({"networks": TINY, "stage_epochs": {"affine-1step": 1, "affine": 1, "vsvf": 1},
                                  "method_options": {"affine_train_steps": 2, "vsvf_train_steps": 1}}))
    common = ["train", "--method", "avsm", "--dataset", str(folder), "--size", "32", "--config", str(config),
              "--device", "cpu", "--quiet"]
    assert main([*common, "-o", str(tmp_path / "affine"), "--stage", "affine"]) == 0
    affine_run = load_checkpoint(tmp_path / "affine")
    assert [row["stage"] for row in affine_run["history"]] == ["affine-1step", "affine-1step", "affine"]
    assert affine_run["train"]["intensity_percentiles"] == [0.1, 99.9]  # §3, recorded with the run
    assert main([*common, "-o", str(tmp_path / "vsvf"), "--stage", "vsvf", "--init-from", str(tmp_path / "affine")]) == 0
    vsvf_run = load_checkpoint(tmp_path / "vsvf")
    assert [row["stage"] for row in vsvf_run["history"]] == ["vsvf", "vsvf"]
    affine_keys = [k for k in affine_run["model"] if k.startswith("affine.")]
    assert all(torch.equal(vsvf_run["model"][k], affine_run["model"][k]) for k in affine_keys)  # frozen
    code = main(["train", "--method", "avsm", "--dataset", str(folder), "-o", str(tmp_path / "bad"), "--stage",
                 "nonesuch", "--size", "32", "--config", str(config), "--quiet"])
    assert code == 2 and "no training stage 'nonesuch'" in capsys.readouterr().err

    out = tmp_path / "registered"
    argv = ["register", str(folder / "s0.png"), str(folder / "s1.png"), "-o", str(out), "--method", "avsm",
            "--checkpoint", str(tmp_path / "vsvf"), "--quiet", "--no-qc"]
    assert main(argv) == 0
    manifest = json.loads((out / "transform" / "manifest.json").read_text())
    assert manifest["method"] == "avsm" and manifest["stages"] == ["affine", "vsvf"]


def test_two_gloo_processes_train_the_model_one_process_trains_and_resume_repeats_it(tmp_path):
    """Every loss term is a batch mean of per-pair values, so DDP (2 x batch 1) equals one process
    (batch 2) through all three stages; an interrupted run resumed mid-way repeats the whole run."""
    import json
    import os
    import subprocess
    import sys

    from phantoms import phantom
    from PIL import Image as PILImage

    from alignkit.cli import main
    from alignkit.train import load_checkpoint

    folder = tmp_path / "slices"
    folder.mkdir()
    for k in range(4):
        PILImage.fromarray(phantom(k).astype(np.uint8)).save(folder / f"s{k}.png")
    config = tmp_path / "avsm.json"
    config.write_text(json.dumps({"networks": TINY, "val_fraction": 0.25, "lr": 3e-3,
                                  "stage_epochs": {"affine-1step": 1, "affine": 1, "vsvf": 1},
                                  "method_options": {"affine_train_steps": 2, "vsvf_train_steps": 1}}))

    def argv(out, batch):
        return ["train", "--method", "avsm", "--dataset", str(folder), "-o", str(out), "--size", "32", "--config",
                str(config), "--batch-size", str(batch), "--device", "cpu", "--seed", "3", "--quiet"]

    assert main(argv(tmp_path / "single", 2)) == 0
    single = load_checkpoint(tmp_path / "single")
    assert [row["stage"] for row in single["history"]][1:] == ["affine-1step", "affine", "vsvf"]

    class Stop(Exception):
        pass

    from alignkit.methods import train_method
    from alignkit.train import TrainConfig

    values = {**json.loads(config.read_text()), "method": "avsm", "dataset": str(folder), "size": 32,
              "batch_size": 2, "device": "cpu", "seed": 3, "quiet": True}

    def stop(epoch, row):
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train_method(TrainConfig.from_dict(values), tmp_path / "cut", callbacks=[stop])
    train_method(TrainConfig.from_dict(values), tmp_path / "cut", resume=True)
    resumed = load_checkpoint(tmp_path / "cut")
    for key, value in single["model"].items():
        assert torch.equal(resumed["model"][key], value), key

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "alignkit", *argv(tmp_path / "ddp", 1)]
    done = subprocess.run(command, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = load_checkpoint(tmp_path / "ddp")
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, atol=2e-5, rtol=1e-4)
    initial = _model_like(single)
    assert any(not torch.equal(value, initial[key]) for key, value in single["model"].items())  # it trained


def _model_like(state):
    """The untrained weights of the model a checkpoint holds (same seed as the CLI run: 3)."""
    torch.manual_seed(3)
    config = state["method"]["config"]
    return build_model("avsm", networks=state["networks"], **config).state_dict()


def test_ablation_switches_skip_a_stage_and_drop_the_vsvf_at_test_time():
    """What benchmarks/avsm.py's Table 2 rows need: the multi-step affine stage alone on top of an
    earlier 1-step run (``stage_epochs`` 0 skips a stage) and the affine network alone at test time."""
    from alignkit.errors import ConfigError
    from alignkit.train import TrainConfig
    from alignkit.train.loop import plan_stages

    model = _model(vsvf_test_steps=0)
    plan = plan_stages(model, TrainConfig(method="avsm", stages=["affine"], stage_epochs={"affine-1step": 0, "affine": 3}))
    assert [(s.spec.name, s.first_epoch, s.last_epoch) for s in plan] == [("affine", 1, 3)]
    with pytest.raises(ConfigError, match="skips every"):
        plan_stages(model, TrainConfig(method="avsm", stages=["vsvf"], stage_epochs={"vsvf": 0}))
    fixed = Image.from_array(torch.rand(SIZE, SIZE).numpy())
    transform = model.predict(fixed, Image.from_array(torch.rand(SIZE, SIZE).numpy()))
    assert transform.kind == "affine" and transform.flat_stages() == [transform]
    with pytest.raises(ConfigError, match="vsvf_test_steps"):
        _model(vsvf_test_steps=-1)


@pytest.mark.slow  # one full-resolution 3D registration (~30-70 s on one loaded core)
def test_the_shipped_model_registers_the_held_out_oasis_pair_without_a_checkpoint():
    """`--method avsm` works after install: the shipped model on subject12<-subject11 (held out) beats
    the centre-of-mass shift it starts from (card: 0.355 vs 0.320 mean Dice) without folds."""
    from alignkit.data.datasets import load_dataset
    from alignkit.methods.shipped import shipped_for

    data_path("brain3d-oasis-trt20")  # skips when the shared data are absent
    assert shipped_for("avsm", 3) is not None
    case = load_dataset("brain3d-oasis-trt20")["subject12<-subject11"]
    result = alignkit.register(case.fixed, case.moving, method="avsm", fixed_labels=case.fixed_labels,
                               moving_labels=case.moving_labels)
    assert result.stages == ["affine", "vsvf"]
    assert result.metrics["dice_mean"] > 0.34 and result.metrics["nonpositive_jacobian_percent"] == 0.0
