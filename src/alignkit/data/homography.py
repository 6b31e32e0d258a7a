"""Photograph-pair loaders with a matrix ground truth: the CMP homogr planar pairs (homographies) and
the VIS-NIR scenes (affines). See :mod:`alignkit.data.datasets` for lookup by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alignkit.data.base import CaseDataset, read, register, rglob
from alignkit.data.case import Case
from alignkit.errors import InputError


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
        return Case(name=name, fixed=read(a), moving=read(b), kind="homography", matrix=matrix,
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
        for npy in rglob(self.root, "*_nir.npy"):
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
        return Case(name=name, fixed=read(nir), moving=read(rgb), kind="affine", matrix=np.linalg.inv(rgb_to_nir),
                    meta=self._meta(fixed=nir, moving=rgb, affine=npy))
