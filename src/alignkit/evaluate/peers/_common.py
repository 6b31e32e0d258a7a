"""Frame conversions and small helpers shared by the peer adapters.

Every adapter hands back the same thing -- for each fixed voxel centre, the moving **world** (LPS)
point it maps to -- so what differs between tools is only how an alignkit :class:`Image` becomes
the tool's image and how the tool's answer comes back. The conventions:

* **ITK-family tools** (ANTs, SimpleITK, ITK-elastix, FireANTs) place an image with
  ``origin + direction @ diag(spacing) @ index``, ``index = (i, j[, k])`` in *ITK index order*, in
  LPS -- alignkit's own frame. An alignkit grid maps *array axes* to world with the columns of
  ``world_from_voxel``; we hand the array to ITK with its axes permuted (:class:`ItkLayout`) so
  that ITK index axis ``d`` is the array axis most aligned with world axis ``d``. The mapping from
  voxels to world is unchanged by this (the permuted columns are ITK's direction × spacing); the
  permutation only keeps ITK's direction close to the identity (a 2D raster, whose array is
  ``(row, col)`` with world ``x`` = column, becomes an ITK image with identity direction), because
  some filters (demons, pyramids) behave best with axis-aligned images.
* SimpleITK/ITK numpy arrays are indexed in *reverse* index order (``[k, j, i]``); ANTsPy arrays are
  indexed in index order (``[i, j, k]``).
* **Pixel tools** (OpenCV, kornia) work in ``(x = column, y = row)`` pixels of a 2D array: the
  matrix ``world_from_pixel`` (:func:`alignkit.spatial.world_from_pixel`) converts their answers
  whatever the grid (for a raster grid with spacing 1 it is the identity).

The frame conversions themselves are :mod:`alignkit.spatial.frames`; the functions here only carry
numpy arrays to and from them.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from alignkit.evaluate.method import MethodUnavailable
from alignkit.image import Image
from alignkit.spatial.frames import apply_matrix
from alignkit.spatial.frames import world_from_pixel as spatial_world_from_pixel
from alignkit.spatial.frames import world_map_from_pixel_flow as spatial_world_map_from_pixel_flow
from alignkit.spatial.frames import world_matrix_from_pixel_matrix as spatial_world_matrix_from_pixel_matrix
from alignkit.spatial.grid import Grid


def require(module: str, package: str | None = None) -> None:
    """Raise :class:`MethodUnavailable` unless ``module`` can be imported (without importing it)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is absent or broken
        found = False
    if not found:
        raise MethodUnavailable(f"package {package or module} not installed")


