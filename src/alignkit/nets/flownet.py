"""FlowNet-style optical-flow networks, written once for 2D and 3D from injected parts.

After Dosovitskiy et al., FlowNet: Learning Optical Flow with Convolutional Networks, ICCV 2015, and
Ilg et al., FlowNet 2.0: Evolution of Optical Flow Estimation with Deep Networks, CVPR 2017 (the
survey of deep-learning registration, §2: cost volume, aggregation, differentiable warp):

* :class:`FlowNetS` ("simple"): both frames stacked on the channel axis, a strided encoder, then the
  U-Net-like refinement decoder of :class:`FlowDecoder` with a flow prediction at every level;
* :class:`FlowNetC` ("correlation"): one feature tower shared by both frames up to
  ``correlation_level``, FlowNet's correlation layer (:func:`alignkit.nets.correlation`, §2.1) of the
  two feature maps plus a 1x1 "redirect" of the first frame's features, then the rest of the encoder
  (aggregation, §2.2) and the same decoder;
* :class:`FlowNetStack` (FlowNet 2.0's stacking, §2.3): a first network's flow warps the second
  frame with the differentiable (bilinear) warp, and a second network sees both frames, the warped
  frame, the flow and the brightness error, and refines the flow.

Flow convention (every network here)
------------------------------------
``forward`` returns the flows of the decoder levels, **coarsest first**; the flow of level ``l``
is ``(B, ndim, *S / 2**l)``, a displacement **in voxels of that level, array-axis order**, first
frame → second frame: ``first(p) ≈ second(p + flow(p))`` -- alignkit's flow on the level's grid.
Levels are cell-aligned (level ``l`` cell ``i`` covers input voxels ``[2**l i, 2**l (i + 1))``): moving
a flow between levels is :func:`upsample_flow` / :func:`downsample_flow` (``align_corners=False``
interpolation or box averaging, values times or divided by the factor), which is the same at every
image size -- unlike the corner-aligned grids of :mod:`alignkit.spatial`, whose level ratio depends on
the size. Spatial sizes must be multiples of ``2**levels`` (:meth:`FlowNetS.multiple`;
:func:`pad_to_multiple` pads). Each decoder level predicts a *residual* on the up-sampled coarser
flow (FlowNet predicts the flow itself from features that include the up-sampled flow; the residual
lets a narrow network start from the coarse answer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignkit.errors import ConfigError, ShapeError
from alignkit.nets.blocks import (
    Activation,
    ConvBlock,
    Norm,
    check_ndim,
    conv_nd,
    conv_transpose_nd,
    init_near_zero,
    make_activation,
    match_size,
)
from alignkit.nets.correlation import Correlation
from alignkit.nets.pyramid import warp_voxels
from alignkit.nets.registry import as_network, network_config, plain, register_network

#: flows enter a stacked network's input multiplied by this (FlowNet 2.0 feeds flows scaled down, so
#: that tens of pixels do not dominate image intensities in [0, 1])
INPUT_FLOW_SCALE = 0.1

_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}


# -- flows between levels ---------------------------------------------------------------------------
def upsample_flow(flow: Tensor, factor: int) -> Tensor:
    """A level's flow on the level ``factor`` times finer (cell-aligned, module docstring)."""
    if factor == 1:
        return flow
    ndim = flow.dim() - 2
    up = F.interpolate(flow, scale_factor=float(factor), mode=_INTERP[ndim], align_corners=False)
    return up * float(factor)


def downsample_flow(flow: Tensor, factor: int) -> Tensor:
    """A flow (e.g. the ground truth) on the level ``factor`` times coarser: the mean over each cell,
    divided by ``factor`` (the spatial sizes must be multiples of ``factor``)."""
    if factor == 1:
        return flow
    ndim = flow.dim() - 2
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[ndim]
    return pool(flow, factor, factor) / float(factor)


