"""Read and write images: NIfTI, ITK formats (MetaImage, NRRD), rasters (PNG/JPEG/TIFF), numpy.

Conventions (see :mod:`alignkit.spatial`):

* The returned :class:`~alignkit.image.Image` has ``data (C, *spatial)`` and a grid whose
  ``world_from_voxel`` maps *array-axis* voxel indices to **LPS** world coordinates.
* **NIfTI** (nibabel): nibabel's affine maps array indices ``(i, j, k)`` to RAS; the reader turns it
  into LPS with ``diag(-1, -1, 1, 1) @ affine`` and the writer undoes it. A 2D NIfTI (or a 3D one
  with a single slice) becomes a 2D image on the ``(x, y)`` part of the LPS affine. A 4th dimension
  (or the 5th of an ITK vector image ``(X, Y, Z, 1, C)``) becomes channels.
* **ITK formats** (``.mha/.mhd/.nrrd/.nhdr``, SimpleITK): arrays are put in ITK index order
  ``(i, j[, k])`` so ``world_from_voxel = [direction @ diag(spacing) | origin]`` (already LPS).
  A 2D ITK image is therefore stored ``(x, y)``, whereas a raster is ``(row, col)``; both grids place
  the same pixel at the same world point.
* **Rasters** (Pillow): ``(rows, cols)`` on :meth:`Grid.raster_2d` (world x = column, y = row, as ITK
  reads PNGs). Grey gives one channel, RGB three; RGBA/LA drop alpha; palette images become RGB.
  16-bit PNGs keep their 16-bit values (16-bit colour PNGs need OpenCV). Multi-page TIFFs are refused.
* **numpy** (``.npy/.npz``): 2D arrays on the raster grid, 3D on the identity grid (spacing 1);
  ``.npz`` uses ``key=`` or the first of ``vol_data, vol, seg, arr_0`` or its only array, and a
  ``world_from_voxel`` entry (as :func:`write_image` stores it) when present.

``labels=True`` returns ``int64`` data and refuses non-integer values; otherwise data are
``float32``. ``Image.meta`` keeps ``format``, the original ``dtype`` and (NIfTI) the ``nifti_header``
so :func:`write_image` can round-trip the file. Every failure raises :class:`InputError` with one
line ``"PATH: problem"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignkit.errors import InputError
from alignkit.image import Image
from alignkit.io.atomic import atomic_path, full_suffix
from alignkit.spatial.grid import Grid

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
NUMPY_SUFFIXES = (".npy", ".npz")
NPZ_KEYS = ("vol_data", "vol", "seg", "arr_0")

#: LPS <-> RAS flip (its own inverse), 3D homogeneous.
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

PathLike = str | os.PathLike[str]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _import_sitk(path: PathLike) -> Any:
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise InputError("reading/writing ITK formats needs SimpleITK: pip install alignkit[itk]", path) from exc
    return sitk


# ------------------------------------------------------------------------------------------------
# affine helpers (shared with alignkit.io.itk)
# ------------------------------------------------------------------------------------------------
def lps_from_ras_affine(affine_ras: np.ndarray, ndim: int) -> np.ndarray:
    """nibabel's 4x4 RAS ``world_from_voxel`` -> LPS ``(ndim+1, ndim+1)`` (2D keeps the x, y part)."""
    lps = RAS_FROM_LPS @ np.asarray(affine_ras, dtype=np.float64)
    if ndim == 3:
        return lps
    out = np.eye(3)
    out[:2, :2] = lps[:2, :2]
    out[:2, 2] = lps[:2, 3]
    return out


def ras_affine_from_grid(grid: Grid) -> np.ndarray:
    """A grid's LPS ``world_from_voxel`` -> the 4x4 RAS affine of a NIfTI header (2D grids get z = k)."""
    lps = grid.world_from_voxel.numpy()
    if grid.ndim == 2:
        full = np.eye(4)
        full[:2, :2] = lps[:2, :2]
        full[:2, 3] = lps[:2, 2]
        lps = full
    return RAS_FROM_LPS @ lps


