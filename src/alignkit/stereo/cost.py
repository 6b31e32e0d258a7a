"""Matching costs of a rectified pair over a range of disparities: the 1D cost volume.

Convention: ``volume[k, y, x]`` is the cost of matching left pixel ``(y, x)`` with right pixel
``(y, x - d_k)``, ``d_k = min_disparity + k`` (integer disparities, the pair's
``left(x) = right(x - d)``, :mod:`alignkit.transforms.disparity`); lower is better. Where ``x - d_k``
falls outside the right image the cost is :data:`OUTSIDE` times the volume's largest possible cost, so
a pixel near the left border prefers a disparity it can see and SGM does not reward leaving the image.

Costs (the deep-learning registration survey §2.1 names both as the classical matching costs that
MC-CNN replaced):

* ``census``: Hamming distance between census signatures (Zabih and Woodfill, "Non-parametric local
  transforms for computing visual correspondence", ECCV 1994) of a ``window`` neighbourhood -- one
  bit per neighbour, set when it is darker than the centre; invariant to any monotonic change of
  brightness, which the exposures of a real pair need. Normalised to [0, 1] (fraction of bits).
* ``zncc``: ``(1 - ZNCC) / 2`` of the ``window`` patches, in [0, 1]; invariant to gain and offset.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from alignkit.errors import ConfigError, ShapeError
from alignkit.spatial import box_sum

CostName = Literal["census", "zncc"]

#: the cost, as a fraction of the largest possible cost, of a disparity whose match lies outside the
#: right image (slightly above any real match: the border pixels prefer a visible match)
OUTSIDE = 1.0


def grey(image: Tensor | np.ndarray) -> Tensor:
    """``(H, W)`` float32 luminance of ``(H, W)``, ``(C, H, W)`` or ``(1, C, H, W)`` data (the
    channel mean, as the engine's ``grey`` option)."""
    data = torch.as_tensor(np.asarray(image) if not isinstance(image, Tensor) else image).float()
    while data.dim() > 3 and data.shape[0] == 1:
        data = data[0]
    if data.dim() == 3:
        data = data.mean(0)
    if data.dim() != 2:
        raise ShapeError(f"expected a 2D image (H, W) or (C, H, W), got {tuple(data.shape)}")
    return data


def census_signature(image: Tensor, window: tuple[int, int] = (7, 9)) -> np.ndarray:
    """``(H, W)`` uint64 census signatures of a grey ``(H, W)`` image over an odd ``(rows, cols)``
    ``window`` (at most 64 neighbours; edge-replicated)."""
    rows, cols = (int(w) for w in window)
    if rows % 2 == 0 or cols % 2 == 0 or rows * cols - 1 > 64:
        raise ConfigError(f"census window must be odd and hold at most 64 neighbours, got {rows}x{cols}")
    array = image.detach().cpu().numpy().astype(np.float32)
    padded = np.pad(array, ((rows // 2, rows // 2), (cols // 2, cols // 2)), mode="edge")
    height, width = array.shape
    signature = np.zeros((height, width), np.uint64)
    bit = 0
    for dy in range(rows):
        for dx in range(cols):
            if dy == rows // 2 and dx == cols // 2:
                continue
            darker = padded[dy : dy + height, dx : dx + width] < array
            signature |= darker.astype(np.uint64) << np.uint64(bit)
            bit += 1
    return signature


def _outside_mask(shape: tuple[int, int], disparities: np.ndarray) -> Tensor:
    """``(D, 1, W)`` bool: True where ``x - d`` is outside ``[0, W - 1]``."""
    width = shape[1]
    x = np.arange(width)[None, :] - disparities[:, None]
    return torch.from_numpy(((x < 0) | (x > width - 1))[:, None, :])


def census_volume(left: Tensor, right: Tensor, disparities: np.ndarray, window: tuple[int, int] = (7, 9)) -> Tensor:
    """``(D, H, W)`` float32 census cost (fraction of differing bits) for integer ``disparities``."""
    sig_left, sig_right = census_signature(left, window), census_signature(right, window)
    bits = float(window[0] * window[1] - 1)
    height, width = sig_left.shape
    volume = np.full((len(disparities), height, width), round(bits), np.uint8)
    for k, d in enumerate(disparities.astype(int)):
        # left x against right x - d where both exist (the rest is costed as OUTSIDE below)
        if 0 <= d < width:
            volume[k, :, d:] = np.bitwise_count(sig_left[:, d:] ^ sig_right[:, : width - d])
        elif -width < d < 0:
            volume[k, :, :d] = np.bitwise_count(sig_left[:, :d] ^ sig_right[:, -d:])
    out = torch.from_numpy(volume).float() / bits
    return out.masked_fill_(_outside_mask((height, width), disparities), OUTSIDE)


def zncc_volume(left: Tensor, right: Tensor, disparities: np.ndarray, window: int = 7, eps: float = 1e-4) -> Tensor:
    """``(D, H, W)`` float32 ``(1 - ZNCC) / 2`` of ``window``-wide patches for integer ``disparities``."""
    height, width = left.shape
    source = (torch.arange(width)[None, :] - torch.as_tensor(disparities)[:, None]).clamp(0, width - 1).long()
    shifted = right[:, source].permute(1, 0, 2).unsqueeze(1)  # (D, 1, H, W): right(x - d)
    reference = left.expand(len(disparities), 1, height, width)
    count = box_sum(torch.ones(1, 1, height, width), window)
    mean_l = box_sum(left[None, None], window) / count
    mean_r = box_sum(shifted, window) / count
    var_l = (box_sum(left[None, None] ** 2, window) / count - mean_l**2).clamp(min=0)
    var_r = (box_sum(shifted**2, window) / count - mean_r**2).clamp(min=0)
    cross = box_sum(reference * shifted, window) / count - mean_l * mean_r
    zncc = cross / torch.sqrt(var_l * var_r + eps**2)
    out = ((1.0 - zncc.clamp(-1, 1)) * 0.5)[:, 0]
    return out.masked_fill_(_outside_mask((height, width), disparities), OUTSIDE)


def cost_volume(
    left: Tensor,
    right: Tensor,
    disparities: np.ndarray,
    *,
    cost: CostName = "census",
    window: int | tuple[int, int] | None = None,
) -> Tensor:
    """The ``(D, H, W)`` cost volume of grey ``(H, W)`` images ``left`` and ``right`` (module
    docstring). ``window``: census ``(rows, cols)`` (default 7x9), ZNCC side (default 7)."""
    if left.shape != right.shape:
        raise ShapeError(f"a rectified pair has images of one size; got {tuple(left.shape)} and {tuple(right.shape)}")
    if cost == "census":
        size = (7, 9) if window is None else ((window, window) if isinstance(window, int) else tuple(window))
        return census_volume(left, right, disparities, size)  # type: ignore[arg-type]
    if cost == "zncc":
        return zncc_volume(left, right, disparities, 7 if window is None else int(window))  # type: ignore[arg-type]
    raise ConfigError(f"unknown matching cost {cost!r}; choose census or zncc")
