"""Stereo disparity errors: bad-k, end-point error and density, as Middlebury and KITTI report them.

Convention: disparities are ``(H, W)`` pixels of the left image (``left(x) = right(x - d)``).
Ground truth is valid where ``gt_valid`` (if given) holds and the value is finite -- Middlebury marks
unknown with ``inf`` (PFM, ``.npz``), KITTI and 8-bit maps with 0 (pass the reader's ``valid``,
:func:`alignkit.io.disparity.read_disparity`). A prediction is missing where it is not finite or
``predicted`` (if given, e.g. OpenCV's negative "invalid") is False.

* ``bad<k>``: the share of ground-truth pixels whose prediction is **missing or off by more than k px**
  (Middlebury's "bad k.0" over all pixels with ground truth, holes counted as errors -- a sparse
  matcher is not rewarded for leaving the hard pixels out);
* ``bad<k>_predicted``: the same share among the pixels that have a prediction;
* ``epe``: mean absolute disparity error over pixels with both ground truth and a prediction;
* ``density``: the share of ground-truth pixels that have a prediction.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from alignkit.errors import ShapeError


def _array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def disparity_errors(
    disparity: Any,
    gt: Any,
    gt_valid: Any | None = None,
    predicted: Any | None = None,
    *,
    thresholds: tuple[float, ...] = (1.0, 2.0, 4.0),
    mask: Any | None = None,
) -> dict[str, float]:
    """``{"bad1", "bad2", "bad4", "bad1_predicted", ..., "epe", "density", "pixels"}`` (module
    docstring); ``mask`` restricts the evaluation further (e.g. non-occluded pixels)."""
    pred = _array(disparity).astype(np.float64)
    truth = _array(gt).astype(np.float64)
    if pred.shape != truth.shape or pred.ndim != 2:
        raise ShapeError(f"disparity {pred.shape} and ground truth {truth.shape} must be the same (H, W)")
    valid = np.isfinite(truth)
    for extra in (gt_valid, mask):
        if extra is not None:
            extra = _array(extra).astype(bool)
            if extra.shape != truth.shape:
                raise ShapeError(f"mask {extra.shape} does not match the disparity {truth.shape}")
            valid &= extra
    has = np.isfinite(pred)
    if predicted is not None:
        has &= _array(predicted).astype(bool)
    count = int(valid.sum())
    both = valid & has
    error = np.abs(np.where(both, pred, 0.0) - np.where(both, truth, 0.0))
    out: dict[str, float] = {"pixels": float(count)}
    for k in thresholds:
        name = f"bad{k:g}"
        wrong = valid & (~has | (error > k))
        out[name] = float(wrong.sum() / count) if count else float("nan")
        out[f"{name}_predicted"] = float((both & (error > k)).sum() / both.sum()) if both.any() else float("nan")
    out["epe"] = float(error[both].mean()) if both.any() else float("nan")
    out["density"] = float(both.sum() / count) if count else float("nan")
    return out
