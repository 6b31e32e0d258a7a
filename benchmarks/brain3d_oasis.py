"""Inter-subject 3D brain MRI registration (OASIS-TRT-20, Mindboggle-101 DKT labels): alignkit vs peers.

Every method runs affine + deformable registration on the same pairs of native-space, skull-stripped
T1 volumes (256x256x160, 1 mm, *not* pre-aligned) and is scored the same way on the fixed grid:

* ``dice_mean``: mean Dice over every non-zero label of the fixed label map (``alignkit.metrics``);
* ``hd95_mean``: mean over labels of the symmetric 95th-percentile Hausdorff distance (world mm);
* ``nonpositive_jacobian_percent``: % of fixed-grid voxels where the determinant of the Jacobian of
  the method's *final* map (affine and deformable composed) is <= 0, computed by one function
  (``_common.nonpositive_jacobian_percent``, central differences in world units) for every method;
  alignkit's own figure is also reported (``alignkit_reported_nonpositive_jacobian_percent``);
* ``seconds``: wall time inside the worker from reading the images to the warped label map;
* ``peak_rss_mb``: peak resident memory of the worker process (a fresh interpreter per method and
  pair, ``_common.peak_rss_mb``: ``VmHWM``, read right after the label map is warped, so it
  includes the interpreter and the imports but not the scoring).

Ratios are against ``ants:syn`` of the same run: ``dice_ratio = dice / dice_ants``,
``time_ratio = seconds / seconds_ants``. Threads: 2 for torch, ITK/ANTs and BLAS/OpenMP.

    python benchmarks/brain3d_oasis.py --pairs 2                    # alignkit:brain, ants:syn, dipy:syn
    python benchmarks/brain3d_oasis.py --quick                      # 1 pair, alignkit + ants
    python benchmarks/brain3d_oasis.py --methods alignkit:affine,ants:affine --pairs 1
    python benchmarks/brain3d_oasis.py --alignkit-config tuned.json --methods alignkit:brain

Prints one JSON line on stdout (progress goes to stderr); ``--out FILE`` also saves it.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _common import (
    DEFAULT_DATA,
    emit,
    log,
    mean_finite,
    nonpositive_jacobian_percent,
    peak_rss_mb,
    run_worker,
    set_threads,
)

BENCHMARK = "brain3d_oasis"
DATASET = "brain3d-oasis-trt20"
IMAGE = "t1weighted_brain.nii.gz"
LABELS = "labels.all.nii.gz"
REFERENCE = "ants:syn"
DEFAULT_METHODS = ["alignkit:brain", "ants:syn", "dipy:syn"]
QUICK_METHODS = ["alignkit:brain", "ants:syn"]

# method -> (package it needs, description)
METHODS: dict[str, tuple[str, str]] = {
    "alignkit:brain": ("alignkit", 'alignkit.register(preset="brain") (or --alignkit-config)'),
    "alignkit:affine": ("alignkit", 'alignkit.register(preset="brain", transform="affine"): affine stage only'),
    "ants:syn": ("ants", 'ants.registration(type_of_transform="SyN"): defaults (affine + SyN, Mattes MI, reg_iterations (40,20,0))'),
    "ants:synquick": ("ants", 'ants.registration(type_of_transform="antsRegistrationSyNQuick[s]")'),
    "ants:affine": ("ants", 'ants.registration(type_of_transform="Affine"): affine only'),
    "dipy:syn": ("dipy", "dipy: centre of mass -> translation -> rigid -> affine (MI), then SyN (CCMetric(3), [10,10,5])"),
    "dipy:affine": ("dipy", "dipy: centre of mass -> translation -> rigid -> affine (MI) only"),
}

# dipy affine pyramid (each of translation, rigid, affine): the finest level is half resolution and
# the iteration counts are small to fit a 2-core budget ([100, 50, 25] took > 8 min on a busy machine)
DIPY_AFFINE = {"level_iters": [50, 20, 5], "sigmas": [3.0, 2.0, 1.0], "factors": [8, 4, 2]}
DIPY_SYN_ITERS = [10, 10, 5]


# ---------------------------------------------------------------------------------------------------
# workers: one registration in a fresh process; write warped labels (.npy) and a result JSON
# ---------------------------------------------------------------------------------------------------
def _worker_alignkit(method: str, fixed: Path, moving: Path, seed: int, config: str | None) -> dict[str, Any]:
    import torch

    torch.set_num_threads(2)
    import alignkit

    kwargs: dict[str, Any] = {"preset": "brain"}
    if config:
        kwargs["config"] = config
    if method == "alignkit:affine":
        kwargs["transform"] = "affine"
    started = time.perf_counter()
    result = alignkit.register(
        fixed / IMAGE, moving / IMAGE, fixed_labels=fixed / LABELS, moving_labels=moving / LABELS,
        seed=seed, quiet=True, **kwargs,
    )
    warped = result.warped_labels
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    assert warped is not None
    world = result.world_map()
    identity = result.fixed.grid.world_points(device=world.device)
    disp = (world - identity)[0].double().cpu().numpy()
    jac = nonpositive_jacobian_percent(disp, result.fixed.grid.world_from_voxel.double().cpu().numpy())
    m = result.metrics
    extra = {
        "config": result.name,
        "stages": m.get("stages"),
        "register_seconds": m.get("seconds"),
        "stage_seconds": m.get("stage_seconds"),
        "alignkit_reported_dice_mean": m.get("dice_mean"),
        "alignkit_reported_dice_mean_before": m.get("dice_mean_before"),
        "alignkit_reported_nonpositive_jacobian_percent": m.get("nonpositive_jacobian_percent"),
        "ncc_before": m.get("ncc_before"),
        "ncc_after": m.get("ncc_after"),
    }
    return {"labels": warped.data[0].cpu().numpy(), "seconds": seconds, "peak_rss_mb": peak, "jacobian": jac, "extra": extra}


def _worker_ants(method: str, fixed: Path, moving: Path, seed: int) -> dict[str, Any]:
    os.environ["ANTS_RANDOM_SEED"] = str(seed if seed > 0 else 1)
    import ants

    kind = {"ants:syn": "SyN", "ants:synquick": "antsRegistrationSyNQuick[s]", "ants:affine": "Affine"}[method]
    with tempfile.TemporaryDirectory(prefix="ak-bench-ants-") as tmp:
        started = time.perf_counter()
        f = ants.image_read(str(fixed / IMAGE))
        m = ants.image_read(str(moving / IMAGE))
        t_reg = time.perf_counter()
        reg = ants.registration(f, m, type_of_transform=kind, outprefix=os.path.join(tmp, "reg_"))
        register_seconds = time.perf_counter() - t_reg
        ml = ants.image_read(str(moving / LABELS))
        warped = ants.apply_transforms(f, ml, transformlist=reg["fwdtransforms"], interpolator="nearestNeighbor")
        labels = warped.numpy()
        seconds = time.perf_counter() - started
        peak = peak_rss_mb()
        composed = ants.apply_transforms(f, m, transformlist=reg["fwdtransforms"], compose=os.path.join(tmp, "comp_"))
        field = ants.image_read(composed).numpy()  # (X, Y, Z, 3), LPS mm
        disp = np.moveaxis(field, -1, 0)
        lin = np.asarray(f.direction) @ np.diag(f.spacing)
        jac = nonpositive_jacobian_percent(disp, lin)
        # also ANTs' own Jacobian of the composed field
        try:
            det = ants.create_jacobian_determinant_image(f, composed, do_log=False).numpy()
            jac["ants_percent_nonpositive"] = 100.0 * float((det <= 0).sum()) / det.size
        except Exception as exc:  # noqa: BLE001 - diagnostic only
            jac["ants_percent_nonpositive_error"] = str(exc)
    extra = {"type_of_transform": kind, "register_seconds": register_seconds, "fwdtransforms": len(reg["fwdtransforms"])}
    return {"labels": labels, "seconds": seconds, "peak_rss_mb": peak, "jacobian": jac, "extra": extra}


def _worker_dipy(method: str, fixed: Path, moving: Path, seed: int) -> dict[str, Any]:
    import nibabel as nib
    from dipy.align.imaffine import AffineRegistration, MutualInformationMetric, transform_centers_of_mass
    from dipy.align.transforms import AffineTransform3D, RigidTransform3D, TranslationTransform3D

    np.random.seed(seed)
    started = time.perf_counter()
    fimg, mimg = nib.load(str(fixed / IMAGE)), nib.load(str(moving / IMAGE))
    static, static_aff = fimg.get_fdata(dtype=np.float32), fimg.affine
    mov, moving_aff = mimg.get_fdata(dtype=np.float32), mimg.affine
    stage_seconds: dict[str, float] = {}
    t = time.perf_counter()
    com = transform_centers_of_mass(static, static_aff, mov, moving_aff)
    affreg = AffineRegistration(metric=MutualInformationMetric(nbins=32, sampling_proportion=None), verbosity=0, **DIPY_AFFINE)
    current = com.affine
    for name, tf in (("translation", TranslationTransform3D()), ("rigid", RigidTransform3D()), ("affine", AffineTransform3D())):
        amap = affreg.optimize(
            static, mov, tf, None, static_grid2world=static_aff, moving_grid2world=moving_aff, starting_affine=current
        )
        current = amap.affine
    stage_seconds["affine"] = time.perf_counter() - t
    mlab = np.asarray(nib.load(str(moving / LABELS)).dataobj)
    if method == "dipy:affine":
        labels = amap.transform(mlab.astype(np.float32), interpolation="nearest")
        seconds = time.perf_counter() - started
        peak = peak_rss_mb()
        # world map X -> A X: constant Jacobian det(A)
        det = float(np.linalg.det(current[:3, :3]))
        jac = {"percent_nonpositive": 0.0 if det > 0 else 100.0, "min": det, "max": det, "mean": det}
        return {"labels": labels, "seconds": seconds, "peak_rss_mb": peak, "jacobian": jac,
                "extra": {"stage_seconds": stage_seconds, "affine": DIPY_AFFINE}}

    from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
    from dipy.align.metrics import CCMetric
    from scipy import ndimage

    t = time.perf_counter()
    sdr = SymmetricDiffeomorphicRegistration(CCMetric(3), level_iters=list(DIPY_SYN_ITERS))
    mapping = sdr.optimize(static, mov, static_grid2world=static_aff, moving_grid2world=moving_aff, prealign=current)
    stage_seconds["syn"] = time.perf_counter() - t
    labels = mapping.transform(mlab.astype(np.float32), interpolation="nearest")
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()

    # The full forward map in world (RAS) mm: Y(X) = A (X + d(X)), X the fixed voxel centres, A the
    # affine passed as prealign, d the forward field on the fixed grid (checked below against dipy's
    # own warp of the moving image; ``mapping.prealign`` is not A, so it is not used).
    shape = static.shape
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = static_aff[:3, :3] @ idx + static_aff[:3, 3:4]
    del idx
    dinv = np.asarray(mapping.disp_world2grid if mapping.disp_world2grid is not None else np.linalg.inv(static_aff))
    grid_pts = dinv[:3, :3] @ world + dinv[:3, 3:4]
    field = np.asarray(mapping.get_forward_field(), dtype=np.float32)
    y = np.empty_like(world)
    for a in range(3):
        y[a] = world[a] + ndimage.map_coordinates(field[..., a], grid_pts, order=1, mode="constant", cval=0.0)
    del grid_pts, field
    y = current[:3, :3] @ y + current[:3, 3:4]
    disp = (y - world).reshape(3, *shape)
    # check the reconstruction against dipy's own warp of the moving image
    mov_vox = np.linalg.inv(moving_aff)
    yv = mov_vox[:3, :3] @ y + mov_vox[:3, 3:4]
    del y, world
    ours = ndimage.map_coordinates(mov, yv, order=1, mode="constant", cval=0.0).reshape(shape)
    del yv
    theirs = mapping.transform(mov)
    scale = float(np.abs(theirs).max()) or 1.0
    check = float(np.abs(ours - theirs).mean()) / scale
    jac = nonpositive_jacobian_percent(disp, static_aff)
    extra = {
        "stage_seconds": stage_seconds,
        "affine": DIPY_AFFINE,
        "syn_level_iters": DIPY_SYN_ITERS,
        "map_reconstruction_mean_abs_diff_rel": check,
    }
    return {"labels": labels, "seconds": seconds, "peak_rss_mb": peak, "jacobian": jac, "extra": extra}


def worker_main(args: argparse.Namespace) -> int:
    set_threads(2)
    fixed, moving = Path(args.fixed), Path(args.moving)
    if args.method.startswith("alignkit:"):
        out = _worker_alignkit(args.method, fixed, moving, args.seed, args.alignkit_config)
    elif args.method.startswith("ants:"):
        out = _worker_ants(args.method, fixed, moving, args.seed)
    elif args.method.startswith("dipy:"):
        out = _worker_dipy(args.method, fixed, moving, args.seed)
    else:
        raise SystemExit(f"unknown method {args.method}")
    np.save(args.labels_out, np.asarray(out.pop("labels")).round().astype(np.int32))
    out["status"] = "ok"
    Path(args.result).write_text(json.dumps(out, default=float))
    return 0


# ---------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------
def choose_pairs(subjects: list[str], n: int, seed: int) -> list[tuple[str, str]]:
    """(moving, fixed): subject01->subject02, subject03->subject04, ... then seeded random others."""
    pairs = [(subjects[i], subjects[i + 1]) for i in range(0, len(subjects) - 1, 2)]
    if n > len(pairs):
        rest = [p for p in itertools.permutations(subjects, 2) if p not in pairs]
        random.Random(seed).shuffle(rest)
        pairs += rest
    return pairs[:n]


def score(labels_path: str, fixed_dir: Path) -> dict[str, Any]:
    import nibabel as nib

    from alignkit.metrics import dice_per_label, hd95_per_label

    img = nib.load(str(fixed_dir / LABELS))
    fixed = np.asarray(img.dataobj).round().astype(np.int32)
    warped = np.load(labels_path)
    if warped.shape != fixed.shape:
        raise RuntimeError(f"warped labels {warped.shape} vs fixed {fixed.shape}")
    spacing = [float(s) for s in img.header.get_zooms()[:3]]
    dice = dice_per_label(warped, fixed)
    hd = hd95_per_label(warped, fixed, spacing)
    return {
        "dice_mean": float(np.mean(list(dice.values()))) if dice else math.nan,
        "hd95_mean": mean_finite(hd.values()),
        "hd95_nan_labels": int(sum(1 for v in hd.values() if not math.isfinite(v))),
        "n_labels": len(dice),
    }


def package_of(method: str) -> str:
    return METHODS[method][0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="number of (moving, fixed) pairs (default 2)")
    parser.add_argument("--quick", action="store_true", help="1 pair, alignkit:brain and ants:syn only")
    parser.add_argument("--methods", help=f"comma-separated, from {', '.join(METHODS)} (default {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data folder (default ../shared/data)")
    parser.add_argument("--out", help="also save the JSON line here")
    parser.add_argument("--seed", type=int, default=0, help="pair choice beyond the first 6 and method seeds")
    parser.add_argument("--alignkit-config", help="JSON/TOML configuration for the alignkit methods (config=)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per method and pair")
    # worker mode (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--fixed", help=argparse.SUPPRESS)
    parser.add_argument("--moving", help=argparse.SUPPRESS)
    parser.add_argument("--labels-out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args)

    started = time.perf_counter()
    root = Path(args.data) / DATASET
    if args.quick:
        methods, n_pairs = list(QUICK_METHODS), 1
    else:
        methods, n_pairs = list(DEFAULT_METHODS), args.pairs
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.alignkit_config and not Path(args.alignkit_config).is_file():
        parser.error(f"--alignkit-config: no such file {args.alignkit_config}")

    payload: dict[str, Any] = {"benchmark": BENCHMARK, "dataset": DATASET}
    subjects = sorted(p.name for p in root.glob("subject*") if (p / IMAGE).is_file() and (p / LABELS).is_file())
    if len(subjects) < 2:
        payload.update(status="skipped", reason=f"data folder {root} absent or holds fewer than 2 subjects")
        emit(payload, args.out)
        return 0
    pairs = choose_pairs(subjects, max(1, n_pairs), args.seed)

    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        package = package_of(method)
        if importlib.util.find_spec(package) is None:
            results[method] = {"status": "skipped", "reason": f"package {package!r} not installed"}
            log(f"[{BENCHMARK}] {method}: skipped ({package} not installed)")
            continue
        results[method] = {"status": "ok", "description": METHODS[method][1], "per_pair": []}

    with tempfile.TemporaryDirectory(prefix="ak-bench-") as tmp:
        for moving, fixed in pairs:
            for method in methods:
                entry = results[method]
                if entry["status"] != "ok":
                    continue
                log(f"[{BENCHMARK}] {method}: {moving} -> {fixed} ...")
                labels_out = os.path.join(tmp, f"{method.replace(':', '_')}_{moving}_{fixed}.npy")
                wargs = ["--method", method, "--fixed", str(root / fixed), "--moving", str(root / moving),
                         "--labels-out", labels_out, "--seed", str(args.seed)]
                if args.alignkit_config and method.startswith("alignkit:"):
                    wargs += ["--alignkit-config", str(Path(args.alignkit_config).resolve())]
                res = run_worker(__file__, wargs, timeout=args.timeout)
                record: dict[str, Any] = {"moving": moving, "fixed": fixed}
                if res.get("status") != "ok":
                    record.update(status="error", error=res.get("error"))
                    log(f"[{BENCHMARK}] {method}: {moving} -> {fixed} FAILED: {res.get('error')}")
                    entry["per_pair"].append(record)
                    continue
                scores = score(labels_out, root / fixed)
                os.unlink(labels_out)
                record.update(status="ok", **scores)
                record["nonpositive_jacobian_percent"] = res["jacobian"]["percent_nonpositive"]
                record["jacobian"] = res["jacobian"]
                record["seconds"] = res["seconds"]
                record["process_seconds"] = res["wall_seconds_process"]
                record["peak_rss_mb"] = res["peak_rss_mb"]
                record.update(res.get("extra", {}))
                entry["per_pair"].append(record)
                log(
                    f"[{BENCHMARK}] {method}: {moving} -> {fixed}: dice {scores['dice_mean']:.4f} "
                    f"hd95 {scores['hd95_mean']:.2f} mm  jac<=0 {record['nonpositive_jacobian_percent']:.4f}%  "
                    f"{res['seconds']:.1f} s  {res['peak_rss_mb']:.0f} MB"
                )

    keys = ("dice_mean", "hd95_mean", "nonpositive_jacobian_percent", "seconds", "peak_rss_mb")
    for method, entry in results.items():
        if entry["status"] != "ok":
            continue
        good = [r for r in entry["per_pair"] if r.get("status") == "ok"]
        if not good:
            entry["status"] = "error"
            continue
        for key in keys:
            values = [r[key] for r in good]
            entry[key] = float(np.max(values)) if key == "peak_rss_mb" else mean_finite(values)
        entry["pairs_ok"] = len(good)
    ref = results.get(REFERENCE, {})
    for method, entry in results.items():
        if entry.get("status") != "ok" or ref.get("status") != "ok":
            continue
        entry["dice_ratio"] = entry["dice_mean"] / ref["dice_mean"] if ref["dice_mean"] else math.nan
        entry["time_ratio"] = entry["seconds"] / ref["seconds"] if ref["seconds"] else math.nan
        entry["memory_ratio"] = entry["peak_rss_mb"] / ref["peak_rss_mb"] if ref["peak_rss_mb"] else math.nan

    payload.update(
        status="ok" if any(e.get("status") == "ok" for e in results.values()) else "error",
        pairs=[f"{m}->{f}" for m, f in pairs],
        reference=REFERENCE,
        threads=2,
        cpu_count=os.cpu_count(),
        load_avg_at_end=[round(x, 2) for x in os.getloadavg()],
        alignkit_config=args.alignkit_config,
        methods=results,
        total_seconds=time.perf_counter() - started,
    )
    emit(payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
