"""Multimodal loaders: the ITK T1/PD slices, the 3D T1/PD head, the CT/MR slices and the prostate
MR/ultrasound cases. See :mod:`alignkit.data.datasets` for lookup by name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignkit.data.base import CaseDataset, read, register, rglob
from alignkit.data.case import Case
from alignkit.data.groundtruth import measured_truth
from alignkit.errors import InputError
from alignkit.image import Image


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
#: ITK example slices whose transform is not the one their name states, so their ground truth is
#: measured (:mod:`alignkit.data.groundtruth`): "R10X13Y17" is shifted by about (13, 16), not (13, 17) --
#: NCC with the unmoved PD slice 0.9973 at (13, 16) against 0.9814 at (13, 17); the ITK Software Guide's
#: own registration (ImageRegistration5) also finds (12.98, 15.98) and remarks that y "ends up being
#: off by about one millimeter".
ITK_MEASURED_TAGS = ("R10X13Y17",)


def itk_slice_matrix(tag: str, width: int, height: int) -> np.ndarray | None:
    """Fixed → moving matrix (x = column, y = row) that the name of an ITK example slice
    ``BrainProtonDensitySlice<tag>.png`` states, relative to the unmoved ``...Border20`` slice; ``None``
    when the name states no transform (e.g. ``BSplined10``). For the tags of :data:`ITK_MEASURED_TAGS`
    the shipped file differs from its name and the loader uses the measured matrix instead.

    Conventions measured on the ITK files (NCC of the moved slice resampled through the matrix against
    the unmoved one, 221x257 slices): rotations are about ``(width/2, height/2)`` = (110.5, 128.5), a
    positive angle turns +x towards +y; ``Shifted13x17y``: ``x + (13, 17)`` (NCC 1.000);
    ``Rotated10``: rotation by 10° (0.9959); ``R10X13Y17``: rotation by 10° then shift (13, 17) as named
    (the shipped file is shifted by (13, 16): 0.9973 against 0.9814); ``R10X13Y17S12``: the image was *resampled* through
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
        return _about(_rotation_2d(float(m[1])), centre, (float(m[2]), float(m[3])))
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
    ground truth and is skipped (see :attr:`skipped`). ``R10X13Y17`` is not moved as its name says: for
    the shipped file ``Case.matrix`` is the measured map (``Case.truth == "measured"``, see
    :mod:`alignkit.data.groundtruth`); for another file of that name, the named transform. The T1 and
    PD ``Border20`` slices are aligned: rigid fits of one to the other (gradient-magnitude NCC, mutual
    information) stay within 0.5 px and 0.2° of the identity."""

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
        truth: dict[str, Any] = {}
        if tag in ITK_MEASURED_TAGS:
            measured = measured_truth(self.layout, name)
            if measured.matches(self.root / f"{self.prefix}Border20.png", self._files[name]):
                matrix = measured.matrix.copy()
                truth = measured.meta()
        return Case(
            name=name,
            fixed=fixed,
            moving=moving,
            kind="affine",
            matrix=matrix,
            meta=self._meta(fixed=self.root / self.fixed_file, moving=self._files[name]) | {"transform": tag} | truth,
        )


@register("multimodal/t1-pd-3d")
class T1PD3DDataset(CaseDataset):
    """One head, T1 (0.88 mm) and PD (0.86x0.86x2.4 mm) on different grids (``kind="affine"``); cases
    ``"t1<-pd"`` and ``"pd<-t1"``.

    The data README says the header affines align the two, which would make the ground truth the
    identity in world coordinates; on the shipped files it is not: resampling PD through the identity
    leaves an 8.7° tilt about the left-right axis and ~8 mm along z (22.6 mm mean error at the T1
    grid's corners). For ``chris_t1``/``chris_PD`` ``Case.matrix`` is therefore a measured rigid map
    (``Case.truth == "measured"``: two SimpleITK rigid fits, mutual information and gradient-magnitude
    correlation, agree to about 1.1 mm at the corners; see :mod:`alignkit.data.groundtruth`); for other
    files of this layout it is the identity the headers imply (given, not verified).
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
        measured = measured_truth(self.layout, "t1<-pd")
        t1_to_pd = np.eye(4)
        truth: dict[str, Any] = {}
        if measured.matches(self._files["t1"], self._files["pd"]):
            t1_to_pd = measured.matrix
            # the uncertainty is a distance at the T1 grid's corners; the inverse map moves the PD
            # grid's corners by as much (a rigid map and its inverse are isometries)
            truth = measured.meta()
        else:
            meta |= {"note": "ground truth: identity through the header affines (not verified for these files)"}
        return Case(
            name=name,
            fixed=read(self._files[fixed_id]),
            moving=read(self._files[moving_id]),
            kind="affine",
            matrix=t1_to_pd.copy() if fixed_id == "t1" else np.linalg.inv(t1_to_pd),
            meta=meta | truth,
        )


@register("multimodal/ct-mr-2d")
class CtMr2DDataset(CaseDataset):
    """Head CT ↔ MR slices (rasters, world = pixels), fixed = MR.

    ``ct_2d_true.tif`` is aligned with ``mri_2d.tif`` in pixel coordinates (``"mri<-ct_true"``: identity;
    rigid fits by gradient-magnitude NCC and by mutual information move it by at most 2.4 px, so take
    this ground truth as good to ~2 px). ``ct_2d_moving.tif`` is a displaced copy of the true CT whose
    transform is not shipped: ``"mri<-ct_moving"`` has the measured map of the moving CT onto the true
    CT (``Case.truth == "measured"``: two same-image affine fits, NCC 0.99995, a 12.2° rotation plus a shift,
    agreeing to 0.01 px; see :mod:`alignkit.data.groundtruth`). A ``ct_2d_moving.tif`` other than the
    one measured has no ground truth: that case is skipped (see :attr:`skipped`).
    """

    def _discover(self) -> None:
        assert self.root is not None
        files = {k: self.root / f for k, f in (("mri", "mri_2d.tif"), ("ct_true", "ct_2d_true.tif"),
                                               ("ct_moving", "ct_2d_moving.tif"))}
        self._files = files
        if files["mri"].is_file() and files["ct_true"].is_file():
            self.names.append("mri<-ct_true")
            if files["ct_moving"].is_file():
                if measured_truth(self.layout, "mri<-ct_moving").matches(files["ct_true"], files["ct_moving"]):
                    self.names.append("mri<-ct_moving")
                else:
                    self.skipped[files["ct_moving"].name] = ("no ground truth: not the file whose map was measured "
                                                            "(alignkit/data/groundtruth)")

    def _load(self, name: str) -> Case:
        moving_id = name.split("<-")[1]
        meta = self._meta(fixed=self._files["mri"], moving=self._files[moving_id])
        matrix = np.eye(3)
        truth: dict[str, Any] = {}
        if moving_id == "ct_moving":
            measured = measured_truth(self.layout, name)
            matrix = measured.matrix
            truth = measured.meta()
        return Case(
            name=name,
            fixed=read(self._files["mri"]),
            moving=read(self._files[moving_id]),
            kind="affine",
            matrix=np.array(matrix, dtype=np.float64),
            meta=meta | truth,
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
