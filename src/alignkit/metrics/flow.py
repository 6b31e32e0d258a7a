"""Optical-flow metrics: end-point error (all / non-occluded / occluded pixels) and KITTI Fl-all.

Conventions
-----------
* Optical flows are ``(..., H, W, 2)`` arrays (numpy or torch) in pixels, components ``(x, y)`` =
  (column, row) displacement -- the Middlebury ``.flo`` / KITTI layout. Any leading batch dimensions
  are pooled.
* A ground-truth pixel is **invalid** where either component is NaN or its magnitude exceeds ``1e9``
  (Middlebury's "unknown"), or where ``valid == 0`` (KITTI / Sintel masks, shape ``(..., H, W)``).
  Errors are averaged over valid pixels only; with no valid pixel the result is ``nan``.
* ``occluded`` (same shape as ``valid``, non-zero = occluded) splits the valid pixels into
  non-occluded ("noc", the KITTI ``flow_noc`` / Sintel "matched" region) and occluded ones; an
  occluded pixel still counts in the "all" figures when it is valid.
* Jacobian statistics of deformations live in :mod:`alignkit.metrics.jacobian`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from alignkit.errors import InputError, ShapeError
from alignkit.metrics.overlap import to_numpy

UNKNOWN_FLOW_THRESHOLD = 1e9
"""Middlebury's marker: ground-truth components above this magnitude mean "unknown"."""


def _pixel_mask(mask: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    values = to_numpy(mask, name)
    if values.shape != shape:
        raise ShapeError(f"{name} must be {shape} (the flow without its last axis), got {values.shape}")
    return values != 0


def _flow_errors(
    flow: Any, gt: Any, valid: Any | None, occluded: Any | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """End-point errors and ground-truth magnitudes at the valid pixels (float64, 1D each), and the
    occlusion flags of those pixels when ``occluded`` is given."""
    est = to_numpy(flow, "flow").astype(np.float64)
    ref = to_numpy(gt, "gt").astype(np.float64)
    if est.ndim < 3 or est.shape[-1] != 2:
        raise ShapeError(f"flow must be (..., H, W, 2) with (x, y) components last, got {est.shape}")
    if est.shape != ref.shape:
        raise ShapeError(f"flow {est.shape} and gt {ref.shape} must have the same shape")
    with np.errstate(invalid="ignore"):
        ok = np.all(np.isfinite(ref), axis=-1) & np.all(np.abs(ref) <= UNKNOWN_FLOW_THRESHOLD, axis=-1)
    if valid is not None:
        ok &= _pixel_mask(valid, est.shape[:-1], "valid")
    occ = None if occluded is None else _pixel_mask(occluded, est.shape[:-1], "occluded")[ok]
    if not np.all(np.isfinite(est[ok])):
        raise InputError("flow contains NaN or Inf at valid ground-truth pixels")
    diff = est[ok] - ref[ok]
    return np.sqrt((diff**2).sum(axis=-1)), np.sqrt((ref[ok] ** 2).sum(axis=-1)), occ


def endpoint_error(flow: Any, gt: Any, valid: Any | None = None) -> float:
    """Average end-point error ``mean ||flow - gt||`` in pixels over valid pixels; ``nan`` if none."""
    epe, _, _ = _flow_errors(flow, gt, valid)
    return float(epe.mean()) if epe.size else math.nan


def fl_all(flow: Any, gt: Any, valid: Any | None = None) -> float:
    """KITTI 2015 ``Fl-all``: percent (0-100) of valid pixels whose EPE is > 3 px **and** > 5 % of
    ``||gt||``; ``nan`` if there is no valid pixel."""
    epe, mag, _ = _flow_errors(flow, gt, valid)
    if epe.size == 0:
        return math.nan
    outliers = (epe > 3.0) & (epe > 0.05 * mag)
    return float(outliers.mean() * 100.0)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def flow_error_stats(
    flow: Any, gt: Any, valid: Any | None = None, occluded: Any | None = None
) -> dict[str, float]:
    """EPE plus the usual accuracy rates: ``{"epe", "1px", "3px", "5px", "fl_all", "n_valid"}``.

    ``Npx`` is the percent of valid pixels with EPE < N (RAFT's convention); ``fl_all`` as in
    :func:`fl_all`. Rates and EPE are ``nan`` when no pixel is valid.

    With ``occluded`` (``(..., H, W)``, non-zero = occluded) the result also holds ``epe_noc`` (mean
    EPE over valid non-occluded pixels, KITTI's "Noc" / Sintel's "matched"), ``epe_occ`` (valid
    occluded pixels, Sintel's "unmatched") and their pixel counts ``n_noc`` / ``n_occ``; an empty
    group gives ``nan``.
    """
    epe, mag, occ = _flow_errors(flow, gt, valid, occluded)
    out: dict[str, float] = {
        "epe": _mean(epe),
        "1px": _mean((epe < 1.0) * 100.0),
        "3px": _mean((epe < 3.0) * 100.0),
        "5px": _mean((epe < 5.0) * 100.0),
        "fl_all": _mean(((epe > 3.0) & (epe > 0.05 * mag)) * 100.0),
        "n_valid": int(epe.size),
    }
    if occ is not None:
        out.update(
            epe_noc=_mean(epe[~occ]), epe_occ=_mean(epe[occ]), n_noc=int((~occ).sum()), n_occ=int(occ.sum())
        )
    return out
