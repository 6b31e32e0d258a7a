"""``voxelmorph``: VoxelMorph-style unsupervised registration as a learned method.

One U-Net on ``concat(moving, fixed)`` predicts a stationary velocity field; scaling and squaring
turns it into a diffeomorphic displacement. A model trained on OASIS-TRT-20 brains ships with
alignkit (:mod:`alignkit.methods.shipped`), so ``alignkit register F M --method voxelmorph`` runs on
3D brain MRI without training; ``alignkit train --method voxelmorph`` trains others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError, ShapeError
from alignkit.methods.base import MethodInfo
from alignkit.methods.heads import LearnedSVF, integrate_velocity, landmark_errors, voxel_grid
from alignkit.methods.learned import LearnedModel, learned_method
from alignkit.spatial import Grid
from alignkit.transforms import Transform

SimilarityChoice = Literal["lncc", "mse", "ncc"]


@learned_method(MethodInfo(
    name="voxelmorph",
    kind="learned",
    summary="U-Net predicting a stationary velocity field integrated by scaling and squaring "
    "(diffeomorphic); unsupervised, with optional Dice, landmark or true-field supervision",
    ndims=(2, 3),
    modalities=("mono",),
    case_kinds=("deformable", "flow"),
    needs_checkpoint=True,
    reference="Balakrishnan et al., VoxelMorph: A Learning Framework for Deformable Medical Image "
    "Registration, IEEE TMI 2019; Dalca et al., Unsupervised Learning of Probabilistic Diffeomorphic "
    "Registration for Images and Surfaces, MedIA 2019",
))
class VoxelMorph(LearnedModel):
    """VoxelMorph-style unsupervised registration (Balakrishnan et al. 2019; Dalca et al. 2019).

    A U-Net on ``concat(moving, fixed)`` predicts a stationary velocity (at the network's
    ``output_scale``, 0.5 = half resolution), integrated by scaling and squaring (``steps``
    squarings) into a diffeomorphic displacement that warps the moving image. Loss::

        similarity(warped, fixed) + regularizer_weight * diffusion(velocity)
            + dice_weight * soft-Dice(warped one-hot moving labels, fixed one-hot labels)
            + flow_weight * mean squared error to the true displacement (synthetic pairs)
            + landmark_weight * mean distance |p + u(p) - q| of corresponding landmarks p, q
              (network-grid voxels; data with landmark files)

    ``similarity`` is ``lncc`` (squared local NCC, ``window`` voxels), ``ncc`` or ``mse``. The
    default ``regularizer_weight`` is VoxelMorph's λ (1 with NCC, 0.01 with MSE on [0, 1]
    intensities) divided by ``ndim²``: alignkit's :class:`~alignkit.losses.Diffusion` sums the
    squared derivatives over components and axes where VoxelMorph's gradient loss averages them.
    ``label_ids`` are the one-hot channels of the Dice term (set from the training data).
    ``prealign`` (``"affine"``/``"rigid"``/None) records how the training data were aligned, and
    is what :func:`alignkit.register` runs before the network unless told otherwise.
    """

    @classmethod
    def default_networks(cls, ndim: int) -> dict[str, dict[str, Any]]:
        return {"network": {"name": "unet", "features": [16, 32, 32, 32], "residual": False, "output_scale": 1.0,
                            "ndim": ndim, "in_channels": 2, "out_channels": ndim}}

    def __init__(
        self,
        *,
        networks: Mapping[str, nn.Module],
        ndim: int,
        size: Sequence[int],
        similarity: SimilarityChoice = "lncc",
        window: int = 9,
        regularizer_weight: float | None = None,
        dice_weight: float = 0.0,
        flow_weight: float = 0.0,
        landmark_weight: float = 0.0,
        steps: int = 7,
        label_ids: Sequence[int] | None = None,
        prealign: str | None = None,
    ) -> None:
        super().__init__(networks=networks, ndim=ndim, size=size)
        from alignkit.losses import DiceLoss, Diffusion, build_similarity

        if similarity not in ("lncc", "mse", "ncc"):
            raise ConfigError(f"voxelmorph similarity must be lncc, ncc or mse, got {similarity!r}")
        if regularizer_weight is None:
            # VoxelMorph's lambda (1 with NCC, 0.01 with MSE) in this Diffusion's units: VoxelMorph's
            # gradient loss averages over axes and components, alignkit's sums them (ndim^2 terms)
            regularizer_weight = (0.01 if similarity == "mse" else 1.0) / ndim**2
        weights = {"regularizer_weight": regularizer_weight, "dice_weight": dice_weight, "flow_weight": flow_weight,
                   "landmark_weight": landmark_weight}
        for name, value in weights.items():
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if steps < 0:
            raise ConfigError(f"steps must be >= 0, got {steps}")
        if prealign not in (None, "affine", "rigid"):
            raise ConfigError(f"prealign must be affine, rigid or None, got {prealign!r}")
        self.options = {
            "similarity": similarity,
            "window": int(window),
            "regularizer_weight": float(regularizer_weight),
            "dice_weight": float(dice_weight),
            "flow_weight": float(flow_weight),
            "landmark_weight": float(landmark_weight),
            "steps": int(steps),
            "label_ids": None if label_ids is None else [int(v) for v in label_ids],
            "prealign": prealign,
        }
        options = {"window": int(window)} if similarity == "lncc" else {}
        self.similarity = build_similarity(similarity, **options)
        self.regularizer = Diffusion()
        self.dice = DiceLoss()

    @property
    def label_ids(self) -> list[int] | None:
        return self.options["label_ids"]

    @label_ids.setter
    def label_ids(self, values: Sequence[int] | None) -> None:
        self.options["label_ids"] = None if values is None else [int(v) for v in values]

    def velocity(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """The network's velocity ``(B, ndim, *S_out)`` in network-grid voxels, float32."""
        if fixed.shape != moving.shape or fixed.dim() != self.ndim + 2:
            raise ShapeError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must be equal (B, 1, *S)")
        # float32 for the integration and losses even under autocast: repeated squaring and the
        # local variances of LNCC lose every digit in float16
        return self.network(torch.cat([moving, fixed], dim=1)).float()

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        fixed, moving = batch["fixed"], batch["moving"]
        velocity = self.velocity(fixed, moving)
        # the transform head runs in float32 whatever autocast chose for the network
        with torch.autocast(device_type=velocity.device.type, enabled=False):
            displacement = integrate_velocity(velocity, fixed.shape[2:], self.options["steps"])
            warped = self.warp(moving.float(), displacement)
        return {"velocity": velocity, "displacement": displacement, "warped": warped}

    def similarity_score(self, warped: Tensor, fixed: Tensor) -> Tensor:
        return self.similarity(warped, fixed.float())

    def loss(self, batch: Mapping[str, Tensor], output: Mapping[str, Tensor], *, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """(total, parts): every part is a batch mean of per-pair values (see the module docstring)."""
        fixed = batch["fixed"].float()
        parts: dict[str, Tensor] = {"similarity": self.similarity(output["warped"], fixed)}
        total = parts["similarity"]
        weight = self.options["regularizer_weight"]
        if weight > 0:
            velocity = output["velocity"]
            low = voxel_grid(fixed.shape[2:]).resized(tuple(velocity.shape[2:]))
            parts["diffusion"] = self.regularizer(velocity, low.spacing.tolist())
            total = total + weight * parts["diffusion"]
        if self.options["dice_weight"] > 0 and "fixed_labels" in batch:
            parts["dice"] = self.dice_loss(batch, output["displacement"])
            total = total + self.options["dice_weight"] * parts["dice"]
        if self.options["landmark_weight"] > 0 and "fixed_points" in batch:
            errors = landmark_errors(output["displacement"], batch["fixed_points"], batch["moving_points"],
                                     batch["points_mask"])
            parts["landmarks"] = errors.nan_to_num(0.0).mean()  # a pair without landmarks adds 0
            total = total + self.options["landmark_weight"] * parts["landmarks"]
        if self.options["flow_weight"] > 0 and "flow" in batch:
            error = ((output["displacement"] - batch["flow"].float()) ** 2).sum(1).flatten(1)
            if "flow_mask" in batch:  # a data set's truth, known only where its mask is 1
                mask = batch["flow_mask"].float().flatten(1)
                parts["flow"] = ((error * mask).sum(1) / mask.sum(1).clamp_min(1)).mean()
            else:
                parts["flow"] = error.mean(1).mean()
            total = total + self.options["flow_weight"] * parts["flow"]
        return total, {k: v.detach() for k, v in parts.items()}

    def dice_loss(self, batch: Mapping[str, Tensor], displacement: Tensor) -> Tensor:
        from alignkit.losses import one_hot

        ids = self.label_ids
        if not ids:
            raise ConfigError("dice_weight > 0 needs label_ids (training data with labels)")
        fixed_onehot = one_hot(batch["fixed_labels"], ids)
        moving_onehot = one_hot(batch["moving_labels"], ids)
        return self.dice(self.warp(moving_onehot, displacement), fixed_onehot)

    def predict_transform(self, grid: Grid, fixed: Tensor, moving: Tensor) -> Transform:
        velocity = self.velocity(fixed, moving)
        return LearnedSVF(grid, velocity, steps=self.options["steps"])
