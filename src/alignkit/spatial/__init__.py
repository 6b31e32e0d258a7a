"""Coordinates, grids, resampling, composition helpers, Jacobians and pyramids.

This package is the one place where alignkit's conventions live; it imports nothing else of ours.

Conventions
-----------
* Tensors are ``(B, C, *spatial)`` with spatial ``(H, W)`` or ``(D, H, W)``; code is written once
  for both.
* **voxel frame**: continuous array indices in array-axis order; voxel centres on integers.
* **world frame**: physical coordinates, ITK/DICOM **LPS**, components ``(x, y[, z])``. For 2D
  rasters (PNG/JPEG/TIFF) world ``x`` is the column and ``y`` the row, as ITK reads them.
* A :class:`Grid` is a shape plus ``world_from_voxel`` (float64 homogeneous matrix).
* A **map** ``(B, ndim, *S)`` holds world points; a **displacement** is map minus identity, in
  world units and world component order -- exactly ITK's displacement-field convention.
* **Direction**: a transform maps *fixed* world points to *moving* world points, so
  ``warped = moving ∘ map`` is the moving image resampled on the fixed grid.
* Every resize keeps the first and last voxel centres fixed (``align_corners=True``).
* :func:`voxel_to_normalized` is the only function that knows ``grid_sample``'s frame.
"""

from alignkit.spatial.filters import box_sum, gaussian_blur, gaussian_kernel1d, separable_filter
from alignkit.spatial.grid import Grid
from alignkit.spatial.jacobian import (
    jacobian_determinant,
    jacobian_matrix,
    nonpositive_jacobian_percent,
    spatial_gradient,
)
from alignkit.spatial.points import (
    apply_matrix,
    points_to_tensor,
    resize_field,
    resize_image,
    sample_voxels,
    sample_world,
    tensor_to_points,
    voxel_to_normalized,
)
from alignkit.spatial.pyramid import downsample, gaussian_pyramid

__all__ = [
    "Grid",
    "apply_matrix",
    "box_sum",
    "downsample",
    "gaussian_blur",
    "gaussian_kernel1d",
    "gaussian_pyramid",
    "jacobian_determinant",
    "jacobian_matrix",
    "nonpositive_jacobian_percent",
    "points_to_tensor",
    "resize_field",
    "resize_image",
    "sample_voxels",
    "sample_world",
    "separable_filter",
    "spatial_gradient",
    "tensor_to_points",
    "voxel_to_normalized",
]
