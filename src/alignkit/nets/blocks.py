"""Building blocks written once for 2D and 3D: every layer is picked from ``ndim``.

Convention: tensors are ``(B, C, *spatial)`` with ``len(spatial) == ndim``; blocks never assume a
spatial size, so odd sizes work (down-sampling rounds up: a size ``s`` becomes ``ceil(s / 2)``).

Options are ``Literal`` names resolved in exactly one place each (:func:`make_norm`,
:func:`make_activation`, :func:`make_block`), so an unknown name fails early with a
:class:`~alignkit.errors.ConfigError` that lists the valid ones.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch.nn.functional as F
from torch import Tensor, nn

from alignkit.errors import ConfigError, ShapeError

Norm = Literal["none", "instance", "batch", "group"]
Activation = Literal["leaky_relu", "relu", "prelu", "elu", "gelu", "tanh", "none"]
DownMode = Literal["conv", "maxpool", "avgpool"]
UpMode = Literal["linear", "nearest", "transpose"]
BlockKind = Literal["conv", "residual", "lk"]

#: negative slope of the default activation; VoxelMorph's choice, kept by most registration U-Nets.
LEAKY_SLOPE = 0.2

_CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T: dict[int, type[nn.Module]] = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_INSTANCE: dict[int, type[nn.Module]] = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_BATCH: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAXPOOL: dict[int, type[nn.Module]] = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVGPOOL: dict[int, type[nn.Module]] = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def check_choice(value: str, literal: object, what: str) -> str:
    """Return ``value`` if it is one of the names of ``literal``; raise :class:`ConfigError` otherwise."""
    choices = get_args(literal)
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def check_ndim(ndim: int) -> int:
    if ndim not in (2, 3):
        raise ConfigError(f"networks are 2D or 3D, got ndim={ndim}")
    return ndim


def conv_nd(ndim: int) -> type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d`` (``nn.Conv1d`` for 1)."""
    return _CONV[ndim]


def conv_transpose_nd(ndim: int) -> type[nn.Module]:
    return _CONV_T[ndim]


def max_pool_nd(ndim: int) -> type[nn.Module]:
    return _MAXPOOL[ndim]


def make_norm(norm: Norm, ndim: int, channels: int) -> nn.Module:
    """Normalisation layer by name. ``group`` uses up to 8 groups that divide ``channels``."""
    check_choice(norm, Norm, "norm")
    if norm == "none":
        return nn.Identity()
    if norm == "instance":
        # affine=True: a learnable scale/shift per channel, as in nnU-Net; the torch default (False)
        # would pin every channel to unit variance, which a displacement head cannot undo.
        return _INSTANCE[ndim](channels, affine=True)
    if norm == "batch":
        return _BATCH[ndim](channels)
    groups = math.gcd(channels, 8)
    return nn.GroupNorm(groups, channels)


def make_activation(activation: Activation, channels: int | None = None) -> nn.Module:
    """Activation layer by name (``leaky_relu`` has slope :data:`LEAKY_SLOPE`)."""
    check_choice(activation, Activation, "activation")
    if activation == "leaky_relu":
        return nn.LeakyReLU(LEAKY_SLOPE)
    if activation == "relu":
        return nn.ReLU()
    if activation == "prelu":
        # One slope per channel, as LKU-Net uses after its summed branches.
        return nn.PReLU(channels or 1)
    if activation == "elu":
        return nn.ELU()
    if activation == "gelu":
        return nn.GELU()
    if activation == "tanh":
        return nn.Tanh()
    return nn.Identity()