def check_device(device: str) -> None:
    """A torch-based peer asked for CUDA where there is none is unavailable (a skipped row), not an error."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise MethodUnavailable(f"device {device!r} requested but CUDA is not available")


def set_threads(threads: int | None, *, itk_env: bool = True) -> None:
    """Thread count for torch and, through the environment, for ITK copies not yet started.

    ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` once, when its thread pool is first created, so
    the variable only reaches a library (each of ANTsPy, SimpleITK and ITK bundles its own ITK) that
    has not run yet in this process; SimpleITK and ITK-elastix are also set at run time by their
    adapters. The evaluation runner starts one process per run, so this is the normal case.
    """
    if threads is None:
        return
    n = max(1, int(threads))
    torch.set_num_threads(n)
    if itk_env:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(n)


# ------------------------------------------------------------------------------------------------
# images as arrays
# ------------------------------------------------------------------------------------------------
def grey_array(image: Image) -> np.ndarray:
    """The channel mean as a float32 array in alignkit's array-axis order."""
    return np.ascontiguousarray(image.grey().data[0].detach().cpu().numpy(), dtype=np.float32)


def joint_uint8(fixed: np.ndarray, moving: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both images to uint8 with *one* linear scaling: brightness constancy (what optical flow and
    ECC assume) survives, which separate min-max stretches would break."""
    lo = float(min(fixed.min(), moving.min()))
    hi = float(max(fixed.max(), moving.max()))
    scale = 255.0 / (hi - lo) if hi > lo else 1.0

    def convert(a: np.ndarray) -> np.ndarray:
        return np.clip(np.rint((a - lo) * scale), 0, 255).astype(np.uint8)

    return convert(fixed), convert(moving)


def joint_unit(fixed: np.ndarray, moving: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both images to float32 in [0, 1] with one linear scaling (see :func:`joint_uint8`)."""
    lo = float(min(fixed.min(), moving.min()))
    hi = float(max(fixed.max(), moving.max()))
    scale = 1.0 / (hi - lo) if hi > lo else 1.0
    return ((fixed - lo) * scale).astype(np.float32), ((moving - lo) * scale).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# ITK layout
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ItkLayout:
    """How an alignkit grid is handed to an ITK-family tool.

    ``perm[d]`` is the alignkit array axis that becomes ITK index axis ``d``; ``origin``,
    ``spacing`` and ``direction`` (``direction[:, d]`` the world direction of index axis ``d``) are
    ITK's, in LPS. ``shape`` is the alignkit array shape.
    """

    perm: tuple[int, ...]
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.perm)

    @property
    def size(self) -> tuple[int, ...]:
        """ITK size (index order)."""
        return tuple(self.shape[a] for a in self.perm)

    # array conversions ------------------------------------------------------------------------
    def to_index_order(self, array: np.ndarray) -> np.ndarray:
        """alignkit-ordered ``(*shape)`` array -> ITK index order ``[i, j, k]`` (ANTsPy's layout)."""
        return np.ascontiguousarray(np.transpose(array, self.perm))

    def to_sitk_order(self, array: np.ndarray) -> np.ndarray:
        """alignkit-ordered array -> reversed index order ``[k, j, i]`` (SimpleITK/ITK numpy layout)."""
        return np.ascontiguousarray(np.transpose(array, self.perm[::-1]))

    def from_index_order(self, array: np.ndarray) -> np.ndarray:
        """ITK index-ordered ``(*size, ...)`` array -> alignkit order (trailing axes kept)."""
        inverse = np.argsort(self.perm)
        rest = list(range(self.ndim, array.ndim))
        return np.ascontiguousarray(np.transpose(array, [int(i) for i in inverse] + rest))

    def from_sitk_order(self, array: np.ndarray) -> np.ndarray:
        """SimpleITK/ITK ``[k, j, i, ...]`` array -> alignkit order (trailing axes kept)."""
        n = self.ndim
        to_index = list(range(n - 1, -1, -1)) + list(range(n, array.ndim))
        return self.from_index_order(np.transpose(array, to_index))


def itk_layout(grid: Grid) -> ItkLayout:
    """The :class:`ItkLayout` of a grid (see the module docstring for the axis choice)."""
    n = grid.ndim
    lin = grid.world_from_voxel[:n, :n].numpy()
    origin = grid.world_from_voxel[:n, n].numpy().copy()
    # world axis d takes the array axis whose column points most along it; an ambiguous (oblique)
    # grid keeps the identity, which is equally valid (ITK accepts any invertible direction)
    perm = tuple(int(np.argmax(np.abs(lin[d]))) for d in range(n))
    if sorted(perm) != list(range(n)):
        perm = tuple(range(n))
    columns = lin[:, list(perm)]
    spacing = np.linalg.norm(columns, axis=0)
    direction = columns / spacing
    return ItkLayout(perm, origin, spacing, direction, tuple(grid.shape))


def sitk_image(image: Image, layout: ItkLayout | None = None, *, array: np.ndarray | None = None) -> Any:
    """A float32 SimpleITK image of ``image``'s channel mean (or of ``array``, alignkit order) on its grid."""
    import SimpleITK as sitk

    layout = layout or itk_layout(image.grid)
    data = grey_array(image) if array is None else np.asarray(array, dtype=np.float32)
    img = sitk.GetImageFromArray(layout.to_sitk_order(data))
    img.SetOrigin([float(v) for v in layout.origin])
    img.SetSpacing([float(v) for v in layout.spacing])
    img.SetDirection([float(v) for v in layout.direction.ravel()])
    return img


# ------------------------------------------------------------------------------------------------
# maps
# ------------------------------------------------------------------------------------------------
def world_points(grid: Grid) -> np.ndarray:
    """The identity map ``(ndim, *shape)`` float64: world coordinates of every voxel centre."""
    return grid.world_points(dtype=torch.float64)[0].numpy()


def apply_homogeneous(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """:func:`alignkit.spatial.apply_matrix` on numpy arrays: ``matrix (n+1, n+1)`` applied to
    ``points (n, *S)`` in float64; projective matrices divide by the last row."""
    moved = apply_matrix(torch.as_tensor(matrix, dtype=torch.float64), torch.as_tensor(points, dtype=torch.float64)[None])
    return moved[0].numpy()


def matrix_of_point_map(transform_point: Any, ndim: int, scale: float = 1.0) -> np.ndarray:
    """The homogeneous matrix of a *linear* point mapping (``transform_point(list) -> sequence``),
    recovered from the images of the origin and of the unit vectors (times ``scale``)."""
    origin = np.asarray(transform_point([0.0] * ndim), dtype=np.float64)
    m = np.eye(ndim + 1)
    m[:ndim, ndim] = origin
    for i in range(ndim):
        e = [0.0] * ndim
        e[i] = scale
        m[:ndim, i] = (np.asarray(transform_point(e), dtype=np.float64) - origin) / scale
    return m


def world_from_pixel(grid: Grid) -> np.ndarray:
    """:func:`alignkit.spatial.world_from_pixel` as a numpy array: ``(x = column, y = row, 1)`` pixel
    coordinates of a 2D array -> world."""
    if grid.ndim != 2:
        raise ValueError("pixel coordinates are defined for 2D grids only")
    return spatial_world_from_pixel(grid).numpy()


def world_matrix_from_pixel_matrix(pixel_matrix: np.ndarray, fixed: Grid, moving: Grid) -> np.ndarray:
    """:func:`alignkit.spatial.world_matrix_from_pixel_matrix` on numpy arrays: a fixed-pixel ->
    moving-pixel 3x3 matrix (homography or affine) as fixed world -> moving world."""
    return spatial_world_matrix_from_pixel_matrix(torch.as_tensor(pixel_matrix, dtype=torch.float64), fixed, moving).numpy()


def world_map_from_pixel_flow(flow_xy: np.ndarray, fixed: Grid, moving: Grid) -> np.ndarray:
    """:func:`alignkit.spatial.world_map_from_pixel_flow` for OpenCV's layout: dense pixel flow
    ``(H, W, 2)`` (``dx, dy``; fixed pixel ``p`` matches moving pixel ``p + flow``) -> world map
    ``(2, H, W)`` of moving world points (float64)."""
    flow = torch.as_tensor(np.moveaxis(np.asarray(flow_xy, dtype=np.float64), -1, 0))[None]
    return spatial_world_map_from_pixel_flow(flow, fixed, moving)[0].numpy()


def same_shape_2d(fixed: Image, moving: Image, who: str) -> str | None:
    """``None`` when both images are 2D of one shape (dense pixel flow needs it), else why not."""
    if fixed.ndim != 2:
        return f"{who} handles 2D images only"
    if fixed.shape != moving.shape:
        return f"{who} needs fixed and moving of one size, got {fixed.shape} and {moving.shape}"
    return None
