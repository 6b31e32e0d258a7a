"""Image similarity as a reported number (``ncc_before`` / ``ncc_after`` of a registration).

Convention: one score over every selected voxel of every channel and batch item together,
computed in float64 (float32 sums lose the fourth decimal over a million voxels).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from alignkit.errors import ShapeError

#: voxels per chunk of :func:`ncc`'s passes (512 KiB of float64: memory the allocator reuses; 16k-voxel
#: chunks spent more in per-chunk dispatch than they saved)
_NCC_CHUNK = 1 << 16


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    try:
        return torch.as_tensor(value).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ShapeError(f"{name}: not an array ({exc})") from None


def ncc(a: Any, b: Any, mask: Any | None = None) -> float:
    """Global normalised cross-correlation of two images of one shape, in ``[-1, 1]``.

    ``a`` and ``b`` are numpy arrays or tensors of the same shape (e.g. ``(B, C, *S)``); ``mask``,
    when given, broadcasts to them and selects the voxels with ``mask > 0``. Returns 0.0 when
    either image is constant over the selection or nothing is selected. The correlation is
    :func:`alignkit.losses.similarity.global_ncc`'s (the :class:`~alignkit.losses.NCC` loss's) with 0/1
    weights, computed on the selected voxels by dot products (the reference it is tested against).
    """
    x, y = _as_tensor(a, "a"), _as_tensor(b, "b")
    if x.shape != y.shape:
        raise ShapeError(f"ncc: images must have one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    keep = None
    if mask is not None:
        m = _as_tensor(mask, "mask")
        try:
            keep = (m.expand_as(x) > 0).reshape(-1)
        except RuntimeError:
            raise ShapeError(f"ncc: mask {tuple(m.shape)} does not broadcast to {tuple(x.shape)}") from None
    x, y = x.reshape(-1), y.reshape(-1)
    # global_ncc's correlation with 0/1 weights, on the selected voxels: centred dot products (BLAS)
    # instead of weighted elementwise passes -- on a 741x500 RGB pair, one thread, ~15x faster; the
    # two agree to rounding (tests/test_metrics.py). Two passes (means, then centred products) over
    # chunks of _NCC_CHUNK voxels: the float64 temporaries of a whole image (~50 MB for 741x500 RGB)
    # were fresh memory on every call, and their page faults cost more than the arithmetic (compute_metrics
    # of the stereo preset: 2 x 31 ms in a registration against 2 x 12 ms on reused memory).
    chunks = []
    count, sum_x, sum_y = 0, 0.0, 0.0
    for start in range(0, x.numel(), _NCC_CHUNK):
        part_x, part_y = x[start : start + _NCC_CHUNK], y[start : start + _NCC_CHUNK]
        if keep is not None:
            part_keep = keep[start : start + _NCC_CHUNK]
            part_x, part_y = torch.masked_select(part_x, part_keep), torch.masked_select(part_y, part_keep)
        part_x, part_y = part_x.double(), part_y.double()
        chunks.append((part_x, part_y))
        count += part_x.numel()
        sum_x += float(part_x.sum())
        sum_y += float(part_y.sum())
    if count == 0:
        return 0.0
    mean_x, mean_y = sum_x / count, sum_y / count
    xx = yy = xy = 0.0
    for part_x, part_y in chunks:
        dx, dy = part_x - mean_x, part_y - mean_y
        xx += float(torch.dot(dx, dx))
        yy += float(torch.dot(dy, dy))
        xy += float(torch.dot(dx, dy))
    # the variance floor is global_ncc's: the smallest positive float64, exact for any real image, 0 (not
    # NaN) for a constant one
    var = max(xx * yy, torch.finfo(torch.float64).tiny)
    return xy / math.sqrt(var)