def resize_frames(frames: Tensor, shape: Sequence[int]) -> Tensor:
    """``frames (B, C, *S)`` on a grid of ``shape`` over the same field of view, cell-aligned as the
    levels here (``align_corners=False``); anti-aliased when shrinking where torch supports it (2D)."""
    shape = tuple(int(s) for s in shape)
    if tuple(frames.shape[2:]) == shape:
        return frames
    ndim = frames.dim() - 2
    shrinking = any(s < n for s, n in zip(shape, frames.shape[2:]))
    return F.interpolate(frames, size=shape, mode=_INTERP[ndim], align_corners=False,
                         antialias=shrinking and ndim == 2)


def resize_flow(flow: Tensor, shape: Sequence[int]) -> Tensor:
    """A flow ``(B, ndim, *S)`` in voxels of its grid, on a grid of ``shape`` over the same field of view
    (cell-aligned, as :func:`upsample_flow`; any ratio) and in voxels of that grid."""
    shape = tuple(int(s) for s in shape)
    old = [int(s) for s in flow.shape[2:]]
    if tuple(old) == shape:
        return flow
    out = F.interpolate(flow, size=shape, mode=_INTERP[len(old)], align_corners=False)
    factors = torch.tensor([n / o for n, o in zip(shape, old)], dtype=flow.dtype, device=flow.device)
    return out * factors.view(1, -1, *([1] * len(old)))


def pad_to_multiple(tensor: Tensor, multiple: int) -> tuple[Tensor, tuple[int, ...]]:
    """``tensor (B, C, *S)`` padded at the far end of each axis (edge values repeated) to multiples of
    ``multiple``, and the original spatial size (crop back with ``out[..., :S0, :S1]``)."""
    size = tuple(int(s) for s in tensor.shape[2:])
    pad: list[int] = []
    for s in reversed(size):
        pad += [0, (-s) % multiple]
    if not any(pad):
        return tensor, size
    return F.pad(tensor, pad, mode="replicate"), size


# -- parts ------------------------------------------------------------------------------------------
def _check_widths(features: Sequence[int], kernels: Sequence[int]) -> tuple[list[int], list[int]]:
    features, kernels = [int(f) for f in features], [int(k) for k in kernels]
    if len(features) < 2 or min(features) < 1:
        raise ConfigError(f"a FlowNet needs at least two positive level widths, got {features}")
    if len(kernels) != len(features) or any(k < 1 or k % 2 == 0 for k in kernels):
        raise ConfigError(f"kernels must be one odd size per level ({len(features)}), got {kernels}")
    return features, kernels


class _Level(nn.Sequential):
    """One encoder level: a stride-2 convolution (FlowNet's conv1 ... conv6), then, from level
    ``extra_from`` on, a 3x3 convolution at that level (conv3_1 ... conv6_1)."""

    def __init__(self, *, ndim: int, in_channels: int, out_channels: int, kernel: int, extra: bool,
                 activation: Activation, norm: Norm = "none") -> None:
        layers: list[nn.Module] = [ConvBlock(ndim=ndim, in_channels=in_channels, out_channels=out_channels,
                                             kernel_size=kernel, stride=2, activation=activation, norm=norm)]
        if extra:
            layers.append(ConvBlock(ndim=ndim, in_channels=out_channels, out_channels=out_channels,
                                    activation=activation, norm=norm))
        super().__init__(*layers)


