"""Shen et al.'s Table 2 ablation of AVSM on OASIS-TRT-20, with the paper's baselines and peers in the same run.

Shen, Han, Xu, Niethammer, "Networks for Joint Affine and Non-parametric Image Registration", CVPR
2019. The networks train on subjects 01-08 (validation 09-10: the committed recipe
``src/alignkit/methods/models/avsm_oasis3d.recipe.json``) and every row is scored on the held-out
pair 11 <-> 12 in both directions (``--cases``), at full resolution (256x256x160, 1 mm, native space,
not pre-aligned).

Ablation rows (each a training run in ``--runs``, trained here unless it is already there with the
same configuration; Table 2's row in brackets -- the NCC rows are not reproduced, every row uses
mk-LNCC):

* ``affine-1step`` (II: affine net, eq. 13's regulariser, one step, no symmetry loss);
* ``affine-multi`` (III: + multi-step, 5 in training, 7 at test; from ``affine-1step``);
* ``affine-multi-sym`` (IV: + the affine symmetry loss, λ_as 10; from ``affine-1step``);
* ``vsvf-1step`` (VII: + the vSVF network, one step, no symmetry; on ``affine-multi-sym``);
* ``vsvf-2step`` (VIII: + multi-step vSVF, 2 in training and test);
* ``avsm`` (IX: + the vSVF symmetry loss, λ_vs 1e-4: the full system, the method's defaults);
* ``avsm+refineK``: the full system then K iterations of the classical SVF solver (``--refine``).

Baselines and peers: ``affine-opt`` and ``vsvf-opt`` (the classical engine with the same transform
models and mk-LNCC, the paper's numerically optimised baselines; vSVF-opt's <m, v> weight is the
network's λ_vr = 10 in the unit cube, i.e. 10 / extent² in mm), ``alignkit:brain``, ``voxelmorph``
(the shipped model: trained on the same subjects, its own budget, see its card), and the peers of
``alignkit evaluate`` named by ``--peers`` (default ``ants:syn``, ``greedy:deformable``) in isolated
workers.

Columns per row (mean over the cases): ``dice_mean`` (all labels of both subjects), ``folds`` (voxels
with det J < 0) and ``fold_severity`` (their mean |J|, Table 1's brackets), ``nonpositive_jacobian_percent``,
``symmetry`` = ln(mean over interior voxels of ||Φ_ts(Φ_st(x)) - x||²) in the unit cube (x on the
fixed grid, 10 voxels from its boundary; Φ_st and Φ_ts the registrations of the two directions, the
paper's Fig. 7 measure; alignkit-run rows only -- the peer workers return no map), ``seconds`` per
registration. Training budget of every run (epochs, wall seconds) in ``training``.

    python benchmarks/avsm.py --runs runs/avsm_ablation                          # train, then score
    python benchmarks/avsm.py --runs runs/avsm_ablation --epochs 4,2,2 --size 48,48,32 --threads 2
    python benchmarks/avsm.py --runs runs/avsm_ablation --no-train --model extra=RUN  # score only

Prints one JSON line on stdout (progress on stderr); ``--out FILE`` also saves it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO_ROOT, emit, log, mean_finite, set_threads

BENCHMARK = "avsm_ablation"
DATASET = "brain3d-oasis-trt20"
RECIPE = REPO_ROOT / "src" / "alignkit" / "methods" / "models" / "avsm_oasis3d.recipe.json"
DEFAULT_CASES = ("subject12<-subject11", "subject11<-subject12")
DEFAULT_PEERS = ("ants:syn", "greedy:deformable")
#: the paper's symmetry measure ignores this many voxels at the fixed grid's boundary
INTERIOR_MARGIN = 10

#: name -> (Table 2 row, the run it starts from, the stages it trains, method options)
VARIANTS: dict[str, tuple[str, str | None, str, dict[str, Any]]] = {
    "affine-1step": ("II", None, "affine-1step", {"lambda_as": 0.0, "affine_test_steps": 1, "vsvf_test_steps": 0}),
    "affine-multi": ("III", "affine-1step", "affine", {"lambda_as": 0.0, "vsvf_test_steps": 0}),
    "affine-multi-sym": ("IV", "affine-1step", "affine", {"vsvf_test_steps": 0}),
    "vsvf-1step": ("VII", "affine-multi-sym", "vsvf", {"vsvf_train_steps": 1, "vsvf_test_steps": 1, "lambda_vs": 0.0}),
    "vsvf-2step": ("VIII", "affine-multi-sym", "vsvf", {"lambda_vs": 0.0}),
    "avsm": ("IX", "affine-multi-sym", "vsvf", {}),
}


# -- training ------------------------------------------------------------------------------------
def variant_config(name: str, runs: Path, epochs: dict[str, int], size: list[int] | None, lr: float | None) -> dict[str, Any]:
    """The ``alignkit train`` configuration of one ablation run: the recipe plus the variant's changes."""
    _, parent, stage, options = VARIANTS[name]
    config = json.loads(RECIPE.read_text())
    config.update(quiet=True, method_options={**config.get("method_options", {}), **options}, stages=[stage],
                  init_from=None)
    if size is not None:
        config["size"] = size
    if lr is not None:
        config["lr"] = lr
    if stage == "affine-1step":
        config["stage_epochs"] = {"affine-1step": epochs["affine-1step"]}
    elif stage == "affine":  # the multi-step stage alone, from the 1-step run's weights
        config["stage_epochs"] = {"affine-1step": 0, "affine": epochs["affine"]}
        # its epochs restart at 1: eq. 13's schedule continues where the 1-step run left it
        scale = float(config["method_options"].get("ar_epoch_scale", 1.0))
        config["method_options"]["ar_epoch_offset"] = scale * epochs["affine-1step"]
    else:
        config["stage_epochs"] = {"vsvf": epochs["vsvf"]}
    if parent is not None:
        config["init_from"] = str(runs / parent)
    return config


