"""Small siamese and partly shared pseudo-siamese descriptor networks (Dong et al. 2018 §4.4, §5.3), 2D and 3D.

Architecture (Dong et al. 2018 §5.3, "Conv(16,32,5,1)-Tanh-MaxPool(12,-,2,2)-Conv(6,64,3,1)-Tanh-FC(256)", after
TFeat): a ``patch_size`` patch (16) -> valid conv ``kernel_sizes[0]`` (5) x ``channels[0]`` (32) ->
tanh -> 2x2 max-pool -> valid conv ``kernel_sizes[1]`` (3) x ``channels[1]`` (64) -> tanh -> fully
connected to ``descriptor_dim`` (256) -> L2 normalisation (unit descriptors, so that squared
distances lie in [0, 4] and the contrastive margin of Dong et al. 2018 eq. (1) has a fixed scale).

Two ways to run it:

* ``forward(patches, stream=s)``: ``(B, C_s, *[patch_size] * ndim)`` -> ``(B, descriptor_dim)``;
* ``dense(image, stream=s)``: ``(B, C_s, *S)`` -> ``(B, descriptor_dim, *S)``, the descriptor of the
  patch around every pixel, computed fully convolutionally with the *same* weights: pooling with
  stride 1 and the layers after it dilated by 2 (the "filter rarefaction" identity), so
  ``dense(x)[..., i, j]`` equals ``forward`` on the patch ``x[..., i - c : i - c + p, j - c : j - c + p]``
  with ``c = (p - 1) // 2`` (the image is edge-padded so every pixel has a patch).

``stream`` (0 or 1) picks the image of the pair -- e.g. RGB and NIR. A siamese network ignores it
(all weights shared); a pseudo-siamese one has separate copies of its first ``unshared_layers``
layers (Dong et al. 2018 §4.4: "the weights of only the first layer of both networks are different").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, cast

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from alignkit.errors import ConfigError, ShapeError
from alignkit.nets.blocks import Activation, check_ndim, conv_nd, make_activation
from alignkit.nets.registry import plain, register_network

DensePadding = Literal["replicate", "reflect", "zeros"]
_CONV_F = {2: F.conv2d, 3: F.conv3d}
_POOL_F = {2: F.max_pool2d, 3: F.max_pool3d}


class _PatchDescriptor(nn.Module):
    """The shared implementation; layer ``i < unshared_layers`` has one copy per stream."""

    def __init__(
        self,
        *,
        ndim: int,
        in_channels: Sequence[int],
        patch_size: int,
        channels: Sequence[int],
        kernel_sizes: Sequence[int],
        descriptor_dim: int,
        activation: Activation,
        unshared_layers: int,
    ) -> None:
        super().__init__()
        self.ndim = check_ndim(ndim)
        channels, kernel_sizes = list(channels), list(kernel_sizes)
        in_ch = [int(c) for c in in_channels]
        if len(channels) != 2 or len(kernel_sizes) != 2 or len(in_ch) != 2 or min(channels + in_ch) < 1:
            raise ConfigError(
                f"descriptor: need two channel counts, two kernel sizes, two inputs; got "
                f"{channels}, {kernel_sizes}, {in_ch}"
            )
        conv1_out = patch_size - kernel_sizes[0] + 1
        if conv1_out < 2 or conv1_out % 2:
            # The 2x2 pooling must tile the first feature map exactly, or the dense form would differ.
            raise ConfigError(f"patch_size - kernel_sizes[0] + 1 must be even and >= 2, got {conv1_out}")
        fc_kernel = conv1_out // 2 - kernel_sizes[1] + 1
        if fc_kernel < 1:
            raise ConfigError(f"patch_size {patch_size} too small for kernel sizes {kernel_sizes}")
        if not 0 <= unshared_layers <= 3:
            raise ConfigError(f"unshared_layers must be 0..3 (conv1, conv2, fc), got {unshared_layers}")
        if unshared_layers == 0 and in_ch[0] != in_ch[1]:
            raise ConfigError(f"a shared first layer needs one input channel count, got {in_ch}")
        self.in_channels = in_ch
        self.patch_size = patch_size
        self.descriptor_dim = descriptor_dim
        self.unshared_layers = unshared_layers
        conv = conv_nd(ndim)
        specs = [
            (channels[0], kernel_sizes[0]),
            (channels[1], kernel_sizes[1]),
            (descriptor_dim, fc_kernel),  # "FC" over the remaining fc_kernel^n cells == a valid conv
        ]
        self.layers = nn.ModuleList()
        for index, (cout, k) in enumerate(specs):
            cins = in_ch if index == 0 else [specs[index - 1][0]] * 2
            if index < unshared_layers:
                self.layers.append(nn.ModuleList([conv(cins[0], cout, k), conv(cins[1], cout, k)]))
            else:
                self.layers.append(conv(cins[0], cout, k))
        self.act = make_activation(activation)

    def _layer(self, index: int, stream: int) -> _ConvNd:
        layer = self.layers[index]
        conv = layer[stream] if isinstance(layer, nn.ModuleList) else layer
        return cast(_ConvNd, conv)

    def _check(self, x: Tensor, stream: int, patch: bool) -> None:
        if stream not in (0, 1):
            raise ConfigError(f"stream must be 0 or 1, got {stream}")
        cin = self.in_channels[stream]
        if x.dim() != self.ndim + 2 or x.shape[1] != cin:
            raise ShapeError(
                f"{type(self).__name__}: expected (B, {cin}, *spatial) with {self.ndim} axes, "
                f"got {tuple(x.shape)}"
            )
        if patch and any(s != self.patch_size for s in x.shape[2:]):
            raise ShapeError(
                f"{type(self).__name__}: patches must be {self.patch_size}^{self.ndim}, got "
                f"{tuple(x.shape[2:])} (use dense() for whole images)"
            )

    def forward(self, x: Tensor, stream: int = 0) -> Tensor:
        """Unit descriptors ``(B, descriptor_dim)`` of patches ``(B, C_stream, *[patch_size] * ndim)``."""
        self._check(x, stream, patch=True)
        x = self.act(self._layer(0, stream)(x))
        x = _POOL_F[self.ndim](x, 2, stride=2)
        x = self.act(self._layer(1, stream)(x))
        x = self._layer(2, stream)(x).flatten(1)
        return F.normalize(x, dim=1)

    def dense(self, x: Tensor, stream: int = 0, *, padding: DensePadding = "replicate") -> Tensor:
        """Unit descriptor of the patch around every voxel: ``(B, descriptor_dim, *S)`` (module docstring)."""
        self._check(x, stream, patch=False)
        p = self.patch_size
        before = (p - 1) // 2
        pad = [before, p - 1 - before] * self.ndim
        x = F.pad(x, pad, mode="constant" if padding == "zeros" else padding)
        conv, pool = _CONV_F[self.ndim], _POOL_F[self.ndim]
        x = self.act(self._layer(0, stream)(x))
        x = pool(x, 2, stride=1)
        second, fc = self._layer(1, stream), self._layer(2, stream)
        x = self.act(conv(x, second.weight, second.bias, dilation=2))
        x = conv(x, fc.weight, fc.bias, dilation=2)
        return F.normalize(x, dim=1)


@register_network("siamese_descriptor")
class SiameseDescriptor(_PatchDescriptor):
    """Siamese patch descriptor (Dong et al. 2018 §3, §5.3): one set of weights for both images; ``stream`` is
    accepted for a uniform interface with :class:`PseudoSiameseDescriptor` and ignored."""

    def __init__(
        self,
        *,
        ndim: int,
        in_channels: int = 1,
        patch_size: int = 16,
        channels: Sequence[int] = (32, 64),
        kernel_sizes: Sequence[int] = (5, 3),
        descriptor_dim: int = 256,
        activation: Activation = "tanh",
    ) -> None:
        super().__init__(
            ndim=ndim,
            in_channels=[in_channels, in_channels],
            patch_size=patch_size,
            channels=channels,
            kernel_sizes=kernel_sizes,
            descriptor_dim=descriptor_dim,
            activation=activation,
            unshared_layers=0,
        )
        self.config: dict[str, Any] = plain(
            {
                "ndim": ndim,
                "in_channels": in_channels,
                "patch_size": patch_size,
                "channels": channels,
                "kernel_sizes": kernel_sizes,
                "descriptor_dim": descriptor_dim,
                "activation": activation,
            }
        )


@register_network("pseudo_siamese_descriptor")
class PseudoSiameseDescriptor(_PatchDescriptor):
    """Partially shared pseudo-siamese descriptor (Dong et al. 2018 §4.4, Fig. 4): separate first layer(s) per
    stream/modality, shared later layers. ``unshared_layers=1`` is Dong et al. 2018's choice ("only adds a small
    number of parameters", which matters as it trains on one image pair); 3 unshares every layer
    (a classic pseudo-siamese network). ``in_channels`` may differ per stream (RGB 3, NIR 1) as long
    as the first layer is unshared."""

    def __init__(
        self,
        *,
        ndim: int,
        in_channels: int | Sequence[int] = 1,
        patch_size: int = 16,
        channels: Sequence[int] = (32, 64),
        kernel_sizes: Sequence[int] = (5, 3),
        descriptor_dim: int = 256,
        activation: Activation = "tanh",
        unshared_layers: int = 1,
    ) -> None:
        pair = [in_channels, in_channels] if isinstance(in_channels, int) else list(in_channels)
        if unshared_layers < 1:
            raise ConfigError("PseudoSiameseDescriptor needs unshared_layers >= 1 (0 is SiameseDescriptor)")
        super().__init__(
            ndim=ndim,
            in_channels=pair,
            patch_size=patch_size,
            channels=channels,
            kernel_sizes=kernel_sizes,
            descriptor_dim=descriptor_dim,
            activation=activation,
            unshared_layers=unshared_layers,
        )
        self.config: dict[str, Any] = plain(
            {
                "ndim": ndim,
                "in_channels": in_channels,
                "patch_size": patch_size,
                "channels": channels,
                "kernel_sizes": kernel_sizes,
                "descriptor_dim": descriptor_dim,
                "activation": activation,
                "unshared_layers": unshared_layers,
            }
        )
