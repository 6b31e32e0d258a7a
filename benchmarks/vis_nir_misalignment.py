"""Residual misalignment of the VIS-NIR pairs as ``alignkit.data.aligned`` loads them (test scenes through their
ground-truth affine, ``country`` through its ECC fit).

Per 64-px patch with texture: the shift (within ±4 px, 0.25-px steps) that maximises the correlation of the
blurred gradient magnitudes of the NIR and the grey RGB; patches whose best correlation is under 0.5 are not
counted. Per pair: the patch count and the median / mean shift length (px); per scene: the median of its pairs'
medians. What c2f's ``misalignment`` option is set from (session 14). Progress on stderr, ONE JSON line::

    python benchmarks/vis_nir_misalignment.py --scenes forest,indoor,field,mountain,country --pairs 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, log, set_threads

STEP, REACH, PATCH, STRIDE, MIN_CORRELATION = 0.25, 4.0, 64, 96, 0.5


def gradient_magnitude(image: Any) -> Any:
    import numpy as np
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(image, 1.0)
    return np.hypot(ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1))


def patch_shifts(fixed: Any, moving: Any, valid: Any) -> list[float]:
    """Best-shift lengths of the textured patches of one pair (module docstring)."""
    import numpy as np
    from scipy import ndimage

    gf, gm = gradient_magnitude(fixed), gradient_magnitude(moving)
    shifts = np.arange(-REACH, REACH + 1e-6, STEP)
    margin = int(np.ceil(REACH)) * 2
    height, width = fixed.shape
    out = []
    for y in range(margin, height - PATCH - margin, STRIDE):
        for x in range(margin, width - PATCH - margin, STRIDE):
            if not valid[y - margin : y + PATCH + margin, x - margin : x + PATCH + margin].all():
                continue
            a = gf[y : y + PATCH, x : x + PATCH]
            if a.std() < 0.02:
                continue
            a = (a - a.mean()) / a.std()
            window = gm[y - margin : y + PATCH + margin, x - margin : x + PATCH + margin]
            best, best_shift = -2.0, (0.0, 0.0)
            for dy in shifts:
                for dx in shifts:
                    b = ndimage.shift(window, (-dy, -dx), order=1)[margin : margin + PATCH, margin : margin + PATCH]
                    c = float((a * (b - b.mean()) / (b.std() + 1e-6)).mean())
                    if c > best:
                        best, best_shift = c, (dy, dx)
            if best > MIN_CORRELATION:
                out.append(float(np.hypot(*best_shift)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", default="forest,indoor,field,mountain,country")
    parser.add_argument("--pairs", type=int, default=20, help="the first N pairs of each scene")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    import numpy as np

    from alignkit.data.aligned import aligned_pairs

    scenes: dict[str, Any] = {}
    for scene in [s for s in args.scenes.split(",") if s]:
        rows = []
        for pair in aligned_pairs("vis-nir", subsets=[scene])[: args.pairs]:
            lengths = patch_shifts(pair.fixed[0].numpy(), pair.moving[0].numpy(), pair.valid[0].numpy())
            row = {"pair": pair.name, "patches": len(lengths),
                   "median_px": float(np.median(lengths)) if lengths else None,
                   "mean_px": float(np.mean(lengths)) if lengths else None}
            log(f"{pair.name:>14}: {row['patches']} patches, median {row['median_px']}, mean {row['mean_px']}")
            rows.append(row)
        medians = [r["median_px"] for r in rows if r["patches"] > 3]
        scenes[scene] = {"pairs": rows, "median_of_medians_px": float(np.median(medians)) if medians else None}
    emit({"benchmark": "vis_nir_misalignment", "step_px": STEP, "reach_px": REACH, "patch": PATCH, "scenes": scenes})


if __name__ == "__main__":
    main()
