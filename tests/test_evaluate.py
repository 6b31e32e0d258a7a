"""`alignkit.evaluate`: runner, reports and CLI on tiny cases whose scores are known in advance.

The fake methods below return the exact ground truth (scores 0) or the identity (scores equal to
the "before" values, computed by hand from the translations), so every number in results.csv and
summary.md can be checked. They live at module level so an isolated worker can unpickle them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from alignkit.cli import main
from alignkit.data.case import Case
from alignkit.errors import ConfigError, InputError
from alignkit.evaluate.method import Method, MethodUnavailable, Prediction
from alignkit.image import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------
# tiny cases
# ------------------------------------------------------------------------------------------------
def _blobs(shape: tuple[int, int]) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    image = np.zeros(shape)
    for cr, cc, sigma, amplitude in [(0.35, 0.3, 0.12, 200), (0.6, 0.7, 0.15, 150), (0.75, 0.35, 0.08, 120),
                                     (0.3, 0.75, 0.07, 180)]:
        image += amplitude * np.exp(-((rows - cr * shape[0]) ** 2 + (cols - cc * shape[1]) ** 2)
                                    / (2 * (sigma * shape[0]) ** 2))
    return image.astype(np.float32)


def _translation(tx: float, ty: float) -> np.ndarray:
    matrix = np.eye(3)
    matrix[:2, 2] = (tx, ty)
    return matrix


def matrix_case(name: str, tx: float, ty: float, shape: tuple[int, int] = (24, 30)) -> Case:
    """An affine case whose true map is a translation: the identity's corner error is |t| exactly."""
    image = Image.from_array(_blobs(shape))
    return Case(name, fixed=image, moving=image, kind="affine", matrix=_translation(tx, ty),
                meta={"dataset": "tiny", "translation": (tx, ty)})


def flow_case(name: str, u: float, v: float, shape: tuple[int, int] = (20, 24)) -> Case:
    """A flow case with a constant flow of u columns (x) and v rows (y): the identity's EPE is
    sqrt(u² + v²) exactly. ``Case.flow`` is in array-axis order, (rows, columns)."""
    image = Image.from_array(_blobs(shape))
    flow = np.empty((2, *shape), np.float32)
    flow[0], flow[1] = v, u
    return Case(name, fixed=image, moving=image, kind="flow", flow=flow, meta={"dataset": "tiny", "translation": (u, v)})


def warped_affine_case(matrix: np.ndarray, shape: tuple[int, int] = (64, 72)) -> Case:
    """fixed = moving ∘ matrix, so the true fixed → moving map is ``matrix``."""
    from alignkit.spatial import sample_world

    moving = Image.from_array(_blobs(shape))
    world = moving.grid.world_points(dtype=torch.float64)
    linear, shift = torch.as_tensor(matrix[:2, :2]), torch.as_tensor(matrix[:2, 2:])
    mapped = (linear @ world.reshape(2, -1) + shift).reshape(1, 2, *shape)
    fixed = Image(sample_world(moving.batch(dtype=torch.float64), moving.grid, mapped)[0].float(), moving.grid)
    return Case("warped-affine", fixed=fixed, moving=moving, kind="affine", matrix=matrix, meta={"matrix": matrix})


# ------------------------------------------------------------------------------------------------
# fake methods (module level: picklable into an isolated worker)
# ------------------------------------------------------------------------------------------------
def _identity_map(case: Case) -> np.ndarray:
    return case.fixed.grid.world_points(dtype=torch.float64)[0].numpy()


class TruthMethod(Method):
    """Returns the exact answer, read from the case's provenance (``meta``) because the runner hides
    the ground-truth fields from methods: the true matrix, or identity + the true constant flow."""

    name = "fake:truth"

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        if "matrix" in case.meta:
            return Prediction(matrix=np.asarray(case.meta["matrix"]), seconds=0.5, extra={"calls": 1})
        u, v = case.meta["translation"]
        if case.kind == "affine":
            return Prediction(matrix=_translation(u, v), seconds=0.5, extra={"calls": 1})
        world = _identity_map(case)
        world[0] += u
        world[1] += v
        return Prediction(world_map=world, seconds=0.5, extra={"calls": 1})


