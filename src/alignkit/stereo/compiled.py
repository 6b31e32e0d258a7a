"""Compiled (numba) kernels of semi-global matching: the optional fast path of :func:`alignkit.stereo.match`.

The reference implementation (:mod:`alignkit.stereo.cost`, :mod:`alignkit.stereo.sgm`) is vectorised
torch/numpy: a path step of the aggregation is ~8 tensor operations over a whole image line, so the
Python loop runs ``W`` or ``H`` times per direction and every operation streams the ``(D, line)``
block through memory again. Profiled on ``stereo/motorcycle`` (741x500, 65 disparities, one thread)
that aggregation was ~60 % of the matcher's time, the selection (winner-take-all on the left volume and
on a copied right volume) ~25 %, the census volume ~15 %. Here the same arithmetic runs as fused loops
over a ``(H, W, D)`` volume (the disparity axis innermost and contiguous, so the compiler vectorises the
per-pixel recurrence over ``d`` in int16 lanes):

* :func:`census_cost` -- Hamming distances of the census signatures, quantised to the aggregation's
  int16 units in one pass (no float volume);
* :func:`aggregate` -- the SGM recurrence along one direction at a time, keeping only the previous
  row's (or pixel's) path costs, accumulated into the int16 sum;
* :func:`select` -- winner-take-all with the parabola's sub-pixel offset on the left volume and, read
  diagonally from it, on the right one (Hirschmüller's trick, without building the right volume).

Integer results equal the reference's exactly; the sub-pixel disparities agree to float rounding
(``tests/test_stereo_speed.py``). Install with ``pip install alignkit[fast]`` (numba); without numba
:func:`available` is False and :func:`alignkit.stereo.match` uses the reference path.
"""

from __future__ import annotations

import functools
import importlib.util
from types import SimpleNamespace

import numpy as np


def available() -> bool:
    """Whether numba is installed (the compiled path can run). numba itself is imported on first use:
    ``import alignkit`` does not pay for it."""
    return importlib.util.find_spec("numba") is not None


_KERNELS: list = []


def _jit(function):
    # registered here, compiled by :func:`_compiled` on first use (cache=True: once per installation)
    _KERNELS.append(function)
    return function


@functools.cache
def _compiled() -> SimpleNamespace:
    """The jitted kernels, by name; kernels calling each other resolve to the jitted versions because
    they are compiled into this namespace's globals in order."""
    import numba

    jitted = {}
    for function in _KERNELS:
        jitted[function.__name__] = numba.njit(cache=True, nogil=True)(function)
        globals()[function.__name__] = jitted[function.__name__]
    return SimpleNamespace(**jitted)


