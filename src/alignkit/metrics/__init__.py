"""Evaluation metrics: label overlap, surface distances, TRE, optical-flow errors, Jacobian statistics.

Every function accepts numpy arrays or torch tensors and returns plain Python floats / ints / dicts
(ready for ``json.dumps``). Conventions are stated in each submodule's docstring:
:mod:`~alignkit.metrics.overlap` (label maps), :mod:`~alignkit.metrics.distance` (masks, spacing in
world units, surfaces), :mod:`~alignkit.metrics.flow` (``(H, W, 2)`` flows in pixels, validity).
"""

from alignkit.metrics.distance import (
    average_surface_distance,
    hausdorff_distance,
    hd95,
    hd95_per_label,
    surface_distances,
    tre,
)
from alignkit.metrics.flow import endpoint_error, fl_all, flow_error_stats, jacobian_stats
from alignkit.metrics.overlap import dice_per_label, mean_dice

__all__ = [
    "average_surface_distance",
    "dice_per_label",
    "endpoint_error",
    "fl_all",
    "flow_error_stats",
    "hausdorff_distance",
    "hd95",
    "hd95_per_label",
    "jacobian_stats",
    "mean_dice",
    "surface_distances",
    "tre",
]
