"""One prepared device session: the brain preset's GPU timing, then learned models trained on the GPU
within a wall-clock budget, their run folders packed for the way back. Prints one JSON line.

A lent device (an H200 here) comes for minutes, so everything it should do runs from this one script:

1. ``gpu3d.py`` on its own (nothing else on the GPU or the cores while it is timed): the brain preset on
   held-out OASIS-TRT-20 pairs at 1 mm and 2 mm, warm-up then timed runs, and a ``torch.profiler``
   table of one more registration;
2. the training jobs of ``JOBS``, side by side. Each job first runs a short *probe* (the job's
   configuration with the probe's overrides: one epoch of a few pairs) that measures its pace on this
   machine with the other probes running, then the real run with as many epochs as fit in
   ``--train-budget`` seconds at that pace (the planned epoch count is written into the run's
   ``config.json`` like any run's, so a CPU rerun of the same configuration repeats it);
3. each run folder (``config.json``, ``log.csv``, the checkpoint), the probe's log and the job's output
   are packed into ``OUT/<job>.tar.gz``; ``OUT/session.json`` holds this line, ``OUT/gpu3d_profile.txt``
   the profile (at most 8 files come back from a device).

    python benchmarks/gpu_session.py --out "$OUT"                          # on the device
    python benchmarks/gpu_session.py --out /tmp/s --device cpu --train-budget 60 --bench-resolutions 2 \\
        --bench-pairs "subject08<-subject07" --bench-repeats 1 \\
        --override '{"flownet-c": {"config": {"size": [64], "synthetic_length": 64, "num_workers": 1}, \\
                     "probe": {"synthetic_length": 16}}, "dio": {"config": {"max_pairs": 4}, "probe": {"max_pairs": 2}}}'
                                                                            # a dry run on a CPU
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO_ROOT, emit, log

BENCHMARK = "gpu_session"

#: the training jobs: ``config`` is an ``alignkit train`` configuration without ``epochs`` (on top of the
#: shipped model's committed ``recipe`` when one is named, less its device and epochs); ``probe``
#: overrides it for the pace measurement; ``pairs_key`` names the setting that sizes an epoch, whose
#: probe and final values scale the probe's epoch time.
JOBS: dict[str, dict[str, Any]] = {
    "flownet-c": {
        # the shipped recipe (FlyingChairs-style pairs generated on the fly by the data-loader workers,
        # 128x128 crops), as many epochs of 4096 pairs as the budget holds
        "recipe": "flownet_c_synthetic2d",
        "config": {},
        "probe": {"synthetic_length": 512},
        "pairs_key": "synthetic_length",
    },
    "dio": {
        # the shipped recipe with every training pair of the 8 training subjects instead of 32, and as
        # many epochs as the budget holds
        "recipe": "dio_oasis3d",
        "config": {"amp": False, "max_pairs": 56},
        "probe": {"max_pairs": 6},
        "pairs_key": "max_pairs",
    },
    "avsm-vsvf": {
        # the shipped recipe's vSVF stage again, longer (it had one epoch on the CPU), on top of the
        # shipped model's affine network
        "recipe": "avsm_oasis3d",
        "config": {"amp": False, "stages": ["vsvf"], "stage_epochs": {},
                   "init_from": "src/alignkit/methods/models/avsm_oasis3d.pt", "max_pairs": 56},
        "probe": {"max_pairs": 8},
        "pairs_key": "max_pairs",
    },
}


def job_config(job: dict[str, Any]) -> dict[str, Any]:
    """The job's configuration: its recipe's (without the recipe's device and epochs) under its own."""
    base: dict[str, Any] = {}
    if job.get("recipe"):
        recipe = REPO_ROOT / "src" / "alignkit" / "methods" / "models" / f"{job['recipe']}.recipe.json"
        base = {k: v for k, v in json.loads(recipe.read_text()).items() if k not in ("device", "epochs")}
    return {**base, **job["config"]}


def _read_log(run: Path) -> list[dict[str, str]]:
    path = run / "log.csv"
    if not path.is_file():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _train_command(config_path: Path, run: Path, device: str) -> list[str]:
    return [sys.executable, "-m", "alignkit", "train", "--config", str(config_path), "-o", str(run), "--quiet",
            "--device", device]


def _start(config: dict[str, Any], run: Path, device: str, log_path: Path) -> subprocess.Popen[bytes]:
    run.mkdir(parents=True, exist_ok=True)
    config_path = run.parent / f"{run.name}.config.json"
    config_path.write_text(json.dumps(config, indent=2))
    handle = log_path.open("ab")
    return subprocess.Popen(_train_command(config_path, run, device), cwd=REPO_ROOT, stdout=handle,
                            stderr=subprocess.STDOUT)


def plan_epochs(probe_wall: float, probe_rows: list[dict[str, str]], probe_pairs: int, final_pairs: int,
                budget: float) -> tuple[int, dict[str, float]]:
    """Epochs of ``final_pairs`` pairs that fit in ``budget`` seconds at the probe's pace: the probe's
    training-loop seconds scaled by the pairs, plus its fixed cost (start, validation, checkpoint: the
    probe's wall time less its loop) once, with 10 % to spare."""
    epoch_rows = [r for r in probe_rows if r.get("epoch") not in (None, "", "0")]
    loop_seconds = sum(float(r["seconds"]) for r in epoch_rows) if epoch_rows else probe_wall
    per_epoch = loop_seconds * final_pairs / max(probe_pairs, 1)
    fixed = max(probe_wall - loop_seconds, 0.0)
    epochs = max(1, math.floor((budget - fixed) / (1.1 * max(per_epoch, 1e-6))))
    return epochs, {"probe_wall_s": round(probe_wall, 1), "probe_loop_s": round(loop_seconds, 1),
                    "predicted_epoch_s": round(per_epoch, 1), "fixed_s": round(fixed, 1)}


def run_jobs(names: list[str], device: str, budget: float, work: Path, out: Path,
             hard_stop: float = math.inf) -> dict[str, Any]:
    """Probe then train every job of ``names``; every process is stopped at ``hard_stop`` (a
    ``time.perf_counter()`` value) at the latest, so that the packing still happens inside the device
    call's own limit."""
    results: dict[str, Any] = {}
    probes: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    for name in names:
        job = JOBS[name]
        config = {**job_config(job), **job["probe"], "epochs": 1}
        probes[name] = (_start(config, work / f"{name}-probe", device, work / f"{name}.log"), time.perf_counter())
    finals: dict[str, tuple[subprocess.Popen[bytes], float, dict[str, Any]]] = {}
    for name, (process, started) in probes.items():
        try:
            code = process.wait(timeout=max(min(max(budget, 120.0), hard_stop - time.perf_counter()), 1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            code = "probe stopped at the deadline"
        wall = time.perf_counter() - started
        job = JOBS[name]
        rows = _read_log(work / f"{name}-probe")
        if code != 0:
            tail = (work / f"{name}.log").read_text(errors="replace")[-1500:]
            results[name] = {"error": f"probe exited with {code}", "log_tail": tail, "probe_wall_s": round(wall, 1)}
            continue
        key = job["pairs_key"]
        epochs, plan = plan_epochs(wall, rows, int(job["probe"][key]), int(job_config(job)[key]),
                                   budget - (time.perf_counter() - started) + wall)
        config = {**job_config(job), "epochs": epochs}
        run = work / name
        # the probe's pre-alignments are the final run's too (same subjects, same seed)
        if (work / f"{name}-probe" / "prealign").is_dir():
            shutil.copytree(work / f"{name}-probe" / "prealign", run / "prealign", dirs_exist_ok=True)
        log(f"[{BENCHMARK}] {name}: probe {plan}; {epochs} epochs")
        finals[name] = (_start(config, run, device, work / f"{name}.log"), time.perf_counter(),
                        {"epochs_planned": epochs, **plan})
    deadline = min(time.perf_counter() + budget + 60, hard_stop)
    for name, (process, started, info) in finals.items():
        try:
            code = process.wait(timeout=max(deadline - time.perf_counter(), 1))
        except subprocess.TimeoutExpired:  # the per-epoch checkpoints stay: the last one is the result
            process.kill()
            process.wait()
            code = "killed at the deadline"
        rows = _read_log(work / name)
        last = rows[-1] if rows else {}
        if code != 0:
            info["log_tail"] = (work / f"{name}.log").read_text(errors="replace")[-1500:]
        results[name] = {**info, "exit": code, "wall_s": round(time.perf_counter() - started, 1),
                         "epochs_done": int(last.get("epoch", 0) or 0), "last_row": last,
                         "first_row": rows[0] if rows else {}}
    for name in names:
        pack(work, name, out)
    return results


def pack(work: Path, name: str, out: Path) -> None:
    """``OUT/<name>.tar.gz``: the run folder without its TensorBoard events, the probe's log and
    configuration, and the job's output (``<name>.log``)."""
    with tarfile.open(out / f"{name}.tar.gz", "w:gz") as archive:
        for folder in (work / name, work / f"{name}-probe"):
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                relative = path.relative_to(work)
                if path.is_file() and "tensorboard" not in relative.parts and "prealign" not in relative.parts:
                    if folder.name.endswith("-probe") and path.suffix not in (".csv", ".json"):
                        continue
                    archive.add(path, arcname=str(relative))
        for extra in (work / f"{name}.config.json", work / f"{name}.log"):
            if extra.is_file():
                archive.add(extra, arcname=extra.name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument("--train-budget", type=float, default=330.0, help="seconds for the training runs")
    parser.add_argument("--bench-resolutions", default="1,2")
    parser.add_argument("--bench-pairs", default="subject12<-subject11,subject08<-subject07")
    parser.add_argument("--bench-repeats", type=int, default=3)
    parser.add_argument("--bench-timeout", type=float, default=180.0)
    parser.add_argument("--hard-stop", type=float, default=math.inf,
                        help="seconds after the start by which every training process is stopped (then packing)")
    parser.add_argument("--override", default="{}",
                        help='JSON {job: {"config": {...}, "probe": {...}}} merged into JOBS (e.g. a CPU dry run)')
    args = parser.parse_args(argv)
    for name, parts in json.loads(args.override).items():
        for part, values in parts.items():
            JOBS[name][part] = {**JOBS[name][part], **values}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "alignkit-gpu-session"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    payload: dict[str, Any] = {"benchmark": BENCHMARK, "device": args.device}
    if args.device.startswith("cuda"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False)
        payload["gpu"] = smi.stdout.strip()
    started = time.perf_counter()
    if args.bench_resolutions:
        # its progress goes to this script's stderr; its JSON line to a file of the work folder
        try:
            code: Any = subprocess.run(
                [sys.executable, str(Path(__file__).with_name("gpu3d.py")), "--device", args.device,
                 "--resolutions", args.bench_resolutions, "--pairs", args.bench_pairs,
                 "--repeats", str(args.bench_repeats), "--out", str(work / "gpu3d.json"),
                 "--profile", str(out / "gpu3d_profile.txt")],
                cwd=REPO_ROOT, stdout=subprocess.DEVNULL, timeout=args.bench_timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            code = f"stopped after {args.bench_timeout:g} s"
        payload["gpu3d"] = (json.loads((work / "gpu3d.json").read_text()) if (work / "gpu3d.json").is_file()
                            else {"error": f"exit {code}"})
        payload["gpu3d_wall_s"] = round(time.perf_counter() - started, 1)
    names = [n for n in args.jobs.split(",") if n]
    if names:
        payload["training"] = run_jobs(names, args.device, args.train_budget, work, out,
                                       hard_stop=started + args.hard_stop)
    payload["wall_s"] = round(time.perf_counter() - started, 1)
    emit(payload, out / "session.json")


if __name__ == "__main__":
    main()
