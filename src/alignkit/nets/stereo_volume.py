"""A cost-volume stereo network: features -> 1D correlation or concatenation volume -> 3D-convolution
aggregation -> soft-argmin (the deep-learning registration survey §2.2; the architecture of Kendall et
al., "End-to-End Learning of Geometry and Context for Deep Stereo Regression", ICCV 2017 -- GC-Net --
shrunk to run on a CPU).

* features: a shared 2D encoder to 1/``downsample`` resolution (strided 5x5 then 3x3 convolutions with
  3x3 convolutions between, ReLU; none after the last), unit length per pixel;
* volume over the quarter-resolution disparities ``d4``: ``"correlation"`` -- the cosine
  ``<f_left(x), f_right(x - d4)>`` (one channel, the survey's correlation without a window), or
  ``"concat"`` -- GC-Net's concatenation ``[f_left(x), f_right(x - d4)]`` (2F channels), zeros where
  ``x - d4`` leaves the right image;
* aggregation: ``layers3d`` 3x3x3 convolutions over (disparity, y, x) (ReLU between), one output
  channel: a matching cost per disparity;
* the cost volume is upsampled trilinearly to full resolution and every integer disparity of
  ``[min_disparity, max_disparity]``, and the disparity is the soft-argmin
  ``sum_d d * softmax(-cost)_d`` (differentiable, sub-pixel).

Input: grey ``(B, 1, H, W)`` left and right images (any size: padded to a multiple of
``downsample``); the correlation variant adds ``-gain * cosine`` (learned ``gain``) to the aggregated
cost, a skip connection that makes the untrained network a winner-take-all matcher; output: ``(B, 1, H, W)`` left disparity in pixels (``left(x) = right(x - d)``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignkit.errors import ConfigError, ShapeError
from alignkit.nets.registry import plain, register_network


@register_network("stereo_volume")
class CostVolumeStereo(nn.Module):
    """Cost-volume stereo network (module docstring)."""

    def __init__(self, *, ndim: int = 2, in_channels: int = 1, features: int = 16, aggregation: int = 8,
                 layers3d: int = 4, volume: str = "correlation", downsample: int = 4) -> None:
        super().__init__()
        if ndim != 2:
            raise ConfigError(f"the cost-volume stereo network is 2D, got ndim={ndim}")
        if volume not in ("correlation", "concat"):
            raise ConfigError(f"volume must be 'correlation' or 'concat', got {volume!r}")
        if downsample not in (1, 2, 4) or features < 1 or aggregation < 1 or layers3d < 2:
            raise ConfigError("need downsample in (1, 2, 4), features >= 1, aggregation >= 1, layers3d >= 2")
        layers: list[nn.Module] = []
        channels = in_channels
        for stride in [2] * int(math.log2(downsample)) or [1]:
            layers += [nn.Conv2d(channels, features, 5 if channels == in_channels else 3, stride=stride,
                                 padding=2 if channels == in_channels else 1), nn.ReLU(inplace=True),
                       nn.Conv2d(features, features, 3, padding=1), nn.ReLU(inplace=True)]
            channels = features
        layers.append(nn.Conv2d(features, features, 3, padding=1))
        self.encoder = nn.Sequential(*layers)
        volume_channels = 1 if volume == "correlation" else 2 * features
        blocks: list[nn.Module] = []
        for index in range(layers3d - 1):
            blocks += [nn.Conv3d(volume_channels if index == 0 else aggregation, aggregation, 3, padding=1),
                       nn.ReLU(inplace=True)]
        blocks.append(nn.Conv3d(aggregation, 1, 3, padding=1))
        self.aggregate = nn.Sequential(*blocks)
        self.volume_kind, self.downsample = volume, int(downsample)
        # correlation volumes also reach the cost directly, ``-gain * cosine``: from the first step the
        # soft-argmin is a winner-take-all of the features' match and the 3D layers learn a correction
        # (without it the soft-argmin starts flat at the range's middle and a 32-disparity training
        # stayed there for 10 epochs)
        self.gain = nn.Parameter(torch.tensor(10.0)) if volume == "correlation" else None
        self.config: dict[str, Any] = plain({"ndim": ndim, "in_channels": in_channels, "features": features,
                                             "aggregation": aggregation, "layers3d": layers3d, "volume": volume,
                                             "downsample": downsample})

    def build_volume(self, left: Tensor, right: Tensor, disparities: list[int]) -> Tensor:
        """``(B, C, D, h, w)`` correlation or concatenation volume of ``(B, F, h, w)`` features for
        integer feature-resolution ``disparities`` (zeros where ``x - d`` leaves the right image)."""
        width = left.shape[-1]
        slices = []
        for d in disparities:
            shifted = torch.zeros_like(right)
            if 0 <= d < width:
                shifted[..., d:] = right[..., : width - d]
            elif -width < d < 0:
                shifted[..., :d] = right[..., -d:]
            if self.volume_kind == "correlation":
                slices.append((left * shifted).sum(1, keepdim=True))  # unit features: the cosine
            else:
                slices.append(torch.cat([left, shifted], 1))
        return torch.stack(slices, 2)

    def forward(self, left: Tensor, right: Tensor, min_disparity: int, max_disparity: int) -> Tensor:
        if left.dim() != 4 or left.shape != right.shape:
            raise ShapeError(f"expected two (B, C, H, W) images of one size, got {tuple(left.shape)} and {tuple(right.shape)}")
        height, width = left.shape[-2:]
        factor = self.downsample
        pad_h, pad_w = (-height) % factor, (-width) % factor
        if pad_h or pad_w:
            left, right = (F.pad(t, (0, pad_w, 0, pad_h), mode="replicate") for t in (left, right))
        features_left = F.normalize(self.encoder(left - 0.5), dim=1, eps=1e-6)
        features_right = F.normalize(self.encoder(right - 0.5), dim=1, eps=1e-6)
        low, high = math.floor(min_disparity / factor), math.ceil(max_disparity / factor)
        volume = self.build_volume(features_left, features_right, list(range(low, high + 1)))
        cost = self.aggregate(volume)  # (B, 1, D4, h, w)
        if self.gain is not None:
            cost = cost - self.gain * volume
        full = (high - low) * factor + 1  # integer disparities low*factor .. high*factor
        if full != cost.shape[2]:
            # along d the samples are exact multiples of ``factor`` (corners aligned); across the image the
            # feature pixels are ``factor``-pixel cells (not aligned)
            cost = F.interpolate(cost, size=(full, *cost.shape[-2:]), mode="trilinear", align_corners=True)
        cost = cost[:, 0]
        if factor > 1:
            cost = F.interpolate(cost, size=left.shape[-2:], mode="bilinear", align_corners=False)
        cost = cost[:, :, :height, :width]
        values = torch.arange(low * factor, high * factor + 1, device=cost.device, dtype=cost.dtype)
        # keep the requested range only (the quarter-resolution grid rounds it outwards)
        keep = (values >= min_disparity) & (values <= max_disparity)
        probability = torch.softmax(-cost[:, keep], dim=1)
        return (probability * values[keep][None, :, None, None]).sum(1, keepdim=True)
