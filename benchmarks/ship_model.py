"""Produce a model alignkit ships inside the package, from its committed recipe, with its card.

A recipe is ``src/alignkit/methods/models/NAME.recipe.json``: an ``alignkit train`` configuration
(keys of :class:`alignkit.train.TrainConfig`) whose ``dataset`` is a data-set *name*, resolved in
``../shared/data`` beside the checkout. This script

1. trains it: ``python -m alignkit train --config RECIPE -o RUN --quiet`` in a subprocess run from the
   repository root with ``--threads`` torch/BLAS/ITK threads, recording the git commit (and whether
   the tree was dirty), the date and the wall time in ``RUN/ship_train.json``;
2. exports the run's last checkpoint as ``src/alignkit/methods/models/NAME.pt``: an alignkit
   checkpoint (:func:`alignkit.train.checkpoint.save_checkpoint`) holding only the method record,
   the network specs by name (``networks``) and the state dict with every floating tensor cast to float16 (no optimizer,
   RNG or history), at most 2 MiB; checks that it loads back and that the fp32-cast model predicts
   the same displacement as the run's fp32 model on one pair;
3. scores it at full resolution on the subjects of the data set that the recipe neither trains on
   nor validates on (both directions of every pair of them), through the public API:
   ``alignkit.register(fixed, moving, method=..., checkpoint=NAME.pt, ...)`` against
   ``alignkit.register(..., transform=PREALIGN)`` (the pre-alignment alone, a pairwise affine; for a
   recipe without a pre-alignment, e.g. ``avsm`` which learns its own affine, the classical
   ``transform="affine"``):
   mean Dice (``result.metrics["dice_mean"]``), % non-positive Jacobian determinants, seconds;
4. writes the card ``src/alignkit/methods/models/NAME.card.json``: every number in it measured by
   this run (or read from the run folder and the data set's own README / licence file).

Prints ONE JSON line on stdout (progress on stderr).

    python benchmarks/ship_model.py --recipe voxelmorph_oasis3d --threads 2
    python benchmarks/ship_model.py --recipe avsm_oasis3d --threads 2
    python benchmarks/ship_model.py --recipe voxelmorph_oasis3d --run-dir RUN --score-only  # re-export, re-score
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import fnmatch
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO_ROOT, emit, log, mean_finite, set_threads

MODELS = REPO_ROOT / "src" / "alignkit" / "methods" / "models"
MAX_BYTES = 2 * 1024 * 1024
#: what the card says the images are (the recipe's data set: T1 MRI, skull-stripped)
MODALITY = {"brain3d-oasis-trt20": "T1 MRI, skull-stripped"}
#: the classical baseline a model is scored against when its recipe has no pre-alignment
BASELINE_TRANSFORM = "affine"
#: the fp32-cast float16 model must predict the run's displacement to within this (network voxels)
TOLERANCE_VOXELS = 0.05
#: methods whose prediction is an iterative solve on the network's output, which amplifies float16
#: rounding: dio's ~70 Adam steps on its feature images moved a displacement by up to 0.062 voxels
#: (mean 0.002) between the fp32 and fp16-cast weights of a short run on a random pair
TOLERANCE_VOXELS_BY_METHOD = {"dio": 0.25}


def rel(path: Path) -> str:
    """``path`` relative to the repository root when it is inside it."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git(*args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def data_root() -> Path:
    from alignkit.data.datasets import default_root as root  # $ALIGNKIT_DATA, else ../shared/data

    return Path(root())


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    env["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    return env


# -- 1. training ----------------------------------------------------------------------------------
def train(recipe: Path, run_dir: Path, threads: int) -> dict[str, Any]:
    """``alignkit train --config RECIPE -o RUN --quiet``; what the card needs about it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "alignkit",
        "train",
        "--config",
        rel(recipe),
        "-o",
        str(run_dir),
        "--quiet",
    ]
    dirty = git("status", "--porcelain", "--untracked-files=no")
    info: dict[str, Any] = {
        "commit": git("rev-parse", "--short", "HEAD"),
        "tree_dirty": bool(dirty),
        "dirty_paths": [line[3:] for line in dirty.splitlines()],
        "recipe_committed": not git("status", "--porcelain", "--", rel(recipe)),
        "recipe_sha256": hashlib.sha256(recipe.read_bytes()).hexdigest(),
        "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "train_command": " ".join(["alignkit", *command[3:]]),
        # where `import alignkit` resolves (PYTHONPATH may point at a clean export of the commit
        # while the working tree is being edited)
        "alignkit_source": str(Path(importlib.util.find_spec("alignkit").origin).parent),
        "pythonpath": os.environ.get("PYTHONPATH"),
        "threads": threads,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    log(f"training {recipe.name} into {run_dir} at {info['commit']}{' (dirty tree)' if dirty else ''} ...")
    started = time.perf_counter()
    proc = subprocess.run(
        command, cwd=REPO_ROOT, env=thread_env(threads), capture_output=True, text=True, check=False
    )
    info["train_wall_seconds"] = round(time.perf_counter() - started, 1)
    info["finished_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    info["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"alignkit train failed ({proc.returncode}): {tail}")
    (run_dir / "ship_train.json").write_text(json.dumps(info, indent=2))
    log(f"trained in {info['train_wall_seconds']:.0f} s")
    return info


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    with (run_dir / "log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return [{k: number(v) for k, v in row.items()} for row in rows]


def number(value: str | None) -> float | str | None:
    """A log.csv cell: a number, None when empty, else the text itself (the ``stage`` column)."""
    if value in ("", None):
        return None
    try:
        return float(value)
    except ValueError:
        return value


# -- 2. export ------------------------------------------------------------------------------------
def export(run_dir: Path, out: Path) -> dict[str, Any]:
    """Write the shipped checkpoint (float16 weights only) and check it against the run's model."""
    import torch

    from alignkit.methods import load_model as load
    from alignkit.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint

    state = load_checkpoint(run_dir)
    model = {
        key: value.to(torch.float16) if value.is_floating_point() else value
        for key, value in state["model"].items()
    }
    # the network specs by name (a run of a one-network method written before several networks
    # were possible stores its one spec as "network")
    networks = state.get("networks") or {"network": state["network"]}
    save_checkpoint(out, {"method": state["method"], "networks": networks, "model": model})
    size = out.stat().st_size
    log(f"exported {rel(out)}: {size} bytes ({size / 2**20:.3f} MiB)")
    assert size <= MAX_BYTES, f"{out} is {size} bytes, over the 2 MiB a shipped model may take"

    back = load_checkpoint(out)
    assert set(back) == {"format", "version", "method", "networks", "model"}, sorted(back)
    assert back["method"] == state["method"] and back["networks"] == networks
    assert all(v.dtype == torch.float16 for v in back["model"].values() if v.is_floating_point())
    original, shipped = load(run_dir), load(out)  # load() copies the float16 weights into float32
    assert all(v.dtype == torch.float32 for v in shipped.state_dict().values() if v.is_floating_point())

    # one pair on the network grid: the run's two validation subjects, pre-aligned as in training
    fixed, moving = network_pair(run_dir)
    with torch.no_grad():
        a = original({"fixed": fixed, "moving": moving})["displacement"]
        b = shipped({"fixed": fixed, "moving": moving})["displacement"]
    diff = (a - b).abs()
    check = {
        "pair": "validation pair on the network grid (fp32 run model vs fp32-cast float16 model)",
        "max_abs_displacement_voxels": float(a.abs().max()),
        "max_abs_difference_voxels": float(diff.max()),
        "mean_abs_difference_voxels": float(diff.mean()),
        "tolerance_voxels": TOLERANCE_VOXELS_BY_METHOD.get(state["method"]["name"], TOLERANCE_VOXELS),
    }
    log(
        f"float16 vs float32: max |diff| {check['max_abs_difference_voxels']:.2e} voxels "
        f"(displacement up to {check['max_abs_displacement_voxels']:.2f})"
    )
    assert check["max_abs_difference_voxels"] <= check["tolerance_voxels"], check
    return {
        "path": rel(out),
        "bytes": size,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "parameters": int(sum(v.numel() for v in model.values())),
        "ndim": state["method"]["config"].get("ndim"),
        "stored_keys": sorted(back),
        "run_checkpoint_bytes": find_checkpoint(run_dir).stat().st_size,
        "fp16_check": check,
    }


def network_pair(run_dir: Path) -> tuple[Any, Any]:
    """(fixed, moving) batches of the run's first two validation subjects, prepared as the trainer
    prepared them (the run's cached pre-alignment to its reference subject)."""
    from alignkit.train import TrainConfig, load_subjects
    from alignkit.train.subjects import dataset_data, select_names

    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    raw = dataset_data(config.dataset, layout=config.layout)
    names = [name for name, _, _ in raw.images]
    if config.subjects is not None:
        names = select_names(names, config.subjects)
    val = select_names(names, config.val_subjects or [])
    training = [n for n in names if n not in val]
    images = {name: (image, labels) for name, image, labels in raw.images}
    subjects = load_subjects(
        [images[n] for n in (training[0], *val[:2])],
        config.size,
        prealign=config.prealign,
        cache_dir=run_dir / "prealign",
        seed=config.seed,
    ).subjects
    return subjects[1].image[None], subjects[2].image[None]


# -- 3. held-out scores -----------------------------------------------------------------------------
def split(config: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(training, validation, held-out) subject names of the recipe's data set."""
    from alignkit.data.datasets import load_dataset

    cases = load_dataset(config["dataset"])
    names = sorted({part for name in cases.names for part in name.split("<-")})
    used = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in config.get("subjects") or ["*"])]
    val = [n for n in used if any(fnmatch.fnmatchcase(n, p) for p in config.get("val_subjects") or [])]
    return [n for n in used if n not in val], val, [n for n in names if n not in used]


