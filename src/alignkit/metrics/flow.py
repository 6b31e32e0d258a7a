"""Metrics of flows and deformation fields: end-point error, KITTI Fl, Jacobian-determinant statistics.

Conventions
-----------
* Optical flows are ``(..., H, W, 2)`` arrays (numpy or torch) in pixels, components ``(x, y)`` =
  (column, row) displacement -- the Middlebury ``.flo`` / KITTI layout. Any leading batch dimensions
  are pooled.
* A ground-truth pixel is **invalid** where either component is NaN or its magnitude exceeds ``1e9``
  (Middlebury's "unknown"), or where ``valid == 0`` (KITTI / Sintel masks, shape ``(..., H, W)``).
  Errors are averaged over valid pixels only; with no valid pixel the result is ``nan``.
* Jacobian determinants are any-shaped arrays, e.g. the ``(B, 1, *S)`` output of
  :func:`alignkit.spatial.jacobian_determinant`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from alignkit.errors import InputError, ShapeError
from alignkit.metrics.overlap import to_numpy

UNKNOWN_FLOW_THRESHOLD = 1e9
"""Middlebury's marker: ground-truth components above this magnitude mean "unknown"."""


def _flow_errors(flow: Any, gt: Any, valid: Any | None) -> tuple[np.ndarray, np.ndarray]:
    """End-point errors and ground-truth magnitudes at the valid pixels (float64, 1D each)."""
    est = to_numpy(flow, "flow").astype(np.float64)
    ref = to_numpy(gt, "gt").astype(np.float64)
    if est.ndim < 3 or est.shape[-1] != 2:
        raise ShapeError(f"flow must be (..., H, W, 2) with (x, y) components last, got {est.shape}")
    if est.shape != ref.shape:
        raise ShapeError(f"flow {est.shape} and gt {ref.shape} must have the same shape")
    with np.errstate(invalid="ignore"):
        ok = np.all(np.isfinite(ref), axis=-1) & np.all(np.abs(ref) <= UNKNOWN_FLOW_THRESHOLD, axis=-1)
    if valid is not None:
        mask = to_numpy(valid, "valid")
        if mask.shape != est.shape[:-1]:
            raise ShapeError(
                f"valid must be {est.shape[:-1]} (the flow without its last axis), got {mask.shape}"
            )
        ok &= mask != 0
    if not np.all(np.isfinite(est[ok])):
        raise InputError("flow contains NaN or Inf at valid ground-truth pixels")
    diff = est[ok] - ref[ok]
    return np.sqrt((diff**2).sum(axis=-1)), np.sqrt((ref[ok] ** 2).sum(axis=-1))


def endpoint_error(flow: Any, gt: Any, valid: Any | None = None) -> float:
    """Average end-point error ``mean ||flow - gt||`` in pixels over valid pixels; ``nan`` if none."""
    epe, _ = _flow_errors(flow, gt, valid)
    return float(epe.mean()) if epe.size else math.nan


def fl_all(flow: Any, gt: Any, valid: Any | None = None) -> float:
    """KITTI 2015 ``Fl-all``: percent (0-100) of valid pixels whose EPE is > 3 px **and** > 5 % of
    ``||gt||``; ``nan`` if there is no valid pixel."""
    epe, mag = _flow_errors(flow, gt, valid)
    if epe.size == 0:
        return math.nan
    outliers = (epe > 3.0) & (epe > 0.05 * mag)
    return float(outliers.mean() * 100.0)


def flow_error_stats(flow: Any, gt: Any, valid: Any | None = None) -> dict[str, float]:
    """EPE plus the usual accuracy rates: ``{"epe", "1px", "3px", "5px", "fl_all", "n_valid"}``.

    ``Npx`` is the percent of valid pixels with EPE < N (RAFT's convention); ``fl_all`` as in
    :func:`fl_all`. Rates and EPE are ``nan`` when no pixel is valid.
    """
    epe, mag = _flow_errors(flow, gt, valid)
    if epe.size == 0:
        return {
            "epe": math.nan,
            "1px": math.nan,
            "3px": math.nan,
            "5px": math.nan,
            "fl_all": math.nan,
            "n_valid": 0,
        }
    return {
        "epe": float(epe.mean()),
        "1px": float((epe < 1.0).mean() * 100.0),
        "3px": float((epe < 3.0).mean() * 100.0),
        "5px": float((epe < 5.0).mean() * 100.0),
        "fl_all": float(((epe > 3.0) & (epe > 0.05 * mag)).mean() * 100.0),
        "n_valid": int(epe.size),
    }


def jacobian_stats(det: Any, mask: Any | None = None, *, clip: float = 1e-9) -> dict[str, float]:
    """Summary of a Jacobian-determinant map (restricted to ``mask != 0`` when given).

    Returns ``percent_nonpositive`` (0-100), ``num_nonpositive``, ``sdlogj`` (standard deviation of
    ``log(clip(det, clip, 1e9))``, the Learn2Reg SDlogJ), ``min``, ``max``, ``mean`` and ``n``
    (voxels counted). ``mask`` must broadcast to ``det`` (e.g. ``(*S)`` against ``(1, 1, *S)``).
    """
    values = to_numpy(det, "det").astype(np.float64)
    if mask is not None:
        m = to_numpy(mask, "mask") != 0
        try:
            m = np.broadcast_to(m.reshape((1,) * max(values.ndim - m.ndim, 0) + m.shape), values.shape)
        except ValueError as exc:
            raise ShapeError(f"mask {m.shape} does not broadcast to det {values.shape}") from exc
        values = values[m]
    values = values.reshape(-1)
    if values.size == 0:
        raise InputError("jacobian_stats: no voxel to summarise (empty det or mask)")
    if not np.all(np.isfinite(values)):
        raise InputError("jacobian_stats: det contains NaN or Inf")
    nonpositive = int((values <= 0).sum())
    return {
        "percent_nonpositive": 100.0 * nonpositive / values.size,
        "num_nonpositive": nonpositive,
        "sdlogj": float(np.log(np.clip(values, clip, 1e9)).std()),
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean()),
        "n": int(values.size),
    }
