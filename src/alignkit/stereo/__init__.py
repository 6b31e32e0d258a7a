"""Classical stereo matching: a rectified pair's disparity by semi-global matching.

Stereo is one-dimensional registration (the deep-learning registration survey, §2): fixed = left,
moving = right, ``left(x, y) = right(x - d, y)`` (:mod:`alignkit.transforms.disparity`).
:func:`match` is the pipeline -- a census or ZNCC cost volume over ``[min_disparity, max_disparity]``
(:mod:`alignkit.stereo.cost`), semi-global aggregation along 8 (or 4) directions, winner-take-all
with parabola sub-pixel refinement, a 3x3 median, the left-right consistency check marking occluded
and mismatched pixels, which are then filled from the background along their row
(:mod:`alignkit.stereo.sgm`). The ``stereo`` preset of the classical method starts the engine from
it and refines the disparity variationally (robust data term, TV smoothness).

With numba installed (``pip install 'alignkit[fast]'``) :func:`match` runs the compiled kernels of
:mod:`alignkit.stereo.compiled` (``backend="auto"``; the same integers as the torch/numpy reference,
``backend="torch"``, which stays the path without numba).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.errors import ConfigError, ShapeError
from alignkit.spatial.filters import median_filter
from alignkit.stereo import compiled
from alignkit.stereo.cost import CostName, census_signature, cost_volume, grey
from alignkit.stereo.sgm import (
    COST_LEVELS,
    DIRECTIONS_4,
    DIRECTIONS_8,
    aggregate,
    check_penalties,
    fill_invalid,
    left_right_check,
    quantise,
    right_volume,
    step_penalties,
    winner_take_all,
)
from alignkit.transforms.disparity import DisparityField

#: without ``max_disparity`` the search covers this fraction of the image width: 0.2 spans KITTI (up
#: to ~230 px at 1242) and the Middlebury pairs at full and reduced sizes (motorcycle 60 / 741, aloe
#: 211 / 1282)
DEFAULT_RANGE_FRACTION = 0.2

#: cost volumes are at most this many entries (float32: 256 MB); a bigger search is matched on an
#: image shrunk by powers of two and the disparity scaled back (the engine's refinement then works
#: at full resolution)
MAX_VOLUME = 1 << 26


def default_disparity_range(width: int, min_disparity: float | None = None,
                            max_disparity: float | None = None) -> tuple[int, int]:
    """``(min, max)`` integer search range: the given bounds (rounded outwards), else 0 and
    :data:`DEFAULT_RANGE_FRACTION` of ``width``."""
    low = 0 if min_disparity is None else math.floor(float(min_disparity))
    high = math.ceil(DEFAULT_RANGE_FRACTION * width) if max_disparity is None else math.ceil(float(max_disparity))
    if high <= low:
        raise ConfigError(f"max_disparity ({high}) must exceed min_disparity ({low})")
    if high - low >= width:
        raise ConfigError(f"a disparity range of {high - low} px does not fit an image {width} px wide")
    return low, high


@dataclass
class StereoMatch:
    """The result of :func:`match`, on the left image's grid, in its pixels.

    ``disparity`` is dense (rejected pixels filled); ``raw`` is before the filling; ``occluded``
    marks the pixels the left-right check rejected; ``scale`` the shrink factor the volume was
    matched at (1 = full resolution)."""

    disparity: Tensor
    raw: Tensor
    occluded: Tensor
    min_disparity: int
    max_disparity: int
    scale: int = 1
    seconds: dict[str, float] = field(default_factory=dict)


def _median3(disparity: Tensor) -> Tensor:
    return median_filter(disparity[None, None], 3)[0, 0]


def _unit_pair(left_g: Tensor, right_g: Tensor) -> tuple[Tensor, Tensor]:
    """The grey pair rescaled to [0, 1] by its joint range (the reference of ``compiled.grey_pair_unit``)."""
    if left_g.shape != right_g.shape:
        raise ConfigError(f"a rectified pair has images of one size; got {tuple(left_g.shape)} and {tuple(right_g.shape)}")
    low_all = float(torch.minimum(left_g.min(), right_g.min()))
    span = max(float(torch.maximum(left_g.max(), right_g.max())) - low_all, 1e-6)
    return (left_g - low_all) / span, (right_g - low_all) / span


def _channels_first(image: Tensor | np.ndarray) -> np.ndarray | None:
    """``(C, H, W)`` float32 numpy data of an ``(H, W)``, ``(C, H, W)`` or ``(1, ..., C, H, W)`` image
    (what :func:`grey` accepts), or None for anything else (left to :func:`grey`'s message)."""
    data = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if data.dtype == np.float16 or not (np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.integer)):
        return None
    data = data.astype(np.float32, copy=False)
    while data.ndim > 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim == 2:
        data = data[None]
    return data if data.ndim == 3 else None


