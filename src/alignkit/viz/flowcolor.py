"""Optical-flow colour coding with the Middlebury colour wheel (Baker et al., IJCV 2011).

Convention: the flow is taken in the Middlebury layout ``(H, W, 2)`` with components ``(x, y)`` =
(column, row) displacement in pixels (y points *down* the image); an alignkit flow ``(2, H, W)``
(``Case.flow``, ``Registration.flow()``; see :mod:`alignkit.spatial`) goes through
:func:`alignkit.spatial.xy_from_flow` first. The hue encodes the direction and the saturation the magnitude relative
to ``max_magnitude``: zero flow is white, ``+x`` red, ``+y`` (down) yellow-orange, ``-x`` cyan,
``-y`` blue-violet. Magnitudes beyond ``max_magnitude`` are darkened to 75 %. Unknown pixels (NaN or a
component above ``1e9``) are black. This reproduces the reference ``computeColor.m`` /
``flowToColor.m`` of the Middlebury flow benchmark, written from the published definition.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from alignkit.errors import InputError, ShapeError

# Segment lengths of the 55-colour wheel: red->yellow, yellow->green, green->cyan, cyan->blue,
# blue->magenta, magenta->red.
_SEGMENTS: tuple[tuple[int, int, int], ...] = (
    # (length, channel that ramps, direction: +1 rises 0->255, -1 falls 255->0); the others are fixed
    (15, 1, +1),  # RY: R=255, G rises
    (6, 0, -1),  # YG: G=255, R falls
    (4, 2, +1),  # GC: G=255, B rises
    (11, 1, -1),  # CB: B=255, G falls
    (13, 0, +1),  # BM: B=255, R rises
    (6, 2, -1),  # MR: R=255, B falls
)
_UNKNOWN = 1e9


def make_colorwheel() -> np.ndarray:
    """The 55 x 3 Middlebury colour wheel as float64 values in [0, 255] (red at index 0)."""
    rows = []
    colour = np.array([255.0, 0.0, 0.0])  # start of RY
    for length, channel, direction in _SEGMENTS:
        ramp = np.floor(255.0 * np.arange(length) / length)
        block = np.tile(colour, (length, 1))
        block[:, channel] = ramp if direction > 0 else 255.0 - ramp
        rows.append(block)
        colour = block[-1].copy()
        colour[channel] = 255.0 if direction > 0 else 0.0
    return np.concatenate(rows, axis=0)


def flow_to_color(flow: Any, max_magnitude: float | None = None) -> np.ndarray:
    """Colour-code ``flow (H, W, 2)`` (numpy or torch, pixels, ``(x, y)``) as a ``uint8 (H, W, 3)`` RGB image.

    ``max_magnitude`` is the flow length drawn fully saturated; by default the largest finite
    magnitude among known pixels (all white when the flow is zero everywhere).
    """
    if hasattr(flow, "detach"):
        flow = flow.detach().cpu().numpy()
    uv = np.asarray(flow, dtype=np.float64)
    if uv.ndim != 3 or uv.shape[-1] != 2:
        raise ShapeError(f"flow must be (H, W, 2) with (x, y) components last, got {uv.shape}")
    if max_magnitude is not None and not (np.isfinite(max_magnitude) and max_magnitude > 0):
        raise InputError(f"max_magnitude must be positive and finite, got {max_magnitude}")
    with np.errstate(invalid="ignore"):
        unknown = ~np.all(np.isfinite(uv), axis=-1) | np.any(np.abs(uv) > _UNKNOWN, axis=-1)
    u = np.where(unknown, 0.0, uv[..., 0])
    v = np.where(unknown, 0.0, uv[..., 1])
    rad = np.sqrt(u * u + v * v)
    scale = float(max_magnitude) if max_magnitude is not None else float(rad.max(initial=0.0))
    eps = np.finfo(np.float64).eps
    u, v, rad = u / (scale + eps), v / (scale + eps), rad / (scale + eps)

    wheel = make_colorwheel() / 255.0
    ncols = wheel.shape[0]
    angle = np.arctan2(-v, -u) / np.pi  # in [-1, 1]; +x gives +-1 -> index 0 or ncols-1, both red
    fk = (angle + 1.0) / 2.0 * (ncols - 1)
    k0 = np.floor(fk).astype(np.int64)
    k1 = (k0 + 1) % ncols
    frac = (fk - k0)[..., None]
    col = (1.0 - frac) * wheel[k0] + frac * wheel[k1]
    inside = (rad <= 1.0)[..., None]
    col = np.where(inside, 1.0 - rad[..., None] * (1.0 - col), col * 0.75)
    out = np.floor(255.0 * np.clip(col, 0.0, 1.0)).astype(np.uint8)
    out[unknown] = 0
    return out


def colorwheel_legend(size: int = 129) -> np.ndarray:
    """A ``uint8 (size, size, 3)`` disc showing the colour of every direction at every magnitude
    (image-axis convention: ``+x`` right, ``+y`` down); outside the disc is white."""
    if size < 3:
        raise InputError(f"colorwheel_legend needs size >= 3, got {size}")
    c = (size - 1) / 2.0
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    flow = np.stack([(x - c) / c, (y - c) / c], axis=-1)
    img = flow_to_color(flow, max_magnitude=1.0)
    img[np.hypot(flow[..., 0], flow[..., 1]) > 1.0] = 255
    return img
