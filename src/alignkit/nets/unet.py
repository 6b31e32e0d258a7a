"""U-Nets and multi-scale feature extractors, written once for 2D and 3D.

Shape rule (every class here)
-----------------------------
Level ``l`` of a network with ``features = (f_0, ..., f_{L-1})`` lives at spatial size
``ceil(s / 2**l)`` for an input of size ``s`` along each axis (down-sampling rounds up, so no size
needs to be a power of two and no voxel is dropped). Level 0 is the input resolution.

A U-Net with ``output_scale = 2**-k`` stops its decoder at level ``k`` (Shen et al. 2019 §2.2: "we remove the
last decoder level of the U-Net" for a half-resolution momentum), so its output is
``(B, out_channels, *[ceil(s / 2**k) for s in spatial])``. Such a low-resolution field is read like
every field in alignkit, corner-aligned: up-sample it with :func:`alignkit.spatial.resize_field`
(first and last voxel centres fixed); the network learns its values in that geometry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError, ShapeError
from alignkit.nets.blocks import (
    Activation,
    BlockKind,
    DownMode,
    Downsample,
    Norm,
    UpMode,
    Upsample,
    check_choice,
    check_ndim,
    conv_nd,
    init_near_zero,
    make_block,
)
from alignkit.nets.registry import plain, register_network


def check_input(x: Tensor, ndim: int, channels: int, who: str) -> None:
    """Shape check by name: ``x`` must be ``(B, channels, *spatial)`` with ``ndim`` spatial axes."""
    if x.dim() != ndim + 2 or x.shape[1] != channels:
        raise ShapeError(
            f"{who}: expected (B, {channels}, *spatial) with {ndim} spatial axes, got {tuple(x.shape)}"
        )


def scale_to_level(output_scale: float, levels: int) -> int:
    """``output_scale = 2**-k`` -> ``k``; anything else raises (the decoder can only stop at a level)."""
    if output_scale <= 0:
        raise ConfigError(f"output_scale must be positive, got {output_scale}")
    k = -math.log2(output_scale)
    level = round(k)
    if abs(k - level) > 1e-6 or not 0 <= level < levels:
        allowed = ", ".join(str(2.0**-i) for i in range(levels))
        raise ConfigError(f"output_scale must be one of {allowed} for {levels} levels, got {output_scale}")
    return level


class Encoder(nn.Module):
    """Contracting path: stage 0 at full resolution, stage ``l`` after ``l`` halvings.

    ``forward`` returns the list of every stage's output (the skips), finest first."""

    def __init__(
        self,
        *,
        ndim: int,
        in_channels: int,
        features: Sequence[int],
        block: BlockKind = "conv",
        norm: Norm = "none",
        activation: Activation = "leaky_relu",
        downsample: DownMode = "conv",
        large_kernel: int = 5,
        stages: int | None = None,
    ) -> None:
        super().__init__()
        features = list(features)
        count = len(features) if stages is None else stages
        if not features or min(features) < 1 or not 1 <= count <= len(features):
            raise ConfigError(
                f"encoder needs positive features and 1..{len(features)} stages, got {features}, {count}"
            )
        kw: dict[str, Any] = {
            "ndim": ndim,
            "norm": norm,
            "activation": activation,
            "large_kernel": large_kernel,
        }
        self.stages = nn.ModuleList()
        self.stages.append(make_block(block, in_channels=in_channels, out_channels=features[0], **kw))
        for level in range(1, count):
            prev, cur = features[level - 1], features[level]
            # A learned stride-2 conv can change width itself; pooling keeps it and the block does.
            down_out = cur if downsample == "conv" else prev
            self.stages.append(
                nn.Sequential(
                    Downsample(
                        ndim=ndim,
                        in_channels=prev,
                        out_channels=down_out,
                        mode=downsample,
                        norm=norm,
                        activation=activation,
                    ),
                    make_block(block, in_channels=down_out, out_channels=cur, **kw),
                )
            )

    def forward(self, x: Tensor) -> list[Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class Decoder(nn.Module):
    """Expanding path from the deepest level up to level ``stop``: at each level, up-sample to the
    skip's exact size, concatenate the skip, apply a stage of width ``features[level]``.

    ``forward(skips)`` returns ``{level: features}`` for every level from ``L - 1`` (the bottleneck,
    unchanged) down to ``stop``."""

    def __init__(
        self,
        *,
        ndim: int,
        features: Sequence[int],
        stop: int = 0,
        block: BlockKind = "conv",
        norm: Norm = "none",
        activation: Activation = "leaky_relu",
        upsample: UpMode = "linear",
        large_kernel: int = 5,
    ) -> None:
        super().__init__()
        features = list(features)
        self.top = len(features) - 1
        self.stop = stop
        kw: dict[str, Any] = {
            "ndim": ndim,
            "norm": norm,
            "activation": activation,
            "large_kernel": large_kernel,
        }
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for level in range(self.top - 1, stop - 1, -1):
            deeper = features[level + 1]
            self.ups.append(Upsample(ndim=ndim, channels=deeper, mode=upsample))
            self.blocks.append(
                make_block(block, in_channels=deeper + features[level], out_channels=features[level], **kw)
            )

    def forward(self, skips: Sequence[Tensor]) -> dict[int, Tensor]:
        x = skips[self.top]
        out = {self.top: x}
        for i, level in enumerate(range(self.top - 1, self.stop - 1, -1)):
            skip = skips[level]
            x = self.ups[i](x, tuple(skip.shape[2:]))
            x = self.blocks[i](torch.cat([x, skip], dim=1))
            out[level] = x
        return out


class _UNetBase(nn.Module):
    """Encoder + decoder stopped at ``output_scale`` + a near-zero output convolution."""

    def __init__(
        self,
        *,
        ndim: int,
        in_channels: int,
        out_channels: int,
        features: Sequence[int],
        encoder_block: BlockKind,
        decoder_block: BlockKind,
        norm: Norm,
        activation: Activation,
        output_scale: float,
        final_zero_init: bool,
        downsample: DownMode,
        upsample: UpMode,
        large_kernel: int = 5,
    ) -> None:
        super().__init__()
        self.ndim = check_ndim(ndim)
        if in_channels < 1 or out_channels < 1:
            raise ConfigError(f"channels must be positive, got in={in_channels}, out={out_channels}")
        features = list(features)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.output_level = scale_to_level(output_scale, len(features))
        common: dict[str, Any] = {
            "ndim": ndim,
            "norm": norm,
            "activation": activation,
            "large_kernel": large_kernel,
        }
        self.encoder = Encoder(
            in_channels=in_channels, features=features, block=encoder_block, downsample=downsample, **common
        )
        self.decoder = Decoder(
            features=features, stop=self.output_level, block=decoder_block, upsample=upsample, **common
        )
        self.head = conv_nd(ndim)(features[self.output_level], out_channels, 3, padding=1)
        if final_zero_init:
            init_near_zero(self.head)

    def output_shape(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Spatial shape of the output for an input of spatial shape ``spatial`` (see module docstring)."""
        return tuple(math.ceil(s / 2**self.output_level) for s in spatial)

    def forward(self, *inputs: Tensor) -> Tensor:
        """``forward(x)`` or ``forward(fixed, moving, ...)``: inputs are concatenated along channels
        (the usual registration input), so a U-Net can sit wherever a two-input network is expected."""
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)
        check_input(x, self.ndim, self.in_channels, type(self).__name__)
        decoded = self.decoder(self.encoder(x))
        return self.head(decoded[self.output_level])


@register_network("unet")
class UNet(_UNetBase):
    """U-Net with residual links (Shen et al. 2019 §2.2, the vSVF momentum generator: "a four-level U-Net with
    residual links"), also VoxelMorph's backbone with ``residual=False``.

    ``features[l]`` is the width of level ``l`` (encoder and decoder); ``len(features)`` levels means
    ``len(features) - 1`` halvings. ``output_scale = 2**-k`` drops the last ``k`` decoder levels:
    output ``(B, out_channels, *ceil(S / 2**k))`` -- 0.5 is Shen et al. 2019's half-resolution momentum.
    ``final_zero_init`` draws the output convolution from N(0, 1e-5) with zero bias, so an untrained
    registration network predicts an (almost) zero field, i.e. the identity.

    ``norm`` defaults to ``"none"`` as in VoxelMorph and LKU-Net: registration trains with batch 1,
    and instance norm fails on the 1-voxel bottleneck of small inputs.
    """

    def __init__(
        self,
        *,
        ndim: int,
        in_channels: int,
        out_channels: int,
        features: Sequence[int] = (16, 32, 32, 32),
        residual: bool = True,
        norm: Norm = "none",
        activation: Activation = "leaky_relu",
        output_scale: float = 1.0,
        final_zero_init: bool = True,
        downsample: DownMode = "conv",
        upsample: UpMode = "linear",
    ) -> None:
        block: BlockKind = "residual" if residual else "conv"
        super().__init__(
            ndim=ndim,
            in_channels=in_channels,
            out_channels=out_channels,
            features=features,
            encoder_block=block,
            decoder_block=block,
            norm=norm,
            activation=activation,
            output_scale=output_scale,
            final_zero_init=final_zero_init,
            downsample=downsample,
            upsample=upsample,
        )
        self.config: dict[str, Any] = plain(
            {
                "ndim": ndim,
                "in_channels": in_channels,
                "out_channels": out_channels,
                "features": features,
                "residual": residual,
                "norm": norm,
                "activation": activation,
                "output_scale": output_scale,
                "final_zero_init": final_zero_init,
                "downsample": downsample,
                "upsample": upsample,
            }
        )


@register_network("lkunet")
class LKUNet(_UNetBase):
    """Large-kernel U-Net ("LKU", Jia et al. 2022; Jena et al. 2024 §4.2 uses it as DIO's best feature network).

    Each encoder stage is a conv block followed by a :class:`~alignkit.nets.blocks.LargeKernelBlock`
    (parallel ``large_kernel``, 3x3 and 1x1 convolutions plus identity, summed); the decoder uses
    plain conv stages as in LKU-Net. Shapes, ``output_scale`` and ``final_zero_init`` as in :class:`UNet`.
    """

    def __init__(
        self,
        *,
        ndim: int,
        in_channels: int,
        out_channels: int,
        features: Sequence[int] = (16, 32, 32, 32),
        large_kernel: int = 5,
        norm: Norm = "none",
        activation: Activation = "leaky_relu",
        output_scale: float = 1.0,
        final_zero_init: bool = True,
        downsample: DownMode = "conv",
        upsample: UpMode = "linear",
    ) -> None:
        super().__init__(
            ndim=ndim,
            in_channels=in_channels,
            out_channels=out_channels,
            features=features,
            encoder_block="lk",
            decoder_block="conv",
            norm=norm,
            activation=activation,
            output_scale=output_scale,
            final_zero_init=final_zero_init,
            downsample=downsample,
            upsample=upsample,
            large_kernel=large_kernel,
        )
        self.config = plain(
            {
                "ndim": ndim,
                "in_channels": in_channels,
                "out_channels": out_channels,
                "features": features,
                "large_kernel": large_kernel,
                "norm": norm,
                "activation": activation,
                "output_scale": output_scale,
                "final_zero_init": final_zero_init,
                "downsample": downsample,
                "upsample": upsample,
            }
        )


@register_network("feature_encoder")
class FeatureEncoder(nn.Module):
    """Multi-scale dense feature extractor (Jena et al. 2024 §4.2 and Fig. 9, DIO's feature networks).

    Returns a list of feature maps, one per entry of ``levels`` in the order given; the map for level
    ``l`` is ``(B, out_channels, *ceil(S / 2**l))``. Each map comes out of "a single convolutional
    layer" (Jena et al. 2024 §4.2) attached to the network at that scale. Three arrangements:

    * ``independent=True`` (default, Jena et al. 2024's "Encoder-Only" UNet-E / LKU-E, Fig. 9): the decoder is
      discarded and **each level has its own encoder** of ``l`` halvings -- no weights shared across
      scales;
    * ``independent=False``: one shared encoder, a head on each stage (the cheap variant);
    * ``decoder=True``: a light U-Net decoder climbs back to ``min(levels)`` and the heads read the
      decoder features (Jena et al. 2024's full UNet / LKU feature networks), which is how full-resolution
      features get context from every scale. ``independent`` must then be False.

    ``block`` picks the stage type (``"lk"`` with ``large_kernel`` gives LKU-E); ``levels`` may be an
    int ``n`` for levels ``0 .. n-1``.
    """

    def __init__(
        self,
        *,
        ndim: int,
        in_channels: int,
        levels: int | Sequence[int] = (0, 1, 2),
        out_channels: int = 16,
        features: Sequence[int] = (16, 32, 32, 32),
        independent: bool = True,
        decoder: bool = False,
        block: BlockKind = "conv",
        large_kernel: int = 5,
        norm: Norm = "none",
        activation: Activation = "leaky_relu",
        downsample: DownMode = "conv",
        upsample: UpMode = "linear",
    ) -> None:
        super().__init__()
        self.ndim = check_ndim(ndim)
        check_choice(block, BlockKind, "block")
        features = list(features)
        level_list = list(range(levels)) if isinstance(levels, int) else [int(v) for v in levels]
        if not level_list or min(level_list) < 0 or max(level_list) >= len(features):
            raise ConfigError(
                f"levels must lie in 0..{len(features) - 1} (one per features entry), got {level_list}"
            )
        if decoder and independent:
            raise ConfigError("FeatureEncoder: decoder=True shares one encoder; set independent=False")
        self.in_channels = in_channels
        self.levels = level_list
        self.independent = independent
        self.use_decoder = decoder
        common: dict[str, Any] = {
            "ndim": ndim,
            "norm": norm,
            "activation": activation,
            "large_kernel": large_kernel,
        }
        conv = conv_nd(ndim)
        if independent:
            # One encoder per requested level, deep enough to reach it (Jena et al. 2024 Fig. 9).
            self.encoders = nn.ModuleList(
                Encoder(
                    in_channels=in_channels,
                    features=features,
                    block=block,
                    downsample=downsample,
                    stages=level + 1,
                    **common,
                )
                for level in level_list
            )
        else:
            deepest = len(features) if decoder else max(level_list) + 1
            self.encoders = nn.ModuleList(
                [
                    Encoder(
                        in_channels=in_channels,
                        features=features[:deepest],
                        block=block,
                        downsample=downsample,
                        **common,
                    )
                ]
            )
        self.decoder = (
            Decoder(features=features, stop=min(level_list), block="conv", upsample=upsample, **common)
            if decoder
            else None
        )
        self.heads = nn.ModuleList(conv(features[level], out_channels, 3, padding=1) for level in level_list)
        self.config: dict[str, Any] = plain(
            {
                "ndim": ndim,
                "in_channels": in_channels,
                "levels": level_list,
                "out_channels": out_channels,
                "features": features,
                "independent": independent,
                "decoder": decoder,
                "block": block,
                "large_kernel": large_kernel,
                "norm": norm,
                "activation": activation,
                "downsample": downsample,
                "upsample": upsample,
            }
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        check_input(x, self.ndim, self.in_channels, "FeatureEncoder")
        if self.independent:
            return [head(enc(x)[-1]) for enc, head in zip(self.encoders, self.heads)]
        skips = self.encoders[0](x)
        source: dict[int, Tensor] | list[Tensor] = self.decoder(skips) if self.decoder is not None else skips
        return [head(source[level]) for level, head in zip(self.levels, self.heads)]