def train_variant(name: str, runs: Path, config: dict[str, Any], threads: int) -> dict[str, Any]:
    """Train one run in a subprocess (unless ``runs/name`` holds a finished run of the same
    configuration); its budget from the run's ``log.csv``."""
    out = runs / name
    wanted = json.dumps(config, sort_keys=True)
    stamp = out / "benchmark_config.json"
    if (out / "model.pt").is_file() and stamp.is_file() and stamp.read_text() == wanted:
        log(f"[avsm] {name}: reusing {out}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        config_file = out / "train_config.json"
        config_file.write_text(json.dumps(config, indent=1))
        log(f"[avsm] training {name} ({VARIANTS[name][2]}, {config['stage_epochs']}) -> {out}")
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"))
        command = [sys.executable, "-m", "alignkit", "train", "--config", str(config_file), "-o", str(out), "--quiet"]
        subprocess.run(command, check=True, cwd=REPO_ROOT, env=env)
        stamp.write_text(wanted)
    return run_budget(out)


def run_budget(run: Path) -> dict[str, Any]:
    import csv

    with open(run / "log.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train_loss")]
    return {"epochs": len(rows), "stages": sorted({row["stage"] for row in rows}),
            "train_seconds": sum(float(row["seconds"] or 0) for row in rows),
            "val_dice_last": float(rows[-1]["val_dice"]) if rows and rows[-1].get("val_dice") else None}


# -- scoring -------------------------------------------------------------------------------------
def world_map(transform: Any, grid: Any) -> Any:
    import torch

    with torch.no_grad():
        return transform.transform_points(grid.world_points(dtype=torch.float32))[0]


def symmetry_error(forward: Any, backward: Any, grid: Any) -> float:
    """ln(mean ||Φ_ts(Φ_st(x)) - x||²) over the interior of the fixed grid, unit-cube coordinates."""
    import torch

    from alignkit.spatial import apply_matrix

    with torch.no_grad():
        points = grid.world_points(dtype=torch.float32)
        back = backward.transform_points(forward.transform_points(points))
        to_voxel = grid.voxel_from_world.to(torch.float32)
        error = apply_matrix(to_voxel, back) - apply_matrix(to_voxel, points)
        extent = torch.tensor([max(n - 1, 1) for n in grid.shape], dtype=torch.float32).view(1, -1, *([1] * grid.ndim))
        squared = ((error / extent) ** 2).sum(1)[0]
        m = INTERIOR_MARGIN
        interior = squared[tuple(slice(m, n - m) for n in grid.shape)]
        return float(torch.log(interior.mean()))


