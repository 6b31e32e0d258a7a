"""Label overlap: Dice per label and its mean.

Convention: label maps are integer arrays (numpy or torch, any number of dimensions) of the *same
shape*, both on the fixed grid -- ``warped_labels`` is the moving segmentation resampled (nearest
neighbour) by the registration, ``fixed_labels`` the fixed one. Label ``0`` is background and is left
out unless asked for explicitly. Results are plain Python floats and ints so they serialise to JSON.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from alignkit.errors import InputError, ShapeError


def to_numpy(array: Any, name: str) -> np.ndarray:
    """A numpy view or copy of a numpy array, torch tensor or nested sequence (detached, on CPU)."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):  # torch.Tensor without importing torch
        array = array.detach().cpu().numpy()
    try:
        return np.asarray(array)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} cannot be read as an array: {exc}") from exc


def label_array(array: Any, name: str) -> np.ndarray:
    """``array`` as an int64 label map; floating arrays must hold whole numbers (NIfTI labels often do)."""
    values = to_numpy(array, name)
    if values.dtype == np.bool_:
        return values.astype(np.int64)
    if np.issubdtype(values.dtype, np.integer):
        return values.astype(np.int64, copy=False)
    if np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise InputError(f"{name} must hold integer labels, got non-integer or non-finite values")
        return values.astype(np.int64)
    raise InputError(f"{name} must be an integer label map, got dtype {values.dtype}")


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ShapeError(f"{name_a} {a.shape} and {name_b} {b.shape} must have the same shape")


def default_labels(fixed: np.ndarray, labels: Iterable[int] | None) -> list[int]:
    """``labels`` as a sorted list of ints, or the non-zero labels present in ``fixed``."""
    if labels is None:
        return [v for v in _label_counts(fixed) if v != 0]
    return sorted({int(v) for v in labels})


def _label_counts(values: np.ndarray) -> dict[int, int]:
    """Voxel count per label value: a histogram (``bincount``, linear time) for the usual small
    non-negative label codes, a sort (``np.unique``) otherwise."""
    flat = values.ravel()
    if flat.size and flat.min() >= 0 and flat.max() < 1 << 20:
        counts = np.bincount(flat.astype(np.int64, copy=False))
        present = np.nonzero(counts)[0]
        return dict(zip(present.tolist(), counts[present].tolist()))
    vals, counts = np.unique(flat, return_counts=True)
    return dict(zip(vals.tolist(), counts.tolist()))


def dice_per_label(
    warped_labels: Any, fixed_labels: Any, labels: Iterable[int] | None = None
) -> dict[int, float]:
    """Dice ``2 |W ∩ F| / (|W| + |F|)`` for each label.

    ``labels`` defaults to the non-zero labels present in ``fixed_labels``. A label absent from both
    maps is skipped (no entry); a label present in only one scores ``0.0``.
    """
    warped = label_array(warped_labels, "warped_labels")
    fixed = label_array(fixed_labels, "fixed_labels")
    _check_same_shape(warped, fixed, "warped_labels", "fixed_labels")
    wanted = default_labels(fixed, labels)
    # one pass of counting instead of one comparison per label (100+ labels on 10M voxels)
    w_size, f_size, inter = _label_counts(warped), _label_counts(fixed), _label_counts(fixed[warped == fixed])
    out: dict[int, float] = {}
    for label in wanted:
        total = w_size.get(label, 0) + f_size.get(label, 0)
        if total == 0:
            continue
        out[label] = 2.0 * inter.get(label, 0) / total
    return out


def mean_dice(warped_labels: Any, fixed_labels: Any, labels: Iterable[int] | None = None) -> float:
    """Mean of :func:`dice_per_label` over the labels it reports; ``nan`` when it reports none."""
    scores = dice_per_label(warped_labels, fixed_labels, labels)
    return float(np.mean(list(scores.values()))) if scores else math.nan
