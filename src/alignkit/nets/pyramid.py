"""Two-stream pyramid U-Net and the chain of scale-specific networks of Zampieri et al., Coarse to
fine non-rigid registration: a chain of scale-specific neural networks for multimodal image
alignment with application to remote sensing, 2018 (§3.5-3.6, appendix A.1).

Field convention (everything here)
----------------------------------
Networks output **displacements in voxels of their input grid, components in array-axis order**,
``(B, ndim, *S)``: for each fixed voxel ``x``, the moving image is read at ``x + u(x)``
(``warped = moving ∘ (id + u)``, alignkit's map direction), i.e.
``sample_voxels(moving, identity + u)``. Pyramid levels are the corner-aligned grids of
:meth:`alignkit.spatial.Grid.downsampled`, so moving a field from a level of size ``s`` to one of
size ``s'`` resizes it with :func:`alignkit.spatial.resize_field` and multiplies component ``a`` by
``(s'_a - 1) / (s_a - 1)`` (:func:`alignkit.spatial.rescale_voxel_displacement`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError, ShapeError
from alignkit.nets.blocks import (
    Activation,
    ConvBlock,
    Norm,
    check_choice,
    check_ndim,
    conv_nd,
    conv_transpose_nd,
    init_near_zero,
    make_activation,
    match_size,
    max_pool_nd,
)
from alignkit.nets.registry import as_network, network_config, plain, register_network
from alignkit.nets.unet import check_input
from alignkit.spatial.filters import gaussian_blur
from alignkit.spatial.frames import voxel_identity
from alignkit.spatial.grid import Grid
from alignkit.spatial.points import (
    PaddingMode,
    rescale_voxel_displacement,
    resize_field,
    sample_voxels,
    sample_voxels_with_inside,
)
from alignkit.spatial.pyramid import downsample

ChainMode = Literal["standard", "fast", "accurate"]
#: how :class:`ScaleChain` weighs a block's answers when it smooths a residual: ``uniform`` (a plain Gaussian) or
#: ``structure`` (a normalised convolution by :func:`structure_confidence`)
ResidualWeighting = Literal["uniform", "structure"]
Combine = Literal["compose", "add"]
SymmetryGroup = Literal["full", "flips"]
#: one symmetry of the sampling grid: an axis permutation, then flips of the permuted axes.
Symmetry = tuple[tuple[int, ...], tuple[bool, ...]]


# -- fields in voxel units ----------------------------------------------------------------------
def warp_voxels(image: Tensor, displacement: Tensor, *, padding: PaddingMode = "border") -> Tensor:
    """``image ∘ (id + displacement)``: resample ``image (B, C, *S_in)`` at voxel points
    ``identity + displacement`` of the displacement's own grid ``(B, ndim, *S)``."""
    return sample_voxels(
        image, voxel_identity(displacement.shape[2:], like=displacement) + displacement, padding=padding
    )


def compose_displacements(outer: Tensor, inner: Tensor) -> Tensor:
    """Displacement of ``(id + outer) ∘ (id + inner)``: ``inner(x) + outer(x + inner(x))``.

    Used when a previous estimate ``outer`` warped the moving image and a network found the
    residual ``inner`` between the fixed and that warped image: ``moving ∘ (id+outer) ∘ (id+inner)``.
    ``outer`` is read with border padding (its edge values extend outward)."""
    if outer.shape != inner.shape:
        raise ShapeError(f"compose_displacements: {tuple(outer.shape)} vs {tuple(inner.shape)}")
    return inner + warp_voxels(outer, inner, padding="border")


def invert_displacement(displacement: Tensor, *, iterations: int = 20) -> Tensor:
    """Displacement ``v`` of ``(id + displacement)^-1`` on the same grid: the fixed point of
    ``v(x) = -displacement(x + v(x))`` (border padding), reached by iterating it from ``v = 0`` -- a contraction
    wherever the map's Jacobian stays near the identity, as smooth fields of a few voxels do."""
    inverse = torch.zeros_like(displacement)
    for _ in range(int(iterations)):
        inverse = -warp_voxels(displacement, inverse, padding="border")
    return inverse


# -- symmetries of the grid (Zampieri et al. 2018 "accurate") ----------------------------------------------------
def symmetry_group(ndim: int, kind: SymmetryGroup = "full") -> list[Symmetry]:
    """``full``: every axis permutation and flip (``2^n n!``: the 8 rotations/reflections of a square in
    2D, 48 in 3D); ``flips``: flips only (``2^n``). The identity comes first."""
    check_choice(kind, SymmetryGroup, "symmetry group")
    perms = list(itertools.permutations(range(ndim))) if kind == "full" else [tuple(range(ndim))]
    flips = list(itertools.product((False, True), repeat=ndim))
    return [(perm, flip) for perm in perms for flip in flips]


