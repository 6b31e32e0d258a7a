"""benchmarks/train_brain.py --quick: trains through `alignkit train` on the real 2D brain slices and
prints one JSON line whose scores are on held-out subjects only."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from conftest import data_path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_brain.py"


def _dice(value):
    assert isinstance(value, float) and 0.0 <= value <= 1.0, value
    return value


def test_quick_brain2d_run_reports_held_out_scores(tmp_path):
    data = data_path("brain2d").parent
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        str(SCRIPT),
        "--dataset",
        "brain2d",
        "--quick",
        "--data",
        str(data),
        "--run-dir",
        str(run_dir),
        "--threads",
        "2",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1  # one JSON line on stdout, progress on stderr
    result = json.loads(lines[0])

    assert result["benchmark"] == "train_brain" and result["dataset"] == "brain2d" and result["quick"] is True
    assert result["train_command"].startswith("alignkit train --config ")
    assert "lncc" in result["loss"] and "unsupervised" in result["loss"]
    # held-out subjects are the two labelled slices, never trained on
    assert result["held_out_subjects"] == ["r16slice", "r85slice"]
    assert result["training_subjects"] == ["r27slice", "r30slice", "r62slice", "r64slice"]
    assert result["training_pairs"] == 12 and result["epochs"] == result["train_config"]["epochs"]
    assert result["train_wall_seconds"] > result["train_loop_seconds"] > 0 and result["train_pairs_per_s"] > 0

    reduced = result["reduced"]
    assert reduced["n_pairs"] == 2 and reduced["n_labels"] == 2
    for name in ("affine", "untrained", "trained"):
        _dice(reduced["dice"][name])
    for name in ("untrained", "trained"):
        assert 0.0 <= reduced["nonpositive_jacobian_percent"][name] <= 100.0
    # the untrained network is the trainer's epoch-0 model: the trainer scored it the same
    assert math.isclose(reduced["dice"]["untrained"], result["trainer_val_dice_untrained"], abs_tol=1e-6)

    full = result["full"]
    assert full["n_pairs"] == 1
    assert set(full["summary"]) == {"affine", "untrained", "trained", "trained+refine5"}
    for scores in full["summary"].values():
        _dice(scores["dice"])
        assert scores["tre_mean"] > 0 and scores["seconds"] > 0
        assert 0.0 <= scores["nonpositive_jacobian_percent"] <= 100.0
    assert (run_dir / "log.csv").is_file() and json.loads((run_dir / "config.json").read_text())[
        "val_subjects"
    ]