def _shrink(image: Tensor, factor: int) -> Tensor:
    if factor == 1:
        return image
    return F.avg_pool2d(image[None, None], factor, ceil_mode=True)[0, 0]


def match(
    left: Tensor | np.ndarray,
    right: Tensor | np.ndarray,
    *,
    min_disparity: float | None = None,
    max_disparity: float | None = None,
    cost: CostName | Callable[[Tensor, Tensor, np.ndarray], Tensor] = "census",
    window: int | tuple[int, int] | None = None,
    p1: float = 0.05,
    p2: float = 0.6,
    tau: float = 0.05,
    directions: int = 8,
    lr_tolerance: float = 1.0,
    max_volume: int = MAX_VOLUME,
    backend: str = "auto",
    progress=None,
) -> StereoMatch:
    """Disparity of a rectified pair by semi-global matching (module docstring).

    ``left``/``right``: ``(H, W)`` or ``(C, H, W)`` arrays of one size (colour is averaged to grey,
    intensities are rescaled to [0, 1] by their joint range). The range defaults to
    :func:`default_disparity_range`. ``cost`` is ``"census"``, ``"zncc"`` or a callable
    ``(left (H, W), right (H, W), disparities) -> (D, H, W)`` volume in [0, 1] (a learned cost,
    :mod:`alignkit.methods.stereo_net`), called on the images as matched (shrunk when the volume
    would exceed ``max_volume`` entries). ``backend``: ``"torch"`` (the vectorised reference),
    ``"numba"`` (the compiled kernels of :mod:`alignkit.stereo.compiled`, same integers; ``pip
    install alignkit[fast]``) or ``"auto"`` (numba when installed).
    """
    if backend not in ("auto", "torch", "numba"):
        raise ConfigError(f"unknown stereo backend {backend!r}; choose auto, torch or numba")
    if backend == "numba" and not compiled.available():
        raise ConfigError("the numba stereo backend needs numba: pip install 'alignkit[fast]'")
    use_compiled = backend == "numba" or (backend == "auto" and compiled.available())
    check_penalties(p1, p2, directions)
    pair = (_channels_first(left), _channels_first(right)) if use_compiled else (None, None)
    if (pair[0] is not None and pair[1] is not None and pair[0].shape == pair[1].shape
            and pair[0].shape[0] <= 4 and np.isfinite(pair[0]).all() and np.isfinite(pair[1]).all()):
        # one kernel, the reference's values (grey, joint range) exactly
        left_g, right_g = (torch.from_numpy(g) for g in compiled.grey_pair_unit(*pair))
    else:
        left_g, right_g = _unit_pair(grey(left), grey(right))
    height, width = left_g.shape
    low, high = default_disparity_range(width, min_disparity, max_disparity)
    factor = 1
    while (high - low) / factor * (height / factor) * (width / factor) > max_volume and factor < 16:
        factor *= 2
    times: dict[str, float] = {}
    started = time.perf_counter()
    left_s, right_s = _shrink(left_g, factor), _shrink(right_g, factor)
    low_s, high_s = math.floor(low / factor), math.ceil(high / factor)
    disparities = np.arange(low_s, high_s + 1)
    if use_compiled and cost == "census":
        size = (7, 9) if window is None else ((window, window) if isinstance(window, int) else tuple(window))
        census_signature(left_s[:1, :1], size)  # type: ignore[arg-type]  # checks the window
        signatures = tuple(compiled.census_signature(image.numpy(), size) for image in (left_s, right_s))  # type: ignore[arg-type]
        # written in the padded layout the fused sweeps read in place (no copy of the volume)
        # (uint8 where the penalties allow its padding: half the memory of int16)
        small = compiled.uint8_costs_fit(round(p1 * COST_LEVELS), round(p2 * COST_LEVELS), COST_LEVELS)
        volume_hwd = compiled.census_cost(*signatures, low_s, len(disparities), size[0] * size[1] - 1, COST_LEVELS,
                                          padded=compiled.padded_count(len(disparities)),
                                          dtype=np.uint8 if small else np.int16)
    else:
        if callable(cost):
            volume = cost(left_s, right_s, disparities)
            if tuple(volume.shape) != (len(disparities), *left_s.shape):
                raise ShapeError(f"a cost callable must return {(len(disparities), *left_s.shape)}, "
                                 f"got {tuple(volume.shape)}")
        else:
            volume = cost_volume(left_s, right_s, disparities, cost=cost, window=window)
        if use_compiled:
            volume_hwd = quantise(volume).permute(1, 2, 0).contiguous().numpy()
            del volume
    times["cost"] = time.perf_counter() - started
    started = time.perf_counter()
    if use_compiled:
        p1_q, p2_q = round(p1 * COST_LEVELS), round(p2 * COST_LEVELS)
        paths = DIRECTIONS_8 if directions == 8 else DIRECTIONS_4
        if tau > 0:  # one kernel, the integers of step_penalties (its reference)
            penalties = list(compiled.step_penalties(left_s.numpy(), paths, p1_q, p2_q, tau))
        else:
            penalties = [p.numpy() for _, p in step_penalties(left_s, p1, p2, tau, directions)]
        # aggregation and selection fused (two row sweeps, :func:`alignkit.stereo.compiled.sgm_sweeps`):
        # the same integers as compiled.aggregate + compiled.select, which stay as its plain reference
        disparity_np, disparity_right_np, _ = compiled.sgm_sweeps(
            volume_hwd, penalties, list(paths), p1_q, low_s, count=len(disparities))
        del volume_hwd
        times["aggregate"] = time.perf_counter() - started
        started = time.perf_counter()
        disparity, disparity_right = torch.from_numpy(disparity_np), torch.from_numpy(disparity_right_np)
    else:
        aggregated = aggregate(volume, left_s, p1=p1, p2=p2, tau=tau, directions=directions, progress=progress)
        times["aggregate"] = time.perf_counter() - started
        started = time.perf_counter()
        disparity, _ = winner_take_all(aggregated, low_s)
        disparity_right, _ = winner_take_all(right_volume(aggregated, low_s), low_s)
    if use_compiled:  # numpy / numba from here: no tensor operation (each a parallel region)
        disparity_np = compiled.median3(disparity_np)
        occluded_np, filled_np = compiled.check_and_fill(disparity_np, compiled.median3(disparity_right_np),
                                                         lr_tolerance)
        disparity, occluded = torch.from_numpy(disparity_np), torch.from_numpy(occluded_np)
        filled = torch.from_numpy(compiled.median3(filled_np))
    else:
        disparity = _median3(disparity)
        occluded = left_right_check(disparity, _median3(disparity_right), lr_tolerance)
        filled = _median3(fill_invalid(disparity, occluded))
    if factor > 1:
        def grow(t: Tensor, mode: str) -> Tensor:
            return F.interpolate(t[None, None].float(), scale_factor=factor, mode=mode)[0, 0, :height, :width]

        filled, disparity = grow(filled, "bilinear") * factor, grow(disparity, "bilinear") * factor
        occluded = grow(occluded, "nearest") > 0.5
    times["select"] = time.perf_counter() - started
    return StereoMatch(disparity=filled, raw=disparity, occluded=occluded, min_disparity=low, max_disparity=high,
                       scale=factor, seconds=times)


