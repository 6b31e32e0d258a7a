"""Evaluation metrics: overlap, surface distances, TRE, flow errors, Jacobians, inverse consistency,
PCK, homography corner errors, descriptor mAP and the global NCC of two images.

Every function accepts numpy arrays or torch tensors and returns plain Python floats / ints / dicts
(ready for ``json.dumps``). Conventions are stated in each submodule's docstring:
:mod:`~alignkit.metrics.overlap` (label maps), :mod:`~alignkit.metrics.distance` (masks, spacing in
world units, surfaces), :mod:`~alignkit.metrics.flow` (``(H, W, 2)`` flows in pixels, validity,
occlusion), :mod:`~alignkit.metrics.jacobian` (folds and their severity, Shen et al. 2019 Table 1),
:mod:`~alignkit.metrics.consistency` (``φ_ts ∘ φ_st`` away from the border, Shen et al. 2019 Fig. 7),
:mod:`~alignkit.metrics.keypoints` (PCK, Zampieri et al. 2018 §4), :mod:`~alignkit.metrics.homography` (corner
convention, success rates) and :mod:`~alignkit.metrics.descriptors` (the matching protocol of Dong et al. 2018 §6).
"""

from alignkit.metrics.consistency import inverse_consistency_error
from alignkit.metrics.descriptors import descriptor_ap, descriptor_map
from alignkit.metrics.disparity import disparity_errors
from alignkit.metrics.distance import (
    average_surface_distance,
    hausdorff_distance,
    hd95,
    hd95_per_label,
    surface_distances,
    tre,
)
from alignkit.metrics.flow import endpoint_error, fl_all, flow_error_stats
from alignkit.metrics.homography import (
    corner_error,
    corner_errors,
    homography_point_error,
    image_corners,
    success_rates,
)
from alignkit.metrics.jacobian import jacobian_determinant_from_map, jacobian_stats
from alignkit.metrics.keypoints import pck
from alignkit.metrics.overlap import dice_per_label, mean_dice
from alignkit.metrics.similarity import ncc

__all__ = [
    "average_surface_distance",
    "corner_error",
    "corner_errors",
    "descriptor_ap",
    "descriptor_map",
    "dice_per_label",
    "disparity_errors",
    "endpoint_error",
    "fl_all",
    "flow_error_stats",
    "hausdorff_distance",
    "hd95",
    "hd95_per_label",
    "homography_point_error",
    "image_corners",
    "inverse_consistency_error",
    "jacobian_determinant_from_map",
    "jacobian_stats",
    "mean_dice",
    "ncc",
    "pck",
    "success_rates",
    "surface_distances",
    "tre",
]
