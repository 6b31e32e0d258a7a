"""The command line contract: outputs, `apply`, and one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image as PILImage

from alignkit.cli import main

FAST_CONFIG = {
    "stages": [
        {"transform": "affine", "similarity": "ncc", "levels": [4, 2], "iterations": [20, 10]},
        {
            "transform": "svf",
            "similarity": "lncc",
            "regularizer": "diffusion",
            "regularizer_weight": 0.5,
            "levels": [2],
            "iterations": [10],
            # 0.5 overshoots on this small blob (LNCC + diffusion rose from 0.035 to 0.081) and the
            # never-worse rule drops the stage, so no warp.nii.gz; 0.1 ends at 0.021
            "learning_rate": 0.1,
        },
    ]
}


def _png(path: Path, array: np.ndarray) -> Path:
    PILImage.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(path)
    return path


def _blob(shape=(64, 72), centre=(30, 36), radius=14.0) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    d2 = (rows - centre[0]) ** 2 + ((cols - centre[1]) * 0.8) ** 2
    return 200 * np.exp(-d2 / (2 * radius**2)) + 20 * np.sin(rows / 5.0) * (d2 < (2 * radius) ** 2)


@pytest.fixture
def pair(tmp_path):
    fixed = _png(tmp_path / "fixed.png", _blob())
    moving = _png(tmp_path / "moving.png", _blob(centre=(33, 39)))
    config = tmp_path / "fast.json"
    config.write_text(json.dumps(FAST_CONFIG))
    return fixed, moving, config


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_register_writes_the_contract(pair, tmp_path, capsys):
    fixed, moving, config = pair
    out = tmp_path / "out"
    code, stdout, _ = run(["register", fixed, moving, "-o", out, "--config", config, "--seed", "1"], capsys)
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"warped.png", "transform", "metrics.json", "qc.png", "flow.flo"}
    assert {p.name for p in (out / "transform").iterdir()} == {"affine.txt", "warp.nii.gz", "manifest.json"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ncc_after"] > metrics["ncc_before"]
    assert metrics["nonpositive_jacobian_percent"] == 0.0
    assert "ncc" in stdout

    # apply reproduces the warped image
    again = tmp_path / "again.png"
    assert run(["apply", out / "transform", moving, "-o", again], capsys)[0] == 0
    a = np.asarray(PILImage.open(again), dtype=float)
    b = np.asarray(PILImage.open(out / "warped.png"), dtype=float)
    assert np.abs(a - b).max() <= 1.0  # 8-bit rounding

    # and maps points
    points = tmp_path / "points.csv"
    points.write_text("x,y\n10,12\n30.5,20\n")
    mapped = tmp_path / "mapped.csv"
    assert run(["apply", out / "transform", "--points", points, "-o", mapped], capsys)[0] == 0
    assert len(mapped.read_text().strip().splitlines()) >= 2


def test_quiet_prints_nothing(pair, tmp_path, capsys):
    fixed, moving, config = pair
    code, stdout, stderr = run(["register", fixed, moving, "-o", tmp_path / "q", "--config", config, "--quiet"], capsys)
    assert code == 0 and stdout == "" and stderr == ""


def _assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_file(pair, tmp_path, capsys):
    fixed, _, config = pair
    out = tmp_path / "out"
    code, _, err = run(["register", fixed, tmp_path / "nope.png", "-o", out, "--config", config], capsys)
    _assert_one_line_error(code, err, "nope.png")
    assert not out.exists() or not any(out.iterdir())


def test_corrupt_header(pair, tmp_path, capsys):
    fixed, _, config = pair
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b this is not a nifti file")
    code, _, err = run(["register", fixed, bad, "-o", tmp_path / "o", "--config", config], capsys)
    _assert_one_line_error(code, err, "bad.nii.gz")


def test_2d_against_3d(pair, tmp_path, capsys):
    fixed, _, config = pair
    volume = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(8, 9, 10).astype(np.float32), np.eye(4)), volume)
    code, _, err = run(["register", fixed, volume, "-o", tmp_path / "o", "--config", config], capsys)
    _assert_one_line_error(code, err, "vol.nii.gz", "3D")


@pytest.mark.parametrize("kind", ["constant", "nan"])
def test_unusable_image(pair, tmp_path, capsys, kind):
    _, _, config = pair
    data = np.full((8, 9, 10), 3.0, dtype=np.float32)
    if kind == "nan":
        data = np.random.rand(8, 9, 10).astype(np.float32)
        data[2, 2, 2] = np.nan
    path = tmp_path / f"{kind}.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    other = tmp_path / "ok.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(8, 9, 10).astype(np.float32), np.eye(4)), other)
    code, _, err = run(["register", other, path, "-o", tmp_path / "o", "--config", config], capsys)
    _assert_one_line_error(code, err, f"{kind}.nii.gz", "NaN" if kind == "nan" else "constant")


def test_label_map_on_another_grid(pair, tmp_path, capsys):
    fixed, moving, config = pair
    labels = _png(tmp_path / "labels.png", np.zeros((32, 32)) + (np.arange(32)[:, None] > 16))
    code, _, err = run(
        ["register", fixed, moving, "-o", tmp_path / "o", "--config", config, "--fixed-labels", labels,
         "--moving-labels", labels], capsys)
    _assert_one_line_error(code, err, "labels.png", "another grid")


def test_unknown_option_and_preset(pair, tmp_path, capsys):
    fixed, moving, _ = pair
    code, _, err = run(["register", fixed, moving, "-o", tmp_path / "o", "--frobnicate"], capsys)
    _assert_one_line_error(code, err, "--frobnicate")
    code, _, err = run(["register", fixed, moving, "-o", tmp_path / "o", "--transform", "affine,wobble"], capsys)
    _assert_one_line_error(code, err, "wobble")
    bad_config = tmp_path / "bad.json"
    bad_config.write_text("{not json")
    code, _, err = run(["register", fixed, moving, "-o", tmp_path / "o", "--config", bad_config], capsys)
    _assert_one_line_error(code, err, "bad.json")


def test_apply_rejects_a_folder_that_is_not_a_transform(tmp_path, capsys, pair):
    _, moving, _ = pair
    code, _, err = run(["apply", tmp_path, moving, "-o", tmp_path / "x.png"], capsys)
    _assert_one_line_error(code, err, "manifest")


def test_presets_lists_the_required_names(capsys):
    code, stdout, _ = run(["presets"], capsys)
    assert code == 0
    for name in ("brain", "multimodal", "photo", "flow"):
        assert name in stdout


def test_labels_and_landmarks_give_dice_and_tre(pair, tmp_path, capsys):
    fixed, moving, config = pair
    fixed_labels = _png(tmp_path / "fixed_labels.png", (_blob() > 100).astype(np.uint8) * 3)
    moving_labels = _png(tmp_path / "moving_labels.png", (_blob(centre=(33, 39)) > 100).astype(np.uint8) * 3)
    # world points are (x = column, y = row); the blob centre moved by (+3 columns, +3 rows)
    (tmp_path / "fixed.csv").write_text("x,y\n36,30\n")
    (tmp_path / "moving.csv").write_text("x,y\n39,33\n")
    out = tmp_path / "out"
    code, _, _ = run(
        ["register", fixed, moving, "-o", out, "--config", config, "--fixed-labels", fixed_labels,
         "--moving-labels", moving_labels, "--fixed-landmarks", tmp_path / "fixed.csv",
         "--moving-landmarks", tmp_path / "moving.csv", "--quiet"], capsys)
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dice"]["3"] > metrics["dice_mean_before"] and metrics["dice"]["3"] > 0.95
    assert metrics["tre_before"]["mean"] == pytest.approx(np.hypot(3, 3), abs=1e-4)
    assert metrics["tre"]["mean"] < 1.0
    warped_labels = np.asarray(PILImage.open(out / "warped_labels.png"))
    assert set(np.unique(warped_labels)) <= {0, 3}