def match_size(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """Crop (at the far end) or zero-pad ``x (B, C, *S)`` to spatial ``size``.

    Used after transposed convolutions, which give ``2 * ceil(s / 2)`` where the skip has ``s``."""
    ndim = len(size)
    if tuple(x.shape[2:]) == tuple(size):
        return x
    slices = [slice(None), slice(None)] + [slice(0, s) for s in size]
    x = x[tuple(slices)]
    pad: list[int] = []
    for axis in reversed(range(ndim)):  # F.pad lists the last axis first
        pad += [0, size[axis] - x.shape[2 + axis]]
    return F.pad(x, pad) if any(pad) else x


class ConvBlock(nn.Sequential):
    """conv -> norm -> activation, ``same`` padding (``kernel_size // 2``), optional stride.

    A stride-2 block with kernel 3 maps a size ``s`` to ``ceil(s / 2)``."""

    def __init__(
        self,
        *,
        ndim: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        norm: Norm = "none",
        activation: Activation = "leaky_relu",
    ) -> None:
        conv = conv_nd(ndim)(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)
        super().__init__(conv, make_norm(norm, ndim, out_channels), make_activation(activation, out_channels))


class DoubleConv(nn.Sequential):
    """Two :class:`ConvBlock` s: the plain U-Net stage."""

    def __init__(
        self,
        *,
        ndim: int,
        in_channels: int,
        out_channels: int,
        norm: Norm = "none",
        activation: Activation = "leaky_relu",
    ) -> None:
        kw = {"ndim": ndim, "norm": norm, "activation": activation}
        super().__init__(
            ConvBlock(in_channels=in_channels, out_channels=out_channels, **kw),  # type: ignore[arg-type]
            ConvBlock(in_channels=out_channels, out_channels=out_channels, **kw),  # type: ignore[arg-type]
        )


class ResidualBlock(nn.Module):
    """``act(norm(conv(act(norm(conv(x))))) + skip(x))`` -- the residual stage of Shen et al. 2019 §2.2 ("U-Net with
    residual links", after He et al.). ``skip`` is a 1x1 convolution when the channel count changes."""

    def __init__(
        self,
        *,
        ndim: int,
        in_channels: int,
        out_channels: int,
        norm: Norm = "none",
        activation: Activation = "leaky_relu",
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvBlock(
                ndim=ndim,
                in_channels=in_channels,
                out_channels=out_channels,
                norm=norm,
                activation=activation,
            ),
            conv_nd(ndim)(out_channels, out_channels, 3, padding=1),
            make_norm(norm, ndim, out_channels),
        )
        self.skip = (
            nn.Identity() if in_channels == out_channels else conv_nd(ndim)(in_channels, out_channels, 1)
        )
        self.act = make_activation(activation, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.skip(x))


class LargeKernelBlock(nn.Module):
    """LKU-Net block (Jia et al. 2022, used by Jena et al. 2024 §4.2): parallel ``large_kernel``, ``small_kernel`` and
    1x1 convolutions plus the identity, summed, then an activation.

    The 1x1 branch is in the LKU-Net reference code, so it is on by default (``one_by_one=True``);
    the large kernel is what widens the receptive field without more down-sampling."""

    def __init__(
        self,
        *,
        ndim: int,
        channels: int,
        large_kernel: int = 5,
        small_kernel: int = 3,
        one_by_one: bool = True,
        norm: Norm = "none",
        activation: Activation = "prelu",
    ) -> None:
        super().__init__()
        for k, name in ((large_kernel, "large_kernel"), (small_kernel, "small_kernel")):
            if k < 1 or k % 2 == 0:
                raise ConfigError(f"{name} must be odd and positive (same-size output), got {k}")
        conv = conv_nd(ndim)
        kernels = [large_kernel, small_kernel] + ([1] if one_by_one else [])
        self.branches = nn.ModuleList(
            nn.Sequential(conv(channels, channels, k, padding=k // 2), make_norm(norm, ndim, channels))
            for k in kernels
        )
        self.act = make_activation(activation, channels)

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for branch in self.branches:
            out = out + branch(x)
        return self.act(out)


class LargeKernelStage(nn.Sequential):
    """A channel-changing :class:`ConvBlock` followed by a :class:`LargeKernelBlock` (LKU-Net encoder)."""

    def __init__(
        self,
        *,
        ndim: int,
        in_channels: int,
        out_channels: int,
        large_kernel: int = 5,
        norm: Norm = "none",
        activation: Activation = "leaky_relu",
    ) -> None:
        super().__init__(
            ConvBlock(
                ndim=ndim,
                in_channels=in_channels,
                out_channels=out_channels,
                norm=norm,
                activation=activation,
            ),
            LargeKernelBlock(
                ndim=ndim, channels=out_channels, large_kernel=large_kernel, norm=norm, activation=activation
            ),
        )


def make_block(
    kind: BlockKind,
    *,
    ndim: int,
    in_channels: int,
    out_channels: int,
    norm: Norm = "none",
    activation: Activation = "leaky_relu",
    large_kernel: int = 5,
) -> nn.Module:
    """One U-Net stage by name: ``conv`` (two conv blocks), ``residual`` or ``lk`` (large kernel)."""
    check_choice(kind, BlockKind, "block")
    kw = {
        "ndim": ndim,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "norm": norm,
        "activation": activation,
    }
    if kind == "conv":
        return DoubleConv(**kw)  # type: ignore[arg-type]
    if kind == "residual":
        return ResidualBlock(**kw)  # type: ignore[arg-type]
    return LargeKernelStage(large_kernel=large_kernel, **kw)  # type: ignore[arg-type]


class Downsample(nn.Module):
    """Halve every spatial size, rounding up (``s -> ceil(s / 2)``) so odd sizes never lose a voxel.

    ``conv``: stride-2 3x3 conv block (learned; changes channels); ``maxpool``/``avgpool``: 2x2 pooling
    with ``ceil_mode`` (channels unchanged, so ``out_channels`` must equal ``in_channels``)."""

    def __init__(
        self,
        *,
        ndim: int,
        in_channels: int,
        out_channels: int | None = None,
        mode: DownMode = "conv",
        norm: Norm = "none",
        activation: Activation = "leaky_relu",
    ) -> None:
        super().__init__()
        check_choice(mode, DownMode, "downsample mode")
        out_channels = in_channels if out_channels is None else out_channels
        if mode == "conv":
            self.op: nn.Module = ConvBlock(
                ndim=ndim,
                in_channels=in_channels,
                out_channels=out_channels,
                stride=2,
                norm=norm,
                activation=activation,
            )
        else:
            if out_channels != in_channels:
                raise ConfigError(f"{mode} down-sampling keeps channels: {in_channels} != {out_channels}")
            pool = _MAXPOOL if mode == "maxpool" else _AVGPOOL
            self.op = pool[ndim](2, stride=2, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Up-sample ``x`` to the exact spatial ``size`` of the skip connection it will be joined with.

    ``linear``/``nearest`` interpolate (``align_corners=False``: feature maps are cell averages, not
    point samples on a grid, so the grid convention of :mod:`alignkit.spatial` does not apply here);
    ``transpose`` is a learned stride-2 transposed convolution cropped to ``size``."""

    def __init__(self, *, ndim: int, channels: int, mode: UpMode = "linear") -> None:
        super().__init__()
        check_choice(mode, UpMode, "upsample mode")
        self.mode = mode
        self.ndim = ndim
        self.deconv = (
            conv_transpose_nd(ndim)(channels, channels, 2, stride=2) if mode == "transpose" else None
        )

    def forward(self, x: Tensor, size: tuple[int, ...]) -> Tensor:
        if len(size) != self.ndim:
            raise ShapeError(f"Upsample: expected {self.ndim} sizes, got {size}")
        if self.deconv is not None:
            return match_size(self.deconv(x), size)
        if self.mode == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        mode = "bilinear" if self.ndim == 2 else "trilinear"
        return F.interpolate(x, size=size, mode=mode, align_corners=False)


def init_near_zero(conv: nn.Module, std: float = 1e-5) -> None:
    """VoxelMorph's flow-layer init: weights ~ N(0, std), bias 0.

    The output starts within ~``std`` x (activation scale) of zero, so an untrained registration
    network predicts (almost) the identity, yet -- unlike exactly zero weights -- gradients reach
    every earlier layer from the first step."""
    nn.init.normal_(conv.weight, mean=0.0, std=std)  # type: ignore[arg-type]
    if getattr(conv, "bias", None) is not None:
        nn.init.zeros_(conv.bias)  # type: ignore[arg-type]


def ceil_div_size(size: tuple[int, ...], level: int) -> tuple[int, ...]:
    """Spatial size after ``level`` round-up halvings: ``ceil(s / 2**level)`` per axis."""
    out = tuple(size)
    for _ in range(level):
        out = tuple((s + 1) // 2 for s in out)
    return out
