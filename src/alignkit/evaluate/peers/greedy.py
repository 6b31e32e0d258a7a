"""PICSL Greedy (``picsl-greedy``), through its Python API with images in memory.

Settings are the documented example of Greedy's manual (the issue-17 comparison used them):

* ``greedy:affine``     -- ``-a -dof 12 -m NCC 2x2x2 -ia-image-centers -n 100x50x10``: 12-dof affine,
  NCC with a 2-voxel radius, started by matching the image centres; the prediction carries the
  exact matrix.
* ``greedy:deformable`` -- that affine, then ``-it <affine> -m NCC 2x2x2 -s 2.0vox 0.5vox
  -n 100x50x10`` (greedy diffeomorphic update smoothed by 2 voxels, field smoothed by 0.5 voxel).
  The map is Greedy's own composition of warp and affine (``-r warp affine -rc composed``):
  one displacement field on the fixed grid, ``y = x + u(x)``.

2D cases run ``Greedy2D`` with the same settings (NCC radius ``2x2``). Constructor options override
``affine_iterations``, ``iterations`` (``"100x50x10"`` or ``[100, 50, 10]``), ``metric`` (Greedy's
text, e.g. ``"NCC 4x4x4"``), ``smoothing`` (``"2.0vox 0.5vox"``) and ``dof``.

Conventions (see :mod:`alignkit.io.itk`; checked against Greedy's own reslicing in
``tests/test_peers_greedy.py``): Greedy takes SimpleITK images (placed in LPS by
:func:`~alignkit.evaluate.peers._common.sitk_image`); its matrices map fixed to moving points **in
RAS** (:func:`alignkit.io.itk.lps_matrix_from_ras`); its warps are ITK vector images in LPS units,
and ``-r warp affine`` sends a fixed point through the warp first: ``y = A (x + u(x))``.

Greedy's ``-seed 0`` means "stochastic", so the run's seed ``s`` is passed as ``-seed s+1`` (the
affine jitters its sample points and NCC adds noise; both are then repeatable). ``-wp 0`` keeps
the warp at full precision (Greedy rounds saved warps to 0.1 voxel by default).
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np

from alignkit.data.case import Case
from alignkit.evaluate.method import Method, Prediction
from alignkit.evaluate.peers._common import itk_layout, require, set_threads, sitk_image, world_points
from alignkit.io.itk import lps_matrix_from_ras

SETTINGS = ("greedy:affine", "greedy:deformable")

DEFAULTS: dict[str, Any] = {
    "affine_iterations": "100x50x10",
    "iterations": "100x50x10",
    "metric": None,  # NCC with a 2-voxel radius in every dimension of the case
    "smoothing": "2.0vox 0.5vox",
    "dof": 12,
}


def _schedule(value: Any) -> str:
    """``[100, 50, 10]`` or ``"100x50x10"`` -> Greedy's ``100x50x10``."""
    return value if isinstance(value, str) else "x".join(str(int(v)) for v in value)


class GreedySession:
    """One Greedy object holding a case's fixed and moving images under the names ``fixed`` and
    ``moving`` (Greedy keeps in-memory inputs and outputs between ``execute`` calls)."""

    def __init__(self, case: Case, settings: dict[str, Any], *, seed: int, threads: int | None) -> None:
        import picsl_greedy

        self.ndim = case.ndim
        self.greedy = picsl_greedy.Greedy3D() if case.ndim == 3 else picsl_greedy.Greedy2D()
        self.settings = settings
        self.metric = settings["metric"] or "NCC " + "x".join(["2"] * case.ndim)
        # -V 0: Greedy prints every iteration otherwise, into the evaluation's log
        self.flags = f"-d {case.ndim} -V 0 -seed {int(seed) + 1}"
        if threads is not None:
            self.flags += f" -threads {max(1, int(threads))}"
        self.fixed_layout = itk_layout(case.fixed.grid)
        self.images = {
            "fixed": sitk_image(case.fixed, self.fixed_layout),
            "moving": sitk_image(case.moving, itk_layout(case.moving.grid)),
        }

    def execute(self, command: str, **objects: Any) -> None:
        """Run one Greedy command line; Greedy's failures become one line naming the command."""
        log = io.StringIO()
        try:
            self.greedy.execute(f"{self.flags} {command}", out=log, err=log, **objects)
        except Exception as exc:  # pybind11 turns Greedy's C++ exceptions into RuntimeError
            lines = log.getvalue().strip().splitlines()
            detail = " ".join(str(exc).split()) or (lines[-1] if lines else type(exc).__name__)
            raise RuntimeError(f"greedy {command.split()[0]} failed: {detail}") from exc

    def affine(self) -> np.ndarray:
        """Run the affine stage; Greedy keeps its RAS matrix as ``affine``. Returns it in LPS."""
        st = self.settings
        self.execute(
            f"-a -dof {int(st['dof'])} -i fixed moving -ia-image-centers -m {self.metric} "
            f"-n {_schedule(st['affine_iterations'])} -o affine",
            affine=None,
            **self.images,
        )
        return lps_matrix_from_ras(np.asarray(self.greedy["affine"], dtype=np.float64))

    def deformable(self) -> None:
        """Run the deformable stage from the affine; Greedy keeps the warp as ``warp``."""
        st = self.settings
        self.execute(
            f"-i fixed moving -it affine -m {self.metric} -n {_schedule(st['iterations'])} "
            f"-s {st['smoothing']} -wp 0 -o warp",
            warp=None,
        )

    def composed_displacement(self) -> np.ndarray:
        """Warp then affine, composed by Greedy on the fixed grid -> ``(ndim, *fixed shape)`` LPS
        displacement (float64, alignkit array order)."""
        import SimpleITK as sitk

        self.execute("-rf fixed -r warp affine -rc composed", composed=None)
        field = sitk.GetArrayFromImage(self.greedy["composed"]).astype(np.float64)  # [k, j, i, ndim]
        return np.moveaxis(self.fixed_layout.from_sitk_order(field), -1, 0)


class GreedyMethod(Method):
    """PICSL Greedy affine, or affine then greedy deformable (see the module docstring)."""

    kinds: tuple[str, ...] = ("deformable", "affine", "homography", "flow")

    def __init__(self, name: str = "greedy:deformable", **options: Any) -> None:
        if name not in SETTINGS:
            raise ValueError(f"unknown Greedy setting {name!r}; choose from {', '.join(SETTINGS)}")
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"{name}: unknown options {sorted(unknown)}")
        super().__init__(name, **options)
        self.settings = {**DEFAULTS, **options}
        if name == "greedy:affine":
            self.kinds = ("deformable", "affine", "homography")
            self.description = "Greedy affine (12 dof, NCC 2x2x2, image-centre start, 100x50x10)"
        else:
            self.description = "Greedy affine, then deformable (NCC 2x2x2, -s 2.0vox 0.5vox, 100x50x10)"

    def check_available(self) -> None:
        require("picsl_greedy", "picsl-greedy")
        require("SimpleITK")

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        set_threads(threads)
        session = GreedySession(case, self.settings, seed=seed, threads=threads)
        started = time.perf_counter()
        matrix = session.affine()
        affine_seconds = time.perf_counter() - started
        extra: dict[str, Any] = {"metric": session.metric, "affine_seconds": affine_seconds}
        if self.name == "greedy:affine":
            return Prediction(matrix=matrix, seconds=affine_seconds, extra=extra)
        session.deformable()
        seconds = time.perf_counter() - started
        displacement = session.composed_displacement()
        return Prediction(world_map=world_points(case.fixed.grid) + displacement, seconds=seconds, extra=extra)
