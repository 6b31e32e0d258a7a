"""Synthetic rectified stereo pairs rendered from a photograph with a random depth layering.

A scene is a back plane plus a few fronto-parallel-ish planar layers (random ellipses), each with its
own disparity plane ``d = a + b x + c y`` (pixels of the left image) and its own piece of the
photograph as texture; nearer layers have larger disparities. The left image shows, at each pixel,
the nearest layer covering it; the right image is rendered layer by layer back to front, a layer's
texture at left column ``x`` landing on right column ``x - d`` (``left(x) = right(x - d)``,
:mod:`alignkit.transforms.disparity`), so occlusions and disocclusions are exact. The ground truth:
the left disparity, and ``occluded`` -- left pixels whose match is hidden by a nearer layer in the
right image or falls outside it.

Used by the stereo tests (known piecewise-planar disparity) and as training pairs of the learned
stereo method (the deep-learning registration survey §2.1-2.2 trains on synthetic scenes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from alignkit.errors import ShapeError


@dataclass
class StereoPair:
    """``left``/``right`` ``(C, H, W)`` float32 (the photograph's range), ``disparity`` ``(H, W)``
    float32 pixels of the left image, ``occluded`` ``(H, W)`` bool."""

    left: np.ndarray
    right: np.ndarray
    disparity: np.ndarray
    occluded: np.ndarray


def _sample_rows(texture: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``texture (C, H, W)`` read at columns ``x (H, W)`` of each row (linear, border)."""
    _, height, width = texture.shape
    y = torch.arange(height, dtype=x.dtype)[:, None].expand_as(x)
    grid = torch.stack([2 * x / max(width - 1, 1) - 1, 2 * y / max(height - 1, 1) - 1], dim=-1)
    return F.grid_sample(texture[None], grid[None], mode="bilinear", padding_mode="border", align_corners=True)[0]


def render_stereo_pair(
    photo: np.ndarray,
    shape: tuple[int, int],
    *,
    rng: np.random.Generator,
    max_disparity: float = 24.0,
    layers: int = 3,
    slant: float = 0.02,
) -> StereoPair:
    """Render a pair of ``shape`` (H, W) from ``photo`` (``(H0, W0)`` or ``(C, H0, W0)``, at least
    ``shape`` plus the largest disparity wide) with ``layers`` foreground layers over a back plane
    (module docstring). Disparities lie in ``[1, max_disparity - 1]``; ``slant`` bounds the
    planes' slopes (pixels of disparity per pixel)."""
    texture_all = torch.as_tensor(np.asarray(photo, dtype=np.float32))
    if texture_all.dim() == 2:
        texture_all = texture_all[None]
    height, width = shape
    margin = int(np.ceil(max_disparity)) + 2
    if texture_all.shape[1] < height or texture_all.shape[2] < width + margin:
        raise ShapeError(f"photo {tuple(texture_all.shape[1:])} is too small for a {shape} pair with disparities "
                         f"up to {max_disparity}")
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                          indexing="ij")

    def crop() -> torch.Tensor:
        top = int(rng.integers(0, texture_all.shape[1] - height + 1))
        left = int(rng.integers(0, texture_all.shape[2] - width - margin + 1))
        return texture_all[:, top : top + height, left : left + width + margin]

    # layer 0 is the back plane (covers everything); later layers are nearer, with larger disparities
    # the planes' centre disparities keep every disparity within [1, max_disparity - 1] (a slope moves it
    # by at most slant * (H + W) from the centre's)
    spread = slant * (height + width)
    low, high = 1.0 + spread, max_disparity - 1.0 - spread
    if high <= low:
        raise ShapeError(f"max_disparity {max_disparity} leaves no room for slopes of {slant} on a {shape} image")
    depths = np.sort(rng.uniform(low, high, size=layers + 1))
    planes, masks_fn, textures = [], [], []
    for index, base in enumerate(depths):
        slope_x, slope_y = rng.uniform(-slant, slant, size=2)
        centre_x, centre_y = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
        planes.append((float(base), float(slope_x), float(slope_y), centre_x, centre_y))
        if index == 0:
            masks_fn.append(None)
        else:
            radius_x, radius_y = rng.uniform(0.1, 0.3) * width, rng.uniform(0.1, 0.3) * height
            masks_fn.append((centre_x, centre_y, radius_x, radius_y))
        textures.append(crop())

    def plane_disparity(index: int, xs: torch.Tensor) -> torch.Tensor:
        base, slope_x, slope_y, centre_x, centre_y = planes[index]
        return base + slope_x * (xs - centre_x) + slope_y * (y - centre_y)

    def covers(index: int, xs: torch.Tensor) -> torch.Tensor:
        if masks_fn[index] is None:
            return torch.ones_like(xs, dtype=torch.bool)
        centre_x, centre_y, radius_x, radius_y = masks_fn[index]
        return ((xs - centre_x) / radius_x) ** 2 + ((y - centre_y) / radius_y) ** 2 <= 1.0

    channels = texture_all.shape[0]
    left = torch.zeros(channels, height, width)
    disparity = torch.zeros(height, width)
    owner_left = torch.zeros(height, width, dtype=torch.long)
    for index in range(len(planes)):  # back to front: nearer layers overwrite
        inside = covers(index, x)
        # texture coordinates: a layer's texture is attached to the scene, read at the left column + margin
        value = _sample_rows(textures[index], x + margin)
        left = torch.where(inside, value, left)
        disparity = torch.where(inside, plane_disparity(index, x), disparity)
        owner_left = torch.where(inside, torch.full_like(owner_left, index), owner_left)

    right = torch.zeros(channels, height, width)
    owner_right = torch.full((height, width), -1, dtype=torch.long)
    for index in range(len(planes)):
        # the left column x whose point lands on right column xr: x - d(x) = xr, d affine in x
        base, slope_x, slope_y, centre_x, centre_y = planes[index]
        source = (x + base - slope_x * centre_x + slope_y * (y - centre_y)) / (1.0 - slope_x)
        inside = covers(index, source) & (source >= 0) & (source <= width - 1)
        value = _sample_rows(textures[index], source + margin)
        right = torch.where(inside, value, right)
        owner_right = torch.where(inside, torch.full_like(owner_right, index), owner_right)

    target = torch.round(x - disparity)
    outside = (target < 0) | (target > width - 1)
    seen = owner_right.gather(1, target.clamp(0, width - 1).long())
    occluded = outside | (seen != owner_left)
    return StereoPair(left.numpy(), right.numpy(), disparity.numpy().astype(np.float32), occluded.numpy())


def training_photographs() -> list[np.ndarray]:
    """Photographs scikit-image ships (``(3, H, W)`` float32 in [0, 255]) to texture synthetic scenes
    with -- natural images only, and never its stereo pair (``motorcycle_*``, a benchmark case)."""
    from skimage import data as skdata

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera", "brick", "grass",
                 "gravel", "coins", "moon", "page", "text", "clock", "horse"):
        loader = getattr(skdata, name, None)
        if loader is None:
            continue
        try:
            image = np.asarray(loader(), dtype=np.float32)
        except Exception:  # noqa: BLE001, S112 - a photograph scikit-image would download: skip it
            continue
        if image.ndim == 2:
            image = np.repeat(image[None], 3, axis=0)
        elif image.shape[-1] in (3, 4):
            image = image[..., :3].transpose(2, 0, 1)
        if image.max() <= 1.0:
            image = image * 255.0
        out.append(np.ascontiguousarray(image))
    return out
