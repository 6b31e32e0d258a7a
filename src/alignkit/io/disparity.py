"""Disparity files: PFM (Middlebury's float format) and KITTI's 16-bit PNG.

* **PFM**: a text header ``Pf`` (one channel) or ``PF`` (three), ``width height``, then a scale
  whose **sign gives the byte order** (negative: little-endian, positive: big-endian; its magnitude
  is a scale factor Middlebury leaves at 1), then float32 rows stored **bottom to top**. Middlebury
  marks unknown disparities with ``inf``. :func:`read_pfm` returns rows top to bottom.
* **KITTI**: a 16-bit grey PNG holding ``round(d * 256)``; ``0`` means unknown (so a valid disparity
  is at least 1/256 px and at most 255.996 px). Pillow reads 16-bit PNGs as 8 or 32-bit depending on
  its version: the reader uses OpenCV's ``IMREAD_UNCHANGED`` (:func:`alignkit.io.images.read_png_unchanged`),
  the writer OpenCV too.

Writers are atomic (:func:`alignkit.io.atomic.atomic_path`); reader failures are one-line
:class:`~alignkit.errors.InputError` s naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from alignkit.errors import InputError
from alignkit.io.atomic import atomic_path
from alignkit.io.images import read_png_unchanged

PathLike = str | os.PathLike[str]

#: KITTI's fixed-point scale: 16-bit value = disparity * 256
KITTI_SCALE = 256.0


def read_pfm(path: PathLike) -> np.ndarray:
    """A PFM image as float32 ``(H, W)`` (``Pf``) or ``(H, W, 3)`` (``PF``), rows top to bottom,
    values as stored (``inf`` kept: Middlebury's unknown)."""
    try:
        with open(path, "rb") as fh:
            header = fh.readline().strip()
            if header not in (b"PF", b"Pf"):
                raise InputError(f"not a PFM file (header {header[:8]!r})", path)
            size = fh.readline().split()
            while size and size[0].startswith(b"#"):  # comment lines some writers add
                size = fh.readline().split()
            width, height = (int(v) for v in size)
            scale = float(fh.readline())
            data = np.fromfile(fh, dtype="<f4" if scale < 0 else ">f4")
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read PFM: {exc}", path) from None
    channels = 3 if header == b"PF" else 1
    if data.size != width * height * channels:
        raise InputError(f"corrupt PFM: {data.size} values for {width}x{height}x{channels}", path)
    shape = (height, width, channels) if channels == 3 else (height, width)
    return np.ascontiguousarray(np.flipud(data.reshape(shape))).astype(np.float32)


def write_pfm(path: PathLike, image: np.ndarray, *, little_endian: bool = True) -> Path:
    """Write float ``(H, W)`` or ``(H, W, 3)`` as PFM (rows bottom to top, scale ``-1`` for
    little-endian, ``1`` for big-endian). ``inf``/``nan`` are written as they are."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise InputError(f"PFM holds (H, W) or (H, W, 3) images, got {array.shape}", path)
    header = b"PF" if array.ndim == 3 else b"Pf"
    dtype = "<f4" if little_endian else ">f4"
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(header + b"\n")
        fh.write(f"{array.shape[1]} {array.shape[0]}\n".encode())
        fh.write(b"-1.0\n" if little_endian else b"1.0\n")
        fh.write(np.flipud(array).astype(dtype).tobytes())
    return Path(path)


def read_kitti_disparity(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A KITTI disparity PNG -> ``(disparity (H, W) float32 pixels, valid (H, W) bool)``; the
    disparity is 0 where unknown."""
    raw = read_png_unchanged(path, "reading KITTI disparity")
    if raw.dtype != np.uint16 or raw.ndim != 2:
        raise InputError(f"not a KITTI disparity PNG: expected 16-bit grey, got {raw.dtype} {raw.shape}", path)
    valid = raw > 0
    return (raw.astype(np.float32) / KITTI_SCALE), valid


def write_kitti_disparity(path: PathLike, disparity: np.ndarray, valid: np.ndarray | None = None) -> Path:
    """Write ``disparity`` (pixels) as a KITTI 16-bit PNG: ``round(d * 256)`` clipped to
    ``[1, 65535]`` where valid (finite, positive and ``valid``), 0 elsewhere."""
    try:
        import cv2
    except ImportError as exc:
        raise InputError("writing a KITTI disparity PNG needs OpenCV (pip install opencv-python-headless)",
                         path) from exc
    values = np.asarray(disparity, dtype=np.float64)
    if values.ndim != 2:
        raise InputError(f"a disparity map is (H, W), got {values.shape}", path)
    keep = np.isfinite(values) & (values > 0)
    if valid is not None:
        keep &= np.asarray(valid, dtype=bool)
    encoded = np.zeros(values.shape, np.uint16)
    encoded[keep] = np.clip(np.round(values[keep] * KITTI_SCALE), 1, 65535).astype(np.uint16)
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), encoded):
            raise InputError("OpenCV could not write the PNG", path)
    return Path(path)


def read_disparity(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Any ground-truth disparity file -> ``(disparity (H, W) float32 pixels, 0 where unknown;
    valid (H, W) bool)``: PFM and ``.npy``/``.npz`` (Middlebury: ``inf`` or NaN unknown), a 16-bit
    PNG (KITTI: ``d * 256``, 0 unknown) or an 8-bit PNG (Middlebury 2006 ``*GT.png`` in pixels, 0
    unknown)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".pfm":
        values = read_pfm(path)
    elif suffix in (".npy", ".npz"):
        try:
            loaded = np.load(path)
            values = np.asarray(loaded[loaded.files[0]] if suffix == ".npz" else loaded, dtype=np.float32)
        except (OSError, ValueError, IndexError) as exc:
            raise InputError(f"cannot read disparity array: {exc}", path) from None
    elif suffix == ".png":
        raw = read_png_unchanged(path, "reading a disparity PNG")
        if raw.ndim == 3:
            raw = raw[..., 0]
        if raw.dtype == np.uint16:
            return read_kitti_disparity(path)
        values = raw.astype(np.float32)
        values[raw == 0] = np.inf
    else:
        raise InputError("unknown disparity format (expected .pfm, .npy, .npz or .png)", path)
    if values.ndim != 2:
        raise InputError(f"a disparity map is (H, W), got {values.shape}", path)
    valid = np.isfinite(values)
    return np.where(valid, values, 0.0).astype(np.float32), valid
