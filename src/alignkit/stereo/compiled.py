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
  diagonally from it, on the right one (Hirschmüller's trick, without building the right volume);
* :func:`sgm_sweeps` -- the matcher's path: :func:`aggregate` and :func:`select` fused into two sweeps
  over the rows (the paths from above and along the row top-down, those from below bottom-up, each
  row selected once its sum is complete), on a disparity axis padded to a multiple of the vector width
  (:data:`PAD_COST`); :func:`aggregate` and :func:`select` stay as its plain reference. Profiled in
  the fourth pass: the per-direction kernel streamed the volume through memory 8 times and called a
  per-pixel step whose argument passing cost more than its arithmetic.
* :func:`grey_pair_unit`, :func:`step_penalties`, :func:`check_and_fill` -- the matcher's steps around
  the sweeps (grey pair on its joint range, the adaptive P2 of every path, the left-right check and the
  filling), each the values of its torch reference exactly. Seventh pass (issue 16): as ~80 tensor
  operations on two threads they took 0.025-0.8 s a pair on a 2-core machine with another process on
  its other core (each operation a two-thread parallel region waiting for that core; the range is the
  neighbour's load and OpenMP's wait policy), as these kernels ~0.019 s.

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
#: kernels compiled into their callers (numba ``inline="always"``): a small per-pixel step called as a
#: function pays ~20 ns per call in argument passing and reference counting of the row views
_INLINE: set[str] = set()
#: kernels whose float reductions may be reordered (vectorised): only where the result is compared to
#: its reference within float rounding, never where integers must be equal
_FASTMATH: set[str] = set()


def _jit(function=None, *, inline: bool = False, fastmath: bool = False):
    # registered here, compiled by :func:`_compiled` on first use (cache=True: once per installation)
    def register(function):
        _KERNELS.append(function)
        if inline:
            _INLINE.add(function.__name__)
        if fastmath:
            _FASTMATH.add(function.__name__)
        return function

    return register(function) if function is not None else register


@functools.cache
def _compiled() -> SimpleNamespace:
    """The jitted kernels, by name; kernels calling each other resolve to the jitted versions because
    they are compiled into this namespace's globals in order."""
    import numba

    jitted = {}
    for function in _KERNELS:
        inline = "always" if function.__name__ in _INLINE else "never"
        fastmath = function.__name__ in _FASTMATH
        jitted[function.__name__] = numba.njit(cache=True, nogil=True, inline=inline, fastmath=fastmath)(function)
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
def _census_cost(sig_left, sig_right, low, count, bits, levels, pad, out):
    # ``out`` (H, W, >= count), int16 or uint8: entries past ``count`` get ``pad`` (the padding of
    # :func:`sgm_sweeps`)
    height, width = sig_left.shape
    padded = out.shape[2]
    # the quantised cost of each possible bit count, computed as the reference does it (float32 count /
    # bits * levels, rounded half to even) so both paths give the same integers
    table = np.empty(65, out.dtype)
    for c in range(65):
        table[c] = np.int16(np.round(np.float32(c) / np.float32(bits) * np.float32(levels)))
    outside = levels
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
            for k in range(count, padded):
                out[y, x, k] = pad


@_jit
def _census_signature(image, rows, cols, out):
    # ``image`` is edge-replicated by rows // 2 and cols // 2 (as the reference pads): no clamping per tap.
    # Row by row, one tap at a time across the row (contiguous loads, vectorised over pixels), the
    # bits in the reference's order (taps row-major, the centre skipped)
    height, width = out.shape
    half_r, half_c = rows // 2, cols // 2
    for y in range(height):
        signature = out[y]
        signature[:] = 0
        centre = image[y + half_r, half_c : half_c + width]
        bit = np.uint64(0)
        for dy in range(rows):
            for dx in range(cols):
                if dy == half_r and dx == half_c:
                    continue
                tap = image[y + dy, dx : dx + width]
                for x in range(width):
                    signature[x] |= np.uint64(tap[x] < centre[x]) << bit
                bit += np.uint64(1)


def census_signature(image: np.ndarray, window: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` uint64 census signatures, as :func:`alignkit.stereo.cost.census_signature` (which
    checks the window)."""
    out = np.empty(image.shape, np.uint64)
    rows, cols = int(window[0]), int(window[1])
    padded = np.pad(np.asarray(image, dtype=np.float32), ((rows // 2, rows // 2), (cols // 2, cols // 2)), mode="edge")
    _compiled()._census_signature(np.ascontiguousarray(padded), rows, cols, out)
    return out


def census_cost(sig_left: np.ndarray, sig_right: np.ndarray, min_disparity: int, count: int, bits: int,
                levels: int, padded: int | None = None, dtype=np.int16) -> np.ndarray:
    """``(H, W, D)`` census cost in units of ``1 / levels`` of its range (the reference's
    ``round(cost * levels)``), ``levels`` where ``x - d`` leaves the right image; int16, or uint8
    (``levels`` < 255). ``padded``: the disparity axis is that long instead, the entries past ``D``
    holding the padding of :func:`sgm_sweeps` (:data:`PAD_COST`, or :data:`PAD_COST_U8`) -- the layout
    it reads without a copy."""
    height, width = sig_left.shape
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.int16), np.dtype(np.uint8)) or (dtype == np.uint8 and levels >= PAD_COST_U8):
        raise ValueError(f"census_cost writes int16, or uint8 below {PAD_COST_U8} levels; got {dtype}, {levels}")
    pad = PAD_COST if dtype == np.int16 else PAD_COST_U8
    out = np.empty((height, width, count if padded is None else max(int(padded), count)), dtype)
    _compiled()._census_cost(np.ascontiguousarray(sig_left), np.ascontiguousarray(sig_right), int(min_disparity),
                             int(count), int(bits), int(levels), int(pad), out)
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


#: cost of the padding entries of the disparity axis in :func:`sgm_sweeps` (beyond the last real
#: disparity). A real path cost is at most the largest quantised cost plus P2 (64 + 1024, P2 <= 16 in
#: the cost's units, :func:`alignkit.stereo.sgm.check_penalties`), so the jump term ``min L + P2`` of a
#: real entry is at most 64 + 2 * 1024 = 2112; a padding entry's path cost is at least PAD_COST, so it
#: never wins a minimum, nor as the neighbour ``d + 1`` of the last real disparity. Its sums over 8
#: paths, at most 8 * (PAD_COST + 1024), still fit int16
PAD_COST = 2200
#: the padding of a uint8 cost volume (:func:`census_cost` with ``dtype=np.uint8``): valid while
#: ``64 + 2 P2 - P1 < PAD_COST_U8`` (the same bound with this padding; :func:`uint8_costs_fit`)
PAD_COST_U8 = 255


def uint8_costs_fit(p1: int, p2: int, levels: int = 64) -> bool:
    """Whether :func:`sgm_sweeps` may read a uint8 cost volume padded with :data:`PAD_COST_U8` for these
    quantised penalties (the padding bound of :data:`PAD_COST`: ``levels + 2 P2 - P1 < PAD_COST_U8``):
    half the memory of int16 (the stereo preset's P1 3, P2 38 fit)."""
    return levels + 2 * int(p2) - int(p1) < PAD_COST_U8
#: the constant sentinel around a padded path row (read as the neighbours d - 1 of the first and d + 1
#: of the last padded entry, never written)
_SENTINEL = 8192
#: offset of logical disparity 0 in a padded path row (room for the sentinel before it)
_OFFSET = 16


@_jit(inline=True)
def _path_update(here_cost, source, previous_low, jump, step, out, into):
    # one SGM step over a padded disparity row: ``source``/``out`` are path rows with the sentinel
    # around logical entries [_OFFSET, _OFFSET + padded); ``here_cost``/``into`` are (padded,) rows.
    # Branch-free over the whole padded length (a multiple of a vector width: no scalar tail).
    low = np.int16(32767)
    for j in range(here_cost.shape[0]):
        p = j + _OFFSET
        neighbour = np.int16(min(source[p - 1], source[p + 1]) + step)
        value = np.int16(here_cost[j] + min(min(source[p], neighbour), jump) - previous_low)
        out[p] = value
        into[j] += value
        low = min(low, value)
    return low


@_jit(inline=True)
def _path_update3(here_cost, source_a, source_b, source_c, low_a, low_b, low_c, jump_a, jump_b, jump_c, step, out_a,
                  out_b, out_c, into):
    # :func:`_path_update` for three paths into one pixel at once (the three from the previous row):
    # the pixel's costs and sums are loaded and the sums stored once instead of three times
    best_a = np.int16(32767)
    best_b = np.int16(32767)
    best_c = np.int16(32767)
    for j in range(here_cost.shape[0]):
        p = j + _OFFSET
        cost = here_cost[j]
        value_a = np.int16(cost + min(min(source_a[p], np.int16(min(source_a[p - 1], source_a[p + 1]) + step)), jump_a)
                           - low_a)
        value_b = np.int16(cost + min(min(source_b[p], np.int16(min(source_b[p - 1], source_b[p + 1]) + step)), jump_b)
                           - low_b)
        value_c = np.int16(cost + min(min(source_c[p], np.int16(min(source_c[p - 1], source_c[p + 1]) + step)), jump_c)
                           - low_c)
        out_a[p] = value_a
        out_b[p] = value_b
        out_c[p] = value_c
        into[j] += np.int16(value_a + value_b + value_c)
        best_a = min(best_a, value_a)
        best_b = min(best_b, value_b)
        best_c = min(best_c, value_c)
    return best_a, best_b, best_c


@_jit(inline=True)
def _path_start(here_cost, out, into):
    low = np.int16(32767)
    for j in range(here_cost.shape[0]):
        value = np.int16(here_cost[j])
        out[j + _OFFSET] = value
        into[j] += value
        low = min(low, value)
    return low


@_jit
def _sgm_sweeps(cost, count, horizontal, down, down_dx, up, up_dx, p1, min_disparity, total, left_out, right_out):
    # ``cost`` and ``total`` (H, W, padded): the costs padded with PAD_COST; the sums (zeros on entry)
    height, width, padded = cost.shape
    length = padded + 2 * _OFFSET
    step = np.int16(p1)
    line = np.full((2, length), np.int16(_SENTINEL))  # horizontal paths: previous and current pixel
    rows = max(down.shape[0], up.shape[0], 1)
    previous = np.full((rows, width, length), np.int16(_SENTINEL))  # row paths: previous row
    current = np.full((rows, width, length), np.int16(_SENTINEL))
    lowest_previous = np.empty((rows, width), np.int16)
    lowest_current = np.empty((rows, width), np.int16)
    keys = np.empty((count, width), np.int32)
    left_keys = np.empty(width, np.int32)
    right_keys = np.empty(width, np.int32)
    for sweep in range(2):
        penalties, dxs = (down, down_dx) if sweep == 0 else (up, up_dx)
        fused = dxs.shape[0] == 3  # the three paths from the previous row in one loop (8 directions)
        for step_y in range(height):
            y = step_y if sweep == 0 else height - 1 - step_y
            here, sums = cost[y], total[y]  # the row's costs and sums (W, padded), in place
            if sweep == 0 and horizontal.shape[0] > 0:
                # left to right (r = (0, 1)), then right to left (r = (0, -1))
                low = _path_start(here[0], line[0], sums[0])
                for x in range(1, width):
                    low = _path_update(here[x], line[(x - 1) % 2], low, np.int16(low + horizontal[0, y, x]), step,
                                       line[x % 2], sums[x])
                low = _path_start(here[width - 1], line[0], sums[width - 1])
                for s in range(1, width):
                    x = width - 1 - s
                    low = _path_update(here[x], line[(s - 1) % 2], low, np.int16(low + horizontal[1, y, x]), step,
                                       line[s % 2], sums[x])
            for x in range(width):
                if fused:
                    pa, pb, pc = x - dxs[0], x - dxs[1], x - dxs[2]
                    if step_y > 0 and 0 <= min(pa, pb, pc) and max(pa, pb, pc) < width:
                        low_a, low_b, low_c = lowest_previous[0, pa], lowest_previous[1, pb], lowest_previous[2, pc]
                        best_a, best_b, best_c = _path_update3(
                            here[x], previous[0, pa], previous[1, pb], previous[2, pc], low_a, low_b, low_c,
                            np.int16(low_a + penalties[0, y, x]), np.int16(low_b + penalties[1, y, x]),
                            np.int16(low_c + penalties[2, y, x]), step, current[0, x], current[1, x], current[2, x],
                            sums[x])
                        lowest_current[0, x] = best_a
                        lowest_current[1, x] = best_b
                        lowest_current[2, x] = best_c
                        continue
                for i in range(dxs.shape[0]):
                    px = x - dxs[i]
                    if step_y == 0 or px < 0 or px >= width:
                        lowest_current[i, x] = _path_start(here[x], current[i, x], sums[x])
                    else:
                        previous_low = lowest_previous[i, px]
                        lowest_current[i, x] = _path_update(here[x], previous[i, px], previous_low,
                                                            np.int16(previous_low + penalties[i, y, x]), step,
                                                            current[i, x], sums[x])
            previous, current = current, previous
            lowest_previous, lowest_current = lowest_current, lowest_previous
            if sweep == 1:
                _select_row(sums, count, min_disparity, left_out[y], right_out[y], keys, left_keys, right_keys)


def padded_count(count: int, lanes: int = 8) -> int:
    """The length of :func:`sgm_sweeps`'s disparity axis for ``count`` disparities: a multiple of
    ``lanes`` int16 (8: one 128-bit vector), so that its loops have no scalar tail. Measured on
    motorcycle (65 disparities) and aloe (113), one thread: 8, 16 and 32 lanes (72, 80, 96 and 120,
    128, 128 entries) ran the sweeps in the same time, so the smallest padding wins (the volumes are
    fresh memory on each call: fewer pages to fault in)."""
    return -(-int(count) // lanes) * lanes


def sgm_sweeps(cost: np.ndarray, penalties: list[np.ndarray], directions, p1: int, min_disparity: int, *,
               count: int | None = None, keep_total: bool = False,
               lanes: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`aggregate` and :func:`select` fused into two sweeps over the rows: ``(left disparity,
    right disparity, S (H, W, D) or None)``, the same integers and floats as the two in sequence.

    The paths coming from above (``dy = 1``) and along the row run in a top-down sweep, those from below
    in a bottom-up one, one image row at a time: the row's costs, sums and the paths' previous row stay
    in cache (the per-direction :func:`aggregate` streams the whole volume through memory 8 times and
    is bound by memory bandwidth), the three paths from the previous row are updated in one loop, and
    each row's disparities are selected as soon as its sum is complete. The disparity axis is padded
    to :func:`padded_count` entries with :data:`PAD_COST` (vector loops without scalar tail): ``cost``
    ``(H, W, D)`` is copied into that layout, or, given with ``count = D``, is already in it (as
    :func:`census_cost` writes it with ``padded``). ``keep_total`` also returns ``S``."""
    cost = np.asarray(cost)
    height, width = cost.shape[:2]
    count = cost.shape[2] if count is None else int(count)
    padded = padded_count(count, lanes)
    if count < 2:
        raise ValueError("SGM needs at least 2 disparities")
    # a uint8 volume is read as given only where its padding is valid for these penalties
    small = cost.dtype == np.uint8 and uint8_costs_fit(p1, max((int(p.max()) for p in penalties), default=0))
    pad = PAD_COST_U8 if small else PAD_COST
    ready = (cost.dtype == (np.uint8 if small else np.int16) and cost.shape[2] == padded and cost.flags.c_contiguous
             and bool((cost[0, 0, count:] == pad).all()))  # padded as census_cost pads (checked on one pixel)
    if not ready:
        volume = np.full((height, width, padded), pad, np.uint8 if small else np.int16)
        volume[:, :, :count] = cost[:, :, :count]
        cost = volume
    groups: dict[str, list] = {"horizontal": [], "down": [], "up": []}
    for (dy, dx), penalty in zip(directions, penalties, strict=True):
        if dy == 0:
            groups["horizontal"].append((-dx, penalty))  # (0, 1) first, then (0, -1)
        else:
            groups["down" if dy > 0 else "up"].append((dx, penalty))
    if sorted(dx for dx, _ in groups["horizontal"]) not in ([], [-1, 1]):
        raise ValueError("the horizontal paths come in pairs (0, 1) and (0, -1)")
    groups["horizontal"].sort(key=lambda item: item[0])

    def stack(items):
        if not items:
            return np.zeros((0, height, width), np.int16)
        return np.ascontiguousarray(np.stack([np.asarray(p, dtype=np.int16) for _, p in items]))

    down_dx = np.array([dx for dx, _ in groups["down"]], np.int64)
    up_dx = np.array([dx for dx, _ in groups["up"]], np.int64)
    total = np.zeros((height, width, padded), np.int16)
    left, right = np.empty((height, width), np.float32), np.empty((height, width), np.float32)
    _compiled()._sgm_sweeps(cost, count, stack(groups["horizontal"]), stack(groups["down"]), down_dx,
                            stack(groups["up"]), up_dx, int(p1), int(min_disparity), total, left, right)
    return left, right, (np.ascontiguousarray(total[:, :, :count]) if keep_total else None)


@_jit
def _parabola(below, centre, above):
    curvature = below - np.float32(2.0) * centre + above
    if curvature > np.float32(1e-12):
        offset = (below - above) / (np.float32(2.0) * curvature)
        return min(max(offset, np.float32(-0.5)), np.float32(0.5))
    return np.float32(0.0)


@_jit
def _select_row(total, count, low, left_out, right_out, keys, left_keys, right_keys):
    # :func:`_select` on one row ``(W, >= count)`` of the aggregated volume, the same results. The row is
    # transposed into ``keys`` ``(count, W)`` int32 holding ``S << shift | k``: the first minimum over
    # ``d`` of a pixel is the minimum of its keys (value, then index), and both the left image's
    # minima (``keys[k, x]``) and the right image's (``keys[k, x + low + k]``) become branch-free
    # minima over contiguous rows, vectorised across pixels
    width = total.shape[0]
    shift = 1
    while (1 << shift) < count:
        shift += 1
    mask = np.int32((1 << shift) - 1)
    top = np.float32(32767.0)
    for x in range(width):
        for k in range(count):
            keys[k, x] = (np.int32(total[x, k]) << shift) | np.int32(k)
    outside = np.int32(32767 << shift)  # the right pixel's match leaves the left image: the dtype's top
    for x in range(width):
        left_keys[x] = keys[0, x]
        right_keys[x] = outside
    for k in range(1, count):
        for x in range(width):
            left_keys[x] = min(left_keys[x], keys[k, x])
    for k in range(count):
        # right pixel x sees left pixel x + low + k at disparity k
        for x in range(max(-low - k, 0), min(width - low - k, width)):
            right_keys[x] = min(right_keys[x], keys[k, x + low + k])
    for x in range(width):
        index = left_keys[x] & mask
        offset = np.float32(0.0)
        if 0 < index < count - 1:
            offset = _parabola(np.float32(total[x, index - 1]), np.float32(total[x, index]),
                               np.float32(total[x, index + 1]))
        left_out[x] = np.float32(index) + offset + np.float32(low)
        index = right_keys[x] & mask
        offset = np.float32(0.0)
        if 0 < index < count - 1:
            below_x, above_x = x + low + index - 1, x + low + index + 1
            below = np.float32(total[below_x, index - 1]) if 0 <= below_x < width else top
            above = np.float32(total[above_x, index + 1]) if 0 <= above_x < width else top
            offset = _parabola(below, np.float32(right_keys[x] >> shift), above)
        right_out[x] = np.float32(index) + offset + np.float32(low)


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


@_jit
def _step_penalties(image, dys, dxs, p1, p2, tau, out):
    # out[i, y, x] = P2 of the step from p - r_i to p: the arithmetic of the reference
    # (:func:`alignkit.stereo.sgm._step_penalty`) in float32, operation by operation -- |I(p) - I(p - r)|
    # (cyclic, as its roll), divided by tau, plus 1, its reciprocal times P2 (torch's ``p2 / t`` is
    # ``t.reciprocal() * p2``), rounded half to even, at least P1
    height, width = image.shape
    one = np.float32(1.0)
    for i in range(dys.shape[0]):
        dy, dx = dys[i], dxs[i]
        for y in range(height):
            py = (y - dy) % height
            for x in range(width):
                change = abs(image[y, x] - image[py, (x - dx) % width])
                value = np.rint((one / (one + change / tau)) * p2)
                out[i, y, x] = np.int16(max(value, p1))


def step_penalties(image: np.ndarray, directions, p1: int, p2: int, tau: float) -> np.ndarray:
    """``(len(directions), H, W)`` int16 adaptive P2 of each path direction ``(dy, dx)`` for a float32
    grey ``(H, W)`` image, in the aggregation's units (``p1``/``p2`` quantised, ``tau > 0``): the same
    integers as :func:`alignkit.stereo.sgm.step_penalties` (its reference) without its ~20 tensor
    operations (each a parallel region: on a loaded 2-core machine ~ms apiece)."""
    dys = np.array([d[0] for d in directions], np.int64)
    dxs = np.array([d[1] for d in directions], np.int64)
    image = np.ascontiguousarray(image, dtype=np.float32)
    out = np.empty((len(dys), *image.shape), np.int16)
    _compiled()._step_penalties(image, dys, dxs, np.float32(p1), np.float32(p2), np.float32(tau), out)
    return out


@_jit
def _check_and_fill(left, right, tolerance, occluded, filled):
    # per row: the left-right check (the right disparity at round(x - d(x)), half to even, as torch.round),
    # then each rejected pixel takes the smaller of the nearest accepted disparities on its left and right
    height, width = left.shape
    inf = np.float32(np.inf)
    last = np.float32(width - 1)
    for y in range(height):
        for x in range(width):
            d = left[y, x]
            target = np.rint(np.float32(x) - d)
            if target < 0 or target > last:
                occluded[y, x] = True
            else:
                occluded[y, x] = abs(right[y, int(target)] - d) > tolerance
        before = inf
        for x in range(width):  # the nearest accepted value at or before x (inf: none)
            if not occluded[y, x]:
                before = left[y, x]
                filled[y, x] = before
            else:
                filled[y, x] = before
        after = inf
        for x in range(width - 1, -1, -1):
            if not occluded[y, x]:
                after = left[y, x]
            else:
                fill = min(filled[y, x], after)
                filled[y, x] = fill if fill < inf else left[y, x]


def check_and_fill(left: np.ndarray, right: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """``(occluded (H, W) bool, filled (H, W) float32)``: :func:`alignkit.stereo.sgm.left_right_check`
    of two float32 disparity maps and :func:`alignkit.stereo.sgm.fill_invalid` of the left one with its
    result, in one pass over each row (the references' values exactly, ``tests/test_stereo_speed.py``)."""
    left = np.ascontiguousarray(left, dtype=np.float32)
    occluded = np.empty(left.shape, np.bool_)
    filled = np.empty(left.shape, np.float32)
    _compiled()._check_and_fill(left, np.ascontiguousarray(right, dtype=np.float32), np.float32(tolerance),
                                occluded, filled)
    return occluded, filled


@_jit
def _grey_pair_unit(left, right, left_out, right_out):
    # each image's channel mean as torch's ``mean(0)`` for a few channels (the channels summed in order,
    # then divided by their count, float32), then both rescaled by their joint range as ``match`` does
    channels = left.shape[0]
    count = np.float32(channels)
    low, high = np.float32(np.inf), np.float32(-np.inf)
    for image, out in ((left, left_out), (right, right_out)):
        for y in range(out.shape[0]):
            for x in range(out.shape[1]):
                total = image[0, y, x]
                for c in range(1, channels):
                    total += image[c, y, x]
                value = total / count
                out[y, x] = value
                low = min(low, value)
                high = max(high, value)
    # the span in float64, as the reference takes it (``float(max) - float(min)``), then used in float32
    span = np.float32(max(np.float64(high) - np.float64(low), 1e-6))
    for out in (left_out, right_out):
        for y in range(out.shape[0]):
            for x in range(out.shape[1]):
                out[y, x] = (out[y, x] - low) / span


def grey_pair_unit(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The grey ``(H, W)`` float32 images :func:`alignkit.stereo.match` matches: the channel mean of
    each ``(C, H, W)`` float32 image (``C <= 4``: torch sums so few channels in order), rescaled to
    [0, 1] by the pair's joint range -- the values of the reference (``grey``, ``min``/``max``, two
    tensor operations per image) exactly, in two passes (``tests/test_stereo_speed.py``)."""
    if left.ndim != 3 or left.shape != right.shape or not 1 <= left.shape[0] <= 4:
        raise ValueError(f"expected two (C <= 4, H, W) images of one shape, got {left.shape} and {right.shape}")
    outs = (np.empty(left.shape[1:], np.float32), np.empty(left.shape[1:], np.float32))
    _compiled()._grey_pair_unit(np.ascontiguousarray(left, dtype=np.float32),
                                np.ascontiguousarray(right, dtype=np.float32), *outs)
    return outs


@_jit(fastmath=True)
def _feature_cost(left, right, disparities, out):
    # left/right (H, W, F): each dot product is one contiguous run of channels, summed in SIMD lanes
    # (fastmath lets the compiler reorder this float reduction; the features are finite unit vectors)
    height, width, features = left.shape
    one, half = np.float32(1.0), np.float32(0.5)
    for y in range(height):
        for k in range(disparities.shape[0]):
            d = disparities[k]
            for x in range(width):
                source = x - d
                if source < 0 or source >= width:
                    out[k, y, x] = one
                else:
                    score = np.float32(0.0)
                    for c in range(features):
                        score += left[y, x, c] * right[y, source, c]
                    out[k, y, x] = (one - score) * half


def feature_cost(left: np.ndarray, right: np.ndarray, disparities: np.ndarray) -> np.ndarray:
    """``(D, H, W)`` float32 cost ``(1 - <left(x), right(x - d)>) / 2`` of ``(F, H, W)`` unit feature
    maps for each integer ``d`` of ``disparities``, 1 where ``x - d`` leaves the image: the values of
    :meth:`alignkit.nets.stereo.MatchingFeatures.cost_volume_reference` to float rounding (the channels
    are summed in another order). The reference streams the whole pair through memory once per
    disparity; here each row's features stay in cache (motorcycle, 32 features, 65 disparities, one
    thread: ~0.2 s against ~2.5 s, on a 2-core machine shared with two training jobs)."""
    left_hwf = np.ascontiguousarray(np.moveaxis(np.asarray(left, dtype=np.float32), 0, -1))
    right_hwf = np.ascontiguousarray(np.moveaxis(np.asarray(right, dtype=np.float32), 0, -1))
    out = np.empty((len(disparities), *left_hwf.shape[:2]), np.float32)
    _compiled()._feature_cost(left_hwf, right_hwf, np.asarray(disparities, dtype=np.int64), out)
    return out
