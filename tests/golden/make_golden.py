"""Regenerate ``tests/golden/registration_golden.npz``: what the classical presets and a small VoxelMorph
model produce on fixed inputs and seeds, through the public API and the CLI only.

It was first run at commit 1116776 (before the method registry of issue 10), so
``tests/test_regression.py`` checks that the registry and the new learned contract did not change
any result. Rerun it only on purpose (a deliberate change of results), and say so in the commit:

    ALIGNKIT_COMPILED=0 python tests/golden/make_golden.py

(``ALIGNKIT_COMPILED=0``: the torch reference path of the greedy update, which ``tests/test_regression.py``
also runs; numba's compiled kernels are checked against it elsewhere.)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from phantoms import phantom

GOLDEN = HERE / "registration_golden.npz"
TINY_NET = {"features": [4, 8, 8]}


def volume(seed: int, shape: tuple[int, int, int] = (20, 24, 22)) -> np.ndarray:
    """A 3D ellipsoid with a few Gaussian blobs placed by ``seed``."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    centre = [n / 2 + rng.uniform(-1.5, 1.5) for n in shape]
    radius = [n / 3 for n in shape]
    body = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radius))
    image = 80.0 / (1.0 + np.exp((body - 1.0) * 6.0))
    for _ in range(4):
        c = [m + rng.uniform(-3, 3) for m in centre]
        image += rng.uniform(60, 150) * np.exp(-sum((g - x) ** 2 for g, x in zip(grids, c)) / (2 * 2.5**2))
    return image.astype(np.float32)


def cases(workdir: Path) -> dict[str, np.ndarray]:
    """Name -> array; every registration runs with seed 0 and one torch thread."""
    from PIL import Image as PILImage

    import alignkit
    from alignkit.cli import main

    torch.set_num_threads(1)
    out: dict[str, np.ndarray] = {}
    fixed2d, moving2d = phantom(0), phantom(1)
    for preset in ("default2d", "flow", "brain"):
        result = alignkit.register(fixed2d, moving2d, preset=preset, seed=0)
        out[f"classical_{preset}_2d"] = result.world_map()[0].numpy()
    result = alignkit.register(volume(0), volume(1), preset="brain", seed=0)
    out["classical_brain_3d"] = result.world_map()[0].numpy()

    folder = workdir / "phantoms"
    folder.mkdir()
    for k in range(4):
        PILImage.fromarray(phantom(k).astype(np.uint8)).save(folder / f"s{k}.png")
        labels = (phantom(k) > 40).astype(np.uint8) + (phantom(k) > 120)
        PILImage.fromarray(labels.astype(np.uint8)).save(folder / f"s{k}_seg.png")
    config = workdir / "train.json"
    config.write_text(json.dumps({
        "network": TINY_NET, "lr": 3e-3, "val_fraction": 0.25,
        "method_options": {"similarity": "lncc", "window": 5, "dice_weight": 0.5},
    }))
    run = workdir / "run"
    code = main(["train", "--dataset", str(folder), "-o", str(run), "--size", "32", "--epochs", "2",
                 "--batch-size", "2", "--config", str(config), "--device", "cpu", "--seed", "3", "--quiet"])
    assert code == 0
    log = np.genfromtxt(run / "log.csv", delimiter=",", names=True)
    out["voxelmorph_val_loss"] = np.asarray(log["val_loss"], dtype=np.float64)
    result = alignkit.register(fixed2d, moving2d, method="voxelmorph", checkpoint=str(run), seed=0)
    out["voxelmorph_2d"] = result.world_map()[0].numpy()
    result = alignkit.register(fixed2d, moving2d, method="voxelmorph", checkpoint=str(run), refine=5, seed=0)
    out["voxelmorph_refine5_2d"] = result.world_map()[0].numpy()
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        arrays = cases(Path(tmp))
    np.savez_compressed(GOLDEN, **arrays)
    print(json.dumps({"golden": str(GOLDEN), "arrays": {k: list(v.shape) for k, v in arrays.items()}}))


if __name__ == "__main__":
    main()
