"""Test-time "prompt" terms (Jena et al. 2024, DIO): label and landmark fidelity added to the objective.

Convention
----------
* Label maps are integer tensors ``(B, 1, *S)``; :func:`one_hot` turns them into ``(B, L, *S)``
  channels, one per requested label value. To warp labels differentiably, resample the one-hot
  maps of the *moving* labels with linear interpolation (``sample_world(..., mode="linear")``):
  the result is a soft one-hot on the fixed grid that :class:`DiceLoss` compares with the fixed
  one-hot labels.
* Landmarks are ``(N, ndim)`` world points (LPS, ``(x, y[, z])``). A transform maps fixed-world
  points to moving-world points, so fixed landmarks are pushed through it and compared with the
  moving landmarks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError, ShapeError
from alignkit.spatial.points import points_to_tensor, tensor_to_points
from alignkit.transforms.base import Transform


def one_hot(
    labels: Tensor, label_values: Sequence[int] | Tensor, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Integer labels ``(B, 1, *S)`` -> ``(B, L, *S)`` indicator maps of ``label_values`` (in that
    order). Voxels whose label is not listed (e.g. background, when 0 is left out) are 0 in every
    channel."""
    if labels.dim() < 3 or labels.shape[1] != 1:
        raise ShapeError(f"labels must be (B, 1, *spatial), got {tuple(labels.shape)}")
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise ShapeError("labels must hold integer values")
    values = torch.as_tensor(label_values, device=labels.device).flatten()
    if values.numel() == 0:
        raise ConfigError("one_hot needs at least one label value")
    shape = [1, values.numel()] + [1] * (labels.dim() - 2)
    return (labels == values.to(labels.dtype).view(shape)).to(dtype)


class DiceLoss(nn.Module):
    """Soft Dice loss ``1 - mean_{b, l} (2 sum(w f) + s) / (sum(w) + sum(f) + s)``.

    ``forward(warped, fixed, mask=None)``: ``warped`` is the (soft) one-hot of the moving labels
    resampled on the fixed grid, ``fixed`` the fixed one-hot labels, both ``(B, L, *S)``; ``mask``
    ``(B, 1, *S)`` optionally weights the voxels. ``smooth`` (``s``) makes a label absent from both
    score 1 and keeps the gradient finite. Zero for identical one-hot maps.
    """

    def __init__(self, *, smooth: float = 1e-5) -> None:
        super().__init__()
        if smooth <= 0:
            raise ConfigError(f"DiceLoss smooth must be > 0, got {smooth}")
        self.smooth = float(smooth)

    def forward(self, warped: Tensor, fixed: Tensor, mask: Tensor | None = None) -> Tensor:
        if warped.shape != fixed.shape or warped.dim() < 3:
            raise ShapeError(
                f"warped {tuple(warped.shape)} and fixed {tuple(fixed.shape)} must both be (B, L, *spatial)"
            )
        dtype = torch.float32 if warped.dtype in (torch.float16, torch.bfloat16) else warped.dtype
        w, f = warped.to(dtype), fixed.to(dtype)
        if mask is not None:
            if mask.dim() != w.dim() or mask.shape[1] != 1 or mask.shape[2:] != w.shape[2:]:
                raise ShapeError(f"mask must be (B, 1, *{tuple(w.shape[2:])}), got {tuple(mask.shape)}")
            m = mask.to(dtype)
            w, f = w * m, f * m
        inter = (w * f).flatten(2).sum(-1)
        total = w.flatten(2).sum(-1) + f.flatten(2).sum(-1)
        dice = (2.0 * inter + self.smooth) / (total + self.smooth)
        return (1.0 - dice.mean()).to(warped.dtype)


class LandmarkDistance(nn.Module):
    """Mean Euclidean distance ``mean_i ||T(p_i) - q_i||`` (world units) between fixed landmarks
    ``p (N, ndim)`` pushed through ``transform`` and moving landmarks ``q (N, ndim)``.

    The norm is ``sqrt(d^2 + eps^2) - eps`` so the gradient stays finite at a perfect match
    (the error this introduces is below ``eps``). Points are cast to the transform's parameter
    dtype/device (float32 CPU for a parameter-free transform only if the points are not float).
    """

    def __init__(self, *, eps: float = 1e-6) -> None:
        super().__init__()
        if eps <= 0:
            raise ConfigError(f"LandmarkDistance eps must be > 0, got {eps}")
        self.eps = float(eps)

    def forward(self, transform: Transform, fixed_points: Tensor, moving_points: Tensor) -> Tensor:
        if fixed_points.dim() != 2 or fixed_points.shape != moving_points.shape:
            raise ShapeError(
                f"landmarks must be two (N, ndim) tensors of equal shape, got {tuple(fixed_points.shape)} and {tuple(moving_points.shape)}"
            )
        if fixed_points.shape[1] != transform.ndim:
            raise ShapeError(
                f"landmarks have {fixed_points.shape[1]} coordinates, the transform is {transform.ndim}D"
            )
        if fixed_points.shape[0] == 0:
            raise ShapeError("at least one landmark pair is needed")
        param = next(iter(transform.parameters()), None)
        if param is not None:
            dtype, device = param.dtype, param.device
        else:
            dtype = fixed_points.dtype if fixed_points.is_floating_point() else torch.float32
            device = fixed_points.device
        fixed = fixed_points.to(dtype=dtype, device=device)
        moved = tensor_to_points(transform.transform_points(points_to_tensor(fixed)))
        diff = moved - moving_points.to(dtype=moved.dtype, device=moved.device)
        return (torch.sqrt((diff * diff).sum(dim=1) + self.eps**2) - self.eps).mean()
