"""Tests of measured ground truth: the packaged files (alignkit.data.groundtruth) are complete and
consistent with the fits they record, the script that writes them reproduces them from the data, a
Case says whether its truth is measured, and ``alignkit evaluate``'s summary flags such cases."""

from __future__ import annotations

import importlib.util
import itertools
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, data_path

from alignkit.data import Case
from alignkit.data.groundtruth import measured_truth, truth_file
from alignkit.evaluate.report import (
    MEASURED_MARK,
    case_truth,
    columns_of,
    summary_markdown,
    write_report,
)
from alignkit.image import Image

MEASURED = {
    "multimodal/ct-mr-2d": ["mri<-ct_moving"],
    "multimodal/itk-t1-pd-slices": ["t1<-pd_R10X13Y17"],
    "multimodal/t1-pd-3d": ["t1<-pd"],
}
REPO = Path(__file__).resolve().parents[1]


def records(dataset: str) -> dict:
    return json.loads((resources.files("alignkit.data") / "groundtruth" / truth_file(dataset)).read_text())["cases"]


def spread(a: np.ndarray, b: np.ndarray, corners: np.ndarray) -> float:
    h = np.hstack([corners, np.ones((len(corners), 1))]).T
    return float(np.linalg.norm((a @ h)[:-1] - (b @ h)[:-1], axis=0).max())


@pytest.mark.parametrize("dataset", sorted(MEASURED))
def test_packaged_truth_has_its_provenance(dataset):
    cases = records(dataset)
    assert sorted(cases) == MEASURED[dataset]
    for name, record in cases.items():
        for key in ("matrix", "uncertainty", "units", "fits", "method", "measured_files", "date", "commit", "script",
                    "versions"):
            assert key in record, (name, key)
        assert record["script"] == "benchmarks/measure_ground_truth.py" and len(record["commit"]) == 40
        fits = [np.asarray(f["matrix"]) for f in record["fits"].values()]
        assert len(fits) == 2 and all(len(f["sha256"]) == 64 for f in record["measured_files"].values())
        value = measured_truth(dataset, name)
        ndim = len(record["matrix"]) - 1
        assert value.matrix.shape == (ndim + 1, ndim + 1) and value.units == ("mm" if ndim == 3 else "px")
        assert f"{value.uncertainty:.2g} {value.units}" in value.source and "commit " in value.source


@pytest.mark.parametrize("dataset", sorted(MEASURED))
def test_uncertainty_is_the_corner_spread_of_the_two_fits_and_the_value_lies_between_them(dataset):
    from alignkit.io import read_image

    folder = data_path(*dataset.split("/"))
    for name, record in records(dataset).items():
        grid = read_image(folder / record["measured_files"]["fixed"]["name"]).grid
        voxels = np.array(list(itertools.product(*[(0, s - 1) for s in grid.shape])), dtype=np.float64)
        affine = grid.world_from_voxel.numpy()
        corners = voxels @ affine[: grid.ndim, : grid.ndim].T + affine[: grid.ndim, grid.ndim]
        first, second = (np.asarray(f["matrix"]) for f in record["fits"].values())
        value = measured_truth(dataset, name)
        assert value.uncertainty == pytest.approx(spread(first, second, corners), rel=1e-4)  # fits stored to 10 digits
        for fit in (first, second):  # the value is the map halfway between the fits
            assert spread(value.matrix, fit, corners) <= 0.55 * value.uncertainty + 1e-6

def test_unknown_measured_case_is_a_one_line_input_error():
    from alignkit.errors import InputError

    with pytest.raises(InputError, match="no measured ground truth for case 'nope'") as info:
        measured_truth("multimodal/ct-mr-2d", "nope")
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="no measured ground truth for flow/middlebury"):
        measured_truth("flow/middlebury", "Dimetrodon")


