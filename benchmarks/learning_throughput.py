"""Learned registration speed: VoxelMorph training throughput and inference time vs classical optimisation.

For each input size (default 2D 256² and 3D 128³; ``--quick``: 128² and 64³) and each device (the CPU
always, CUDA when torch sees a GPU), on one synthetic pair (a smooth phantom and a copy warped by a
random diffeomorphism of up to 5% of the size, 1 mm voxels, intensities in [0, 1]):

* ``train``: pairs/s of one optimisation step of the ``voxelmorph`` method at batch 1, as
  ``alignkit train`` runs it -- forward (U-Net, scaling and squaring, warp), loss (LNCC +
  diffusion), backward, Adam step, mixed precision on CUDA (its default) -- with the pair already on
  the device (no data loading); default network and options, random weights (the speed does not
  depend on them); ``--warmup`` steps first, then ``--steps`` timed steps;
* ``infer``: seconds per pair of ``predict -> world map``: ``LearnedMethod.predict(fixed, moving)``
  (network grid = the input size) and the predicted transform's map of world points on the fixed
  grid, copied to host memory; median of ``--repeats`` after one warm-up;
* ``register``: the same pair through ``alignkit.register(method="voxelmorph", checkpoint=model)``
  plus its world map -- what ``alignkit evaluate --method voxelmorph:CKPT`` times (it adds the
  result's metrics: NCC before/after, Jacobian); median of ``--repeats`` after one warm-up;
* ``classical``: ``alignkit.register(preset="brain")`` plus its world map on the same pair -- what
  ``alignkit evaluate --method alignkit:brain`` times; one run (``--classical-repeats``) after a
  warm-up registration of a pair of a quarter of the size per axis;
* ``classical_over_infer`` / ``classical_over_register``: the classical time divided by the learned
  inference time, on the same device and size.

Each (phase, size, device) runs in a fresh interpreter (``--worker``), so a phase's peak memory is
its own: CPU peak resident set size (``VmHWM``, see ``_common.peak_rss_mb``; the interpreter and torch included), and on
CUDA also ``torch.cuda.max_memory_allocated``. Torch threads: ``--threads`` (default 2) in every
phase, CUDA ones included. Prints ONE JSON line on stdout; progress goes to stderr.

    python benchmarks/learning_throughput.py --quick
    python benchmarks/learning_throughput.py                       # 256x256 and 128x128x128
    python benchmarks/learning_throughput.py --sizes 192x192 --devices cpu --steps 5 --no-classical
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, log, peak_rss_mb, run_worker

SCRIPT = str(Path(__file__).resolve())
PHASES = ("train", "infer", "classical")
FULL_SIZES = "256x256,128x128x128"
QUICK_SIZES = "128x128,64x64x64"


def parse_sizes(text: str) -> list[tuple[int, ...]]:
    """``"256x256,128x128x128"`` -> ``[(256, 256), (128, 128, 128)]`` (2D or 3D, each axis >= 16)."""
    sizes: list[tuple[int, ...]] = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            size = tuple(int(v) for v in item.split("x"))
        except ValueError:
            raise ValueError(f"size {item!r} is not like 256x256 or 128x128x128") from None
        if len(size) not in (2, 3) or min(size) < 16:
            raise ValueError(f"size {item!r}: 2 or 3 axes of at least 16 voxels")
        sizes.append(size)
    if not sizes:
        raise ValueError("no size given")
    return sizes


def size_text(size: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in size)


# -- worker side (imports torch and alignkit) ----------------------------------------------------
def make_pair(size: tuple[int, ...], seed: int = 0) -> tuple[Any, Any]:
    """(fixed, moving) :class:`~alignkit.image.Image` s of ``size``: a smooth ellipsoidal phantom with
    bright blobs (moving) and the same warped by a random diffeomorphism of up to 5% of the size (fixed)."""
    import numpy as np
    import torch

    from alignkit.image import Image
    from alignkit.spatial import Grid, sample_voxels
    from alignkit.train.pairs import random_displacement

    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1.0, 1.0, s, dtype=np.float32) for s in size], indexing="ij")
    radius = sum((a / r) ** 2 for a, r in zip(axes, (0.8, 0.7, 0.75)[: len(size)], strict=True))
    image = 0.35 / (1.0 + np.exp((radius - 1.0) * 12.0))
    for _ in range(8):
        centre = rng.uniform(-0.45, 0.45, len(size))
        width = rng.uniform(0.08, 0.2)
        dist2 = sum((a - c) ** 2 for a, c in zip(axes, centre, strict=True))
        image = image + rng.uniform(0.2, 0.6) * np.exp(-dist2 / (2 * width**2))
    image = (image / image.max()).astype(np.float32)
    moving = torch.from_numpy(image)[None]
    generator = torch.Generator().manual_seed(seed)
    flow = random_displacement(size, generator, magnitude=0.05 * min(size))
    points = Grid.from_spacing(size, 1.0).voxel_points() + flow
    fixed = sample_voxels(moving[None], points, padding="border")[0]
    return Image.from_array(fixed[0].numpy(), spacing=1.0), Image.from_array(image, spacing=1.0)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_peak_start(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _memory(device: Any) -> dict[str, Any]:
    """Peak memory so far: this process's RSS, and on CUDA the tensors' peak since the last reset."""
    import torch

    out: dict[str, Any] = {"peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _method(size: tuple[int, ...], device: Any) -> Any:
    from alignkit.methods import build_model

    return build_model("voxelmorph", ndim=len(size), size=size).to(device)


def phase_train(size: tuple[int, ...], device: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    fixed, moving = make_pair(size, args.seed)
    torch.manual_seed(args.seed)
    method = _method(size, device).train()
    parameters = sum(p.numel() for p in method.parameters())
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-4)
    use_amp = device.type == "cuda" and not args.no_amp
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    batch = {"fixed": fixed.batch(device=device), "moving": moving.batch(device=device)}

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            output = method(batch)
        loss, _ = method.loss(batch, output)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return float(loss.detach())  # as the trainer does: the step is finished (synchronised) here

    _cuda_peak_start(device)
    for _ in range(args.warmup):
        step()
    times = []
    losses = []
    for _ in range(args.steps):
        tic = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - tic)
    total = sum(times)
    return {
        "pairs_per_s": args.steps / total,
        "step_seconds_median": statistics.median(times),
        "step_seconds_min": min(times),
        "steps": args.steps,
        "warmup": args.warmup,
        "amp": use_amp,
        "parameters": parameters,
        "loss_first_last": [losses[0], losses[-1]],
        **_memory(device),
    }


def _timed(fn: Any, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return times


def phase_infer(size: tuple[int, ...], device: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import alignkit

    fixed, moving = make_pair(size, args.seed)
    torch.manual_seed(args.seed)
    method = _method(size, device).eval()

    def infer() -> Any:
        transform = method.predict(fixed, moving, device=device)
        return transform.map_on(fixed.grid, device=device).cpu()  # to host memory: synchronises

    _cuda_peak_start(device)
    world = infer()  # warm-up
    assert tuple(world.shape) == (1, len(size), *size), world.shape
    times = _timed(infer, args.repeats)
    out: dict[str, Any] = {
        "infer_seconds": statistics.median(times),
        "infer_seconds_min": min(times),
        "repeats": args.repeats,
        **_memory(device),
    }

    def register() -> Any:
        result = alignkit.register(
            fixed, moving, method="voxelmorph", checkpoint=method, device=device, quiet=True
        )
        return result.world_map()[0].cpu()

    _cuda_peak_start(device)
    register()
    reg_times = _timed(register, args.repeats)
    out["register_seconds"] = statistics.median(reg_times)
    out["register_seconds_min"] = min(reg_times)
    if device.type == "cuda":
        out["register_cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def phase_classical(size: tuple[int, ...], device: Any, args: argparse.Namespace) -> dict[str, Any]:
    import alignkit

    small = tuple(max(16, s // 4) for s in size)
    warm_fixed, warm_moving = make_pair(small, args.seed)
    alignkit.register(warm_fixed, warm_moving, preset="brain", device=device, quiet=True)
    fixed, moving = make_pair(size, args.seed)
    _cuda_peak_start(device)
    times = []
    result = None
    for _ in range(args.classical_repeats):
        tic = time.perf_counter()
        result = alignkit.register(fixed, moving, preset="brain", device=device, quiet=True)
        result.world_map()[0].cpu()
        times.append(time.perf_counter() - tic)
    assert result is not None
    metrics = result.metrics
    return {
        "classical_seconds": statistics.median(times),
        "repeats": args.classical_repeats,
        "stages": ">".join(metrics.get("stages", [])),
        "ncc_before": metrics.get("ncc_before"),
        "ncc_after": metrics.get("ncc_after"),
        "stage_seconds": metrics.get("stage_seconds"),
        **_memory(device),
    }


def worker(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = parse_sizes(args.size)[0]
    started = time.perf_counter()
    phase = {"train": phase_train, "infer": phase_infer, "classical": phase_classical}[args.phase]
    result = phase(size, device, args)
    _sync(device)
    result.update(status="ok", worker_seconds=time.perf_counter() - started, threads=torch.get_num_threads())
    Path(args.result).write_text(json.dumps(result))
    return 0


# -- driver ----------------------------------------------------------------------------------------
def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 and math.isfinite(a):
        return float(a) / float(b)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, fewer steps (CI-sized)")
    parser.add_argument("--sizes", help=f"comma-separated AxB or AxBxC (default {FULL_SIZES})")
    parser.add_argument("--devices", help="comma-separated cpu,cuda (default: cpu, and cuda when available)")
    parser.add_argument("--steps", type=int, help="timed training steps (default 10; --quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed training steps first (default 2; --quick 1)")
    parser.add_argument("--repeats", type=int, help="timed inference runs (default 5; --quick 3)")
    parser.add_argument(
        "--classical-repeats", type=int, default=1, help="timed alignkit:brain runs (default 1)"
    )
    parser.add_argument("--no-classical", action="store_true", help="skip the alignkit:brain comparison")
    parser.add_argument(
        "--no-amp", action="store_true", help="float32 training on CUDA (default: mixed precision)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every phase (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per phase before it is killed")
    parser.add_argument("--out", help="also save the JSON line here")
    # worker mode (internal): one phase in this fresh interpreter
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    defaults = (3, 1, 3) if args.quick else (10, 2, 5)
    args.steps = defaults[0] if args.steps is None else args.steps
    args.warmup = defaults[1] if args.warmup is None else args.warmup
    args.repeats = defaults[2] if args.repeats is None else args.repeats
    for name in ("steps", "repeats", "classical_repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.worker:
        return worker(args)

    try:
        sizes = parse_sizes(args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES))
    except ValueError as exc:
        parser.error(str(exc))
    import torch

    cuda = torch.cuda.is_available()
    if args.devices:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        bad = [d for d in devices if d not in ("cpu", "cuda")]
        if bad:
            parser.error(f"unknown device(s) {', '.join(bad)}; choose cpu, cuda")
    else:
        devices = ["cpu"] + (["cuda"] if cuda else [])

    started = time.perf_counter()
    payload: dict[str, Any] = {
        "benchmark": "learning_throughput",
        "method": "voxelmorph (default network and options, batch 1)",
        "classical": None if args.no_classical else "alignkit:brain",
        "quick": args.quick,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "threads": args.threads,
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    results: list[dict[str, Any]] = []
    phases = [p for p in PHASES if not (p == "classical" and args.no_classical)]
    for size in sizes:
        for device in devices:
            entry: dict[str, Any] = {"ndim": len(size), "size": list(size), "device": device}
            if device == "cuda" and not cuda:
                entry["status"] = "skipped"
                entry["reason"] = "torch sees no CUDA device"
                results.append(entry)
                continue
            for phase in phases:
                log(f"[learning_throughput] {phase} {size_text(size)} on {device} ...")
                worker_args = [
                    "--phase", phase, "--size", size_text(size), "--device", device,
                    "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                    "--classical-repeats", str(args.classical_repeats), "--threads", str(args.threads),
                    "--seed", str(args.seed),
                ] + (["--no-amp"] if args.no_amp else [])  # fmt: skip
                result = run_worker(SCRIPT, worker_args, timeout=args.timeout)
                result.pop("wall_seconds_process", None)
                entry[phase] = result
                log(f"[learning_throughput]   {json.dumps(result)}")
            infer, classical = entry.get("infer", {}), entry.get("classical", {})
            classical_seconds = classical.get("classical_seconds")
            entry["classical_over_infer"] = _ratio(classical_seconds, infer.get("infer_seconds"))
            entry["classical_over_register"] = _ratio(classical_seconds, infer.get("register_seconds"))
            statuses = {entry[p].get("status") for p in phases}
            entry["status"] = "ok" if statuses == {"ok"} else "error"
            results.append(entry)
    payload.update(
        status="ok" if all(r["status"] in ("ok", "skipped") for r in results) else "error",
        results=results,
        load_avg_at_end=[round(x, 2) for x in os.getloadavg()],
        total_seconds=time.perf_counter() - started,
    )
    emit(payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