#: the options of :func:`match` a configuration may set (``RegistrationConfig.init_options``)
SGM_OPTIONS = ("min_disparity", "max_disparity", "cost", "window", "p1", "p2", "tau", "directions", "lr_tolerance",
               "max_volume", "backend")


def occlusion_from_disparity(disparity: Tensor | np.ndarray, valid: Tensor | np.ndarray | None = None,
                             tolerance: float = 0.5) -> np.ndarray:
    """``(H, W)`` bool: left pixels whose match is hidden in the right image by a nearer point, or
    falls outside it, judged from a (ground-truth) left disparity alone: pixel ``x`` is occluded
    when some ``x' > x`` on its row lands left of it, ``x' - d(x') < x - d(x) - tolerance`` (a point
    further right that lands further left is nearer and hides it). Unknown pixels (``valid`` False
    or not finite) hide nothing."""
    d = np.asarray(disparity.detach().cpu() if isinstance(disparity, Tensor) else disparity, dtype=np.float64)
    known = np.isfinite(d) if valid is None else (np.asarray(valid, dtype=bool) & np.isfinite(d))
    columns = np.arange(d.shape[1], dtype=np.float64)[None, :]
    target = np.where(known, columns - np.where(known, d, 0.0), np.inf)
    # the smallest landing column strictly to the right of each pixel (reverse running minimum)
    right_min = np.minimum.accumulate(target[:, ::-1], axis=1)[:, ::-1]
    further = np.concatenate([right_min[:, 1:], np.full((d.shape[0], 1), np.inf)], axis=1)
    return known & ((further < target - tolerance) | (target < 0))