def alignkit_rows(cases: list[Any], methods: dict[str, dict[str, Any]], partial: Path | None = None) -> list[dict[str, Any]]:
    """Run each alignkit-side method on each case in this process; score like ``alignkit evaluate``.
    ``partial``: a file the rows so far are appended to as JSON lines (a long run keeps what it measured)."""
    import alignkit
    from alignkit.evaluate.method import Prediction
    from alignkit.evaluate.scoring import score_case

    rows = []
    for name, options in methods.items():
        transforms = {}
        for case in cases:
            start = time.perf_counter()
            try:
                result = alignkit.register(case.fixed, case.moving, **options)
            except Exception as error:  # noqa: BLE001 - a failed method is a row, not the end of the run
                log(f"[avsm] {name} on {case.name}: {type(error).__name__}: {error}")
                rows.append({"method": name, "case": case.name, "status": "error", "message": str(error)})
                continue
            seconds = time.perf_counter() - start
            transforms[case.name] = result.transform
            scores = score_case(case, Prediction(world_map=world_map(result.transform, case.fixed.grid).numpy()))
            row = {"method": name, "case": case.name, "status": "ok", "seconds": seconds,
                   **{k: scores.get(k) for k in ("dice_mean", "folds", "fold_severity", "nonpositive_jacobian_percent")}}
            log(f"[avsm] {name} {case.name}: Dice {row['dice_mean']:.4f}, folds {row['folds']}, {seconds:.1f} s")
            rows.append(row)
            if partial is not None:
                with open(partial, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
        for row in rows:
            if row["method"] != name or row["status"] != "ok":
                continue
            fixed_id, moving_id = row["case"].split("<-")
            reverse = f"{moving_id}<-{fixed_id}"
            if reverse in transforms:
                case = next(c for c in cases if c.name == row["case"])
                row["symmetry"] = symmetry_error(transforms[row["case"]], transforms[reverse], case.fixed.grid)
    return rows


def peer_rows(cases: list[Any], peers: list[str], threads: int, partial: Path | None = None) -> list[dict[str, Any]]:
    from alignkit.evaluate import evaluate

    if not peers:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        rows = evaluate(cases, peers, out_dir=tmp, threads=threads, progress=False, dataset=DATASET)
    out = []
    for row in rows:
        keep = {k: row.get(k) for k in ("method", "case", "status", "seconds", "dice_mean", "folds", "fold_severity",
                                        "nonpositive_jacobian_percent", "message")}
        log(f"[avsm] {row['method']} {row['case']}: {row['status']} Dice {row.get('dice_mean')}, {row.get('seconds')} s")
        out.append(keep)
        if partial is not None:
            with open(partial, "a") as handle:
                handle.write(json.dumps(keep, default=str) + "\n")
    return out


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == name]
        ok = [row for row in mine if row["status"] == "ok"]
        entry: dict[str, Any] = {"cases_ok": len(ok), "cases": len(mine)}
        for key in ("dice_mean", "folds", "fold_severity", "nonpositive_jacobian_percent", "symmetry", "seconds"):
            entry[key] = mean_finite([row.get(key) for row in ok])
        if len(ok) < len(mine):
            entry["messages"] = sorted({str(row.get("message")) for row in mine if row["status"] != "ok"})
        table[name] = entry
    return table