def test_script_reproduces_the_packaged_itk_truth():
    """benchmarks/measure_ground_truth.py measured on the data again gives the packaged values."""
    pytest.importorskip("cv2")
    folder = data_path("multimodal", "itk-t1-pd-slices")
    spec = importlib.util.spec_from_file_location("measure_ground_truth", REPO / "benchmarks" / "measure_ground_truth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fresh = module.MEASUREMENTS["multimodal/itk-t1-pd-slices"]["t1<-pd_R10X13Y17"](folder)
    stored = measured_truth("multimodal/itk-t1-pd-slices", "t1<-pd_R10X13Y17")
    corners = np.array([[0, 0], [220, 0], [0, 256], [220, 256]], dtype=np.float64)
    assert spread(np.asarray(fresh["matrix"]), stored.matrix, corners) < 1e-3
    assert fresh["uncertainty"] == pytest.approx(stored.uncertainty, abs=1e-3)
    assert fresh["measured_files"] == stored.record["measured_files"]


def test_case_validates_its_truth_fields():
    image = Image.from_array(np.zeros((4, 5), np.float32))
    assert Case("a", image, image).truth == "given" and Case("a", image, image).truth_uncertainty is None
    with pytest.raises(ValueError, match="truth'] must be one of"):
        Case("a", image, image, meta={"truth": "exact"})
    with pytest.raises(ValueError, match="needs meta\\['truth_source'\\] and"):
        Case("a", image, image, meta={"truth": "measured", "truth_uncertainty": 0.1})
    case = Case("a", image, image, meta={"truth": "measured", "truth_source": "fit X", "truth_uncertainty": 0.1})
    assert (case.truth, case.truth_source, case.truth_uncertainty) == ("measured", "fit X", 0.1)
    assert case_truth(case) == {"truth": "measured", "truth_source": "fit X", "truth_uncertainty": 0.1}
    assert case_truth(Case("b", image, image)) == {}


def rows_for(cases: list[Case], dataset: str = "multimodal/ct-mr-2d") -> list[dict]:
    """Rows as ``alignkit evaluate`` writes them, each carrying its case's truth columns."""
    out = []
    for k, case in enumerate(cases):
        for method, error in (("alignkit:multimodal", 1.0 + k), ("fake:peer", 2.0 + k)):
            out.append({"dataset": dataset, "case": case.name, "kind": case.kind, "method": method, "status": "ok",
                        "seconds": 1.0, "peak_rss_mb": None, "corner_error": error, "message": ""} | case_truth(case))
    return out


def test_summary_flags_groups_with_measured_truth_and_names_the_cases(tmp_path):
    image = Image.from_array(np.zeros((4, 5), np.float32))
    measured = Case("mri<-ct_moving", image, image, kind="affine", matrix=np.eye(3),
                    meta={"truth": "measured", "truth_source": "two same-image fits; uncertain to 0.012 px",
                          "truth_uncertainty": 0.012})
    given = Case("mri<-ct_true", image, image, kind="affine", matrix=np.eye(3))
    rows = rows_for([given, measured]) + rows_for([given], dataset="vis-nir")
    text = summary_markdown(rows)
    sections = {s.split("\n", 1)[0]: s for s in text.split("\n## ")[1:]}
    flagged = sections[f"multimodal/ct-mr-2d · affine (2 cases, 1 with measured ground truth {MEASURED_MARK})"]
    assert f"{MEASURED_MARK} Measured ground truth: `mri<-ct_moving`: two same-image fits; uncertain to 0.012 px." \
        in flagged and "mri<-ct_true" not in flagged
    assert MEASURED_MARK not in sections["vis-nir · affine (1 case)"]
    assert MEASURED_MARK not in summary_markdown(rows_for([given]))  # no legend without measured cases
    # results.csv keeps the columns right after `kind`
    assert columns_of(rows)[:6] == ["dataset", "case", "kind", "truth", "truth_source", "truth_uncertainty"]
    assert columns_of(rows_for([given]))[:4] == ["dataset", "case", "kind", "method"]
    write_report(rows, tmp_path)
    assert MEASURED_MARK in (tmp_path / "summary.md").read_text()
    assert "measured" in (tmp_path / "results.csv").read_text()


def test_measured_flag_of_a_real_case_reaches_the_summary():
    from alignkit.data.datasets import load_dataset

    data_path("multimodal", "ct-mr-2d")
    ctmr = load_dataset("multimodal/ct-mr-2d", root=DATA)
    text = summary_markdown(rows_for(list(ctmr)))
    assert f"1 with measured ground truth {MEASURED_MARK}" in text and "`mri<-ct_moving`: measured by " in text
