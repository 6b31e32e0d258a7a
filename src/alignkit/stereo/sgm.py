"""Semi-global matching: cost aggregation along scanlines, winner-take-all with sub-pixel refinement,
the left-right consistency check and the filling of what it rejects.

Hirschmüller, "Stereo Processing by Semiglobal Matching and Mutual Information", IEEE TPAMI 2008.
Along each direction ``r`` the aggregated cost is

    L_r(p, d) = C(p, d) + min(L_r(p - r, d), L_r(p - r, d ± 1) + P1, min_k L_r(p - r, k) + P2) - min_k L_r(p - r, k)

and the volume ``S = sum_r L_r`` is minimised per pixel. ``P2`` is divided by ``1 + |ΔI| / tau``
along the path (the paper's intensity-adaptive ``P2``: disparity jumps are cheaper across edges),
never below ``P1``.

Vectorised: a path step processes a whole image line at once -- all rows for the horizontal and
diagonal directions (a diagonal is a horizontal pass whose predecessor is one row up or down), all
columns for the vertical ones -- so the Python loop runs ``W`` or ``H`` times per direction, each
step a few tensor operations on ``(D, H)`` or ``(D, W)``.

Volumes are ``(D, H, W)`` over the integer disparities ``min_disparity + k`` (:mod:`alignkit.stereo.cost`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignkit.errors import ConfigError

#: (dy, dx) of the 4 and 8 path directions (the 4 are the horizontal and vertical ones)
DIRECTIONS_4 = ((0, 1), (0, -1), (1, 0), (-1, 0))
DIRECTIONS_8 = DIRECTIONS_4 + ((1, 1), (1, -1), (-1, 1), (-1, -1))


#: costs are aggregated as int16 in units of 1/COST_LEVELS of the cost's range: integer SIMD lanes are
#: twice as many as float32's (measured 3x faster per path step, one thread), and a census cost is an
#: integer count anyway; sums of 8 paths stay below 8 * (1 + P2) * COST_LEVELS, far inside int16
COST_LEVELS = 64


def _step_penalty(image: Tensor, dy: int, dx: int, p1: int, p2: int, tau: float) -> Tensor:
    """``(H, W)`` int16 P2 at each pixel for the step from ``p - r`` to ``p`` (adaptive to the
    intensity change; ``tau <= 0`` switches the adaptation off)."""
    if tau <= 0:
        return torch.full(image.shape, p2, dtype=torch.int16)
    previous = torch.roll(image, shifts=(dy, dx), dims=(0, 1))  # previous[p] = image[p - r]
    change = (image - previous).abs()
    return torch.round(p2 / (1.0 + change / tau)).clamp(min=p1).to(torch.int16)


def _aggregate_lines(lines: Tensor, penalties: Tensor, total: Tensor, p1: int, shift: int, backwards: bool) -> None:
    """Add ``L_r`` to ``total`` for one direction walking along the first axis of ``lines``
    ``(N, D, M)`` int16 (``backwards``: from the last line), the predecessor of line position ``m``
    being ``m - shift`` on the previous line. In-place on two alternating preallocated lines and
    views of them (no copy of the predecessor for a diagonal's shift): a step is ~8 tensor operations
    on ``(D, M)``."""
    count = lines.shape[0]
    order = range(count - 1, -1, -1) if backwards else range(count)
    buffers = (torch.empty_like(lines[0]), torch.empty_like(lines[0]))
    best_line = torch.empty_like(lines[0])
    plus_line = torch.empty_like(lines[0])
    # positions whose predecessor m - shift exists, the predecessors' positions, and the rest (which
    # start the path afresh: L = C there)
    if shift > 0:
        here, there, fresh = slice(shift, None), slice(None, -shift), slice(None, shift)
    elif shift < 0:
        here, there, fresh = slice(None, shift), slice(-shift, None), slice(shift, None)
    else:
        here, there, fresh = slice(None), slice(None), None
    for step, index in enumerate(order):
        current, out = lines[index], buffers[step % 2]
        if step == 0:
            out.copy_(current)
            total[index] += current
            continue
        source = buffers[(step - 1) % 2][:, there]
        best, plus = best_line[:, here], plus_line[:, here]
        lowest = source.amin(0, keepdim=True)
        torch.add(source, p1, out=plus)
        torch.minimum(source[:-1], plus[1:], out=best[:-1])
        best[-1] = source[-1]
        torch.minimum(best[1:], plus[:-1], out=best[1:])
        torch.minimum(best, lowest + penalties[index][here], out=best)
        best.sub_(lowest)
        torch.add(current[:, here], best, out=out[:, here])
        if fresh is not None:
            out[:, fresh] = current[:, fresh]
        total[index] += out


def check_penalties(p1: float, p2: float, directions: int) -> None:
    """One-line :class:`ConfigError` for SGM settings :func:`aggregate` cannot use."""
    if directions not in (4, 8):
        raise ConfigError(f"SGM aggregates along 4 or 8 directions, got {directions}")
    if not 0 <= p1 <= p2:
        raise ConfigError(f"SGM needs 0 <= P1 <= P2, got P1={p1}, P2={p2}")
    if p2 > 16:
        raise ConfigError(f"SGM P2 is in units of the cost's range [0, 1]; {p2} would overflow the sums")


def quantise(cost: Tensor) -> Tensor:
    """A cost in [0, 1] as int16 in units of ``1 / COST_LEVELS`` (the aggregation's arithmetic)."""
    return torch.round(cost.clamp(0, 1) * COST_LEVELS).to(torch.int16)


def step_penalties(image: Tensor, p1: float, p2: float, tau: float, directions: int) -> list[tuple[tuple[int, int], Tensor]]:
    """``[((dy, dx), P2 (H, W) int16), ...]`` of each path direction, in :func:`aggregate`'s units.

    A direction ``r`` opposite to one already computed, ``-r``, takes that map rolled by ``r``: its
    change at ``p``, ``|I(p) - I(p - r)|``, is ``-r``'s change at ``q = p - r``, ``|I(q) - I(q + r)|``
    (both rolls cyclic): one computation per pair of directions, the same integers as
    :func:`_step_penalty` for each (``tests/test_stereo_speed.py``)."""
    p1_q, p2_q = round(p1 * COST_LEVELS), round(p2 * COST_LEVELS)
    steps = DIRECTIONS_8 if directions == 8 else DIRECTIONS_4
    computed: dict[tuple[int, int], Tensor] = {}
    for dy, dx in steps:
        opposite = computed.get((-dy, -dx))
        computed[(dy, dx)] = (_step_penalty(image, dy, dx, p1_q, p2_q, tau) if opposite is None
                              else torch.roll(opposite, shifts=(dy, dx), dims=(0, 1)))
    return [((dy, dx), computed[(dy, dx)]) for dy, dx in steps]


def aggregate(
    cost: Tensor,
    image: Tensor,
    *,
    p1: float = 0.05,
    p2: float = 0.6,
    tau: float = 0.05,
    directions: int = 8,
    progress=None,
) -> Tensor:
    """``S = sum_r L_r`` ``(D, H, W)`` of a cost volume in [0, 1] (module docstring), as int16 in
    units of ``1 / COST_LEVELS``. ``image`` is the grey left image ``(H, W)`` scaled to [0, 1] (for
    the adaptive ``P2``); ``p1``/``p2`` are in the cost's units; ``directions`` 4 or 8."""
    check_penalties(p1, p2, directions)
    quantised = quantise(cost)
    p1_q, p2_q = round(p1 * COST_LEVELS), round(p2 * COST_LEVELS)
    along_columns = quantised.permute(2, 0, 1).contiguous()  # (W, D, H): horizontal and diagonal paths
    along_rows = quantised.permute(1, 0, 2).contiguous()  # (H, D, W): vertical paths
    del quantised
    total_columns = torch.zeros_like(along_columns)
    total_rows = torch.zeros_like(along_rows)
    steps = DIRECTIONS_8 if directions == 8 else DIRECTIONS_4
    bar = progress(total=len(steps), desc="  sgm", unit="path") if progress else None
    try:
        for dy, dx in steps:
            penalty = _step_penalty(image, dy, dx, p1_q, p2_q, tau)
            if dx != 0:
                _aggregate_lines(along_columns, penalty.t().contiguous(), total_columns, p1_q, dy, dx < 0)
            else:
                _aggregate_lines(along_rows, penalty, total_rows, p1_q, 0, dy < 0)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return total_columns.permute(1, 2, 0) + total_rows.permute(1, 0, 2)


def winner_take_all(volume: Tensor, min_disparity: int) -> tuple[Tensor, Tensor]:
    """``(disparity (H, W) float32 with parabola sub-pixel refinement, best cost (H, W))``.

    The parabola through the costs at ``k - 1, k, k + 1`` has its vertex at
    ``k + (c- - c+) / (2 (c- - 2 c + c+))``; at the ends of the range the integer is kept."""
    best_cost, index = volume.min(0)
    count = volume.shape[0]
    inner = index.clamp(1, max(count - 2, 1))
    below = volume.gather(0, (inner - 1).clamp(min=0)[None])[0].float()
    centre = volume.gather(0, inner[None])[0].float()
    above = volume.gather(0, (inner + 1).clamp(max=count - 1)[None])[0].float()
    curvature = below - 2 * centre + above
    offset = torch.where(curvature > 1e-12, (below - above) / (2 * curvature).clamp(min=1e-12), torch.zeros_like(curvature))
    at_end = (index == 0) | (index == count - 1)
    offset = torch.where(at_end, torch.zeros_like(offset), offset.clamp(-0.5, 0.5))
    return index.float() + offset + float(min_disparity), best_cost.float()


def right_volume(volume: Tensor, min_disparity: int) -> Tensor:
    """The aggregated volume seen from the right image: ``R[k, y, x] = S[k, y, x + d_k]``
    (Hirschmüller's trick: no second matching); the dtype's largest value (``inf`` for floats) where
    ``x + d_k`` leaves the left image."""
    count, _, width = volume.shape
    top = torch.finfo(volume.dtype).max if volume.dtype.is_floating_point else torch.iinfo(volume.dtype).max
    out = torch.full_like(volume, top)
    for k in range(count):
        d = min_disparity + k
        if d >= 0:
            if d < width:
                out[k, :, : width - d] = volume[k, :, d:]
        elif -d < width:
            out[k, :, -d:] = volume[k, :, : width + d]
    return out


def left_right_check(left_disparity: Tensor, right_disparity: Tensor, tolerance: float = 1.0) -> Tensor:
    """``(H, W)`` bool, True where the left disparity is **inconsistent** (occluded or mismatched):
    the right image's disparity at ``x - d(x)`` differs from ``d(x)`` by more than ``tolerance``
    pixels, or ``x - d(x)`` leaves the right image."""
    height, width = left_disparity.shape
    columns = torch.arange(width, dtype=left_disparity.dtype).expand(height, width)
    target = torch.round(columns - left_disparity)
    outside = (target < 0) | (target > width - 1)
    seen = right_disparity.gather(1, target.clamp(0, width - 1).long())
    return outside | ((seen - left_disparity).abs() > tolerance)


def fill_invalid(disparity: Tensor, invalid: Tensor) -> Tensor:
    """Fill rejected pixels from their row: the smaller (farther) of the nearest valid disparities
    to the left and to the right -- an occluded pixel belongs to the background (Hirschmüller 2008
    §4.3). Rows with no valid pixel keep their values."""
    height, width = disparity.shape
    columns = torch.arange(width).expand(height, width)
    valid = ~invalid
    # index of the nearest valid pixel at or before each column (running max), and at or after
    before = torch.where(valid, columns, torch.full_like(columns, -1)).cummax(1).values
    after = torch.where(valid, columns, torch.full_like(columns, width)).flip(1).cummin(1).values.flip(1)
    left_value = disparity.gather(1, before.clamp(min=0))
    right_value = disparity.gather(1, after.clamp(max=width - 1))
    inf = torch.full_like(disparity, float("inf"))
    left_value = torch.where(before >= 0, left_value, inf)
    right_value = torch.where(after < width, right_value, inf)
    fill = torch.minimum(left_value, right_value)
    fill = torch.where(torch.isfinite(fill), fill, disparity)
    return torch.where(invalid, fill, disparity)