@_jit
def _popcount64(value):
    # SWAR popcount (numba has no portable intrinsic); LLVM turns it into POPCNT where the CPU has one
    value = value - ((value >> np.uint64(1)) & np.uint64(0x5555555555555555))
    value = (value & np.uint64(0x3333333333333333)) + ((value >> np.uint64(2)) & np.uint64(0x3333333333333333))
    value = (value + (value >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (value * np.uint64(0x0101010101010101)) >> np.uint64(56)


@_jit
def _census_cost(sig_left, sig_right, low, count, bits, levels, out):
    height, width = sig_left.shape
    # the quantised cost of each possible bit count, computed as the reference does it (float32 count /
    # bits * levels, rounded half to even) so both paths give the same integers
    table = np.empty(65, np.int16)
    for c in range(65):
        table[c] = np.int16(np.round(np.float32(c) / np.float32(bits) * np.float32(levels)))
    outside = np.int16(levels)
    for y in range(height):
        for x in range(width):
            reference = sig_left[y, x]
            # the disparities whose match x - d lies inside the right image, without a branch per d
            first = min(max(x - low - (width - 1), 0), count)
            last = min(max(x - low, -1), count - 1)
            for k in range(first):
                out[y, x, k] = outside
            for k in range(first, last + 1):
                out[y, x, k] = table[_popcount64(reference ^ sig_right[y, x - low - k])]
            for k in range(max(last + 1, first), count):
                out[y, x, k] = outside


@_jit
def _census_signature(image, rows, cols, out):
    # ``image`` is edge-replicated by rows // 2 and cols // 2 (as the reference pads): no clamping per tap
    height, width = out.shape
    half_r, half_c = rows // 2, cols // 2
    for y in range(height):
        for x in range(width):
            centre = image[y + half_r, x + half_c]
            signature = np.uint64(0)
            bit = np.uint64(0)
            for dy in range(rows):
                for dx in range(cols):
                    if dy == half_r and dx == half_c:
                        continue
                    if image[y + dy, x + dx] < centre:
                        signature |= np.uint64(1) << bit
                    bit += np.uint64(1)
            out[y, x] = signature


def census_signature(image: np.ndarray, window: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` uint64 census signatures, as :func:`alignkit.stereo.cost.census_signature` (which
    checks the window)."""
    out = np.empty(image.shape, np.uint64)
    rows, cols = int(window[0]), int(window[1])
    padded = np.pad(np.asarray(image, dtype=np.float32), ((rows // 2, rows // 2), (cols // 2, cols // 2)), mode="edge")
    _compiled()._census_signature(np.ascontiguousarray(padded), rows, cols, out)
    return out


def census_cost(sig_left: np.ndarray, sig_right: np.ndarray, min_disparity: int, count: int, bits: int,
                levels: int) -> np.ndarray:
    """``(H, W, D)`` int16 census cost in units of ``1 / levels`` of its range (the reference's
    ``round(cost * levels)``), ``levels`` where ``x - d`` leaves the right image."""
    height, width = sig_left.shape
    out = np.empty((height, width, count), np.int16)
    _compiled()._census_cost(np.ascontiguousarray(sig_left), np.ascontiguousarray(sig_right), int(min_disparity), int(count),
                 int(bits), int(levels), out)
    return out


@_jit
def _aggregate_direction(cost, penalty, dy, dx, p1, total):
    height, width, count = cost.shape
    rows = np.empty((2, width, count), np.int16)  # path costs of the previous and the current row
    lowest = np.empty((2, width), np.int16)  # their minima over d
    row_order = range(height) if dy >= 0 else range(height - 1, -1, -1)
    for step_y, y in enumerate(row_order):
        here, there = step_y % 2, (step_y + 1) % 2
        for step_x in range(width):
            x = step_x if dx >= 0 else width - 1 - step_x
            py, px = y - dy, x - dx
            if py < 0 or py >= height or px < 0 or px >= width:
                # the path starts here: L = C
                low = np.int16(32767)
                for k in range(count):
                    value = cost[y, x, k]
                    rows[here, x, k] = value
                    total[y, x, k] += value
                    low = min(low, value)
                lowest[here, x] = low
                continue
            source = rows[there if dy != 0 else here, px]
            previous_low = lowest[there if dy != 0 else here, px]
            jump = np.int16(previous_low + penalty[y, x])
            step = np.int16(p1)
            out, into, here_cost = rows[here, x], total[y, x], cost[y, x]
            # d = 0 and d = D - 1 have one neighbour; the inner loop has no branch (vectorisable);
            # a path's costs never alias: the predecessor is another pixel (count >= 2 disparities)
            value = np.int16(here_cost[0] + min(min(source[0], np.int16(source[1] + step)), jump) - previous_low)
            out[0] = value
            into[0] += value
            low = value
            for k in range(1, count - 1):
                neighbour = np.int16(min(source[k - 1], source[k + 1]) + step)
                value = np.int16(here_cost[k] + min(min(source[k], neighbour), jump) - previous_low)
                out[k] = value
                into[k] += value
                low = min(low, value)
            last = count - 1
            value = np.int16(here_cost[last] + min(min(source[last], np.int16(source[last - 1] + step)), jump)
                             - previous_low)
            out[last] = value
            into[last] += value
            lowest[here, x] = min(low, value)


def aggregate(cost: np.ndarray, penalties: list[np.ndarray], directions, p1: int, progress=None) -> np.ndarray:
    """``S = sum_r L_r`` ``(H, W, D)`` int16 of a quantised ``(H, W, D)`` int16 cost, ``penalties[i]``
    ``(H, W)`` int16 being the P2 of the step into each pixel along ``directions[i]`` ``(dy, dx)``
    (:func:`alignkit.stereo.sgm._step_penalty`)."""
    cost = np.ascontiguousarray(cost, dtype=np.int16)
    total = np.zeros_like(cost)
    bar = progress(total=len(directions), desc="  sgm", unit="path") if progress else None
    try:
        for (dy, dx), penalty in zip(directions, penalties, strict=True):
            _compiled()._aggregate_direction(cost, np.ascontiguousarray(penalty, dtype=np.int16), int(dy), int(dx),
                                             int(p1), total)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return total


@_jit
def _parabola(below, centre, above):
    curvature = below - np.float32(2.0) * centre + above
    if curvature > np.float32(1e-12):
        offset = (below - above) / (np.float32(2.0) * curvature)
        return min(max(offset, np.float32(-0.5)), np.float32(0.5))
    return np.float32(0.0)


@_jit
def _select(total, low, left_out, right_out):
    height, width, count = total.shape
    top = np.float32(32767.0)
    for y in range(height):
        for x in range(width):
            # left image: the first minimum over d, then the parabola through its neighbours
            index = 0
            best = total[y, x, 0]
            for k in range(1, count):
                if total[y, x, k] < best:
                    best = total[y, x, k]
                    index = k
            offset = np.float32(0.0)
            if 0 < index < count - 1:
                offset = _parabola(np.float32(total[y, x, index - 1]), np.float32(best),
                                   np.float32(total[y, x, index + 1]))
            left_out[y, x] = np.float32(index) + offset + np.float32(low)
            # right image pixel x: its cost at d is the left volume's at x + d (outside: the dtype's top)
            index = 0
            best_value = top
            for k in range(count):
                source = x + low + k
                value = np.float32(total[y, source, k]) if 0 <= source < width else top
                if value < best_value:
                    best_value = value
                    index = k
            offset = np.float32(0.0)
            if 0 < index < count - 1:
                below_x, above_x = x + low + index - 1, x + low + index + 1
                below = np.float32(total[y, below_x, index - 1]) if 0 <= below_x < width else top
                above = np.float32(total[y, above_x, index + 1]) if 0 <= above_x < width else top
                offset = _parabola(below, best_value, above)
            right_out[y, x] = np.float32(index) + offset + np.float32(low)


def select(total: np.ndarray, min_disparity: int) -> tuple[np.ndarray, np.ndarray]:
    """``(left disparity, right disparity)`` ``(H, W)`` float32 by sub-pixel winner-take-all on the
    aggregated ``(H, W, D)`` volume, as :func:`alignkit.stereo.sgm.winner_take_all` on it and on
    :func:`alignkit.stereo.sgm.right_volume`."""
    height, width, _ = total.shape
    left, right = np.empty((height, width), np.float32), np.empty((height, width), np.float32)
    _compiled()._select(np.ascontiguousarray(total), int(min_disparity), left, right)
    return left, right


@_jit
def _median3(image, out):
    height, width = image.shape
    for y in range(height):
        above, below = max(y - 1, 0), min(y + 1, height - 1)  # edge-replicated, as the reference pads
        for x in range(width):
            left, right = max(x - 1, 0), min(x + 1, width - 1)
            p0, p1, p2 = image[above, left], image[above, x], image[above, right]
            p3, p4, p5 = image[y, left], image[y, x], image[y, right]
            p6, p7, p8 = image[below, left], image[below, x], image[below, right]
            # the 19-exchange median-of-9 network (Paeth, Graphics Gems; Devillard's opt_med9): branch-free
            p1, p2 = min(p1, p2), max(p1, p2)
            p4, p5 = min(p4, p5), max(p4, p5)
            p7, p8 = min(p7, p8), max(p7, p8)
            p0, p1 = min(p0, p1), max(p0, p1)
            p3, p4 = min(p3, p4), max(p3, p4)
            p6, p7 = min(p6, p7), max(p6, p7)
            p1, p2 = min(p1, p2), max(p1, p2)
            p4, p5 = min(p4, p5), max(p4, p5)
            p7, p8 = min(p7, p8), max(p7, p8)
            p0, p3 = min(p0, p3), max(p0, p3)
            p5, p8 = min(p5, p8), max(p5, p8)
            p4, p7 = min(p4, p7), max(p4, p7)
            p3, p6 = min(p3, p6), max(p3, p6)
            p1, p4 = min(p1, p4), max(p1, p4)
            p2, p5 = min(p2, p5), max(p2, p5)
            p4, p7 = min(p4, p7), max(p4, p7)
            p4, p2 = min(p4, p2), max(p4, p2)
            p6, p4 = min(p6, p4), max(p6, p4)
            out[y, x] = min(p4, p2)


def median3(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` float32 3x3 median of a float32 image with replicated edges."""
    out = np.empty(image.shape, np.float32)
    _compiled()._median3(np.ascontiguousarray(image, dtype=np.float32), out)
    return out