class BlindCheckMethod(Method):
    """Fails unless every ground-truth field of the case it is given is empty."""

    name = "fake:blindcheck"

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        from alignkit.evaluate.runner import GROUND_TRUTH_FIELDS

        leaked = [name for name in GROUND_TRUTH_FIELDS if getattr(case, name) is not None]
        if leaked:
            raise AssertionError(f"the method was shown the ground truth: {leaked}")
        return Prediction(world_map=_identity_map(case), seconds=0.1)


class IdentityMethod(Method):
    name = "fake:identity"

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        return Prediction(world_map=_identity_map(case).astype(np.float32), seconds=1.0)


class UnavailableMethod(Method):
    name = "fake:absent"

    def check_available(self) -> None:
        raise MethodUnavailable("fakepkg is not installed (pip install fakepkg)")

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        raise AssertionError("an unavailable method must not be run")


class BrokenMethod(Method):
    name = "fake:broken"

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        raise RuntimeError("boom\nsecond line of the message")


class Only3DMethod(Method):
    name = "fake:3d"
    ndims = (3,)

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        raise AssertionError("a method must not run on a case it does not handle")


class WrongShapeMethod(Method):
    name = "fake:wrongshape"

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        return Prediction(world_map=np.zeros((2, 3, 3), np.float32), seconds=0.1)


class SegfaultMethod(Method):
    name = "fake:segfault"

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        os.kill(os.getpid(), signal.SIGSEGV)  # what a crashing native peer does to its process
        raise AssertionError("unreachable")


class UnpicklableMethod(IdentityMethod):
    name = "fake:unpicklable"

    def __init__(self) -> None:
        super().__init__()
        self.callback = lambda x: x  # a lambda cannot be pickled into a worker


class SleepMethod(Method):
    name = "fake:sleep"

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        time.sleep(60)
        raise AssertionError("should have been killed")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def table_rows(summary: str, section: str) -> dict[str, list[str]]:
    """The cells of the markdown table under ``## <section>``, keyed by method (without "(reference)")."""
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## ") and section in line)
    out = {}
    header_seen = False
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not header_seen:
            out["header"] = cells
            header_seen = True
        elif not set(line) <= set("|:- "):
            out[cells[0].replace(" (reference)", "")] = cells
    return out


# ------------------------------------------------------------------------------------------------
# runner + reports, in process
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def known_run(tmp_path):
    from alignkit.evaluate import evaluate

    cases = [matrix_case("a", 3, 4), matrix_case("b", 6, 8), matrix_case("c", 0, 2), flow_case("f1", 2.0, 1.5)]
    rows = evaluate(cases, [TruthMethod(), IdentityMethod()], out_dir=tmp_path, isolate=False, progress=False,
                    reference="fake:identity", dataset="tiny")
    return rows, tmp_path


def test_results_csv_holds_the_known_scores(known_run):
    rows, out = known_run
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    table = read_csv(out / "results.csv")
    assert list(table[0])[:7] == ["dataset", "case", "kind", "method", "status", "seconds", "peak_rss_mb"]
    assert list(table[0])[-1] == "message"
    by = {(r["method"], r["case"]): r for r in table}
    for case, expected in (("a", 5.0), ("b", 10.0), ("c", 2.0)):
        assert float(by["fake:truth", case]["corner_error"]) == pytest.approx(0.0, abs=1e-9)
        assert float(by["fake:identity", case]["corner_error"]) == pytest.approx(expected, abs=1e-9)
        assert float(by["fake:identity", case]["corner_error_before"]) == pytest.approx(expected, abs=1e-9)
        assert by["fake:identity", case]["epe"] == ""  # no flow ground truth: empty cell, not 0
    assert float(by["fake:truth", "f1"]["epe"]) == pytest.approx(0.0, abs=1e-5)
    assert float(by["fake:identity", "f1"]["epe"]) == pytest.approx(2.5, abs=1e-6)
    assert by["fake:truth", "a"]["dataset"] == "tiny" and by["fake:truth", "a"]["kind"] == "affine"
    assert float(by["fake:truth", "a"]["seconds"]) == 0.5 and by["fake:truth", "a"]["peak_rss_mb"] == ""
    assert by["fake:truth", "a"]["extra_calls"] == "1"
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["reference"] == "fake:identity" and len(data["rows"]) == 8


