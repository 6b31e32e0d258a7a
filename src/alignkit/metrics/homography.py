"""Homography (and affine) accuracy: mean corner error, success rates, point warping error.

Conventions
-----------
* Matrices are ``(ndim + 1, ndim + 1)`` homogeneous matrices (numpy or torch) mapping points of the
  first image to the second -- in alignkit, fixed world → moving world (``Case.matrix``); projective
  matrices are divided by the last coordinate. For a photograph the world frame is the pixel frame:
  ``x`` = column, ``y`` = row, **pixel centres on integers**.
* **Corners** are the centres of the corner pixels, ``(0, 0), (W-1, 0), (W-1, H-1), (0, H-1)`` (the
  convention of the HPatches homography-estimation benchmark as run by DeTone et al., SuperPoint,
  and of :func:`alignkit.evaluate.scoring.score_case`); pass ``corners`` for any other set (e.g. the
  8 corner voxels of a 3D grid in world coordinates).
* **Mean corner error** = mean over the corners of ``||H_pred(c) - H_true(c)||`` (pixels / world
  units). A pair is a **success** at threshold ``t`` when its corner error is ``<= t``; the success
  rate at ``t`` (1, 3, 5 px by default) is the fraction of pairs that succeed.
* Dong et al., "Learning to Align Images using Weak Geometric Supervision" (3DV 2018, §6.1.2)
  reports instead a "homography error ... equal to the average warping error of the true feature
  matches under the estimated homography, after normalizing the error by the image size":
  :func:`homography_point_error`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from alignkit.errors import InputError, ShapeError
from alignkit.metrics.overlap import to_numpy


def _matrices(matrix: Any, name: str) -> np.ndarray:
    """``(B, n+1, n+1)`` float64 from one matrix or a batch."""
    values = to_numpy(matrix, name).astype(np.float64)
    if values.ndim == 2:
        values = values[None]
    if values.ndim != 3 or values.shape[1] != values.shape[2] or values.shape[1] not in (3, 4):
        raise ShapeError(f"{name} must be (3, 3) / (4, 4) or a batch (B, n, n) of them, got {values.shape}")
    if not np.all(np.isfinite(values)):
        raise InputError(f"{name} contains NaN or Inf")
    return values


def _apply(matrices: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``(B, n+1, n+1)`` applied to ``(K, n)`` points -> ``(B, K, n)``; inf where ``w == 0``."""
    ndim = points.shape[1]
    homogeneous = np.concatenate([points, np.ones((points.shape[0], 1))], axis=1)
    out = np.einsum("bij,kj->bki", matrices, homogeneous)
    with np.errstate(divide="ignore", invalid="ignore"):
        return out[..., :ndim] / out[..., ndim:]


def image_corners(width: float, height: float) -> np.ndarray:
    """The four pixel-centre corners ``(0, 0), (W-1, 0), (W-1, H-1), (0, H-1)`` as ``(4, 2)`` ``(x, y)``."""
    if width < 1 or height < 1:
        raise InputError(f"image size must be at least 1x1, got {width}x{height}")
    w, h = float(width) - 1.0, float(height) - 1.0
    return np.array([[0.0, 0.0], [w, 0.0], [w, h], [0.0, h]])


def _corner_distances(
    h_pred: Any, h_true: Any, width: float | None, height: float | None, corners: Any | None
) -> np.ndarray:
    pred = _matrices(h_pred, "H_pred")
    true = _matrices(h_true, "H_true")
    if pred.shape != true.shape:
        raise ShapeError(f"H_pred {pred.shape} and H_true {true.shape} must have the same shape")
    if corners is not None:
        points = to_numpy(corners, "corners").astype(np.float64)
    elif width is not None and height is not None:
        points = image_corners(width, height)
    else:
        raise InputError("corner_error needs width and height, or corners")
    if points.ndim != 2 or points.shape[1] != pred.shape[1] - 1 or points.shape[0] == 0:
        raise ShapeError(f"corners must be (K, {pred.shape[1] - 1}), got {points.shape}")
    with np.errstate(invalid="ignore"):
        dist = np.sqrt(((_apply(pred, points) - _apply(true, points)) ** 2).sum(axis=-1))
    # a corner sent to infinity (w == 0) by the prediction is an infinitely bad estimate, not a NaN
    return np.where(np.isnan(dist), np.inf, dist)


