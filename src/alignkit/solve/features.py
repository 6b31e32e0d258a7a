"""Feature-based initialisation: keypoints, descriptor matching and a robust fit of a 2D homography or
affine, used to start the intensity-based solver on wide-baseline photograph pairs (homogr-style
zoom, rotation and perspective) that no pyramid of intensity optimisation can reach from the centre.

OpenCV's SIFT (Lowe's ratio test) and MAGSAC++/RANSAC estimators do the work -- the well-kept
implementations made for this job; alignkit only converts between its world frame and OpenCV's
pixel frame. OpenCV is the optional ``features`` extra; without it :func:`feature_matrix` raises
:class:`~alignkit.errors.ConfigError` and the engine falls back to the grids' centres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from alignkit.errors import ConfigError
from alignkit.spatial.frames import apply_matrix, world_from_pixel, world_matrix_from_pixel_matrix
from alignkit.spatial.grid import Grid
from alignkit.spatial.points import points_to_tensor, tensor_to_points

#: a fit is trusted only with at least this many inliers and this fraction of the ratio-test matches
MIN_INLIERS = 12
MIN_INLIER_FRACTION = 0.15


def _import_cv2():  # type: ignore[no-untyped-def]
    try:
        import cv2
    except ImportError:
        raise ConfigError("init='features' needs OpenCV: pip install 'alignkit[features]'") from None
    return cv2


def _grey_uint8(image: Tensor) -> np.ndarray:
    """``(B, C, H, W)`` float tensor → ``(H, W)`` uint8 grey, contrast stretched to 1-99 percentiles."""
    grey = image[0].float().mean(0).cpu().numpy()
    lo, hi = np.percentile(grey, [1.0, 99.0])
    scale = 255.0 / (hi - lo) if hi > lo else 1.0
    return np.clip((grey - lo) * scale, 0, 255).astype(np.uint8)


@dataclass
class FeatureFit:
    """A robust fit to keypoint matches: the moving-world-from-fixed-world ``matrix`` (3x3 float64),
    fit statistics, and the inlier correspondences as ``(N, 2)`` world points of each image."""

    matrix: Tensor
    stats: dict[str, float]
    fixed_points: Tensor
    moving_points: Tensor

    def residuals(self, transform_points) -> Tensor:  # type: ignore[no-untyped-def]
        """Distances between the moving inliers and the fixed inliers carried by ``transform_points``
        (a callable on ``(1, 2, N)`` world points), world units."""
        mapped = transform_points(self.fixed_points.T.unsqueeze(0).float())[0].T.double()
        return torch.linalg.norm(mapped.cpu() - self.moving_points, dim=1)


def feature_matrix(
    fixed: Tensor,
    fixed_grid: Grid,
    moving: Tensor,
    moving_grid: Grid,
    **options: object,
) -> tuple[Tensor, dict[str, float]]:
    """:func:`feature_fit`'s matrix and statistics."""
    fit = feature_fit(fixed, fixed_grid, moving, moving_grid, **options)  # type: ignore[arg-type]
    return fit.matrix, fit.stats


def feature_fit(
    fixed: Tensor,
    fixed_grid: Grid,
    moving: Tensor,
    moving_grid: Grid,
    *,
    model: str = "homography",
    max_keypoints: int = 8000,
    ratio: float = 0.8,
    threshold_px: float = 3.0,
    seed: int = 0,
) -> FeatureFit:
    """Moving-world-from-fixed-world matrix ``(3, 3)`` float64 fitted to SIFT matches, with its inliers.

    Raises :class:`ConfigError` when OpenCV is missing and :class:`ValueError` when the fit is not
    trustworthy (too few matches or inliers): the caller then starts from the centres instead.
    """
    if fixed_grid.ndim != 2:
        raise ConfigError("feature initialisation is 2D only")
    cv2 = _import_cv2()
    cv2.setRNGSeed(int(seed))
    sift = cv2.SIFT_create(nfeatures=max_keypoints)
    kp_f, desc_f = sift.detectAndCompute(_grey_uint8(fixed), None)
    kp_m, desc_m = sift.detectAndCompute(_grey_uint8(moving), None)
    if desc_f is None or desc_m is None or len(kp_f) < 4 or len(kp_m) < 4:
        raise ValueError("too few keypoints")
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    pairs = matcher.knnMatch(desc_f, desc_m, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < ratio * p[1].distance]
    if len(good) < MIN_INLIERS:
        raise ValueError(f"{len(good)} matches pass the ratio test")
    pts_f = np.float64([kp_f[m.queryIdx].pt for m in good])
    pts_m = np.float64([kp_m[m.trainIdx].pt for m in good])
    method = getattr(cv2, "USAC_MAGSAC", cv2.RANSAC)
    if model == "homography":
        pixel, mask = cv2.findHomography(pts_f, pts_m, method, threshold_px, maxIters=10000, confidence=0.999)
    elif model == "affine":
        affine, mask = cv2.estimateAffine2D(pts_f, pts_m, method=method, ransacReprojThreshold=threshold_px)
        pixel = None if affine is None else np.vstack([affine, [0.0, 0.0, 1.0]])
    else:
        raise ConfigError(f"feature model must be 'homography' or 'affine', got {model!r}")
    if pixel is None or mask is None:
        raise ValueError("no model fits the matches")
    inliers = int(mask.sum())
    stats = {"matches": float(len(good)), "inliers": float(inliers), "inlier_fraction": inliers / len(good)}
    if inliers < MIN_INLIERS or inliers < MIN_INLIER_FRACTION * len(good):
        raise ValueError(f"{inliers} inliers of {len(good)} matches")
    keep = mask.ravel().astype(bool)

    def to_world(grid: Grid, pts: np.ndarray) -> Tensor:
        """OpenCV keypoints ``(N, 2)`` (x = column, y = row) -> world points ``(N, 2)`` float64."""
        return tensor_to_points(apply_matrix(world_from_pixel(grid), points_to_tensor(torch.as_tensor(pts))))

    return FeatureFit(
        world_matrix_from_pixel_matrix(torch.as_tensor(pixel), fixed_grid, moving_grid),
        stats,
        to_world(fixed_grid, pts_f[keep]),
        to_world(moving_grid, pts_m[keep]),
    )
