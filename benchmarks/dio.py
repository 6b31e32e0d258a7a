"""DIO (Jena, Chaudhari, Gee, "Deep Implicit Optimization for Robust and Flexible Image Registration"):
the two-squares toy (§4.1) and OASIS-TRT-20 with peers in the same run (Tables 2-4 in spirit).

``--toy``: trains DIO features (U-Net, affine solver, Dice loss through the optimisation layer) on
two-squares pairs for ``--steps`` steps and registers ``--test-pairs`` new pairs with (a) the same
affine solver on the image intensities (the engine's own Gaussian pyramid) and (b) on the learned
features. A pair succeeds when the fixed square's centre is mapped within 1.5 px of its true match.
Success rates over all pairs, the overlapping ones and the non-overlapping ones.

``--brain``: every ordered pair of OASIS-TRT-20 subjects 11 and 12 (held out: the DIO runs train on
01-08 with 09-10 for validation, see the recipe), at full resolution (native space, affine
pre-alignment by the classical engine): ``dio`` with each ``--dio NAME=RUN`` network × ``--transforms``
at test time (Table 2), ``alignkit:brain`` (the same solver on intensities), ``voxelmorph``
(``--voxelmorph RUN``, default the shipped model) and the peers of ``alignkit evaluate``
(``--peers``, default ``greedy:deformable,ants:syn``). Columns: mean Dice over all labels, HD95,
% non-positive Jacobians, folds, seconds (network + optimisation). With ``--anisotropic`` the same
pairs resampled to 1x1x3 mm and cropped by ``--crop`` voxels per side in-plane are scored too, and
each method's drop is reported (Table 4 in spirit). ``--resample S`` (a reduced configuration for a
CPU budget, labelled in the output) registers the pairs at S mm isotropic, and the anisotropic ones at
S x S x 3S mm.

    python benchmarks/dio.py --toy --steps 300 --threads 1
    python benchmarks/dio.py --brain --dio lku=runs/dio_lku --dio unet=runs/dio_unet --anisotropic --threads 1

Prints one JSON line on stdout (progress on stderr); ``--out FILE`` also saves it (and the rows so far
to ``FILE.partial.jsonl`` as they are measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, log, mean_finite, set_threads

DATASET = "brain3d-oasis-trt20"
DEFAULT_CASES = ("subject12<-subject11", "subject11<-subject12")
SCORES = ("dice_mean", "hd95_mean", "nonpositive_jacobian_percent", "folds")


# -- the two-squares toy ---------------------------------------------------------------------------
def toy(steps: int, test_pairs: int, seed: int, lr: float, gradient: str, *, features: list[int] | None = None,
        normalize: bool = False) -> dict[str, Any]:
    import torch

    from alignkit.data.squares import TwoSquares
    from alignkit.image import Image
    from alignkit.methods import load_model, train_method
    from alignkit.methods.dio import feature_network
    from alignkit.solve import Engine, RegistrationConfig, StageConfig
    from alignkit.spatial import Grid

    size, square = (48, 48), 10
    iterations, solver_lr = [60, 40], 0.03
    config = {
        "method": "dio", "epochs": 1, "lr": lr, "schedule": "constant", "device": "cpu", "quiet": True,
        "seed": seed, "size": list(size),
        "network": feature_network("unet", ndim=2, channels=8, features=features or [16, 32, 32], levels=[2, 1]),
        "method_options": {"transform": "affine", "iterations": iterations, "learning_rate": solver_lr,
                           "image_weight": 0.0, "dice_weight": 1.0, "gradient": gradient,
                           "normalize_features": normalize},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run:
        train_method(config, run, train_set=TwoSquares(steps, size=size, square=square, seed=seed))
        model = load_model(run)
    train_seconds = time.perf_counter() - started
    grid = Grid.from_spacing(size, 1.0)
    intensity = RegistrationConfig(stages=[StageConfig(transform="affine", similarity="mse", levels=(2, 1),
                                                       iterations=tuple(iterations), learning_rate=solver_lr)],
                                   init="none", crop_foreground=False)
    test = TwoSquares(test_pairs, size=size, square=square, seed=seed + 1)
    hits: dict[str, list[bool]] = {"intensity": [], "dio": []}
    overlap = []
    for index in range(len(test)):
        item = test[index]
        fixed, moving = Image(item["fixed"], grid), Image(item["moving"], grid)
        centre = torch.nonzero(item["fixed"][0]).float().mean(0).view(1, 2, 1, 1)
        truth = centre.view(2) + item["shift"]
        with torch.no_grad():
            fixed_net, fixed_features = model.image_features(fixed)
            moving_net, moving_features = model.image_features(moving)
        results = {
            "intensity": Engine(intensity, device="cpu", seed=seed).run(fixed, moving),
            "dio": Engine(model.solver(), device="cpu", seed=seed).run(
                fixed_net, moving_net, fixed_features=fixed_features, moving_features=moving_features),
        }
        for name, transform in results.items():
            error = float((transform.transform_points(centre).view(2) - truth).norm())
            hits[name].append(error < 1.5)
        overlap.append(bool(item["overlap"]))

    def rates(values: list[bool]) -> dict[str, float]:
        on = [v for v, o in zip(values, overlap) if o]
        off = [v for v, o in zip(values, overlap) if not o]
        return {"all": sum(values) / len(values), "overlapping": sum(on) / max(len(on), 1),
                "non_overlapping": sum(off) / max(len(off), 1)}

    return {"benchmark": "dio_two_squares", "steps": steps, "test_pairs": test_pairs, "image": list(size),
            "network": config["network"], "normalize_features": normalize,
            "square": square, "gradient": gradient, "lr": lr, "solver": {"transform": "affine", "iterations": iterations},
            "overlapping_pairs": sum(overlap), "success_rate": {k: rates(v) for k, v in hits.items()},
            "success": "fixed square centre mapped within 1.5 px of its match", "train_seconds": train_seconds}


# -- OASIS-TRT-20 ----------------------------------------------------------------------------------
def resampled_case(case: Any, spacing: Sequence[float], crop: int = 0, tag: str = "") -> Any:
    """``case`` with both images and label maps resampled to ``spacing`` per array axis over the same
    field of view (Gaussian pre-smoothing of the images, sigma half the shrink factor; nearest for
    labels) and ``crop`` voxels cut off each side of every axis but the last (grids moved so world
    positions are unchanged)."""
    import torch

    from alignkit.image import Image
    from alignkit.spatial import Grid, gaussian_blur, resize_image

    def convert(image: Any, labels: bool) -> Any:
        grid = image.grid
        shape = tuple(max(2, round(float(e) / s) + 1) for e, s in zip(grid.extent(), spacing))
        new = grid.resized(shape)
        data = image.batch(dtype=torch.float32)
        if labels:
            data = resize_image(data, shape, mode="nearest").round()
        else:
            factors = [(n - 1) / (m - 1) for n, m in zip(grid.shape, shape)]
            data = resize_image(gaussian_blur(data, [0.5 * f if f > 1 else 0.0 for f in factors]), shape)
        slices = [slice(crop, n - crop) for n in shape[:-1]] + [slice(None)]
        data = data[(slice(None), slice(None), *slices)]
        shift = torch.eye(grid.ndim + 1, dtype=torch.float64)
        shift[: grid.ndim - 1, grid.ndim] = float(crop)
        cropped = Grid(tuple(data.shape[2:]), new.world_from_voxel @ shift)
        return Image(data[0].to(image.data.dtype) if labels else data[0], cropped)

    label = tag or "x".join(f"{s:g}" for s in spacing) + "mm" + (f"-crop{crop}" if crop else "")
    return dataclasses.replace(
        case, name=f"{case.name}@{label}", fixed=convert(case.fixed, False), moving=convert(case.moving, False),
        fixed_labels=None if case.fixed_labels is None else convert(case.fixed_labels, True),
        moving_labels=None if case.moving_labels is None else convert(case.moving_labels, True),
    )


def world_map(transform: Any, grid: Any) -> Any:
    import torch

    with torch.no_grad():
        return transform.transform_points(grid.world_points()).double()[0]


def alignkit_rows(cases: list[Any], methods: dict[str, dict[str, Any]], partial: Path | None) -> list[dict[str, Any]]:
    import alignkit
    from alignkit.evaluate.method import Prediction
    from alignkit.evaluate.scoring import score_case

    rows = []
    for name, options in methods.items():
        for case in cases:
            start = time.perf_counter()
            try:
                result = alignkit.register(case.fixed, case.moving, **options)
            except Exception as error:  # noqa: BLE001 - a failed method is a row, not the end of the run
                log(f"[dio] {name} on {case.name}: {type(error).__name__}: {error}")
                rows.append({"method": name, "case": case.name, "status": "error", "message": str(error)})
                continue
            seconds = time.perf_counter() - start
            scores = score_case(case, Prediction(world_map=world_map(result.transform, case.fixed.grid).numpy()))
            row = {"method": name, "case": case.name, "status": "ok", "seconds": seconds,
                   "stage_seconds": result.stage_seconds if hasattr(result, "stage_seconds") else None,
                   **{k: scores.get(k) for k in SCORES}}
            log(f"[dio] {name} {case.name}: Dice {row['dice_mean']:.4f}, HD95 {row['hd95_mean']}, "
                f"folds {row['folds']}, {seconds:.1f} s")
            rows.append(row)
            if partial is not None:
                with open(partial, "a") as handle:
                    handle.write(json.dumps(row, default=str) + "\n")
    return rows


def peer_rows(cases: list[Any], peers: list[str], threads: int, partial: Path | None) -> list[dict[str, Any]]:
    from alignkit.evaluate import evaluate

    if not peers:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        rows = evaluate(cases, peers, out_dir=tmp, threads=threads, progress=False, dataset=DATASET)
    out = []
    for row in rows:
        keep = {k: row.get(k) for k in ("method", "case", "status", "seconds", *SCORES, "message")}
        log(f"[dio] {row['method']} {row['case']}: {row['status']} Dice {row.get('dice_mean')}, {row.get('seconds')} s")
        out.append(keep)
        if partial is not None:
            with open(partial, "a") as handle:
                handle.write(json.dumps(keep, default=str) + "\n")
    return out


def summarize(rows: list[dict[str, Any]], suffix: str | None) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(row["method"] for row in rows):
        mine = [r for r in rows if r["method"] == name and ((suffix is None) == ("crop" not in r["case"]))]
        ok = [r for r in mine if r["status"] == "ok"]
        if not mine:
            continue
        entry: dict[str, Any] = {"cases_ok": len(ok), "cases": len(mine)}
        for key in (*SCORES, "seconds"):
            entry[key] = mean_finite([r.get(key) for r in ok])
        if len(ok) < len(mine):
            entry["messages"] = sorted({str(r.get("message")) for r in mine if r["status"] != "ok"})
        table[name] = entry
    return table


def budget(run: str) -> dict[str, Any]:
    path = Path(run)
    info: dict[str, Any] = {"run": run}
    config = path / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        info.update(epochs=cfg.get("epochs"), size=cfg.get("size"), lr=cfg.get("lr"),
                    network=cfg.get("network"), method_options=cfg.get("method_options"))
    log_csv = path / "log.csv"
    if log_csv.is_file():
        import csv

        with log_csv.open() as handle:
            rows = list(csv.DictReader(handle))
        info["train_loop_seconds"] = sum(float(r["seconds"]) for r in rows if r.get("seconds"))
        info["last_val_dice"] = next((float(r["val_dice"]) for r in reversed(rows) if r.get("val_dice")), None)
    return info


def brain(args: argparse.Namespace) -> dict[str, Any]:
    from alignkit.data import load_dataset

    dataset = load_dataset(DATASET)
    cases = [dataset[name.strip()] for name in args.cases.split(",") if name.strip()]
    base = args.resample or 1.0
    if args.resample:  # a reduced, labelled configuration: the pairs at an isotropic coarser spacing
        cases = [resampled_case(c, (base,) * 3, tag=f"iso{base:g}mm") for c in cases]
    if args.anisotropic:  # in-plane spacing kept, 3x thicker slices, cropped in-plane
        cases += [resampled_case(c, (base, base, 3 * base), args.crop) for c in list(cases)]
    methods: dict[str, dict[str, Any]] = {}
    training: dict[str, Any] = {}
    for spec in args.dio:
        label, _, run = spec.partition("=")
        training[f"dio:{label}"] = budget(run)
        for transform in [t.strip() for t in args.transforms.split(",") if t.strip()]:
            methods[f"dio:{label}:{transform}"] = {"method": "dio", "checkpoint": run, "transform": transform}
    if "alignkit:brain" in args.baselines:
        methods["alignkit:brain"] = {"preset": "brain"}
    if "voxelmorph" in args.baselines:
        methods["voxelmorph"] = {"method": "voxelmorph", **({"checkpoint": args.voxelmorph} if args.voxelmorph else {})}
        if args.voxelmorph:
            training["voxelmorph"] = budget(args.voxelmorph)
    partial = Path(args.out).with_suffix(".partial.jsonl") if args.out else None
    rows = alignkit_rows(cases, methods, partial)
    rows += peer_rows(cases, [p.strip() for p in args.peers.split(",") if p.strip()], args.threads, partial)
    table = summarize(rows, None)
    payload: dict[str, Any] = {"benchmark": "dio_oasis", "dataset": DATASET, "cases": [c.name for c in cases],
                               "threads": args.threads, "training": training, "table": table}
    if args.anisotropic:
        aniso = summarize(rows, "@")
        payload["table_anisotropic"] = aniso
        payload["dice_drop"] = {name: (table[name]["dice_mean"] - aniso[name]["dice_mean"])
                                if name in aniso and table[name].get("dice_mean") is not None
                                and aniso[name].get("dice_mean") is not None else None for name in table}
    payload["per_case"] = rows
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--toy", action="store_true", help="the two-squares toy (§4.1)")
    mode.add_argument("--brain", action="store_true", help="OASIS-TRT-20 subjects 11 <-> 12 with peers")
    parser.add_argument("--steps", type=int, default=300, help="toy: training steps (one pair each)")
    parser.add_argument("--test-pairs", type=int, default=40, help="toy: pairs registered after training")
    parser.add_argument("--lr", type=float, default=1e-3, help="toy: Adam step of the feature network")
    parser.add_argument("--gradient", default="jfb", choices=["jfb", "ift"], help="toy: gradient through the solver")
    parser.add_argument("--features", help="toy: U-Net widths, e.g. 16,32,32")
    parser.add_argument("--normalize", action="store_true", help="toy: standardise the feature maps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dio", action="append", default=[], help="brain: NAME=RUN, a trained dio run (repeatable)")
    parser.add_argument("--transforms", default="svf,displacement", help="brain: dio's test-time transform models")
    parser.add_argument("--voxelmorph", help="brain: a voxelmorph run (default: the shipped model)")
    parser.add_argument("--baselines", default="alignkit:brain,voxelmorph", help="brain: alignkit-run baselines")
    parser.add_argument("--peers", default="greedy:deformable,ants:syn", help="brain: alignkit evaluate peers")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help="brain: case names of the data set")
    parser.add_argument("--anisotropic", action="store_true", help="brain: also the pairs at 1x1x3 mm, cropped")
    parser.add_argument("--crop", type=int, default=16, help="brain: in-plane voxels cut off each side")
    parser.add_argument("--resample", type=float, help="brain: register the pairs resampled to this isotropic "
                        "spacing (mm) -- a reduced configuration for a CPU budget; 1x1x3 becomes s x s x 3s")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also save the JSON line here")
    args = parser.parse_args()
    set_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    if args.toy:
        widths = [int(v) for v in args.features.split(",")] if args.features else None
        payload = toy(args.steps, args.test_pairs, args.seed, args.lr, args.gradient, features=widths,
                      normalize=args.normalize)
    else:
        payload = brain(args)
        payload["resample_mm"] = args.resample
    payload["total_seconds"] = time.perf_counter() - started
    emit(payload, args.out)


if __name__ == "__main__":
    main()