def _check_shape(shape: tuple[int, ...], path: PathLike) -> None:
    if len(shape) not in (2, 3):
        raise InputError(f"expected a 2D or 3D image, got spatial shape {shape}", path)
    if min(shape) < 1:
        raise InputError(f"image has zero size {shape}", path)


def _finish(array: np.ndarray, grid: Grid, path: PathLike, labels: bool, meta: dict[str, Any]) -> Image:
    """``array (C, *spatial)`` -> Image with float32 or (labels) int64 data."""
    if array.size == 0:
        raise InputError(f"image has zero size {tuple(array.shape)}", path)
    meta.setdefault("dtype", str(array.dtype))
    if labels:
        if array.dtype.kind in "iub":
            data = torch.from_numpy(array.astype(np.int64))
        elif array.dtype.kind == "f":
            if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
                raise InputError("label image holds non-integer values", path)
            data = torch.from_numpy(array.astype(np.int64))
        else:
            raise InputError(f"label image has unsupported dtype {array.dtype}", path)
    else:
        if array.dtype.kind not in "iubf":
            raise InputError(f"image has unsupported dtype {array.dtype}", path)
        data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return Image(data, grid, path=str(path), meta=meta)


# ------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------
def _read_nifti(path: PathLike, labels: bool) -> Image:
    import nibabel as nib

    try:
        img: Any = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"cannot read NIfTI: {_one_line(exc)}", path) from exc
    return image_from_nibabel(img, path=path, labels=labels)


def image_from_nibabel(img: Any, *, path: PathLike = "<nibabel image>", labels: bool = False) -> Image:
    """An in-memory nibabel NIfTI image (e.g. from nilearn) as an :class:`Image` (RAS -> LPS)."""
    try:
        header = img.header
        affine = np.asarray(img.affine, dtype=np.float64)
        array = np.asanyarray(img.dataobj) if labels else np.asarray(img.get_fdata(dtype=np.float32))
        raw_dtype = header.get_data_dtype()
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"cannot read NIfTI: {_one_line(exc)}", path) from exc
    shape = array.shape
    if len(shape) == 5 and shape[3] == 1:  # ITK vector image (X, Y, Z, 1, C)
        array = array[:, :, :, 0, :]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise InputError(f"expected a 2D or 3D image (optionally with channels), got shape {shape}", path)
    if min(array.shape) < 1:
        raise InputError(f"image has zero size {shape}", path)
    ndim = 2 if array.shape[2] == 1 else 3
    array = array[:, :, 0, :] if ndim == 2 else array
    lps = lps_from_ras_affine(affine, ndim)
    if abs(np.linalg.det(lps[:ndim, :ndim])) < 1e-12:
        raise InputError("header affine is singular", path)
    data = np.moveaxis(array, -1, 0)
    meta = {"format": "nifti", "nifti_header": header.copy(), "dtype": str(raw_dtype)}
    return _finish(data, Grid(data.shape[1:], torch.from_numpy(lps)), path, labels, meta)


def _read_itk(path: PathLike, labels: bool) -> Image:
    sitk = _import_sitk(path)
    try:
        img = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(img)
    except Exception as exc:
        raise InputError(f"cannot read image: {_one_line(exc)}", path) from exc
    ndim = img.GetDimension()
    if ndim not in (2, 3):
        raise InputError(f"expected a 2D or 3D image, got {ndim}D", path)
    spatial = array if img.GetNumberOfComponentsPerPixel() == 1 else np.moveaxis(array, -1, 0)
    if img.GetNumberOfComponentsPerPixel() == 1:
        spatial = spatial[None]
    # (C, z, y, x) -> (C, x, y, z): ITK index order, so [direction * spacing | origin] applies.
    data = np.transpose(spatial, (0, *range(ndim, 0, -1)))
    _check_shape(tuple(data.shape[1:]), path)
    affine = np.eye(ndim + 1)
    affine[:ndim, :ndim] = np.asarray(img.GetDirection()).reshape(ndim, ndim) * np.asarray(img.GetSpacing())
    affine[:ndim, ndim] = img.GetOrigin()
    meta = {"format": "itk", "dtype": str(array.dtype)}
    return _finish(data, Grid(data.shape[1:], torch.from_numpy(affine)), path, labels, meta)


