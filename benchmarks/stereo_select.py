"""Score ``stereo-net`` candidates on the *selection* pairs only -- never on ``stereo/aloe``.

Choosing between trained stereo-net models must not look at the held-out pair that the issue's
target is measured on (``benchmarks/stereo.py`` and ``ship_stereo_net.py`` score it). This script
scores each model on:

* ``stereo/motorcycle`` (full size, range 0..64; the recipe's real training pair: in-sample);
* ``--synthetic`` held-out synthetic pairs, 192x320, rendered by
  :func:`alignkit.data.synthetic_stereo.render_stereo_pair` from scikit-image's photographs with the
  seed stream ``[30000, k]`` (the training and validation streams are other seeds), disparities
  up to 48 px, 1-4 foreground layers, slopes up to 0.02 px/px (the renderer keeps every
  disparity inside the range, so steeper planes do not fit a 192x320 image at 48 px), range 0..48.

For each model, the network's cost alone (``census_weight=0``) and the hybrid (``census_weight`` 0.5)
through the public API, plus the classical census matcher on the same pairs. Bad-2 over every
ground-truth pixel (missing counts as wrong), EPE; synthetic figures are means over the pairs.

Prints ONE JSON line.

    python benchmarks/stereo_select.py --model E=shipped --model G1=RUN1 --model G2=RUN2 [--synthetic 6]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_DATA, emit, log, set_threads

SELECTION_SEED = 30000


def synthetic_pairs(count: int) -> list[dict[str, Any]]:
    """The held-out synthetic selection pairs in ``benchmarks/stereo.py``'s pair format (BGR uint8)."""
    from alignkit.data.synthetic_stereo import render_stereo_pair, training_photographs

    shape, max_disparity = (192, 320), 48
    photos = [p for p in training_photographs() if p.shape[1] >= shape[0] and p.shape[2] >= shape[1] + max_disparity]
    pairs = []
    for k in range(count):
        rng = np.random.default_rng([SELECTION_SEED, k])
        scene = render_stereo_pair(photos[k % len(photos)], shape, rng=rng, max_disparity=max_disparity,
                                   layers=int(rng.integers(1, 5)), slant=0.02)

        def bgr(image: np.ndarray) -> np.ndarray:
            rgb = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image
            return np.ascontiguousarray(np.clip(rgb.transpose(1, 2, 0)[..., ::-1], 0, 255).round().astype(np.uint8))

        pairs.append({"name": f"synthetic{k}", "left": bgr(scene.left), "right": bgr(scene.right),
                      "gt": scene.disparity.astype(np.float64), "ndisp": max_disparity, "note": "held-out synthetic"})
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="NAME=RUN_DIR or NAME=shipped (repeatable)")
    parser.add_argument("--synthetic", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    from stereo import load_pairs, run_method

    from alignkit.metrics import disparity_errors

    models = dict(spec.split("=", 1) for spec in args.model) or {"shipped": "shipped"}
    pairs = [p for p in load_pairs(DEFAULT_DATA, full_aloe=False) if p["name"] == "motorcycle"] + synthetic_pairs(args.synthetic)
    methods = [("census", "alignkit:sgm", None)] + [
        (f"{name}:{variant}", method, run) for name, run in models.items()
        for variant, method in (("network", "stereo-net:network"), ("hybrid", "stereo-net"))]
    scores: dict[str, dict[str, list[dict[str, float]]]] = {label: {} for label, _, _ in methods}
    for pair in pairs:
        group = "motorcycle" if pair["name"] == "motorcycle" else "synthetic"
        for label, method, run in methods:
            disparity, predicted, _ = run_method(method, pair, run)
            errors = disparity_errors(disparity, pair["gt"], predicted=predicted)
            scores[label].setdefault(group, []).append({k: float(errors[k]) for k in ("bad2", "epe")})
            log(f"{pair['name']} {label}: bad2 {errors['bad2']:.4f} epe {errors['epe']:.3f}")
    table = {label: {group: {k: round(float(np.mean([r[k] for r in rows])), 4) for k in ("bad2", "epe")}
                     for group, rows in groups.items()} for label, groups in scores.items()}
    emit({"benchmark": "stereo_select", "synthetic_pairs": args.synthetic, "seed_stream": SELECTION_SEED,
          "models": models, "scores": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
