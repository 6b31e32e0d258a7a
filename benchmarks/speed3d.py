"""3D speed and accuracy on the same cores: the brain preset against Greedy, ANTs, ConvexAdam, dipy and
FireANTs on held-out OASIS-TRT-20 pairs at 2 mm and 1 mm, and the multimodal preset against ANTs and
elastix (issue 17). Prints one JSON line.

Every run goes through :func:`alignkit.evaluate.runner.evaluate` with ``isolate=True``: a fresh worker
process per method and pair (its own imports, its own peak RSS, ``--threads`` threads for torch, BLAS,
OpenMP and ITK), scored in this process the same way for every method (``alignkit.evaluate.scoring``:
mean Dice over the labels present in both subjects, % of fixed voxels with det J <= 0 of the whole map,
central differences). ``seconds`` is the method's own wall time from images in memory to its map.

Ratios are against the faster (by mean seconds over the pairs) of ``greedy:deformable`` and ``ants:syn``
in the same run -- the issue's yardstick ("half the time of the faster of Greedy and ANTs SyN") -- or,
when neither ran, the fastest peer: ``time_ratio = seconds / seconds_ref``, ``dice_ratio``,
``memory_ratio``. The pairs named in ``TUNING_PAIRS`` are the brain preset's tuning cases; the default
pairs are held out (subjects 07-12).

The workers run with ``OMP_WAIT_POLICY=PASSIVE`` (``--omp-active`` leaves it unset): on a machine whose
cores another process also uses, OpenMP's spinning idle threads made one greedy iteration of the brain
preset at 2 mm take 2.8 s instead of 0.43 s (two torch threads, load average ~4.8, measured). It
applies to every worker, peers included (ITK-based tools use their own thread pools).

    python benchmarks/speed3d.py                                  # 2 held-out pairs at 2 mm, 1 at 1 mm
    python benchmarks/speed3d.py --resolutions 2 --pairs "subject08<-subject07"
    python benchmarks/speed3d.py --methods alignkit:brain,greedy:deformable --config tuned.json
    python benchmarks/speed3d.py --syncc                          # also ants:syncc (~15 min per 2 mm pair)
    python benchmarks/speed3d.py --multimodal                     # also T1<->PD head and CT<->MR slices
    python benchmarks/speed3d.py --multimodal --multimodal-sets multimodal/ct-mr-2d --resolutions 2
    python benchmarks/speed3d.py --profile --resolutions 2        # torch.profiler of the brain preset, per level and term
    python benchmarks/speed3d.py --profile --resolutions "" --multimodal   # ... of the multimodal preset (first case per set)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_DATA, emit, log, mean_finite

BENCHMARK = "speed3d"
BRAIN = "brain3d-oasis-trt20"
TUNING_PAIRS = ("subject02<-subject01", "subject04<-subject03", "subject06<-subject05")
HELD_OUT_2MM = ("subject08<-subject07", "subject10<-subject09")
HELD_OUT_1MM = ("subject12<-subject11",)
BRAIN_METHODS = ("alignkit:brain", "greedy:deformable", "ants:syn", "convexadam", "dipy:syn", "fireants:greedy")
REFERENCES = ("greedy:deformable", "ants:syn")
MULTIMODAL_METHODS = ("alignkit:multimodal", "ants:syn", "elastix:bspline")
MULTIMODAL_SETS = ("multimodal/t1-pd-3d", "multimodal/ct-mr-2d")
#: the per-case scores kept in the JSON line (the rest stays in the evaluation's results.json)
KEEP = ("dice_mean", "hd95_mean", "tre_mean", "epe", "corner_error", "nonpositive_jacobian_percent", "jacobian_min",
        "seconds", "peak_rss_mb")


def brain_cases(data: Path, names: list[str], resolution: float) -> list[Any]:
    """The named OASIS cases, resampled to ``resolution`` mm isotropic (``dio.resampled_case``: Gaussian
    pre-smoothing of the images, nearest for the labels; 1 = the native 1 mm grids)."""
    from dio import resampled_case

    from alignkit.data.datasets import load_dataset

    dataset = load_dataset(BRAIN, root=data)
    cases = [dataset[name] for name in names]
    if resolution != 1:
        cases = [resampled_case(c, (resolution,) * 3, tag=f"{resolution:g}mm") for c in cases]
    return cases


def run_group(cases: list[Any], methods: list[str], options: dict[str, dict[str, Any]], threads: int,
              timeout: float | None, out: Path) -> dict[str, Any]:
    """Every method on every case in isolated workers; per method the per-case rows and their means."""
    from alignkit.evaluate.registry import resolve_method
    from alignkit.evaluate.runner import evaluate

    resolved = [resolve_method(m, **options.get(m, {})) for m in methods]
    rows = evaluate(cases, resolved, out_dir=out, threads=threads, isolate=True, timeout=timeout, progress=False)
    group: dict[str, Any] = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        ok = [r for r in mine if r["status"] == "ok"]
        entry: dict[str, Any] = {"status": "ok" if ok else (mine[0]["status"] if mine else "missing")}
        if not ok:
            entry["message"] = mine[0].get("message", "") if mine else ""
        entry["per_case"] = [{"case": r["case"], "status": r["status"], **{k: r.get(k) for k in KEEP if r.get(k) is not None}}
                             for r in mine]
        for key in KEEP:
            values = [r.get(key) for r in ok if r.get(key) is not None]
            if values:
                entry[key] = max(values) if key in ("peak_rss_mb", "nonpositive_jacobian_percent") else mean_finite(values)
        group[method] = entry
        log(f"[{BENCHMARK}] {method}: " + ", ".join(f"{k} {entry[k]:.4g}" for k in KEEP if isinstance(entry.get(k), float)))
    add_ratios(group)
    return group


def add_ratios(group: dict[str, Any]) -> None:
    """Ratios against the faster of Greedy and ANTs SyN (else the fastest peer) of the same run."""
    timed = {m: e for m, e in group.items() if e.get("status") == "ok" and isinstance(e.get("seconds"), float)}
    candidates = [m for m in REFERENCES if m in timed] or [m for m in timed if not m.startswith("alignkit:")]
    if not candidates:
        return
    reference = min(candidates, key=lambda m: timed[m]["seconds"])
    ref = timed[reference]
    for entry in timed.values():
        entry["reference"] = reference
        entry["time_ratio"] = entry["seconds"] / ref["seconds"]
        if entry.get("peak_rss_mb") and ref.get("peak_rss_mb"):
            entry["memory_ratio"] = entry["peak_rss_mb"] / ref["peak_rss_mb"]
        for key in ("dice_mean", "tre_mean", "epe", "corner_error"):
            if entry.get(key) is not None and ref.get(key):
                entry[key.replace("_mean", "") + "_ratio"] = entry[key] / ref[key]


def profile_preset(case: Any, config: str | None, threads: int, preset: str = "brain") -> dict[str, Any]:
    """torch.profiler over one in-process registration with ``preset``: wall time of each level and term
    range the engine names (``level <model> 1/<factor>``, ``term <similarity>``, ``term warp``), the top
    operators by self time, and the stage times."""
    import torch

    torch.set_num_threads(threads)
    from torch.profiler import ProfilerActivity, profile

    import alignkit

    options: dict[str, Any] = {"preset": preset}
    if config:
        options["config"] = config
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = alignkit.register(case.fixed, case.moving, seed=0, quiet=True, **options)
    wall = time.perf_counter() - started
    events = prof.key_averages()
    ranges = {e.key: round(e.cpu_time_total / 1e6, 3) for e in events if e.key.startswith(("level ", "term "))}
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    return {
        "case": case.name,
        "preset": preset,
        "wall_seconds_profiled": wall,
        "stage_seconds": result.metrics.get("stage_seconds"),
        "ranges_seconds": ranges,
        "top_ops_self_seconds": {e.key: round(e.self_cpu_time_total / 1e6, 3) for e in top},
        "note": "ranges are CPU time of the forward code inside them (backward passes run outside the named ranges)",
    }


def multimodal_cases(data: Path, name: str, count: int) -> list[Any]:
    """The first ``count`` cases of the multimodal data set ``name`` ([] when it is absent)."""
    from alignkit.data.datasets import load_dataset

    try:
        dataset = load_dataset(name, root=data)
    except Exception as exc:  # noqa: BLE001 - a missing set is reported, not fatal
        log(f"[{BENCHMARK}] {name}: skipped ({exc})")
        return []
    return [dataset[i] for i in range(min(count, len(dataset)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", default="2,1", help="comma-separated mm, e.g. 2 or 2,1 (default 2,1)")
    parser.add_argument("--pairs", help=f"cases at 2 mm (default {','.join(HELD_OUT_2MM)})")
    parser.add_argument("--pairs-1mm", help=f"cases at 1 mm (default {','.join(HELD_OUT_1MM)})")
    parser.add_argument("--methods", help=f"comma-separated (default {','.join(BRAIN_METHODS)}; missing packages are skipped)")
    parser.add_argument("--syncc", action="store_true", help="also ants:syncc (about 15 min per 2 mm pair)")
    parser.add_argument("--multimodal", action="store_true", help="also alignkit:multimodal vs ants:syn (MI) and "
                        "elastix:bspline on the 3D T1<->PD head and the CT<->MR slices")
    parser.add_argument("--multimodal-cases", type=int, default=1, help="cases per multimodal data set (default 1)")
    parser.add_argument("--multimodal-sets", default=",".join(MULTIMODAL_SETS),
                        help=f"comma-separated multimodal data sets (default {','.join(MULTIMODAL_SETS)})")
    parser.add_argument("--config", help="configuration file for alignkit:brain (applied on top of the preset)")
    parser.add_argument("--profile", action="store_true", help="profile alignkit:brain on the first pair of each "
                        "resolution (and, with --multimodal, alignkit:multimodal on the first case of each set) in this "
                        "process instead of running the comparison")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--omp-active", action="store_true", help="leave OMP_WAIT_POLICY unset in the workers "
                        "(default: PASSIVE, see the module docstring)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run (default 3600)")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--out", help="also save the JSON line here")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if not args.omp_active:
        # every worker (peers too) inherits it: idle OpenMP threads sleep instead of spinning
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    data = Path(args.data)
    payload: dict[str, Any] = {"benchmark": BENCHMARK, "threads": args.threads, "cpu_count": os.cpu_count(),
                               "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
                               "tuning_pairs": list(TUNING_PAIRS), "config": args.config,
                               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if not (data / BRAIN).is_dir():
        payload.update(status="skipped", reason=f"data folder {data / BRAIN} absent")
        emit(payload, args.out)
        return 0
    resolutions = [float(r) for r in args.resolutions.split(",") if r.strip()]
    methods = [m.strip() for m in (args.methods.split(",") if args.methods else BRAIN_METHODS) if m.strip()]
    if args.syncc and "ants:syncc" not in methods:
        methods.append("ants:syncc")
    options: dict[str, dict[str, Any]] = {}
    if args.config:
        if not Path(args.config).is_file():
            parser.error(f"--config: no such file {args.config}")
        options["alignkit:brain"] = {"config": str(Path(args.config).resolve())}
    pairs = {2.0: args.pairs.split(",") if args.pairs else list(HELD_OUT_2MM),
             1.0: args.pairs_1mm.split(",") if args.pairs_1mm else list(HELD_OUT_1MM)}

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ak-speed3d-") as tmp:
        for resolution in resolutions:
            names = pairs.get(resolution) or pairs[2.0]
            tuned = sorted(set(names) & set(TUNING_PAIRS))
            cases = brain_cases(data, names, resolution)
            key = f"brain_{resolution:g}mm"
            if args.profile:
                results[key] = {"profile": profile_preset(cases[0], args.config, args.threads)}
                continue
            log(f"[{BENCHMARK}] {key}: {', '.join(names)}")
            results[key] = {"cases": names, "tuning_cases_among_them": tuned,
                            "methods": run_group(cases, methods, options, args.threads, args.timeout, Path(tmp) / key)}
        if args.multimodal:
            results["multimodal"] = {}
            for name in [n.strip() for n in args.multimodal_sets.split(",") if n.strip()]:
                cases = multimodal_cases(data, name, args.multimodal_cases)
                if cases and args.profile:
                    results["multimodal"][name] = {"profile": profile_preset(cases[0], None, args.threads, "multimodal")}
                elif cases:
                    results["multimodal"][name] = {"cases": [c.name for c in cases], "methods": run_group(
                        cases, list(MULTIMODAL_METHODS), {}, args.threads, args.timeout, Path(tmp) / name.replace("/", "_"))}

    payload.update(status="ok", results=results, total_seconds=time.perf_counter() - started,
                   load_avg_at_end=[round(x, 2) for x in os.getloadavg()])
    emit(payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
