"""The one small interface behind which alignkit's own configurations and every peer tool sit.

A :class:`Method` turns a :class:`~alignkit.data.case.Case` into a :class:`Prediction`: the map
from fixed-grid points to moving world points (alignkit's fixed → moving direction), optionally the
matrix when the method is linear, and its run time. Scoring is done from the prediction by
:mod:`alignkit.evaluate.scoring` the same way for every method, so no tool is scored by its own code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from alignkit.data.case import Case


@dataclass(eq=False)
class Prediction:
    """What a method returns for one case.

    Attributes
    ----------
    world_map:
        ``(ndim, *fixed_shape)`` float32/float64: for each fixed voxel centre, the moving **world**
        point it maps to. Required unless ``matrix`` is given (then it is built from the matrix).
    matrix:
        ``(ndim + 1, ndim + 1)`` fixed world → moving world homogeneous matrix, for linear methods
        (affine, homography); lets corner errors use the exact model instead of the sampled map.
    warped_labels:
        ``(*fixed_shape)`` int: the method's own warp of the moving labels, when the scorer should
        use it instead of resampling ``moving_labels`` through ``world_map`` (nearest neighbour).
    seconds:
        Wall time of the registration itself (reading the inputs excluded, writing the map excluded).
    peak_rss_mb:
        Peak resident memory of the process that ran it (filled in by the runner when isolated).
    extra:
        Method-specific numbers worth keeping in ``results.csv`` (iterations, settings, stage times).
    """

    world_map: np.ndarray | None = None
    matrix: np.ndarray | None = None
    warped_labels: np.ndarray | None = None
    seconds: float = float("nan")
    peak_rss_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class MethodUnavailable(Exception):
    """The method cannot run here (package not installed, no checkpoint, no GPU): reported as skipped."""


class Method:
    """Base class: ``name`` is what ``--method`` takes (``"ants:syn"``, ``"alignkit:brain"``).

    Subclasses implement :meth:`check_available` (raise :class:`MethodUnavailable` with a reason)
    and :meth:`register`. ``kinds`` lists the :data:`~alignkit.data.case.CASE_KINDS` the method makes
    sense for (a runner reports other cases as ``not applicable`` rather than running them);
    ``ndims`` the image dimensionalities it supports.
    """

    name: str = ""
    description: str = ""
    kinds: tuple[str, ...] = ("deformable", "flow", "stereo", "homography", "affine")
    ndims: tuple[int, ...] = (2, 3)

    def __init__(self, name: str | None = None, **options: Any) -> None:
        if name is not None:
            self.name = name
        self.options = options

    def check_available(self) -> None:
        """Raise :class:`MethodUnavailable` when the method cannot run in this environment."""

    def applicable(self, case: Case) -> str | None:
        """``None`` when the method fits the case, else the reason it does not."""
        if case.ndim not in self.ndims:
            return f"{self.name} handles {'/'.join(map(str, self.ndims))}D images, not {case.ndim}D"
        if case.kind not in self.kinds:
            return f"{self.name} does not handle {case.kind} cases"
        return None

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
