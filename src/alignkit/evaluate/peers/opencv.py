"""OpenCV (``opencv-python-headless``): dense optical flow, SIFT + RANSAC and ECC, on 2D images.

All four work on 8-bit grey pixels: colour images are averaged over channels and both images are
scaled to ``uint8`` with one common linear map (brightness constancy survives). Answers come back in
``(x = column, y = row)`` pixels and are turned into world coordinates with each grid's
``world_from_voxel`` (:mod:`alignkit.evaluate.peers._common`), so any 2D grid works, a raster one
(world = pixels) most naturally.

* ``opencv:farneback`` -- ``calcOpticalFlowFarneback(fixed, moving, pyr_scale=0.5, levels=5,
  winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)``; ``opencv:dis`` --
  ``DISOpticalFlow_create(DISOPTICAL_FLOW_PRESET_MEDIUM).calc(fixed, moving)``. OpenCV's flow from
  ``prev`` to ``next`` satisfies ``prev(p) ≈ next(p + flow(p))``, alignkit's flow convention with
  prev = fixed; the map is ``moving_world_from_voxel(p + flow(p))``. Both images must have one size.
* ``opencv:tvl1`` -- ``cv2.optflow.DualTVL1OpticalFlow_create()`` with its defaults (TV-L1 of Zach,
  Pock and Bischof as improved by Wedel et al.: 5 scales, 5 warps, tau 0.25, lambda 0.15, theta 0.3);
  it lives in the contrib modules, so it needs ``opencv-contrib-python-headless`` (which replaces
  ``opencv-python-headless``; both install the ``cv2`` module).
* ``opencv:sift-ransac`` -- ``SIFT_create(nfeatures=5000)``, brute-force L2 2-NN matching with
  Lowe's ratio test (0.75), ``findHomography(fixed_pts, moving_pts, RANSAC, 3.0, maxIters=5000,
  confidence=0.999)`` (``estimateAffine2D`` for ``affine`` cases); the matrix maps fixed pixels
  to moving pixels. OpenCV's RANSAC draws from ``cv2.setRNGSeed(seed)``. ``opencv:sift-magsac``:
  the same matches with OpenCV's USAC MAGSAC++ (``cv2.USAC_MAGSAC``, threshold 3 px, 10 000
  iterations, confidence 0.999), the estimator OpenCV's USAC tutorial recommends.
* ``opencv:ecc`` -- ``findTransformECC(template=fixed, input=moving, MOTION_HOMOGRAPHY``
  (``MOTION_AFFINE`` for ``affine`` cases)``, criteria (COUNT | EPS, 100, 1e-6), gaussFiltSize=5)``
  over a Gaussian pyramid (``pyrDown`` until the short side is below 64 px, at most 4 levels),
  coarse to fine. ECC's warp maps *template* coordinates to *input* coordinates (one then calls
  ``warpPerspective(input, W, WARP_INVERSE_MAP)``), i.e. fixed pixel -> moving pixel, our direction.
  Between levels a homography is conjugated by ``diag(2, 2, 1)`` (``pyrDown`` keeps pixel ``2i`` of
  the finer level at pixel ``i``). A level where ECC does not converge keeps the estimate so far.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from alignkit.data.case import Case
from alignkit.evaluate.method import Method, Prediction
from alignkit.evaluate.peers._common import (
    grey_array,
    joint_uint8,
    require,
    same_shape_2d,
    set_threads,
    world_map_from_pixel_flow,
    world_matrix_from_pixel_matrix,
)

FARNEBACK: dict[str, Any] = {
    "pyr_scale": 0.5, "levels": 5, "winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2, "flags": 0,
}


def _grey_pair(case: Case) -> tuple[np.ndarray, np.ndarray]:
    return joint_uint8(grey_array(case.fixed), grey_array(case.moving))


def _setup(threads: int | None, seed: int) -> Any:
    set_threads(threads, itk_env=False)
    import cv2

    if threads is not None:
        cv2.setNumThreads(max(1, int(threads)))
    cv2.setRNGSeed(int(seed))
    return cv2


class OpenCVFlow(Method):
    """Dense optical flow: ``opencv:farneback`` or ``opencv:dis`` (see the module docstring)."""

    kinds: tuple[str, ...] = ("flow", "stereo", "deformable")
    ndims = (2,)

    def __init__(self, name: str = "opencv:farneback", **options: Any) -> None:
        if name not in ("opencv:farneback", "opencv:dis", "opencv:tvl1"):
            raise ValueError(f"unknown OpenCV flow setting {name!r}")
        super().__init__(name, **options)
        if name == "opencv:farneback":
            unknown = set(options) - set(FARNEBACK)
            self.settings: dict[str, Any] = {**FARNEBACK, **options}
            self.description = "cv2.calcOpticalFlowFarneback (pyr_scale 0.5, 5 levels, window 15)"
        elif name == "opencv:tvl1":
            unknown = set(options)
            self.settings = {}
            self.description = "cv2.optflow.DualTVL1OpticalFlow (OpenCV contrib defaults)"
        else:
            unknown = set(options) - {"preset"}
            self.settings = {"preset": options.get("preset", "medium")}
            self.description = f"cv2.DISOpticalFlow ({self.settings['preset']} preset)"
        if unknown:
            raise ValueError(f"{name}: unknown options {sorted(unknown)}")

    def check_available(self) -> None:
        require("cv2", "opencv-python-headless")
        import cv2

        if self.name == "opencv:tvl1" and not hasattr(getattr(cv2, "optflow", None), "DualTVL1OpticalFlow_create"):
            from alignkit.evaluate.method import MethodUnavailable

            raise MethodUnavailable("TV-L1 is in OpenCV's contrib modules: pip install opencv-contrib-python-headless")

    def applicable(self, case: Case) -> str | None:
        return super().applicable(case) or same_shape_2d(case.fixed, case.moving, self.name)

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        cv2 = _setup(threads, seed)
        fixed, moving = _grey_pair(case)
        started = time.perf_counter()
        if self.name == "opencv:farneback":
            flow = cv2.calcOpticalFlowFarneback(fixed, moving, None, **self.settings)
        elif self.name == "opencv:tvl1":
            flow = cv2.optflow.DualTVL1OpticalFlow_create().calc(fixed, moving, None)
        else:
            presets = {
                "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
                "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
            }
            dis = cv2.DISOpticalFlow_create(presets[self.settings["preset"]])
            flow = dis.calc(fixed, moving, None)
        seconds = time.perf_counter() - started
        world = world_map_from_pixel_flow(np.asarray(flow, dtype=np.float64), case.fixed.grid, case.moving.grid)
        return Prediction(world_map=world, seconds=seconds, extra=dict(self.settings))


class OpenCVSiftRansac(Method):
    """SIFT features, ratio test and RANSAC (``opencv:sift-ransac``) or MAGSAC++ (``opencv:sift-magsac``)
    homography (or affine) with OpenCV."""

    name = "opencv:sift-ransac"
    description = "cv2.SIFT + ratio test 0.75 + findHomography(RANSAC, 3 px)"
    kinds: tuple[str, ...] = ("homography", "affine")
    ndims = (2,)

    def __init__(self, name: str = "opencv:sift-ransac", **options: Any) -> None:
        if name not in ("opencv:sift-ransac", "opencv:sift-magsac"):
            raise ValueError(f"unknown OpenCV feature setting {name!r}")
        super().__init__(name, **options)
        self.magsac = name == "opencv:sift-magsac"
        if self.magsac:
            self.description = "cv2.SIFT + ratio test 0.75 + findHomography(USAC_MAGSAC, 3 px)"
        rest = dict(options)
        self.ratio = float(rest.pop("ratio", 0.75))
        self.threshold = float(rest.pop("ransac_threshold", 3.0))
        self.nfeatures = int(rest.pop("nfeatures", 5000))
        if rest:
            raise ValueError(f"{name}: unknown options {sorted(rest)}")

    def check_available(self) -> None:
        require("cv2", "opencv-python-headless")
        import cv2

        if not hasattr(cv2, "SIFT_create"):
            from alignkit.evaluate.method import MethodUnavailable

            raise MethodUnavailable("this OpenCV build has no SIFT (OpenCV >= 4.4 has it in the main module)")

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        cv2 = _setup(threads, seed)
        fixed, moving = _grey_pair(case)
        started = time.perf_counter()
        sift = cv2.SIFT_create(nfeatures=self.nfeatures)
        kf, df = sift.detectAndCompute(fixed, None)
        km, dm = sift.detectAndCompute(moving, None)
        good: list[Any] = []
        if df is not None and dm is not None and len(kf) >= 2 and len(km) >= 2:
            matches = cv2.BFMatcher(cv2.NORM_L2).knnMatch(df, dm, k=2)
            good = [p[0] for p in matches if len(p) == 2 and p[0].distance < self.ratio * p[1].distance]
        extra: dict[str, Any] = {"keypoints_fixed": len(kf), "keypoints_moving": len(km), "matches": len(good)}
        pixel = np.eye(3)
        if len(good) >= 4:
            src = np.array([kf[m.queryIdx].pt for m in good], dtype=np.float32).reshape(-1, 1, 2)  # (x, y)
            dst = np.array([km[m.trainIdx].pt for m in good], dtype=np.float32).reshape(-1, 1, 2)
            robust, iterations = (cv2.USAC_MAGSAC, 10_000) if self.magsac else (cv2.RANSAC, 5000)
            if case.kind == "affine":
                model, inliers = cv2.estimateAffine2D(
                    src, dst, method=robust, ransacReprojThreshold=self.threshold, maxIters=iterations, confidence=0.999
                )
                if model is not None:
                    pixel = np.vstack([model, [0.0, 0.0, 1.0]])
            else:
                model, inliers = cv2.findHomography(
                    src, dst, robust, self.threshold, maxIters=iterations, confidence=0.999
                )
                if model is not None:
                    pixel = model
            extra["inliers"] = int(inliers.sum()) if model is not None and inliers is not None else 0
        else:
            extra["inliers"] = 0
        # a failed estimate is reported as the identity (scored as such), and flagged
        extra["failed"] = bool(extra["inliers"] == 0)
        seconds = time.perf_counter() - started
        matrix = world_matrix_from_pixel_matrix(pixel, case.fixed.grid, case.moving.grid)
        return Prediction(matrix=matrix, seconds=seconds, extra=extra)


class OpenCVECC(Method):
    """Enhanced correlation coefficient maximisation over a pyramid (see the module docstring)."""

    name = "opencv:ecc"
    description = "cv2.findTransformECC (homography; affine for affine cases), Gaussian pyramid"
    kinds: tuple[str, ...] = ("homography", "affine")
    ndims = (2,)

    def __init__(self, name: str = "opencv:ecc", **options: Any) -> None:
        super().__init__(name, **options)
        rest = dict(options)
        self.iterations = int(rest.pop("iterations", 100))
        self.eps = float(rest.pop("eps", 1e-6))
        self.min_size = int(rest.pop("min_size", 64))
        self.max_levels = int(rest.pop("max_levels", 4))
        if rest:
            raise ValueError(f"{name}: unknown options {sorted(rest)}")

    def check_available(self) -> None:
        require("cv2", "opencv-python-headless")

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        cv2 = _setup(threads, seed)
        fixed, moving = _grey_pair(case)
        affine = case.kind == "affine"
        motion = cv2.MOTION_AFFINE if affine else cv2.MOTION_HOMOGRAPHY
        criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, self.iterations, self.eps)
        started = time.perf_counter()
        fixed_levels, moving_levels = [fixed.astype(np.float32)], [moving.astype(np.float32)]
        while (
            len(fixed_levels) < self.max_levels
            and min(fixed_levels[-1].shape + moving_levels[-1].shape) >= 2 * self.min_size
        ):
            fixed_levels.append(cv2.pyrDown(fixed_levels[-1]))
            moving_levels.append(cv2.pyrDown(moving_levels[-1]))
        # the estimate, kept as a 3x3 fixed-pixel -> moving-pixel matrix of the current level
        warp = np.eye(3, dtype=np.float64)
        half, double = np.diag([0.5, 0.5, 1.0]), np.diag([2.0, 2.0, 1.0])
        converged: list[bool] = []
        for level in range(len(fixed_levels) - 1, -1, -1):
            guess = (warp[:2] if affine else warp).astype(np.float32)
            try:
                _, found = cv2.findTransformECC(
                    fixed_levels[level], moving_levels[level], guess, motion, criteria, None, 5
                )
                warp = np.vstack([found, [0.0, 0.0, 1.0]]) if affine else np.asarray(found, dtype=np.float64)
                converged.append(True)
            except cv2.error:
                # ECC raises when it diverges or the correlation is degenerate: keep the estimate
                converged.append(False)
            if level > 0:
                warp = double @ warp @ half
        seconds = time.perf_counter() - started
        matrix = world_matrix_from_pixel_matrix(warp / warp[2, 2], case.fixed.grid, case.moving.grid)
        extra = {"levels": len(fixed_levels), "levels_converged": int(sum(converged))}
        return Prediction(matrix=matrix, seconds=seconds, extra=extra)
