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

#: a fit is trusted only with at least MIN_INLIERS_PER_SAMPLE times its minimal sample of inliers (12
#: for a homography, as OpenCV's tutorial asks 10, 9 for an affine map, 6 for a similarity) and this
#: fraction of the ratio-test matches. A similarity on 6 of 34 matches was 2.5 px from the truth on
#: vis-nir field/0006, whose 6-inlier affine fit was 6.3 px off and the centre start hundreds
MIN_INLIERS_PER_SAMPLE = 3
MINIMAL_SAMPLE = {"homography": 4, "affine": 3, "similarity": 2}
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

    def median_residual_px(self, transform_points, spacing: float = 1.0) -> float:  # type: ignore[no-untyped-def]
        """The inliers' median :meth:`residuals` in pixels of size ``spacing``."""
        return float(self.residuals(transform_points).median()) / float(spacing)

    def chi2_rise(self, before, after, spacing: float = 1.0) -> float:  # type: ignore[no-untyped-def]
        """How much worse the map ``after`` explains the inliers than ``before`` (callables on ``(1, 2, N)``
        world points): the rise of their summed squared residuals in units of the fit's noise variance
        (``stats["noise_px"]`` pixels of size ``spacing``). Under the hypothesis that ``after`` is the
        truth and the keypoints are off by independent noise of that scale, the least-squares optimum
        of the fit lies below it by a chi-square with as many degrees of freedom as the fit has
        parameters (at most 8), so a rise past that distribution's tail rules ``after`` out."""
        noise = float(self.stats.get("noise_px", 1.0)) * float(spacing)
        return float((self.residuals(after).square().sum() - self.residuals(before).square().sum()) / noise**2)


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


#: keypoints asked of SIFT per image: at least ``max_keypoints``, and one per this many pixels on large
#: images -- a fixed cap starves a 1.5 Mpx photograph (the strongest responses cluster on a few
#: textured patches and leave the rest of the frame unconstrained)
PIXELS_PER_KEYPOINT = 150

#: brute-force matching up to this many descriptor pairs (4k x 4k), FLANN above: measured on one busy
#: core with random 128-d descriptors, 4k x 4k took 0.61 s brute force vs 0.31 s FLANN, 8k x 8k 2.33 s
#: vs 0.82 s
FLANN_ABOVE = 16_000_000

#: a homography whose local scale at a corner of the fixed image leaves [1/MAX_SCALE_CHANGE,
#: MAX_SCALE_CHANGE], or whose local Jacobian there is more anisotropic than MAX_ANISOTROPY, is treated
#: as degenerate. Loose on purpose: the ground-truth homographies of ``homography/homogr`` reach a
#: local scale of 35 (BostonLib, zoom and perspective) and an anisotropy of 6 (LePoint3) at a corner;
#: a fit to clustered or collinear inliers goes orders of magnitude further
MAX_SCALE_CHANGE = 60.0
MAX_ANISOTROPY = 20.0


def _well_conditioned(pixel: np.ndarray, shape: tuple[int, int]) -> str | None:
    """None when the pixel-frame matrix ``pixel`` (3x3) maps the fixed image plausibly, else why not.

    The checks follow what OpenCV's samples and the MAGSAC authors advise before trusting a fit: the
    image corners stay in front of the camera (positive projective denominator) and keep their
    orientation (a convex quadrilateral, no reflection), and the local scale and anisotropy at the
    corners stay in bounds -- a fit to a few collinear or clustered inliers passes the residual test
    but sends the far side of the image to infinity."""
    if not np.all(np.isfinite(pixel)) or abs(pixel[2, 2]) < 1e-12:
        return "the matrix is not finite"
    h = pixel / pixel[2, 2]
    rows, cols = shape
    corners = np.array([[0, 0], [cols - 1, 0], [cols - 1, rows - 1], [0, rows - 1]], dtype=np.float64)
    denominators = corners @ h[2, :2] + h[2, 2]
    if np.any(denominators <= 1e-6):
        return "the image crosses the horizon of the fitted homography"
    mapped = (corners @ h[:2, :2].T + h[:2, 2]) / denominators[:, None]
    edges = np.roll(mapped, -1, axis=0) - mapped
    turns = edges[:, 0] * np.roll(edges, -1, axis=0)[:, 1] - edges[:, 1] * np.roll(edges, -1, axis=0)[:, 0]
    if not (np.all(turns > 0) or np.all(turns < 0)):
        return "the image corners map to a non-convex quadrilateral"
    for (x, y), w in zip(corners, denominators):
        # Jacobian of the projective map at the corner: (A - m h3^T) / w, with m the mapped point
        m = (h[:2, :2] @ np.array([x, y]) + h[:2, 2]) / w
        jacobian = (h[:2, :2] - np.outer(m, h[2, :2])) / w
        singular = np.linalg.svd(jacobian, compute_uv=False)
        if np.linalg.det(jacobian) <= 0:
            return "the fit mirrors the image"
        if singular[0] > MAX_SCALE_CHANGE or singular[1] < 1.0 / MAX_SCALE_CHANGE:
            return f"the local scale reaches {singular[0]:.3g}/{singular[1]:.3g}"
        if singular[0] > MAX_ANISOTROPY * singular[1]:
            return f"the local anisotropy reaches {singular[0] / singular[1]:.3g}"
    return None


