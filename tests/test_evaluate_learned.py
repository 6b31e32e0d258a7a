"""``alignkit evaluate --method voxelmorph:<checkpoint>[+refineK]``: trained models as evaluation methods.

A tiny VoxelMorph (3-level U-Net, 4-8 channels) is trained for 2 epochs on synthetic 32² pairs, then
evaluated on two 40x44 phantom pairs with label maps, like any classical method.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from phantoms import phantom

import alignkit
from alignkit.data.case import Case
from alignkit.errors import ConfigError
from alignkit.evaluate import evaluate, list_methods, resolve_method
from alignkit.evaluate.learned_methods import LearnedMethod
from alignkit.evaluate.method import MethodUnavailable
from alignkit.evaluate.runner import blind
from alignkit.image import Image
from alignkit.methods import train_method
from alignkit.train import SyntheticPairs, TrainConfig, prepare_subject

SIZE = 32
HINT = "train one with: alignkit train --method voxelmorph --dataset NAME -o RUNDIR"


def _labels(image: np.ndarray) -> Image:
    """Two nested labels: the body (1) and the bright blobs (2)."""
    labels = np.zeros(image.shape, np.int32)
    labels[image > 40] = 1
    labels[image > 110] = 2
    return Image.from_array(labels)


def _case(name: str, fixed_seed: int, moving_seed: int) -> Case:
    fixed, moving = phantom(fixed_seed), phantom(moving_seed)
    return Case(
        name,
        fixed=Image.from_array(fixed),
        moving=Image.from_array(moving),
        kind="deformable",
        fixed_labels=_labels(fixed),
        moving_labels=_labels(moving),
        meta={"dataset": "phantoms"},
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 2-epoch VoxelMorph run folder (model + log), trained through alignkit.train's API."""
    out = tmp_path_factory.mktemp("vxm")
    subjects = [
        prepare_subject(Image.from_array(phantom(k)), (SIZE, SIZE), name=f"phantom{k}") for k in range(3)
    ]
    config = TrainConfig(
        size=SIZE,
        network={"features": [4, 8, 8]},
        epochs=2,
        batch_size=2,
        lr=3e-3,
        quiet=True,
        device="cpu",
        method_options={"similarity": "lncc", "window": 5},
    )
    result = train_method(config, out, train_set=SyntheticPairs(subjects, length=4, magnitude=2.5))
    assert result.checkpoint is not None and result.epoch == 2
    return out


def test_evaluate_runs_a_checkpoint_like_a_classical_method(run_dir, tmp_path):
    cases = [_case("p1<-p0", 1, 0), _case("p3<-p2", 3, 2)]
    missing = tmp_path / "no-such-run"
    methods = [f"voxelmorph:{run_dir}", f"voxelmorph:{run_dir}+refine5", f"voxelmorph:{missing}"]
    rows = evaluate(cases, methods, out_dir=tmp_path / "eval", isolate=False, threads=1, progress=False)
    assert len(rows) == 6
    by = {(r["method"], r["case"]): r for r in rows}
    for case in cases:
        raw, refined = by[methods[0], case.name], by[methods[1], case.name]
        for row in (raw, refined):
            assert row["status"] == "ok", row["message"]
            assert math.isfinite(row["dice_mean"]) and 0.0 <= row["dice_mean"] <= 1.0
            assert row["n_labels"] == 2 and math.isfinite(row["hd95_mean"])
            assert row["seconds"] > 0 and row["extra_predict_seconds"] >= 0
        assert raw["extra_stages"] == "svf" and raw["extra_refine_iterations"] == 0
        assert refined["extra_stages"] == "svf>svf" and refined["extra_refine_iterations"] == 5
        assert refined["extra_refine_seconds"] > 0
        assert refined["extra_ncc_after"] > raw["extra_ncc_after"]  # the solver improves on the prediction
        skipped = by[methods[2], case.name]
        assert skipped["status"] == "skipped" and skipped.get("dice_mean") is None
        assert str(missing) in skipped["message"] and skipped["message"].endswith(HINT)
    assert (tmp_path / "eval" / "results.csv").read_text().count("voxelmorph:") >= 6
    summary = (tmp_path / "eval" / "summary.md").read_text()
    assert f"voxelmorph:{run_dir}+refine5" in summary