def apply_symmetry(x: Tensor, symmetry: Symmetry) -> Tensor:
    """Rearrange the spatial axes of ``x (B, C, *S)``: new axis ``a`` is old axis ``perm[a]``, then new
    axes with ``flip[a]`` are reversed. Channels are untouched (fields need
    :func:`symmetry_push_field`, which also rotates their components)."""
    perm, flip = symmetry
    y = x.permute(0, 1, *(2 + p for p in perm))
    dims = [2 + a for a, f in enumerate(flip) if f]
    return y.flip(dims) if dims else y


def _undo_symmetry(y: Tensor, symmetry: Symmetry) -> Tensor:
    perm, flip = symmetry
    dims = [2 + a for a, f in enumerate(flip) if f]
    x = y.flip(dims) if dims else y
    inverse = sorted(range(len(perm)), key=lambda a: perm[a])
    return x.permute(0, 1, *(2 + inverse[k] for k in range(len(perm))))


def _signs(symmetry: Symmetry, like: Tensor) -> Tensor:
    ndim = len(symmetry[0])
    return torch.tensor([-1.0 if f else 1.0 for f in symmetry[1]], dtype=like.dtype, device=like.device).view(
        1, ndim, *([1] * ndim)
    )


def symmetry_push_field(u: Tensor, symmetry: Symmetry) -> Tensor:
    """The displacement that warps the rearranged image as ``u`` warps the original:
    ``T(moving ∘ (id + u)) = T(moving) ∘ (id + push(u))`` for ``T = apply_symmetry(·, symmetry)``.

    Spatially rearranged like an image; component ``a`` is old component ``perm[a]``, negated when
    axis ``a`` is flipped."""
    perm, _ = symmetry
    return apply_symmetry(u, symmetry)[:, list(perm)] * _signs(symmetry, u)


def symmetry_pull_field(v: Tensor, symmetry: Symmetry) -> Tensor:
    """Inverse of :func:`symmetry_push_field`: a field estimated on rearranged images, back in the
    original frame."""
    perm, _ = symmetry
    inverse = sorted(range(len(perm)), key=lambda a: perm[a])
    return _undo_symmetry((v * _signs(symmetry, v))[:, inverse], symmetry)


def predict_residual(
    net: nn.Module, fixed: Tensor, warped: Tensor, *, symmetries: SymmetryGroup | None = None
) -> Tensor:
    """``net(fixed, warped)`` as a displacement on ``fixed``'s grid (resized when the network answers
    on another size); with ``symmetries`` (Zampieri et al. 2018's "accurate"), the mean over
    :func:`symmetry_group` of the network's answers on the rearranged pair, each mapped back by
    :func:`symmetry_pull_field` -- 8 evaluations in 2D (``"full"``)."""
    shape = tuple(fixed.shape[2:])
    if symmetries is None:
        r = net(fixed, warped)
        return r if tuple(r.shape[2:]) == shape else resize_field(r, shape)
    answers = []
    for g in symmetry_group(fixed.dim() - 2, symmetries):
        r = net(apply_symmetry(fixed, g), apply_symmetry(warped, g))
        target = tuple(apply_symmetry(fixed[:1, :1], g).shape[2:])
        r = r if tuple(r.shape[2:]) == target else resize_field(r, target)
        answers.append(symmetry_pull_field(r, g))
    return torch.stack(answers).mean(dim=0)


