"""Losses of learned optical flow: supervised multi-scale end-point error and the unsupervised,
occlusion-aware photometric losses (the survey of deep-learning registration, §2-3).

* :func:`multiscale_epe` -- FlowNet's loss (Dosovitskiy et al., FlowNet: Learning Optical Flow with
  Convolutional Networks, ICCV 2015): the end-point error of each decoder level's flow against the
  box-averaged ground truth, weighted per level;
* :func:`census_transform` / :func:`census_distance` -- the soft ternary census of Meister, Hur and
  Roth, UnFlow: Unsupervised Learning of Optical Flow with a Bidirectional Census Loss, AAAI 2018
  (robust to illumination changes);
* :func:`forward_backward_occlusion` -- occlusion from forward-backward consistency (UnFlow, after
  Sundaram et al. 2010): a pixel is occluded where the forward flow and the backward flow read at its
  target do not cancel, ``|f + b(p + f)|^2 > α1 (|f|^2 + |b(p + f)|^2) + α2``;
* :func:`edge_aware_smoothness` -- first-order smoothness of the flow, down-weighted across image
  edges (``exp(-λ |∇I|)``);
* :class:`UnsupervisedFlowLoss` -- the bidirectional loss: both directions' occlusion-weighted
  photometric terms (``Σ O ρ(·) / Σ O``, the survey's §3 formula), smoothness, and the
  forward-backward consistency term.

Flows are alignkit's (:mod:`alignkit.spatial`): ``(B, ndim, *S)`` voxels, array-axis order,
``first(p) ≈ second(p + flow(p))``. Images are ``(B, C, *S)`` in [0, 1]. Written for any ``ndim``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignkit.errors import ConfigError, ShapeError
from alignkit.spatial import sample_voxels, voxel_identity

#: FlowNet's level weights, finest (the output level, 1/4) first: 0.32, 0.08, 0.02, 0.01, 0.005
FLOWNET_LEVEL_WEIGHTS: tuple[float, ...] = (0.32, 0.08, 0.02, 0.01, 0.005)


def _warp(image: Tensor, flow: Tensor) -> Tensor:
    return sample_voxels(image, voxel_identity(flow.shape[2:], like=flow) + flow, padding="border")


def _box_mean(tensor: Tensor, factor: int) -> Tensor:
    if factor == 1:
        return tensor
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[tensor.dim() - 2]
    return pool(tensor, factor, factor)


def multiscale_epe(flows: Sequence[Tensor], truth: Tensor, *, output_level: int,
                   weights: Sequence[float] = FLOWNET_LEVEL_WEIGHTS, mask: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
    """(weighted sum, per-level EPEs) of ``flows`` (coarsest first; the last one at ``output_level``,
    each in voxels of its level) against ``truth (B, ndim, *S)`` at full resolution. The truth is
    box-averaged to each level; errors are measured in **full-resolution pixels** (a level's flow
    times ``2**level``), as FlowNet's loss, whose ground truth is not rescaled per level. ``weights``
    are finest first; ``mask (B, 1, *S)`` (1 = known) weights the pixels."""
    if len(weights) < len(flows):
        raise ConfigError(f"{len(flows)} flow levels need as many weights, got {len(weights)}")
    total = truth.new_zeros(())
    errors = []
    for k, flow in enumerate(reversed(flows)):
        level = output_level + k
        factor = 2**level
        target = _box_mean(truth, factor)
        if target.shape != flow.shape:
            raise ShapeError(f"level {level}: flow {tuple(flow.shape)} does not match the truth {tuple(target.shape)}")
        epe = (flow.float() * factor - target).norm(dim=1, keepdim=True)
        if mask is not None:
            known = _box_mean(mask.float(), factor)
            value = (epe * known).flatten(1).sum(1) / known.flatten(1).sum(1).clamp_min(1e-6)
        else:
            value = epe.flatten(1).mean(1)
        errors.append(value.mean())
        total = total + float(weights[k]) * errors[-1]
    return total, errors


def census_transform(image: Tensor, window: int = 7) -> Tensor:
    """Soft ternary census (UnFlow): for each of the ``window^ndim - 1`` neighbours ``q`` of ``p``,
    ``t = d / sqrt(0.81 + d^2)`` with ``d = 255 (I(q) - I(p))`` (images in [0, 1], the channel mean;
    0.81 is UnFlow's constant for 8-bit intensities). ``(B, window^ndim - 1, *S)``, edge-padded."""
    if window < 3 or window % 2 == 0:
        raise ConfigError(f"census window must be odd and >= 3, got {window}")
    grey = image.mean(1, keepdim=True) * 255.0
    ndim = image.dim() - 2
    r = window // 2
    padded = F.pad(grey, [r] * (2 * ndim), mode="replicate")
    spatial = grey.shape[2:]
    out = []
    for offset in itertools.product(range(window), repeat=ndim):
        if all(o == r for o in offset):
            continue
        window_slice = tuple(slice(o, o + s) for o, s in zip(offset, spatial))
        d = padded[(slice(None), slice(None), *window_slice)] - grey
        out.append(d / torch.sqrt(0.81 + d * d))
    return torch.cat(out, dim=1)


def census_distance(a: Tensor, b: Tensor) -> Tensor:
    """UnFlow's soft Hamming distance of two census transforms, ``Δ^2 / (0.1 + Δ^2)`` per neighbour,
    **averaged** over the neighbours (UnFlow sums them; the mean keeps the loss weights independent of
    the window size), ``(B, 1, *S)`` in [0, 1)."""
    diff = (a - b) ** 2
    return (diff / (0.1 + diff)).mean(1, keepdim=True)


def charbonnier(x: Tensor, *, eps: float = 1e-3, alpha: float = 0.45) -> Tensor:
    """The generalised Charbonnier penalty ``(x^2 + eps^2)^alpha`` element-wise (Sun et al.'s 0.45)."""
    return (x * x + eps * eps) ** alpha


def forward_backward_occlusion(forward: Tensor, backward: Tensor, *, alpha1: float = 0.01,
                               alpha2: float = 0.5) -> Tensor:
    """``(B, 1, *S)`` float, 1 where the first frame's pixel is occluded in the second: the forward flow
    and the backward flow read at its target do not cancel (UnFlow's test, ``α1 = 0.01``, ``α2 = 0.5``
    px²). ``backward`` is the flow from the second frame to the first, on the second frame's grid."""
    if forward.shape != backward.shape:
        raise ShapeError(f"forward {tuple(forward.shape)} and backward {tuple(backward.shape)} flows differ")
    back = _warp(backward, forward)
    mismatch = ((forward + back) ** 2).sum(1, keepdim=True)
    bound = alpha1 * ((forward**2).sum(1, keepdim=True) + (back**2).sum(1, keepdim=True)) + alpha2
    return (mismatch > bound).to(forward.dtype)


def edge_aware_smoothness(flow: Tensor, image: Tensor, *, edge_constant: float = 10.0) -> Tensor:
    """First-order smoothness ``Σ_axes exp(-λ |∂_a I|) ρ(∂_a flow)`` (Charbonnier ρ, channel-mean image
    gradient, forward differences), averaged: ``(B,)``."""
    grey = image.mean(1, keepdim=True)
    total = flow.new_zeros(flow.shape[0])
    for axis in range(2, flow.dim()):
        n = flow.shape[axis]
        if n < 2:
            continue
        d_flow = flow.narrow(axis, 1, n - 1) - flow.narrow(axis, 0, n - 1)
        d_image = (grey.narrow(axis, 1, n - 1) - grey.narrow(axis, 0, n - 1)).abs()
        weight = torch.exp(-edge_constant * d_image)
        total = total + (weight * charbonnier(d_flow)).flatten(1).mean(1)
    return total


class UnsupervisedFlowLoss(nn.Module):
    """The bidirectional, occlusion-aware unsupervised loss (survey §3; UnFlow's ``C_SD`` variant
    with first-order edge-aware smoothness). For each direction (first → second with the forward
    flow, second → first with the backward flow)::

        photometric = Σ O (census_weight ρ(census distance) + charbonnier_weight ρ(I1 - I2∘f)) / Σ O
        smoothness  = edge_aware_smoothness(f, I1)
        consistency = Σ O ρ(f + b∘(id + f)) / Σ O

    with ``O = 1 - forward_backward_occlusion`` (no gradient through the mask: occluded pixels
    are removed, not optimised away). ``total`` is the mean of both directions of
    ``photometric + smoothness_weight smoothness + consistency_weight consistency``.
    """

    def __init__(self, *, census_weight: float = 1.0, charbonnier_weight: float = 0.0, census_window: int = 7,
                 smoothness_weight: float = 0.1, edge_constant: float = 10.0, consistency_weight: float = 0.02,
                 alpha1: float = 0.01, alpha2: float = 0.5, occlusion: bool = True) -> None:
        super().__init__()
        weights = {"census_weight": census_weight, "charbonnier_weight": charbonnier_weight,
                   "smoothness_weight": smoothness_weight, "consistency_weight": consistency_weight}
        bad = {k: v for k, v in weights.items() if v < 0}
        if bad or census_weight + charbonnier_weight <= 0:
            raise ConfigError(f"unsupervised flow loss weights must be >= 0 with a photometric term, got {weights}")
        self.census_weight, self.charbonnier_weight = float(census_weight), float(charbonnier_weight)
        self.census_window = int(census_window)
        self.smoothness_weight, self.edge_constant = float(smoothness_weight), float(edge_constant)
        self.consistency_weight = float(consistency_weight)
        self.alpha1, self.alpha2, self.occlusion = float(alpha1), float(alpha2), bool(occlusion)

    def _direction(self, first: Tensor, second: Tensor, flow: Tensor, other: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            occluded = (forward_backward_occlusion(flow, other, alpha1=self.alpha1, alpha2=self.alpha2)
                        if self.occlusion else torch.zeros_like(flow[:, :1]))
        visible = 1.0 - occluded
        count = visible.flatten(1).sum(1).clamp_min(1.0)
        warped = _warp(second, flow)
        pixel = flow.new_zeros(visible.shape)
        if self.census_weight > 0:
            distance = census_distance(census_transform(first, self.census_window),
                                       census_transform(warped, self.census_window))
            pixel = pixel + self.census_weight * charbonnier(distance)
        if self.charbonnier_weight > 0:
            pixel = pixel + self.charbonnier_weight * charbonnier(first - warped).mean(1, keepdim=True)
        out = {"photometric": (pixel * visible).flatten(1).sum(1) / count,
               "smoothness": edge_aware_smoothness(flow, first, edge_constant=self.edge_constant),
               "occluded": occluded.flatten(1).mean(1)}
        if self.consistency_weight > 0:
            mismatch = charbonnier(flow + _warp(other, flow)).sum(1, keepdim=True)
            out["consistency"] = (mismatch * visible).flatten(1).sum(1) / count
        return out

    def forward(self, first: Tensor, second: Tensor, forward_flow: Tensor,
                backward_flow: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(total, parts) -- parts are batch means of both directions; ``occluded`` is the fraction
        of pixels the forward-backward check removed (logged, not optimised)."""
        one = self._direction(first, second, forward_flow, backward_flow)
        two = self._direction(second, first, backward_flow, forward_flow)
        parts = {k: 0.5 * (one[k] + two[k]).mean() for k in one}
        total = parts["photometric"] + self.smoothness_weight * parts["smoothness"]
        if "consistency" in parts:
            total = total + self.consistency_weight * parts["consistency"]
        return total, parts
