"""Conversions between the coordinate frames alignkit meets, each written once.

Frames (for a grid of array shape ``shape``, ``ndim = len(shape)``):

* **voxel** -- continuous array indices in array-axis order; voxel centres on integers
  (see :mod:`alignkit.spatial.grid`).
* **unit** -- array-axis order, each axis scaled so that the first voxel centre is at -1 and the
  last at +1 (the ``align_corners=True`` geometry). It does not depend on the image size, which is
  why networks that predict matrices use it.
* **normalized** -- ``grid_sample``'s frame: the unit frame with its components in *reversed*
  array-axis order (component 0 = last array axis).
* **pixel** -- voxel coordinates with their components in reversed array-axis order, unscaled:
  OpenCV's and kornia's ``(x = column, y = row)`` for a 2D array, ``(x, y, z)`` = ``(axis 2, axis
  1, axis 0)`` for a 3D one. A pixel *flow* is a displacement in that frame.
* **world** -- ``grid.world_from_voxel @ voxel`` (LPS, see :mod:`alignkit.spatial.grid`).

Matrices are homogeneous ``(ndim + 1, ndim + 1)`` and named ``target_from_source``.

A **flow** (the one meaning of the word in alignkit, stated in :mod:`alignkit.spatial`) is
``(ndim, *S)``: voxels of the fixed grid, array-axis order, ``fixed(p) ≈ moving(p + flow(p))``.
:func:`flow_from_world_map` / :func:`world_map_from_flow` convert it to and from a world map, and
:func:`xy_from_flow` / :func:`flow_from_xy` to and from the Middlebury ``.flo`` / OpenCV layout
``(*S, ndim)`` with components ``(x, y[, z])``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from alignkit.errors import ShapeError
from alignkit.spatial.grid import Grid

ArrayT = TypeVar("ArrayT", np.ndarray, Tensor)


def apply_matrix(matrix: Tensor, points: Tensor) -> Tensor:
    """Apply a homogeneous ``(ndim+1, ndim+1)`` or batched ``(B, ndim+1, ndim+1)`` matrix to
    points ``(B, ndim, *spatial)`` (or ``(B, ndim, N)``). Projective matrices divide by the last row.

    Convention: ``matrix`` is ``target_from_source`` and ``points`` are in the source frame, their
    components in the order of that frame (array-axis order for voxels, ``(x, y[, z])`` for world).
    """
    ndim = points.shape[1]
    if matrix.shape[-2:] != (ndim + 1, ndim + 1):
        raise ShapeError(f"apply_matrix: matrix {tuple(matrix.shape)} does not fit {ndim}D points")
    matrix = matrix.to(dtype=points.dtype, device=points.device)
    if matrix.dim() == 2:
        matrix = matrix.unsqueeze(0)
    flat = points.reshape(points.shape[0], ndim, -1)
    out = matrix[:, :ndim, :ndim] @ flat + matrix[:, :ndim, ndim:]
    last = matrix[:, ndim:, :]
    is_projective = bool((last[..., :ndim] != 0).any()) or bool((last[..., ndim] != 1).any())
    if is_projective:
        w = last[:, :, :ndim] @ flat + last[:, :, ndim:]
        out = out / w
    return out.reshape(points.shape[0], ndim, *points.shape[2:])


def homogeneous(matrix: Tensor) -> Tensor:
    """``(..., ndim, ndim+1)`` ``[A | b]`` -> ``(..., ndim+1, ndim+1)`` with last row ``[0 ... 0 1]``.

    Convention: the top rows are kept as given; the added row makes the matrix affine.
    """
    ndim = matrix.shape[-2]
    if matrix.shape[-1] != ndim + 1:
        raise ShapeError(f"expected affine matrices (..., n, n+1), got {tuple(matrix.shape)}")
    last = torch.zeros(*matrix.shape[:-2], 1, ndim + 1, dtype=matrix.dtype, device=matrix.device)
    last[..., 0, ndim] = 1.0
    return torch.cat([matrix, last], dim=-2)


def reverse_components(field: Tensor) -> Tensor:
    """Reverse the component axis (dim 1) of ``field (B, ndim, *S)``: array-axis order <-> pixel order.

    Convention: array-axis order is ``(axis 0, axis 1[, axis 2])``; pixel order is ``(x, y[, z])``
    with ``x`` the last array axis (OpenCV flow, ``grid_sample`` grids). Its own inverse.
    """
    return field.flip(1)


def pixel_from_voxel(ndim: int, *, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """The homogeneous matrix of :func:`reverse_components`: voxel -> pixel coordinates.

    Convention: pixel component ``k`` is array axis ``ndim - 1 - k`` (for 2D: ``x = column``,
    ``y = row``). The matrix is a permutation and its own inverse, so it is also ``voxel_from_pixel``.
    """
    matrix = torch.zeros(ndim + 1, ndim + 1, dtype=dtype, device=device)
    for k in range(ndim):
        matrix[k, ndim - 1 - k] = 1.0
    matrix[ndim, ndim] = 1.0
    return matrix


def unit_from_voxel(shape: Sequence[int], *, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """Homogeneous matrix voxel -> unit coordinates of a grid of ``shape``.

    Convention: array-axis order kept; along axis ``a``, voxel 0 maps to -1 and voxel
    ``shape[a] - 1`` to +1 (an axis of one voxel maps voxel 0 to -1 and keeps unit steps).
    """
    ndim = len(shape)
    matrix = torch.eye(ndim + 1, dtype=dtype, device=device)
    for axis, size in enumerate(shape):
        matrix[axis, axis] = 2.0 / max(int(size) - 1, 1)
        matrix[axis, ndim] = -1.0
    return matrix


def normalized_from_voxel(shape: Sequence[int], *, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """Homogeneous matrix voxel -> ``grid_sample``'s normalised coordinates (``align_corners=True``).

    Convention: normalised component ``k`` is the unit coordinate of array axis ``ndim - 1 - k``,
    i.e. ``pixel_from_voxel @ unit_from_voxel`` -- the matrix form of :func:`voxel_to_normalized`.
    """
    ndim = len(shape)
    return pixel_from_voxel(ndim, dtype=dtype, device=device) @ unit_from_voxel(shape, dtype=dtype, device=device)


def voxel_to_normalized(voxel: Tensor, shape: Sequence[int]) -> Tensor:
    """Voxel coordinates ``(B, ndim, *S)`` of a grid of ``shape`` -> ``grid_sample`` grid ``(B, *S, ndim)``.

    Convention: the only function that builds ``grid_sample`` grids: unit coordinates
    (``align_corners=True``), components reversed (``x`` = last array axis) and moved last.
    """
    ndim = len(shape)
    size = torch.tensor(tuple(shape), dtype=voxel.dtype, device=voxel.device).view(1, ndim, *([1] * (voxel.dim() - 2)))
    unit = 2.0 * voxel / (size - 1).clamp(min=1) - 1.0
    return reverse_components(unit).movedim(1, -1)


def normalized_to_voxel(grid: Tensor, shape: Sequence[int]) -> Tensor:
    """The inverse of :func:`voxel_to_normalized`: a ``grid_sample`` grid ``(B, *S, ndim)`` of a grid of
    ``shape`` -> voxel coordinates ``(B, ndim, *S)`` (an axis of size 1 maps to voxel 0)."""
    ndim = len(shape)
    size = torch.tensor(tuple(shape), dtype=grid.dtype, device=grid.device).view(1, ndim, *([1] * (grid.dim() - 2)))
    unit = reverse_components(grid.movedim(-1, 1))
    return (unit + 1.0) * 0.5 * (size - 1)


def voxel_matrix_from_unit_matrix(unit_matrix: Tensor, fixed_shape: Sequence[int], moving_shape: Sequence[int]) -> Tensor:
    """Moving-unit-from-fixed-unit matrices -> ``moving_voxel_from_fixed_voxel`` ``(B, ndim+1, ndim+1)``.

    Convention: ``unit_matrix`` is ``(B, ndim, ndim+1)`` ``[A | b]`` or homogeneous
    ``(B, ndim+1, ndim+1)``, mapping unit coordinates of the fixed grid to unit coordinates of the
    moving grid (the direction of every map: where to sample the moving image for a fixed point).
    """
    if unit_matrix.shape[-1] == unit_matrix.shape[-2] + 1:
        unit_matrix = homogeneous(unit_matrix)
    kw = {"dtype": unit_matrix.dtype, "device": unit_matrix.device}
    fixed_unit = unit_from_voxel(fixed_shape, **kw)
    moving_voxel = torch.linalg.inv(unit_from_voxel(moving_shape, **kw))
    return moving_voxel @ unit_matrix @ fixed_unit


def world_from_pixel(grid: Grid) -> Tensor:
    """Homogeneous float64 matrix pixel -> world of ``grid``.

    Convention: pixel coordinates are voxel coordinates in reversed array-axis order (2D: OpenCV's
    ``(x = column, y = row)``, pixel centres on integers); for a :meth:`Grid.raster_2d` grid of
    spacing 1 this is the identity.
    """
    return grid.world_from_voxel @ pixel_from_voxel(grid.ndim)


def world_matrix_from_pixel_matrix(pixel_matrix: Tensor, fixed_grid: Grid, moving_grid: Grid) -> Tensor:
    """A moving-pixel-from-fixed-pixel matrix (homography or affine, ``(ndim+1, ndim+1)``) as
    ``moving_world_from_fixed_world`` (float64, scaled so the last entry is 1).

    Convention: both matrices map fixed points to the moving points to sample; the pixel frames are
    those of :func:`world_from_pixel`.
    """
    pixel_matrix = torch.as_tensor(pixel_matrix, dtype=torch.float64)
    ndim = fixed_grid.ndim
    if pixel_matrix.shape != (ndim + 1, ndim + 1):
        raise ShapeError(f"expected a {(ndim + 1, ndim + 1)} pixel matrix, got {tuple(pixel_matrix.shape)}")
    world = world_from_pixel(moving_grid) @ pixel_matrix @ torch.linalg.inv(world_from_pixel(fixed_grid))
    return world / world[ndim, ndim]


def flow_from_world_map(world_map: Tensor, fixed_grid: Grid) -> Tensor:
    """World map ``(B, ndim, *fixed_grid.shape)`` (moving world points) -> flow ``(B, ndim, *S)``.

    Convention: the flow of :mod:`alignkit.spatial` -- voxels of the fixed grid, array-axis order,
    ``fixed(p) ≈ moving(p + flow(p))``: ``p + flow(p)`` is the moving world point ``world_map(p)``
    written in the fixed grid's voxel coordinates (the moving image is read through the world
    identity, as on a network grid). Same dtype and device as ``world_map``. Inverse of
    :func:`world_map_from_flow`.
    """
    if tuple(world_map.shape[2:]) != fixed_grid.shape or world_map.shape[1] != fixed_grid.ndim:
        raise ShapeError(f"world map {tuple(world_map.shape)} does not live on {fixed_grid}: expected "
                         f"(B, {fixed_grid.ndim}, *{fixed_grid.shape})")
    voxel = apply_matrix(fixed_grid.voxel_from_world, world_map)
    return voxel - fixed_grid.voxel_points(dtype=voxel.dtype, device=voxel.device)


def world_map_from_flow(flow: Tensor, fixed_grid: Grid) -> Tensor:
    """Flow ``(B, ndim, *fixed_grid.shape)`` -> world map (moving world points), the inverse of
    :func:`flow_from_world_map`.

    Convention: see :func:`flow_from_world_map`.
    """
    if tuple(flow.shape[2:]) != fixed_grid.shape or flow.shape[1] != fixed_grid.ndim:
        raise ShapeError(f"flow {tuple(flow.shape)} does not live on {fixed_grid}: expected "
                         f"(B, {fixed_grid.ndim}, *{fixed_grid.shape})")
    identity = fixed_grid.voxel_points(dtype=flow.dtype, device=flow.device)
    return apply_matrix(fixed_grid.world_from_voxel, identity + flow)


def xy_from_flow(flow: ArrayT) -> ArrayT:
    """A flow ``(ndim, *S)`` (array-axis order) -> the Middlebury ``.flo`` / OpenCV layout
    ``(*S, ndim)``, components ``(x, y[, z])`` (``x`` = last array axis, the column).

    Convention: the one conversion between alignkit's flow (:mod:`alignkit.spatial`) and the files
    and tools that store ``(H, W, 2)`` x-then-y flows; units (voxels of the fixed grid) and
    direction (``fixed(p) ≈ moving(p + flow(p))``) are the same in both. numpy in, numpy out
    (contiguous); torch in, torch out. Inverse of :func:`flow_from_xy`.
    """
    if flow.ndim < 2 or flow.shape[0] != flow.ndim - 1:
        raise ShapeError(f"a flow is (ndim, *spatial) with ndim = number of spatial axes, got {tuple(flow.shape)}")
    if isinstance(flow, Tensor):
        return flow.flip(0).movedim(0, -1)
    return np.ascontiguousarray(np.moveaxis(flow[::-1], 0, -1))


def flow_from_xy(xy: ArrayT) -> ArrayT:
    """The Middlebury ``.flo`` / OpenCV layout ``(*S, ndim)``, components ``(x, y[, z])`` -> a flow
    ``(ndim, *S)`` in array-axis order; the inverse of :func:`xy_from_flow` (same convention)."""
    if xy.ndim < 2 or xy.shape[-1] != xy.ndim - 1:
        raise ShapeError(f"an (x, y[, z]) flow is (*spatial, ndim) with ndim = number of spatial axes, "
                         f"got {tuple(xy.shape)}")
    if isinstance(xy, Tensor):
        return xy.movedim(-1, 0).flip(0)
    return np.ascontiguousarray(np.moveaxis(xy, -1, 0)[::-1])


def world_map_from_pixel_flow(flow: Tensor, fixed_grid: Grid, moving_grid: Grid) -> Tensor:
    """Pixel flow ``(B, ndim, *fixed_grid.shape)`` -> world map ``(B, ndim, *S)`` (moving world points),
    for tools that measure the flow between the two rasters' own pixel frames (OpenCV on two images).

    Convention: ``flow`` is in pixels, components in pixel order (``dx, dy[, dz]``), and fixed
    pixel ``p`` matches *moving* pixel ``p + flow(p)`` (Middlebury's ``fixed(p) ≈ moving(p + flow(p))``);
    the two rasters are assumed to share a pixel frame, as photographs and video frames do. When
    both grids are the same, this is :func:`world_map_from_flow` of :func:`reverse_components`
    of ``flow`` (alignkit's flow, see :mod:`alignkit.spatial`). Inverse of :func:`pixel_flow_from_world_map`.
    """
    if tuple(flow.shape[2:]) != fixed_grid.shape or flow.shape[1] != fixed_grid.ndim:
        raise ShapeError(f"flow {tuple(flow.shape)} does not live on {fixed_grid}")
    identity = fixed_grid.voxel_points(dtype=flow.dtype, device=flow.device)
    moving_voxel = identity + reverse_components(flow)
    return apply_matrix(moving_grid.world_from_voxel, moving_voxel)


def pixel_flow_from_world_map(world_map: Tensor, fixed_grid: Grid, moving_grid: Grid) -> Tensor:
    """World map ``(B, ndim, *fixed_grid.shape)`` -> pixel flow (same layout), the inverse of
    :func:`world_map_from_pixel_flow`.

    Convention: see :func:`world_map_from_pixel_flow`; alignkit's own flow is :func:`flow_from_world_map`.
    """
    if tuple(world_map.shape[2:]) != fixed_grid.shape or world_map.shape[1] != fixed_grid.ndim:
        raise ShapeError(f"world map {tuple(world_map.shape)} does not live on {fixed_grid}")
    moving_voxel = apply_matrix(moving_grid.voxel_from_world, world_map)
    identity = fixed_grid.voxel_points(dtype=moving_voxel.dtype, device=moving_voxel.device)
    return reverse_components(moving_voxel - identity)


def voxel_identity(shape: Sequence[int], *, like: Tensor) -> Tensor:
    """Voxel coordinates ``(1, ndim, *shape)`` (array-axis order) in ``like``'s dtype and device.

    Convention: the identity map of a grid of ``shape`` in its own voxel frame.
    """
    return Grid.from_spacing(tuple(int(s) for s in shape)).voxel_points(dtype=like.dtype, device=like.device)


def world_to_voxel_vectors(field: Tensor, grid: Grid) -> Tensor:
    """World-unit vectors ``(B, ndim, *S)`` -> voxel-frame vectors of ``grid`` (array-axis order, voxels).

    Convention: vectors (displacements, velocities), not points -- only the linear part of
    ``grid.voxel_from_world`` applies; components follow the world axes in, the array axes out.
    """
    ndim = grid.ndim
    linear = grid.voxel_from_world[:ndim, :ndim].to(dtype=field.dtype, device=field.device)
    return torch.einsum("ij,bj...->bi...", linear, field)


def voxel_to_world_vectors(field: Tensor, grid: Grid) -> Tensor:
    """Voxel-frame vectors of ``grid`` ``(B, ndim, *S)`` (array-axis order) -> world-unit vectors:
    the inverse of :func:`world_to_voxel_vectors`."""
    ndim = grid.ndim
    linear = grid.world_from_voxel[:ndim, :ndim].to(dtype=field.dtype, device=field.device)
    return torch.einsum("ij,bj...->bi...", linear, field)