# -- Zampieri et al. 2018 appendix A.1 ---------------------------------------------------------------------------
@register_network("pyramid_unet")
class PyramidUNet(nn.Module):
    """Two-stream pyramid U-Net of Zampieri et al. 2018 (§3.5, appendix A.1): the network of one scale-specific block.

    Each input (``fixed`` and ``moving``, typically two modalities: Zampieri et al. 2018 aligns RGB with cadastral
    maps) has its **own convolutional pyramid** ("to get modality-specific features, we build 2
    separate convolutional pyramids, one for each modality ... but concatenate their activities once
    per scale to feed the U-net"). With the defaults it is the table of A.1:

    * stream level 0: conv 5x5 x16, conv 5x5 x32 (``first_kernel``, ``stream_features[0] // 2``, then
      ``stream_features[0]``); level ``l > 0``: 2x2 max-pool, two 3x3 convs of ``stream_features[l]``
      (32, 32 then 64, 64);
    * merge at each level: concatenate the two streams, two 3x3 convs of ``merge_features[l]``
      (32, 64, 64 -- A.1's conv-7..12);
    * decoder: from the deepest level up, a 3x3 stride-2 deconvolution to ``merge_features[l]``
      channels, concatenation with the merged level ``l``, two 3x3 convs of ``decoder_features[l]``
      (64, 64); at level 0 one more conv of ``head_features`` (32) and the output conv (``ndim``).

    Output: ``(B, out_channels, *S)``, a displacement at the input's scale in voxels (array-axis
    order; see the module docstring). ``final_zero_init`` starts it at (almost) zero: the identity.
    A.1 names no normalisation and no activation; ``norm="none"`` and leaky ReLU are used.
    ``shared_streams=True`` ties the two pyramids (a siamese variant for one modality).
    """

    def __init__(
        self,
        *,
        ndim: int,
        in_channels: int | Sequence[int] = 1,
        out_channels: int | None = None,
        stream_features: Sequence[int] = (32, 32, 64),
        first_kernel: int = 5,
        merge_features: Sequence[int] = (32, 64, 64),
        decoder_features: Sequence[int] = (64, 64),
        head_features: int = 32,
        shared_streams: bool = False,
        norm: Norm = "none",
        activation: Activation = "leaky_relu",
        final_zero_init: bool = True,
    ) -> None:
        super().__init__()
        self.ndim = check_ndim(ndim)
        channels = (
            [in_channels, in_channels] if isinstance(in_channels, int) else [int(c) for c in in_channels]
        )
        stream_features, merge_features = list(stream_features), list(merge_features)
        decoder_features = list(decoder_features)
        levels = len(stream_features)
        if len(channels) != 2 or min(channels) < 1:
            raise ConfigError(
                f"PyramidUNet: in_channels is one count or one per stream (2), got {in_channels}"
            )
        if levels < 1 or len(merge_features) != levels or len(decoder_features) != levels - 1:
            raise ConfigError(
                "PyramidUNet: need len(merge_features) == len(stream_features) == len(decoder_features) + 1, "
                f"got {stream_features}, {merge_features}, {decoder_features}"
            )
        if shared_streams and channels[0] != channels[1]:
            raise ConfigError(f"PyramidUNet: shared streams need equal in_channels, got {channels}")
        if first_kernel < 1 or first_kernel % 2 == 0:
            raise ConfigError(f"first_kernel must be odd, got {first_kernel}")
        self.in_channels = channels
        self.out_channels = ndim if out_channels is None else out_channels
        self.levels = levels
        kw: dict[str, Any] = {"ndim": ndim, "norm": norm, "activation": activation}

        def stream(cin: int) -> nn.ModuleList:
            first = max(1, stream_features[0] // 2)
            stages = [
                nn.Sequential(
                    ConvBlock(in_channels=cin, out_channels=first, kernel_size=first_kernel, **kw),
                    ConvBlock(
                        in_channels=first, out_channels=stream_features[0], kernel_size=first_kernel, **kw
                    ),
                )
            ]
            for prev, cur in itertools.pairwise(stream_features):
                stages.append(
                    nn.Sequential(
                        max_pool_nd(ndim)(
                            2, stride=2, ceil_mode=True
                        ),  # ceil: odd sizes keep their last voxel
                        ConvBlock(in_channels=prev, out_channels=cur, **kw),
                        ConvBlock(in_channels=cur, out_channels=cur, **kw),
                    )
                )
            return nn.ModuleList(stages)

        self.stream_fixed = stream(channels[0])
        # A shared stream is the same module object: parameters registered once, updated together.
        self.stream_moving = self.stream_fixed if shared_streams else stream(channels[1])
        self.merge = nn.ModuleList(
            nn.Sequential(
                ConvBlock(in_channels=2 * sf, out_channels=mf, **kw),
                ConvBlock(in_channels=mf, out_channels=mf, **kw),
            )
            for sf, mf in zip(stream_features, merge_features)
        )
        self.deconvs = nn.ModuleList()
        self.deconv_acts = nn.ModuleList()
        self.decoder = nn.ModuleList()
        deeper = merge_features[-1]
        for level in range(levels - 2, -1, -1):
            # 3x3 stride-2 deconvolution (A.1's deconvolution-1/2) giving exactly 2x the size.
            self.deconvs.append(
                conv_transpose_nd(ndim)(
                    deeper, merge_features[level], 3, stride=2, padding=1, output_padding=1
                )
            )
            self.deconv_acts.append(make_activation(activation, merge_features[level]))
            df = decoder_features[level]
            self.decoder.append(
                nn.Sequential(
                    ConvBlock(in_channels=2 * merge_features[level], out_channels=df, **kw),
                    ConvBlock(in_channels=df, out_channels=df, **kw),
                )
            )
            deeper = df
        self.head = ConvBlock(in_channels=deeper, out_channels=head_features, **kw)
        self.out = conv_nd(ndim)(head_features, self.out_channels, 3, padding=1)
        if final_zero_init:
            init_near_zero(self.out)
        self.config: dict[str, Any] = plain(
            {
                "ndim": ndim,
                "in_channels": channels,
                "out_channels": self.out_channels,
                "stream_features": stream_features,
                "first_kernel": first_kernel,
                "merge_features": merge_features,
                "decoder_features": decoder_features,
                "head_features": head_features,
                "shared_streams": shared_streams,
                "norm": norm,
                "activation": activation,
                "final_zero_init": final_zero_init,
            }
        )

    @staticmethod
    def _pyramid(stream: nn.ModuleList, x: Tensor) -> list[Tensor]:
        out = []
        for stage in stream:
            x = stage(x)
            out.append(x)
        return out

    def forward(self, fixed: Tensor, moving: Tensor) -> Tensor:
        check_input(fixed, self.ndim, self.in_channels[0], "PyramidUNet fixed")
        check_input(moving, self.ndim, self.in_channels[1], "PyramidUNet moving")
        if fixed.shape[0] != moving.shape[0] or fixed.shape[2:] != moving.shape[2:]:
            raise ShapeError(
                f"PyramidUNet: fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} "
                "must share batch and grid"
            )
        pyr_f = self._pyramid(self.stream_fixed, fixed)
        pyr_m = self._pyramid(self.stream_moving, moving)
        merged = [m(torch.cat([a, b], dim=1)) for m, a, b in zip(self.merge, pyr_f, pyr_m)]
        x = merged[-1]
        for i, level in enumerate(range(self.levels - 2, -1, -1)):
            skip = merged[level]
            x = self.deconv_acts[i](match_size(self.deconvs[i](x), tuple(skip.shape[2:])))
            x = self.decoder[i](torch.cat([x, skip], dim=1))
        return self.out(self.head(x))


#: tiles start on multiples of this (two 2x poolings in a PyramidUNet): tiled = untiled away from seams
TILE_ALIGN = 4
#: ``(core, extended)`` slices of one tile
Tile = tuple[tuple[slice, ...], tuple[slice, ...]]


def tile_slices(shape: Sequence[int], tile: int | None, halo: int) -> list[Tile]:
    """``(core, extended)`` slice tuples covering ``shape`` once: cores of ``tile - 2 halo`` voxels per
    axis (rounded down to a multiple of :data:`TILE_ALIGN`), each read with ``halo`` voxels of context
    (clipped at the border). One tile when ``tile`` is None or the grid fits in it. Every extended
    tile starts on a multiple of :data:`TILE_ALIGN`, so a network that pools twice sees the pooling
    grid of the untiled image."""
    shape = tuple(int(s) for s in shape)
    if tile is None or all(s <= tile for s in shape):
        whole = tuple(slice(0, s) for s in shape)
        return [(whole, whole)]
    if halo < 0 or halo % TILE_ALIGN:
        raise ConfigError(f"tile halo must be a non-negative multiple of {TILE_ALIGN}, got {halo}")
    core = (tile - 2 * halo) // TILE_ALIGN * TILE_ALIGN
    if core < TILE_ALIGN:
        raise ConfigError(f"tile {tile} leaves no core with a halo of {halo} voxels; use a larger tile")
    spans = [
        [(slice(a, min(a + core, s)), slice(max(a - halo, 0), min(a + core + halo, s))) for a in range(0, s, core)]
        for s in shape
    ]
    return [(tuple(c for c, _ in combo), tuple(e for _, e in combo)) for combo in itertools.product(*spans)]


def _box_voxels(box: Sequence[slice], like: Tensor) -> Tensor:
    """``(1, ndim, *box shape)``: the voxel coordinates, on the whole level's grid, of the points of a tile's box."""
    ndim = len(box)
    origin = torch.tensor([b.start for b in box], dtype=like.dtype, device=like.device).view(1, ndim, *([1] * ndim))
    return voxel_identity(tuple(b.stop - b.start for b in box), like=like) + origin


#: the anti-alias blur of :func:`~alignkit.spatial.pyramid.downsample` by halving, input voxels per shrink factor
ANTI_ALIAS_SIGMA_PER_FACTOR = 0.55


def _shrink_for(sigma: float) -> int:
    """The shrink factor of :func:`smooth_field`'s grid for a Gaussian of ``sigma`` voxels (1: the level's own)."""
    return max(1, int(sigma // 2))


def _smooth_on_shrunk_grid(field: Tensor, sigma: float, shrink: int) -> Tensor:
    """``field`` blurred by ``sigma`` voxels on its grid shrunk by ``shrink`` (left there): the anti-alias blur of
    :func:`~alignkit.spatial.pyramid.downsample` counts towards ``sigma`` (Gaussians add in quadrature; the halving
    blur is ~0.55 x shrink input voxels), the rest is blurred on the small grid."""
    small, _ = downsample(field, Grid.from_spacing(tuple(field.shape[2:])), shrink)
    remaining = math.sqrt(max(sigma**2 - (ANTI_ALIAS_SIGMA_PER_FACTOR * shrink) ** 2, 0.0)) / shrink
    return gaussian_blur(small, remaining) if remaining > 0 else small


def smooth_field(field: Tensor, sigma: float) -> Tensor:
    """``field (B, C, *S)`` smoothed by a Gaussian of ``sigma`` voxels. A wide Gaussian runs on a grid shrunk so
    that it spans ~2 of its voxels (:func:`_smooth_on_shrunk_grid`, then a corner-aligned :func:`resize_field`
    back): the cost stays that of a short kernel whatever ``sigma``, so a level of 5000 x 5000 pixels smooths at the
    price of a small one."""
    if sigma <= 0:
        return field
    shrink = _shrink_for(sigma)
    if shrink == 1:
        return gaussian_blur(field, sigma)
    return resize_field(_smooth_on_shrunk_grid(field, sigma, shrink), tuple(field.shape[2:]))


#: :func:`structure_confidence`: σ (voxels of the level) of the blur of the gradient magnitude, and the weight left to
#: pixels with no structure (so that a level with none at all still averages its answers)
STRUCTURE_SIGMA = 2.0
STRUCTURE_FLOOR = 0.01


#: voxels of the first axis per strip of :func:`structure_confidence` (a 5000 x 5000 level in ~20 strips: its
#: temporaries are a strip's, not the level's)
STRUCTURE_STRIP = 256


def _blurred_gradient_magnitude(image: Tensor) -> Tensor:
    """``|∇ mean-over-channels(image)|`` (central differences) blurred by :data:`STRUCTURE_SIGMA`, ``(B, 1, *S)``."""
    grey = image.mean(dim=1, keepdim=True)
    magnitude = torch.zeros_like(grey)
    for derivative in torch.gradient(grey, dim=tuple(range(2, grey.dim()))):
        magnitude += derivative.square()
    return gaussian_blur(magnitude.sqrt_(), STRUCTURE_SIGMA)


def structure_confidence(fixed: Tensor, moving: Tensor, displacement: Tensor) -> Tensor:
    """``(B, 1, *S)`` in ``[STRUCTURE_FLOOR, 1]``: how much a block's answer at each voxel can be trusted, from what
    it could see there -- the product, over the fixed image and the moving image read through ``displacement``
    (voxels, the map so far), of ``g / (g + mean g)`` with ``g`` the gradient magnitude blurred by
    :data:`STRUCTURE_SIGMA` voxels (each image against its own mean: no contrast scale is assumed), times 0 where
    the moving image is read outside its grid (a block sees only replicated border there). A flat region of
    either modality (the inside of the brain in CT, the sky) says nothing about the displacement; a block still
    answers there, and a normalised convolution by these weights lets the neighbours with structure answer
    instead (Knutsson and Westin, "Normalized and differential convolution", 1993).

    Computed in strips of :data:`STRUCTURE_STRIP` voxels along the first axis, each read with a margin that
    covers the differences and the blur, so the result is the whole level's and the memory a strip's."""
    ndim = displacement.shape[1]
    shape = tuple(displacement.shape[2:])
    length = shape[0]
    margin = math.ceil(3.0 * STRUCTURE_SIGMA) + 1  # gaussian_blur's reach (truncate 3) + the central difference
    magnitudes = torch.empty(2, displacement.shape[0], 1, *shape, dtype=displacement.dtype, device=displacement.device)
    inside = torch.empty(displacement.shape[0], 1, *shape, dtype=torch.bool, device=displacement.device)
    for start in range(0, length, STRUCTURE_STRIP):
        stop = min(start + STRUCTURE_STRIP, length)
        low, high = max(0, start - margin), min(length, stop + margin)
        core = slice(start - low, stop - low)
        rows = (slice(None), slice(None), slice(low, high))
        points = _box_voxels((slice(low, high), *(slice(0, n) for n in shape[1:])), displacement) + displacement[rows]
        warped, within = sample_voxels_with_inside(moving, points, compiled=False)
        magnitudes[0][:, :, start:stop] = _blurred_gradient_magnitude(fixed[rows])[:, :, core]
        magnitudes[1][:, :, start:stop] = _blurred_gradient_magnitude(warped)[:, :, core]
        inside[:, :, start:stop] = within[:, :, core] > 0
    # against the mean, not the median: where most of the image is flat background (a brain slice, CT) the
    # median is 0 and every voxel with any gradient at all would count as fully structured
    weight = None
    for magnitude in magnitudes:
        scale = magnitude.flatten(1).mean(dim=1).view(-1, *([1] * (ndim + 1)))
        ratio = magnitude.div_(magnitude + scale + 1e-12)
        weight = ratio if weight is None else weight.mul_(ratio)
    assert weight is not None
    return weight.mul_(inside).clamp_(min=STRUCTURE_FLOOR)


def weighted_smooth_field(field: Tensor, weight: Tensor, sigma: float) -> Tensor:
    """Normalised convolution of ``field (B, C, *S)`` by ``weight (B, 1, *S)`` (> 0): ``G*(w f) / G*(w)``, with
    ``G`` the Gaussian of :func:`smooth_field`; a constant weight gives :func:`smooth_field`. A wide Gaussian runs
    on :func:`smooth_field`'s shrunk grid, where the ratio is taken before the one resize back (both terms are
    smooth there; the level-sized temporaries are the product ``w f`` and the result)."""
    if sigma <= 0:
        return field
    shrink = _shrink_for(sigma)
    if shrink == 1:
        return gaussian_blur(field * weight, sigma).div_(gaussian_blur(weight, sigma).clamp_min(1e-12))
    numerator = _smooth_on_shrunk_grid(field * weight, sigma, shrink)
    denominator = _smooth_on_shrunk_grid(weight, sigma, shrink)
    return resize_field(numerator / denominator.clamp_min(1e-12), tuple(field.shape[2:]))


def weighted_translation(field: Tensor, weight: Tensor | None = None) -> Tensor:
    """``field (B, C, *S)`` replaced by its mean over the grid, weighted by ``weight (B, 1, *S)`` (> 0; ``None``:
    uniform): the translation that best explains the field in the weighted least-squares sense, as a field."""
    if weight is None:
        mean = field.flatten(2).mean(dim=2)
    else:
        w = weight.flatten(2)
        mean = (field.flatten(2) * w).sum(dim=2) / w.sum(dim=2).clamp_min(1e-12)
    return mean.view(*mean.shape, *([1] * (field.dim() - 2))).expand_as(field).clone()


def _level_flags(value: bool | Sequence[bool], levels: int, name: str) -> list[bool]:
    """One flag for every level, or one per level: a list of ``levels`` booleans."""
    flags = [bool(value)] * levels if isinstance(value, bool) else [bool(x) for x in value]
    if len(flags) != levels:
        raise ConfigError(f"ScaleChain: {name} needs one flag per factor ({levels}), got {value}")
    return flags


@register_network("scale_chain")
class ScaleChain(nn.Module):
    """Chain of scale-specific networks, coarse to fine (Zampieri et al. 2018 §3.6, Fig. 4).

    For each shrink factor ``f`` in ``factors`` (descending, e.g. ``(4, 2, 1)``; Zampieri et al. 2018 uses powers of
    two down to 1): down-sample fixed and moving onto the level grid
    (:func:`alignkit.spatial.downsample`, blurred, corner-aligned), resample the *level's* moving
    image once through the current estimate (moved to the level grid by
    :func:`~alignkit.spatial.rescale_voxel_displacement`),
    let the level's network predict the residual ``r`` between fixed and warped moving, and update

    * ``combine="compose"`` (Zampieri et al. 2018: "refining the previously-estimated deformation, not by adding to
      it but by diffeomorphism composition"): ``u <- r + u ∘ (id + r)`` (:func:`compose_displacements`);
    * ``combine="add"``: ``u <- u + r`` (Zampieri et al. 2018 §4's stereo variant links the blocks "with additions").

    ``networks`` holds one network (or config dict) per factor, or a single one shared by all scales
    (Zampieri et al. 2018's scale-independent alternative). Each is called ``net(fixed_level, warped_level)`` and
    returns a displacement in voxels of the level grid (any output size is resized to the level).

    Inference modes (``mode``, overridable per call), as named in Zampieri et al. 2018 §3.6:

    * ``"standard"``: the scale-specific network at each scale;
    * ``"fast"``: "replace all scale-specific blocks with the same block" -- the network at
      ``fast_index`` (default the finest) serves every scale;
    * ``"accurate"``: "apply the network on symmetrised and rotated versions of the input images,
      and average the result over these 8 tests". Done per block, so later scales start from the
      averaged estimate: each residual is the mean over ``symmetry_group(ndim, symmetries)`` of the
      network's answers mapped back by :func:`symmetry_pull_field` (8 evaluations per scale in 2D,
      48 in 3D with ``"full"``, 8 with ``"flips"``).

    ``passes`` (per level, or one for all): how many times each level's block runs, each pass reading the level's
    moving image through the map so far and composing one more residual; with ``pass_tolerance`` > 0 (voxels of
    the level), a level stops after ``min_passes`` (default ``passes``) as soon as a pass's residual has a mean
    length under the tolerance. ``symmetric_levels`` (per level, or one for all): run that level also with the two
    images swapped, from the inverse of the incoming map, and average the map with the inverse of that answer.
    ``translation_levels`` (per level, or one for all): that level's residual is reduced to its mean over the level
    (:func:`weighted_translation`, weighted by :func:`structure_confidence` with ``residual_weighting="structure"``)
    instead of being smoothed: a level that only moves the whole image.

    ``residual_sigma`` (voxels of each level, default 0) smooths every level's whole residual by a Gaussian
    before it is composed (:func:`smooth_field`, after the tiles, so tiling changes nothing): a block's answer
    varies from pixel to pixel more than the deformations it learnt do (eq. 3's bumps are 0.1-0.3 of a
    training patch wide, in pixels of the block's level). ``residual_weighting="structure"`` makes that smoothing a
    normalised convolution by :func:`structure_confidence` of the level's fixed image and moving image read
    through the map so far (:func:`weighted_smooth_field`): where either image is flat, the block's answer gives
    way to its neighbours'.

    ``forward`` returns the displacement ``(B, ndim, *S)`` on the input grid, in its voxels;
    :meth:`levels` returns the estimate after each level on that level's grid. Zampieri et al. 2018 trains each block
    on its own scale; the chain is the inference (and optional end-to-end fine-tuning) path.
    """

    def __init__(
        self,
        *,
        networks: Sequence[Mapping[str, Any] | nn.Module],
        factors: Sequence[float] = (4, 2, 1),
        combine: Combine = "compose",
        mode: ChainMode = "standard",
        fast_index: int = -1,
        symmetries: SymmetryGroup = "full",
        padding: PaddingMode = "border",
        passes: int | Sequence[int] = 1,
        residual_sigma: float = 0.0,
        residual_weighting: ResidualWeighting = "uniform",
        min_passes: int | Sequence[int] | None = None,
        pass_tolerance: float = 0.0,
        symmetric_levels: bool | Sequence[bool] = False,
        translation_levels: bool | Sequence[bool] = False,
    ) -> None:
        super().__init__()
        if not float(pass_tolerance) >= 0:
            raise ConfigError(f"ScaleChain: pass_tolerance must be >= 0 voxels, got {pass_tolerance}")
        self.pass_tolerance = float(pass_tolerance)
        self.residual_weighting = check_choice(residual_weighting, ResidualWeighting, "residual weighting")
        if not float(residual_sigma) >= 0:
            raise ConfigError(f"ScaleChain: residual_sigma must be >= 0 voxels, got {residual_sigma}")
        self.residual_sigma = float(residual_sigma)
        factor_list = [float(f) for f in factors]
        pass_list = [int(passes)] * len(factor_list) if isinstance(passes, int) else [int(p) for p in passes]
        if len(pass_list) != len(factor_list) or min(pass_list) < 1:
            raise ConfigError(f"ScaleChain: passes must be >= 1, one per factor ({len(factor_list)}), got {passes}")
        if min_passes is None:
            min_list = list(pass_list)
        else:
            min_list = [int(min_passes)] * len(factor_list) if isinstance(min_passes, int) else [int(p) for p in min_passes]
        if len(min_list) != len(factor_list) or any(not 1 <= m <= p for m, p in zip(min_list, pass_list)):
            raise ConfigError(f"ScaleChain: min_passes must be between 1 and passes ({pass_list}), one per factor, "
                              f"got {min_passes}")
        if not factor_list or min(factor_list) < 1 or any(a <= b for a, b in itertools.pairwise(factor_list)):
            raise ConfigError(
                f"ScaleChain: factors must be >= 1 and strictly decreasing (coarse first), got {factors}"
            )
        if isinstance(networks, (Mapping, nn.Module)) or len(networks) not in (1, len(factor_list)):
            raise ConfigError(
                f"ScaleChain: give one network per factor ({len(factor_list)}) or a single shared one"
            )
        check_choice(combine, Combine, "combine")
        check_choice(mode, ChainMode, "chain mode")
        check_choice(symmetries, SymmetryGroup, "symmetry group")
        self.networks = nn.ModuleList(as_network(n) for n in networks)
        if not -len(self.networks) <= fast_index < len(self.networks):
            raise ConfigError(
                f"ScaleChain: fast_index {fast_index} out of range for {len(self.networks)} networks"
            )
        self.factors = factor_list
        self.passes = pass_list
        self.min_passes = min_list
        symmetric_list = _level_flags(symmetric_levels, len(factor_list), "symmetric_levels")
        self.symmetric_levels = symmetric_list
        translation_list = _level_flags(translation_levels, len(factor_list), "translation_levels")
        self.translation_levels = translation_list
        self.combine = combine
        self.mode = mode
        self.fast_index = fast_index
        self.symmetries = symmetries
        self.padding = padding
        self.config: dict[str, Any] = plain(
            {
                "networks": [network_config(n) for n in self.networks],
                "factors": factor_list,
                "combine": combine,
                "mode": mode,
                "fast_index": fast_index,
                "symmetries": symmetries,
                "padding": padding,
                "passes": pass_list,
                "min_passes": min_list,
                "pass_tolerance": float(pass_tolerance),
                "symmetric_levels": symmetric_list,
                "translation_levels": translation_list,
                "residual_sigma": float(residual_sigma),
                "residual_weighting": residual_weighting,
            }
        )

    def network_for(self, index: int, mode: ChainMode) -> nn.Module:
        if len(self.networks) == 1:
            return self.networks[0]
        return self.networks[self.fast_index] if mode == "fast" else self.networks[index]

    def _residual(self, net: nn.Module, fixed: Tensor, warped: Tensor, mode: ChainMode) -> Tensor:
        return predict_residual(net, fixed, warped, symmetries=self.symmetries if mode == "accurate" else None)

    def _level(self, net: nn.Module, fixed_l: Tensor, moving_l: Tensor, u: Tensor, plan: list[Tile], index: int,
               mode: ChainMode, bar: Any) -> Tensor:
        """One level's passes from the map ``u`` (voxels of the level): the updated map."""
        all_channels = (slice(None), slice(None))
        # each pass reads the level's own moving image through the map so far (never a resample
        # of a resample) and composes one more residual: a block whose level holds displacements
        # beyond its task (the coarsest level) catches up with a second look
        for done in range(1, self.passes[index] + 1):
            # the level's residual, tile by tile (each tile's core, read with its halo of context)
            residual = torch.empty_like(u)
            for core, ext in plan:
                identity = _box_voxels(ext, u)
                warped = sample_voxels(moving_l, identity + u[(*all_channels, *ext)], padding=self.padding)
                r = self._residual(net, fixed_l[(*all_channels, *ext)], warped, mode)
                inner = tuple(slice(c.start - e.start, c.stop - e.start) for c, e in zip(core, ext))
                residual[(*all_channels, *core)] = r[(*all_channels, *inner)]
                if bar is not None:
                    bar.update(1)
            # a block's answer varies pixel to pixel; the field does not
            if self.translation_levels[index]:  # a level trusted for the whole image's shift only
                residual = weighted_translation(residual, structure_confidence(fixed_l, moving_l, u)
                                                if self.residual_weighting == "structure" else None)
            elif self.residual_sigma > 0 and self.residual_weighting == "structure":
                residual = weighted_smooth_field(residual, structure_confidence(fixed_l, moving_l, u),
                                                 self.residual_sigma)
            elif self.residual_sigma > 0:
                residual = smooth_field(residual, self.residual_sigma)
            if self.combine == "compose":  # u <- r + u∘(id + r), read from the whole level's map
                updated = torch.empty_like(u)
                for core, _ in plan:
                    r = residual[(*all_channels, *core)]
                    updated[(*all_channels, *core)] = r + sample_voxels(u, _box_voxels(core, u) + r,
                                                                        padding="border")
                u = updated
            else:
                u = u + residual
            # past its minimum a level stops once a pass moves it little: each look at a level a block
            # has caught up with adds its small bias on the pair, which the later passes would pile up
            if (done >= self.min_passes[index] and self.pass_tolerance > 0
                    and float(residual.norm(dim=1).mean()) < self.pass_tolerance):
                if bar is not None:  # the passes not run: the bar still ends full
                    bar.update(len(plan) * (self.passes[index] - done))
                break
        return u

    def levels(
        self,
        fixed: Tensor,
        moving: Tensor,
        *,
        mode: ChainMode | None = None,
        tile: int | None = None,
        halo: int = 32,
        progress: Any = None,
    ) -> list[Tensor]:
        """The estimate after each level, ``(B, ndim, *level_shape)`` in voxels of that level.

        ``tile``: run each level in tiles of at most ``tile`` voxels a side with ``halo`` voxels of
        context (:func:`tile_slices`; only each tile's core is kept), so the networks' memory is
        bounded by the tile whatever the image size. Each tile reads the level's moving image once,
        through the current map, and composes its residual with the whole level's map (the map,
        not the image, is carried between levels). ``progress``: a tqdm-like factory, one step per
        tile."""
        mode = self.mode if mode is None else check_choice(mode, ChainMode, "chain mode")  # type: ignore[assignment]
        ndim = fixed.dim() - 2
        if ndim not in (2, 3) or fixed.shape[0] != moving.shape[0] or fixed.shape[2:] != moving.shape[2:]:
            raise ShapeError(
                f"ScaleChain: fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} "
                "must be (B, C, *S) on one grid"
            )
        grid = Grid.from_spacing(tuple(fixed.shape[2:]))
        shapes = [grid.downsampled(f).shape if f > 1 else grid.shape for f in self.factors]
        plans = [tile_slices(shape, tile, halo) for shape in shapes]
        runs = [2 if symmetric else 1 for symmetric in self.symmetric_levels]
        bar = (progress(total=sum(len(p) * n * k for p, n, k in zip(plans, self.passes, runs)), desc="scale chain",
                        unit="tile") if progress else None)
        u: Tensor | None = None
        out = []
        try:
            for index, (factor, plan) in enumerate(zip(self.factors, plans)):
                fixed_l, level_grid = downsample(fixed, grid, factor)
                moving_l, _ = downsample(moving, grid, factor)
                if u is None:
                    u = fixed_l.new_zeros(fixed.shape[0], ndim, *level_grid.shape)
                else:
                    u = rescale_voxel_displacement(u, level_grid.shape)
                net = self.network_for(index, mode)
                incoming = u
                u = self._level(net, fixed_l, moving_l, incoming, plan, index, mode, bar)  # type: ignore[arg-type]
                if self.symmetric_levels[index]:
                    # the same level the other way round, from the inverse of the incoming map; the two answers
                    # averaged (the backward one inverted): a block's bias that depends on which image it reads as
                    # fixed cancels
                    backward = self._level(net, moving_l, fixed_l, invert_displacement(incoming), plan, index,
                                           mode, bar)  # type: ignore[arg-type]
                    u = 0.5 * (u + invert_displacement(backward))
                out.append(u)
        finally:
            if bar is not None:
                bar.close()
        return out

    def forward(
        self, fixed: Tensor, moving: Tensor, *, mode: ChainMode | None = None, tile: int | None = None,
        halo: int = 32, progress: Any = None,
    ) -> Tensor:
        u = self.levels(fixed, moving, mode=mode, tile=tile, halo=halo, progress=progress)[-1]
        return rescale_voxel_displacement(u, tuple(fixed.shape[2:]))
