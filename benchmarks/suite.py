"""Side-by-side benchmarks on the real data sets: alignkit against every installed peer, same cases.

Each benchmark is a data set of ``../shared/data`` plus the methods that fit its task; the script
runs them through :func:`alignkit.evaluate.evaluate` (one fresh interpreter per method and case, so
the peak memory and the crash of a peer are that run's own), scores every prediction the same way
(:func:`alignkit.evaluate.scoring.score_case`) and prints ONE JSON line: per method the mean of the
main metric and of the others, mean wall time, max peak RSS, and ratios against the reference peer
over the cases both finished. The full tables (``results.csv``, ``summary.md``, box plots) go to
``--out-dir``.

    python benchmarks/suite.py --list
    python benchmarks/suite.py homogr                   # every method of the benchmark, all cases
    python benchmarks/suite.py middlebury --quick       # fewer cases (CI-sized)
    python benchmarks/suite.py brain2d --methods alignkit:brain,ants:syn --out-dir /tmp/b2d

Peers that are not installed are reported as skipped. Threads: 2 per run (``--threads``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_DATA, emit, log

# name -> (dataset, methods, reference, cases in --quick, cases by default (None: all))
BENCHMARKS: dict[str, tuple[str, list[str], str, int, int | None]] = {
    "brain3d-aseg": (
        "brain3d-aseg-pair",
        ["alignkit:brain", "ants:syn", "dipy:syn", "sitk:demons", "elastix:bspline", "fireants:greedy"],
        "ants:syn", 1, None,
    ),
    "brain2d": (
        "brain2d",
        ["alignkit:brain", "ants:syn", "dipy:syn", "sitk:demons", "elastix:bspline"],
        "ants:syn", 2, None,
    ),
    "t1-pd-slices": (
        "multimodal/itk-t1-pd-slices",
        ["alignkit:multimodal", "ants:affine", "sitk:demons", "elastix:affine", "opencv:ecc"],
        "ants:affine", 2, None,
    ),
    "t1-pd-3d": ("multimodal/t1-pd-3d", ["alignkit:multimodal", "ants:affine", "elastix:affine"], "ants:affine", 1, None),
    "ct-mr-2d": (
        "multimodal/ct-mr-2d",
        ["alignkit:multimodal", "ants:affine", "elastix:affine", "opencv:ecc"],
        "ants:affine", 1, None,
    ),
    "middlebury": (
        "flow/middlebury",
        ["alignkit:flow", "opencv:farneback", "opencv:dis"],
        "opencv:farneback", 2, None,
    ),
    "sintel": (
        "flow/sintel",
        ["alignkit:flow", "opencv:farneback", "opencv:dis"],
        "opencv:farneback", 2, None,
    ),
    "mmflow-crops": (
        "flow/mmflow-crops",
        ["alignkit:flow", "opencv:farneback", "opencv:dis"],
        "opencv:farneback", 3, None,
    ),
    "stereo": (
        "stereo",
        ["alignkit:flow", "opencv:farneback", "opencv:dis"],
        "opencv:farneback", 2, None,
    ),
    "prostate-mr-us": (
        "multimodal/prostate-mr-us",
        ["alignkit:multimodal", "ants:syn", "elastix:bspline", "sitk:demons"],
        "ants:syn", 1, 4,
    ),
    "oasis": (
        "brain3d-oasis-trt20",
        ["alignkit:brain", "ants:syn", "dipy:syn", "sitk:demons", "elastix:bspline", "fireants:greedy"],
        "ants:syn", 1, 2,
    ),
    "homogr": (
        "homography/homogr",
        ["alignkit:photo", "opencv:sift-ransac", "opencv:ecc", "kornia:registrator", "kornia:sift-ransac"],
        "opencv:sift-ransac", 3, None,
    ),
    "vis-nir": (
        "vis-nir",
        ["alignkit:photo", "opencv:sift-ransac", "opencv:ecc", "kornia:registrator", "kornia:sift-ransac"],
        "opencv:sift-ransac", 4, 8,
    ),
}


def _finite(values: list[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(float(v))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark", nargs="?", help=f"one of {', '.join(BENCHMARKS)}")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--quick", action="store_true", help="a few cases only (CI-sized)")
    parser.add_argument("--pairs", type=int, help="number of cases (default: the benchmark's)")
    parser.add_argument("--methods", help="comma-separated methods (default: the benchmark's)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data folder (default ../shared/data)")
    parser.add_argument("--out-dir", help="keep results.csv, summary.md and the plots here")
    parser.add_argument("--out", help="also save the JSON line here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per method and case")
    args = parser.parse_args(argv)
    if args.list or not args.benchmark:
        for name, (dataset, methods, ref, quick, full) in BENCHMARKS.items():
            print(f"{name:14s} {dataset:30s} ref={ref:20s} {','.join(methods)}")
        return 0
    if args.benchmark not in BENCHMARKS:
        parser.error(f"unknown benchmark {args.benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    dataset, methods, reference, quick_n, full_n = BENCHMARKS[args.benchmark]
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if reference not in methods:
            reference = next((m for m in methods if not m.startswith("alignkit:")), methods[0])

    from alignkit.data.datasets import load_dataset
    from alignkit.errors import AlignkitError
    from alignkit.evaluate import evaluate
    from alignkit.evaluate.report import summarize

    payload: dict[str, Any] = {"benchmark": args.benchmark, "dataset": dataset, "reference": reference}
    started = time.perf_counter()
    try:
        data = load_dataset(dataset, root=args.data)
    except AlignkitError as exc:
        payload.update(status="skipped", reason=str(exc))
        emit(payload, args.out)
        return 0
    n = args.pairs if args.pairs else (quick_n if args.quick else full_n)
    cases = data.cases(n, seed=args.seed)
    log(f"[{args.benchmark}] {len(cases)} case(s) of {dataset}; methods {', '.join(methods)}")
    with tempfile.TemporaryDirectory(prefix="ak-suite-") as tmp:
        out_dir = Path(args.out_dir) if args.out_dir else Path(tmp)
        rows = evaluate(
            cases, methods, out_dir=out_dir, seed=args.seed, device="cpu", isolate=True,
            threads=args.threads, timeout=args.timeout, reference=reference, dataset=dataset,
        )
        summaries = summarize(rows, reference=reference)
    results: dict[str, Any] = {}
    for group in summaries:
        for summary in group.methods:
            entry = results.setdefault(summary.method, {})
            key = group.kind
            entry[key] = {
                "n_ok": summary.n_ok,
                "n_total": summary.n_total,
                "main_metric": group.main_metric,
                **{m: stats[0] for m, stats in summary.stats.items()},
                **{f"{m}_std": stats[1] for m, stats in summary.stats.items()},
                **{f"{m}_ratio": r for m, r in summary.ratios.items()},
            }
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        statuses = sorted({r["status"] for r in mine})
        entry = results.setdefault(method, {})
        entry["status"] = statuses[0] if len(statuses) == 1 else "/".join(statuses)
        reasons = sorted({r["message"] for r in mine if r["status"] in ("skipped", "error") and r["message"]})
        if reasons:
            entry["messages"] = reasons[:3]
        peaks = _finite([r.get("peak_rss_mb") for r in mine if r["status"] == "ok"])
        if peaks:
            entry["peak_rss_mb_max"] = max(peaks)
    payload.update(
        status="ok",
        cases=[c.name for c in cases],
        threads=args.threads,
        cpu_count=os.cpu_count(),
        load_avg_at_end=[round(x, 2) for x in os.getloadavg()],
        methods=results,
        out_dir=args.out_dir,
        total_seconds=time.perf_counter() - started,
    )
    emit(payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