def baseline_transform(config: dict[str, Any]) -> str:
    """The classical transform the model is scored against: the recipe's pre-alignment alone, or the
    classical affine when the recipe has none (a method that learns its own affine)."""
    return config.get("prealign") or BASELINE_TRANSFORM


def recipe_epochs(config: dict[str, Any]) -> int:
    """Epochs the recipe asks for: the sum of ``stage_epochs`` when it sets them (a staged method
    such as avsm), else ``epochs``."""
    stages = config.get("stage_epochs") or {}
    return int(sum(stages.values())) if stages else int(config.get("epochs", 10))


def score(config: dict[str, Any], held_out: list[str], shipped: Path, threads: int) -> dict[str, Any]:
    import alignkit
    from alignkit.data.datasets import load_dataset

    cases = load_dataset(config["dataset"])
    baseline = baseline_transform(config)
    runs = {
        f"{baseline} only": {"transform": baseline},
        config["method"]: {"method": config["method"], "checkpoint": str(shipped)},
    }
    rows, per_run = [], {name: {} for name in runs}
    for fixed in held_out:
        for moving in held_out:
            if fixed == moving:
                continue
            case = cases[f"{fixed}<-{moving}"]
            row: dict[str, Any] = {"pair": case.name, "fixed": fixed, "moving": moving}
            for name, options in runs.items():
                tic = time.perf_counter()
                result = alignkit.register(
                    case.fixed,
                    case.moving,
                    fixed_labels=case.fixed_labels,
                    moving_labels=case.moving_labels,
                    seed=config.get("seed", 0),
                    **options,
                )
                values = {
                    "dice_mean": result.metrics["dice_mean"],
                    "nonpositive_jacobian_percent": result.metrics["nonpositive_jacobian_percent"],
                    "seconds": round(time.perf_counter() - tic, 2),
                }
                row.setdefault("dice_mean_before", result.metrics.get("dice_mean_before"))
                row[name] = values
                for key, value in values.items():
                    per_run[name].setdefault(key, []).append(value)
                log(
                    f"  {case.name} {name}: Dice {values['dice_mean']:.4f}, "
                    f"{values['nonpositive_jacobian_percent']:.4f}% Jac<=0 ({values['seconds']:.1f} s)"
                )
            rows.append(row)
    mean = {name: {key: mean_finite(v) for key, v in values.items()} for name, values in per_run.items()}
    return {"threads": threads, "n_pairs": len(rows), "pairs": rows, "mean": mean}


