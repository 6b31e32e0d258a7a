"""Learned optical flow (``flownet-s``, ``flownet-c``, ``flownet-cs``) against classical flow, in one run.

Prints ONE JSON line. For every data set (``flow/middlebury``, ``flow/sintel`` clean and final,
``flow/mmflow-crops``) and every method, the mean over its cases of

* ``epe`` (end-point error, pixels, valid pixels), ``epe_noc`` / ``epe_occ`` (non-occluded / occluded
  valid pixels, where the data set has occlusion masks: Sintel, one mmflow crop), ``fl_all`` (percent
  of pixels with EPE > 3 px and > 5 % of the true length, KITTI) -- :func:`alignkit.metrics.flow_error_stats`;
* ``seconds``: wall time of the registration of one pair (image reading excluded; for the networks:
  normalisation, network, flow field; ``+refine`` adds the variational refinement).

Methods, all in this process with ``--threads`` threads:

* each trained model given as ``--model LABEL=RUNDIR`` (a run folder of ``alignkit train`` or a
  checkpoint file, e.g. ``flownet-c=runs/flownet-c``, ``flownet-c+ft=runs/flownet-c-ft``), alone and ``+refineK``
  (:func:`alignkit.register` with ``refine=K``: K iterations of the ``flow`` preset's variational stage
  on top of the network's flow), with the runner's default inference (coarse to fine, finest level 1.5x
  the frames); ``--single-scale`` adds a row ``LABEL@1x`` per model: the network once at the frames'
  size, as it was trained (``coarse_to_fine=False, scale=1``);
* ``alignkit:flow``: the classical ``flow`` preset (``--no-classical`` skips it: ~15-40 s a pair);
* ``opencv:dis``, ``opencv:farneback``: OpenCV through alignkit's peer adapters (the settings of
  ``alignkit evaluate``);
* ``tvl1``: OpenCV's ``DualTVL1OpticalFlow`` when this OpenCV has the contrib module, else
  scikit-image's ``optical_flow_tvl1`` (its defaults; named ``skimage:tvl1``).

``time_640x480``: per method, the median of 5 timed registrations (after one untimed) of one
synthetic 480x640 pair (:class:`alignkit.data.synthetic_flow.SyntheticFlowPairs`, seed 0): the issue's
speed target is "under 0.2 s per 640x480 pair on the 2-core CPU".

Also ``training``: per model, what its run folder's ``log.csv`` and ``config.json`` record (epochs,
seconds, mean pairs/s, pairs seen, data set, size, last validation EPE), and ``epe_ratio_vs`` the
EPE of each method divided by Farneback's and by the classical preset's, per data set.

Usage::

    python benchmarks/learned_flow.py --model flownet-c=RUN_C [--model ...] [--refine 20] [--refine-models flownet-c]
        [--threads 2]
        [--datasets flow/middlebury,flow/sintel,flow/mmflow-crops] [--no-classical] [--max-cases N]

If no flow data is found the script prints ``{"skipped": ...}`` and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

DATASETS = ("flow/middlebury", "flow/sintel", "flow/mmflow-crops")
#: the network once at the frames' size, as trained (the runner's inference options)
SINGLE_SCALE = {"coarse_to_fine": False, "scale": 1.0}


def _cases(names: list[str], max_cases: int | None) -> dict[str, list[Any]]:
    """Cases per reported data set (Sintel split into its clean and final passes)."""
    from alignkit.data.datasets import load_dataset
    from alignkit.errors import InputError

    out: dict[str, list[Any]] = {}
    for name in names:
        try:
            data = load_dataset(name)
        except InputError:
            continue
        for case_name in data.names:
            label = name
            if name == "flow/sintel":
                label = f"flow/sintel/{case_name.split('/')[0]}"
            out.setdefault(label, []).append(data[case_name])
    if max_cases:
        out = {k: v[:max_cases] for k, v in out.items()}
    return out


def _scores(flow_rc: np.ndarray, case: Any) -> dict[str, float]:
    from alignkit.metrics import flow_error_stats
    from alignkit.spatial import xy_from_flow

    stats = flow_error_stats(xy_from_flow(flow_rc), xy_from_flow(case.flow), case.valid, case.occluded)
    keys = ("epe", "epe_noc", "epe_occ", "fl_all")
    return {k: float(stats[k]) for k in keys if k in stats}


def _training(run: Path) -> dict[str, Any]:
    """What a run folder says about its training."""
    out: dict[str, Any] = {"run": str(run)}
    config = run / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        out.update({k: cfg.get(k) for k in ("method", "dataset", "size", "batch_size", "lr", "init_from",
                                              "method_options", "synthetic_length")})
    log = run / "log.csv"
    if log.is_file():
        rows = [r for r in csv.DictReader(log.open()) if r.get("seconds")]
        seconds = sum(float(r["seconds"]) for r in rows)
        pairs = sum(float(r["seconds"]) * float(r["pairs_per_s"]) for r in rows)
        out.update(epochs=len(rows), train_seconds=round(seconds, 1), pairs_seen=round(pairs),
                   pairs_per_s=round(pairs / seconds, 2) if seconds else None)
        last = [r for r in csv.DictReader(log.open()) if r.get("val_epe")]
        if last:
            out["val_epe_first"] = round(float(last[0]["val_epe"]), 4)
            out["val_epe_last"] = round(float(last[-1]["val_epe"]), 4)
    return out


def _tvl1() -> tuple[str, Any]:
    import cv2

    if hasattr(cv2, "optflow") and hasattr(cv2.optflow, "DualTVL1OpticalFlow_create"):
        tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()

        def run(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:  # uint8 grey -> (H, W, 2) x, y
            from alignkit.spatial import flow_from_xy

            return flow_from_xy(tvl1.calc(fixed, moving, None))

        return "opencv:tvl1", run
    from skimage.registration import optical_flow_tvl1

    def run_skimage(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
        # (row, column) displacement with reference(p) ~ moving(p + flow(p)): alignkit's flow
        return np.stack(optical_flow_tvl1(fixed.astype(np.float32) / 255.0, moving.astype(np.float32) / 255.0))

    return "skimage:tvl1", run_skimage


def _time_640x480(models: dict[str, Any], args: Any) -> dict[str, float]:
    """Median seconds of 5 registrations (after one untimed) of a synthetic 480x640 pair, per method."""
    import alignkit
    from alignkit.data.case import Case
    from alignkit.data.synthetic_flow import SyntheticFlowPairs
    from alignkit.evaluate.peers import PEERS
    from alignkit.image import Image

    item = SyntheticFlowPairs((480, 640), length=1, seed=0, per_epoch=False)[0]
    fixed, moving = Image.from_array(item["fixed"][0].numpy()), Image.from_array(item["moving"][0].numpy())
    runs: dict[str, Any] = {}
    for label, model in models.items():
        runs[label] = lambda model=model: alignkit.register(fixed, moving, method=model.method_name,
                                                            checkpoint=model, seed=0).flow()
        if args.single_scale:
            runs[f"{label}@1x"] = lambda model=model: alignkit.register(
                fixed, moving, method=model.method_name, checkpoint=model, seed=0, **SINGLE_SCALE).flow()
    if not args.no_peers:
        case = Case(name="synthetic-640x480", fixed=fixed, moving=moving, kind="flow")
        for peer in ("opencv:dis", "opencv:farneback"):
            runs[peer] = lambda peer=peer: PEERS[peer]().register(case, threads=args.threads)
    out: dict[str, float] = {}
    for name, run in runs.items():
        run()
        seconds = []
        for _ in range(5):
            started = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - started)
        out[name] = round(float(np.median(seconds)), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], metavar="LABEL=RUNDIR",
                        help="a trained flow model (run folder or checkpoint) and its label")
    parser.add_argument("--refine", type=int, default=20, help="refinement iterations of the +refine rows (0: none)")
    parser.add_argument("--refine-models", default=None,
                        help="comma-separated model labels that get a +refine row (default: every model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--max-cases", type=int, default=None, help="at most this many cases per data set")
    parser.add_argument("--no-classical", action="store_true", help="skip the classical flow preset")
    parser.add_argument("--no-peers", action="store_true", help="skip OpenCV and TV-L1")
    parser.add_argument("--single-scale", action="store_true",
                        help="also run each model once at the frames' size (no pyramid), as LABEL@1x")
    parser.add_argument("--no-timing", action="store_true", help="skip the 640x480 timing")
    args = parser.parse_args(argv)

    cases = _cases([d.strip() for d in args.datasets.split(",") if d.strip()], args.max_cases)
    if not cases:
        print(json.dumps({"benchmark": "learned_flow", "skipped": "no flow data found (set ALIGNKIT_DATA)"}))
        return 0

    import cv2
    import torch

    import alignkit
    from alignkit.evaluate.peers import PEERS
    from alignkit.evaluate.peers._common import grey_array, joint_uint8
    from alignkit.methods import load_model
    from alignkit.spatial import flow_from_world_map

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    # torch imports its compiler stack the first time an optimiser is built (seconds, once per process):
    # pay it here, not inside the first timed registration
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])

    models: dict[str, Any] = {}
    training: dict[str, Any] = {}
    for item in args.model:
        label, _, path = item.partition("=")
        if not path:
            parser.error(f"--model takes LABEL=RUNDIR, got {item!r}")
        models[label] = load_model(path)
        run = Path(path) if Path(path).is_dir() else Path(path).parent
        training[label] = {"method": models[label].method_name, **_training(run)}

    tvl1_name, tvl1 = _tvl1()
    results: dict[str, dict[str, list[dict[str, float]]]] = {}

    def record(dataset: str, method: str, scores: dict[str, float], seconds: float) -> None:
        results.setdefault(dataset, {}).setdefault(method, []).append({**scores, "seconds": seconds})

    for dataset, items in cases.items():
        for case in items:
            print(f"{dataset} {case.name}", file=sys.stderr, flush=True)  # progress
            for label, model in models.items():
                refined = args.refine_models is None or label in args.refine_models.split(",")
                for refine in sorted({0, args.refine if refined else 0}):
                    started = time.perf_counter()
                    result = alignkit.register(case.fixed, case.moving, method=model.method_name, checkpoint=model,
                                               refine=refine, seed=0)
                    flow = result.flow()
                    name = label if refine == 0 else f"{label}+refine{refine}"
                    record(dataset, name, _scores(flow, case), time.perf_counter() - started)
                if args.single_scale:
                    started = time.perf_counter()
                    flow = alignkit.register(case.fixed, case.moving, method=model.method_name, checkpoint=model,
                                             seed=0, **SINGLE_SCALE).flow()
                    record(dataset, f"{label}@1x", _scores(flow, case), time.perf_counter() - started)
            if not args.no_classical:
                started = time.perf_counter()
                flow = alignkit.register(case.fixed, case.moving, preset="flow", seed=0).flow()
                record(dataset, "alignkit:flow", _scores(flow, case), time.perf_counter() - started)
            if not args.no_peers:
                for peer in ("opencv:dis", "opencv:farneback"):
                    prediction = PEERS[peer]().register(case, threads=args.threads)
                    world = torch.as_tensor(prediction.world_map)[None]
                    flow = flow_from_world_map(world, case.fixed.grid)[0].numpy()
                    record(dataset, peer, _scores(flow, case), prediction.seconds)
                fixed_u8, moving_u8 = joint_uint8(grey_array(case.fixed), grey_array(case.moving))
                started = time.perf_counter()
                flow = tvl1(fixed_u8, moving_u8)
                record(dataset, tvl1_name, _scores(flow, case), time.perf_counter() - started)

    def mean(rows: list[dict[str, float]], key: str) -> float | None:
        values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
        return round(float(np.mean(values)), 4) if values else None

    table = {
        dataset: {method: {key: mean(rows, key) for key in ("epe", "epe_noc", "epe_occ", "fl_all", "seconds")}
                  for method, rows in methods.items()}
        for dataset, methods in results.items()
    }
    ratios: dict[str, Any] = {}
    for dataset, methods in table.items():
        for reference in ("opencv:farneback", "alignkit:flow"):
            base = (methods.get(reference) or {}).get("epe")
            if base:
                ratios.setdefault(dataset, {})[reference] = {
                    m: round(v["epe"] / base, 3) for m, v in methods.items() if v.get("epe") is not None}
    timing = {} if args.no_timing else _time_640x480(models, args)
    print(json.dumps({
        "benchmark": "learned_flow",
        "threads": args.threads,
        "refine_iterations": args.refine,
        "tvl1": tvl1_name,
        "cases": {dataset: [c.name for c in items] for dataset, items in cases.items()},
        "table": table,
        "epe_ratio_vs": ratios,
        "time_640x480": timing,
        "training": training,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
