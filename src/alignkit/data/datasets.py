"""Loaders for the real data sets: each folder of ``../shared/data`` becomes a sequence of :class:`Case`.

Every loader converts its data set's own convention into the one of :class:`~alignkit.data.case.Case`
(ground truth fixed → moving, world frame; raster images: x = column, y = row). The conversions that
are not obvious were checked numerically on the data (see each class and ``tests/test_data.py``).

* :func:`load_dataset` resolves a registered name (the folder names of ``../shared/data``; a sub-folder
  such as ``flow/sintel/clean`` or ``vis-nir/field`` works too) under a data root, or a user's folder
  with the same layout (``layout=NAME``, or detected when the folder is named like one).
* A :class:`CaseDataset` lists its cases when it is built (file names only) and reads a case when it
  is indexed, so a 3D data set costs nothing until a pair is asked for.
* :meth:`CaseDataset.cases` is the reproducible pair list of a benchmark: a data set's preferred pairs
  first (e.g. OASIS 01→02, 03→04, ...), then the others in an order fixed by ``seed``.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar, overload

import numpy as np
import torch

from alignkit.data.case import Case
from alignkit.errors import InputError
from alignkit.image import Image
from alignkit.spatial.grid import Grid

#: registered name -> loader class (filled by :func:`register`)
_REGISTRY: dict[str, type[CaseDataset]] = {}

_D = TypeVar("_D", bound="CaseDataset")

#: folders of ``../shared/data`` that hold data but no registration pair, and why
_NO_LOADER = {
    "flow/kitti-format": "one KITTI frame and no image pair; read its flow with alignkit.io.read_kitti_flow",
    "multimodal/ch2-atlas": "a single-subject atlas with no second image; use it as a base for alignkit.data.synthetic",
}


def register(name: str) -> Callable[[type[_D]], type[_D]]:
    """Class decorator: make a :class:`CaseDataset` subclass loadable as ``name``."""

    def decorate(cls: type[_D]) -> type[_D]:
        cls.layout = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_datasets() -> list[str]:
    """The registered data-set names (the folder names of ``../shared/data`` that have a loader)."""
    return sorted(_REGISTRY)


def default_root() -> Path:
    """Where registered names are looked up: ``$ALIGNKIT_DATA``, else ``../shared/data`` relative to the
    current directory, else ``../shared/data`` relative to the repository this file lives in."""
    env = os.environ.get("ALIGNKIT_DATA")
    if env:
        return Path(env).expanduser()
    here = Path.cwd() / ".." / "shared" / "data"
    if here.is_dir():
        return here.resolve()
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def dataset_folder(text: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """The folder ``text`` names: a path, else a folder of the data root (``root`` or
    :func:`default_root`); :class:`InputError` naming it when neither exists."""
    folder = Path(text).expanduser()
    base = Path(root).expanduser() if root is not None else default_root()
    if not folder.is_dir() and not folder.is_absolute() and (base / folder).is_dir():
        folder = base / folder
    if not folder.is_dir():
        raise InputError(f"data-set folder not found (nor under the data root {base}; set ALIGNKIT_DATA)", folder)
    return folder


# ------------------------------------------------------------------------------------------------
# base classes
# ------------------------------------------------------------------------------------------------
class CaseSelection(Sequence[Case]):
    """An ordered, lazily loaded subset of a data set (what :meth:`CaseDataset.cases` returns)."""

    def __init__(self, dataset: CaseDataset, names: list[str]) -> None:
        self.dataset = dataset
        self.names = list(names)

    def __len__(self) -> int:
        return len(self.names)

    @overload
    def __getitem__(self, index: int) -> Case: ...

    @overload
    def __getitem__(self, index: slice) -> CaseSelection: ...

    def __getitem__(self, index: int | slice) -> Case | CaseSelection:
        if isinstance(index, slice):
            return CaseSelection(self.dataset, self.names[index])
        return self.dataset[self.names[index]]

    def __iter__(self) -> Iterator[Case]:
        for name in self.names:
            yield self.dataset[name]

    def __repr__(self) -> str:
        return f"CaseSelection({self.dataset.name!r}, {len(self)} cases)"


class CaseDataset(Sequence[Case]):
    """A data set of registration cases, read lazily.

    Subclasses fill :attr:`names` in :meth:`_discover` (listing files only) and read one case in
    :meth:`_load`. ``dataset[i]`` and ``dataset["name"]`` both work; nothing is cached, so a loop
    over 3D pairs holds one pair in memory at a time.

    Attributes
    ----------
    root:
        The folder the cases are read from (``None`` for generated data sets).
    layout:
        The registered name of the loader (``"flow/middlebury"``), whatever folder it reads.
    name:
        What the data set was asked for by (``"flow/sintel/clean"``, a path, ...); ``Case.meta["dataset"]``.
    names:
        Case names in the canonical order.
    skipped:
        ``{file or case: reason}`` for data present in the folder that has no usable ground truth.
    """

    layout: ClassVar[str] = ""
    #: how many leading ``names`` :meth:`cases` always takes first, in order, before the seeded rest
    n_preferred: int = 0

    def __init__(self, root: str | os.PathLike[str] | None, *, name: str | None = None) -> None:
        self.root = None if root is None else Path(root)
        self.name = name or self.layout
        self.names: list[str] = []
        self.skipped: dict[str, str] = {}
        if self.root is not None:
            if not self.root.is_dir():
                raise InputError("data-set folder not found", self.root)
            self._discover()
            if not self.names:
                raise InputError(f"no cases found for layout {self.layout!r}", self.root)

    # -- to implement -------------------------------------------------------------------------
    def _discover(self) -> None:
        raise NotImplementedError

    def _load(self, name: str) -> Case:
        raise NotImplementedError

    # -- sequence -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    @overload
    def __getitem__(self, index: int | str) -> Case: ...

    @overload
    def __getitem__(self, index: slice) -> CaseSelection: ...

    def __getitem__(self, index: int | str | slice) -> Case | CaseSelection:
        if isinstance(index, slice):
            return CaseSelection(self, self.names[index])
        if isinstance(index, str):
            if index not in self.names:
                raise InputError(f"no case named {index!r} in {self.name}", self.root)
            name = index
        else:
            name = self.names[index]
        case = self._load(name)
        case.meta.setdefault("dataset", self.name)
        return case

    def __iter__(self) -> Iterator[Case]:
        for name in self.names:
            yield self[name]

    def cases(self, n: int | None = None, seed: int = 0) -> CaseSelection:
        """``n`` cases (all when ``None``): the :attr:`n_preferred` leading names in order, then the
        remaining names permuted by ``numpy.random.default_rng(seed)``. Same ``(n, seed)``, same list."""
        if n is not None and n < 0:
            raise InputError(f"cases: n must be >= 0, got {n}")
        head = self.names[: self.n_preferred]
        rest = self.names[self.n_preferred :]
        order = np.random.default_rng(seed).permutation(len(rest))
        chosen = head + [rest[i] for i in order]
        return CaseSelection(self, chosen if n is None else chosen[:n])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} cases, root={str(self.root)!r})"

    # -- helpers for subclasses -----------------------------------------------------------------
    def _rel(self, path: Path) -> str:
        assert self.root is not None
        rel = path.relative_to(self.root).as_posix()
        return "" if rel == "." else rel

    def _meta(self, **files: Path) -> dict[str, Any]:
        return {"dataset": self.name, "layout": self.layout, "files": {k: str(v) for k, v in files.items()}}


# ------------------------------------------------------------------------------------------------
# small readers and geometry helpers
# ------------------------------------------------------------------------------------------------
def _rglob(root: Path, pattern: str) -> list[Path]:
    """Files under ``root`` whose path ends like ``pattern`` (``PurePath.match``), sorted -- like
    ``Path.rglob`` but following symlinked folders, since a user's data folder is often a tree of links
    to the real data."""
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link cycle
            dirnames[:] = []
            continue
        seen.add(real)
        found += [Path(dirpath) / f for f in filenames if (Path(dirpath) / f).match(pattern)]
    return sorted(found)


def _read(path: Path, *, labels: bool = False, key: str | None = None) -> Image:
    from alignkit.io import read_image

    return read_image(path, labels=labels, key=key)


def _read_pillow_raster(path: Path) -> Image:
    """Rasters that :func:`alignkit.io.read_image` does not take (``.ppm``), on the raster grid."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(path) as opened:
            array = np.asarray(opened.convert("RGB") if opened.mode not in ("L", "RGB") else opened)
    except OSError as exc:
        raise InputError(f"cannot read image: {exc}", path) from exc
    image = Image.from_array(array.astype(np.float32), path=str(path))
    image.meta.update(format="raster", dtype=str(array.dtype))
    return image