# -- main ----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=str(REPO_ROOT / "runs" / "avsm_ablation"), help="folder of the ablation runs")
    parser.add_argument("--epochs", default=None,
                        help="affine-1step,affine,vsvf epochs per run (default: the recipe's stage_epochs)")
    parser.add_argument("--size", help="network grid, e.g. 64,64,40 (default: the recipe's)")
    parser.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="ablation rows to train and score")
    parser.add_argument("--no-train", action="store_true", help="score the runs already in --runs only")
    parser.add_argument("--model", action="append", default=[], help="NAME=RUN: also score this avsm run")
    parser.add_argument("--refine", type=int, default=20, help="the avsm+refineK row (0: none)")
    parser.add_argument("--peers", default=",".join(DEFAULT_PEERS), help="alignkit evaluate peers ('' for none)")
    parser.add_argument("--baselines", default="affine-opt,vsvf-opt,alignkit:brain,voxelmorph",
                        help="alignkit-run baselines ('' for none)")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help="case names of the data set")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="also save the JSON line here")
    args = parser.parse_args()
    set_threads(args.threads)

    import torch

    torch.set_num_threads(args.threads)
    from alignkit.data import load_dataset
    from alignkit.errors import AlignkitError
    from alignkit.solve.presets import resolve_config

    recipe = json.loads(RECIPE.read_text())
    defaults = recipe["stage_epochs"]
    if args.epochs:
        values = [int(v) for v in args.epochs.split(",")]
        if len(values) != 3:
            parser.error("--epochs takes three numbers: affine-1step,affine,vsvf")
        epochs = dict(zip(("affine-1step", "affine", "vsvf"), values))
    else:
        epochs = {k: int(defaults[k]) for k in ("affine-1step", "affine", "vsvf")}
    size = [int(v) for v in args.size.replace("x", ",").split(",")] if args.size else None
    runs = Path(args.runs)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    started = time.perf_counter()

    training: dict[str, Any] = {}
    needed = list(dict.fromkeys(p for v in variants for p in _ancestors(v)))
    for name in needed:
        if args.no_train:
            if not (runs / name / "model.pt").is_file():
                parser.error(f"--no-train: {runs / name} holds no run")
            training[name] = run_budget(runs / name)
        else:
            training[name] = train_variant(name, runs, variant_config(name, runs, epochs, size, args.lr), args.threads)

    try:
        dataset = load_dataset(DATASET)
        cases = [dataset[name.strip()] for name in args.cases.split(",") if name.strip()]
    except (AlignkitError, KeyError) as error:
        raise SystemExit(f"benchmarks/avsm.py: {error}") from None

    methods: dict[str, dict[str, Any]] = {}
    for name in variants:
        methods[f"avsm:{name}"] = {"method": "avsm", "checkpoint": str(runs / name)}
    for spec in args.model:
        label, _, run = spec.partition("=")
        methods[f"avsm:{label}"] = {"method": "avsm", "checkpoint": run}
    if args.refine > 0 and "avsm" in variants:
        methods[f"avsm+refine{args.refine}"] = {"method": "avsm", "checkpoint": str(runs / "avsm"), "refine": args.refine}
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    ndim = cases[0].ndim
    if "alignkit:brain" in baselines:
        methods["alignkit:brain"] = {"preset": "brain"}
    if "voxelmorph" in baselines:
        methods["voxelmorph"] = {"method": "voxelmorph"}
    slow: dict[str, dict[str, Any]] = {}  # the numerically optimised baselines run last
    if "affine-opt" in baselines:
        slow["affine-opt"] = {"config": resolve_config(ndim, preset="brain", transform="affine", similarity="mk-lncc")}
    if "vsvf-opt" in baselines:
        config = resolve_config(ndim, preset="brain", transform="affine,vsvf", similarity="mk-lncc")
        grid = cases[0].fixed.grid
        extent = max((n - 1) * float(h) for n, h in zip(grid.shape, grid.spacing.tolist()))
        config.stages[-1].regularizer, config.stages[-1].regularizer_weight = "energy", 10.0 / extent**2
        slow["vsvf-opt"] = {"config": config}

    partial = Path(args.out).with_suffix(".partial.jsonl") if args.out else None
    rows = alignkit_rows(cases, methods, partial)
    rows += peer_rows(cases, [p.strip() for p in args.peers.split(",") if p.strip()], args.threads, partial)
    rows += alignkit_rows(cases, slow, partial)
    table = summarize(rows)
    reference = table.get("avsm:avsm", {})
    for entry in table.values():
        if reference.get("seconds") and entry.get("seconds"):
            entry["time_ratio_to_avsm"] = entry["seconds"] / reference["seconds"]
    emit({
        "benchmark": BENCHMARK,
        "dataset": DATASET,
        "cases": [c.name for c in cases],
        "threads": args.threads,
        "epochs": epochs,
        "size": size or recipe["size"],
        "rows": {name: VARIANTS[name][0] for name in variants},
        "training": training,
        "table": table,
        "per_case": rows,
        "total_seconds": time.perf_counter() - started,
    }, args.out)


def _ancestors(name: str) -> list[str]:
    parent = VARIANTS[name][1]
    return ([] if parent is None else _ancestors(parent)) + [name]


if __name__ == "__main__":
    main()
