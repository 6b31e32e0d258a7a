"""Multimodal loaders: the ITK T1/PD slices, the 3D T1/PD head, the CT/MR slices and the prostate
MR/ultrasound cases. See :mod:`alignkit.data.datasets` for lookup by name.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from alignkit.data.base import CaseDataset, read, register, rglob
from alignkit.data.case import Case
from alignkit.errors import InputError
from alignkit.image import Image
from alignkit.spatial.grid import Grid


def _matrix_2d(linear: np.ndarray, translation: Sequence[float]) -> np.ndarray:
    m = np.eye(3)
    m[:2, :2] = linear
    m[:2, 2] = translation
    return m


def _rotation_2d(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def _about(linear: np.ndarray, centre: np.ndarray, shift: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
    """``x -> linear (x - centre) + centre + shift`` as a 3x3 matrix."""
    return _matrix_2d(linear, centre - linear @ centre + np.asarray(shift, dtype=np.float64))


# ------------------------------------------------------------------------------------------------
# multimodal
# ------------------------------------------------------------------------------------------------
#: Measured deviations of ITK example images from the transforms their names state: the PD slice
#: "R10X13Y17" is shifted by (13, 16), not (13, 17) -- NCC with the unmoved PD slice 0.9973 at
#: (13, 16) against 0.9814 at (13, 17); the ITK Software Guide's own registration (ImageRegistration5)
#: also finds (12.98, 15.98) and remarks that y "ends up being off by about one millimeter".
_ITK_MEASURED_SHIFT = {"R10X13Y17": (13.0, 16.0)}


def itk_slice_matrix(tag: str, width: int, height: int) -> np.ndarray | None:
    """Fixed → moving matrix (x = column, y = row) of an ITK example slice named
    ``BrainProtonDensitySlice<tag>.png`` relative to the unmoved ``...Border20`` slice; ``None`` when the
    name states no transform (e.g. ``BSplined10``).

    Conventions measured on the ITK files (NCC of the moved slice resampled through the matrix against
    the unmoved one, 221x257 slices): rotations are about ``(width/2, height/2)`` = (110.5, 128.5), a
    positive angle turns +x towards +y; ``Shifted13x17y``: ``x + (13, 17)`` (NCC 1.000);
    ``Rotated10``: rotation by 10° (0.9959); ``R10X13Y17``: rotation by 10° then shift (13, 16)
    (0.9973, see ``_ITK_MEASURED_SHIFT``); ``R10X13Y17S12``: the image was *resampled* through
    ``y -> 1.2 R(10°)(y - c) + c + (13, 17)`` (moving → fixed), so the fixed → moving map is its
    inverse (0.9962).
    """
    centre = np.array([width / 2.0, height / 2.0])
    if tag in ("", "Border20"):
        return np.eye(3)
    if m := re.fullmatch(r"Shifted(\d+)x(\d+)y", tag):
        return _matrix_2d(np.eye(2), (float(m[1]), float(m[2])))
    if m := re.fullmatch(r"Rotated(\d+)", tag):
        return _about(_rotation_2d(float(m[1])), centre)
    if m := re.fullmatch(r"R(\d+)X(\d+)Y(\d+)", tag):
        shift = _ITK_MEASURED_SHIFT.get(tag, (float(m[2]), float(m[3])))
        return _about(_rotation_2d(float(m[1])), centre, shift)
    if m := re.fullmatch(r"R(\d+)X(\d+)Y(\d+)S(\d+)", tag):
        scale = float(m[4]) / 10.0
        moving_to_fixed = _about(scale * _rotation_2d(float(m[1])), centre, (float(m[2]), float(m[3])))
        return np.linalg.inv(moving_to_fixed)
    return None


@register("multimodal/itk-t1-pd-slices")
class ItkT1PDSlicesDataset(CaseDataset):
    """ITK Software Guide slices: ``BrainT1SliceBorder20.png`` (fixed, T1) against the PD slice
    (``...Border20``, aligned: identity) and each PD slice moved by the transform in its name
    (``kind="affine"``, ``Case.matrix`` from :func:`itk_slice_matrix`). ``BSplined10`` has no analytic
    ground truth and is skipped (see :attr:`skipped`). The T1 and PD ``Border20`` slices are aligned:
    rigid fits of one to the other (gradient-magnitude NCC, mutual information) stay within 0.5 px
    and 0.2° of the identity."""

    fixed_file = "BrainT1SliceBorder20.png"
    prefix = "BrainProtonDensitySlice"

    def _discover(self) -> None:
        assert self.root is not None
        if not (self.root / self.fixed_file).is_file():
            raise InputError(f"missing {self.fixed_file}", self.root)
        self._files: dict[str, Path] = {}
        for path in sorted(self.root.glob(f"{self.prefix}*.png")):
            tag = path.name[len(self.prefix) : -len(".png")]
            if tag in ("", "256x256", "2x3", "Border20Mask"):
                continue  # other sizes / a mask: not on the T1 Border20 grid
            if tag != "Border20" and itk_slice_matrix(tag, 1, 1) is None:
                self.skipped[path.name] = "no analytic ground truth in the file name (e.g. a B-spline warp)"
                continue
            self._files["t1<-pd" if tag == "Border20" else f"t1<-pd_{tag}"] = path
        self.names = sorted(self._files, key=lambda n: (n != "t1<-pd", n))

    def _load(self, name: str) -> Case:
        assert self.root is not None
        fixed = read(self.root / self.fixed_file)
        moving = read(self._files[name])
        tag = self._files[name].name[len(self.prefix) : -len(".png")]
        height, width = moving.shape
        matrix = itk_slice_matrix(tag, width, height)
        assert matrix is not None
        return Case(
            name=name,
            fixed=fixed,
            moving=moving,
            kind="affine",
            matrix=matrix,
            meta=self._meta(fixed=self.root / self.fixed_file, moving=self._files[name]) | {"transform": tag},
        )


#: Measured T1 → PD world map of the shipped ``chris_t1``/``chris_PD`` pair. Their headers do *not*
#: align them, contrary to the data README: resampling PD through the identity leaves an 8.7° tilt
#: about the left-right axis and ~8 mm along z (21.6 mm mean error at the T1 grid's corners). Two rigid
#: fits with unrelated criteria -- gradient-magnitude NCC (0.33 at identity -> 0.64) and mutual
#: information (0.10 -> 0.41), on the T1 grid at 1.76 mm -- agree to 1.2 mm mean / 1.9 mm max at the
#: corners; this matrix is their mean (rotation vector (8.67°, -0.31°, -1.27°) about the T1 grid centre,
#: shift (-0.96, -2.77, 8.45) mm), uncertain to about 1 mm.
_CHRIS_T1_TO_PD = np.array([
    [0.99974, 0.02165, -0.007093, -1.0402],
    [-0.022472, 0.988318, -0.150741, -1.766247],
    [0.003747, 0.150862, 0.988548, 7.618662],
    [0.0, 0.0, 0.0, 1.0],
])


@register("multimodal/t1-pd-3d")
class T1PD3DDataset(CaseDataset):
    """One head, T1 (0.88 mm) and PD (0.86x0.86x2.4 mm) on different grids (``kind="affine"``); cases
    ``"t1<-pd"`` and ``"pd<-t1"``.

    The data README says the header affines align the two, which would make the ground truth the
    identity in world coordinates; measured on the shipped files it is not (see ``_CHRIS_T1_TO_PD``):
    for ``chris_t1``/``chris_PD`` ``Case.matrix`` is that measured rigid map (``meta["gt_source"]``
    says so, ``meta["gt_uncertainty_mm"]`` ≈ 1); for another folder of this layout it is the identity
    the headers imply.
    """

    def _discover(self) -> None:
        assert self.root is not None
        t1 = sorted(self.root.glob("*[tT]1*.nii*"))
        pd = sorted(self.root.glob("*PD*.nii*")) or sorted(self.root.glob("*pd*.nii*"))
        if t1 and pd:
            self._files = {"t1": t1[0], "pd": pd[0]}
            self.names = ["t1<-pd", "pd<-t1"]

    def _load(self, name: str) -> Case:
        fixed_id, moving_id = name.split("<-")
        meta = self._meta(fixed=self._files[fixed_id], moving=self._files[moving_id])
        shipped = self._files["t1"].name == "chris_t1.nii.gz" and self._files["pd"].name == "chris_PD.nii.gz"
        if shipped:
            t1_to_pd = _CHRIS_T1_TO_PD
            meta |= {"gt_source": "measured rigid map (the headers leave ~8.7 deg / 8 mm)", "gt_uncertainty_mm": 1.2}
        else:
            t1_to_pd = np.eye(4)
            meta |= {"gt_source": "identity through the header affines (not verified for this folder)"}
        return Case(
            name=name,
            fixed=read(self._files[fixed_id]),
            moving=read(self._files[moving_id]),
            kind="affine",
            matrix=t1_to_pd.copy() if fixed_id == "t1" else np.linalg.inv(t1_to_pd),
            meta=meta,
        )


def _pooled(image: torch.Tensor, grid: Grid, k: int) -> tuple[torch.Tensor, Grid]:
    """``k``-fold box average of a ``(1, C, *S)`` image and the grid of its pooled voxels (pooled voxel
    ``i`` is the mean of voxels ``k i .. k i + k - 1``, centred at ``k i + (k - 1) / 2``)."""
    if k == 1:
        return image, grid
    ndim = grid.ndim
    pool = torch.nn.functional.avg_pool2d if ndim == 2 else torch.nn.functional.avg_pool3d
    pooled = pool(image, k)
    scale = torch.eye(ndim + 1, dtype=torch.float64)
    scale[:ndim, :ndim] *= k
    scale[:ndim, ndim] = (k - 1) / 2
    return pooled, Grid(tuple(pooled.shape[2:]), grid.world_from_voxel @ scale)


@functools.lru_cache(maxsize=8)
def _fit_copy_affine(fixed_path: str, moving_path: str, stamp: tuple[float, float]) -> tuple[np.ndarray, float]:
    """Fixed → moving affine (world) between two files holding *the same image*, one displaced:
    Gauss-Newton on the intensity differences, coarse to fine; returns ``(matrix, NCC after)``.

    Used where a data set ships a displaced copy without its transform: a same-image fit is exact to
    a few hundredths of a pixel (ct-mr-2d: NCC 0.99993; OpenCV's ECC gives the same matrix within
    0.03 px at the corners), far below what any multimodal method is judged at. ``stamp`` (the files'
    mtimes) keys the cache.
    """
    from alignkit.spatial import apply_matrix, sample_world, spatial_gradient

    del stamp
    fixed, moving = read(Path(fixed_path)).grey(), read(Path(moving_path)).grey()
    ndim = fixed.ndim
    f_full, m_full = fixed.batch(), moving.batch()

    def centroid(image: Image) -> torch.Tensor:
        world = image.grid.world_points(dtype=torch.float64)[0].reshape(ndim, -1)
        weight = image.data[0].reshape(-1).double().clamp(min=0)
        return (world * weight).sum(1) / weight.sum().clamp(min=1e-12)

    c_fixed, c_moving = centroid(fixed), centroid(moving)
    size = float(fixed.grid.extent().max())
    # map(x) = c_moving + K u + q with u = (x - c_fixed) / size: the intensity centroids start the fit
    # aligned, and every parameter is in pixels/mm (K scaled by the image size), so the normal
    # equations are well conditioned
    linear = torch.eye(ndim, dtype=torch.float64) * size
    shift = torch.zeros(ndim, dtype=torch.float64)

    def matrix() -> torch.Tensor:
        out = torch.eye(ndim + 1, dtype=torch.float64)
        out[:ndim, :ndim] = linear / size
        out[:ndim, ndim] = c_moving + shift - linear @ c_fixed / size
        return out

    # coarse levels on box-pooled copies of both images; the last on the raw images (no smoothing, so
    # no bias) at every second fixed pixel, which is plenty for 6 parameters and 4x cheaper
    for pool, stride in ((8, 1), (4, 1), (1, 2)):
        f_l, f_grid = _pooled(f_full, fixed.grid, pool)
        m_l, m_grid = _pooled(m_full, moving.grid, pool)
        voxel_from_world = m_grid.voxel_from_world[:ndim, :ndim].float()
        grad = torch.einsum("a...,aj->j...", spatial_gradient(m_l)[0, 0], voxel_from_world)
        stack = torch.cat([m_l, grad.unsqueeze(0)], 1)
        points = f_grid.world_points(dtype=torch.float64)
        points = points[:, :, ::stride, ::stride] if ndim == 2 else points[:, :, ::stride, ::stride, ::stride]
        target = (f_l[:, :, ::stride, ::stride] if ndim == 2 else f_l[:, :, ::stride, ::stride, ::stride])
        target = target.reshape(-1).double()
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
            if float(step.abs().max()) < 1e-4:  # pixels/mm: far below any metric's resolution
                break
    with torch.no_grad():
        world = apply_matrix(matrix(), fixed.grid.world_points(dtype=torch.float64))
        warped = sample_world(m_full, moving.grid, world.float()).double().flatten()
        target = f_full.double().flatten()  # float64 sums: float32 loses the 4th decimal over 1e6 pixels
        a, b = warped - warped.mean(), target - target.mean()
        ncc = float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-12))
    return matrix().numpy(), ncc


@register("multimodal/ct-mr-2d")
class CtMr2DDataset(CaseDataset):
    """Head CT ↔ MR slices (rasters, world = pixels), fixed = MR.

    ``ct_2d_true.tif`` is aligned with ``mri_2d.tif`` in pixel coordinates (``"mri<-ct_true"``: identity;
    rigid fits by gradient-magnitude NCC and by mutual information move it by at most 2.4 px, so take
    this ground truth as good to ~2 px). ``ct_2d_moving.tif`` is a displaced copy of the true CT whose
    transform is not shipped: the loader recovers it by a same-image fit of the moving CT to the true
    CT (:func:`_fit_copy_affine`, NCC 0.99993: a 12.2° rotation plus a shift), so ``"mri<-ct_moving"``
    has ``Case.matrix`` = that fit (``meta["gt_ncc"]`` says how well it holds).
    """

    def _discover(self) -> None:
        assert self.root is not None
        files = {k: self.root / f for k, f in (("mri", "mri_2d.tif"), ("ct_true", "ct_2d_true.tif"),
                                               ("ct_moving", "ct_2d_moving.tif"))}
        self._files = files
        if files["mri"].is_file() and files["ct_true"].is_file():
            self.names.append("mri<-ct_true")
            if files["ct_moving"].is_file():
                self.names.append("mri<-ct_moving")

    def _load(self, name: str) -> Case:
        moving_id = name.split("<-")[1]
        meta = self._meta(fixed=self._files["mri"], moving=self._files[moving_id])
        matrix = np.eye(3)
        if moving_id == "ct_moving":
            true, moved = self._files["ct_true"], self._files["ct_moving"]
            matrix, ncc = _fit_copy_affine(str(true), str(moved), (true.stat().st_mtime, moved.stat().st_mtime))
            meta |= {"gt_source": "same-image affine fit of ct_2d_moving to ct_2d_true", "gt_ncc": ncc}
        return Case(
            name=name,
            fixed=read(self._files["mri"]),
            moving=read(self._files[moving_id]),
            kind="affine",
            matrix=np.array(matrix, dtype=np.float64),
            meta=meta,
        )


@register("multimodal/prostate-mr-us")
class ProstateMRUSDataset(CaseDataset):
    """Learn2Reg weakly-supervised prostate MR ↔ transrectal US (0.4 mm), ``train/`` and ``test/``.

    Fixed = ultrasound, moving = MR (the tutorial's direction). Each label file holds the gland
    (channel 0) and, for most cases, landmarks (channels 1..K-1) that correspond between MR and US.
    ``fixed_labels``/``moving_labels``: gland = 1, landmark k = k + 1 (painted over the gland);
    ``label_ids = [1]`` (gland Dice); ``fixed_points``/``moving_points``: world centroids of every
    channel present in both (row 0 = gland), for TRE.
    """

    def _discover(self) -> None:
        assert self.root is not None
        names = []
        for us in rglob(self.root, "us_images/*.nii*"):
            split = us.parent.parent
            case_file = us.name
            needed = [split / d / case_file for d in ("mr_images", "mr_labels", "us_labels")]
            if all(p.is_file() for p in needed):
                names.append(f"{self._rel(split)}/{case_file.split('.')[0]}".lstrip("/"))
        self.names = names

    def _paths(self, name: str) -> dict[str, Path]:
        assert self.root is not None
        split, _, case_id = name.rpartition("/")
        base = self.root / split if split else self.root
        return {d: next(iter(sorted((base / d).glob(f"{case_id}.nii*")))) for d in
                ("mr_images", "mr_labels", "us_images", "us_labels")}

    @staticmethod
    def _label_map(channels: Image) -> tuple[Image, int]:
        data = channels.data
        out = torch.zeros(data.shape[1:], dtype=torch.int64)
        for k in range(data.shape[0]):
            out[data[k] > 0] = k + 1
        return Image(out.unsqueeze(0), channels.grid, path=channels.path, meta=dict(channels.meta)), data.shape[0]

    def _load(self, name: str) -> Case:
        paths = self._paths(name)
        fixed_channels = read(paths["us_labels"], labels=True)
        moving_channels = read(paths["mr_labels"], labels=True)
        fixed_labels, n_fixed = self._label_map(fixed_channels)
        moving_labels, n_moving = self._label_map(moving_channels)
        ids = list(range(1, min(n_fixed, n_moving) + 1))
        # centroids per channel, not of the painted map: the gland centroid must include the
        # voxels under its landmarks
        fixed_points = self._channel_centroids(fixed_channels, len(ids))
        moving_points = self._channel_centroids(moving_channels, len(ids))
        keep = np.isfinite(fixed_points).all(1) & np.isfinite(moving_points).all(1)
        return Case(
            name=name,
            fixed=read(paths["us_images"]),
            moving=read(paths["mr_images"]),
            kind="deformable",
            fixed_labels=fixed_labels,
            moving_labels=moving_labels,
            label_ids=[1],
            fixed_points=fixed_points[keep],
            moving_points=moving_points[keep],
            meta=self._meta(fixed=paths["us_images"], moving=paths["mr_images"])
            | {"point_labels": [i for i, k in zip(ids, keep) if k], "note": "label 1 = gland, 2.. = landmarks"},
        )

    @staticmethod
    def _channel_centroids(channels: Image, count: int) -> np.ndarray:
        out = np.full((count, channels.ndim), np.nan)
        affine = channels.grid.world_from_voxel.numpy()
        for k in range(count):
            voxels = np.argwhere(channels.data[k].numpy() > 0)
            if len(voxels):
                out[k] = affine[: channels.ndim, : channels.ndim] @ voxels.mean(0) + affine[: channels.ndim, -1]
        return out
