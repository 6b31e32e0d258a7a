"""Optical-flow files: Middlebury ``.flo`` (read/write) and KITTI 16-bit PNG flow (read).

Convention: these functions keep the *files'* layout -- a numpy array ``(H, W, 2)`` float32 of pixel
displacements, component 0 = x (along columns), component 1 = y (along rows), from the first frame to
the second: ``first(p) ≈ second(p + flow(p))``. alignkit's own flow (``Case.flow``,
``Registration.flow()``, training pairs; stated in :mod:`alignkit.spatial`) is ``(2, H, W)`` in
array-axis order ``(dy, dx)``, same units and direction; :func:`alignkit.spatial.flow_from_xy` and
:func:`alignkit.spatial.xy_from_flow` are the one conversion between the two. Unknown flow is ``NaN``
(``.flo`` stores it as values above 1e9); :func:`flow_valid_mask` gives the validity mask.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from alignkit.errors import InputError
from alignkit.io.atomic import atomic_path

FLO_MAGIC = 202021.25
#: Middlebury: components whose magnitude exceeds this are unknown.
UNKNOWN_THRESHOLD = 1e9
#: Value written for unknown flow.
UNKNOWN_VALUE = 1e10

PathLike = str | os.PathLike[str]


def read_flo(path: PathLike) -> np.ndarray:
    """Read a Middlebury ``.flo`` file -> ``(H, W, 2)`` float32 (x, y); unknown entries are NaN.
    :func:`alignkit.spatial.flow_from_xy` makes it an alignkit flow ``(2, H, W)``."""
    p = Path(path)
    if not p.is_file():
        raise InputError("file not found", path)
    raw = p.read_bytes()
    if len(raw) < 12:
        raise InputError(f"not a .flo file: {len(raw)} bytes, shorter than the 12-byte header", path)
    magic = np.frombuffer(raw, dtype="<f4", count=1)[0]
    if magic != np.float32(FLO_MAGIC):
        raise InputError(f"not a .flo file: magic {magic!r} instead of {FLO_MAGIC}", path)
    width, height = (int(v) for v in np.frombuffer(raw, dtype="<i4", count=2, offset=4))
    if width < 1 or height < 1 or width * height > 2**31:
        raise InputError(f"corrupt .flo header: size {width}x{height}", path)
    expected = 12 + 8 * width * height
    if len(raw) != expected:
        raise InputError(f"corrupt .flo file: {len(raw)} bytes, expected {expected} for {width}x{height}", path)
    flow = np.frombuffer(raw, dtype="<f4", offset=12).reshape(height, width, 2).astype(np.float32)
    unknown = ~(np.abs(flow) <= UNKNOWN_THRESHOLD).all(axis=-1)
    flow[unknown] = np.nan
    return flow


def write_flo(path: PathLike, flow: np.ndarray) -> None:
    """Write ``(H, W, 2)`` (x, y) flow as Middlebury ``.flo``, atomically; NaN/Inf entries are
    written as unknown (1e10). An alignkit flow ``(2, H, W)`` goes through
    :func:`alignkit.spatial.xy_from_flow` first."""
    arr = np.asarray(flow, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[2] != 2 or min(arr.shape[:2]) < 1:
        raise InputError(f"flow must be (H, W, 2) with H, W >= 1, got {arr.shape}", path)
    arr = arr.copy()
    arr[~np.isfinite(arr).all(axis=-1)] = UNKNOWN_VALUE
    height, width = arr.shape[:2]
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(np.array([FLO_MAGIC], dtype="<f4").tobytes())
        fh.write(np.array([width, height], dtype="<i4").tobytes())
        fh.write(arr.astype("<f4").tobytes())


def flow_valid_mask(flow: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: True where both components are finite (known)."""
    return np.isfinite(flow).all(axis=-1)


def read_kitti_flow(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a KITTI flow PNG -> ``(flow (H, W, 2) float32 (x, y), valid (H, W) bool)``
    (:func:`alignkit.spatial.flow_from_xy` makes the flow an alignkit flow).

    The file is a 16-bit RGB PNG: R = u, G = v stored as ``value * 64 + 2**15``, B = valid flag.
    Decoded values are returned everywhere (as the KITTI devkit does); use ``valid`` to mask them.
    Needs OpenCV (Pillow silently reads 16-bit colour PNGs as 8-bit).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError("file not found", path)
    from alignkit.io.images import read_png_unchanged

    raw = read_png_unchanged(p, "reading KITTI flow")
    if raw.dtype != np.uint16 or raw.ndim != 3 or raw.shape[2] != 3:
        raise InputError(f"not a KITTI flow PNG: expected 16-bit 3-channel, got {raw.dtype} {raw.shape}", path)
    rgb = raw[..., ::-1].astype(np.float32)  # OpenCV gives BGR
    flow = (rgb[..., :2] - 2.0**15) / 64.0
    valid = rgb[..., 2] > 0
    return flow, valid
