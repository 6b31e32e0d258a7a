"""Produce the ``stereo-net`` model alignkit ships, from its committed recipe, with its card.

``benchmarks/ship_model.py`` does this for the brain models (scored by Dice); a stereo model is scored
by disparity errors, so this script:

1. trains the recipe ``src/alignkit/methods/models/NAME.recipe.json`` (``python -m alignkit train
   --config RECIPE -o RUN --quiet`` in a subprocess with ``--threads`` threads), recording commit, date
   and wall time -- or takes a finished ``--run-dir``;
2. exports the run's checkpoint as ``NAME.pt`` (weights only, at most 2 MiB; float32, or float16 with
   ``--float16``) and checks that the exported model's cost volume on a synthetic pair matches the
   run's float32 one;
3. scores it through the public API on ``stereo/motorcycle`` (full size; the recipe's real training
   pair: in-sample) and ``stereo/aloe`` (half size; held out, report-only: nothing is chosen on it)
   -- as shipped (``stereo-net``: the recipe's ``census_weight`` hybrid when it sets one) and with
   the network's cost alone (``stereo-net:network``) -- against the classical ``stereo`` preset's
   matcher (:func:`alignkit.stereo.match`) with the same range, using ``benchmarks/stereo.py``'s
   pairs and scoring;
4. writes ``NAME.card.json``.

Prints ONE JSON line.

    python benchmarks/ship_stereo_net.py --recipe stereo_net_synthetic2d [--run-dir RUN] [--threads 1] [--float16]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO_ROOT, emit, log, set_threads

MODELS = REPO_ROOT / "src" / "alignkit" / "methods" / "models"
MAX_BYTES = 2 * 1024 * 1024
DATA = REPO_ROOT.parent / "shared" / "data"


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], check=False, capture_output=True,
                          text=True).stdout.strip()


def train(recipe: Path, run_dir: Path, threads: int) -> dict[str, Any]:
    env = {**os.environ, "ALIGNKIT_DATA": str(DATA), **{k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
    record = {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "src")),
              "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "threads": threads}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "alignkit", "train", "--config", str(recipe), "-o", str(run_dir), "--quiet"],
                   check=True, cwd=REPO_ROOT, env=env)
    record["train_seconds"] = round(time.perf_counter() - started, 1)
    (run_dir / "ship_train.json").write_text(json.dumps(record, indent=2))
    return record


def export(run_dir: Path, out: Path, float16: bool = False) -> dict[str, Any]:
    import numpy as np
    import torch

    from alignkit.data.synthetic_stereo import render_stereo_pair, training_photographs
    from alignkit.methods import load_model
    from alignkit.methods.stereo_net import normalise_pair
    from alignkit.train.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(run_dir)
    dtype = torch.float16 if float16 else torch.float32
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state["model"].items()}
    save_checkpoint(out, {"method": state["method"], "networks": state["networks"], "model": weights})
    size = out.stat().st_size
    assert size <= MAX_BYTES, f"{out} is {size} bytes, over 2 MiB"
    original, shipped = load_model(run_dir), load_model(out)
    pair = render_stereo_pair(training_photographs()[0], (96, 128), rng=np.random.default_rng(123), max_disparity=24)
    left, right = normalise_pair(pair.left, pair.right)
    disparities = np.arange(0, 25)
    a = original.cost_function()(left, right, disparities)
    b = shipped.cost_function()(left, right, disparities)
    check = {"pair": f"synthetic 96x128 pair, cost volume of the fp32 run model vs the exported {dtype} model",
             "max_abs_cost_difference": float((a - b).abs().max()),
             "winner_take_all_agreement": float((a.argmin(0) == b.argmin(0)).float().mean())}
    log(f"exported {out.name}: {size} bytes; {check}")
    assert check["max_abs_cost_difference"] < 5e-3, check
    return {"path": str(out.relative_to(REPO_ROOT)), "bytes": size, "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
            "parameters": int(sum(v.numel() for v in weights.values())), "dtype": str(dtype).removeprefix("torch."),
            "export_check": check}


def score(shipped: Path) -> dict[str, Any]:
    from stereo import load_pairs, run_method

    from alignkit.metrics import disparity_errors

    out: dict[str, Any] = {}
    for pair in load_pairs(DATA, full_aloe=False):
        rows = {"note": pair["note"], "ndisp": pair["ndisp"],
                "role": "training pair (in-sample)" if pair["name"] == "motorcycle" else "held out"}
        for method in ("stereo-net", "stereo-net:network", "alignkit:sgm"):
            disparity, predicted, seconds = run_method(method, pair, str(shipped))
            errors = disparity_errors(disparity, pair["gt"], predicted=predicted)
            rows[method] = {k: round(errors[k], 4) for k in ("bad1", "bad2", "bad4", "epe")} | {"seconds": round(seconds, 2)}
            log(f"{pair['name']} {method}: {rows[method]}")
        out[pair["name"]] = rows
    return out


def summary(recipe: dict[str, Any]) -> str:
    """One line saying which network and training objective the recipe makes."""
    from alignkit.methods.learned import learned_class

    spec = {**learned_class("stereo-net").default_networks(2)["features"], **recipe.get("network", {})}
    layers, features = int(spec["layers"]), int(spec["features"])
    objective = recipe.get("method_options", {}).get("objective", "hinge")
    trained = {"hinge": "MC-CNN-fast's hinge loss", "softmax": "a softmax over all disparities at every pixel"}
    census = float(recipe.get("method_options", {}).get("census_weight", 0.0))
    mix = (f", mixed {1 - census:g}:{census:g} with the 7x9 census cost (a learned + census hybrid)" if census > 0
           else "")
    return (f"MC-CNN-fast matching cost ({layers} x 3x3 conv, {features} features, {2 * layers + 1}x{2 * layers + 1} "
            f"patches, trained with {trained.get(objective, objective)}){mix} for semi-global matching")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="stereo_net_synthetic2d")
    parser.add_argument("--run-dir", type=Path, default=None, help="a finished run of the recipe (skips training)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--float16", action="store_true", help="export float16 weights (half the bytes; the check "
                        "against the float32 run must still pass)")
    parser.add_argument("--note", default=None, help="a line for the card (how the recipe's settings were chosen ...)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    recipe_path = MODELS / f"{args.recipe}.recipe.json"
    recipe = json.loads(recipe_path.read_text())
    if args.run_dir is None:
        run_dir = REPO_ROOT.parent / "runs" / args.recipe
        training = train(recipe_path, run_dir, args.threads)
    else:
        run_dir = args.run_dir
        record = run_dir / "ship_train.json"
        training = json.loads(record.read_text()) if record.is_file() else {"note": "run given with --run-dir"}
    log_rows = (run_dir / "log.csv").read_text().splitlines()
    header, last = log_rows[0].split(","), log_rows[-1].split(",")
    final = dict(zip(header, last))
    exported = export(run_dir, MODELS / f"{args.recipe}.pt", float16=args.float16)
    scores = score(MODELS / f"{args.recipe}.pt")
    card = {
        "name": args.recipe,
        "method": "stereo-net",
        "summary": summary(recipe),
        "dimensions": 2,
        "parameters": exported["parameters"],
        "file": exported["path"],
        "file_bytes": exported["bytes"],
        "file_sha256": exported["sha256"],
        "training_data": {
            "synthetic": "rectified pairs rendered from scikit-image's sample photographs with a random depth "
                         "layering (alignkit.data.synthetic_stereo.training_photographs; the licence of each "
                         "is in its skimage.data docstring: public domain or CC0 for most, none stated for "
                         "'moon' and 'page', distributed with scikit-image under BSD-3)",
            "real": "stereo/motorcycle: Middlebury 2014 'Motorcycle' (Scharstein et al., GCPR 2014), as "
                    "down-sampled by scikit-image (skimage.data.stereo_motorcycle); Middlebury's terms apply",
            "held_out": "stereo/aloe (Middlebury 2006 'Aloe', as shipped in OpenCV's samples)",
        },
        "weights_licence": "as the training data allow: research and benchmarking use",
        "recipe": f"src/alignkit/methods/models/{args.recipe}.recipe.json",
        "training_config": recipe,
        "command": f"python benchmarks/ship_stereo_net.py --recipe {args.recipe} --threads {args.threads}"
                   + (" --float16" if args.float16 else ""),
        "commit": training.get("commit"),
        "training": training,
        "final_epoch": final,
        "export": exported,
        "scores": scores,
        "scored_at_commit": git("rev-parse", "--short", "HEAD"),
        **({"note": args.note} if args.note else {}),
    }
    (MODELS / f"{args.recipe}.card.json").write_text(json.dumps(card, indent=2) + "\n")
    emit({"benchmark": "ship_stereo_net", **{k: card[k] for k in ("name", "training", "export", "scores")}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
