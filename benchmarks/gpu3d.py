"""The brain preset on a GPU (issue 17's device target): OASIS-TRT-20 pairs at the native 1 mm grid
(256x256x160) and at 2 mm, one warm-up registration, then ``--repeats`` timed ones. Prints one JSON line.

The target of the issue is "the brain preset on a full-resolution pair in under a second after
warm-up" (FireANTs reports about that on an A6000-class card). The time is the public API's
``alignkit.register(..., method="classical", preset="brain", device=...)`` call from images in memory to
the transform, with ``torch.cuda.synchronize()`` before the clock stops; the scores (mean Dice over the
labels present in both subjects, % det J <= 0) are read afterwards, off the clock, from the same
registration. The pairs are held out from the preset's tuning (subjects 07-12; the tuning pairs are
``speed3d.TUNING_PAIRS``).

    python benchmarks/gpu3d.py --device cuda                       # 1 mm and 2 mm, 3 timed runs each
    python benchmarks/gpu3d.py --device cpu --resolutions 2 --repeats 1 --pairs "subject08<-subject07"
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_DATA, emit, log

BENCHMARK = "gpu3d"


def _synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_pair(case: Any, device: Any, repeats: int, preset: str, profile: str | None = None) -> dict[str, Any]:
    import torch

    import alignkit

    def once() -> tuple[Any, float]:
        _synchronize(device)
        started = time.perf_counter()
        result = alignkit.register(case.fixed, case.moving, method="classical", preset=preset, device=device,
                                   fixed_labels=case.fixed_labels, moving_labels=case.moving_labels, seed=0)
        _synchronize(device)
        return result, time.perf_counter() - started

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, warmup_seconds = once()
    times = []
    result = None
    for _ in range(repeats):
        result, seconds = once()
        times.append(seconds)
    assert result is not None
    if profile:  # one more registration under torch.profiler: where a warm run's time goes, per operator
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            once()
        sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        Path(profile).write_text(prof.key_averages().table(sort_by=sort_by, row_limit=40) + "\n"
                                 + prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    metrics = result.metrics
    row = {
        "shape": list(case.fixed.shape),
        "warmup_seconds": round(warmup_seconds, 3),
        "seconds": [round(t, 3) for t in times],
        "seconds_median": round(statistics.median(times), 3),
        "dice_mean": metrics.get("dice_mean"),
        "dice_mean_before": metrics.get("dice_mean_before"),
        "nonpositive_jacobian_percent": metrics.get("nonpositive_jacobian_percent",
                                                    metrics.get("jacobian", {}).get("nonpositive_percent")
                                                    if isinstance(metrics.get("jacobian"), dict) else None),
        "stage_seconds": metrics.get("stage_seconds"),
    }
    if device.type == "cuda":
        row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data", default=os.environ.get("ALIGNKIT_DATA", str(DEFAULT_DATA)))
    parser.add_argument("--resolutions", default="1,2", help="comma-separated mm (1 = native grid)")
    parser.add_argument("--pairs", default="subject12<-subject11,subject08<-subject07")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="brain")
    parser.add_argument("--out", default=None, help="also write the JSON line here")
    parser.add_argument("--profile", default=None,
                        help="write a torch.profiler table of one more registration of the first pair here")
    args = parser.parse_args(argv)

    import torch
    from speed3d import brain_cases

    device = torch.device(args.device)
    names = [p for p in args.pairs.split(",") if p]
    rows: dict[str, Any] = {}
    for resolution in [float(r) for r in args.resolutions.split(",") if r]:
        cases = brain_cases(Path(args.data), names, resolution)
        for name, case in zip(names, cases):
            key = f"{name}@{resolution:g}mm"
            log(f"[{BENCHMARK}] {key} on {device} ...")
            try:
                profile = args.profile if args.profile and not rows else None
                rows[key] = run_pair(case, device, args.repeats, args.preset, profile)
            except Exception as error:  # noqa: BLE001 - one failing pair must not lose the others' figures
                rows[key] = {"error": f"{type(error).__name__}: {error}"}
            log(f"[{BENCHMARK}] {key}: {rows[key]}")
    payload: dict[str, Any] = {
        "benchmark": BENCHMARK,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "repeats": args.repeats,
        "cases": rows,
    }
    emit(payload, args.out)


if __name__ == "__main__":
    main()
