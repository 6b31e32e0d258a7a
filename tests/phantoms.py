"""Small synthetic 'anatomies' shared by the learning tests (plain module: test files import it)."""

from __future__ import annotations

import numpy as np


def _draw(seed: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    cy, cx = shape[0] / 2 + rng.uniform(-2, 2), shape[1] / 2 + rng.uniform(-2, 2)
    body = 1.0 / (1.0 + np.exp(((rows - cy) / 15) ** 2 + ((cols - cx) / 17) ** 2 - 1.0) * 8.0)
    image = 80.0 * body
    centres = []
    for _ in range(4):
        y, x = cy + rng.uniform(-9, 9), cx + rng.uniform(-10, 10)
        image += rng.uniform(60, 150) * np.exp(-((rows - y) ** 2 + (cols - x) ** 2) / (2 * rng.uniform(2, 4) ** 2))
        centres.append((y, x))
    return np.clip(image, 0, 255).astype(np.float32), np.asarray(centres)


def phantom(seed: int, shape: tuple[int, int] = (40, 44)) -> np.ndarray:
    """An ellipse with a few Gaussian blobs inside, placed by ``seed``; float32 in [0, 255]."""
    return _draw(seed, shape)[0]


def phantom_blob_centres(seed: int, shape: tuple[int, int] = (40, 44)) -> np.ndarray:
    """The (row, column) voxel centres of the four blobs of :func:`phantom` ``(seed, shape)``: landmarks."""
    return _draw(seed, shape)[1]