def test_summary_means_stds_and_ratios(known_run):
    _, out = known_run
    summary = (out / "summary.md").read_text()
    affine = table_rows(summary, "tiny · affine")
    header = affine["header"]
    assert header[:3] == ["method", "n ok/total", "corner_error ↓"]
    assert "seconds ↓" in header and "corner_error / fake:identity" in header and "time / fake:identity" in header
    # linear cases: no Jacobian columns; in-process runs: no memory column
    assert not any("jacobian" in h or "peak_rss" in h for h in header)
    col = {h: i for i, h in enumerate(header)}
    identity, truth = affine["fake:identity"], affine["fake:truth"]
    # corner errors 5, 10, 2: mean 5.667, sample std sqrt(((−2/3)² + (13/3)² + (−11/3)²) / 2) = 4.041
    assert np.std([5, 10, 2], ddof=1) == pytest.approx(4.0415, abs=1e-4)
    assert identity[col["corner_error ↓"]] == "5.67 ± 4.04"
    assert truth[col["corner_error ↓"]] == "**0 ± 0**"  # the best (lowest) mean is bold
    assert truth[col["n ok/total"]] == "3/3"
    ratio = col["corner_error / fake:identity"]
    assert truth[ratio] == "0" and identity[ratio] == "1.00"
    assert truth[col["time / fake:identity"]] == "0.500"
    flow = table_rows(summary, "tiny · flow")
    assert flow["header"][2] == "epe ↓"
    assert "Main metric: `epe`" in summary and "Main metric: `corner_error`" in summary
    assert flow["fake:identity"][2] == "2.50"  # one case: no ± part
    assert "nonpositive_jacobian_percent ↓" in flow["header"]  # a dense map's folds matter for flow


def test_boxplots_are_valid_pngs(known_run):
    from PIL import Image as PILImage

    _, out = known_run
    for metric in ("corner_error", "epe", "seconds"):
        path = out / f"boxplot_{metric}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with PILImage.open(path) as png:
            png.verify()
            assert png.size[0] > 100 and png.size[1] > 100
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary files behind


def test_skipped_na_and_error_rows(tmp_path):
    from alignkit.evaluate import evaluate

    methods = [TruthMethod(), UnavailableMethod(), BrokenMethod(), Only3DMethod(), WrongShapeMethod()]
    rows = evaluate([matrix_case("a", 3, 4), matrix_case("b", 1, 0)], methods, out_dir=tmp_path, isolate=False,
                    progress=False)
    status = {(r["method"], r["case"]): (r["status"], r["message"]) for r in rows}
    assert len(rows) == 10
    assert status["fake:truth", "a"] == ("ok", "")
    assert status["fake:absent", "a"] == ("skipped", "fakepkg is not installed (pip install fakepkg)")
    assert status["fake:absent", "b"][0] == "skipped"
    assert status["fake:broken", "b"] == ("error", "RuntimeError: boom")  # one line
    assert status["fake:3d", "a"][0] == "n/a" and "3D" in status["fake:3d", "a"][1]
    assert status["fake:wrongshape", "a"][0] == "error"
    assert status["fake:wrongshape", "a"][1].startswith("scoring failed")
    table = read_csv(tmp_path / "results.csv")
    assert {r["status"] for r in table} == {"ok", "skipped", "n/a", "error"}
    assert all("\n" not in r["message"] for r in table)
    summary = (tmp_path / "summary.md").read_text()
    cells = table_rows(summary, "affine")
    assert cells["fake:absent"][1] == "0/2" and cells["fake:broken"][1] == "0/2"
    assert "fake:3d" not in cells  # not applicable at all: named in the notes instead of a row
    assert summary.count("fake:absent: skipped: fakepkg is not installed") == 1
    assert "fake:broken on a: error: RuntimeError: boom" in summary
    assert "not applicable to affine cases: fake:3d" in summary
    # the default reference is the first method not named alignkit:*, here fake:truth
    assert "corner_error / fake:truth" in cells["header"]


