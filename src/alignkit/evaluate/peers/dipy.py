"""dipy: ``imaffine`` (centre of mass -> translation -> rigid -> affine, Mattes MI) and SyN (``imwarp``).

* ``dipy:affine`` -- ``transform_centers_of_mass`` then ``AffineRegistration`` with
  ``MutualInformationMetric(nbins=32, sampling_proportion=None)`` through translation, rigid and
  affine, each with ``level_iters=[100, 50, 25]``, ``sigmas=[3, 1, 0]``, ``factors=[4, 2, 1]``
  (dipy's tutorial settings); the prediction is the matrix.
* ``dipy:syn`` -- the same affine, then ``SymmetricDiffeomorphicRegistration(CCMetric(ndim),
  level_iters=[10, 10, 5])`` with the affine as ``prealign`` (dipy's tutorial settings; the
  3D brain benchmark uses the same SyN iterations).

Constructor options override these: ``level_iters``, ``sigmas``, ``factors`` (affine pyramid),
``syn_level_iters``, ``cc_radius``.

Frames: dipy works in the world frame of the ``grid2world`` affines it is given. In 3D we give
it nibabel's RAS affine (:func:`alignkit.io.images.ras_affine_from_grid`), as one does with NIfTI
files, and turn its answers back into LPS; in 2D, where RAS has no meaning, the grid's own LPS
``world_from_voxel`` is used. Both frames are then shifted so that their origin is the centre of
the fixed image (and shifted back afterwards): dipy's rigid and affine transforms rotate and scale
about the world origin, which for a raster or an ``.npz`` volume is a corner of the image, and
with the origin there rotation and translation are so coupled that its optimizer stalls (measured:
a 6 degree rotation + 5 % scale of a 2D brain slice was left at 0.2 degree). Scanner NIfTI
headers usually put the origin near the centre already.

The SyN map is rebuilt as ``Y(X) = A (X + d(X))`` with ``A`` the prealign matrix and ``d`` the
forward field sampled at ``X`` (``benchmarks/brain3d_oasis.py`` checks this against dipy's own
warp of the moving image).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from alignkit.data.case import Case
from alignkit.evaluate.method import Method, Prediction
from alignkit.evaluate.peers._common import apply_homogeneous, grey_array, require, set_threads
from alignkit.spatial.grid import Grid

AFFINE_DEFAULTS: dict[str, Any] = {"level_iters": [100, 50, 25], "sigmas": [3.0, 1.0, 0.0], "factors": [4, 2, 1]}
SYN_LEVEL_ITERS = [10, 10, 5]
SETTINGS = ("dipy:syn", "dipy:affine")


def dipy_from_lps(fixed: Grid) -> np.ndarray:
    """Homogeneous matrix from alignkit's LPS world to the frame dipy is given: RAS in 3D (LPS kept
    in 2D), translated so that the centre of the ``fixed`` grid is the origin."""
    n = fixed.ndim
    flip = np.eye(n + 1)
    if n == 3:
        from alignkit.io.images import RAS_FROM_LPS

        flip = RAS_FROM_LPS.copy()
    shift = np.eye(n + 1)
    shift[:n, n] = -(flip[:n, :n] @ fixed.center_world().numpy())
    return shift @ flip


def dipy_affine(grid: Grid, frame: np.ndarray) -> np.ndarray:
    """The ``grid2world`` affine handed to dipy (``frame`` from :func:`dipy_from_lps`)."""
    return frame @ grid.world_from_voxel.numpy()


class DipyMethod(Method):
    """dipy affine or affine + SyN (see the module docstring)."""

    kinds: tuple[str, ...] = ("deformable", "affine", "homography", "flow")

    def __init__(self, name: str = "dipy:syn", **options: Any) -> None:
        if name not in SETTINGS:
            raise ValueError(f"unknown dipy setting {name!r}; choose from {', '.join(SETTINGS)}")
        super().__init__(name, **options)
        self.affine_settings = {k: list(options.get(k, v)) for k, v in AFFINE_DEFAULTS.items()}
        self.syn_level_iters = list(options.get("syn_level_iters", SYN_LEVEL_ITERS))
        self.cc_radius = int(options.get("cc_radius", 4))
        unknown = set(options) - set(AFFINE_DEFAULTS) - {"syn_level_iters", "cc_radius"}
        if unknown:
            raise ValueError(f"{name}: unknown options {sorted(unknown)}")
        if name == "dipy:affine":
            self.kinds = ("deformable", "affine", "homography")
            self.description = "dipy: centre of mass -> translation -> rigid -> affine (MI)"
        else:
            self.description = f"dipy: affine (MI) then SyN (CCMetric, level_iters={self.syn_level_iters})"

    def check_available(self) -> None:
        require("dipy")

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        set_threads(threads)
        from dipy.align import imaffine, transforms

        # the MI metric samples every voxel (sampling_proportion=None), so the run is deterministic;
        # numpy's global generator, which dipy draws from when it samples, is seeded all the same
        np.random.seed(seed)
        ndim = case.ndim
        static, moving = grey_array(case.fixed), grey_array(case.moving)
        frame = dipy_from_lps(case.fixed.grid)
        static_aff, moving_aff = dipy_affine(case.fixed.grid, frame), dipy_affine(case.moving.grid, frame)
        lps_from_frame = np.linalg.inv(frame)
        stage_seconds: dict[str, float] = {}
        started = time.perf_counter()
        com = imaffine.transform_centers_of_mass(static, static_aff, moving, moving_aff)
        metric = imaffine.MutualInformationMetric(nbins=32, sampling_proportion=None)
        affreg = imaffine.AffineRegistration(metric=metric, verbosity=0, **self.affine_settings)
        stages = (
            [transforms.TranslationTransform2D(), transforms.RigidTransform2D(), transforms.AffineTransform2D()]
            if ndim == 2
            else [transforms.TranslationTransform3D(), transforms.RigidTransform3D(), transforms.AffineTransform3D()]
        )
        current = com.affine
        for tf in stages:
            amap = affreg.optimize(
                static, moving, tf, None,
                static_grid2world=static_aff, moving_grid2world=moving_aff, starting_affine=current,
            )
            current = amap.affine
        stage_seconds["affine"] = time.perf_counter() - started
        extra: dict[str, Any] = {"affine_settings": self.affine_settings}
        if self.name == "dipy:affine":
            seconds = time.perf_counter() - started
            # dipy's AffineMap.affine maps static (fixed) world points to moving world points
            matrix = lps_from_frame @ np.asarray(current, dtype=np.float64) @ frame
            return Prediction(matrix=matrix, seconds=seconds, extra=extra)

        from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
        from dipy.align.metrics import CCMetric

        t = time.perf_counter()
        cc_metric = CCMetric(ndim, radius=self.cc_radius)
        sdr = SymmetricDiffeomorphicRegistration(cc_metric, level_iters=self.syn_level_iters)
        mapping = sdr.optimize(
            static, moving, static_grid2world=static_aff, moving_grid2world=moving_aff, prealign=current
        )
        stage_seconds["syn"] = time.perf_counter() - t
        seconds = time.perf_counter() - started
        extra.update(syn_level_iters=self.syn_level_iters, stage_seconds=stage_seconds)
        world_in_frame = _syn_world_map(mapping, np.asarray(current), static.shape, static_aff)
        world = apply_homogeneous(lps_from_frame, world_in_frame)
        return Prediction(world_map=world, seconds=seconds, extra=extra)


def _syn_world_map(mapping: Any, prealign: np.ndarray, shape: tuple[int, ...], static_aff: np.ndarray) -> np.ndarray:
    """``Y(X) = A (X + d(X))`` on the static grid, in dipy's world frame, ``(ndim, *shape)``."""
    from scipy import ndimage

    n = len(shape)
    idx = np.indices(shape, dtype=np.float64).reshape(n, -1)
    world = static_aff[:n, :n] @ idx + static_aff[:n, n:]
    # the forward field lives on the displacement grid (the static grid unless dipy was told otherwise)
    dinv = np.asarray(mapping.disp_world2grid if mapping.disp_world2grid is not None else np.linalg.inv(static_aff))
    grid_pts = dinv[:n, :n] @ world + dinv[:n, n:]
    field = np.asarray(mapping.get_forward_field(), dtype=np.float64)
    y = np.empty_like(world)
    for a in range(n):
        y[a] = world[a] + ndimage.map_coordinates(field[..., a], grid_pts, order=1, mode="nearest")
    y = prealign[:n, :n] @ y + prealign[:n, n:]
    return y.reshape(n, *shape)
