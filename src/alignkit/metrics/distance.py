"""Surface distances (Hausdorff, HD95, average surface distance) and target registration error.

Conventions
-----------
* Masks are arrays (numpy or torch) with ``ndim`` spatial dimensions, non-zero = inside, of the same
  shape. ``spacing`` is the voxel size along each *array axis* (``Grid.spacing``), a scalar, or a
  :class:`~alignkit.spatial.Grid`; distances are in world units (mm). Grids with orthonormal direction
  cosines (every ITK/NIfTI grid) measure distances this way exactly.
* The **surface** of a mask is the mask minus its binary erosion by the face-connected structuring
  element; the image border counts as outside, so a mask touching the border has a surface there.
* Distances from a surface voxel of A to the surface of B come from
  ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)`` (exact Euclidean distances between
  voxel centres).
* **Symmetric** percentile Hausdorff = ``max(P_q(d(A->B)), P_q(d(B->A)))`` (the MONAI / DeepMind
  ``surface-distance`` definition, with numpy's linear percentile interpolation). The average
  surface distance pools both directions: ``mean(d(A->B) ∪ d(B->A))``.
* An empty mask (on either side) gives ``nan``.
* Points for :func:`tre` are ``(N, ndim)`` world coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from alignkit.errors import InputError, ShapeError
from alignkit.metrics.overlap import default_labels, label_array, to_numpy
from alignkit.spatial.grid import Grid

Spacing = float | Sequence[float] | np.ndarray | Tensor | Grid
"""Voxel size per array axis: a scalar, a sequence, an array/tensor, or a Grid (its ``spacing``)."""


def _spacing(spacing: Spacing, ndim: int) -> tuple[float, ...]:
    if isinstance(spacing, Grid):
        values = to_numpy(spacing.spacing, "spacing").astype(np.float64)
    else:
        values = to_numpy(spacing, "spacing").astype(np.float64).reshape(-1)
    if values.size == 1:
        values = np.repeat(values, ndim)
    if values.size != ndim:
        raise ShapeError(f"spacing must have one value per array axis ({ndim}), got {values.size}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise InputError(f"spacing must be positive and finite, got {values.tolist()}")
    return tuple(float(v) for v in values)


def _mask_pair(a_mask: Any, b_mask: Any) -> tuple[np.ndarray, np.ndarray]:
    a = to_numpy(a_mask, "a_mask") != 0
    b = to_numpy(b_mask, "b_mask") != 0
    if a.shape != b.shape:
        raise ShapeError(f"a_mask {a.shape} and b_mask {b.shape} must have the same shape")
    if a.ndim < 1:
        raise ShapeError("masks must have at least one spatial dimension")
    return a, b


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _crop_to_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of ``a | b`` plus one voxel (clipped to the image).

    Exact: every surface voxel and every nearest surface point lies inside the box, and the one-voxel
    margin keeps the erosion's behaviour (outside = empty) unchanged except at the true image border.
    """
    union = a | b
    box = []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, union.shape[axis])))
    return a[tuple(box)], b[tuple(box)]


def surface_distances(a_mask: Any, b_mask: Any, spacing: Spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances ``(d(A->B), d(B->A))`` in world units, one value per surface voxel.

    Both are empty arrays when either mask is empty.
    """
    from scipy import ndimage

    a, b = _mask_pair(a_mask, b_mask)
    sampling = _spacing(spacing, a.ndim)
    if not a.any() or not b.any():
        return np.zeros(0), np.zeros(0)
    a, b = _crop_to_union(a, b)
    surf_a, surf_b = _surface(a), _surface(b)
    dist_to_b = ndimage.distance_transform_edt(~surf_b, sampling=sampling)
    dist_to_a = ndimage.distance_transform_edt(~surf_a, sampling=sampling)
    return np.asarray(dist_to_b[surf_a], dtype=np.float64), np.asarray(dist_to_a[surf_b], dtype=np.float64)


def hausdorff_distance(a_mask: Any, b_mask: Any, spacing: Spacing, percentile: float = 100.0) -> float:
    """Symmetric ``percentile``-th Hausdorff distance between the surfaces of two masks (world units).

    ``percentile=100`` is the classical Hausdorff distance; ``nan`` when either mask is empty.
    """
    if not 0.0 <= percentile <= 100.0:
        raise InputError(f"percentile must lie in [0, 100], got {percentile}")
    d_ab, d_ba = surface_distances(a_mask, b_mask, spacing)
    if d_ab.size == 0 or d_ba.size == 0:
        return math.nan
    return float(max(np.percentile(d_ab, percentile), np.percentile(d_ba, percentile)))


def hd95(a_mask: Any, b_mask: Any, spacing: Spacing) -> float:
    """Symmetric 95th-percentile Hausdorff distance (see the module conventions); ``nan`` if a mask is empty."""
    return hausdorff_distance(a_mask, b_mask, spacing, percentile=95.0)


def average_surface_distance(a_mask: Any, b_mask: Any, spacing: Spacing, *, symmetric: bool = True) -> float:
    """Mean surface distance in world units: pooled over both directions when ``symmetric`` (ASSD),
    else ``mean(d(A->B))``. ``nan`` when either mask is empty."""
    d_ab, d_ba = surface_distances(a_mask, b_mask, spacing)
    if d_ab.size == 0 or d_ba.size == 0:
        return math.nan
    if not symmetric:
        return float(d_ab.mean())
    return float(np.concatenate([d_ab, d_ba]).mean())


def hd95_per_label(
    warped_labels: Any, fixed_labels: Any, spacing: Spacing, labels: Iterable[int] | None = None
) -> dict[int, float]:
    """:func:`hd95` of each label's masks. Labels as in :func:`~alignkit.metrics.dice_per_label`
    (default: non-zero labels of ``fixed_labels``); absent from both -> skipped, from one -> ``nan``."""
    warped = label_array(warped_labels, "warped_labels")
    fixed = label_array(fixed_labels, "fixed_labels")
    if warped.shape != fixed.shape:
        raise ShapeError(
            f"warped_labels {warped.shape} and fixed_labels {fixed.shape} must have the same shape"
        )
    present = set(np.unique(warped).tolist()) | set(np.unique(fixed).tolist())
    out: dict[int, float] = {}
    for label in default_labels(fixed, labels):
        if label not in present:
            continue
        out[label] = hd95(warped == label, fixed == label, spacing)
    return out


def tre(mapped_points: Any, target_points: Any) -> dict[str, float | int]:
    """Target registration error: Euclidean distances between ``(N, ndim)`` world points.

    ``mapped_points`` are landmarks carried by the registration, ``target_points`` their true
    positions in the same frame. Returns ``{"mean", "median", "max", "std", "n"}`` (``n`` = N).
    """
    mapped = to_numpy(mapped_points, "mapped_points").astype(np.float64)
    target = to_numpy(target_points, "target_points").astype(np.float64)
    if mapped.ndim != 2 or mapped.shape != target.shape:
        raise ShapeError(
            f"points must both be (N, ndim) of the same shape, got {mapped.shape} and {target.shape}"
        )
    if mapped.shape[0] == 0:
        raise InputError("tre needs at least one pair of points")
    if not (np.all(np.isfinite(mapped)) and np.all(np.isfinite(target))):
        raise InputError("tre: points contain NaN or Inf")
    errors = np.linalg.norm(mapped - target, axis=1)
    return {
        "mean": float(errors.mean()),
        "median": float(np.median(errors)),
        "max": float(errors.max()),
        "std": float(errors.std()),
        "n": int(errors.size),
    }
