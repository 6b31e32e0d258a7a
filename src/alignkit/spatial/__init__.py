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
* Frame conversions live in :mod:`alignkit.spatial.frames` and nowhere else: voxel <-> unit
  (``[-1, 1]`` per array axis) <-> ``grid_sample``'s normalised frame (:func:`voxel_to_normalized`,
  the only function that builds ``grid_sample`` grids) <-> pixel (components in reversed array-axis
  order: OpenCV's ``x = column``) <-> world; flows <-> world maps; flows <-> ``.flo`` layout.
* A **flow** -- the one meaning of the word everywhere in alignkit (``Case.flow``, the ``flow`` of
  training pairs, :meth:`Registration.flow() <alignkit.registration.Registration.flow>`, the
  displacement fields networks predict) -- is ``(ndim, *S)`` float32 on the fixed grid of shape
  ``S``: a displacement **in voxels of the fixed grid**, components in **array-axis order**
  (``(dy, dx)`` = (row, column) in 2D, ``(dz, dy, dx)`` in 3D), **fixed → moving**:
  ``fixed(p) ≈ moving(p + flow(p))``, where ``p + flow(p)`` is a moving point written in the fixed
  grid's voxel coordinates (the moving image read through the world identity).
  :func:`flow_from_world_map` / :func:`world_map_from_flow` convert it to and from a world map, and
  world vectors are :func:`voxel_to_world_vectors` of it. Middlebury ``.flo`` files, OpenCV and the
  flow metrics use ``(H, W, 2)`` with components x (column) then y (row), same units and direction:
  :func:`xy_from_flow` / :func:`flow_from_xy` are the one conversion to and from that layout.
* Fields predicted by networks are flows of their own grid
  (:func:`rescale_voxel_displacement` moves them between corner-aligned grids).
"""

from alignkit.spatial.bspline import cubic_bspline, cubic_bspline_taps
from alignkit.spatial.filters import box_sum, gaussian_blur, gaussian_kernel1d, separable_filter
from alignkit.spatial.frames import (
    apply_matrix,
    flow_from_world_map,
    flow_from_xy,
    homogeneous,
    normalized_from_voxel,
    pixel_flow_from_world_map,
    pixel_from_voxel,
    reverse_components,
    unit_from_voxel,
    voxel_identity,
    voxel_matrix_from_unit_matrix,
    voxel_to_normalized,
    voxel_to_world_vectors,
    world_from_pixel,
    world_map_from_flow,
    world_map_from_pixel_flow,
    world_matrix_from_pixel_matrix,
    world_to_voxel_vectors,
    xy_from_flow,
)
from alignkit.spatial.grid import Grid
from alignkit.spatial.jacobian import (
    jacobian_determinant,
    jacobian_matrix,
    nonpositive_jacobian_percent,
    small_determinant,
    spatial_gradient,
)
from alignkit.spatial.linear_sampling import (
    sample_voxels_twice_differentiable,
    twice_differentiable_sampling,
    twice_differentiable_sampling_active,
)
from alignkit.spatial.points import (
    points_to_tensor,
    rescale_voxel_displacement,
    resize_field,
    resize_image,
    sample_affine,
    sample_voxels,
    sample_world,
    tensor_to_points,
)
from alignkit.spatial.pyramid import downsample, gaussian_pyramid

__all__ = [
    "Grid",
    "apply_matrix",
    "box_sum",
    "cubic_bspline",
    "cubic_bspline_taps",
    "downsample",
    "flow_from_world_map",
    "flow_from_xy",
    "gaussian_blur",
    "gaussian_kernel1d",
    "gaussian_pyramid",
    "homogeneous",
    "jacobian_determinant",
    "jacobian_matrix",
    "nonpositive_jacobian_percent",
    "normalized_from_voxel",
    "pixel_flow_from_world_map",
    "pixel_from_voxel",
    "points_to_tensor",
    "rescale_voxel_displacement",
    "resize_field",
    "resize_image",
    "reverse_components",
    "sample_affine",
    "sample_voxels",
    "sample_voxels_twice_differentiable",
    "sample_world",
    "separable_filter",
    "small_determinant",
    "spatial_gradient",
    "tensor_to_points",
    "twice_differentiable_sampling",
    "twice_differentiable_sampling_active",
    "unit_from_voxel",
    "voxel_identity",
    "voxel_matrix_from_unit_matrix",
    "voxel_to_normalized",
    "voxel_to_world_vectors",
    "world_from_pixel",
    "world_map_from_flow",
    "world_map_from_pixel_flow",
    "world_matrix_from_pixel_matrix",
    "world_to_voxel_vectors",
    "xy_from_flow",
]
