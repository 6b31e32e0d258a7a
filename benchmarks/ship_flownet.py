"""Ship a narrow ``flownet-c`` model inside the package, with its recipe and card.

``--name`` picks the shipped model (default ``flownet_c_synthetic2d``; ``flownet_c_pyramid2d`` continues it
through the coarse-to-fine inference, its recipe's ``init_from: shipped:flownet_c_synthetic2d``).

1. (``--train``) trains the committed recipe ``src/alignkit/methods/models/NAME.recipe.json``
   (``python -m alignkit train --recipe NAME -o RUN --quiet``; synthetic FlyingChairs-style
   pairs from scikit-image's photographs, no data set on disk), or takes the finished ``--run-dir``
   (which must have been trained with the recipe's configuration: checked key by key);
2. exports the run's last checkpoint as ``src/alignkit/methods/models/NAME.pt``: float16
   weights, the method record and the network specs only, at most 2 MiB; checks that it loads back and
   that the fp32-cast model's flow matches the run's fp32 model on one synthetic pair;
3. scores it through the public API (``alignkit.register(f, m, method="flownet-c")`` without a checkpoint,
   i.e. the shipped model) on Middlebury (4 pairs) and MPI-Sintel (clean and final, 4 pairs) -- data it never
   saw -- with OpenCV's Farneback on the same pairs for reference: mean EPE and seconds;
4. writes the card ``NAME.card.json``: every number in it measured by this run.

Prints ONE JSON line (progress on stderr)::

    python benchmarks/ship_flownet.py --run-dir RUN --threads 2     # export + score a finished run
    python benchmarks/ship_flownet.py --train --threads 2           # train the recipe first
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

NAME = "flownet_c_synthetic2d"
MODELS = REPO_ROOT / "src" / "alignkit" / "methods" / "models"
MAX_BYTES = 2 * 1024 * 1024
#: the fp32-cast float16 model's flow must match the run's within this (pixels)
TOLERANCE_PX = 0.05
#: the configuration keys a --run-dir must share with the recipe
RECIPE_KEYS = ("method", "dataset", "size", "batch_size", "epochs", "lr", "synthetic_length", "seed", "network",
               "method_options", "init_from")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], check=False, cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()


def train(name: str, run_dir: Path, threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "alignkit", "train", "--recipe", name, "-o", str(run_dir), "--quiet"],
                   cwd=REPO_ROOT, env=env, check=True)
    return {"wall_seconds": round(time.perf_counter() - started, 1), "commit": git("rev-parse", "HEAD")}


def check_recipe(recipe: dict[str, Any], run_dir: Path) -> None:
    from alignkit.methods.shipped import get_shipped
    from alignkit.methods.training import SHIPPED_PREFIX

    config = json.loads((run_dir / "config.json").read_text())
    for key in RECIPE_KEYS:
        want = recipe.get(key, config.get(key) if key not in recipe else None)
        if key == "init_from" and isinstance(want, str) and want.startswith(SHIPPED_PREFIX):
            want = str(get_shipped(want[len(SHIPPED_PREFIX):]).path())  # the run records the resolved file
            have = config.get(key)
            if have is None or Path(have).resolve() != Path(want).resolve():
                raise SystemExit(f"{run_dir} was not trained with the recipe: {key} = {have!r}, recipe {want!r}")
            continue
        if key in recipe and config.get(key) != want:
            raise SystemExit(f"{run_dir} was not trained with the recipe: {key} = {config.get(key)!r}, recipe {want!r}")


def export(run_dir: Path, out: Path) -> dict[str, Any]:
    import torch

    from alignkit.data.synthetic_flow import SyntheticFlowPairs
    from alignkit.methods import load_model
    from alignkit.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint

    state = load_checkpoint(run_dir)
    weights = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in state["model"].items()}
    save_checkpoint(out, {"method": state["method"], "networks": state["networks"], "model": weights})
    size = out.stat().st_size
    log(f"exported {out.name}: {size} bytes ({size / 2**20:.3f} MiB)")
    if size > MAX_BYTES:
        raise SystemExit(f"{out} is {size} bytes, over the 2 MiB a shipped model may take")
    original, shipped = load_model(run_dir), load_model(out)
    pair = SyntheticFlowPairs((128, 128), length=1, seed=12345, per_epoch=False)[0]
    batch = {k: v[None] for k, v in pair.items() if k in ("fixed", "moving")}
    with torch.no_grad():
        a = original(batch)["displacement"]
        b = shipped(batch)["displacement"]
    check = {"pair": "one synthetic 128x128 pair (seed 12345)", "max_abs_flow_px": round(float(a.abs().max()), 4),
             "max_abs_difference_px": float((a - b).abs().max()), "tolerance_px": TOLERANCE_PX}
    if check["max_abs_difference_px"] > TOLERANCE_PX:
        raise SystemExit(f"float16 weights change the flow too much: {check}")
    return {"path": str(out.relative_to(REPO_ROOT)), "bytes": size, "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
            "parameters": int(sum(v.numel() for v in weights.values())),
            "run_checkpoint_bytes": find_checkpoint(run_dir).stat().st_size, "fp16_check": check}


def score(threads: int, model: Path) -> dict[str, Any]:
    """The exported model (its default inference) and Farneback on Middlebury, Sintel and the mmflow crops:
    mean EPE, seconds."""
    import numpy as np
    import torch

    import alignkit
    from alignkit.data.datasets import load_dataset
    from alignkit.evaluate.peers import PEERS
    from alignkit.metrics import endpoint_error
    from alignkit.spatial import flow_from_world_map, xy_from_flow

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # torch's one-time optimiser import, outside the timers
    out: dict[str, Any] = {}
    for name in ("flow/middlebury", "flow/sintel", "flow/mmflow-crops"):
        data = load_dataset(name)
        rows: dict[str, list[tuple[float, float]]] = {"flownet-c": [], "opencv:farneback": []}
        for case_name in data.names:
            case = data[case_name]
            truth = xy_from_flow(case.flow)
            started = time.perf_counter()
            flow = alignkit.register(case.fixed, case.moving, method="flownet-c", checkpoint=model).flow()
            rows["flownet-c"].append((endpoint_error(xy_from_flow(flow), truth, case.valid),
                                      time.perf_counter() - started))
            prediction = PEERS["opencv:farneback"]().register(case, threads=threads)
            peer = flow_from_world_map(torch.as_tensor(prediction.world_map)[None], case.fixed.grid)[0].numpy()
            rows["opencv:farneback"].append((endpoint_error(xy_from_flow(peer), truth, case.valid), prediction.seconds))
        out[name] = {method: {"mean_epe": round(float(np.mean([r[0] for r in values])), 4),
                              "mean_seconds": round(float(np.mean([r[1] for r in values])), 3), "pairs": len(values)}
                     for method, values in rows.items()}
        log(f"{name}: {out[name]}")
    return out


def training_record(run_dir: Path) -> dict[str, Any]:
    import csv

    rows = [r for r in csv.DictReader((run_dir / "log.csv").open())]
    timed = [r for r in rows if r.get("seconds")]
    seconds = sum(float(r["seconds"]) for r in timed)
    pairs = sum(float(r["seconds"]) * float(r["pairs_per_s"]) for r in timed)
    return {"epochs": len(timed), "train_seconds": round(seconds, 1), "pairs_seen": round(pairs),
            "pairs_per_s": round(pairs / seconds, 2) if seconds else None,
            "val_epe_synthetic": [round(float(r["val_epe"]), 4) for r in rows if r.get("val_epe")]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="a finished run of the recipe (default: train one)")
    parser.add_argument("--train", action="store_true", help="train the recipe into --run-dir (or a temporary folder)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default=NAME, help=f"the shipped model (default {NAME})")
    parser.add_argument("--hardware", default="CPU, one torch thread, on a shared 2-core machine",
                        help="where the run was trained, for the card (e.g. a lent GPU)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    import torch

    from alignkit.data.synthetic_flow import PHOTOGRAPHS

    torch.set_num_threads(args.threads)
    name = args.name
    recipe_path = MODELS / f"{name}.recipe.json"
    recipe = json.loads(recipe_path.read_text())
    run_dir = args.run_dir or Path(f"/tmp/{name}-run")
    trained: dict[str, Any] = {}
    if args.train:
        trained = train(name, run_dir, args.threads)
    elif args.run_dir is None:
        parser.error("give --run-dir of a finished run, or --train")
    check_recipe(recipe, run_dir)
    shipped = export(run_dir, MODELS / f"{name}.pt")
    scores = score(args.threads, MODELS / f"{name}.pt")
    training_data = ("alignkit.data.synthetic_flow (synthetic-flow): FlyingChairs-style pairs rendered from the "
                     f"scikit-image sample photographs {', '.join(PHOTOGRAPHS)}")
    options = recipe.get("method_options", {})
    how = (f"{recipe['size']} px crops, largest object motion {options.get('max_motion', 12.0)} px"
           + (f", trained through the coarse-to-fine inference ({options['train_coarse_levels']} halvings)"
              if options.get("train_coarse_levels") else ""))
    if recipe.get("init_from"):
        how += f", continuing {recipe['init_from']}"
    card = {
        "name": name,
        "method": "flownet-c",
        "summary": "narrow FlowNetC (16-128 channels, ~0.73 M parameters; FlowNetC has ~39 M) trained on "
                   f"synthetic FlyingChairs-style pairs generated on the fly from scikit-image photographs ({how})",
        "dimensions": 2,
        "parameters": shipped["parameters"],
        "file": shipped["path"],
        "file_bytes": shipped["bytes"],
        "file_sha256": shipped["sha256"],
        "training_data": training_data,
        "scored_on": "flow/middlebury (4 pairs), flow/sintel clean+final (4 pairs), flow/mmflow-crops (3): never "
                     "trained on; "
                     "the default inference (coarse to fine, finest level 1.5x the frames)",
        "weights_licence": "scikit-image sample images: each loader's docstring in skimage.data states its source "
                           "and licence (public domain, CC0 or CC BY); the weights are released with alignkit under "
                           "its licence",
        "recipe": str(recipe_path.relative_to(REPO_ROOT)),
        "training_config": recipe,
        "command": f"python -m alignkit train --recipe {name} -o RUN --quiet; "
                   f"python benchmarks/ship_flownet.py --run-dir RUN --threads {args.threads}",
        "commit": git("rev-parse", "HEAD"),
        "date": dt.date.today().isoformat(),
        "training": {**training_record(run_dir), **trained, "hardware": args.hardware},
        "export": {"dtype": "float16", "run_checkpoint_bytes": shipped["run_checkpoint_bytes"],
                   "fp16_check": shipped["fp16_check"]},
        "scores": scores,
        "narrowing": "FlowNetC's widths (64-1024 channels, ~39 M parameters, 156 MB in float32) would not ship "
                     "in 2 MiB; this model keeps FlowNetC's layout at a fiftieth of the parameters. A wide model "
                     "was not trained for comparison in the same budget, so the accuracy cost of narrowing is "
                     "not measured here",
    }
    (MODELS / f"{name}.card.json").write_text(json.dumps(card, indent=2) + "\n")
    emit({"benchmark": "ship_flownet", "file": shipped, "scores": scores, "training": card["training"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
