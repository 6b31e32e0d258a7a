"""Train alignkit's learned ``voxelmorph`` method on real brains (CPU, reduced size) and score it on
held-out subjects against affine-only and the untrained network.

Data sets (``--dataset``):

* ``brain2d`` (``DATA/brain2d``): trains unsupervised (LNCC + diffusion) on the inter-subject pairs
  of the four unlabelled ANTs slices r27, r30, r62, r64 and validates on r16 <-> r85, the only two
  slices with labels (two landmark blobs each, labels 1 and 2, an ITK NIfTI read through the world
  onto the JPEG grid): blob Dice, and TRE of the blob centroids at full resolution;
* ``oasis`` (``DATA/brain3d-oasis-trt20``): native-space T1 volumes, affinely pre-aligned to the
  first training subject (``--prealign affine``, cached in the run folder), trained on the pairs of
  subjects 01-10 and validated on subject11 <-> subject12 (never seen in training), Dice over the
  DKT + subcortical labels common to the data set. The loss adds a soft-Dice term on the training
  subjects' labels (weak supervision, ``dice_weight``); the JSON says which loss was used.

Training goes through the command line a user runs (``python -m alignkit train --config CFG -o RUN``,
in a subprocess with ``--threads`` threads; the config file is saved in the run folder and echoed
in the JSON). Then, on the held-out pairs (both directions of every pair of held-out subjects):

* ``reduced``: on the network grid, exactly as the trainer sees data (every image pre-aligned to
  the reference subject, resampled to ``size``): mean Dice (``alignkit.metrics.dice_per_label`` over
  the model's label ids, labels warped nearest-neighbour) of ``affine`` (the pre-aligned pair as is),
  ``untrained`` (the network with the trainer's initial weights: same seed, same spec), ``trained``;
  and the % of non-positive Jacobian determinants of each network's displacement;
* ``full``: at the images' own resolution through the public API -- ``alignkit.register(fixed,
  moving, transform=PREALIGN)`` for ``affine`` (a pairwise affine, the classical engine), then
  ``alignkit.register(..., method="voxelmorph", checkpoint=...)`` for ``untrained``, ``trained``
  and ``trained+refineK`` (``refine=K`` iterations of instance optimisation): mean Dice of the
  warped label map (``dice_per_label`` over the same ids), TRE of the landmarks where there are
  some, % non-positive Jacobians of the whole map, seconds.

Also reported: training wall time (the ``alignkit train`` process: loading, pre-alignment, epochs,
validation), training-loop seconds and pairs/s (sum of the epochs' ``seconds`` in ``log.csv``), and
the trainer's own validation Dice before/after (``log.csv``, every pair involving a held-out subject).
Prints ONE JSON line on stdout (progress on stderr); ``--out FILE`` also saves it.

    python benchmarks/train_brain.py --dataset brain2d
    python benchmarks/train_brain.py --dataset oasis
    python benchmarks/train_brain.py --dataset brain2d --quick        # tiny, CI-sized
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_DATA, emit, log, mean_finite, set_threads

DATASETS = {"brain2d": "brain2d", "oasis": "brain3d-oasis-trt20"}


def train_config(dataset: str, data: Path, *, quick: bool, seed: int) -> dict[str, Any]:
    """The ``alignkit train`` configuration (keys of :class:`alignkit.train.TrainConfig`) of a run.

    Chosen once from the data sets' sizes and the CPU budget (a few minutes on two cores), not
    tuned on the validation pairs."""
    common: dict[str, Any] = {
        "method": "voxelmorph",
        "device": "cpu",
        "seed": seed,
        "quiet": True,
        "pairs": "inter",
    }
    if dataset == "brain2d":
        config = {
            **common,
            "dataset": str(data / DATASETS["brain2d"]),
            "layout": "folder",
            "subjects": ["r*slice"],  # the six ANTs slices (not the 160x192 atlas nor the dipy slice)
            "val_subjects": ["r16slice", "r85slice"],  # the labelled ones: never trained on
            "prealign": "affine",
            "size": [128],
            "epochs": 40,
            "lr": 1e-3,
            "method_options": {"similarity": "lncc", "window": 9},
        }
        if quick:
            config.update(size=[48], epochs=2, network={"features": [4, 8, 8]})
        return config
    config = {
        **common,
        "dataset": str(data / DATASETS["oasis"]),
        "val_subjects": ["subject11", "subject12"],
        "prealign": "affine",
        "size": [64, 64, 40],  # 256x256x160 at 4 mm: isotropic, like the 1 mm originals
        # 8 x 90 steps: ~17 min of training loop on two idle CPU cores, a budget, not a fit (the
        # training loss still falls at the end of 2 epochs and of 8)
        "epochs": 8,
        "lr": 1e-3,
        "method_options": {"similarity": "lncc", "window": 9, "dice_weight": 1.0},
    }
    if quick:
        config.update(
            subjects=["subject0[1-4]"],
            val_subjects=["subject03", "subject04"],
            size=[24, 24, 16],
            epochs=1,
            network={"features": [4, 8, 8]},
        )
    return config


def describe_loss(method_options: dict[str, Any], ndim: int) -> str:
    similarity = method_options.get("similarity", "lncc")
    weight = method_options.get("regularizer_weight")
    weight = weight if weight is not None else (0.01 if similarity == "mse" else 1.0) / ndim**2
    text = f"{similarity}"
    if similarity == "lncc":
        text += f"(window {method_options.get('window', 9)})"
    text += f" + {weight:g} x diffusion(velocity)"
    if method_options.get("dice_weight", 0.0) > 0:
        text += f" + {method_options['dice_weight']:g} x soft-Dice (training labels: weakly supervised)"
    else:
        text += " (unsupervised)"
    return text


def train_command(config_path: Path, run_dir: Path) -> list[str]:
    """The command line a user runs to train from a configuration file into ``run_dir``."""
    return [sys.executable, "-m", "alignkit", "train", "--config", str(config_path), "-o", str(run_dir), "--quiet"]


def run_training(config: dict[str, Any], run_dir: Path, threads: int) -> tuple[float, list[str]]:
    """``python -m alignkit train --config CFG -o RUN`` in a subprocess; its wall seconds and command."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "train_config.json"
    config_path.write_text(json.dumps(config, indent=2))
    command = train_command(config_path, run_dir)
    env = dict(os.environ)
    env.update({k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    env["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"alignkit train failed ({proc.returncode}): {tail}")
    return seconds, command


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    with (run_dir / "log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return [{k: (v if k == "stage" else float(v) if v not in ("", None) else None) for k, v in row.items()}
            for row in rows]


# -- evaluation --------------------------------------------------------------------------------------
def untrained_method(config: Any, trained: Any) -> Any:
    """The network the trainer starts from: the same seed, spec and options (``train`` seeds torch,
    then builds the method), with the trained model's label ids."""
    import torch

    from alignkit.methods import build_model

    torch.manual_seed(config.seed)
    options = dict(config.method_options)
    if config.prealign is not None:
        options.setdefault("prealign", config.prealign)
    method = build_model(
        config.method, ndim=trained.ndim, size=trained.size, network=config.network or None, **options
    )
    method.label_ids = trained.label_ids
    return method.eval()


def nonpositive_percent(displacement: Any) -> float:
    """% of non-positive Jacobian determinants of ``id + displacement`` (network-grid voxels)."""
    from alignkit.methods.heads import voxel_grid
    from alignkit.spatial import jacobian_determinant

    grid = voxel_grid(displacement.shape[2:])
    det = jacobian_determinant(grid.voxel_points(dtype=displacement.dtype) + displacement, grid)
    return 100.0 * float((det <= 0).float().mean())


def held_out_subjects(config: Any, run_dir: Path) -> tuple[list[str], list[str], Any]:
    """(training subject names, held-out names, held-out subjects on the network grid) of a run.

    Only the reference subject (the first training one: the space every image was pre-aligned to)
    and the held-out ones are prepared again, with the run's cached pre-alignment, exactly as
    :func:`alignkit.train.load_subjects` prepared them for training."""
    from alignkit.train import load_subjects
    from alignkit.train.subjects import dataset_data, select_names

    if not config.val_subjects:
        raise RuntimeError("this benchmark names its held-out subjects (val_subjects)")
    raw = dataset_data(config.dataset, layout=config.layout)
    names = [name for name, _, _ in raw.images]
    if config.subjects is not None:
        names = select_names(names, config.subjects)
    held = select_names(names, config.val_subjects)
    training = [n for n in names if n not in held]
    # the reference first: the first training subject, as alignkit.train.load_subjects chose it
    order = [training[0], *held]
    images = {name: (image, labels) for name, image, labels in raw.images}
    subjects = load_subjects(
        [images[n] for n in order],
        config.size,
        prealign=config.prealign,
        cache_dir=run_dir / "prealign",
        seed=config.seed,
    ).subjects
    return training, held, subjects[1:]


def evaluate_reduced(run_dir: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    from alignkit.methods import load_model as load
    from alignkit.metrics import dice_per_label
    from alignkit.train import InterSubjectPairs, TrainConfig

    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    trained = load(run_dir)
    ids = trained.label_ids
    if not ids:
        raise RuntimeError("the trained model has no label ids to score")
    training, held, subjects = held_out_subjects(config, run_dir)
    if len(subjects) < 2:
        raise RuntimeError(f"fewer than two held-out subjects ({held}): no unseen pair to score")
    pairs = [(i, j) for i in range(len(subjects)) for j in range(len(subjects)) if i != j]
    data = InterSubjectPairs(subjects, pairs=pairs, label_ids=ids)
    models = {"untrained": untrained_method(config, trained), "trained": trained}
    scores: dict[str, list[float]] = {"affine": [], "untrained": [], "trained": []}
    folds: dict[str, list[float]] = {"untrained": [], "trained": []}
    rows = []
    with torch.no_grad():
        for k in range(len(data)):
            item = data[k]
            fixed, moving = item["fixed"][None], item["moving"][None]
            fixed_labels, moving_labels = item["fixed_labels"][0], item["moving_labels"]
            if not (fixed_labels.any() and moving_labels.any()):
                continue
            row = {"fixed": held[pairs[k][0]], "moving": held[pairs[k][1]]}
            row["affine"] = float(np.mean(list(dice_per_label(moving_labels[0], fixed_labels, ids).values())))
            for name, method in models.items():
                output = method({"fixed": fixed, "moving": moving})
                warped = method.warp(moving_labels[None].float(), output["displacement"], mode="nearest")
                scores_k = dice_per_label(warped[0, 0].round().long(), fixed_labels, ids)
                row[name] = float(np.mean(list(scores_k.values())))
                folds[name].append(nonpositive_percent(output["displacement"]))
            for name, values in scores.items():
                values.append(row[name])
            rows.append(row)
    return {
        "size": list(trained.size),
        "held_out_subjects": held,
        "training_subjects": training,
        "n_pairs": len(rows),
        "n_labels": len(ids),
        "dice": {name: mean_finite(values) for name, values in scores.items()},
        "nonpositive_jacobian_percent": {name: mean_finite(values) for name, values in folds.items()},
        "pairs": rows,
        "_config": config,
        "_models": models,
        "_ids": ids,
    }


def full_resolution_pairs(dataset: str, data: Path, names: list[str]) -> list[dict[str, Any]]:
    """(fixed, moving, labels, landmarks) at the images' own resolution for every ordered pair of the
    held-out subjects, labels on their image's grid."""
    from alignkit.data.datasets import load_dataset
    from alignkit.image import Image
    from alignkit.spatial import sample_world

    out = []
    if dataset == "brain2d":
        from alignkit.train.subjects import folder_images

        labelled = {
            name: (image, labels) for name, image, labels in folder_images(data / DATASETS["brain2d"])
        }
        cases = load_dataset(data / DATASETS["brain2d"], layout="brain2d")

        def on_image_grid(name: str) -> Image:
            image, labels = labelled[name]
            # the landmark NIfTI is on an ITK grid whose voxel axes are the JPEG's transposed: go
            # through the world, as training does (alignkit.train.subjects.prepare_subject)
            world = image.grid.world_points()
            moved = sample_world(labels.batch(dtype=None).float(), labels.grid, world, mode="nearest")
            return Image(moved[0].round().long(), image.grid)

        for fixed in names:
            for moving in names:
                if fixed == moving:
                    continue
                case = cases[f"{fixed.removesuffix('slice')}<-{moving.removesuffix('slice')}"]
                out.append(
                    {
                        "name": f"{fixed}<-{moving}",
                        "fixed": case.fixed,
                        "moving": case.moving,
                        "fixed_labels": on_image_grid(fixed),
                        "moving_labels": on_image_grid(moving),
                        "fixed_landmarks": case.fixed_points,
                        "moving_landmarks": case.moving_points,
                    }
                )
        return out
    cases = load_dataset(data / DATASETS["oasis"])
    for fixed in names:
        for moving in names:
            if fixed != moving:
                case = cases[f"{fixed}<-{moving}"]
                out.append(
                    {
                        "name": case.name,
                        "fixed": case.fixed,
                        "moving": case.moving,
                        "fixed_labels": case.fixed_labels,
                        "moving_labels": case.moving_labels,
                    }
                )
    return out


def evaluate_full(
    runs_wanted: list[str],
    pairs: list[dict[str, Any]],
    run_dir: Path,
    untrained: Any,
    ids: list[int],
    prealign: str | None,
    refine: int,
    seed: int,
) -> dict[str, Any]:
    import numpy as np

    import alignkit
    from alignkit.metrics import dice_per_label

    linear = prealign or "none"
    runs: dict[str, dict[str, Any]] = {
        "affine": {"transform": linear},
        "untrained": {"method": "voxelmorph", "checkpoint": untrained, "transform": linear},
        "trained": {"method": "voxelmorph", "checkpoint": str(run_dir)},  # the model's own prealign
    }
    runs = {name: options for name, options in runs.items() if name in runs_wanted}
    if refine > 0 and "refine" in runs_wanted:
        runs[f"trained+refine{refine}"] = {
            "method": "voxelmorph",
            "checkpoint": str(run_dir),
            "refine": refine,
        }
    per_run: dict[str, dict[str, list[float]]] = {name: {} for name in runs}
    rows = []
    for pair in pairs:
        row: dict[str, Any] = {"pair": pair["name"]}
        for name, options in runs.items():
            tic = time.perf_counter()
            result = alignkit.register(
                pair["fixed"],
                pair["moving"],
                fixed_labels=pair["fixed_labels"],
                moving_labels=pair["moving_labels"],
                fixed_landmarks=pair.get("fixed_landmarks"),
                moving_landmarks=pair.get("moving_landmarks"),
                seed=seed,
                **options,
            )
            warped = result.warped_labels
            assert warped is not None
            scores = dice_per_label(warped.data[0].numpy(), pair["fixed_labels"].data[0].numpy(), ids)
            metrics = result.metrics
            values = {
                "dice": float(np.mean(list(scores.values()))),
                "nonpositive_jacobian_percent": metrics["nonpositive_jacobian_percent"],
                "seconds": time.perf_counter() - tic,
            }
            if "tre" in metrics:
                values["tre_mean"] = metrics["tre"]["mean"]
                row.setdefault("tre_before", metrics["tre_before"]["mean"])
            row[name] = values
            for key, value in values.items():
                per_run[name].setdefault(key, []).append(value)
            log(f"  full {pair['name']} {name}: Dice {values['dice']:.3f} ({values['seconds']:.1f} s)")
        rows.append(row)
    summary = {name: {key: mean_finite(v) for key, v in values.items()} for name, values in per_run.items()}
    return {"n_pairs": len(rows), "summary": summary, "pairs": rows}


# -- driver --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="brain2d")
    parser.add_argument(
        "--data", default=str(DEFAULT_DATA), help=f"shared data root (default {DEFAULT_DATA})"
    )
    parser.add_argument("--quick", action="store_true", help="tiny network, size and epochs (CI-sized)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch/BLAS/ITK threads (default 2)")
    parser.add_argument("--epochs", type=int, help="override the data set's epochs")
    parser.add_argument(
        "--refine",
        type=int,
        help="instance-optimisation iterations for trained+refine (0: skip; "
        "default 50 in 2D, 20 in 3D, 5 with --quick)",
    )
    parser.add_argument("--no-full", action="store_true", help="skip the full-resolution evaluation")
    parser.add_argument(
        "--full-runs",
        default="affine,untrained,trained,refine",
        help="full-resolution runs, comma-separated among affine,untrained,trained,refine (default: all)",
    )
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate the finished run in --run-dir without training (train wall time from its file times)",
    )
    parser.add_argument(
        "--run-dir", help="run folder (default: a new folder under the system temporary directory)"
    )
    parser.add_argument("--out", help="also save the JSON line here")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    wanted = [r.strip() for r in args.full_runs.split(",") if r.strip()]
    unknown = sorted(set(wanted) - {"affine", "untrained", "trained", "refine"})
    if unknown or not wanted:
        parser.error(f"--full-runs: unknown run(s) {', '.join(unknown) or '(none given)'}")
    data = Path(args.data)
    if not (data / DATASETS[args.dataset]).is_dir():
        parser.error(f"no {DATASETS[args.dataset]} under {data} (--data)")
    set_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)

    config = train_config(args.dataset, data, quick=args.quick, seed=args.seed)
    if args.epochs is not None:
        config["epochs"] = args.epochs
    ndim = 2 if args.dataset == "brain2d" else 3
    refine = args.refine if args.refine is not None else (5 if args.quick else 50 if ndim == 2 else 20)
    run_dir = (
        Path(args.run_dir)
        if args.run_dir
        else Path(tempfile.mkdtemp(prefix=f"alignkit-train-{args.dataset}-"))
    )
    started = time.perf_counter()
    log(f"training {args.dataset} into {run_dir} ...")
    if args.eval_only:
        if not args.run_dir or not (run_dir / "log.csv").is_file():
            parser.error("--eval-only needs the --run-dir of a finished run")
        config = json.loads((run_dir / "train_config.json").read_text())
        command = train_command(run_dir / "train_config.json", run_dir)
        # from the config written just before `alignkit train` started to its last log row
        train_seconds = (run_dir / "log.csv").stat().st_mtime - (
            run_dir / "train_config.json"
        ).stat().st_mtime
    else:
        train_seconds, command = run_training(config, run_dir, args.threads)
    history = read_log(run_dir)
    epochs = [row for row in history if row["epoch"] and row["epoch"] >= 1]
    loop_seconds = sum(row["seconds"] or 0.0 for row in epochs)
    pairs_trained = sum((row["pairs_per_s"] or 0.0) * (row["seconds"] or 0.0) for row in epochs)
    log(f"trained in {train_seconds:.1f} s; evaluating on the held-out subjects ...")

    reduced = evaluate_reduced(run_dir)
    train_cfg, models, ids = reduced.pop("_config"), reduced.pop("_models"), reduced.pop("_ids")
    payload: dict[str, Any] = {
        "benchmark": "train_brain",
        "dataset": DATASETS[args.dataset],
        "quick": args.quick,
        "seed": args.seed,
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "train_command": " ".join(["alignkit", *command[3:]]),
        "train_config": config,
        "loss": describe_loss(train_cfg.method_options, ndim),
        "size": reduced["size"],
        "training_subjects": reduced["training_subjects"],
        "held_out_subjects": reduced["held_out_subjects"],
        "training_pairs": round(pairs_trained / max(len(epochs), 1)),
        "epochs": len(epochs),
        "train_wall_seconds": train_seconds,
        "train_wall_seconds_source": "run folder file times" if args.eval_only else "alignkit train process",
        "train_loop_seconds": loop_seconds,
        "train_pairs_per_s": pairs_trained / loop_seconds if loop_seconds > 0 else None,
        "trainer_val_dice_untrained": history[0].get("val_dice") if history else None,
        "trainer_val_dice_trained": history[-1].get("val_dice") if history else None,
        "reduced": reduced,
    }
    if not args.no_full:
        pairs = full_resolution_pairs(args.dataset, data, reduced["held_out_subjects"])
        if args.quick:
            pairs = pairs[:1]
        payload["full"] = evaluate_full(
            wanted, pairs, run_dir, models["untrained"], ids, train_cfg.prealign, refine, args.seed
        )
    payload["run_dir"] = str(run_dir)
    payload["total_seconds"] = time.perf_counter() - started
    emit(payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
