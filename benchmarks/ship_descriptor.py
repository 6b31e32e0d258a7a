"""Export and score the learned-descriptor-ransac model trained by its recipe; prints one JSON line.

1. the recipe run (``python -m alignkit train --config src/alignkit/methods/models/NAME.recipe.json -o
   RUN``, trained beforehand and given as ``--run-dir``) is exported as
   ``src/alignkit/methods/models/NAME.pt``: method record, network specs and float16 weights only
   (:func:`alignkit.train.checkpoint.save_checkpoint`), at most 2 MiB, checked to load back and to give
   the same descriptors as the run's float32 model (max abs difference recorded);
2. held-out scores on ``vis-nir`` test pairs (the recipe trains on ``country`` only): Dong et al. 2018
   §6's descriptor mAP (up to 2000 SIFT keypoints of the NIR image carried into the RGB one by the
   true matrix; exact nearest neighbours) of the model against SIFT, and the mean corner error and
   success at 1/3/5/10 px of ``alignkit.register(..., method="learned-descriptor-ransac",
   checkpoint=NAME.pt)`` against ``opencv:sift-ransac`` (the evaluate peer), with seconds per pair;
3. the card ``NAME.card.json``: data and licence, recipe, command, commit, training time (log.csv),
   size, the scores above.

    python benchmarks/ship_descriptor.py --run-dir /tmp/ship_run --pairs-per-subset 5
    python benchmarks/ship_descriptor.py --run-dir /tmp/ship_run --no-export --skip-per-subset 5 --pairs-per-subset 0
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_DATA, REPO_ROOT, emit, log

SUBSETS = ("field", "forest", "indoor", "mountain")
THRESHOLDS = (1.0, 3.0, 5.0, 10.0)


def export(run_dir: Path, target: Path) -> dict[str, Any]:
    import torch

    from alignkit.io.atomic import atomic_path
    from alignkit.methods import load_model
    from alignkit.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint

    source = find_checkpoint(run_dir)
    state = load_checkpoint(source)
    half = {k: (v.half() if torch.is_floating_point(v) else v) for k, v in state["model"].items()}
    with atomic_path(target) as tmp:
        save_checkpoint(tmp, {"method": state["method"], "networks": state["networks"], "model": half})
    size = target.stat().st_size
    if size > 2 * 1024 * 1024:
        raise SystemExit(f"{target} is {size} bytes, over 2 MiB")
    full, shipped = load_model(source), load_model(target)
    patches = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = max(float((full.descriptor(patches, stream=s) - shipped.descriptor(patches, stream=s)).abs().max())
                   for s in (0, 1))
    return {"bytes": size, "source": str(source), "fp16_max_abs_descriptor_difference": diff}


def score(model_path: Path, data: str, per_subset: int, seed: int, skip: int = 0) -> dict[str, Any]:
    import cv2
    import torch

    import alignkit
    from alignkit.data.datasets import load_dataset
    from alignkit.evaluate.registry import resolve_method
    from alignkit.methods import load_model
    from alignkit.methods.descriptor_ransac import _grey_standardised, _uint8, sift_keypoints
    from alignkit.methods.patches import inside, warp_keypoints
    from alignkit.metrics import descriptor_map
    from alignkit.metrics.homography import corner_error

    model = load_model(model_path)
    dataset = load_dataset("vis-nir", root=data)
    stop = skip + per_subset if per_subset > 0 else None
    names = [n for s in SUBSETS for n in sorted(x for x in dataset.names if x.startswith(s + "/"))[skip:stop]]
    sift_peer = resolve_method("opencv:sift-ransac")
    desc: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {"sift": ([], []), "automatic": ([], [])}
    errors: dict[str, list[float]] = {"learned-descriptor-ransac": [], "opencv:sift-ransac": []}
    seconds: dict[str, list[float]] = {"learned-descriptor-ransac": [], "opencv:sift-ransac": []}
    for name in names:
        log(f"[score] {name}")
        case = dataset[name]
        rows, cols = case.fixed.shape[-2:]
        images = [_grey_standardised(im) for im in (case.fixed, case.moving)]
        kps = sift_keypoints(images[0], 2000)
        warped = warp_keypoints(torch.as_tensor(case.matrix), kps)
        keep = inside(warped.xy, tuple(images[1].shape[2:]), 12.0)
        kps, warped = kps.subset(keep), warped.subset(keep)
        for stream, (image, points) in enumerate(zip(images, (kps, warped))):
            desc["automatic"][stream].append(model.describe(image, points, stream).numpy())
            cv_points = [cv2.KeyPoint(float(x), float(y), float(s * 16), math.degrees(float(a)) % 360.0)
                         for (x, y), s, a in zip(points.xy.tolist(), points.scale.tolist(), points.orientation.tolist())]
            _, sift = cv2.SIFT_create().compute(_uint8(image), cv_points)
            desc["sift"][stream].append(sift.astype(np.float64))
        tic = time.perf_counter()
        try:
            result = alignkit.register(case.fixed, case.moving, method="learned-descriptor-ransac", checkpoint=model,
                                       seed=seed)
            errors["learned-descriptor-ransac"].append(
                corner_error(result.transform.matrix().detach().double().numpy(), case.matrix, cols, rows))
        except alignkit.errors.AlignkitError as exc:
            log(f"  learned-descriptor-ransac failed: {exc}")
            errors["learned-descriptor-ransac"].append(math.inf)
        seconds["learned-descriptor-ransac"].append(time.perf_counter() - tic)
        prediction = sift_peer.register(case, seed=seed, threads=1)
        errors["opencv:sift-ransac"].append(corner_error(prediction.matrix, case.matrix, cols, rows)
                                            if prediction.matrix is not None else math.inf)
        seconds["opencv:sift-ransac"].append(prediction.seconds)
    maps = {k: descriptor_map(a, b)["map"] for k, (a, b) in desc.items()}
    table = {}
    for method, values in errors.items():
        arr = np.array(values)
        table[method] = {"corner_error_median": float(np.median(arr)),
                         **{f"success_{t:g}px": float((arr <= t).mean()) for t in THRESHOLDS},
                         "seconds_mean": float(np.mean(seconds[method])),
                         "per_pair": dict(zip(names, [float(v) for v in values]))}
    return {"pairs": names, "map": maps, "registration": table}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="descriptor_visnir2d")
    parser.add_argument("--run-dir", help="the recipe's training run (needed unless --no-export)")
    parser.add_argument("--pairs-per-subset", type=int, default=5, help="pairs per vis-nir subset (0: all after --skip)")
    parser.add_argument("--skip-per-subset", type=int, default=0,
                        help="leave out the first pairs of each subset by name (e.g. those a choice was made on)")
    parser.add_argument("--selection", help="a JSON file saying how the recipe was chosen (copied into the card)")
    parser.add_argument("--no-export", action="store_true",
                        help="score the model already exported in the target folder; write no model or card")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also save the JSON line here")
    parser.add_argument("--target-dir", help="write the model and card here (default: the package's models folder)")
    args = parser.parse_args(argv)
    recipes = REPO_ROOT / "src" / "alignkit" / "methods" / "models"
    recipe = json.loads((recipes / f"{args.recipe}.recipe.json").read_text())
    models = Path(args.target_dir) if args.target_dir else recipes
    models.mkdir(parents=True, exist_ok=True)
    target = models / f"{args.recipe}.pt"
    if not args.run_dir and not args.no_export:
        parser.error("--run-dir is needed to export a model (or give --no-export)")
    if args.no_export:
        scores = score(target, args.data, args.pairs_per_subset, args.seed, args.skip_per_subset)
        emit({"benchmark": "ship_descriptor", "status": "ok", "model": str(target), "scores": scores}, args.out)
        return 0
    run = Path(args.run_dir)
    exported = export(run, target)
    scores = score(target, args.data, args.pairs_per_subset, args.seed, args.skip_per_subset)
    with open(run / "log.csv") as handle:
        history = list(csv.DictReader(handle))
    train_seconds = sum(float(r["seconds"]) for r in history if r.get("seconds"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
    import hashlib

    from alignkit.methods import load_model

    data = target.read_bytes()
    command = (f"python -m alignkit train --config src/alignkit/methods/models/{args.recipe}.recipe.json -o RUN; "
               f"python benchmarks/ship_descriptor.py --run-dir RUN --pairs-per-subset {args.pairs_per_subset}"
               + (f" --skip-per-subset {args.skip_per_subset}" if args.skip_per_subset else ""))
    card = {
        "name": args.recipe,
        "method": "learned-descriptor-ransac",
        "summary": "partly shared pseudo-siamese patch descriptor (Dong et al. 2018 §5.3, grey 16x16 patches, 256-d) "
                   "trained on positives harvested by weak-homography from VIS-NIR 'country' pairs (no ground truth used)",
        "dimensions": 2,
        "parameters": sum(p.numel() for p in load_model(target).parameters()),
        "file": f"src/alignkit/methods/models/{target.name}",
        "file_bytes": len(data),
        "file_sha256": hashlib.sha256(data).hexdigest(),
        "training_data": {
            "train": "vis-nir/country (VIS-NIR registration set built on the EPFL RGB-NIR scene data set, Brown and "
                     "Süsstrunk, CVPR 2011): the pairs of the folder by name, see recipe harvest_pairs (0 = all)",
            "held_out": "vis-nir test subsets field, forest, indoor, mountain (see scores.pairs)",
        },
        "weights_licence": "as the training data allow (the EPFL RGB-NIR scene data set: research use)",
        "recipe": f"src/alignkit/methods/models/{args.recipe}.recipe.json",
        "training_config": recipe,
        "command": command,
        "commit": commit,
        "training": {"commit_of_export": commit, "epochs": len([r for r in history if r.get("seconds")]),
                     "train_seconds": round(train_seconds, 1),
                     "train_seconds_note": "sum of log.csv's per-epoch seconds; the weak-homography harvest before "
                                           "the first epoch is not included",
                     "last": history[-1] if history else {}},
        "export": exported,
        "scores": scores,
    }
    if args.selection:  # how this recipe was chosen among candidates (a JSON object, recorded as given)
        card["selection"] = json.loads(Path(args.selection).read_text())
    card_path = models / f"{args.recipe}.card.json"
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    emit({"benchmark": "ship_descriptor", "status": "ok", "card": card}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