def _png_header(path: PathLike) -> tuple[int, int] | None:
    """(bit depth, colour type) of a PNG, or None."""
    with open(path, "rb") as fh:
        head = fh.read(33)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return head[24], head[25]


def read_png_unchanged(path: PathLike, what: str) -> np.ndarray:
    """A PNG with its full bit depth, channels in OpenCV's BGR(A) order (Pillow truncates 16-bit
    colour to 8 bits). ``what`` names the kind of file in the error when OpenCV is missing."""
    try:
        import cv2
    except ImportError as exc:
        raise InputError(f"{what} needs OpenCV (pip install opencv-python-headless)", path) from exc
    read = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if read is None:
        raise InputError("cannot decode PNG", path)
    return read


def _read_raster(path: PathLike, labels: bool) -> Image:
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    suffix = full_suffix(path)
    array: np.ndarray
    try:
        png = _png_header(path) if suffix == ".png" else None
        if png is not None and png[0] == 16 and png[1] in (2, 6):  # 16-bit RGB(A): Pillow truncates
            read = read_png_unchanged(path, "16-bit colour PNG")
            array = read[..., 2::-1] if read.ndim == 3 else read  # BGR(A) -> RGB
        else:
            with PILImage.open(path) as opened:
                pil: Any = opened
                if getattr(pil, "n_frames", 1) > 1:
                    raise InputError(f"multi-page image ({pil.n_frames} pages) is not supported", path)
                mode = pil.mode
                if mode in ("P", "PA", "CMYK", "YCbCr", "RGBA", "RGBX", "HSV", "LAB"):
                    pil = pil.convert("RGB")
                elif mode in ("LA", "1"):
                    pil = pil.convert("L")
                array = np.asarray(pil)
                if mode.startswith("I;16"):
                    array = array.astype(np.uint16)
                elif mode == "I" and array.size and array.min() >= 0 and array.max() < 65536 and png is not None:
                    array = array.astype(np.uint16)  # Pillow opens some 16-bit grey PNGs as 32-bit 'I'
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"cannot read image: {_one_line(exc)}", path) from exc
    if array.ndim == 2:
        data = array[None]
    elif array.ndim == 3:
        data = np.moveaxis(array, -1, 0)
    else:
        raise InputError(f"unexpected raster shape {array.shape}", path)
    _check_shape(tuple(data.shape[1:]), path)
    meta: dict[str, Any] = {"format": "raster", "dtype": str(array.dtype)}
    if data.shape[0] == 3 and np.array_equal(data[0], data[1]) and np.array_equal(data[0], data[2]):
        # Grey pictures saved as RGB: one channel carries all the information at a third of the cost.
        data = data[:1]
        meta["grey_from_rgb"] = True
    return _finish(data, Grid.raster_2d(data.shape[1:]), path, labels, meta)


def _read_numpy(path: PathLike, labels: bool, key: str | None) -> Image:
    meta: dict[str, Any] = {"format": "numpy"}
    affine = None
    try:
        if full_suffix(path) == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as npz:
                names = list(npz.files)
                if key is None:
                    candidates = [k for k in NPZ_KEYS if k in names]
                    data_names = [k for k in names if k != "world_from_voxel"]
                    if candidates:
                        key = candidates[0]
                    elif len(data_names) == 1:
                        key = data_names[0]
                    else:
                        raise InputError(f"cannot choose an array among {names}; pass key=", path)
                if key not in names:
                    raise InputError(f"no array named {key!r} (has {names})", path)
                array = npz[key]
                if "world_from_voxel" in names:
                    affine = np.asarray(npz["world_from_voxel"], dtype=np.float64)
                meta["npz_key"] = key
    except InputError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"cannot read numpy file: {_one_line(exc)}", path) from exc
    array = np.asarray(array)
    _check_shape(tuple(array.shape), path)
    ndim = array.ndim
    if affine is not None:
        if affine.shape != (ndim + 1, ndim + 1):
            raise InputError(f"world_from_voxel {affine.shape} does not fit a {ndim}D array", path)
        grid = Grid(array.shape, torch.from_numpy(affine))
    else:
        grid = Grid.raster_2d(array.shape) if ndim == 2 else Grid.from_spacing(array.shape, 1.0)
    return _finish(array[None], grid, path, labels, meta)