# -- 4. the card ------------------------------------------------------------------------------------
def weights_licence(data_licence: str | None) -> str:
    """The terms the shipped weights are offered under: those of the training data when it restricts
    use (NC) or derivatives (SA), else the package's own licence."""
    if data_licence and any(tag in data_licence for tag in ("NC", "SA")):
        return f"{data_licence}, as the training data (weights derived from them)"
    return "Apache-2.0 (the package's licence)"


def data_provenance(name: str) -> dict[str, Any]:
    """Source and licence of a data set as its README table row and its licence file state them."""
    root = data_root()
    out: dict[str, Any] = {"name": name}
    readme = root / "README.md"
    for line in readme.read_text().splitlines() if readme.is_file() else []:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].strip("`").startswith(f"{name}/"):
            out["source"] = cells[3]
            match = re.search(r"CC [A-Z-]+ \d\.\d", cells[3])
            out["licence"] = match.group(0) if match else None
            break
    licence_file = root / name / "LICENSE-README.txt"
    if licence_file.is_file():
        text = licence_file.read_text()
        url = re.search(r"https?://creativecommons\.org/\S+?(?=\)|\s|$)", text)
        cite = re.search(r'"([^"]+)"\s*\n\s*(.+DOI: \S+)', text)
        out["licence_url"] = url.group(0) if url else None
        out["cite"] = f'"{cite.group(1)}" {cite.group(2).strip()}' if cite else None
        out["licence_file"] = f"{name}/LICENSE-README.txt"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--recipe", required=True, help="NAME of src/alignkit/methods/models/NAME.recipe.json"
    )
    parser.add_argument("--run-dir", help="training run folder (default: a new temporary folder)")
    parser.add_argument("--threads", type=int, default=1, help="torch/BLAS/ITK threads (default 1)")
    parser.add_argument(
        "--score-only",
        action="store_true",
        help="do not train: export and score the finished run in --run-dir",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    recipe = MODELS / f"{args.recipe}.recipe.json"
    if not recipe.is_file():
        parser.error(f"no recipe {recipe}")
    if args.score_only and not (args.run_dir and (Path(args.run_dir) / "ship_train.json").is_file()):
        parser.error("--score-only needs the --run-dir of a run this script trained (RUN/ship_train.json)")
    set_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    config = json.loads(recipe.read_text())
    run_dir = (
        Path(args.run_dir).resolve()
        if args.run_dir
        else Path(tempfile.mkdtemp(prefix=f"ship-{args.recipe}-"))
    )
    started = time.perf_counter()

    if args.score_only:
        trained = json.loads((run_dir / "ship_train.json").read_text())
        if trained["recipe_sha256"] != hashlib.sha256(recipe.read_bytes()).hexdigest():
            raise SystemExit(f"{recipe.name} changed since {run_dir} was trained: train again")
    else:
        trained = train(recipe, run_dir, args.threads)
    run_config = json.loads((run_dir / "config.json").read_text())
    history = read_log(run_dir)
    epochs = [row for row in history if row["epoch"] and row["epoch"] >= 1]

    shipped = export(run_dir, MODELS / f"{args.recipe}.pt")
    training, validation, held_out = split(config)
    if len(held_out) < 2:
        raise SystemExit(f"fewer than two subjects left out of training and validation: {held_out}")
    log(f"scoring on the held-out subjects {', '.join(held_out)} at full resolution ...")
    held = score(config, held_out, MODELS / f"{args.recipe}.pt", args.threads)

    state_method = json.loads(json.dumps(run_config))  # the trainer's resolved configuration
    card = {
        "name": args.recipe,
        "method": config["method"],
        "dimensions": shipped["ndim"],
        "modality": MODALITY.get(config["dataset"]),
        "input_size": run_config["size"],
        "prealignment": run_config["prealign"],
        "file": shipped["path"],
        "file_bytes": shipped["bytes"],
        "file_sha256": shipped["sha256"],
        "storage": "alignkit checkpoint (torch .pt container, read by alignkit.train.checkpoint.load_checkpoint)"
        f" holding {', '.join(shipped['stored_keys'])}; every floating tensor float16",
        "parameters": shipped["parameters"],
        "training_data": {
            **data_provenance(config["dataset"]),
            "training_subjects": training,
            "validation_subjects": validation,
            "held_out_subjects": held_out,
            "split": f"{len(training) + len(validation) + len(held_out)} subjects in the data set: "
            f"{len(training)} train, {len(validation)} validate, {len(held_out)} held out (scored below)",
        },
        # trained weights derive from their data: a NonCommercial / ShareAlike data licence carries over
        "weights_licence": weights_licence(data_provenance(config["dataset"]).get("licence")),
        "recipe": rel(recipe),
        "training_config": state_method,
        "command": f"python benchmarks/ship_model.py --recipe {args.recipe} --threads {trained['threads']}",
        "train_command": trained["train_command"],
        "commit": trained["commit"],
        "tree_dirty": trained["tree_dirty"],
        "alignkit_source_at_training": trained["alignkit_source"],
        "recipe_committed_at_training": trained["recipe_committed"],
        "trained_utc": trained["started_utc"],
        "train_wall_seconds": trained["train_wall_seconds"],
        "train_threads": trained["threads"],
        "load_avg_at_training_start": trained["load_avg_at_start"],
        "train_loop_seconds": round(sum(row["seconds"] or 0.0 for row in epochs), 1),
        "epochs": len(epochs),
        "recipe_epochs": recipe_epochs(config),
        "epochs_by_stage": {
            str(name): sum(1 for row in epochs if row.get("stage") == name)
            for name in dict.fromkeys(row.get("stage") for row in epochs)
        },
        "all_recipe_epochs_trained": len(epochs) == recipe_epochs(config),
        "validation_dice": {
            "epoch_0": history[0].get("val_dice") if history else None,
            f"epoch_{int(history[-1]['epoch'])}": history[-1].get("val_dice") if history else None,
            "source": "log.csv of the run (trainer's validation pairs, network grid)",
        },
        "held_out": {
            "resolution": "full (the 1 mm originals) through alignkit.register, labels warped for Dice",
            "baseline": f"alignkit.register(..., transform={baseline_transform(config)!r}): "
            + (
                "the pre-alignment alone"
                if config.get("prealign")
                else "the classical pairwise affine (the model has no pre-alignment: it learns its own affine)"
            ),
            "model": f"alignkit.register(..., method={config['method']!r}, checkpoint={shipped['path']!r})",
            "threads": held["threads"],
            "pairs": held["pairs"],
            "mean": held["mean"],
        },
        "fp16_check": shipped["fp16_check"],
        "alignkit_version": package_version("alignkit"),
        # export and held-out scoring ran here (the same process as training unless --score-only)
        "scored_commit": git("rev-parse", "--short", "HEAD"),
        "scored_tree_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "scored_alignkit_source": str(Path(importlib.util.find_spec("alignkit").origin).parent),
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).date().isoformat(),
    }
    card_path = MODELS / f"{args.recipe}.card.json"
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    log(f"wrote {rel(card_path)}")
    emit(
        {
            "benchmark": "ship_model",
            "recipe": args.recipe,
            "run_dir": str(run_dir),
            "file_bytes": shipped["bytes"],
            "train_wall_seconds": trained["train_wall_seconds"],
            "validation_dice": card["validation_dice"],
            "held_out_mean": held["mean"],
            "card": rel(card_path),
            "total_seconds": time.perf_counter() - started,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
