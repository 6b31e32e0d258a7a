"""A registration *case*: a fixed and a moving image plus whatever ground truth the data set has.

Every data-set loader and synthetic generator in :mod:`alignkit.data` returns :class:`Case` objects,
and every method of :mod:`alignkit.evaluate` is scored against them, so the ground truth is stored
in one direction and one frame only -- alignkit's (see :mod:`alignkit.spatial`):

* geometry goes **fixed → moving**: a transform maps a fixed point to the moving point that
  corresponds to it, and ``warped = moving ∘ map`` looks like ``fixed``;
* points and matrices are in the **world frame** of the images (LPS mm for medical images; for a
  2D raster image the world frame *is* the pixel frame, ``x`` = column, ``y`` = row, pixel centres on
  integers), so a 3x3 homography of a photograph pair is in pixels;
* a dense ``flow`` is in **voxels/pixels on the fixed grid**, components in world-axis order
  (``x`` then ``y`` for a raster image), each world component divided by the voxel size along that
  world axis (:attr:`alignkit.spatial.Grid.world_axis_spacing`):
  ``fixed(p) ≈ moving(p + flow(p))`` (Middlebury's convention). Loaders convert each data set's own convention (e.g. homogr's B → A matrices, stereo
  disparities ``left(x) = right(x - d)``) into these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from alignkit.image import Image

#: what a case's ground truth lets one measure; a loader sets ``Case.kind`` to one of these
CASE_KINDS = ("deformable", "flow", "stereo", "homography", "affine")


@dataclass(eq=False)
class Case:
    """One (fixed, moving) registration problem with its ground truth (all optional but the images).

    Attributes
    ----------
    name:
        Unique within its data set, e.g. ``"subject02<-subject01"`` or ``"middlebury/Dimetrodon"``.
    kind:
        One of :data:`CASE_KINDS`; tells a runner which metrics apply and which methods fit.
    fixed_labels, moving_labels:
        Integer label maps on the fixed / moving grids (Dice, HD95, ASD).
    label_ids:
        The labels to score (``None``: every non-zero label of ``fixed_labels``).
    fixed_points, moving_points:
        ``(N, ndim)`` float64 world coordinates; row ``i`` of each is the same anatomical point (TRE).
    flow:
        ``(ndim, *fixed_shape)`` float32 ground-truth displacement in voxels of the fixed grid.
    valid:
        ``(*fixed_shape)`` bool, where ``flow`` is known (``None``: everywhere).
    occluded:
        ``(*fixed_shape)`` bool, fixed pixels with no match in moving (EPE over non-occluded pixels).
    matrix:
        ``(ndim + 1, ndim + 1)`` float64 homogeneous matrix mapping fixed world points to moving world
        points (the true affine or homography; divide by the last coordinate for a homography).
    meta:
        Free-form provenance (dataset, files, generator parameters) for result tables.
    """

    name: str
    fixed: Image
    moving: Image
    kind: str = "deformable"
    fixed_labels: Image | None = None
    moving_labels: Image | None = None
    label_ids: list[int] | None = None
    fixed_points: np.ndarray | None = None
    moving_points: np.ndarray | None = None
    flow: np.ndarray | None = None
    valid: np.ndarray | None = None
    occluded: np.ndarray | None = None
    matrix: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in CASE_KINDS:
            raise ValueError(f"Case {self.name!r}: kind must be one of {CASE_KINDS}, got {self.kind!r}")

    @property
    def ndim(self) -> int:
        return self.fixed.ndim

    def ground_truth(self) -> list[str]:
        """Names of the ground-truth fields this case carries (for logs and result tables)."""
        names = ["labels"] if self.fixed_labels is not None and self.moving_labels is not None else []
        if self.fixed_points is not None and self.moving_points is not None:
            names.append("points")
        names += [n for n in ("flow", "occluded", "matrix") if getattr(self, n) is not None]
        return names