def read_image(path: PathLike, *, labels: bool = False, key: str | None = None) -> Image:
    """Read an image by suffix (see the module docstring for each format's conventions).

    ``labels=True`` keeps integer values as ``int64`` (float files must hold exact integers);
    ``key`` picks the array of an ``.npz``. Raises :class:`InputError` naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError("file not found" if not p.exists() else "not a regular file", path)
    suffix = full_suffix(p)
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(p, labels)
    if suffix in ITK_SUFFIXES:
        return _read_itk(p, labels)
    if suffix in RASTER_SUFFIXES:
        return _read_raster(p, labels)
    if suffix in NUMPY_SUFFIXES:
        return _read_numpy(p, labels, key)
    raise InputError(
        f"unsupported image suffix {suffix or '(none)'!r}; expected one of "
        + ", ".join(NIFTI_SUFFIXES + ITK_SUFFIXES + RASTER_SUFFIXES + NUMPY_SUFFIXES),
        path,
    )


# ------------------------------------------------------------------------------------------------
# writers
# ------------------------------------------------------------------------------------------------
def _target_dtype(image: Image, like: Image | None) -> np.dtype | None:
    for source in (like, image):
        if source is not None and "dtype" in source.meta:
            try:
                return np.dtype(source.meta["dtype"])
            except TypeError:
                continue
    return None


def _cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round and clip to an integer dtype's range; floats are cast directly."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.round(array), info.min, info.max).astype(dtype)
    if dtype.kind == "b":
        return array != 0
    return array.astype(dtype)


def _write_nifti(image: Image, path: Path, like: Image | None) -> None:
    import nibabel as nib

    data = image.data.detach().cpu().numpy()
    array = np.moveaxis(data, 0, -1)  # (*spatial, C)
    if image.channels == 1:
        array = array[..., 0]
    elif image.ndim == 2:
        array = array[:, :, None, :]  # (X, Y, 1, C)
    dtype = _target_dtype(image, like)
    if dtype is None or dtype.kind not in "iuf" or dtype.itemsize > 8:
        dtype = np.dtype(np.int32) if data.dtype.kind in "iu" else np.dtype(np.float32)
    if dtype == np.int64:
        dtype = np.dtype(np.int32)
    array = _cast(array, dtype)
    affine = ras_affine_from_grid(image.grid)
    header = None
    for source in (like, image):
        if source is not None and source.meta.get("nifti_header") is not None:
            header = source.meta["nifti_header"].copy()
            break
    out = nib.Nifti1Image(array, affine, header=header)
    out.header.set_data_dtype(array.dtype)
    out.header.set_slope_inter(1.0, 0.0)
    sform_code = int(out.header["sform_code"]) or 1
    qform_code = int(out.header["qform_code"]) or 1
    out.set_sform(affine, code=sform_code)
    out.set_qform(affine, code=qform_code)
    with atomic_path(path) as tmp:
        nib.save(out, str(tmp))


def _write_itk(image: Image, path: Path, like: Image | None) -> None:
    if full_suffix(path) in (".mhd", ".nhdr"):
        raise InputError("detached-header formats (.mhd/.nhdr) cannot be written atomically; use .mha or .nrrd", path)
    sitk = _import_sitk(path)
    ndim = image.ndim
    data = image.data.detach().cpu().numpy()
    dtype = _target_dtype(image, like)
    if dtype is not None and dtype.kind in "iuf":
        data = _cast(data, dtype)
    # (C, i, j, k) -> (k, j, i, C)
    array = np.transpose(data, (*range(ndim, 0, -1), 0))
    img = sitk.GetImageFromArray(array if image.channels > 1 else array[..., 0], isVector=image.channels > 1)
    lin = image.grid.world_from_voxel.numpy()[:ndim, :ndim]
    spacing = np.linalg.norm(lin, axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lin / spacing).ravel().tolist())
    img.SetOrigin(image.grid.world_from_voxel.numpy()[:ndim, ndim].tolist())
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)


def _raster_array(image: Image, path: Path) -> np.ndarray:
    """``(rows, cols[, C])`` array as the raster grid shows it (a 2D grid whose axis 0 runs along
    world x is transposed so rows follow y, as ITK would display it)."""
    if image.ndim != 2:
        raise InputError(f"a raster file holds a 2D image, got a {image.ndim}D image", path)
    if image.channels not in (1, 3, 4):
        raise InputError(f"a raster file holds 1, 3 or 4 channels, got {image.channels}", path)
    data = image.data.detach().cpu().numpy()
    lin = np.abs(image.grid.world_from_voxel.numpy()[:2, :2])
    if lin[0, 0] > lin[1, 0]:  # array axis 0 mostly along world x: it is the column axis
        data = np.transpose(data, (0, 2, 1))
    return data[0] if image.channels == 1 else np.moveaxis(data, 0, -1)


def _write_raster(image: Image, path: Path, like: Image | None) -> None:
    from PIL import Image as PILImage

    suffix = full_suffix(path)
    array = _raster_array(image, path)
    dtype = _target_dtype(image, like)
    allowed = {".png": ("uint8", "uint16"), ".jpg": ("uint8",), ".jpeg": ("uint8",)}.get(
        suffix, ("uint8", "uint16", "float32")
    )
    if dtype is None or str(dtype) not in allowed:
        dtype = np.dtype(np.uint8)
    array = _cast(array, dtype)
    with atomic_path(path) as tmp:
        if array.ndim == 3 and dtype != np.uint8:
            try:
                import cv2
            except ImportError as exc:
                raise InputError(f"writing {dtype} colour images needs OpenCV", path) from exc
            order = [2, 1, 0] + ([3] if array.shape[2] == 4 else [])
            if not cv2.imwrite(str(tmp), np.ascontiguousarray(array[..., order])):
                raise InputError("OpenCV could not write the image", path)
        else:
            if suffix in (".jpg", ".jpeg") and array.ndim == 3 and array.shape[2] == 4:
                array = array[..., :3]
            PILImage.fromarray(np.ascontiguousarray(array)).save(tmp)


def _write_numpy(image: Image, path: Path, like: Image | None) -> None:
    if image.channels != 1:
        raise InputError(f"numpy files hold one channel, got {image.channels}", path)
    array = image.data.detach().cpu().numpy()[0]
    dtype = _target_dtype(image, like)
    if dtype is not None and dtype.kind in "iuf":
        array = _cast(array, dtype)
    with atomic_path(path) as tmp:
        if full_suffix(path) == ".npy":
            with open(tmp, "wb") as fh:
                np.save(fh, array)
        else:
            key = image.meta.get("npz_key", "vol")
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **{key: array, "world_from_voxel": image.grid.world_from_voxel.numpy()})


def write_image(image: Image, path: PathLike, *, like: Image | None = None) -> None:
    """Write ``image`` by suffix, atomically (temporary file in the same directory, then ``os.replace``).

    The data type and (NIfTI) header come from ``like`` when given, else from ``image.meta``; integer
    types are rounded and clipped to their range. NIfTI gets the grid's affine converted to RAS;
    ``.mha/.nrrd`` the ITK origin/spacing/direction; rasters (2D only, 1/3/4 channels) are uint8 or
    uint16 (PNG/TIFF), geometry beyond the pixel order is not stored; ``.npz`` stores the array (key
    ``vol`` unless read from another key) and ``world_from_voxel``, ``.npy`` the array only.
    """
    p = Path(path)
    suffix = full_suffix(p)
    if suffix in NIFTI_SUFFIXES:
        _write_nifti(image, p, like)
    elif suffix in (".mha", ".nrrd", ".mhd", ".nhdr"):
        _write_itk(image, p, like)
    elif suffix in RASTER_SUFFIXES:
        _write_raster(image, p, like)
    elif suffix in NUMPY_SUFFIXES:
        _write_numpy(image, p, like)
    else:
        raise InputError(f"unsupported image suffix {suffix or '(none)'!r} for writing", path)
