"""Percentage of correct keypoints (PCK).

Definition (Zampieri et al., "Coarse to fine non-rigid registration: a chain of scale-specific
neural networks for multimodal image alignment with application to remote sensing", 2018, §4, after
Rocco et al.):
keypoints are carried by the registration and compared with their manually indicated positions; "if
this distance is smaller than a certain threshold, the keypoint is identified as matched". PCK is the
percentage of matched keypoints::

    PCK(τ) = 100 · |{i : ||p̂_i - p_i|| < τ}| / N

The threshold is either absolute (``threshold``: world units, i.e. pixels for photographs -- Zampieri et al. 2018's
Fig. 6 curves are in pixels) or relative, ``τ = alpha · reference_size`` (Rocco et al.'s PCK@α,
with ``reference_size`` the larger side of the image or object box, e.g. ``alpha=0.1``).

Points are ``(N, ndim)`` or ``(B, N, ndim)`` world coordinates (numpy or torch); batches are pooled.
A predicted point that is NaN/Inf (lost by the method) counts as not matched.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from alignkit.errors import InputError, ShapeError
from alignkit.metrics.overlap import to_numpy


def pck(
    predicted_points: Any,
    true_points: Any,
    *,
    threshold: float | None = None,
    alpha: float | None = None,
    reference_size: Any | None = None,
) -> float:
    """Percentage (0-100) of keypoints whose error is strictly below the threshold (module docstring).

    Give exactly one of ``threshold`` (world units) or ``alpha`` with ``reference_size`` (a scalar, or
    one value per batch item ``(B,)`` for ``(B, N, ndim)`` points). Returns a plain float.
    """
    pred = to_numpy(predicted_points, "predicted_points").astype(np.float64)
    true = to_numpy(true_points, "true_points").astype(np.float64)
    if pred.shape != true.shape or pred.ndim not in (2, 3) or pred.shape[-1] not in (2, 3):
        raise ShapeError(
            f"points must both be (N, ndim) or (B, N, ndim), same shape, got {pred.shape} and {true.shape}"
        )
    if pred.shape[-2] == 0:
        raise InputError("pck needs at least one keypoint")
    if not np.all(np.isfinite(true)):
        raise InputError("pck: true_points contain NaN or Inf")
    if threshold is not None and alpha is None:
        tau = np.asarray(float(threshold))
    elif alpha is not None and threshold is None:
        if reference_size is None:
            raise InputError("pck: alpha needs reference_size (e.g. max(H, W) of the image)")
        size = to_numpy(reference_size, "reference_size").astype(np.float64)
        if size.ndim > 1 or (size.ndim == 1 and (pred.ndim != 3 or size.shape[0] != pred.shape[0])):
            shape = size.shape
            raise ShapeError(f"reference_size must be a scalar, or (B,) for (B, N, ndim) points: {shape}")
        # one threshold per batch item, broadcast over its N points
        tau = float(alpha) * (size[:, None] if size.ndim == 1 else size)
    else:
        raise InputError("pck: give exactly one of threshold or alpha (with reference_size)")
    if not np.all(np.isfinite(tau)) or np.any(tau <= 0):
        raise InputError(f"pck: the threshold must be positive and finite, got {tau}")
    with np.errstate(invalid="ignore"):
        dist = np.sqrt(((pred - true) ** 2).sum(axis=-1))  # (N,) or (B, N); NaN where pred is lost
        correct = np.isfinite(dist) & (dist < tau)
    return float(correct.mean() * 100.0)