def test_methods_never_see_the_ground_truth(tmp_path):
    import dataclasses

    from alignkit.evaluate import evaluate
    from alignkit.evaluate.runner import GROUND_TRUTH_FIELDS

    # every field of a Case but the images, name, kind and provenance is ground truth: a field added to
    # Case later must be added to GROUND_TRUTH_FIELDS too
    assert set(GROUND_TRUTH_FIELDS) == {f.name for f in dataclasses.fields(Case)} - {"name", "fixed", "moving", "kind",
                                                                                     "meta"}
    image = Image.from_array(_blobs((16, 20)))
    labels = Image.from_array(np.ones((16, 20), np.float32))
    full = Case("full", image, image, kind="deformable", fixed_labels=labels, moving_labels=labels, label_ids=[1],
                fixed_points=np.zeros((2, 2)), moving_points=np.ones((2, 2)), valid=np.ones((16, 20), bool))
    (row,) = evaluate([full], [BlindCheckMethod()], out_dir=tmp_path, isolate=False, progress=False)
    assert row["status"] == "ok", row["message"]
    assert row["dice_mean"] == 1.0 and row["tre_mean"] == pytest.approx(math.sqrt(2))  # scored on the full case


def test_argument_errors(tmp_path):
    from alignkit.evaluate import evaluate

    case = [matrix_case("a", 1, 1)]
    with pytest.raises(ConfigError, match="unknown method 'nope:x'.*alignkit:brain"):
        evaluate(case, ["nope:x"], out_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="given twice"):
        evaluate(case, [TruthMethod(), TruthMethod()], out_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="reference"):
        evaluate(case, [TruthMethod()], out_dir=tmp_path, reference="ants:syn", progress=False)
    with pytest.raises(ConfigError, match="timeout"):
        evaluate(case, [TruthMethod()], out_dir=tmp_path, isolate=False, timeout=5, progress=False)


def _row(method: str, case: str, status: str = "ok", **metrics: float) -> dict:
    return {"dataset": "d", "case": case, "kind": "homography", "method": method, "status": status,
            "seconds": 1.0, "peak_rss_mb": None, "message": "", **metrics}


def test_success_rates_count_errors_as_failures():
    from alignkit.evaluate.report import summarize, summary_markdown

    rows = [
        _row("m", "a", corner_error=0.5, success_1px=1.0, success_3px=1.0),
        _row("m", "b", corner_error=2.0, success_1px=0.0, success_3px=1.0),
        _row("m", "c", status="error"),
        _row("m", "d", status="n/a"),  # not attempted: not in the denominator
        _row("ref", "a", corner_error=1.0, success_1px=1.0, success_3px=1.0),
        _row("ref", "b", corner_error=4.0, success_1px=0.0, success_3px=0.0),
        _row("ref", "c", corner_error=9.0, success_1px=0.0, success_3px=0.0),
    ]
    (group,) = summarize(rows)
    assert group.main_metric == "corner_error" and group.reference == "m"  # no alignkit:* name: first method
    (group,) = summarize(rows, reference="ref")
    mine = group.methods[0]
    assert (mine.n_ok, mine.n_total) == (2, 4)
    assert mine.stats["success_1px"][0] == pytest.approx(1 / 3) and mine.stats["success_3px"][0] == pytest.approx(2 / 3)
    # ratio over the cases both finished (a, b): mean(0.5, 2) / mean(1, 4), not / mean(1, 4, 9)
    assert mine.ratios["corner_error"] == pytest.approx(1.25 / 2.5)
    cells = table_rows(summary_markdown(rows, reference="ref"), "homography")
    col = {h: i for i, h in enumerate(cells["header"])}
    assert cells["m"][col["success_3px ↑"]] == "**0.667**"  # a rate: no ± part; the best one, bold
    assert cells["ref"][col["corner_error ↓"]] == "4.67 ± 4.04"