def _read_mask(path: Path) -> np.ndarray:
    """``(H, W)`` bool of a black/white PNG mask (white = set)."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(path) as opened:
            return np.asarray(opened.convert("L")) > 127
    except OSError as exc:
        raise InputError(f"cannot read mask: {exc}", path) from exc


def _read_pfm(path: Path) -> np.ndarray:
    """A PFM float image ``(H, W[, 3])``, rows top to bottom (the file stores them bottom-up)."""
    with open(path, "rb") as fh:
        header = fh.readline().strip()
        if header not in (b"PF", b"Pf"):
            raise InputError("not a PFM file", path)
        width, height = (int(v) for v in fh.readline().split())
        scale = float(fh.readline())
        data = np.fromfile(fh, dtype="<f4" if scale < 0 else ">f4")
    channels = 3 if header == b"PF" else 1
    if data.size != width * height * channels:
        raise InputError(f"corrupt PFM: {data.size} values for {width}x{height}x{channels}", path)
    shape = (height, width, channels) if channels == 3 else (height, width)
    return np.flipud(data.reshape(shape)).astype(np.float32)


def _flow_case_arrays(flow_hw2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(H, W, 2)`` (x, y) flow with NaN unknown -> ``(2, H, W)`` float32 (0 where unknown), valid."""
    valid = np.isfinite(flow_hw2).all(axis=-1)
    flow = np.where(valid[..., None], flow_hw2, 0.0).astype(np.float32)
    return np.ascontiguousarray(np.moveaxis(flow, -1, 0)), valid


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
            for p in _rglob(self.root, "t1weighted_brain.nii.gz")
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
        fixed_labels = _read(fd / "labels.all.nii.gz", labels=True)
        moving_labels = _read(md / "labels.all.nii.gz", labels=True)
        common = np.intersect1d(np.unique(fixed_labels.data.numpy()), np.unique(moving_labels.data.numpy()))
        return Case(
            name=name,
            fixed=_read(fd / "t1weighted_brain.nii.gz"),
            moving=_read(md / "t1weighted_brain.nii.gz"),
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
            fixed=_read(vol[fixed_id]),
            moving=_read(vol[moving_id]),
            kind="deformable",
            fixed_labels=_read(seg[fixed_id], labels=True),
            moving_labels=_read(seg[moving_id], labels=True),
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
            blobs = _read(self.root / f"{sid}sliceLM.nii.gz", labels=True)
            points.append(_world_centroids(blobs, [1, 2]))
        keep = np.isfinite(points[0]).all(1) & np.isfinite(points[1]).all(1)
        return Case(
            name=name,
            fixed=_read(self.slices[fixed_id]),
            moving=_read(self.slices[moving_id]),
            kind="deformable",
            fixed_points=points[0][keep],
            moving_points=points[1][keep],
            meta=self._meta(fixed=self.slices[fixed_id], moving=self.slices[moving_id]),
        )

    def atlas(self) -> tuple[Image, Image]:
        """``(image, labels)`` of ``atlas_norm_2d.npz`` (160x192 raster grid)."""
        assert self.root is not None
        path = self.root / "atlas_norm_2d.npz"
        return _read(path, key="vol"), _read(path, labels=True, key="seg")


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
        fixed = _read(self.root / self.fixed_file)
        moving = _read(self._files[name])
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
            fixed=_read(self._files[fixed_id]),
            moving=_read(self._files[moving_id]),
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
    fixed, moving = _read(Path(fixed_path)).grey(), _read(Path(moving_path)).grey()
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
            fixed=_read(self._files["mri"]),
            moving=_read(self._files[moving_id]),
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
        for us in _rglob(self.root, "us_images/*.nii*"):
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
        fixed_channels = _read(paths["us_labels"], labels=True)
        moving_channels = _read(paths["mr_labels"], labels=True)
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
            fixed=_read(paths["us_images"]),
            moving=_read(paths["mr_images"]),
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


# ------------------------------------------------------------------------------------------------
# optical flow and stereo
# ------------------------------------------------------------------------------------------------
@register("flow/middlebury")
class MiddleburyDataset(CaseDataset):
    """Middlebury optical flow with public ground truth: ``<seq>/frame10.png`` (fixed) →
    ``frame11.png`` (moving), ``flow10.flo`` as ``Case.flow``; unknown flow (> 1e9) is ``valid=False``.
    Checked: warping frame11 by the flow gives a mean |error| of 1.4-4.3 grey levels against 5.7-17.8
    without warping (and 7.8-20.8 with the flow negated)."""

    def _discover(self) -> None:
        assert self.root is not None
        dirs = [p.parent for p in _rglob(self.root, "flow10.flo")
                if (p.parent / "frame10.png").is_file() and (p.parent / "frame11.png").is_file()]
        self.names = [self._rel(d) or d.name for d in dirs]
        self._dirs = dict(zip(self.names, dirs))

    def _load(self, name: str) -> Case:
        from alignkit.io import read_flo

        d = self._dirs[name]
        flow, valid = _flow_case_arrays(read_flo(d / "flow10.flo"))
        return Case(name=name, fixed=_read(d / "frame10.png"), moving=_read(d / "frame11.png"), kind="flow",
                    flow=flow, valid=valid, meta=self._meta(fixed=d / "frame10.png", moving=d / "frame11.png"))


@register("flow/sintel")
class SintelDataset(CaseDataset):
    """MPI-Sintel frames: ``<pass>/<seq>/frame_NNNN.png`` → ``frame_NNNN+1.png`` with ``gt/frame_NNNN.flo``,
    ``gt/occlusions/frame_NNNN.png`` (white = occluded → ``Case.occluded``) and ``gt/invalid/...``
    (white = invalid → ``valid=False``). Names ``"clean/easy/frame_0002"``; ``flow/sintel/clean``
    selects one pass."""

    def _discover(self) -> None:
        assert self.root is not None
        self._items: dict[str, tuple[Path, int]] = {}
        for flo in _rglob(self.root, "gt/frame_*.flo"):
            seq = flo.parent.parent
            index = int(flo.stem.split("_")[1])
            if (seq / f"frame_{index:04d}.png").is_file() and (seq / f"frame_{index + 1:04d}.png").is_file():
                rel = self._rel(seq)
                self._items[f"{rel}/{flo.stem}" if rel else flo.stem] = (seq, index)
        self.names = list(self._items)

    def _load(self, name: str) -> Case:
        from alignkit.io import read_flo

        seq, index = self._items[name]
        stem = f"frame_{index:04d}"
        flow, valid = _flow_case_arrays(read_flo(seq / "gt" / f"{stem}.flo"))
        occluded = None
        if (seq / "gt" / "occlusions" / f"{stem}.png").is_file():
            occluded = _read_mask(seq / "gt" / "occlusions" / f"{stem}.png")
        if (seq / "gt" / "invalid" / f"{stem}.png").is_file():
            valid &= ~_read_mask(seq / "gt" / "invalid" / f"{stem}.png")
        return Case(
            name=name,
            fixed=_read(seq / f"{stem}.png"),
            moving=_read(seq / f"frame_{index + 1:04d}.png"),
            kind="flow",
            flow=flow,
            valid=valid,
            occluded=occluded,
            meta=self._meta(fixed=seq / f"{stem}.png", moving=seq / f"frame_{index + 1:04d}.png"),
        )


@register("flow/mmflow-crops")
class MmflowCropsDataset(CaseDataset):
    """mmflow's 50x50 test crops. ``<id>-img_0.png``/``<id>-img_1.png`` with ``<id>-flow_01.flo`` and
    ``<id>-occ_01.png`` give case ``"<id>_01"`` (and the backward ``"<id>_10"``); FlyingChairs-style
    ``<id>_img1.ppm``/``<id>_img2.ppm``/``<id>_flow.flo`` give case ``"<id>"``."""

    def _discover(self) -> None:
        assert self.root is not None
        self._items: dict[str, tuple[Path, Path, Path, Path | None]] = {}
        for flo in sorted(self.root.glob("*-flow_*.flo")):
            cid, direction = flo.stem.rsplit("-flow_", 1)
            if len(direction) != 2:
                continue
            first = self.root / f"{cid}-img_{direction[0]}.png"
            second = self.root / f"{cid}-img_{direction[1]}.png"
            occ = self.root / f"{cid}-occ_{direction}.png"
            if first.is_file() and second.is_file():
                self._items[f"{cid}_{direction}"] = (first, second, flo, occ if occ.is_file() else None)
        for flo in sorted(self.root.glob("*_flow.flo")):
            cid = flo.name[: -len("_flow.flo")]
            firsts, seconds = (sorted(self.root.glob(f"{cid}_img{k}.*")) for k in (1, 2))
            if firsts and seconds:
                self._items[cid] = (firsts[0], seconds[0], flo, None)
        self.names = list(self._items)

    @staticmethod
    def _image(path: Path) -> Image:
        return _read_pillow_raster(path) if path.suffix.lower() in (".ppm", ".pgm", ".pnm") else _read(path)

    def _load(self, name: str) -> Case:
        from alignkit.io import read_flo

        first, second, flo, occ = self._items[name]
        flow, valid = _flow_case_arrays(read_flo(flo))
        return Case(name=name, fixed=self._image(first), moving=self._image(second), kind="flow", flow=flow,
                    valid=valid, occluded=None if occ is None else _read_mask(occ),
                    meta=self._meta(fixed=first, moving=second))


@register("stereo")
class StereoDataset(CaseDataset):
    """Rectified stereo pairs as 1D registration: left = fixed, right = moving. A disparity ``d`` means
    ``left(x, y) = right(x - d, y)``, so ``Case.flow = (-d, 0)`` and unknown disparities (inf, or 0 in
    an 8-bit PNG) are ``valid=False``; ``kind="stereo"``. Checked: warping the right image by the flow
    gives a mean |error| of 7.3 (motorcycle) / 7.8 (aloe) grey levels, against 45 / 36 with ``+d``
    and 37 / 33 unwarped; aloe's 8-bit ``aloeGT.png`` is in pixels (scale 1: 7.8 against 30-33 at
    scales 0.5 and 2).

    Per folder: ``*_left.*``/``*_right.*``/``*_disp.{npz,pfm,png}`` (scikit-image / Middlebury 2014
    style) or ``*L.*``/``*R.*``/``*GT.png`` (Middlebury 2006 style).
    """

    def _discover(self) -> None:
        assert self.root is not None
        self._items: dict[str, tuple[Path, Path, Path]] = {}
        dirs = sorted({p.parent for p in _rglob(self.root, "*")})
        for d in dirs:
            files = sorted(p for p in d.iterdir() if p.is_file())
            found = self._triplet(files)
            if found is not None:
                self._items[self._rel(d) or d.name] = found
        self.names = list(self._items)

    @staticmethod
    def _triplet(files: list[Path]) -> tuple[Path, Path, Path] | None:
        images = [p for p in files if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".ppm", ".tif")]
        for left_pat, right_pat, disp_pat in ((r"(.*)_left", r"{}_right", r"{}_disp"), (r"(.*)L", r"{}R", r"{}GT")):
            for left in images:
                m = re.fullmatch(left_pat, left.stem)
                if not m:
                    continue
                right = [p for p in images if p.stem == right_pat.format(m[1])]
                disp = [p for p in files if p.stem == disp_pat.format(m[1])
                        and p.suffix.lower() in (".npz", ".npy", ".pfm", ".png")]
                if right and disp:
                    return left, right[0], disp[0]
        return None

    @staticmethod
    def _disparity(path: Path) -> tuple[np.ndarray, np.ndarray]:
        suffix = path.suffix.lower()
        if suffix in (".npz", ".npy"):
            loaded = np.load(path)
            disp = np.asarray(loaded[loaded.files[0]] if suffix == ".npz" else loaded, dtype=np.float32)
            valid = np.isfinite(disp)
        elif suffix == ".pfm":
            disp = _read_pfm(path)
            valid = np.isfinite(disp)
        else:  # 8-bit PNG: 0 = unknown
            from PIL import Image as PILImage

            with PILImage.open(path) as opened:
                disp = np.asarray(opened.convert("L") if opened.mode not in ("L", "I", "I;16") else opened)
            disp = disp.astype(np.float32)
            valid = disp > 0
        return np.where(valid, disp, 0.0).astype(np.float32), valid

    def _load(self, name: str) -> Case:
        left, right, disp_path = self._items[name]
        disp, valid = self._disparity(disp_path)
        fixed, moving = _read(left), _read(right)
        if disp.shape != fixed.shape:
            raise InputError(f"disparity {disp.shape} does not match the left image {fixed.shape}", disp_path)
        flow = np.stack([-disp, np.zeros_like(disp)]).astype(np.float32)
        return Case(name=name, fixed=fixed, moving=moving, kind="stereo", flow=flow, valid=valid,
                    meta=self._meta(fixed=left, moving=right, disparity=disp_path))


