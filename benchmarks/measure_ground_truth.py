"""Measure the ground truth that three data sets do not ship, and write it into the package.

Three cases of ``../shared/data`` have no usable transform in their files, so their ground truth is
*measured* here, once, by registration -- never at load time -- and written to
``src/alignkit/data/groundtruth/<data set>.json`` with its provenance and its uncertainty:

* ``multimodal/ct-mr-2d`` ``mri<-ct_moving``: ``ct_2d_moving.tif`` is a displaced copy of the CT that is
  aligned with the MR (``ct_2d_true.tif``); the map is fitted between the two CT copies (same image).
* ``multimodal/itk-t1-pd-slices`` ``t1<-pd_R10X13Y17``: the file name says "rotated 10°, shifted (13, 17)",
  but the slice is shifted by about (13, 16); the map is fitted between the moved PD slice and the
  unmoved one (same image).
* ``multimodal/t1-pd-3d`` ``t1<-pd``: the headers of ``chris_t1``/``chris_PD`` leave an 8.7° tilt; the map
  is a rigid T1 -> PD fit (multimodal, so far less certain than the same-image fits).

Each case is fitted twice, by two independent procedures; the stored matrix is the mean of the two
fits and the stored uncertainty is the largest distance, over the corners of the fixed image's
bounding box, between the points the two fits map them to (world units: pixels for the rasters, mm
for the head). Same-image fits: alignkit's Gauss-Newton affine fit on intensities (below) and OpenCV's
ECC (``cv2.findTransformECC``, MOTION_AFFINE, pyramid 8-4-2-1). The head: two SimpleITK rigid
(Euler3D) fits with unrelated criteria, Mattes mutual information on the intensities and normalised
correlation on gradient magnitudes -- no alignkit code, since alignkit is what these cases judge.

    python3 benchmarks/measure_ground_truth.py [--data ../shared/data] [--only multimodal/ct-mr-2d] [--dry-run]

Prints one JSON line per case (value, uncertainty, the two fits, seconds); writes the files unless
``--dry-run``. The files record the input files' sizes and SHA-256, the date, the commit and the
library versions; the loaders apply a measured matrix only to the files it was measured on.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "src" / "alignkit" / "data" / "groundtruth"


# ------------------------------------------------------------------------------------------------
# same-image fits (2D rasters: world = pixels, x = column, y = row)
# ------------------------------------------------------------------------------------------------
def _pooled(image: torch.Tensor, grid: Any, k: int) -> tuple[torch.Tensor, Any]:
    """``k``-fold box average of a ``(1, C, *S)`` image and the grid of its pooled voxels (pooled voxel
    ``i`` is the mean of voxels ``k i .. k i + k - 1``, centred at ``k i + (k - 1) / 2``)."""
    from alignkit.spatial.grid import Grid

    if k == 1:
        return image, grid
    ndim = grid.ndim
    pool = torch.nn.functional.avg_pool2d if ndim == 2 else torch.nn.functional.avg_pool3d
    pooled = pool(image, k)
    scale = torch.eye(ndim + 1, dtype=torch.float64)
    scale[:ndim, :ndim] *= k
    scale[:ndim, ndim] = (k - 1) / 2
    return pooled, Grid(tuple(pooled.shape[2:]), grid.world_from_voxel @ scale)


def fit_copy_gauss_newton(fixed_path: Path, moving_path: Path) -> np.ndarray:
    """Fixed -> moving affine (world) between two files holding *the same image*, one displaced:
    Gauss-Newton on the intensity differences, coarse to fine (box-pooled 8x, 4x, then the raw images
    at every second fixed pixel), started with the intensity centroids aligned. This is the fit the
    ct-mr-2d loader ran at load time until the ground truth moved into a data file."""
    from alignkit.io import read_image
    from alignkit.spatial import apply_matrix, sample_world, spatial_gradient

    fixed, moving = read_image(fixed_path).grey(), read_image(moving_path).grey()
    ndim = fixed.ndim
    f_full, m_full = fixed.batch(), moving.batch()

    def centroid(image: Any) -> torch.Tensor:
        world = image.grid.world_points(dtype=torch.float64)[0].reshape(ndim, -1)
        weight = image.data[0].reshape(-1).double().clamp(min=0)
        return (world * weight).sum(1) / weight.sum().clamp(min=1e-12)

    c_fixed, c_moving = centroid(fixed), centroid(moving)
    size = float(fixed.grid.extent().max())
    # map(x) = c_moving + K u + q with u = (x - c_fixed) / size: every parameter is in pixels (K scaled
    # by the image size), so the normal equations are well conditioned
    linear = torch.eye(ndim, dtype=torch.float64) * size
    shift = torch.zeros(ndim, dtype=torch.float64)

    def matrix() -> torch.Tensor:
        out = torch.eye(ndim + 1, dtype=torch.float64)
        out[:ndim, :ndim] = linear / size
        out[:ndim, ndim] = c_moving + shift - linear @ c_fixed / size
        return out

    def strided(t: torch.Tensor, stride: int) -> torch.Tensor:
        return t[(..., *([slice(None, None, stride)] * ndim))]

    for pool, stride in ((8, 1), (4, 1), (1, 2)):
        f_l, f_grid = _pooled(f_full, fixed.grid, pool)
        m_l, m_grid = _pooled(m_full, moving.grid, pool)
        voxel_from_world = m_grid.voxel_from_world[:ndim, :ndim].float()
        grad = torch.einsum("a...,aj->j...", spatial_gradient(m_l)[0, 0], voxel_from_world)
        stack = torch.cat([m_l, grad.unsqueeze(0)], 1)
        points = strided(f_grid.world_points(dtype=torch.float64), stride)
        target = strided(f_l, stride).reshape(-1).double()
        u = ((points[0].reshape(ndim, -1) - c_fixed[:, None]) / size).T  # (N, ndim)
        upper = torch.tensor(m_grid.shape, dtype=torch.float64)[:, None] - 1
        for _ in range(30):
            world = apply_matrix(matrix(), points)
            values = sample_world(stack, m_grid, world.float(), padding="border").double()
            voxel = apply_matrix(m_grid.voxel_from_world, world)[0].reshape(ndim, -1)
            inside = ((voxel >= 0) & (voxel <= upper)).all(0)
            residual = (values[0, 0].reshape(-1) - target)[inside]
            g = values[0, 1:].reshape(ndim, -1).T[inside]  # (N, ndim)
            jac = torch.cat([(g[:, :, None] * u[inside][:, None, :]).reshape(len(g), -1), g], dim=1)
            hessian = jac.T @ jac
            step = torch.linalg.solve(hessian + 1e-9 * torch.diag(hessian.diagonal()), -(jac.T @ residual))
            linear = linear + step[: ndim * ndim].reshape(ndim, ndim)
            shift = shift + step[ndim * ndim :]
            if float(step.abs().max()) < 1e-4:  # pixels: far below any metric's resolution
                break
    return matrix().numpy()


def _grey_array(path: Path) -> np.ndarray:
    from alignkit.io import read_image

    return read_image(path).grey().data[0].double().numpy()


def fit_copy_ecc(fixed_path: Path, moving_path: Path) -> np.ndarray:
    """The same fit by OpenCV's ECC (``findTransformECC``, MOTION_AFFINE), coarse to fine at 1/8, 1/4,
    1/2, 1, started with the intensity centroids aligned. ECC's warp maps template (fixed) pixels to
    input (moving) pixels, x = column, y = row: the fixed -> moving matrix directly."""
    import cv2

    fixed, moving = (_grey_array(p).astype(np.float32) for p in (fixed_path, moving_path))

    def centroid(a: np.ndarray) -> np.ndarray:
        rows, cols = np.indices(a.shape)
        w = np.clip(a, 0, None)
        return np.array([(cols * w).sum(), (rows * w).sum()]) / w.sum()

    warp = np.eye(3)
    warp[:2, 2] = centroid(moving) - centroid(fixed)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 200, 1e-7)
    for scale in (8, 4, 2, 1):
        # pixel centres: x_full = s x_small + (s - 1) / 2
        to_small = np.array([[1 / scale, 0, -(scale - 1) / (2 * scale)], [0, 1 / scale, -(scale - 1) / (2 * scale)],
                             [0, 0, 1]])
        small = [cv2.resize(a, (a.shape[1] // scale, a.shape[0] // scale), interpolation=cv2.INTER_AREA)
                 if scale > 1 else a for a in (fixed, moving)]
        level = to_small @ warp @ np.linalg.inv(to_small)
        _, found = cv2.findTransformECC(small[0], small[1], level[:2].astype(np.float32), cv2.MOTION_AFFINE,
                                        criteria, None, 1)
        level[:2] = found
        warp = np.linalg.inv(to_small) @ level @ to_small
    return warp


def copy_ncc(fixed_path: Path, moving_path: Path, matrix: np.ndarray) -> float:
    """NCC of the fixed image and the moving image resampled through ``matrix`` (over the overlap)."""
    from scipy import ndimage

    fixed, moving = _grey_array(fixed_path), _grey_array(moving_path)
    rows, cols = np.indices(fixed.shape, dtype=np.float64)
    pts = matrix @ np.stack([cols.ravel(), rows.ravel(), np.ones(cols.size)])
    warped = ndimage.map_coordinates(moving, [pts[1], pts[0]], order=1, mode="constant", cval=np.nan)
    ok = np.isfinite(warped)
    a, b = warped[ok] - warped[ok].mean(), fixed.ravel()[ok] - fixed.ravel()[ok].mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


# ------------------------------------------------------------------------------------------------
# multimodal rigid fits of the 3D head (SimpleITK only)
# ------------------------------------------------------------------------------------------------
def fit_rigid_sitk(fixed_path: Path, moving_path: Path, criterion: str) -> tuple[np.ndarray, float, float]:
    """Fixed -> moving rigid map in LPS world mm by SimpleITK (Euler3D about the fixed grid's centre,
    started from the header alignment, shrink 4-2-1 with 2-1-0 mm smoothing, regular-step gradient
    descent). ``criterion``: ``"mi"`` (Mattes mutual information, 50 bins, on the intensities) or
    ``"gradient-ncc"`` (normalised correlation of gradient magnitudes, sigma 1.5 mm). Returns the
    matrix and the metric before and after (SimpleITK's sign: lower is better)."""
    import SimpleITK as sitk

    fixed = sitk.ReadImage(str(fixed_path), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(moving_path), sitk.sitkFloat32)
    if criterion == "gradient-ncc":
        fixed = sitk.GradientMagnitudeRecursiveGaussian(fixed, 1.5)
        moving = sitk.GradientMagnitudeRecursiveGaussian(moving, 1.5)
    transform = sitk.Euler3DTransform()
    size = np.array(fixed.GetSize(), dtype=np.float64)
    transform.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    method = sitk.ImageRegistrationMethod()
    if criterion == "mi":
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    else:
        method.SetMetricAsCorrelation()
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.2, seed=1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-4, numberOfIterations=300,
                                                    relaxationFactor=0.7)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    before = method.MetricEvaluate(fixed, moving)
    method.Execute(fixed, moving)
    method.SetInitialTransform(transform, inPlace=True)
    after = method.MetricEvaluate(fixed, moving)
    linear = np.array(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    centre = np.array(transform.GetCenter())
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = centre + np.array(transform.GetTranslation()) - linear @ centre
    return out, float(before), float(after)


def _mean_rigid(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The rigid map halfway between two: the mean translation part and the rotation half way (the
    polar factor of the mean linear part, which is exact to second order for nearby rotations)."""
    u, _, vt = np.linalg.svd((a[:3, :3] + b[:3, :3]) / 2)
    out = (a + b) / 2
    out[:3, :3] = u @ vt
    return out


# ------------------------------------------------------------------------------------------------
# bookkeeping
# ------------------------------------------------------------------------------------------------
def corner_spread(a: np.ndarray, b: np.ndarray, corners: np.ndarray) -> tuple[float, float]:
    """Max and mean distance between the images of ``corners`` (N, ndim) under two matrices."""
    h = np.hstack([corners, np.ones((len(corners), 1))]).T
    d = np.linalg.norm((a @ h)[:-1] - (b @ h)[:-1], axis=0)
    return float(d.max()), float(d.mean())


def box_corners(path: Path) -> np.ndarray:
    """World corners (voxel centres) of the image's bounding box, ``(2**ndim, ndim)``."""
    import itertools

    from alignkit.io import read_image

    grid = read_image(path).grid
    upper = [s - 1 for s in grid.shape]
    voxels = np.array(list(itertools.product(*[(0, u) for u in upper])), dtype=np.float64)
    affine = grid.world_from_voxel.numpy()
    return voxels @ affine[: grid.ndim, : grid.ndim].T + affine[: grid.ndim, grid.ndim]


def file_record(path: Path) -> dict[str, Any]:
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip()


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "numpy": np.__version__, "torch": torch.__version__}
    for name in ("cv2", "SimpleITK"):
        try:
            out[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            pass
    return out


def rounded(matrix: np.ndarray) -> list[list[float]]:
    return [[float(f"{v:.10g}") for v in row] for row in matrix]


def measure_copy(folder: Path, fixed_file: str, moving_file: str) -> dict[str, Any]:
    fixed, moving = folder / fixed_file, folder / moving_file
    gn = fit_copy_gauss_newton(fixed, moving)
    ecc = fit_copy_ecc(fixed, moving)
    value = (gn + ecc) / 2
    spread_max, spread_mean = corner_spread(gn, ecc, box_corners(fixed))
    return {
        "matrix": value,
        "uncertainty": spread_max,
        "uncertainty_mean": spread_mean,
        "units": "px",
        "fits": {
            "alignkit-gauss-newton": {"matrix": rounded(gn), "ncc": copy_ncc(fixed, moving, gn)},
            "opencv-ecc": {"matrix": rounded(ecc), "ncc": copy_ncc(fixed, moving, ecc)},
        },
        "ncc": copy_ncc(fixed, moving, value),
        "method": (f"same-image affine fits of {moving_file} onto {fixed_file}: alignkit Gauss-Newton on intensities "
                   "(box pyramid 8-4-1) and OpenCV findTransformECC (MOTION_AFFINE, pyramid 8-4-2-1); value = their "
                   "mean; uncertainty = max distance between the two fits at the fixed image's corners"),
        "measured_files": {"fixed": file_record(fixed), "moving": file_record(moving)},
    }


def measure_head(folder: Path) -> dict[str, Any]:
    t1, pd = folder / "chris_t1.nii.gz", folder / "chris_PD.nii.gz"
    mi, mi_before, mi_after = fit_rigid_sitk(t1, pd, "mi")
    gn, gn_before, gn_after = fit_rigid_sitk(t1, pd, "gradient-ncc")
    value = _mean_rigid(mi, gn)
    corners = box_corners(t1)
    spread_max, spread_mean = corner_spread(mi, gn, corners)
    header_max, header_mean = corner_spread(value, np.eye(4), corners)
    return {
        "matrix": value,
        "uncertainty": spread_max,
        "uncertainty_mean": spread_mean,
        "units": "mm",
        "fits": {
            "sitk-mattes-mi": {"matrix": rounded(mi), "metric_before": mi_before, "metric_after": mi_after},
            "sitk-gradient-ncc": {"matrix": rounded(gn), "metric_before": gn_before, "metric_after": gn_after},
        },
        "header_identity_error_mm": {"max": header_max, "mean": header_mean},
        "method": ("two SimpleITK rigid (Euler3D) fits of chris_PD onto chris_t1 from the header alignment, shrink "
                   "4-2-1, smoothing 2-1-0 mm, 20% random sampling (seed 1), regular-step gradient descent: Mattes MI "
                   "(50 bins) on intensities and normalised correlation on gradient magnitudes (sigma 1.5 mm); value "
                   "= the rigid map halfway between them; uncertainty = max distance between the two fits at the "
                   "corners of the T1 grid"),
        "measured_files": {"fixed": file_record(t1), "moving": file_record(pd)},
    }


#: data set -> {case name: measuring function of the data set's folder}
MEASUREMENTS = {
    "multimodal/ct-mr-2d": {
        "mri<-ct_moving": lambda folder: measure_copy(folder, "ct_2d_true.tif", "ct_2d_moving.tif"),
    },
    "multimodal/itk-t1-pd-slices": {
        "t1<-pd_R10X13Y17": lambda folder: measure_copy(folder, "BrainProtonDensitySliceBorder20.png",
                                                        "BrainProtonDensitySliceR10X13Y17.png"),
    },
    "multimodal/t1-pd-3d": {"t1<-pd": measure_head},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--only", action="append", choices=sorted(MEASUREMENTS), help="data set (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print, do not write the files")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    stamp = {"date": datetime.date.today().isoformat(), "commit": commit(), "versions": versions(),
             "script": "benchmarks/measure_ground_truth.py"}
    for dataset in args.only or sorted(MEASUREMENTS):
        folder = args.data / dataset
        if not folder.is_dir():
            print(json.dumps({"dataset": dataset, "skipped": f"folder not found: {folder}"}))
            continue
        cases = {}
        for case, measure in MEASUREMENTS[dataset].items():
            started = time.perf_counter()
            record = measure(folder)
            record["matrix"] = rounded(record["matrix"])
            record["seconds"] = round(time.perf_counter() - started, 1)
            cases[case] = record | stamp
            print(json.dumps({"dataset": dataset, "case": case} | record), flush=True)
        if not args.dry_run:
            OUT_DIR.mkdir(parents=True, exist_ok=True)
            path = OUT_DIR / f"{dataset.replace('/', '-')}.json"
            path.write_text(json.dumps({"dataset": dataset, "cases": cases}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