#: parameters of each model, for the model selection (:func:`_gric`)
MODEL_PARAMETERS = {"homography": 8, "affine": 6, "similarity": 4}
MODELS = ("homography", "affine", "similarity")

#: least-squares refits on the inliers after the robust fit (the "local optimisation" of LO-RANSAC,
#: Chum et al. 2003): the minimal-sample model of RANSAC is only as precise as its 3-4 points
LOCAL_OPTIMISATION_ROUNDS = 3

#: keypoint localisation noise below this (pixels, per coordinate) is not credible for SIFT; it floors
#: the noise estimate of the model selection so that a perfect synthetic fit does not make every
#: sub-pixel residual look like an outlier
MIN_NOISE_PX = 0.2


def _robust_fit(cv2, model: str, pts_f: np.ndarray, pts_m: np.ndarray, threshold_px: float) -> np.ndarray | None:  # type: ignore[no-untyped-def]
    """3x3 pixel matrix of one model fitted robustly (USAC MAGSAC++ for homographies, RANSAC for the
    affine models), or None. MAGSAC++ marginalises over the noise scale up to ``threshold``; 10k
    iterations at 0.999 confidence as in OpenCV's USAC evaluation (its defaults of 0.99 and 5000 are
    for video rates). RANSAC for the affine models: on the vis-nir pairs MAGSAC++'s affine fit landed
    further from the truth than RANSAC's on few inliers (indoor/0002: 2.8 vs 0.3 px corner error on the
    same 89 inliers), and ``estimateAffinePartial2D`` takes RANSAC or LMEDS only."""
    if len(pts_f) < MINIMAL_SAMPLE[model]:
        return None
    if model == "homography":
        method = getattr(cv2, "USAC_MAGSAC", cv2.RANSAC)
        pixel, _ = cv2.findHomography(pts_f, pts_m, method, threshold_px, maxIters=10000, confidence=0.999)
        return pixel
    estimate = cv2.estimateAffine2D if model == "affine" else cv2.estimateAffinePartial2D
    affine, _ = estimate(pts_f, pts_m, method=cv2.RANSAC, ransacReprojThreshold=threshold_px, maxIters=10000,
                         confidence=0.999)
    return None if affine is None else np.vstack([affine, [0.0, 0.0, 1.0]])


def _least_squares(cv2, model: str, pts_f: np.ndarray, pts_m: np.ndarray) -> np.ndarray | None:  # type: ignore[no-untyped-def]
    """3x3 pixel matrix of ``model`` fitted to all the given correspondences by least squares."""
    if model == "homography":
        pixel, _ = cv2.findHomography(pts_f, pts_m, 0)  # DLT then Levenberg-Marquardt on the reprojection error
        return pixel
    n = len(pts_f)
    if model == "affine":
        solution, *_ = np.linalg.lstsq(np.c_[pts_f, np.ones(n)], pts_m, rcond=None)
        return np.vstack([solution.T, [0.0, 0.0, 1.0]])
    # similarity x' = a x - b y + tx, y' = b x + a y + ty: linear in (a, b, tx, ty)
    design = np.zeros((2 * n, 4))
    design[0::2] = np.c_[pts_f[:, 0], -pts_f[:, 1], np.ones(n), np.zeros(n)]
    design[1::2] = np.c_[pts_f[:, 1], pts_f[:, 0], np.zeros(n), np.ones(n)]
    (a, b, tx, ty), *_ = np.linalg.lstsq(design, pts_m.reshape(-1), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty], [0.0, 0.0, 1.0]])