# ------------------------------------------------------------------------------------------------
# photographs: homographies and VIS-NIR affines
# ------------------------------------------------------------------------------------------------
@register("homography/homogr")
class HomogrDataset(CaseDataset):
    """CMP homogr planar pairs: ``<n>A.*``, ``<n>B.*``, ``<n>_model.txt`` (H: B → A, pixels) and
    ``<n>_vpts.mat`` (manual correspondences, A first).

    Fixed = image A, moving = image B (A lies mostly inside B: 80-96 % of A's pixels map into B for
    the zoom pairs), so ``Case.matrix = H⁻¹`` (A → B, normalised so ``[2, 2] = 1``);
    ``fixed_points``/``moving_points`` are the validation points of A and B. Checked: the points
    satisfy ``H·B = A`` to 1e-12 px; warping B by H onto A gives gradient-magnitude NCC 0.27-0.82 vs a
    ±1 px offset that changes it by < 0.03, so the points are taken as given (0-based pixel centres,
    the MAGSAC/OpenCV convention).
    """

    def _discover(self) -> None:
        assert self.root is not None
        self._items: dict[str, tuple[Path, Path, Path, Path | None]] = {}
        for model in sorted(self.root.glob("*_model.txt")):
            n = model.name[: -len("_model.txt")]
            a = sorted(p for p in self.root.glob(f"{n}A.*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
            b = sorted(p for p in self.root.glob(f"{n}B.*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
            vpts = self.root / f"{n}_vpts.mat"
            if a and b:
                self._items[n] = (a[0], b[0], model, vpts if vpts.is_file() else None)
        self.names = list(self._items)

    @staticmethod
    def _points(path: Path) -> tuple[np.ndarray, np.ndarray]:
        from scipy.io import loadmat

        try:
            validation = loadmat(path)["validation"][0, 0]
            pts = np.asarray(validation["pts"], dtype=np.float64)
        except (KeyError, ValueError, IndexError) as exc:
            raise InputError(f"no validation.pts in {path.name}", path) from exc
        return (pts[:2] / pts[2]).T, (pts[3:5] / pts[5]).T

    def _load(self, name: str) -> Case:
        a, b, model, vpts = self._items[name]
        try:
            h_b_to_a = np.loadtxt(model, dtype=np.float64).reshape(3, 3)
        except ValueError as exc:
            raise InputError(f"not a 3x3 matrix: {exc}", model) from exc
        matrix = np.linalg.inv(h_b_to_a)
        matrix /= matrix[2, 2]
        fixed_points = moving_points = None
        if vpts is not None:
            fixed_points, moving_points = self._points(vpts)
        return Case(name=name, fixed=_read(a), moving=_read(b), kind="homography", matrix=matrix,
                    fixed_points=fixed_points, moving_points=moving_points,
                    meta=self._meta(fixed=a, moving=b, model=model) | {"model_direction": "file H maps B to A"})


@register("vis-nir")
class VisNirDataset(CaseDataset):
    """VIS-NIR registration set: per subset (field, forest, indoor, mountain, ...) ``xxxx_nir.jpg``
    (reference → fixed), ``xxxx_rgb.jpg`` (to register → moving) and ``xxxx_nir.npy``, a 2x3 OpenCV
    affine ``M`` in pixels. ``M`` maps *RGB* pixels to *NIR* pixels (``cv2.warpAffine(rgb, M)`` lines up
    with the NIR image: gradient-magnitude NCC 0.60 on average over 20 pairs, against 0.05 for ``M⁻¹``
    and 0.08 for no warp), so ``Case.matrix = M⁻¹`` (fixed NIR → moving RGB). ``country`` has no
    ground truth and yields no case.
    """

    def _discover(self) -> None:
        assert self.root is not None
        self._items: dict[str, tuple[Path, Path, Path]] = {}
        for npy in _rglob(self.root, "*_nir.npy"):
            stem = npy.name[: -len("_nir.npy")]
            nir, rgb = npy.parent / f"{stem}_nir.jpg", npy.parent / f"{stem}_rgb.jpg"
            if nir.is_file() and rgb.is_file():
                rel = self._rel(npy.parent)
                self._items[f"{rel}/{stem}" if rel else stem] = (nir, rgb, npy)
        self.names = list(self._items)

    def _load(self, name: str) -> Case:
        nir, rgb, npy = self._items[name]
        affine = np.asarray(np.load(npy), dtype=np.float64)
        if affine.shape != (2, 3):
            raise InputError(f"expected a 2x3 affine, got {affine.shape}", npy)
        rgb_to_nir = np.vstack([affine, [0.0, 0.0, 1.0]])
        return Case(name=name, fixed=_read(nir), moving=_read(rgb), kind="affine", matrix=np.linalg.inv(rgb_to_nir),
                    meta=self._meta(fixed=nir, moving=rgb, affine=npy))


# ------------------------------------------------------------------------------------------------
# lookup
# ------------------------------------------------------------------------------------------------
def _split_name(name: str) -> tuple[str, str] | None:
    """``"flow/sintel/clean"`` -> ``("flow/sintel", "clean")``: the longest registered prefix and the
    sub-folder under it; ``None`` when no registered name is a prefix."""
    parts = [p for p in name.replace("\\", "/").strip("/").split("/") if p]
    for k in range(len(parts), 0, -1):
        head = "/".join(parts[:k])
        if head in _REGISTRY:
            return head, "/".join(parts[k:])
    return None


def _detect_layout(path: Path) -> str | None:
    """The registered layout a folder belongs to, from its path: a registered name appearing as
    consecutive path components (``.../flow/sintel/clean`` -> ``flow/sintel``) or a component named
    like a registered name's last part (``.../my/middlebury`` -> ``flow/middlebury``). The match
    deepest in the path wins (``.../stereo/middlebury`` is Middlebury flow), then a full-name match."""
    parts = [p.lower() for p in Path(os.path.abspath(path)).parts]  # the name as given, links unresolved
    best: tuple[int, int, int] | None = None
    chosen: str | None = None
    for name in _REGISTRY:
        want = name.lower().split("/")
        for end in range(len(parts)):
            full = end + 1 >= len(want) and parts[end + 1 - len(want) : end + 1] == want
            if full or parts[end] == want[-1]:
                score = (end, int(full), len(want))
                if best is None or score > best:
                    best, chosen = score, name
    return chosen


def load_dataset(
    name_or_path: str | os.PathLike[str], *, layout: str | None = None, root: str | os.PathLike[str] | None = None
) -> CaseDataset:
    """A data set by registered name (resolved under ``root``, default :func:`default_root`) or by
    folder (``layout=`` a registered name, or detected from the folder's name).

    Raises :class:`InputError` (one line naming the path) for an unknown name, a missing folder or a
    folder whose layout cannot be told.
    """
    text = os.fspath(name_or_path)
    base = Path(root).expanduser() if root is not None else default_root()
    if layout is not None:
        split = _split_name(layout)
        if split is None:
            raise InputError(f"unknown layout {layout!r}; known: {', '.join(available_datasets())}")
        return _REGISTRY[split[0]](dataset_folder(text, base), name=text)
    split = _split_name(text)
    if split is not None and not Path(text).is_absolute():
        folder = base / text
        if not folder.is_dir():
            raise InputError(f"data-set folder not found (data root {base}; set ALIGNKIT_DATA)", folder)
        return _REGISTRY[split[0]](folder, name=text.strip("/"))
    if text.strip("/") in _NO_LOADER:
        raise InputError(f"no loader: {_NO_LOADER[text.strip('/')]}", base / text)
    folder = Path(text).expanduser()
    if folder.is_dir():
        detected = _detect_layout(folder)
        if detected is None:
            raise InputError(f"cannot tell the layout of this folder; pass layout= one of {', '.join(available_datasets())}",
                             folder)
        return _REGISTRY[detected](folder, name=text)
    if os.sep in text or "/" in text or text.startswith("."):
        raise InputError("data-set folder not found", folder)
    raise InputError(f"unknown data set {text!r}; known: {', '.join(available_datasets())}", base)
