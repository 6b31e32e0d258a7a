"""Rectified stereo (issue 16): alignkit's classical and learned stereo against OpenCV, in one run.

Prints ONE JSON line: per pair and method the disparity errors of :func:`alignkit.metrics.disparity_errors`
(``bad1``/``bad2``/``bad4``: share of ground-truth pixels whose disparity is missing or off by more
than 1/2/4 px -- holes count as errors; ``bad2_predicted`` among predicted pixels only; ``epe``: mean
|error| over predicted pixels; ``density``), the same on the pixels the ground truth shows visible
in both images (``nonocc_*``, :func:`alignkit.stereo.occlusion_from_disparity`), and the wall time;
then per pair the ratios of ``alignkit:stereo`` to OpenCV's ``StereoSGBM``.

Methods (every one given the same disparity range ``[0, ndisp]``):

* ``alignkit:stereo`` -- ``alignkit.register(left, right, preset="stereo", min_disparity=0,
  max_disparity=ndisp)``: census SGM (8 paths) + left-right check + variational refinement;
* ``alignkit:sgm`` -- :func:`alignkit.stereo.match` alone (the preset's start, no refinement), with the
  compiled kernels when numba is installed (``backend="auto"``);
* ``alignkit:sgm-torch`` -- the same with ``backend="torch"`` (the vectorised reference path);
* ``stereo-net`` -- ``alignkit.register(..., method="stereo-net", checkpoint=CKPT, ...)`` when
  ``--stereo-net CKPT`` is given (or the shipped model, with ``--stereo-net shipped``): the model's
  own matching cost, which for the shipped model is the learned + census hybrid (``census_weight``);
* ``stereo-net:network`` -- the same model with ``census_weight=0``: the network's cost alone (the
  shipped model trained on synthetic pairs and crops of ``motorcycle``, which is in-sample for it;
  ``aloe`` is its held-out pair and report-only: no setting of the network, its recipe or the hybrid's
  weight is chosen on it);
* ``stereo-volume`` -- ``alignkit.register(..., method="stereo-volume", checkpoint=CKPT, ...)`` when
  ``--stereo-volume CKPT`` is given (repeatable as ``NAME=CKPT`` to compare several runs);
* ``opencv:sgbm`` / ``opencv:sgbm-hh`` -- ``cv2.StereoSGBM`` as OpenCV's ``stereo_match.py`` sample
  sets it (blockSize 5, P1 = 8·3·5², P2 = 32·3·5², uniquenessRatio 10, speckle window 100 / range 32,
  disp12MaxDiff 1) in its default 5-path mode and in the full 8-path ``MODE_HH``; negative output = hole;
* ``opencv:bm`` -- ``cv2.StereoBM`` (blockSize 15, grey), negative output = hole;
* ``opencv:dis`` -- ``cv2.DISOpticalFlow`` (MEDIUM preset) as 2D flow; disparity = minus the flow's x.

Pairs: ``stereo/motorcycle`` at its size (741×500, ndisp 64) and ``stereo/aloe`` at **half**
resolution (641×555 of 1282×1110, images area-averaged, ground truth halved, ndisp 112) to keep the
CPU time sane; ``--full-aloe`` runs it at full size (ndisp 224). One thread everywhere
(torch, OpenCV) unless ``--threads``; ``--repeat N`` runs every method N times per pair and reports
the fastest (the methods are deterministic: the scores are those of every run). One-time costs are paid before the timers: alignkit's lazy
imports and the loading of numba's cached kernels (a tiny ``match`` and ``register`` on a 32x48 crop);
their seconds are reported as ``warmup_seconds``.

    python benchmarks/stereo.py [--data DIR] [--stereo-net CKPT|shipped] [--methods a,b] [--repeat N] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO_ROOT, emit, log, set_threads

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
METHODS = ("alignkit:stereo", "alignkit:sgm", "alignkit:sgm-torch", "stereo-net", "stereo-net:network", "opencv:sgbm",
           "opencv:sgbm-hh", "opencv:bm", "opencv:dis")


def load_pairs(data: Path, full_aloe: bool) -> list[dict[str, Any]]:
    """``{"name", "left", "right" (H, W, 3) uint8, "gt" (H, W) px with NaN unknown, "ndisp", "note"}``."""
    import cv2

    from alignkit.io.disparity import read_disparity

    pairs = []
    folder = data / "stereo" / "motorcycle"
    if folder.is_dir():
        left = cv2.imread(str(folder / "motorcycle_left.png"), cv2.IMREAD_COLOR)
        right = cv2.imread(str(folder / "motorcycle_right.png"), cv2.IMREAD_COLOR)
        gt, valid = read_disparity(folder / "motorcycle_disp.npz")
        pairs.append({"name": "motorcycle", "left": left, "right": right, "gt": np.where(valid, gt, np.nan),
                      "ndisp": 64, "note": "full size"})
    folder = data / "stereo" / "aloe"
    if folder.is_dir():
        left = cv2.imread(str(folder / "aloeL.jpg"), cv2.IMREAD_COLOR)
        right = cv2.imread(str(folder / "aloeR.jpg"), cv2.IMREAD_COLOR)
        gt, valid = read_disparity(folder / "aloeGT.png")
        gt = np.where(valid, gt, np.nan)
        ndisp, note = 224, "full size"
        if not full_aloe:
            size = (left.shape[1] // 2, left.shape[0] // 2)
            left = cv2.resize(left, size, interpolation=cv2.INTER_AREA)
            right = cv2.resize(right, size, interpolation=cv2.INTER_AREA)
            gt = gt[: 2 * size[1] : 2, : 2 * size[0] : 2] / 2.0  # nearest sample, in half-size pixels
            ndisp, note = 112, "half size (images area-averaged, ground truth subsampled and halved)"
        pairs.append({"name": "aloe", "left": left, "right": right, "gt": gt, "ndisp": ndisp, "note": note})
    return pairs


def warm_up(pair: dict[str, Any]) -> float:
    """Pay one-time costs outside the timers (lazy imports, numba's cached kernels); its seconds."""
    import alignkit
    from alignkit.image import Image
    from alignkit.stereo import match

    started = time.perf_counter()
    crop = [pair[k][:32, :48, ::-1].astype(np.float32) for k in ("left", "right")]
    match(crop[0].transpose(2, 0, 1), crop[1].transpose(2, 0, 1), min_disparity=0, max_disparity=8)
    alignkit.register(Image.from_array(crop[0]), Image.from_array(crop[1]), preset="stereo", min_disparity=0,
                      max_disparity=8)
    return time.perf_counter() - started


def run_method(method: str, pair: dict[str, Any], stereo_net: str | None,
               volumes: dict[str, str] | None = None) -> tuple[np.ndarray, np.ndarray | None, float]:
    """(disparity (H, W), predicted mask or None, seconds) of one method on one pair."""
    import cv2

    left, right, ndisp = pair["left"], pair["right"], int(pair["ndisp"])
    rgb_left, rgb_right = left[..., ::-1].astype(np.float32), right[..., ::-1].astype(np.float32)
    if method.startswith("stereo-volume"):
        import alignkit
        from alignkit.image import Image

        started = time.perf_counter()
        result = alignkit.register(Image.from_array(rgb_left), Image.from_array(rgb_right), method="stereo-volume",
                                   checkpoint=(volumes or {})[method], min_disparity=0, max_disparity=ndisp)
        disparity, _ = result.disparity()
        return disparity, None, time.perf_counter() - started
    if method in ("alignkit:stereo", "stereo-net", "stereo-net:network"):
        import alignkit
        from alignkit.image import Image

        options: dict[str, Any] = {"preset": "stereo"} if method == "alignkit:stereo" else {
            "method": "stereo-net", **({} if stereo_net in (None, "shipped") else {"checkpoint": stereo_net}),
            **({"census_weight": 0.0} if method == "stereo-net:network" else {})}
        started = time.perf_counter()
        result = alignkit.register(Image.from_array(rgb_left), Image.from_array(rgb_right), min_disparity=0,
                                   max_disparity=ndisp, **options)
        disparity, _ = result.disparity()
        return disparity, None, time.perf_counter() - started
    if method in ("alignkit:sgm", "alignkit:sgm-torch"):
        from alignkit.stereo import match

        backend = "torch" if method.endswith("-torch") else "auto"
        started = time.perf_counter()
        out = match(rgb_left.transpose(2, 0, 1), rgb_right.transpose(2, 0, 1), min_disparity=0, max_disparity=ndisp,
                    backend=backend)
        return out.disparity.numpy(), None, time.perf_counter() - started
    grey_left, grey_right = cv2.cvtColor(left, cv2.COLOR_BGR2GRAY), cv2.cvtColor(right, cv2.COLOR_BGR2GRAY)
    if method.startswith("opencv:sgbm"):
        block = 5
        mode = cv2.STEREO_SGBM_MODE_HH if method.endswith("-hh") else cv2.STEREO_SGBM_MODE_SGBM
        matcher = cv2.StereoSGBM_create(minDisparity=0, numDisparities=ndisp, blockSize=block,
                                        P1=8 * 3 * block**2, P2=32 * 3 * block**2, disp12MaxDiff=1,
                                        uniquenessRatio=10, speckleWindowSize=100, speckleRange=32, mode=mode)
        started = time.perf_counter()
        raw = matcher.compute(left, right)
        seconds = time.perf_counter() - started
        disparity = raw.astype(np.float32) / 16.0
        return disparity, raw >= 0, seconds
    if method == "opencv:bm":
        matcher = cv2.StereoBM_create(numDisparities=ndisp, blockSize=15)
        started = time.perf_counter()
        raw = matcher.compute(grey_left, grey_right)
        seconds = time.perf_counter() - started
        return raw.astype(np.float32) / 16.0, raw >= 0, seconds
    if method == "opencv:dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        started = time.perf_counter()
        flow = dis.calc(grey_left, grey_right, None)
        seconds = time.perf_counter() - started
        return -flow[..., 0], None, seconds
    raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--methods", default=",".join(m for m in METHODS if not m.startswith("stereo-net")))
    parser.add_argument("--stereo-net", default=None, help="a stereo-net checkpoint (file or run folder), or 'shipped'")
    parser.add_argument("--stereo-volume", action="append", default=[],
                        help="a stereo-volume checkpoint, or NAME=CKPT (repeatable; scored as stereo-volume[:NAME])")
    parser.add_argument("--full-aloe", action="store_true")
    parser.add_argument("--pairs", default=None, help="comma-separated pair names (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each method N times on each pair and report the fastest (timing on a loaded machine)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    import cv2
    import torch

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    from alignkit.metrics import disparity_errors
    from alignkit.stereo import occlusion_from_disparity

    pairs = load_pairs(args.data, args.full_aloe)
    if args.pairs:
        pairs = [p for p in pairs if p["name"] in args.pairs.split(",")]
    if not pairs:
        emit({"benchmark": "stereo", "status": "skipped", "reason": f"no stereo pairs under {args.data}"}, args.out)
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.stereo_net and "stereo-net" not in methods:
        methods.append("stereo-net")
    volumes: dict[str, str] = {}
    for spec in args.stereo_volume:
        name, _, path = spec.rpartition("=")
        volumes[f"stereo-volume:{name}" if name else "stereo-volume"] = path
    methods += [m for m in volumes if m not in methods]
    from alignkit.stereo import compiled

    warmup = round(warm_up(pairs[0]), 3)
    results: dict[str, Any] = {}
    for pair in pairs:
        gt = pair["gt"]
        visible = ~occlusion_from_disparity(gt, np.isfinite(gt))
        rows: dict[str, Any] = {"size": [int(gt.shape[1]), int(gt.shape[0])], "ndisp": pair["ndisp"],
                                "note": pair["note"]}
        for method in methods:
            log(f"{pair['name']}: {method}")
            disparity, predicted, seconds = run_method(method, pair, args.stereo_net, volumes)
            for _ in range(args.repeat - 1):  # deterministic methods: the same output, the fastest time
                seconds = min(seconds, run_method(method, pair, args.stereo_net, volumes)[2])
            scores = disparity_errors(disparity, gt, predicted=predicted)
            nonocc = disparity_errors(disparity, gt, predicted=predicted, mask=visible)
            rows[method] = {**{k: round(v, 4) for k, v in scores.items() if k != "pixels"},
                            **{f"nonocc_{k}": round(nonocc[k], 4) for k in ("bad2", "epe")},
                            "seconds": round(seconds, 3)}
            log(f"  {rows[method]}")
        base, ours = rows.get("opencv:sgbm"), rows.get("alignkit:stereo")
        if base and ours:
            rows["ratios_vs_opencv_sgbm"] = {"bad2": round(ours["bad2"] / max(base["bad2"], 1e-9), 3),
                                             "seconds": round(ours["seconds"] / max(base["seconds"], 1e-9), 2)}
            for name, key in (("alignkit:sgm", "sgm_seconds"), ("alignkit:sgm-torch", "sgm_torch_seconds")):
                if rows.get(name):
                    rows["ratios_vs_opencv_sgbm"][key] = round(rows[name]["seconds"] / max(base["seconds"], 1e-9), 2)
            hh = rows.get("opencv:sgbm-hh")
            if hh:
                rows["ratios_vs_opencv_sgbm_hh"] = {
                    name: round(rows[name]["seconds"] / max(hh["seconds"], 1e-9), 2)
                    for name in ("alignkit:stereo", "alignkit:sgm", "alignkit:sgm-torch") if rows.get(name)}
        results[pair["name"]] = rows
    emit({"benchmark": "stereo", "threads": args.threads, "repeat": args.repeat, "stereo_net": args.stereo_net, "stereo_volume": volumes,
          "numba": compiled.available(), "warmup_seconds": warmup,
          "commit": os.popen(f"git -C {REPO_ROOT} rev-parse --short HEAD").read().strip(), "pairs": results}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
