"""Objectives: image similarities, transformation regularisers and label/landmark prompt terms.

Every loss is an ``nn.Module`` with keyword-only options returning a scalar to **minimise**,
averaged over the batch. Similarities take ``(warped, fixed, mask=None)``; field regularisers
``(field, spacing=None)`` in world units; see each module for the exact conventions.
"""

from alignkit.losses.prompts import DiceLoss, LandmarkDistance, one_hot
from alignkit.losses.regularizers import (
    AffineInverseConsistency,
    AffinePrior,
    BendingEnergy,
    Diffusion,
    FieldRegularizerName,
    InverseConsistency,
    JacobianFoldPenalty,
    Laplacian,
    RegularizerName,
    TotalVariation,
    build_regularizer,
)
from alignkit.losses.similarity import (
    L1,
    LNCC,
    MSE,
    NCC,
    Charbonnier,
    MattesMI,
    MultiKernelLNCC,
    SimilarityName,
    build_similarity,
)
from alignkit.losses.unsupervised_flow import (
    UnsupervisedFlowLoss,
    census_transform,
    edge_aware_smoothness,
    forward_backward_occlusion,
    multiscale_epe,
)

__all__ = [
    "L1",
    "LNCC",
    "MSE",
    "NCC",
    "AffineInverseConsistency",
    "AffinePrior",
    "BendingEnergy",
    "Charbonnier",
    "DiceLoss",
    "Diffusion",
    "FieldRegularizerName",
    "InverseConsistency",
    "JacobianFoldPenalty",
    "LandmarkDistance",
    "Laplacian",
    "MattesMI",
    "MultiKernelLNCC",
    "RegularizerName",
    "SimilarityName",
    "TotalVariation",
    "UnsupervisedFlowLoss",
    "build_regularizer",
    "build_similarity",
    "census_transform",
    "edge_aware_smoothness",
    "forward_backward_occlusion",
    "multiscale_epe",
    "one_hot",
]
