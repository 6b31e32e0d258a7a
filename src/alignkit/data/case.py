"""A registration *case*: a fixed and a moving image plus whatever ground truth the data set has.

Every data-set loader and synthetic generator in :mod:`alignkit.data` returns :class:`Case` objects,
and every method of :mod:`alignkit.evaluate` is scored against them, so the ground truth is stored
in one direction and one frame only -- alignkit's (see :mod:`alignkit.spatial`):

* geometry goes **fixed → moving**: a transform maps a fixed point to the moving point that
  corresponds to it, and ``warped = moving ∘ map`` looks like ``fixed``;
* points and matrices are in the **world frame** of the images (LPS mm for medical images; for a
  2D raster image the world frame *is* the pixel frame, ``x`` = column, ``y`` = row, pixel centres on
  integers), so a 3x3 homography of a photograph pair is in pixels;
* a dense ``flow`` is alignkit's one flow (stated in :mod:`alignkit.spatial`): ``(ndim, *fixed_shape)``
  float32, **voxels of the fixed grid, array-axis order** (``(dy, dx)`` = (row, column) for a raster
  image), ``fixed(p) ≈ moving(p + flow(p))``. A ``.flo`` file's ``(H, W, 2)`` x-then-y flow becomes
  one through :func:`alignkit.spatial.flow_from_xy`.

Loaders convert each data set's own convention (e.g. homogr's B → A matrices, ``.flo`` files' (x, y)
layout, stereo disparities ``left(x) = right(x - d)``) into these.

Most ground truth is *given*: the data set ships it, or a generator drew the transform. A few cases
have none in their files; for them the truth was *measured* by registration, once, by
``benchmarks/measure_ground_truth.py`` (:mod:`alignkit.data.groundtruth`), and the case says so
(:attr:`Case.truth` ``== "measured"``, :attr:`Case.truth_source`, :attr:`Case.truth_uncertainty`, kept in
``meta`` under :data:`TRUTH_KEYS`) so that result tables can flag it: a method cannot be judged more
finely than that uncertainty on such a case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from alignkit.image import Image

#: what a case's ground truth lets one measure; a loader sets ``Case.kind`` to one of these
CASE_KINDS = ("deformable", "flow", "stereo", "homography", "affine")

#: where a case's ground truth comes from: ``"given"`` (shipped with the data, or drawn by a generator)
#: or ``"measured"`` (fitted by registration, see :mod:`alignkit.data.groundtruth`)
Truth = Literal["given", "measured"]

#: the ``Case.meta`` keys of a measured ground truth: ``truth`` ("measured"), ``truth_source`` (one line:
#: tool, settings, date, commit) and ``truth_uncertainty`` (world units of the fixed image)
TRUTH_KEYS = ("truth", "truth_source", "truth_uncertainty")


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
        ``(ndim, *fixed_shape)`` float32 ground-truth displacement in voxels of the fixed grid,
        array-axis order, ``fixed(p) ≈ moving(p + flow(p))`` (the flow of :mod:`alignkit.spatial`).
    valid:
        ``(*fixed_shape)`` bool, where ``flow`` is known (``None``: everywhere).
    occluded:
        ``(*fixed_shape)`` bool, fixed pixels with no match in moving (EPE over non-occluded pixels).
    matrix:
        ``(ndim + 1, ndim + 1)`` float64 homogeneous matrix mapping fixed world points to moving world
        points (the true affine or homography; divide by the last coordinate for a homography).
    meta:
        Free-form provenance (dataset, files, generator parameters) for result tables; a measured
        ground truth is described there under :data:`TRUTH_KEYS` (read it as :attr:`truth`,
        :attr:`truth_source`, :attr:`truth_uncertainty`). Provenance, not ground truth: a method sees it.
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
        if self.truth not in get_args(Truth):
            raise ValueError(f"Case {self.name!r}: meta['truth'] must be one of {get_args(Truth)}, got {self.truth!r}")
        if self.truth == "measured" and (not self.truth_source or self.truth_uncertainty is None):
            raise ValueError(f"Case {self.name!r}: measured ground truth needs meta['truth_source'] and "
                             "meta['truth_uncertainty']")

    @property
    def truth(self) -> Truth:
        """``"given"`` (shipped with the data or drawn by a generator) or ``"measured"`` (fitted by
        registration because the data set ships none; see :mod:`alignkit.data.groundtruth`)."""
        return self.meta.get("truth", "given")

    @property
    def truth_source(self) -> str:
        """How a measured ground truth was obtained (tool, settings, date, commit); ``""`` when given."""
        return str(self.meta.get("truth_source", ""))

    @property
    def truth_uncertainty(self) -> float | None:
        """How far a measured ground truth may be off, in world units of the fixed image (pixels or mm):
        the largest corner distance between two independent fits; ``None`` when given."""
        value = self.meta.get("truth_uncertainty")
        return None if value is None else float(value)

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
