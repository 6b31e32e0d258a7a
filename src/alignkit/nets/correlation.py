"""FlowNet correlation layer (cost volume), 2D and 3D (after Dosovitskiy et al.,
FlowNet: Learning Optical Flow with Convolutional Networks, ICCV 2015; §2.1 of the deep-learning
registration survey).

For feature maps ``f1, f2`` the correlation of a point ``x`` with displacement ``d`` is

    c(x, d) = 1 / (C * P) * sum_{a in [-k, k]^n} < f1(x + a), f2(x + d + a) >,

with ``P = (2k + 1)^n`` the patch volume (``patch_size = 2k + 1``; FlowNetC uses ``k = 0``) and
``C`` the channel count: FlowNet's Caffe layer divides by exactly ``C * P`` so that the values
do not grow with the feature width. ``d`` runs over ``[-D, D]^n`` in steps of ``stride``
(``D = max_displacement``), and ``f2`` is zero outside its grid.

Convention: output ``(B, (2r + 1)^n, *S)`` with ``r = D // stride``; channel ``c`` is the
displacement ``d = stride * (i_0 - r, ..., i_{n-1} - r)`` in **array-axis order** (voxels), with
``c = ravel_multi_index((i_0, ..., i_{n-1}))`` -- the last axis varies fastest, as
``itertools.product`` and ``torch.meshgrid(indexing="ij")`` enumerate.

Written as shift-and-multiply: one channel-summed product per displacement on a zero-padded
``f2``, then a box mean for ``k > 0``. It needs no custom kernel, runs anywhere PyTorch runs, and
holds only one product at a time (an unfold would materialise all ``(2r+1)^n`` shifted copies).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignkit.errors import ConfigError, ShapeError
from alignkit.nets.registry import register_network

_AVG_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}


def correlation_displacements(max_displacement: int, stride: int, ndim: int) -> Tensor:
    """The displacements of the output channels, ``(K, ndim)`` int64, array-axis order, in voxels."""
    r = max_displacement // stride
    offsets = range(-r * stride, r * stride + 1, stride)
    return torch.tensor(list(itertools.product(offsets, repeat=ndim)), dtype=torch.int64)


def correlation(
    f1: Tensor,
    f2: Tensor,
    max_displacement: int,
    stride: int = 1,
    *,
    patch_size: int = 1,
) -> Tensor:
    """FlowNet cost volume of ``f1, f2 (B, C, *S)`` (2D or 3D): ``(B, (2 * (D // stride) + 1)^n, *S)``.

    See the module docstring for the formula, the normalisation by ``C * patch_size^n`` and the
    channel order. Differentiable in both inputs; no parameters."""
    if f1.shape != f2.shape:
        raise ShapeError(
            f"correlation: f1 {tuple(f1.shape)} and f2 {tuple(f2.shape)} must have the same shape"
        )
    ndim = f1.dim() - 2
    if ndim not in (2, 3):
        raise ShapeError(f"correlation: expected (B, C, H, W) or (B, C, D, H, W), got {tuple(f1.shape)}")
    if max_displacement < 0 or stride < 1 or patch_size < 1 or patch_size % 2 == 0:
        raise ConfigError(
            f"correlation: need max_displacement >= 0, stride >= 1 and an odd patch_size, got "
            f"{max_displacement}, {stride}, {patch_size}"
        )
    spatial = f1.shape[2:]
    reach = (max_displacement // stride) * stride
    # Zero padding of f2 by the largest displacement: products with points outside f2 vanish.
    padded = F.pad(f2, [reach] * (2 * ndim))
    volumes = []
    for d in correlation_displacements(max_displacement, stride, ndim).tolist():
        window = tuple(slice(reach + di, reach + di + s) for di, s in zip(d, spatial))
        volumes.append((f1 * padded[(slice(None), slice(None), *window)]).sum(dim=1))
    out = torch.stack(volumes, dim=1) / f1.shape[1]
    if patch_size > 1:
        # Mean over the patch (zero padded, fixed divisor P): sum over a in [-k, k]^n divided by P.
        k = patch_size // 2
        out = _AVG_POOL[ndim](out, patch_size, stride=1, padding=k, count_include_pad=True)
    return out


@register_network("correlation")
class Correlation(nn.Module):
    """Module form of :func:`correlation` (parameter-free; ``ndim`` follows the inputs)."""

    def __init__(self, *, max_displacement: int, stride: int = 1, patch_size: int = 1) -> None:
        super().__init__()
        if max_displacement < 0 or stride < 1 or patch_size < 1 or patch_size % 2 == 0:
            raise ConfigError(
                f"Correlation: need max_displacement >= 0, stride >= 1 and an odd patch_size, got "
                f"{max_displacement}, {stride}, {patch_size}"
            )
        self.max_displacement = max_displacement
        self.stride = stride
        self.patch_size = patch_size
        self.config: dict[str, Any] = {
            "max_displacement": max_displacement,
            "stride": stride,
            "patch_size": patch_size,
        }

    def out_channels(self, ndim: int) -> int:
        return (2 * (self.max_displacement // self.stride) + 1) ** ndim

    def displacements(self, ndim: int) -> Tensor:
        """``(out_channels, ndim)`` displacement of each output channel (array-axis order, voxels)."""
        return correlation_displacements(self.max_displacement, self.stride, ndim)

    def forward(self, f1: Tensor, f2: Tensor) -> Tensor:
        return correlation(f1, f2, self.max_displacement, self.stride, patch_size=self.patch_size)

    def extra_repr(self) -> str:
        return f"max_displacement={self.max_displacement}, stride={self.stride}, patch_size={self.patch_size}"