def _residuals(pixel: np.ndarray, pts_f: np.ndarray, pts_m: np.ndarray) -> np.ndarray:
    """Reprojection errors (pixels) of every correspondence under the 3x3 ``pixel`` matrix."""
    homogeneous = np.c_[pts_f, np.ones(len(pts_f))] @ pixel.T
    with np.errstate(divide="ignore", invalid="ignore"):
        mapped = homogeneous[:, :2] / homogeneous[:, 2:]
    residuals = np.linalg.norm(mapped - pts_m, axis=1)
    return np.where(np.isfinite(residuals), residuals, np.inf)


def _fit_model(cv2, model: str, pts_f: np.ndarray, pts_m: np.ndarray, threshold_px: float) -> np.ndarray | None:  # type: ignore[no-untyped-def]
    """The robust fit of ``model`` polished by :data:`LOCAL_OPTIMISATION_ROUNDS` least-squares refits
    on the correspondences within ``threshold_px``; None when no model fits."""
    pixel = _robust_fit(cv2, model, pts_f, pts_m, threshold_px)
    for _ in range(LOCAL_OPTIMISATION_ROUNDS if pixel is not None else 0):
        inliers = _residuals(pixel, pts_f, pts_m) < threshold_px
        if inliers.sum() < MODEL_PARAMETERS[model]:
            break
        refit = _least_squares(cv2, model, pts_f[inliers], pts_m[inliers])
        if refit is None or not np.all(np.isfinite(refit)):
            break
        pixel = refit
    return pixel


def _gric(residuals: np.ndarray, noise_px: float, parameters: int) -> float:
    """Torr's Geometric Robust Information Criterion (Torr, "An assessment of information criteria for
    motion model selection", CVPR 1997) of a 2D-to-2D model: the robust residual term, each point's
    squared error in units of the noise capped at ``lambda3 (r - d)`` (r = 4 data dimensions, d = 2 for
    every model here, lambda3 = 2), plus ``log(r n)`` per parameter. Lower is better; the terms shared
    by every model (``lambda1 d n``) are left out."""
    data_dimensions, manifold_dimensions, cap = 4, 2, 2.0
    squared = (residuals / noise_px) ** 2
    robust = np.minimum(squared, cap * (data_dimensions - manifold_dimensions)).sum()
    return float(robust + np.log(data_dimensions * len(residuals)) * parameters)


def _one_to_one(matches: list) -> list:  # type: ignore[type-arg]
    """Keep, for each moving keypoint, only its best match: SIFT's ratio test is one-sided, and a
    repeated or blank-textured moving keypoint can be the nearest neighbour of dozens of fixed ones.
    Such a hub once supported a degenerate fit of 25 "inliers" that all land on one moving point
    (vis-nir mountain/0012, and field/0002 with 14)."""
    best: dict[int, object] = {}
    for match in matches:
        kept = best.get(match.trainIdx)
        if kept is None or match.distance < kept.distance:  # type: ignore[attr-defined]
            best[match.trainIdx] = match
    return sorted(best.values(), key=lambda m: m.queryIdx)  # type: ignore[attr-defined]


