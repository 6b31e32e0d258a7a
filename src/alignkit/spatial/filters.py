"""Separable filters written once for any number of spatial dimensions.

Every filter is applied one axis at a time with a 1D kernel, so its cost grows with the kernel
length, not with its volume (a 9^3 window costs 27 taps per voxel, not 729).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_SHIFT_ADD_MAX_TAPS = 9
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _per_axis(value: float | Sequence[float], ndim: int) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * ndim
    values = [float(v) for v in value]
    if len(values) != ndim:
        raise ValueError(f"expected one value or {ndim} values, got {len(values)}")
    return values


def gaussian_kernel1d(sigma: float, *, truncate: float = 3.0, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Normalised 1D Gaussian sampled at integer offsets, radius ``ceil(truncate * sigma)``."""
    radius = max(1, math.ceil(truncate * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / max(sigma, 1e-8)) ** 2)
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def separable_filter(x: Tensor, kernels: Sequence[Tensor | None], *, padding_mode: str = "replicate") -> Tensor:
    """Filter ``x (B, C, *S)`` with one odd-length 1D kernel per spatial axis (``None`` skips the axis)."""
    ndim = x.dim() - 2
    batch, channels = x.shape[:2]
    out = x.reshape(batch * channels, 1, *x.shape[2:])
    for axis, kernel in enumerate(kernels):
        if kernel is None or kernel.numel() == 1:
            continue
        radius = kernel.numel() // 2
        radius = min(radius, out.shape[2 + axis] - 1) if padding_mode == "reflect" else radius
        kernel = kernel.to(dtype=out.dtype, device=out.device)
        if kernel.numel() // 2 != radius:  # reflect padding cannot exceed the axis length
            centre = kernel.numel() // 2
            kernel = kernel[centre - radius : centre + radius + 1]
        shape = [1, 1] + [1] * ndim
        shape[2 + axis] = kernel.numel()
        pad = [0, 0] * ndim
        pad[2 * (ndim - 1 - axis)] = radius
        pad[2 * (ndim - 1 - axis) + 1] = radius
        if padding_mode == "zeros":
            padded = F.pad(out, pad)
        else:
            padded = F.pad(out, pad, mode=padding_mode)
        if kernel.numel() <= _SHIFT_ADD_MAX_TAPS:
            # Short kernels as a weighted sum of shifted views: plain elementwise work, measured
            # ~8x faster on CPU than a (k,1,1) convolution, which vectorises poorly.
            size = out.shape[2 + axis]
            weights = kernel.tolist()
            acc = padded.narrow(2 + axis, 0, size) * weights[0]
            for tap in range(1, len(weights)):
                acc = acc + padded.narrow(2 + axis, tap, size) * weights[tap]
            out = acc
        else:
            out = _CONV[ndim](padded, kernel.view(shape))
    return out.reshape(batch, channels, *out.shape[2:])


def gaussian_blur(x: Tensor, sigma: float | Sequence[float], *, truncate: float = 3.0) -> Tensor:
    """Gaussian smoothing of ``x (B, C, *S)``; ``sigma`` in voxels, per axis or shared. 0 skips an axis."""
    ndim = x.dim() - 2
    sigmas = _per_axis(sigma, ndim)
    kernels = [gaussian_kernel1d(s, truncate=truncate, dtype=x.dtype, device=x.device) if s > 0 else None for s in sigmas]
    return separable_filter(x, kernels, padding_mode="replicate")


def box_sum(x: Tensor, window: int | Sequence[int]) -> Tensor:
    """Sum of ``x (B, C, *S)`` over a centred odd window (zero padding), same output size.

    Used for local statistics (LNCC). Each axis is a running sum (cumulative sum, then the
    difference of two shifted copies), so the cost does not depend on the window length:
    measured ~10x faster than pooling or a separable convolution for a 7^3 window on 3D volumes.
    The running sum is accumulated in float64 so differences of large partial sums stay exact
    to float32 precision on long axes.
    """
    ndim = x.dim() - 2
    windows = [int(w) | 1 for w in _per_axis(window, ndim)]
    out = x
    for axis, w in enumerate(windows):
        if w <= 1:
            continue
        dim = 2 + axis
        radius = w // 2
        pad = [0, 0] * ndim
        pad[2 * (ndim - 1 - axis)] = radius + 1
        pad[2 * (ndim - 1 - axis) + 1] = radius
        running = torch.cumsum(F.pad(out, pad).double(), dim=dim)
        size = out.shape[dim]
        upper = running.narrow(dim, w, size)
        lower = running.narrow(dim, 0, size)
        out = (upper - lower).to(x.dtype)
    return out


def median_filter_reference(x: Tensor, window: int) -> Tensor:
    """Median of every centred ``window``-wide cube of ``x (B, C, *S)``, channel by channel, edges
    replicated: the plain implementation (any dimension, window, device) :func:`median_filter`
    must agree with."""
    ndim = x.dim() - 2
    half = window // 2
    patches = F.pad(x, (half,) * (2 * ndim), mode="replicate")
    for axis in range(2, 2 + ndim):
        patches = patches.unfold(axis, window, 1)
    return patches.flatten(2 + ndim).median(-1).values


def median_filter(x: Tensor, window: int) -> Tensor:
    """:func:`median_filter_reference`, through OpenCV's ``medianBlur`` when it applies: 2D float32
    on the CPU with a 3 or 5 window (the sizes its float path has; it replicates edges too, and an
    odd count of values has one median, so both give the same numbers). torch's median over
    unfolded windows sorts 25 copies of the image: ~0.2 s for a 2-channel 640x480 flow here, against
    a few ms for OpenCV's dedicated 5x5 kernel (``benchmarks/presets2d.py`` times the flow preset
    that calls it once)."""
    if window % 2 == 0 or window < 1:
        raise ValueError(f"the median window must be odd and positive, got {window}")
    if window == 1:
        return x.clone()
    if x.dim() == 4 and window in (3, 5) and x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad:
        try:
            import cv2
        except ImportError:
            cv2 = None
        if cv2 is not None:
            import numpy as np

            planes = x.detach().reshape(-1, *x.shape[2:]).contiguous().numpy()
            out = np.stack([cv2.medianBlur(plane, window) for plane in planes])
            return torch.from_numpy(out).reshape(x.shape)
    return median_filter_reference(x, window)