def test_the_prediction_is_alignkit_register_with_the_checkpoint(run_dir):
    case = _case("p1<-p0", 1, 0)
    method = resolve_method(
        f"voxelmorph:{run_dir / 'model.pt'}" if (run_dir / "model.pt").exists() else f"voxelmorph:{run_dir}"
    )
    prediction = method.register(blind(case), seed=0, device="cpu", threads=1)
    direct = alignkit.register(case.fixed, case.moving, method="voxelmorph", checkpoint=run_dir)
    expected = direct.world_map()[0].numpy()
    assert prediction.world_map is not None and prediction.world_map.shape == (2, 40, 44)
    np.testing.assert_allclose(prediction.world_map, expected, atol=1e-5, rtol=0)
    # the (barely) trained network moves points: not the identity map
    identity = case.fixed.grid.world_points()[0].numpy()
    assert np.abs(prediction.world_map - identity).max() > 1e-3
    assert prediction.extra["load_seconds"] > 0  # read on first use, outside the timed part
    again = method.register(blind(case), seed=0, device="cpu", threads=1)
    assert again.extra["load_seconds"] == 0.0
    np.testing.assert_array_equal(again.world_map, prediction.world_map)


def test_names_options_and_registry(run_dir, tmp_path):
    assert "voxelmorph:<checkpoint>" in list_methods()
    assert list_methods()[0].startswith("alignkit:")  # presets stay first
    plain = resolve_method(f"voxelmorph:{run_dir}")
    assert isinstance(plain, LearnedMethod) and plain.name == f"voxelmorph:{run_dir}" and plain.refine == 0
    assert plain.kinds == ("deformable", "flow")  # what the method's registry record declares
    suffixed = resolve_method(f"voxelmorph:{run_dir}+refine50")
    assert suffixed.refine == 50 and suffixed.checkpoint == str(run_dir)
    option = resolve_method(f"voxelmorph:{run_dir}", refine=50)
    assert option.refine == 50 and option.name == f"voxelmorph:{run_dir}+refine50"
    assert resolve_method(f" voxelmorph:{run_dir}+refine0 ").name == f"voxelmorph:{run_dir}+refine0"
    with pytest.raises(ConfigError, match="refine 50 but the refine option is 7"):
        resolve_method(f"voxelmorph:{run_dir}+refine50", refine=7)
    with pytest.raises(ConfigError, match="name a checkpoint after the colon"):
        resolve_method("voxelmorph:")
    with pytest.raises(ConfigError, match="unknown options"):
        resolve_method(f"voxelmorph:{run_dir}", iterations=3)
    with pytest.raises(ConfigError, match="unknown method 'nolearner:run'"):
        resolve_method("nolearner:run")
    # the listed pattern resolves, and says how to get a checkpoint instead of failing
    with pytest.raises(MethodUnavailable, match="name a checkpoint.*" + HINT):
        resolve_method("voxelmorph:<checkpoint>").check_available()
    # an empty run folder is unavailable too; a file that is no checkpoint is an error
    (tmp_path / "empty").mkdir()
    with pytest.raises(MethodUnavailable, match="no checkpoint"):
        resolve_method(f"voxelmorph:{tmp_path / 'empty'}").check_available()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint|not an alignkit checkpoint"):
        resolve_method(f"voxelmorph:{junk}").check_available()


def test_the_model_decides_the_dimensionality_and_is_not_pickled(run_dir):
    method = resolve_method(f"voxelmorph:{run_dir}")
    volume = Image.from_array(np.zeros((8, 8, 8), np.float32), spacing=1.0)
    reason = method.applicable(Case("v", volume, volume, kind="deformable"))
    assert reason is not None and "2D" in reason
    assert method.applicable(_case("p1<-p0", 1, 0)) is None
    assert method.applicable(Case("f", volume, volume, kind="flow")) is not None
    method.check_available()
    assert method.model() is not None
    # what the runner sends to an isolated worker: the path and options, never the loaded network
    clone = pickle.loads(pickle.dumps(method))
    assert clone._loaded == {} and clone.checkpoint == method.checkpoint and clone.name == method.name
    assert torch.equal(
        next(iter(clone.model().state_dict().values())), next(iter(method.model().state_dict().values()))
    )


def test_an_isolated_worker_reads_the_checkpoint_itself(run_dir, tmp_path):
    # the default of `alignkit evaluate`: the method is pickled into a fresh interpreter
    case = _case("p1<-p0", 1, 0)
    name = f"voxelmorph:{run_dir}+refine3"
    (isolated,) = evaluate([case], [name], out_dir=tmp_path / "iso", isolate=True, threads=1, progress=False)
    assert isolated["status"] == "ok", isolated["message"]
    assert isolated["peak_rss_mb"] > 0 and isolated["extra_load_seconds"] > 0
    (local,) = evaluate([case], [name], out_dir=tmp_path / "local", isolate=False, threads=1, progress=False)
    assert isolated["dice_mean"] == pytest.approx(local["dice_mean"], abs=1e-12)
    assert isolated["extra_ncc_after"] == pytest.approx(local["extra_ncc_after"], abs=1e-6)