def corner_error(
    H_pred: Any,
    H_true: Any,
    width: float | None = None,
    height: float | None = None,
    *,
    corners: Any | None = None,
) -> float:
    """Mean corner error of one estimated homography (module conventions): a plain float.

    ``H_pred`` and ``H_true`` are ``(3, 3)`` (or ``(4, 4)`` with 3D ``corners``); the corners are the
    pixel-centre corners of a ``width`` x ``height`` image unless ``corners`` ``(K, ndim)`` is given.
    """
    dist = _corner_distances(H_pred, H_true, width, height, corners)
    if dist.shape[0] != 1:
        raise ShapeError("corner_error takes one pair of matrices; use corner_errors for a batch")
    return float(dist[0].mean())


def corner_errors(
    H_pred: Any,
    H_true: Any,
    width: float | None = None,
    height: float | None = None,
    *,
    corners: Any | None = None,
) -> list[float]:
    """:func:`corner_error` of each pair of a batch ``(B, 3, 3)`` (all on images of the same size)."""
    return [float(d.mean()) for d in _corner_distances(H_pred, H_true, width, height, corners)]


def success_rates(
    errors: Iterable[float] | Any, thresholds: Sequence[float] = (1.0, 3.0, 5.0)
) -> dict[str, float]:
    """Fraction (0-1) of pairs whose error is ``<= t`` for each threshold ``t``: ``{"1px": ..., ...}``.

    Keys are ``f"{t:g}px"``. A NaN or infinite error (a failed estimate) counts as a failure, so the
    denominator is every pair given. ``nan`` for every threshold when ``errors`` is empty.
    """
    # arrays and tensors as they are; any other iterable (a generator, a list) through a list
    source = errors if hasattr(errors, "shape") else list(errors)
    values = to_numpy(source, "errors").astype(np.float64).reshape(-1)
    out: dict[str, float] = {}
    for t in thresholds:
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(values) & (values <= float(t))
        out[f"{float(t):g}px"] = float(ok.mean()) if values.size else math.nan
    return out


def homography_point_error(
    H_pred: Any,
    points_a: Any,
    points_b: Any,
    *,
    image_size: float | None = None,
) -> float:
    """Dong et al. 2018's homography error (§6.1.2): mean ``||H_pred(a_i) - b_i||`` over true matches.

    ``points_a`` / ``points_b`` are ``(N, ndim)`` corresponding points of the two images (``b_i`` is
    the true match of ``a_i``). Dong et al. 2018 normalises "by the image size"; pass that size (e.g. ``max(W, H)``)
    as ``image_size`` to get the normalised figure, else the error is in pixels / world units.
    """
    pred = _matrices(H_pred, "H_pred")
    a = to_numpy(points_a, "points_a").astype(np.float64)
    b = to_numpy(points_b, "points_b").astype(np.float64)
    if pred.shape[0] != 1:
        raise ShapeError("homography_point_error takes one matrix")
    if a.ndim != 2 or a.shape != b.shape or a.shape[1] != pred.shape[1] - 1 or a.shape[0] == 0:
        raise ShapeError(f"points must both be (N >= 1, {pred.shape[1] - 1}), got {a.shape} and {b.shape}")
    with np.errstate(invalid="ignore"):
        dist = np.sqrt(((_apply(pred, a)[0] - b) ** 2).sum(axis=-1))
    error = float(np.where(np.isnan(dist), np.inf, dist).mean())
    if image_size is not None:
        if not image_size > 0:
            raise InputError(f"image_size must be positive, got {image_size}")
        error /= float(image_size)
    return error