@register_network("flow_decoder")
class FlowDecoder(nn.Module):
    """FlowNet's refinement decoder (§2.2: "a simple U-Net like decoder"): from the deepest level down
    to ``output_level``, a flow prediction per level.

    ``skip_channels[l]`` is the width of the encoder features at level ``l`` (``l = output_level ..
    top``; level ``top`` is the input of the decoder). At the top, ``flow_top = conv(features)``; at
    each finer level ``l``, a transposed convolution up-samples the decoder features (``decoder[l]``
    channels), the coarser flow is up-sampled (:func:`upsample_flow`), both are concatenated with the
    encoder skip, and ``flow_l = up-sampled flow + conv(concatenation)``. Flow convolutions start near
    zero, so an untrained decoder predicts (almost) no motion.
    """

    def __init__(self, *, ndim: int, skip_channels: Sequence[int], decoder: Sequence[int], output_level: int = 2,
                 activation: Activation = "leaky_relu") -> None:
        super().__init__()
        self.ndim = check_ndim(ndim)
        skips = [int(c) for c in skip_channels]
        widths = [int(c) for c in decoder]
        top = len(skips) - 1
        if not 0 <= output_level < top:
            raise ConfigError(f"output_level must lie in 0..{top - 1}, got {output_level}")
        if len(widths) != len(skips) or min(widths[output_level:top], default=1) < 1:
            raise ConfigError(f"decoder needs one width per level ({len(skips)}), got {widths}")
        self.top, self.output_level = top, int(output_level)
        conv, deconv = conv_nd(ndim), conv_transpose_nd(ndim)
        self.predict = nn.ModuleDict({str(top): conv(skips[top], ndim, 3, padding=1)})
        self.up = nn.ModuleDict()
        channels = skips[top]
        for level in range(top - 1, output_level - 1, -1):
            # kernel 4, stride 2, padding 1: exactly twice the size, the cell-aligned up-sampling
            self.up[str(level)] = nn.Sequential(deconv(channels, widths[level], 4, stride=2, padding=1),
                                                make_activation(activation, widths[level]))
            channels = skips[level] + widths[level] + ndim
            self.predict[str(level)] = conv(channels, ndim, 3, padding=1)
        for head in self.predict.values():
            init_near_zero(head)
        self.config: dict[str, Any] = plain({"ndim": ndim, "skip_channels": skips, "decoder": widths,
                                             "output_level": output_level, "activation": activation})

    def forward(self, skips: Mapping[int, Tensor], prior: Mapping[int, Tensor] | None = None) -> list[Tensor]:
        """Flows per level, coarsest first, from encoder features ``skips[l]``. ``prior[l]`` (optional)
        is added to the flow of level ``l`` (a stacked network refines its first network's flow)."""
        x = skips[self.top]
        flow = self.predict[str(self.top)](x)
        if prior is not None and self.top in prior:
            flow = flow + prior[self.top]
        flows = [flow]
        for level in range(self.top - 1, self.output_level - 1, -1):
            skip = skips[level]
            up = match_size(self.up[str(level)](x), tuple(skip.shape[2:]))
            coarse = match_size(upsample_flow(flow, 2), tuple(skip.shape[2:]))
            if prior is not None and level in prior:  # the prior's own flow replaces the up-sampled one
                coarse = coarse + prior[level] - match_size(upsample_flow(prior[level + 1], 2), tuple(skip.shape[2:]))
            x = torch.cat([skip, up, coarse], dim=1)
            flow = coarse + self.predict[str(level)](x)
            flows.append(flow)
        return flows


