"""Optical-flow and stereo loaders: Middlebury, MPI-Sintel, the mmflow crops and rectified stereo pairs
(disparity as a 1D flow). See :mod:`alignkit.data.datasets` for lookup by name.

Every loader converts its files into ``Case.flow``'s one convention (:mod:`alignkit.spatial`):
``(2, H, W)`` pixels of the fixed frame, array-axis order ``(dy, dx)``, ``fixed(p) ≈ moving(p + flow(p))``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from alignkit.data.base import CaseDataset, read, register, rglob
from alignkit.data.case import Case
from alignkit.errors import InputError
from alignkit.image import Image
from alignkit.io.disparity import read_pfm
from alignkit.spatial import flow_from_xy


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


def _flow_case_arrays(flow_hw2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A ``.flo`` file's ``(H, W, 2)`` (x, y) flow with NaN unknown -> ``Case.flow`` ``(2, H, W)``
    float32 in array-axis order (``(dy, dx)``, :func:`alignkit.spatial.flow_from_xy`; 0 where
    unknown) and ``valid``."""
    valid = np.isfinite(flow_hw2).all(axis=-1)
    flow = np.where(valid[..., None], flow_hw2, 0.0).astype(np.float32)
    return flow_from_xy(flow), valid


# ------------------------------------------------------------------------------------------------
# optical flow and stereo
# ------------------------------------------------------------------------------------------------
@register("flow/middlebury")
class MiddleburyDataset(CaseDataset):
    """Middlebury optical flow with public ground truth: ``<seq>/frame10.png`` (fixed) →
    ``frame11.png`` (moving), ``flow10.flo`` as ``Case.flow`` (converted from the file's (x, y) layout
    to array-axis order); unknown flow (> 1e9) is ``valid=False``.
    Checked: warping frame11 by the flow gives a mean |error| of 1.4-4.3 grey levels against 5.7-17.8
    without warping (and 7.8-20.8 with the flow negated)."""

    def _discover(self) -> None:
        assert self.root is not None
        dirs = [p.parent for p in rglob(self.root, "flow10.flo")
                if (p.parent / "frame10.png").is_file() and (p.parent / "frame11.png").is_file()]
        self.names = [self._rel(d) or d.name for d in dirs]
        self._dirs = dict(zip(self.names, dirs))

    def _load(self, name: str) -> Case:
        from alignkit.io import read_flo

        d = self._dirs[name]
        flow, valid = _flow_case_arrays(read_flo(d / "flow10.flo"))
        return Case(name=name, fixed=read(d / "frame10.png"), moving=read(d / "frame11.png"), kind="flow",
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
        for flo in rglob(self.root, "gt/frame_*.flo"):
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
            fixed=read(seq / f"{stem}.png"),
            moving=read(seq / f"frame_{index + 1:04d}.png"),
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
        return _read_pillow_raster(path) if path.suffix.lower() in (".ppm", ".pgm", ".pnm") else read(path)

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
    ``left(x, y) = right(x - d, y)``, so ``Case.flow = (0, -d)`` (array-axis order: no row motion,
    ``-d`` columns; see :mod:`alignkit.spatial`) and unknown disparities (inf, or 0 in
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
        dirs = sorted({p.parent for p in rglob(self.root, "*")})
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
            disp = read_pfm(path)
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
        fixed, moving = read(left), read(right)
        if disp.shape != fixed.shape:
            raise InputError(f"disparity {disp.shape} does not match the left image {fixed.shape}", disp_path)
        flow = np.stack([np.zeros_like(disp), -disp]).astype(np.float32)  # (rows, columns)
        return Case(name=name, fixed=fixed, moving=moving, kind="stereo", flow=flow, valid=valid,
                    meta=self._meta(fixed=left, moving=right, disparity=disp_path))
