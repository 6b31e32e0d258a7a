"""Image similarity as a reported number (``ncc_before`` / ``ncc_after`` of a registration).

Convention: one score over every selected voxel of every channel and batch item together,
computed in float64 (float32 sums lose the fourth decimal over a million voxels).
"""

from __future__ import annotations

from typing import Any

import torch

from alignkit.errors import ShapeError
from alignkit.losses.similarity import global_ncc


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    try:
        return torch.as_tensor(value).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ShapeError(f"{name}: not an array ({exc})") from None


def ncc(a: Any, b: Any, mask: Any | None = None) -> float:
    """Global normalised cross-correlation of two images of one shape, in ``[-1, 1]``.

    ``a`` and ``b`` are numpy arrays or tensors of the same shape (e.g. ``(B, C, *S)``); ``mask``,
    when given, broadcasts to them and selects the voxels with ``mask > 0``. Returns 0.0 when
    either image is constant over the selection or nothing is selected. The correlation itself is
    :func:`alignkit.losses.similarity.global_ncc` (the :class:`~alignkit.losses.NCC` loss's).
    """
    x, y = _as_tensor(a, "a").double(), _as_tensor(b, "b").double()
    if x.shape != y.shape:
        raise ShapeError(f"ncc: images must have one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if mask is None:
        weights = None
    else:
        m = _as_tensor(mask, "mask")
        try:
            m = m.expand_as(x)
        except RuntimeError:
            raise ShapeError(f"ncc: mask {tuple(m.shape)} does not broadcast to {tuple(x.shape)}") from None
        weights = (m > 0).double().reshape(1, 1, -1)
        if not bool(weights.any()):
            return 0.0
    # the smallest positive float64 as the variance floor: exact for any real image, 0 (not NaN)
    # for a constant one, whose covariance is exactly 0
    score = global_ncc(x.reshape(1, 1, -1), y.reshape(1, 1, -1), weights, eps=torch.finfo(torch.float64).tiny)
    return float(score[0, 0])
