"""c2f (Zampieri et al., "Coarse to fine non-rigid registration: a chain of scale-specific neural networks
for multimodal image alignment ...") against classical multimodal registration, on held-out aligned
multimodal pairs deformed by eq. 3 with fixed seeds; and its time and memory against image side.

Accuracy: aligned pairs that the shipped recipe does not train on -- OASIS-TRT-20 ``subject11``/
``subject12`` sagittal T1 slices against their label edges (the recipe's validation subjects: logged,
never used to choose weights), VIS-NIR ``mountain`` scenes (NIR against RGB brought onto it by the
ground-truth affine; never seen), the ITK T1/PD slices and the CT/MR slices (never seen) -- each with its fixed (first) image resampled through an eq.-3 field
(:func:`alignkit.data.synthetic.random_mixture_field`: translation + 1-4 Gaussian bumps, at most
``--max-displacement`` px, seed ``[--seed, k]``), so the true displacement is known. Scores on the
pixels whose true correspondence lies inside the image and, where the image has a zero background
(brains, CT/MR, T1/PD), within 4 px of content: PCK at 1..20 px (share of pixels within t px) and
EPE (mean end-point error, px). Methods in the same run: ``c2f`` in each ``--modes`` (the shipped model or
``--checkpoint``), ``alignkit:multimodal``, ``ants:syn`` (Mattes MI) and ``elastix:bspline`` (MI)
where installed, and ``identity`` (no registration).

Timing (``--sizes``): one VIS-NIR pair resized to ``side x side`` and deformed alike, c2f in
``--time-modes`` in a fresh process per size (peak RSS of that process): wall seconds, CPU seconds of
the process (on a shared machine the wall time depends on the share of the cores it got; the CPU
time measures the work) and pixels per CPU second.

Prints ONE JSON line (progress on stderr)::

    python benchmarks/c2f.py --threads 2
    python benchmarks/c2f.py --checkpoint RUN --oasis 1 --mountain 1 --sizes 512,1024 --peers none   # reduced
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, log, set_threads

THRESHOLDS = list(range(1, 21))
#: CPU seconds of each c2f registration of this process: on a shared machine, what the work cost
#: whatever share of the cores the process got (wall seconds are reported beside it)
CPU_SECONDS: list[float] = []
PEERS = ("alignkit:multimodal", "ants:syn", "elastix:bspline")
#: the VIS-NIR field scenes of the tuning pairs: the two with the smallest residual misalignment of the
#: ground truth among the first 24 (``benchmarks/vis_nir_misalignment.py --scenes field --pairs 30``: median 0.0 px,
#: mean 0.12 / 0.11 px over 51 / 60 textured patches)
TUNING_FIELD_SCENES = ("field/0015", "field/0019")
#: and the two field scenes with the most sky (a third of the image and more): a flat region in one modality and
#: not quite in the other, where a block answers without evidence -- the case the well-aligned scenes above lack
#: (ground truth 0.50 / 0.71 px off, median over textured patches; added in session 15, after a default chosen
#: without them -- a third coarse pass -- failed on the held-out VIS-NIR mountain scene)
TUNING_SKY_SCENES = ("field/0008", "field/0011")


def held_out_pairs(oasis_count: int, mountain_count: int) -> list[Any]:
    """Aligned pairs outside the shipped recipe's training and validation subjects/scenes: the first
    ``oasis_count`` slices of subjects 11-12 (every 24th), the first ``mountain_count`` VIS-NIR mountain
    scenes, the ITK T1/PD and the CT/MR slices."""
    from alignkit.data.aligned import aligned_pairs

    oasis = [p for p in aligned_pairs("brain3d-oasis-trt20", slice_stride=24) if p.group in ("subject11", "subject12")]
    # one slice per subject first, then the next ones
    oasis = sorted(oasis, key=lambda p: (oasis.index(p) - [q.group for q in oasis].index(p.group), p.group))
    mountain = aligned_pairs("vis-nir", subsets=["mountain"]) if mountain_count else []
    single = aligned_pairs("multimodal/itk-t1-pd-slices") + aligned_pairs("multimodal/ct-mr-2d")
    return oasis[:oasis_count] + mountain[:mountain_count] + single


def tuning_pairs() -> list[Any]:
    """The pairs settings are chosen on (``--tuning``), none of them scored by the default run: two
    OASIS-TRT-20 ``subject10`` slices (a validation subject of the recipes), four VIS-NIR ``field`` scenes
    (validation) and two slices of the 3D T1 <-> PD head (``multimodal/t1-pd-3d``, a head other than the ITK
    slices'; validation, never trained on). The field scenes are :data:`TUNING_FIELD_SCENES`, the two best aligned
    by their ground truth (until session 14: the first two, ``0001``/``0002``, whose NIR and RGB
    ``benchmarks/vis_nir_misalignment.py`` finds 1.5 and 1.3 px apart, so part of their "error" was the truth's),
    and :data:`TUNING_SKY_SCENES`."""
    from alignkit.data.aligned import aligned_pairs

    oasis = [p for p in aligned_pairs("brain3d-oasis-trt20", slice_stride=24) if p.group == "subject10"]
    field = [p for p in aligned_pairs("vis-nir", subsets=["field"])
             if p.name in TUNING_FIELD_SCENES + TUNING_SKY_SCENES]
    head = aligned_pairs("multimodal/t1-pd-3d", slice_stride=12)
    return oasis[:2] + field + head[2:3] + head[6:7]


def deformed_case(pair: Any, seed: list[int], max_displacement: float) -> tuple[Any, Any]:
    """(Case, scoring mask): fixed = the pair's first image through an eq.-3 field, moving = the second."""
    import numpy as np
    import torch

    from alignkit.data.case import Case
    from alignkit.data.synthetic import random_mixture_field
    from alignkit.image import Image
    from alignkit.spatial import Grid, gaussian_blur, sample_voxels

    shape = pair.shape
    grid = Grid.from_spacing(shape)
    flow = random_mixture_field(shape, seed=np.random.default_rng(seed), max_displacement=max_displacement)
    points = grid.voxel_points() + flow
    fixed = sample_voxels(pair.fixed[None], points, padding="zeros")[0]
    inside = torch.ones(shape, dtype=torch.bool)
    for axis, size in enumerate(shape):
        inside &= (points[0, axis] >= 0) & (points[0, axis] <= size - 1)
    inside &= sample_voxels(pair.valid[None].float(), points, padding="zeros")[0, 0] > 0.999
    if pair.pad_is_background:  # zero background: score where there is content within ~4 px
        content = gaussian_blur((fixed + pair.moving)[None].clamp(0, 1), 4.0)[0, 0] > 0.02
        inside &= content
    case = Case(name=pair.name, fixed=Image(fixed, grid), moving=Image(pair.moving.clone(), grid), kind="deformable",
                flow=flow[0].numpy())
    return case, inside.numpy()


def scores(predicted_voxels: Any, truth: Any, mask: Any) -> dict[str, Any]:
    import numpy as np

    error = np.linalg.norm(predicted_voxels - truth, axis=0)[mask]
    return {"epe": float(error.mean()), "pck": [float((error <= t).mean()) for t in THRESHOLDS]}


def run_c2f(case: Any, mode: str, checkpoint: Any, tile: int, min_level: int | None = None,
            coarsest_passes: int = 1, smoothing: float | None = None, passes: int | None = None,
            finest_passes: int | None = None, weighting: str | None = None, max_passes: int | None = None,
            pass_tolerance: float | None = None, symmetric: str | None = None,
            translation_from: int | None = None) -> tuple[Any, float]:
    import alignkit

    options: dict[str, Any] = {"mode": mode, "tile": tile, "coarsest_passes": coarsest_passes}
    # the settings not given keep the method's defaults
    given = {"symmetric": symmetric, "translation_from": translation_from, "max_passes": max_passes,
             "pass_tolerance": pass_tolerance, "weighting": weighting, "passes": passes, "finest_passes": finest_passes, "smoothing": smoothing,
             "min_level": min_level or None, "checkpoint": checkpoint if checkpoint else None}
    options.update({k: v for k, v in given.items() if v is not None})
    started, cpu = time.perf_counter(), time.process_time()
    result = alignkit.register(case.fixed, case.moving, method="c2f", **options)
    seconds = time.perf_counter() - started
    CPU_SECONDS.append(time.process_time() - cpu)
    return result.world_map().cpu().numpy()[0], seconds


def run_peer(case: Any, name: str, seed: int, threads: int) -> tuple[Any, float]:
    from alignkit.evaluate.registry import resolve_method

    method = resolve_method(name)
    method.check_available()
    prediction = method.register(case, seed=seed, threads=threads)
    world = prediction.world_map
    if world is None:
        import numpy as np

        from alignkit.evaluate.peers._common import apply_homogeneous, world_points
        world = apply_homogeneous(np.asarray(prediction.matrix), world_points(case.fixed.grid))
    return world, float(prediction.seconds)


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    pairs = tuning_pairs() if args.tuning else held_out_pairs(args.oasis, args.mountain)
    # c2f:MODE with the method's default smoothing; c2f:MODE/sX with --smoothing's value X
    variants = [""] + [f"/s{float(x):g}" for x in args.smoothing.split(",") if x.strip()]
    methods = ["identity"] + [f"c2f:{m}{v}" for m in args.modes.split(",") if m and m != "none" for v in variants] + \
        [p for p in (PEERS if args.peers == "all" else args.peers.split(",")) if p and p != "none"]
    per_method: dict[str, dict[str, Any]] = {m: {"errors": [], "seconds": [], "status": "ok"} for m in methods}
    per_pair = []
    for k, pair in enumerate(pairs):
        case, mask = deformed_case(pair, [args.seed, k], args.max_displacement)
        grid = case.fixed.grid
        identity = grid.voxel_points()[0].numpy()
        truth = identity + case.flow
        row: dict[str, Any] = {"pair": pair.name, "shape": list(pair.shape), "scored_pixels": int(mask.sum())}
        for name in methods:
            if per_method[name]["status"] != "ok":
                continue
            if name.startswith("c2f:accurate") and args.accurate_max_pixels and case.fixed.grid.numel > args.accurate_max_pixels:
                row[name] = "not run (more pixels than --accurate-max-pixels)"
                continue
            try:
                if name == "identity":
                    voxels, seconds = identity, 0.0
                elif name.startswith("c2f:"):
                    mode, _, sigma = name[4:].partition("/s")
                    world, seconds = run_c2f(case, mode, args.checkpoint, args.tile, args.min_level,
                                             args.coarsest_passes, float(sigma) if sigma else None,
                                             args.passes, args.finest_passes, args.weighting, args.max_passes,
                                             args.pass_tolerance, args.symmetric, args.translation_from)
                    voxels = world  # world = voxels on these grids (Grid.from_spacing, unit spacing)
                else:
                    world, seconds = run_peer(case, name, args.seed, args.threads)
                    voxels = np.asarray(world)
            except Exception as exc:  # noqa: BLE001 -- a peer that is not installed or fails: reported, not fatal
                per_method[name]["status"] = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                log(name, per_method[name]["status"])
                continue
            s = scores(np.asarray(voxels, dtype=np.float64), truth, mask)
            errors = np.linalg.norm(np.asarray(voxels) - truth, axis=0)[mask]
            per_method[name]["errors"].append(errors)
            per_method[name]["seconds"].append(seconds)
            row[name] = {"epe": round(s["epe"], 3), "pck5": round(s["pck"][4], 4), "seconds": round(seconds, 2)}
            if name.startswith("c2f:"):
                row[name]["cpu_seconds"] = round(CPU_SECONDS[-1], 2)
            log(f"{pair.name:>22} {name:>20}: EPE {s['epe']:.3f} PCK@1 {s['pck'][0]:.3f} PCK@5 {s['pck'][4]:.3f} "
                f"({seconds:.1f} s)")
        per_pair.append(row)
    summary = {}
    for name, record in per_method.items():
        if not record["errors"]:
            summary[name] = {"status": record["status"]}
            continue
        # pixel-weighted over pairs would let the big VIS-NIR images dominate: each pair counts once
        pcks = np.array([[float((e <= t).mean()) for t in THRESHOLDS] for e in record["errors"]])
        summary[name] = {"status": record["status"], "pairs": len(record["errors"]),
                         "epe": float(np.mean([e.mean() for e in record["errors"]])),
                         "pck": dict(zip([str(t) for t in THRESHOLDS], pcks.mean(0).round(4).tolist())),
                         "seconds_mean": float(np.mean(record["seconds"]))}
    return {"methods": summary, "pairs": per_pair}


def time_one(side: int, mode: str, checkpoint: str | None, tile: int, seed: int) -> dict[str, Any]:
    import cv2
    import torch

    from alignkit.data.aligned import AlignedPair, aligned_pairs
    from alignkit.evaluate.worker import peak_rss_mb

    base = aligned_pairs("vis-nir", subsets=["mountain"])[0]

    def resized(t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(cv2.resize(t[0].numpy(), (side, side), interpolation=cv2.INTER_LINEAR))[None]

    pair = AlignedPair("big", "big", resized(base.fixed), resized(base.moving), torch.ones(1, side, side, dtype=torch.bool))
    case, _ = deformed_case(pair, [seed, side], 8.0)
    from alignkit.methods import load_model

    model = load_model(checkpoint) if checkpoint else None  # read once, before the timer
    small = AlignedPair("warm", "warm", pair.fixed[:, :256, :256], pair.moving[:, :256, :256],
                        torch.ones(1, 256, 256, dtype=torch.bool))
    run_c2f(deformed_case(small, [seed, 0], 8.0)[0], mode, model, tile)  # first-call set-up off the clock
    before = peak_rss_mb()
    _, seconds = run_c2f(case, mode, model, tile)
    return {"side": side, "mode": mode, "pixels": side * side, "seconds": seconds, "cpu_seconds": CPU_SECONDS[-1],
            "pixels_per_cpu_second": side * side / CPU_SECONDS[-1], "peak_rss_mb": peak_rss_mb(),
            "rss_before_mb": before, "load_average": os.getloadavg()[0]}


def timing(args: argparse.Namespace) -> list[dict[str, Any]]:
    import subprocess

    rows = []
    for mode in [m for m in args.time_modes.split(",") if m]:
        for side in [int(s) for s in args.sizes.split(",") if s]:
            out = Path(args.scratch) / f"c2f_time_{mode}_{side}.json"
            cmd = [sys.executable, __file__, "--time-one", str(side), "--time-modes", mode, "--tile", str(args.tile),
                   "--seed", str(args.seed), "--threads", str(args.threads), "--result", str(out)]
            if args.checkpoint:
                cmd += ["--checkpoint", args.checkpoint]
            started = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0 or not out.is_file():
                rows.append({"side": side, "mode": mode, "status": "error",
                             "error": " | ".join(proc.stderr.strip().splitlines()[-3:])})
            else:
                rows.append(json.loads(out.read_text()) | {"process_seconds": time.perf_counter() - started})
            log("timing", rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="c2f run folder or checkpoint (default: the shipped model)")
    parser.add_argument("--modes", default="fast,per-scale,accurate")
    parser.add_argument("--peers", default="all", help="comma-separated peers, 'all' or 'none'")
    parser.add_argument("--oasis", type=int, default=2, help="held-out OASIS slices (subjects 11, 12)")
    parser.add_argument("--mountain", type=int, default=2, help="held-out VIS-NIR mountain scenes")
    parser.add_argument("--no-accuracy", action="store_true", help="timing only")
    parser.add_argument("--tuning", action="store_true",
                        help="score the tuning pairs instead of the held-out ones (tuning_pairs)")
    parser.add_argument("--accurate-max-pixels", type=int, default=0,
                        help="run c2f:accurate only on pairs of at most this many pixels (0: all)")
    parser.add_argument("--max-displacement", type=float, default=12.0)
    parser.add_argument("--sizes", default="512,1024,2048,3500,5000")
    parser.add_argument("--time-modes", default="per-scale")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--min-level", type=int, help="c2f's coarsest level side (default: the model's own rule)")
    parser.add_argument("--coarsest-passes", type=int, default=1, help="c2f's passes at its coarsest level")
    parser.add_argument("--passes", type=int, help="c2f's passes at every level but the finest (default: the method's)")
    parser.add_argument("--finest-passes", type=int, help="c2f's passes at its finest level (default: the method's)")
    parser.add_argument("--max-passes", type=int, help="c2f's most passes at a coarse level (default: the method's)")
    parser.add_argument("--pass-tolerance", type=float,
                        help="c2f's mean residual (level px) under which a level stops after --passes (0: never)")
    parser.add_argument("--symmetric", choices=("none", "coarse", "all"),
                        help="c2f's levels that also run with the images swapped (default: the mode's)")
    parser.add_argument("--translation-from", type=int,
                        help="c2f's levels shrunk by at least this factor move the whole image only (0: none; "
                        "default: the method's)")
    parser.add_argument("--weighting", choices=("structure", "uniform"),
                        help="how c2f's smoothing weighs the blocks' answers (default: the method's)")
    parser.add_argument("--smoothing", default="",
                        help="comma-separated c2f residual smoothings (σ px) to score beside the default, as c2f:MODE/sX")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--scratch", default=os.environ.get("TMPDIR", "/tmp"))
    parser.add_argument("--time-one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="also write the JSON line here")
    args = parser.parse_args()
    set_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    if args.time_one:
        Path(args.result).write_text(json.dumps(time_one(args.time_one, args.time_modes, args.checkpoint, args.tile,
                                                         args.seed)))
        return
    started = time.perf_counter()
    payload: dict[str, Any] = {"benchmark": "c2f", "threads": args.threads, "checkpoint": args.checkpoint or "shipped",
                               "max_displacement": args.max_displacement, "seed": args.seed, "tile": args.tile}
    if not args.no_accuracy:
        payload["accuracy"] = accuracy(args)
    if args.sizes:
        payload["timing"] = timing(args)
    payload["wall_seconds"] = time.perf_counter() - started
    emit(payload, args.out)


if __name__ == "__main__":
    main()
