"""The 2D presets against OpenCV on every real 2D data set with ground truth, in one run (issue 18).

Prints ONE JSON line with two parts:

* ``photo``: ``alignkit:photo`` against ``opencv:sift-ransac``, ``opencv:sift-magsac`` (the same SIFT
  matches, USAC MAGSAC++) and ``opencv:ecc`` on ``homography/homogr`` (8 wide-baseline pairs; error =
  mean distance of the image corners under the predicted vs the true homography, and the TRE of the
  8 manual points) and all 80 ``vis-nir`` pairs (corner error under the true affine): per data set and
  method the mean and median error, the success rate at 1, 3 and 5 px of corner error, the mean
  seconds, and -- for ``alignkit:photo`` -- the per-pair comparison with SIFT + RANSAC that the issue's
  target names: the largest excess over SIFT (``worst_excess_over_sift_px``) and the pairs worse by
  more than 1 px;
* ``flow``: ``alignkit:flow`` against ``opencv:dis`` (MEDIUM preset), ``opencv:farneback`` and
  ``opencv:tvl1`` (contrib; reported skipped without ``opencv-contrib-python-headless``) on
  ``flow/middlebury`` (4 sequences), ``flow/sintel`` (4 samples) and ``flow/mmflow-crops`` (3): mean
  EPE, EPE on non-occluded / occluded pixels where the data set marks occlusions, mean seconds,
  and ratios of alignkit's EPE and time to each peer's.

Every method runs through :func:`alignkit.evaluate.evaluate` on the same cases with the same scoring
(:func:`alignkit.evaluate.scoring.score_case`). ``seconds`` is the method's own wall time (alignkit:
``alignkit.register`` from the loaded images to the result, metrics included; peers: their calls).
By default the runs are in this process (``--isolate`` gives each a fresh interpreter and a peak
RSS), after one untimed warm-up of each method on the first case of each data set, so that no row
pays Python's and torch's one-off imports (a fresh ``alignkit register`` process pays them once).

Which cases tuned what (``alignkit.solve.presets``): ``photo`` -- homogr and the vis-nir ``field``
pairs and ``indoor/0006``, ``indoor/0019``, ``mountain/0002``, ``mountain/0006``, ``mountain/0016``,
``forest/0010``, ``forest/0013`` are in-sample, the other vis-nir pairs held out (``held_out`` block); ``flow`` -- Middlebury and the Sintel samples are
in-sample, the mmflow crops held out.

    python benchmarks/presets2d.py                       # both parts, every case (~20-40 min on 2 cores)
    python benchmarks/presets2d.py --part flow
    python benchmarks/presets2d.py --part photo --limit 8   # first 8 cases of each data set
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, log

PHOTO_METHODS = ("alignkit:photo", "opencv:sift-ransac", "opencv:sift-magsac", "opencv:ecc")
FLOW_METHODS = ("alignkit:flow", "opencv:dis", "opencv:farneback", "opencv:tvl1")
PHOTO_SETS = ("homography/homogr", "vis-nir")
FLOW_SETS = ("flow/middlebury", "flow/sintel", "flow/mmflow-crops")
#: vis-nir pairs the photo preset's rules were set on (its docstring); the rest are held out
PHOTO_IN_SAMPLE = ("field/", "indoor/0006", "indoor/0019", "mountain/0002", "mountain/0006", "mountain/0016",
                   "forest/0010", "forest/0013")
THRESHOLDS_PX = (1, 3, 5)


def _finite(values: list[Any]) -> np.ndarray:
    array = np.array([float(v) for v in values if v is not None], dtype=np.float64)
    return array[np.isfinite(array)]


def _mean(values: list[Any]) -> float:
    array = _finite(values)
    return float(array.mean()) if array.size else math.nan


def _ok(rows: list[dict[str, Any]], method: str) -> dict[str, dict[str, Any]]:
    return {r["case"]: r for r in rows if r["method"] == method and r["status"] == "ok"}


def _photo_summary(rows: list[dict[str, Any]], methods: list[str], cases: list[str] | None = None,
                   error: str = "corner_error") -> dict[str, Any]:
    """``error``: the per-pair error the success rates and the comparison with SIFT use -- the corner
    error under the true matrix (vis-nir), or the TRE of the manual points (homogr, whose matrix is a
    fit to those 8 points and extrapolates hundreds of pixels at the image corners)."""
    out: dict[str, Any] = {}
    sift = _ok(rows, "opencv:sift-ransac")
    for method in methods:
        done = _ok(rows, method)
        if cases is not None:
            done = {k: v for k, v in done.items() if k in cases}
        statuses = sorted({r["status"] for r in rows if r["method"] == method})
        if not done:
            out[method] = {"status": ",".join(statuses), "message": next(
                (r.get("message", "") for r in rows if r["method"] == method), "")}
            continue
        errors = [r.get(error) for r in done.values()]
        entry: dict[str, Any] = {
            "cases": len(done),
            "error": error,
            "error_mean": _mean(errors),
            "error_median": float(np.median(_finite(errors))) if _finite(errors).size else math.nan,
            **{f"success_{k}px": float(np.mean([float(e) <= k for e in errors])) for k in THRESHOLDS_PX},
            "seconds_mean": _mean([r.get("seconds") for r in done.values()]),
        }
        if error != "corner_error":
            entry["corner_error_mean"] = _mean([r.get("corner_error") for r in done.values()])
        if method != "opencv:sift-ransac" and sift:
            shared = [c for c in done if c in sift]
            excess = {c: float(done[c][error]) - float(sift[c][error]) for c in shared}
            if excess:
                worst = max(excess, key=lambda c: excess[c])
                entry["worst_excess_over_sift_px"] = excess[worst]
                entry["worst_excess_case"] = worst
                entry["cases_worse_than_sift_by_1px"] = sorted(c for c, e in excess.items() if e > 1.0)
        out[method] = entry
    return out


def _flow_summary(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in methods:
        done = _ok(rows, method)
        if not done:
            statuses = sorted({r["status"] for r in rows if r["method"] == method})
            out[method] = {"status": ",".join(statuses), "message": next(
                (r.get("message", "") for r in rows if r["method"] == method), "")}
            continue
        entry = {
            "cases": len(done),
            "epe": _mean([r.get("epe") for r in done.values()]),
            "epe_per_case": {c: float(r["epe"]) for c, r in done.items()},
            "seconds_mean": _mean([r.get("seconds") for r in done.values()]),
        }
        for key in ("epe_noc", "epe_occ"):
            values = _finite([r.get(key) for r in done.values()])
            if values.size:
                entry[key] = float(values.mean())
        out[method] = entry
    ours = out.get("alignkit:flow", {})
    if "epe" in ours:
        for method, entry in out.items():
            if method != "alignkit:flow" and "epe" in entry:
                ours[f"epe_ratio_vs_{method}"] = ours["epe"] / entry["epe"] if entry["epe"] else math.nan
                ours[f"time_ratio_vs_{method}"] = ours["seconds_mean"] / entry["seconds_mean"] if entry["seconds_mean"] else math.nan
    return out


def _summary(part: str, dataset: str, rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    if part == "flow":
        return _flow_summary(rows, methods)
    error = "tre_mean" if dataset.endswith("homogr") else "corner_error"
    summary = _photo_summary(rows, methods, error=error)
    if dataset == "vis-nir":
        held = sorted({r["case"] for r in rows if not r["case"].startswith(PHOTO_IN_SAMPLE)})
        summary["held_out"] = {"cases": len(held), **_photo_summary(rows, methods, cases=held, error=error)}
    return summary


def _run(dataset: str, methods: list[str], args: argparse.Namespace, out_root: Path) -> list[dict[str, Any]]:
    from alignkit.data.datasets import load_dataset
    from alignkit.evaluate import evaluate

    data = load_dataset(dataset, root=args.data)
    count = min(args.limit, len(data)) if args.limit else len(data)
    cases = [data[i] for i in range(count)]
    if not args.isolate and cases:
        # one untimed run of each method: imports and first-call set-up are not any case's cost
        evaluate(cases[:1], methods, out_dir=out_root / "warmup" / dataset.replace("/", "_"), isolate=False,
                 threads=args.threads, progress=False, seed=args.seed)
    log(f"{dataset}: {len(cases)} cases x {len(methods)} methods")
    return evaluate(cases, methods, out_dir=out_root / dataset.replace("/", "_"), isolate=args.isolate,
                    threads=args.threads, progress=not args.quiet, seed=args.seed, dataset=dataset)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("photo", "flow", "all"), default="all")
    parser.add_argument("--limit", type=int, default=0, help="first N cases of each data set (0 = all)")
    parser.add_argument("--sets", default=None, help="comma-separated data sets of the part(s) to run (default: all)")
    parser.add_argument("--data", default=None, help="root of the data sets (default ../shared/data)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--isolate", action="store_true", help="a fresh interpreter per run (adds its peak RSS)")
    parser.add_argument("--out-dir", default=None, help="keep evaluate's tables here (default: a temporary folder)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--summarize", default=None, metavar="DIR",
                        help="no runs: summarise the tables a previous --out-dir DIR run wrote")
    args = parser.parse_args(argv)

    from alignkit.data.datasets import dataset_folder
    from alignkit.errors import InputError
    from alignkit.evaluate.report import read_results

    payload: dict[str, Any] = {"benchmark": "presets2d", "threads": args.threads, "isolate": args.isolate,
                               "load_average_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="presets2d-") as tmp:
        out_root = Path(args.out_dir) if args.out_dir else Path(tmp)
        parts = (("photo", PHOTO_SETS, PHOTO_METHODS), ("flow", FLOW_SETS, FLOW_METHODS))
        for part, sets, methods in parts:
            if args.part not in (part, "all"):
                continue
            payload[part] = {}
            for dataset in sets:
                if args.sets and dataset not in args.sets.split(","):
                    continue
                try:
                    dataset_folder(dataset, root=args.data)
                except InputError as exc:  # absent data: say so, run the rest
                    payload[part][dataset] = {"skipped": str(exc)}
                    continue
                if args.summarize:
                    table = Path(args.summarize) / dataset.replace("/", "_") / "results.json"
                    if not table.is_file():
                        payload[part][dataset] = {"skipped": f"{table} not found"}
                        continue
                    rows = read_results(table)
                else:
                    rows = _run(dataset, list(methods), args, out_root)
                payload[part][dataset] = _summary(part, dataset, rows, list(methods))
    payload["load_average_end"] = os.getloadavg()
    emit(payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