#: candidate models for each requested model, most general first
FALLBACKS = {"homography": ("homography", "affine", "similarity"), "affine": ("affine", "similarity")}


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

    OpenCV's recommended pipeline: SIFT (scale and rotation invariant, the most repeatable of OpenCV's
    detectors across viewpoint and illumination) with a keypoint budget that grows with the image
    (:data:`PIXELS_PER_KEYPOINT`), 2-NN matching with Lowe's ratio test (``ratio``; Lowe's 0.8) and
    one match per moving keypoint (:func:`_one_to_one`). Every model of :data:`FALLBACKS` up to
    ``model`` is then fitted robustly and polished on its inliers (:func:`_fit_model`); a fit with too
    few inliers (:data:`MIN_INLIERS_PER_SAMPLE`, :data:`MIN_INLIER_FRACTION`) or that is not well conditioned
    (:func:`_well_conditioned`) is dropped, and among the rest Torr's GRIC (:func:`_gric`) picks the
    simplest model the matches support: the extra parameters of a homography or an affine map fit
    keypoint noise and extrapolate it to the image corners when the truth is simpler (measured on the
    80 vis-nir pairs, whose truth is a similarity: corner error within 3 px on 0.94 of them against 0.90
    with the affine fit alone; on the perspective homogr pairs GRIC keeps the homography).

    ``stats["model"]`` says which model was kept (0 homography, 1 affine, 2 similarity),
    ``stats["fallbacks"]`` how many of the more general candidates were dropped as weak or degenerate
    and ``stats["simpler_preferred"]`` whether GRIC preferred it over a more general fit that survived.

    Raises :class:`ConfigError` when OpenCV is missing and :class:`ValueError` when no fit is
    trustworthy (too few matches or inliers, or degenerate): the caller then starts from the centres.
    """
    if fixed_grid.ndim != 2:
        raise ConfigError("feature initialisation is 2D only")
    if model not in FALLBACKS:
        raise ConfigError(f"feature model must be 'homography' or 'affine', got {model!r}")
    cv2 = _import_cv2()
    cv2.setRNGSeed(int(seed))
    grey_f, grey_m = _grey_uint8(fixed), _grey_uint8(moving)
    budget = max(max_keypoints, max(grey_f.size, grey_m.size) // PIXELS_PER_KEYPOINT)
    sift = cv2.SIFT_create(nfeatures=budget)
    kp_f, desc_f = sift.detectAndCompute(grey_f, None)
    kp_m, desc_m = sift.detectAndCompute(grey_m, None)
    if desc_f is None or desc_m is None or len(kp_f) < 4 or len(kp_m) < 4:
        raise ValueError("too few keypoints")
    # exact 2-NN by brute force up to FLANN_ABOVE descriptor pairs; above, FLANN's randomised k-d trees
    # (5 trees, OpenCV's feature-matching tutorial, with more checks than its 50) cost a fraction of
    # the time. Approximate neighbours change which matches pass the ratio test: on a 256x256 photo
    # the corner error of the start rose from under 1.5 px to 2.3 px with 50 checks.
    if len(desc_f) * len(desc_m) <= FLANN_ABOVE:
        matcher = cv2.BFMatcher(cv2.NORM_L2)
    else:
        matcher = cv2.FlannBasedMatcher({"algorithm": 1, "trees": 5}, {"checks": 128})
    pairs = matcher.knnMatch(desc_f.astype(np.float32), desc_m.astype(np.float32), k=2)
    good = _one_to_one([p[0] for p in pairs if len(p) == 2 and p[0].distance < ratio * p[1].distance])
    if len(good) < 4:
        raise ValueError(f"{len(good)} matches pass the ratio test")
    pts_f = np.float64([kp_f[m.queryIdx].pt for m in good])
    pts_m = np.float64([kp_m[m.trainIdx].pt for m in good])
    failures: list[str] = []
    candidates: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # model -> (pixel matrix, residuals)
    dropped_before: dict[str, int] = {}
    for name in FALLBACKS[model]:
        dropped_before[name] = len(failures)
        try:
            cv2.setRNGSeed(int(seed))  # each model's sampling independent of which ones ran before it
            pixel = _fit_model(cv2, name, pts_f, pts_m, threshold_px)
        except cv2.error as exc:  # an estimator this OpenCV build lacks: try the next model
            failures.append(f"{name}: {str(exc).strip().splitlines()[-1]}")
            continue
        if pixel is None or not np.all(np.isfinite(pixel)):
            failures.append(f"{name}: no model fits the {len(good)} matches")
            continue
        residuals = _residuals(pixel, pts_f, pts_m)
        inliers = int((residuals < threshold_px).sum())
        if inliers < MIN_INLIERS_PER_SAMPLE * MINIMAL_SAMPLE[name] or inliers < MIN_INLIER_FRACTION * len(good):
            failures.append(f"{name}: {inliers} inliers of {len(good)} matches")
            continue
        problem = _well_conditioned(pixel, tuple(fixed_grid.shape))
        if problem is not None:
            failures.append(f"{name}: {problem}")
            continue
        candidates[name] = (pixel, residuals)
    if not candidates:
        raise ValueError("; ".join(failures))
    # one noise scale for every candidate, from the most general one's inliers: 2D residuals of
    # isotropic Gaussian noise (sigma per coordinate) have a Rayleigh median of sigma sqrt(2 ln 2)
    general = next(iter(candidates))
    general_residuals = candidates[general][1]
    noise_px = max(float(np.median(general_residuals[general_residuals < threshold_px])) / np.sqrt(2 * np.log(2)),
                   MIN_NOISE_PX)
    scores = {name: _gric(residuals, noise_px, MODEL_PARAMETERS[name]) for name, (_, residuals) in candidates.items()}
    name = min(scores, key=scores.__getitem__)
    pixel, residuals = candidates[name]
    keep = residuals < threshold_px
    inliers = int(keep.sum())
    stats = {
        "matches": float(len(good)),
        "inliers": float(inliers),
        "inlier_fraction": inliers / len(good),
        "keypoints_fixed": float(len(kp_f)),
        "keypoints_moving": float(len(kp_m)),
        "model": float(MODELS.index(name)),
        "fallbacks": float(dropped_before[general]),
        "simpler_preferred": float(name != general),
        "noise_px": noise_px,
    }

    def to_world(grid: Grid, pts: np.ndarray) -> Tensor:
        """OpenCV keypoints ``(N, 2)`` (x = column, y = row) -> world points ``(N, 2)`` float64."""
        return tensor_to_points(apply_matrix(world_from_pixel(grid), points_to_tensor(torch.as_tensor(pts))))

    return FeatureFit(
        world_matrix_from_pixel_matrix(torch.as_tensor(pixel), fixed_grid, moving_grid),
        stats,
        to_world(fixed_grid, pts_f[keep]),
        to_world(moving_grid, pts_m[keep]),
    )


#: DIS settings over its MEDIUM preset (setter names of ``cv2.DISOpticalFlow`` without ``set``). The
#: patch search runs down to the full resolution (``FinestScale`` 0; MEDIUM stops at half), which on
#: the ``flow/middlebury`` sequences and ``flow/sintel`` samples (in-sample: chosen on them) took DIS'
#: mean EPE from 0.238 to 0.146 px and from 1.067 to 0.923 px for ~4x its time (0.05 -> 0.2 s per
#: 0.5 Mpx pair, one thread; the MEDIUM preset with 10 variational iterations or a denser patch
#: stride changed the EPE by less than 0.002 px; one run). The flow preset's figures with it, and on
#: the held-out mmflow crops, are in benchmarks/README.md (``presets2d.py``).
DIS_SETTINGS: dict[str, int] = {"FinestScale": 0}


def dis_displacement(fixed: Tensor, fixed_grid: Grid, moving: Tensor, moving_grid: Grid) -> Tensor:
    """A dense start for a flow field: OpenCV's DIS optical flow (Kroeger et al., ECCV 2016; its
    ``MEDIUM`` preset with :data:`DIS_SETTINGS`) between the grey images, as a world displacement ``(1, ndim, *fixed_grid.shape)``
    float32 on the fixed grid (``world_map = identity + displacement``).

    DIS finds motions of tens of pixels by a coarse-to-fine inverse-search over patches, which a
    variational coarse-to-fine refinement alone misses on thin structures; the refinement then
    starts from it. The moving image is first read on the fixed grid through the world identity, so
    the flow is the one of :func:`alignkit.spatial.flow_from_world_map`. Raises
    :class:`ConfigError` without OpenCV (the caller starts from zero).
    """
    from alignkit.spatial import sample_world, voxel_to_world_vectors

    if fixed_grid.ndim != 2:
        raise ConfigError("a DIS start is 2D only")
    cv2 = _import_cv2()
    if moving_grid.same_as(fixed_grid):
        moving_on_fixed = moving.float()  # a video's frames: reading through the identity is a copy
    else:
        world = fixed_grid.world_points(device=moving.device)
        moving_on_fixed = sample_world(moving.float(), moving_grid, world, padding="border")

    def grey8(image: Tensor) -> np.ndarray:
        # the engine's images are normalised to [0, 1] by robust percentiles: one scale for both
        grey = image[0].float().mean(0).cpu().numpy()
        return np.clip(grey * 255.0, 0, 255).astype(np.uint8)

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    for name, value in DIS_SETTINGS.items():
        getattr(dis, "set" + name)(value)
    xy = dis.calc(grey8(fixed), grey8(moving_on_fixed), None)  # (H, W, 2): x (column), y (row)
    flow = torch.from_numpy(np.ascontiguousarray(xy[..., ::-1].transpose(2, 0, 1))).unsqueeze(0).double()
    # world displacement = the grid's linear part applied to the voxel flow (identity + flow, mapped
    # to world, minus the identity in world), without building either map
    return voxel_to_world_vectors(flow, fixed_grid).float().to(moving.device)
