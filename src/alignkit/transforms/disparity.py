"""Disparity: a dense displacement along one axis only -- stereo as one-dimensional registration.

Convention
----------
Fixed = the **left** image, moving = the **right** image of a rectified pair. A left pixel at column
``x`` shows the same point as the right pixel at column ``x - d``: ``left(x, y) = right(x - d, y)``
(Middlebury and KITTI's disparity, ``d >= 0`` for points in front of the cameras). The epipolar
axis is the grid's **last array axis** (columns of a 2D raster; world ``x`` for a PNG, see
:mod:`alignkit.spatial`), so the map is

    x_world  ->  x_world - d(x) * e

with ``e`` the world vector of one step along that axis divided by its length (the unit epipolar
direction). The parameter ``disparity`` ``(1, 1, *grid.shape)`` holds ``d`` in **world units**
along ``e`` (pixels times the column spacing; plain pixels for a raster), so moving it between
pyramid levels is interpolation only, like the other fields (:mod:`alignkit.transforms.dense`). In
:mod:`alignkit.spatial`'s flow convention the model's flow is ``(0, -d)`` in 2D.

The model is a :class:`~alignkit.transforms.base.FieldTransform`: it composes with any other stage
and exports as an ITK/ANTs displacement field (``warp.nii.gz``) whose row component is zero.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from alignkit.errors import ShapeError
from alignkit.spatial.grid import Grid
from alignkit.spatial.points import sample_world
from alignkit.transforms.base import FieldTransform
from alignkit.transforms.dense import resample_field


def epipolar_direction(grid: Grid) -> Tensor:
    """``(ndim,)`` float64 unit world vector of one step along ``grid``'s last array axis."""
    column = grid.world_from_voxel[: grid.ndim, grid.ndim - 1]
    return column / column.norm()


class DisparityField(FieldTransform):
    """Free-form disparity along the epipolar axis: parameter ``disparity`` ``(1, 1, *grid.shape)``,
    world units (module docstring). ``occluded`` is an optional ``(*grid.shape)`` bool buffer
    marking where the disparity was filled in rather than measured (the left-right check of
    :func:`alignkit.stereo.left_right_check`); it travels with the model and is written next to it."""

    kind = "disparity"

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.disparity = nn.Parameter(torch.zeros(1, 1, *grid.shape, dtype=torch.get_default_dtype()))
        self.register_buffer("occluded", None)
        self.register_buffer("direction", epipolar_direction(grid).float().view(1, grid.ndim, *([1] * grid.ndim)))

    @classmethod
    def from_pixels(cls, disparity: Tensor, grid: Grid, *, occluded: Tensor | None = None) -> DisparityField:
        """The model holding ``disparity`` given in **pixels** of ``grid``'s epipolar axis
        (``(H, W)``, ``(1, H, W)`` or ``(1, 1, H, W)`` in 2D), e.g. a stereo matcher's output."""
        disparity = torch.as_tensor(disparity)
        values = disparity.reshape(1, 1, *disparity.shape[-grid.ndim:])
        if tuple(values.shape[2:]) != grid.shape:
            raise ShapeError(f"disparity {tuple(disparity.shape)} does not match the grid {grid.shape}")
        out = cls(grid)
        step = float(grid.world_from_voxel[: grid.ndim, grid.ndim - 1].norm())
        with torch.no_grad():
            out.disparity.copy_(values.to(out.disparity) * step)
        if occluded is not None:
            out.occluded = torch.as_tensor(occluded, dtype=torch.bool).reshape(grid.shape)
        return out

    def displacement(self) -> Tensor:
        return -self.disparity * self.direction.to(self.disparity)

    def transform_points(self, world: Tensor) -> Tensor:
        """``world - d(world) e``: the one-channel disparity sampled at the points (border padding, as
        :meth:`FieldTransform.transform_points`), not the two- or three-channel displacement
        ``-d e`` -- bilinear interpolation is linear, so the two agree to rounding (exactly on a
        raster, ``e = (1, 0)``; ``tests/test_stereo_speed.py``) at a fraction of the sampling and its
        backward pass (the stereo preset's refinement samples its SGM start at every step)."""
        disparity = self.disparity
        sampled = sample_world(disparity.expand(world.shape[0], *disparity.shape[1:]), self.grid, world,
                               padding="border")
        direction = self.direction.to(sampled).reshape(1, self.grid.ndim, *([1] * (world.dim() - 2)))
        return world - sampled * direction

    def pixels(self) -> Tensor:
        """``(1, 1, *grid.shape)`` disparity in pixels of the grid's epipolar axis."""
        step = float(self.grid.world_from_voxel[: self.grid.ndim, self.grid.ndim - 1].norm())
        return self.disparity / step

    def regularizer_field(self) -> tuple[Tensor, Grid]:
        """The displacement (its off-axis components are zero), so every field regulariser, written
        for ``(B, ndim, *S)`` fields, applies unchanged."""
        return self.displacement(), self.grid

    def resampled(self, grid: Grid) -> DisparityField:
        """The same disparity on ``grid`` (interpolated, see :func:`resample_field`; the occlusion
        mask does not follow a change of grid)."""
        out = DisparityField(grid).to(self.disparity.device, self.disparity.dtype)
        with torch.no_grad():
            out.disparity.copy_(resample_field(self.disparity.detach(), self.grid, grid))
        return out
