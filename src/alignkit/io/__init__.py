"""Reading and writing images, flows, landmarks and transform files.

All geometry is in the LPS world frame of :mod:`alignkit.spatial`; transforms map fixed points to
moving points. Every writer is atomic (:func:`atomic_path`); every reader failure is an
:class:`alignkit.errors.InputError` naming the file.
"""

from alignkit.io.atomic import atomic_path, full_suffix
from alignkit.io.disparity import (
    read_disparity,
    read_kitti_disparity,
    read_pfm,
    write_kitti_disparity,
    write_pfm,
)
from alignkit.io.flo import flow_valid_mask, read_flo, read_kitti_flow, write_flo
from alignkit.io.images import read_image, write_image
from alignkit.io.itk import (
    read_displacement_field,
    read_itk_linear,
    write_displacement_field,
    write_itk_linear,
)
from alignkit.io.points import read_points, write_points

__all__ = [
    "atomic_path",
    "flow_valid_mask",
    "full_suffix",
    "read_disparity",
    "read_displacement_field",
    "read_flo",
    "read_image",
    "read_itk_linear",
    "read_kitti_disparity",
    "read_kitti_flow",
    "read_pfm",
    "read_points",
    "write_displacement_field",
    "write_flo",
    "write_image",
    "write_itk_linear",
    "write_kitti_disparity",
    "write_pfm",
    "write_points",
]