def check_sgm_options(options: dict) -> None:
    """Raise a one-line :class:`ConfigError` for an option :func:`match` does not take or a bad value."""
    unknown = sorted(set(options) - set(SGM_OPTIONS))
    if unknown:
        raise ConfigError(f"init 'sgm' takes no option(s) {unknown}; its options: {', '.join(SGM_OPTIONS)}")
    if options.get("cost", "census") not in ("census", "zncc"):
        raise ConfigError(f"unknown matching cost {options['cost']!r}; choose census or zncc")
    if options.get("directions", 8) not in (4, 8):
        raise ConfigError(f"SGM aggregates along 4 or 8 directions, got {options['directions']}")
    low, high = options.get("min_disparity"), options.get("max_disparity")
    if low is not None and high is not None and float(high) <= float(low):
        raise ConfigError(f"max_disparity ({high}) must exceed min_disparity ({low})")


def check_rectified_pair(fixed_shape, moving_shape, who: str = "stereo matching", *,
                         error: type[Exception] = ShapeError) -> None:
    """One-line ``error`` unless the two rasters are a rectified 2D pair of one size (the left
    image's row ``y`` matches the right image's row ``y``)."""
    if len(tuple(fixed_shape)) != 2 or tuple(fixed_shape) != tuple(moving_shape):
        raise error(f"{who} needs a rectified 2D pair of one size; got {tuple(fixed_shape)} and {tuple(moving_shape)}")


def sgm_start(
    fixed: Tensor, fixed_grid, moving: Tensor, moving_grid, *, progress=None, **options
) -> tuple[DisparityField, dict[str, float]]:
    """The engine's ``init="sgm"``: :func:`match` on a rectified pair given as ``(1, C, H, W)`` tensors
    on their grids (fixed = left, moving = right, the same raster), as a :class:`DisparityField` on the
    fixed grid carrying the left-right check's ``occluded`` mask, named ``init:sgm``; and the record
    ``init_info`` keeps (range, occluded share, matching scale, seconds)."""
    check_rectified_pair(fixed_grid.shape, moving_grid.shape)
    check_sgm_options(options)
    result = match(fixed[0].detach().cpu(), moving[0].detach().cpu(), progress=progress, **options)
    start = DisparityField.from_pixels(result.disparity, fixed_grid, occluded=result.occluded)
    start.requires_grad_(False)
    start.kind = "init:sgm"
    info = {"init": "sgm", "min_disparity": float(result.min_disparity), "max_disparity": float(result.max_disparity),
            "occluded_fraction": float(result.occluded.float().mean()), "matching_scale": float(result.scale),
            **{f"sgm_{k}_seconds": round(v, 3) for k, v in result.seconds.items()}}
    return start, info


__all__ = [
    "DEFAULT_RANGE_FRACTION",
    "MAX_VOLUME",
    "SGM_OPTIONS",
    "StereoMatch",
    "census_signature",
    "check_rectified_pair",
    "check_sgm_options",
    "cost_volume",
    "default_disparity_range",
    "fill_invalid",
    "left_right_check",
    "match",
    "occlusion_from_disparity",
    "sgm_start",
    "winner_take_all",
]
