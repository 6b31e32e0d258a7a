"""Brain MRI loaders: OASIS-TRT-20 (3D, native space), the affinely aligned aseg pair (3D) and the
ANTs 2D slices with landmark blobs. See :mod:`alignkit.data.datasets` for lookup by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alignkit.data.base import CaseDataset, read, register, rglob
from alignkit.data.case import Case
from alignkit.image import Image


def _world_centroids(labels: Image, ids: Sequence[int]) -> np.ndarray:
    """World centroid of each label id of an integer label image -> ``(len(ids), ndim)`` float64
    (NaN rows for labels that are absent)."""
    data = labels.data[0].numpy()
    out = np.full((len(ids), labels.ndim), np.nan)
    affine = labels.grid.world_from_voxel.numpy()
    for row, label in enumerate(ids):
        voxels = np.argwhere(data == label)
        if len(voxels):
            centre = voxels.mean(axis=0)
            out[row] = affine[: labels.ndim, : labels.ndim] @ centre + affine[: labels.ndim, labels.ndim]
    return out


# ------------------------------------------------------------------------------------------------
# 3D brains
# ------------------------------------------------------------------------------------------------
@register("brain3d-oasis-trt20")
class OasisTRT20Dataset(CaseDataset):
    """Mindboggle OASIS-TRT-20: inter-subject T1 pairs with manual DKT + subcortical labels.

    Cases are named ``"subjectB<-subjectA"`` (A moving, B fixed); 01→02, 03→04, ... come first, then
    every other ordered pair. Images are in native space (not pre-aligned): a method needs an affine
    stage first. ``label_ids`` are the non-zero labels present in both subjects.
    """

    def _discover(self) -> None:
        assert self.root is not None
        subjects = sorted(
            self._rel(p.parent) or p.parent.name
            for p in rglob(self.root, "t1weighted_brain.nii.gz")
            if (p.parent / "labels.all.nii.gz").is_file()
        )
        self._subjects = subjects
        consecutive = [(subjects[i + 1], subjects[i]) for i in range(0, len(subjects) - 1, 2)]
        others = [(f, m) for f in subjects for m in subjects if f != m and (f, m) not in consecutive]
        self.names = [f"{f}<-{m}" for f, m in consecutive + others]
        self.n_preferred = len(consecutive)

    def _dir(self, subject: str) -> Path:
        assert self.root is not None
        return self.root / subject if (self.root / subject).is_dir() else self.root

    def _load(self, name: str) -> Case:
        fixed_id, moving_id = name.split("<-")
        fd, md = self._dir(fixed_id), self._dir(moving_id)
        fixed_labels = read(fd / "labels.all.nii.gz", labels=True)
        moving_labels = read(md / "labels.all.nii.gz", labels=True)
        common = np.intersect1d(np.unique(fixed_labels.data.numpy()), np.unique(moving_labels.data.numpy()))
        return Case(
            name=name,
            fixed=read(fd / "t1weighted_brain.nii.gz"),
            moving=read(md / "t1weighted_brain.nii.gz"),
            kind="deformable",
            fixed_labels=fixed_labels,
            moving_labels=moving_labels,
            label_ids=[int(v) for v in common if v != 0],
            meta=self._meta(fixed=fd / "t1weighted_brain.nii.gz", moving=md / "t1weighted_brain.nii.gz")
            | {"note": "native space: needs an affine stage before deformable registration"},
        )


@register("brain3d-aseg-pair")
class AsegPairDataset(CaseDataset):
    """Two subjects already affinely aligned to one 160x192x224 grid (``<id>_vol.npz``,
    ``<id>_seg.npz``); ``labels.npz`` lists the 30 aseg labels scored (``Case.label_ids``).
    Cases ``"a<-b"`` for both orders of each pair of subjects."""

    def _discover(self) -> None:
        assert self.root is not None
        ids = sorted(p.name[: -len("_vol.npz")] for p in self.root.glob("*_vol.npz"))
        self._ids = [i for i in ids if (self.root / f"{i}_seg.npz").is_file()]
        self.names = [f"{f}<-{m}" for f in self._ids for m in self._ids if f != m]

    def _label_ids(self) -> list[int] | None:
        assert self.root is not None
        path = self.root / "labels.npz"
        if not path.is_file():
            return None
        with np.load(path) as npz:
            return [int(v) for v in np.asarray(npz[npz.files[0]]).ravel()]

    def _load(self, name: str) -> Case:
        assert self.root is not None
        fixed_id, moving_id = name.split("<-")
        vol = {i: self.root / f"{i}_vol.npz" for i in (fixed_id, moving_id)}
        seg = {i: self.root / f"{i}_seg.npz" for i in (fixed_id, moving_id)}
        return Case(
            name=name,
            fixed=read(vol[fixed_id]),
            moving=read(vol[moving_id]),
            kind="deformable",
            fixed_labels=read(seg[fixed_id], labels=True),
            moving_labels=read(seg[moving_id], labels=True),
            label_ids=self._label_ids(),
            meta=self._meta(fixed=vol[fixed_id], moving=vol[moving_id]),
        )


# ------------------------------------------------------------------------------------------------
# 2D brains
# ------------------------------------------------------------------------------------------------
@register("brain2d")
class Brain2DDataset(CaseDataset):
    """ANTs r16/r27/.../r85 brain slices (256x256 JPEG rasters).

    The slices that have a landmark file ``rNNsliceLM.nii.gz`` (two blobs, labels 1 and 2) form the
    cases ``"r16<-r85"`` and ``"r85<-r16"``: ``fixed_points``/``moving_points`` are the blob
    centroids in world coordinates. The NIfTI blobs are on an ITK-written grid whose world (x, y) is
    (column, row) of the JPEG -- checked: the centroid of blob 1 of r16 is at voxel (i=88.98,
    j=137.58) in the NIfTI and at (row 137.58, column 88.98) in ``r16sliceLM.jpg``. Slices without
    landmarks are not paired (no ground truth). :meth:`atlas` gives the 2D atlas (``vol`` + ``seg``)
    of ``atlas_norm_2d.npz``, e.g. as a base for :mod:`alignkit.data.synthetic`.
    """

    def _discover(self) -> None:
        assert self.root is not None
        slices = {p.name[: -len("slice.jpg")]: p for p in sorted(self.root.glob("*slice.jpg"))}
        marked = [s for s in slices if (self.root / f"{s}sliceLM.nii.gz").is_file()]
        self.slices = slices
        self.names = [f"{f}<-{m}" for f in marked for m in marked if f != m]
        for s in slices:
            if s not in marked:
                self.skipped[f"{s}slice.jpg"] = "no landmark file: not paired"

    def _load(self, name: str) -> Case:
        assert self.root is not None
        fixed_id, moving_id = name.split("<-")
        points = []
        for sid in (fixed_id, moving_id):
            blobs = read(self.root / f"{sid}sliceLM.nii.gz", labels=True)
            points.append(_world_centroids(blobs, [1, 2]))
        keep = np.isfinite(points[0]).all(1) & np.isfinite(points[1]).all(1)
        return Case(
            name=name,
            fixed=read(self.slices[fixed_id]),
            moving=read(self.slices[moving_id]),
            kind="deformable",
            fixed_points=points[0][keep],
            moving_points=points[1][keep],
            meta=self._meta(fixed=self.slices[fixed_id], moving=self.slices[moving_id]),
        )

    def atlas(self) -> tuple[Image, Image]:
        """``(image, labels)`` of ``atlas_norm_2d.npz`` (160x192 raster grid)."""
        assert self.root is not None
        path = self.root / "atlas_norm_2d.npz"
        return read(path, key="vol"), read(path, labels=True, key="seg")