def _decoder_widths(features: Sequence[int], decoder: Sequence[int] | None) -> list[int]:
    """Default decoder widths: half the encoder's at each level (FlowNet's deconv5..2 are 512, 256,
    128, 64 against encoder widths 512..128)."""
    if decoder is not None:
        return [int(c) for c in decoder]
    return [max(1, int(c) // 2) for c in features]


class _FlowNetBase(nn.Module):
    """What every network here shares: the level count, the size rule and the final full-resolution flow."""

    ndim: int
    levels: int
    decoder: FlowDecoder

    def multiple(self) -> int:
        """Spatial sizes must be multiples of this (``2 ** levels``)."""
        return 2**self.levels

    def check_size(self, tensor: Tensor) -> None:
        bad = [s for s in tensor.shape[2:] if s % self.multiple()]
        if tensor.dim() != self.ndim + 2 or bad:
            raise ShapeError(f"{type(self).__name__}: expected (B, C, *S) with {self.ndim} spatial axes, each a "
                             f"multiple of {self.multiple()} (pad_to_multiple), got {tuple(tensor.shape)}")

    def full_resolution(self, flows: Sequence[Tensor]) -> Tensor:
        """The finest predicted flow brought to the input resolution (voxels of the input grid)."""
        return upsample_flow(flows[-1], 2**self.decoder.output_level)


@register_network("flownet_s")
class FlowNetS(_FlowNetBase):
    """FlowNetSimple (Dosovitskiy et al. 2015): ``forward(*inputs)`` concatenates its inputs (the two
    frames, or whatever a stack feeds it: ``in_channels`` in total) and returns the flows per level,
    coarsest first (module docstring). ``features[l-1]`` is the width of encoder level ``l``
    (``len(features)`` halvings), ``kernels`` their first convolution's size (FlowNet: 7, 5, 5, 3, 3,
    3); levels from ``extra_from`` on have a second, 3x3 convolution. ``decoder`` widths default to
    half the encoder's; the decoder stops at ``output_level`` (FlowNet: 2, a quarter of the input).
    ``norm`` normalises the encoder's convolutions (FlowNet: none)."""

    def __init__(
        self,
        *,
        ndim: int,
        in_channels: int = 2,
        features: Sequence[int] = (16, 32, 64, 96, 128),
        kernels: Sequence[int] = (7, 5, 5, 3, 3),
        extra_from: int = 3,
        decoder: Sequence[int] | None = None,
        output_level: int = 2,
        activation: Activation = "leaky_relu",
        norm: Norm = "none",
    ) -> None:
        super().__init__()
        self.ndim = check_ndim(ndim)
        features, kernels = _check_widths(features, kernels)
        self.levels = len(features)
        self.in_channels = int(in_channels)
        self.encoder = nn.ModuleList()
        channels = self.in_channels
        for level, (width, kernel) in enumerate(zip(features, kernels), start=1):
            self.encoder.append(_Level(ndim=ndim, in_channels=channels, out_channels=width, kernel=kernel,
                                       extra=level >= extra_from, activation=activation, norm=norm))
            channels = width
        widths = _decoder_widths([in_channels, *features], None if decoder is None else [0, *decoder])
        self.decoder = FlowDecoder(ndim=ndim, skip_channels=[in_channels, *features], decoder=widths,
                                   output_level=output_level, activation=activation)
        self.config: dict[str, Any] = plain({
            "ndim": ndim, "in_channels": in_channels, "features": features, "kernels": kernels,
            "extra_from": extra_from, "decoder": decoder, "output_level": output_level, "activation": activation,
            "norm": norm,
        })

    def forward(self, *inputs: Tensor, prior: Mapping[int, Tensor] | None = None) -> list[Tensor]:
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)
        self.check_size(x)
        if x.shape[1] != self.in_channels:
            raise ShapeError(f"FlowNetS: expected {self.in_channels} input channels in all, got {x.shape[1]}")
        skips = {0: x}
        for level, stage in enumerate(self.encoder, start=1):
            x = stage(x)
            skips[level] = x
        return self.decoder(skips, prior)


@register_network("flownet_c")
class FlowNetC(_FlowNetBase):
    """FlowNetCorr (Dosovitskiy et al. 2015): ``forward(first, second)``.

    A tower of ``correlation_level`` encoder levels, shared by both frames (``in_channels`` each); the
    correlation layer (``max_displacement`` voxels of that level, ``stride``, ``patch_size``; FlowNet:
    level 3, 20 px with stride 2 at 1/8 resolution) concatenated with a 1x1 convolution of the first
    frame's features to ``redirect`` channels (``normalize_features``: the tower's features are
    normalised per channel -- zero mean, unit variance over the image -- before the correlation, a
    departure from FlowNet that makes the cost volume informative from the first steps of a short
    training); a 3x3 convolution to ``features[correlation_level - 1]``
    (FlowNet's conv3_1); the remaining levels as in :class:`FlowNetS`; the decoder's skips below the
    correlation level are the first frame's tower features. Flows per level, coarsest first."""

    def __init__(
        self,
        *,
        ndim: int,
        in_channels: int = 1,
        features: Sequence[int] = (16, 32, 64, 96, 128),
        kernels: Sequence[int] = (7, 5, 5, 3, 3),
        correlation_level: int = 3,
        max_displacement: int = 4,
        stride: int = 1,
        patch_size: int = 1,
        redirect: int = 32,
        normalize_features: bool = True,
        decoder: Sequence[int] | None = None,
        output_level: int = 2,
        activation: Activation = "leaky_relu",
        norm: Norm = "none",
    ) -> None:
        super().__init__()
        self.ndim = check_ndim(ndim)
        features, kernels = _check_widths(features, kernels)
        self.levels = len(features)
        self.normalize_features = bool(normalize_features)
        if not 1 <= correlation_level < self.levels:
            raise ConfigError(f"correlation_level must lie in 1..{self.levels - 1}, got {correlation_level}")
        self.in_channels = int(in_channels)
        self.correlation_level = int(correlation_level)
        self.tower = nn.ModuleList()
        channels = self.in_channels
        for level in range(1, correlation_level + 1):
            width, kernel = features[level - 1], kernels[level - 1]
            self.tower.append(_Level(ndim=ndim, in_channels=channels, out_channels=width, kernel=kernel, extra=False,
                                     activation=activation, norm=norm))
            channels = width
        self.correlation = Correlation(max_displacement=max_displacement, stride=stride, patch_size=patch_size)
        self.redirect = ConvBlock(ndim=ndim, in_channels=channels, out_channels=redirect, kernel_size=1,
                                  activation=activation)
        self.correlation_activation = make_activation(activation)
        merged = self.correlation.out_channels(ndim) + redirect
        self.merge = ConvBlock(ndim=ndim, in_channels=merged, out_channels=features[correlation_level - 1],
                               activation=activation, norm=norm)
        self.encoder = nn.ModuleList()
        channels = features[correlation_level - 1]
        for level in range(correlation_level + 1, self.levels + 1):
            width, kernel = features[level - 1], kernels[level - 1]
            self.encoder.append(_Level(ndim=ndim, in_channels=channels, out_channels=width, kernel=kernel, extra=True,
                                       activation=activation, norm=norm))
            channels = width
        skip_channels = [2 * in_channels, *features]
        widths = _decoder_widths(skip_channels, None if decoder is None else [0, *decoder])
        self.decoder = FlowDecoder(ndim=ndim, skip_channels=skip_channels, decoder=widths, output_level=output_level,
                                   activation=activation)
        self.config: dict[str, Any] = plain({
            "ndim": ndim, "in_channels": in_channels, "features": features, "kernels": kernels,
            "correlation_level": correlation_level, "max_displacement": max_displacement, "stride": stride,
            "patch_size": patch_size, "redirect": redirect, "normalize_features": normalize_features,
            "decoder": decoder, "output_level": output_level,
            "activation": activation, "norm": norm,
        })

    def forward(self, first: Tensor, second: Tensor, *, prior: Mapping[int, Tensor] | None = None) -> list[Tensor]:
        if first.shape != second.shape:
            raise ShapeError(f"FlowNetC: frames {tuple(first.shape)} and {tuple(second.shape)} differ")
        self.check_size(first)
        if first.shape[1] != self.in_channels:
            raise ShapeError(f"FlowNetC: expected {self.in_channels} channels per frame, got {first.shape[1]}")
        # one pass of the shared tower over both frames (batched)
        x = torch.cat([first, second], dim=0)
        skips = {0: torch.cat([first, second], dim=1)}
        for level, stage in enumerate(self.tower, start=1):
            x = stage(x)
            skips[level] = x[: first.shape[0]]
        a, b = x[: first.shape[0]], x[first.shape[0]:]
        if self.normalize_features:
            # zero mean, unit variance per channel and image: the cost volume is then a normalised
            # cross-correlation of feature maps, informative even before the tower has learned much
            fa, fb = (F.instance_norm(f.float()) for f in (a, b))
        else:
            fa, fb = a, b
        cost = self.correlation_activation(self.correlation(fa, fb))
        x = self.merge(torch.cat([cost, self.redirect(a)], dim=1))
        skips[self.correlation_level] = x
        for level, stage in enumerate(self.encoder, start=self.correlation_level + 1):
            x = stage(x)
            skips[level] = x
        return self.decoder(skips, prior)


@register_network("flownet_stack")
class FlowNetStack(_FlowNetBase):
    """FlowNet 2.0 stacking (Ilg et al. 2017; §2.3): ``first`` (a :class:`FlowNetC` or
    :class:`FlowNetS` spec or module) estimates the flow; the second frame is warped by it
    (:func:`alignkit.nets.warp_voxels`); ``second`` (a :class:`FlowNetS` with ``in_channels = 3 c + ndim + 1``)
    sees ``[first frame, second frame, warped second frame, flow x 0.1, brightness error]`` and refines:
    its decoder adds its residuals to the first network's flows at each level (the first network's
    levels must include the second's). ``forward`` returns the second network's flows; with
    ``both=True`` the pair ``(first flows, second flows)``."""

    def __init__(self, *, ndim: int, first: Mapping[str, Any] | nn.Module, second: Mapping[str, Any] | nn.Module) -> None:
        super().__init__()
        self.ndim = check_ndim(ndim)
        self.first = as_network(first)
        self.second = as_network(second)
        if not isinstance(self.first, _FlowNetBase) or not isinstance(self.second, FlowNetS):
            raise ConfigError("FlowNetStack stacks a FlowNet (first) and a FlowNetS (second)")
        channels = getattr(self.first, "in_channels", 1)
        if isinstance(self.first, FlowNetS):
            channels //= 2
        expected = 3 * channels + ndim + 1
        if self.second.in_channels != expected:
            raise ConfigError(f"the second network of a stack takes {expected} channels (3 frames, the flow, the "
                              f"brightness error), got in_channels={self.second.in_channels}")
        if self.second.decoder.output_level < self.first.decoder.output_level:
            raise ConfigError("the second network cannot predict finer levels than the first")
        self.levels = max(self.first.levels, self.second.levels)
        self.config: dict[str, Any] = {"ndim": ndim, "first": network_config(self.first),
                                       "second": network_config(self.second)}

    def full_resolution(self, flows: Sequence[Tensor]) -> Tensor:
        return self.second.full_resolution(flows)

    def forward(self, first: Tensor, second: Tensor, *, both: bool = False) -> Any:
        self.check_size(first)
        return stacked_flows(self.first, self.second, first, second, both=both)


def stacked_flows(first_net: nn.Module, second_net: FlowNetS, first: Tensor, second: Tensor, *,
                  both: bool = False, first_flows: Sequence[Tensor] | None = None) -> Any:
    """FlowNet 2.0's stacking of two networks (:class:`FlowNetStack`, written once here so that a method
    holding the two networks separately -- to train them in stages -- runs the same computation).
    ``first_flows`` (optional) are the first network's flows when already computed."""
    if first_flows is None:
        first_flows = first_net(first, second)
    flow = first_net.full_resolution(first_flows)
    warped = warp_voxels(second, flow)  # the differentiable (bilinear) warp of §2.3
    error = (first - warped).abs().sum(1, keepdim=True)
    # the first network's flows as the prior of each of the second's levels
    top = first_net.decoder.top
    prior = {top - k: f for k, f in enumerate(first_flows) if top - k <= second_net.decoder.top}
    for level in range(top + 1, second_net.decoder.top + 1):
        prior[level] = downsample_flow(first_flows[0], 2 ** (level - top))
    second_flows = second_net(first, second, warped, flow * INPUT_FLOW_SCALE, error, prior=prior)
    return (list(first_flows), second_flows) if both else second_flows
