"""Patch-matching features for stereo: the MC-CNN "fast" architecture (the deep-learning registration
survey §2.1; Žbontar and LeCun, "Stereo Matching by Training a Convolutional Neural Network to Compare
Image Patches", JMLR 2016).

A stack of ``layers`` 3x3 convolutions (``features`` channels, ReLU between them, none after the last)
sees a ``(2 layers + 1)``-pixel patch -- 9x9 for the paper's 4 layers -- and its output is
L2-normalised per pixel, so the matching score of two patches is the cosine of their feature vectors.
Run densely (each layer edge-padded by one pixel) it gives the features of every pixel's patch in one
pass; the matching cost of a disparity is then one dot product per pixel (:meth:`MatchingFeatures.cost_volume`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignkit.errors import ConfigError, ShapeError
from alignkit.nets.registry import plain, register_network


@register_network("mccnn_fast")
class MatchingFeatures(nn.Module):
    """MC-CNN-fast features (module docstring): ``(B, in_channels, H, W)`` -> unit ``(B, features, H, W)``."""

    def __init__(self, *, ndim: int = 2, in_channels: int = 1, features: int = 32, layers: int = 4) -> None:
        super().__init__()
        if ndim != 2:
            raise ConfigError(f"stereo matching features are 2D, got ndim={ndim}")
        if layers < 1 or features < 1:
            raise ConfigError(f"need layers >= 1 and features >= 1, got {layers} and {features}")
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else features, features, 3) for i in range(layers)
        )
        self.config: dict[str, Any] = plain({"ndim": ndim, "in_channels": in_channels, "features": features,
                                             "layers": layers})

    @property
    def patch_size(self) -> int:
        return 2 * len(self.convs) + 1

    def forward(self, image: Tensor) -> Tensor:
        if image.dim() != 4:
            raise ShapeError(f"expected (B, C, H, W) images, got {tuple(image.shape)}")
        out = image
        for index, conv in enumerate(self.convs):
            out = conv(F.pad(out, (1, 1, 1, 1), mode="replicate"))
            if index < len(self.convs) - 1:
                out = F.relu(out)
        return F.normalize(out, dim=1, eps=1e-6)

    @staticmethod
    def cost_volume(left_features: Tensor, right_features: Tensor, disparities: np.ndarray) -> Tensor:
        """``(D, H, W)`` cost ``(1 - cos) / 2`` in [0, 1] of left pixel ``x`` against right pixel
        ``x - d`` for each integer ``d`` in ``disparities``, from ``(1, F, H, W)`` unit features;
        1 (the worst cost) where ``x - d`` leaves the right image, as :mod:`alignkit.stereo.cost`.

        On the CPU without autograd and with numba installed, :func:`alignkit.stereo.compiled.feature_cost`
        computes the same values (to float rounding) in one pass; this loop is its reference."""
        from alignkit.stereo import compiled

        if (left_features.device.type == "cpu" and left_features.dtype == torch.float32 and compiled.available()
                and not (torch.is_grad_enabled() and (left_features.requires_grad or right_features.requires_grad))):
            return torch.from_numpy(compiled.feature_cost(left_features[0].numpy(), right_features[0].numpy(),
                                                          np.asarray(disparities).astype(np.int64)))
        return MatchingFeatures.cost_volume_reference(left_features, right_features, disparities)

    @staticmethod
    def cost_volume_reference(left_features: Tensor, right_features: Tensor, disparities: np.ndarray) -> Tensor:
        """:meth:`cost_volume` as torch operations (any device, differentiable)."""
        _, _, height, width = left_features.shape
        out = torch.ones(len(disparities), height, width, dtype=left_features.dtype, device=left_features.device)
        left, right = left_features[0], right_features[0]
        for k, d in enumerate(int(v) for v in disparities):
            if 0 <= d < width:
                score = (left[:, :, d:] * right[:, :, : width - d]).sum(0)
                out[k, :, d:] = (1.0 - score) * 0.5
            elif -width < d < 0:
                score = (left[:, :, :d] * right[:, :, -d:]).sum(0)
                out[k, :, :d] = (1.0 - score) * 0.5
        return out