def test_report_helpers():
    from alignkit.evaluate.report import columns_of, fmt, mean_std

    mean, std, n = mean_std([1.0, float("nan"), 3.0, None])
    assert (mean, n) == (2.0, 2) and std == pytest.approx(math.sqrt(2.0))
    assert math.isnan(mean_std([1.0])[1]) and mean_std([])[2] == 0
    assert [fmt(v) for v in (0.0, 0.6404, 1.234, 12.34, 1234.5, 0.00123, float("nan"))] == [
        "0", "0.640", "1.23", "12.3", "1234", "0.0012", "–"]
    rows = [{"dataset": "d", "case": "c", "kind": "affine", "method": "m", "status": "ok", "seconds": 1.0,
             "peak_rss_mb": None, "b": 1, "extra_x": 2, "a": 3, "message": ""}]
    assert columns_of(rows)[7:] == ["b", "a", "extra_x", "message"]


# ------------------------------------------------------------------------------------------------
# isolated runs: a fresh interpreter per run
# ------------------------------------------------------------------------------------------------
def test_isolated_run_measures_memory_and_survives_a_segfault(tmp_path):
    from alignkit.evaluate import evaluate

    methods = [TruthMethod(), SegfaultMethod(), UnpicklableMethod()]
    rows = evaluate([matrix_case("a", 3, 4)], methods, out_dir=tmp_path, isolate=True, threads=1, progress=False)
    ok, crashed, unpicklable = rows
    assert unpicklable["status"] == "error" and unpicklable["message"].startswith("cannot pass the method to a worker")
    assert ok["status"] == "ok", ok["message"]
    assert ok["corner_error"] == pytest.approx(0.0, abs=1e-9) and ok["seconds"] == 0.5
    assert ok["peak_rss_mb"] > 20  # an interpreter with numpy and torch loaded
    assert ok["extra_calls"] == 1 and ok["extra_process_seconds"] > 0
    assert crashed["status"] == "error" and "SIGSEGV" in crashed["message"]
    assert "\n" not in crashed["message"]
    assert (tmp_path / "logs" / "fake_segfault__a.log").exists()  # the worker's stderr, for debugging
    summary = (tmp_path / "summary.md").read_text()
    assert "peak_rss_mb ↓" in table_rows(summary, "affine")["header"]


def test_isolated_run_timeout(tmp_path):
    from alignkit.evaluate import evaluate

    started = time.perf_counter()
    rows = evaluate([matrix_case("a", 1, 0)], [SleepMethod()], out_dir=tmp_path, timeout=1.0, progress=False)
    assert rows[0]["status"] == "error" and rows[0]["message"] == "timed out after 1 s"
    assert time.perf_counter() - started < 20


# ------------------------------------------------------------------------------------------------
# alignkit's own methods and the registry
# ------------------------------------------------------------------------------------------------
def test_alignkit_photo_recovers_a_synthetic_affine(tmp_path):
    from alignkit.evaluate import AlignkitMethod, evaluate

    truth = np.array([[1.04, 0.03, 2.5], [-0.02, 0.97, -1.5], [0.0, 0.0, 1.0]])
    case = warped_affine_case(truth)
    method = AlignkitMethod("photo", max_iterations=40)
    # the iteration cap reaches every level of every stage
    assert all(max(s.iterations) <= 40 for s in method.config_for(2).stages)
    (row,) = evaluate([case], [method], out_dir=tmp_path, isolate=False, threads=1, progress=False)
    assert row["status"] == "ok", row["message"]
    assert row["corner_error_before"] > 5.0
    assert row["corner_error"] < 0.3  # sub-pixel, from a 5.8 px start
    # an affine case runs the photo preset's affine chain, as the OpenCV peers fit an affine to it;
    # a homography case (or an explicit transform) keeps the preset's chain
    assert row["extra_stages"] == "affine" and row["extra_ncc_after"] > 0.99
    assert [s.transform for s in method.config_for(2, "homography").stages] == ["affine", "homography"]
    explicit = AlignkitMethod("photo", transform="affine,homography")
    assert [s.transform for s in explicit.config_for(2, "affine").stages] == ["affine", "homography"]
    assert row["seconds"] > 0


