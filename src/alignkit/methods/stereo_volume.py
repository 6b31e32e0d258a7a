"""``stereo-volume``: an end-to-end cost-volume stereo network (issue 16, the survey's §2.2).

Where ``stereo-net`` learns only the matching cost and keeps semi-global matching, this network learns
the aggregation too (:class:`~alignkit.nets.stereo_volume.CostVolumeStereo`: features, a correlation
or concatenation volume, 3D convolutions, soft-argmin; after Kendall et al., "End-to-End Learning of
Geometry and Context for Deep Stereo Regression", ICCV 2017). Training:

* ``supervision="supervised"`` -- smooth-L1 between the soft-argmin disparity and the ground truth on
  its known, non-occluded pixels (synthetic layered pairs, and crops of real pairs with ground truth);
* ``supervision="self"`` -- no ground truth used: the photometric, smoothness and left-right
  consistency losses of unsupervised flow (:class:`~alignkit.losses.unsupervised_flow.UnsupervisedFlowLoss`:
  census photometric term weighted by the forward-backward -- here left-right -- occlusion check,
  edge-aware smoothness, consistency), with the left disparity as the flow ``(0, -d_L)`` and the
  right one, from the mirrored pair, as ``(0, +d_R)`` (as Godard et al., "Unsupervised Monocular
  Depth Estimation with Left-Right Consistency", CVPR 2017, train disparity without ground truth);
* ``supervision="mixed"`` -- both, the self-supervised loss weighted by ``self_weight``.

Pairs: those of ``stereo-net`` (:class:`~alignkit.methods.stereo_net.StereoPairs`: synthetic pairs
rendered from photographs with a random depth layering plus crops of ``--dataset``'s real pairs),
validated on held-out synthetic pairs (bad-2 and EPE of the network's disparity).

``alignkit train --method stereo-volume --dataset stereo/motorcycle --size 64 128 --option
supervision=self -o RUN``; ``alignkit register LEFT RIGHT --method stereo-volume --checkpoint RUN
[--max-disparity D]`` writes the disparity (``disparity.pfm``/``.png``, ``occlusion.png`` from the
left-right check of the mirrored pass). No model ships: measured, it does not beat the shipped
``stereo-net`` (``benchmarks/README.md``, stereo section).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from alignkit.errors import ConfigError, InputError
from alignkit.methods.base import MethodInfo, MethodOutput, ProgressFactory
from alignkit.methods.learned import LearnedMethod, LearnedModel, learned_method
from alignkit.methods.stereo_net import StereoNet, disparity_output, normalise_pair
from alignkit.registration import Inputs
from alignkit.stereo import check_rectified_pair, default_disparity_range
from alignkit.stereo.sgm import left_right_check
from alignkit.transforms import DisparityField, Transform

SUPERVISION = ("supervised", "self", "mixed")


def _mirror(image: Tensor) -> Tensor:
    return image.flip(-1)


class StereoVolumeMethod(LearnedMethod):
    """Registers a rectified pair (fixed = left, moving = right) with a trained ``stereo-volume``
    network. Options: ``checkpoint`` (required: no model ships), ``min_disparity``/``max_disparity``
    (pixels; default 0 and a fifth of the width)."""

    def __init__(self, *, checkpoint: LearnedModel | str | os.PathLike | None = None,
                 min_disparity: float | None = None, max_disparity: float | None = None) -> None:
        super().__init__(checkpoint=checkpoint)
        self.min_disparity, self.max_disparity = min_disparity, max_disparity

    def run(self, inputs: Inputs, *, device: torch.device, seed: int | None, progress: ProgressFactory) -> MethodOutput:
        check_rectified_pair(inputs.fixed.shape, inputs.moving.shape, "stereo-volume", error=InputError)
        learned, source = self.model(2, device)
        assert isinstance(learned, StereoVolume)
        started = time.perf_counter()
        left, right = normalise_pair(inputs.fixed.data.cpu(), inputs.moving.data.cpu())
        low, high = default_disparity_range(left.shape[-1], self.min_disparity, self.max_disparity)
        disparity, occluded = learned.disparity(left, right, low, high, device=device)
        return disparity_output(self.info.name, learned, source, inputs, disparity, occluded, started,
                                min_disparity=low, max_disparity=high)


@learned_method(MethodInfo(
    name="stereo-volume",
    kind="learned",
    summary="cost-volume stereo network (features, correlation/concatenation volume, 3D-convolution "
    "aggregation, soft-argmin); supervised or self-supervised (photometric + smoothness + left-right)",
    ndims=(2,),
    modalities=("mono",),
    case_kinds=("stereo",),
    reference="Kendall et al., End-to-End Learning of Geometry and Context for Deep Stereo Regression, ICCV "
    "2017; Godard et al., Unsupervised Monocular Depth Estimation with Left-Right Consistency, CVPR 2017",
), runner=StereoVolumeMethod)
class StereoVolume(LearnedModel):
    """Cost-volume stereo (module docstring). Options: ``supervision`` (``supervised``, ``self``,
    ``mixed``), ``max_disparity`` (of the training scenes and the training volume, 32),
    ``smoothness_weight`` (0.1) / ``consistency_weight`` (0.02) / ``census_weight`` (1.0) of the
    self-supervised loss, ``self_weight`` (1.0, ``mixed``)."""

    @classmethod
    def default_networks(cls, ndim: int) -> dict[str, dict[str, Any]]:
        return {"stereo": {"name": "stereo_volume", "ndim": 2, "in_channels": 1, "features": 16, "aggregation": 8,
                           "layers3d": 4, "volume": "correlation", "downsample": 4}}

    def __init__(self, *, networks: Mapping[str, nn.Module], ndim: int, size: Sequence[int],
                 supervision: str = "supervised", max_disparity: float = 32.0, smoothness_weight: float = 0.1,
                 consistency_weight: float = 0.02, census_weight: float = 1.0, self_weight: float = 1.0) -> None:
        super().__init__(networks=networks, ndim=ndim, size=size)
        if ndim != 2:
            raise ConfigError("stereo-volume is 2D")
        if supervision not in SUPERVISION:
            raise ConfigError(f"supervision must be one of {', '.join(SUPERVISION)}, got {supervision!r}")
        if max_disparity <= 2 or min(smoothness_weight, consistency_weight, census_weight, self_weight) < 0:
            raise ConfigError("stereo-volume needs max_disparity > 2 and non-negative loss weights")
        self.options = {"supervision": supervision, "max_disparity": float(max_disparity),
                        "smoothness_weight": float(smoothness_weight), "consistency_weight": float(consistency_weight),
                        "census_weight": float(census_weight), "self_weight": float(self_weight)}
        from alignkit.losses.unsupervised_flow import UnsupervisedFlowLoss

        self.unsupervised = UnsupervisedFlowLoss(census_weight=census_weight, smoothness_weight=smoothness_weight,
                                                 consistency_weight=consistency_weight)

    @classmethod
    def training_data(cls, config: Any) -> tuple[Dataset, Dataset]:
        """The pairs of ``stereo-net`` (:meth:`StereoNet.training_data`)."""
        return StereoNet.training_data(config)

    # -- training -------------------------------------------------------------------------------
    def _range(self) -> tuple[int, int]:
        return 0, int(np.ceil(self.options["max_disparity"]))

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        left, right = batch["fixed"].float(), batch["moving"].float()
        low, high = self._range()
        out = {"disparity": self.stereo(left, right, low, high)}
        if self.options["supervision"] != "supervised":
            out["right_disparity"] = _mirror(self.stereo(_mirror(right), _mirror(left), low, high))
        return out

    def loss(self, batch: Mapping[str, Tensor], output: Mapping[str, Tensor], *, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        disparity = output["disparity"]
        parts: dict[str, Tensor] = {}
        total = disparity.new_zeros(())
        if self.options["supervision"] in ("supervised", "mixed"):
            truth, valid = batch["disparity"].float(), batch["valid"]
            low, high = self._range()
            known = valid & (truth >= low) & (truth <= high)
            error = F.smooth_l1_loss(disparity, truth, reduction="none")
            supervised = (error * known).sum() / known.sum().clamp(min=1)
            parts["smooth_l1"] = supervised.detach()
            total = total + supervised
        if self.options["supervision"] in ("self", "mixed"):
            left, right = batch["fixed"].float(), batch["moving"].float()
            zeros = torch.zeros_like(disparity)
            # alignkit flows are (dy, dx) in voxels: left(p) = right(p + (0, -d_L)), right(p) = left(p + (0, d_R))
            forward_flow = torch.cat([zeros, -disparity], 1)
            backward_flow = torch.cat([zeros, output["right_disparity"]], 1)
            unsupervised, terms = self.unsupervised(left.clamp(0, 1), right.clamp(0, 1), forward_flow, backward_flow)
            parts.update({k: v.detach() for k, v in terms.items()})
            total = total + self.options["self_weight"] * unsupervised
        return total, parts

    @torch.no_grad()
    def validation_metrics(self, batch: Mapping[str, Tensor], output: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per pair, over its known non-occluded pixels: ``bad2`` (share off by more than 2 px) and
        ``epe`` of the network's disparity."""
        error = (output["disparity"] - batch["disparity"].float()).abs()[:, 0]
        valid = batch["valid"][:, 0]
        count = valid.flatten(1).sum(1).clamp(min=1)
        bad2 = ((error > 2) & valid).flatten(1).sum(1) / count
        epe = (error * valid).flatten(1).sum(1) / count
        return {"bad2": bad2.double().cpu(), "epe": epe.double().cpu()}

    # -- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def disparity(self, left: Tensor, right: Tensor, min_disparity: int, max_disparity: int, *,
                  device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """``(left disparity (H, W) px, occluded (H, W) bool)`` of a normalised grey pair
        (:func:`normalise_pair`); occlusion from the left-right check against the mirrored pass."""
        self.eval()
        device = torch.device(device or "cpu")
        left_b, right_b = left[None, None].to(device), right[None, None].to(device)
        disparity = self.stereo(left_b, right_b, min_disparity, max_disparity)[0, 0].cpu()
        right_disparity = _mirror(self.stereo(_mirror(right_b), _mirror(left_b), min_disparity, max_disparity))[0, 0].cpu()
        return disparity, left_right_check(disparity, right_disparity)

    def predict_transform(self, grid: Any, fixed: Tensor, moving: Tensor) -> Transform:
        """The disparity of a pair already on the network grid (``(1, 1, H, W)`` each)."""
        left, right = normalise_pair(fixed[0, 0].cpu(), moving[0, 0].cpu())
        low, high = default_disparity_range(left.shape[-1], 0, self.options["max_disparity"])
        disparity, occluded = self.disparity(left, right, low, high, device=fixed.device)
        return DisparityField.from_pixels(disparity, grid, occluded=occluded).requires_grad_(False)
