"""The cubic B-spline kernel, written once for every user: B-spline free-form deformations
(:mod:`alignkit.transforms.bspline`) and the Parzen windows of Mattes mutual information
(:mod:`alignkit.losses.similarity`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def cubic_bspline(t: Tensor) -> Tensor:
    """The centred cubic B-spline kernel ``B3(t)``: support ``(-2, 2)``, integrates to 1, and its
    integer translates sum to 1 (partition of unity).

    Convention: ``t`` is measured in knot spacings from the kernel's centre.
    """
    a = t.abs()
    inner = 2.0 / 3.0 - a * a + 0.5 * a * a * a
    outer = (2.0 - a).clamp_min(0.0) ** 3 / 6.0
    return torch.where(a < 1.0, inner, outer)


def cubic_bspline_taps(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The four knots a cubic B-spline centred at ``t`` touches, with their weights and derivatives.

    Returns ``(first, weights, derivatives)``: ``first`` (long, shape of ``t``) is the first knot
    ``floor(t) - 1``; ``weights[..., i] = B3(t - (first + i))`` and ``derivatives[..., i]`` its
    derivative with respect to ``t``, ``i = 0 .. 3``. The same kernel as :func:`cubic_bspline`,
    evaluated as the uniform basis polynomials of the fractional part of ``t``: one pass over
    ``t`` instead of four over the offsets.

    Convention: ``t`` is in knot coordinates (knot ``k`` at ``t = k``).
    """
    whole = torch.floor(t)
    f = t - whole
    g = 1.0 - f
    f2, g2 = f * f, g * g
    weights = torch.stack(
        [g2 * g / 6.0, 2.0 / 3.0 - f2 + 0.5 * f2 * f, 2.0 / 3.0 - g2 + 0.5 * g2 * g, f2 * f / 6.0], dim=-1
    )
    derivatives = torch.stack([-0.5 * g2, 1.5 * f2 - 2.0 * f, 2.0 * g - 1.5 * g2, 0.5 * f2], dim=-1)
    return (whole - 1.0).long(), weights, derivatives