def test_alignkit_methods_and_registry():
    from alignkit.evaluate import AlignkitMethod, list_methods, resolve_method
    from alignkit.solve.presets import preset_names

    names = list_methods()
    assert [f"alignkit:{p}" for p in preset_names()] == names[: len(preset_names())]
    brain = resolve_method("alignkit:brain")
    assert isinstance(brain, AlignkitMethod) and brain.name == "alignkit:brain"
    assert "deformable" in brain.kinds and 3 in brain.ndims
    photo = resolve_method("alignkit:photo")
    volume = Image.from_array(np.zeros((8, 8, 8), np.float32), spacing=1.0)
    assert photo.applicable(Case("v", volume, volume, kind="affine")) is not None  # 2D only
    assert photo.applicable(matrix_case("a", 1, 1)) is None
    assert resolve_method("alignkit:flow").applicable(matrix_case("a", 1, 1)) is not None  # flow ≠ affine
    with pytest.raises(ConfigError, match="unknown method 'alignkit:nope'"):
        resolve_method("alignkit:nope")
    with pytest.raises(ConfigError, match="unknown options"):
        AlignkitMethod("brain", iterations=3)
    # options reach the configuration: a transform override replaces the stage chain
    assert [s.transform for s in AlignkitMethod("brain", transform="affine").config_for(3).stages] == ["affine"]


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_unknown_method_is_one_line_exit_2(tmp_path, capsys):
    code, _, err = run_cli(["evaluate", "--dataset", "whatever", "--method", "nope:x", "-o", tmp_path / "o"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("alignkit: error: unknown method 'nope:x'")
    assert not (tmp_path / "o").exists()


def test_cli_missing_arguments_exit_2(tmp_path, capsys):
    code, _, err = run_cli(["evaluate", "--method", "alignkit:photo"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--dataset" in err and "-o" in err
    code, _, err = run_cli(["evaluate", "--dataset", "x", "--method", "alignkit:photo", "-o", tmp_path, "--pairs",
                            "0"], capsys)
    assert code == 2 and "--pairs" in err


def test_cli_unknown_dataset_is_one_line_exit_2(tmp_path, capsys):
    pytest.importorskip("alignkit.data.datasets")
    code, _, err = run_cli(["evaluate", "--dataset", tmp_path / "no-such-folder", "--method", "alignkit:photo",
                            "-o", tmp_path / "o"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("alignkit: error:")


class FakeDataset:
    """What ``alignkit.data.datasets.load_dataset`` returns, reduced to what the CLI uses."""

    def __init__(self, cases: list[Case]) -> None:
        self._cases = cases
        self.names = [c.name for c in cases]

    def __len__(self) -> int:
        return len(self._cases)

    def __getitem__(self, index: int) -> Case:
        return self._cases[index]

    def cases(self, n: int | None = None, seed: int = 0) -> list[Case]:
        return self._cases[:n]


@pytest.fixture
def fake_loaders(monkeypatch):
    """Stand-ins for the data-set loaders and the peer table, so the CLI is tested on its own."""
    import types

    calls = []
    datasets = types.ModuleType("alignkit.data.datasets")

    def load_dataset(name_or_path, *, layout=None, root=None):
        calls.append((str(name_or_path), layout))
        if str(name_or_path) != "tiny-affine":
            raise InputError(f"unknown data set {name_or_path!r}")
        matrix = np.array([[1.04, 0.03, 2.5], [-0.02, 0.97, -1.5], [0.0, 0.0, 1.0]])
        return FakeDataset([warped_affine_case(matrix), matrix_case("unused", 1, 1)])

    datasets.load_dataset = load_dataset
    datasets.available_datasets = lambda: ["tiny-affine"]
    peers = types.ModuleType("alignkit.evaluate.peers")
    peers.PEERS = {"fake:truth": TruthMethod}
    monkeypatch.setitem(sys.modules, "alignkit.data.datasets", datasets)
    monkeypatch.setitem(sys.modules, "alignkit.evaluate.peers", peers)
    return calls


def test_cli_evaluate_end_to_end(fake_loaders, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["evaluate", "--dataset", "tiny-affine", "--layout", "homogr", "--pairs", "1", "--method", "alignkit:photo",
            "--method", "fake:truth", "-o", out, "--no-isolate", "--threads", "1", "--device", "cpu"]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    assert fake_loaders == [("tiny-affine", "homogr")]
    table = read_csv(out / "results.csv")
    assert [(r["method"], r["case"], r["status"]) for r in table] == [
        ("alignkit:photo", "warped-affine", "ok"), ("fake:truth", "warped-affine", "ok")]
    assert table[0]["dataset"] == "tiny-affine" and float(table[0]["corner_error"]) < 0.3
    assert "## tiny-affine · affine (1 case)" in stdout  # the summary is printed
    assert "corner_error / fake:truth" in stdout  # the first peer is the default reference
    assert "wrote" in stdout and (out / "boxplot_corner_error.png").exists()


def test_cli_options_reach_registered_methods_only(fake_loaders, tmp_path, capsys, monkeypatch):
    from alignkit.evaluate import registry

    seen = {}
    real = registry.resolve_method

    def spy(spec, **options):
        if isinstance(spec, str):  # evaluate() passes the resolved Method objects through it again
            seen[spec] = options
        return real(spec, **options)

    monkeypatch.setattr(registry, "resolve_method", spy)
    argv = ["evaluate", "--dataset", "tiny-affine", "--pairs", "1", "--method", "c2f", "--method", "fake:truth",
            "--option", "mode=accurate", "--option", "tile=512", "-o", tmp_path / "o", "--no-isolate", "--quiet"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert seen == {"c2f": {"mode": "accurate", "tile": 512}, "fake:truth": {}}
    # options with no registered method to take them: one line, exit 2, nothing written
    code, _, err = run_cli(["evaluate", "--dataset", "tiny-affine", "--method", "fake:truth", "--option", "mode=fast",
                            "-o", tmp_path / "p"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--option" in err and not (tmp_path / "p").exists()


def test_cli_dataset_and_reference_errors_are_one_line(fake_loaders, tmp_path, capsys):
    code, _, err = run_cli(["evaluate", "--dataset", "nope", "--method", "fake:truth", "-o", tmp_path / "o"], capsys)
    assert code == 2 and err == "alignkit: error: unknown data set 'nope'\n"
    code, _, err = run_cli(["evaluate", "--dataset", "tiny-affine", "--method", "fake:truth", "-o", tmp_path / "o",
                            "--reference", "ants:syn", "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "reference method 'ants:syn'" in err


def test_cli_list(fake_loaders, capsys):
    code, out, _ = run_cli(["evaluate", "--list"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[:2] == ["datasets:", "  tiny-affine"] and "methods:" in lines
    assert any(line.split()[0] == "alignkit:brain" for line in lines[3:])
    assert any(line.split()[0] == "fake:truth" for line in lines[3:])  # a peer of the PEERS table


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM needs Linux /proc")
def test_worker_peak_memory_is_its_own_not_the_parents():
    """ru_maxrss carries the parent's peak across fork + exec; a worker started by a process that
    holds 500 MB must still report only what it used itself (about 200 MB: interpreter + torch)."""
    import subprocess

    held = np.ones(500 * 2**20 // 8)  # the parent's 500 MB
    code = "from alignkit.evaluate.worker import peak_rss_mb; print(peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert float(out) < 450.0, out
    assert held.sum() > 0
