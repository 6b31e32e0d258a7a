"""``flownet-s``, ``flownet-c``, ``flownet-cs``: learned optical flow (the survey of deep-learning
registration, §2-3), supervised on synthetic motion and fine-tuned without ground truth.

The whole system, wired from parts that live elsewhere:

* **networks** (:mod:`alignkit.nets.flownet`): FlowNetSimple and FlowNetCorr of Dosovitskiy et al.,
  FlowNet: Learning Optical Flow with Convolutional Networks, ICCV 2015 (stacked frames, or a shared
  tower + the correlation layer of §2.1; the U-Net-like refinement decoder of §2.2 with a flow per
  level), and FlowNet 2.0's stacking (Ilg et al., CVPR 2017; §2.3): ``flownet-cs`` warps the second
  frame by the FlowNetC flow and refines with a FlowNetS. Narrow widths (16-128 channels, a fiftieth
  of FlowNet's) so that a model ships in 2 MiB and runs in a fraction of a second on a CPU;
* **supervised data**: FlyingChairs-style pairs generated on the fly from scikit-image photographs
  (:mod:`alignkit.data.synthetic_flow`; ``alignkit train --method flownet-c --dataset synthetic-flow``)
  with FlowNet's multi-scale end-point-error loss (:func:`alignkit.losses.unsupervised_flow.multiscale_epe`,
  level weights 0.32 ... 0.005);
* **unsupervised fine-tuning** (``--option unsupervised=true``; §3): crops of unlabelled consecutive
  frames (:mod:`alignkit.data.frame_pairs`; the pairs a data set scores are held out), the bidirectional
  occlusion-aware loss of :class:`alignkit.losses.unsupervised_flow.UnsupervisedFlowLoss` (soft census
  + optional Charbonnier photometric terms weighted by forward-backward occlusion masks, edge-aware
  smoothness, forward-backward consistency; Meister et al., UnFlow, AAAI 2018);
* **inference** coarse to fine on a pyramid of the frames, the second frame warped by the flow so far
  at each finer level (:class:`FlowNetRunner`: how far real motion reaches beyond the training pairs'),
  the finest level ``scale`` times the frames' size, each padded to a multiple of ``2**levels``; the flow is a
  :class:`~alignkit.methods.heads.LearnedDisplacement` -- ``flow.flo`` (x then y, pixels) and the
  colour-wheel QC panel come from :class:`~alignkit.registration.Registration`; ``refine=K`` refines it
  with the classical ``flow`` preset's objective (``refine_preset``).

Flow convention: alignkit's (:mod:`alignkit.spatial`), fixed = first frame, moving = second frame,
``fixed(p) ≈ moving(p + flow(p))``, pixels, array-axis order inside, ``.flo`` x-then-y on disk.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError
from alignkit.losses.unsupervised_flow import FLOWNET_LEVEL_WEIGHTS, UnsupervisedFlowLoss, multiscale_epe
from alignkit.methods.base import MethodInfo
from alignkit.methods.heads import LearnedDisplacement
from alignkit.methods.learned import LearnedMethod, LearnedModel, learned_method
from alignkit.nets.flownet import pad_to_multiple, resize_flow, resize_frames, stacked_flows, upsample_flow
from alignkit.nets.pyramid import compose_displacements, warp_voxels
from alignkit.registration import Inputs
from alignkit.spatial import Grid
from alignkit.train.protocol import TrainingStage
from alignkit.transforms import Transform

#: the ``--dataset`` name of the on-the-fly synthetic pairs
SYNTHETIC_DATASET = "synthetic-flow"

_FEATURES = [16, 32, 64, 96, 128]
_KERNELS = [7, 5, 5, 3, 3]


class FlowNetRunner(LearnedMethod):
    """Registers a pair of frames with a trained FlowNet, coarse to fine, then (``refine=K``) K
    iterations of the classical ``flow`` preset's variational stage.

    The network is trained on motions of at most ``max_motion`` pixels (12 for the shipped model) and
    predicts at a quarter of its input's resolution; real frames move further and have finer detail.
    Inference therefore runs it on a pyramid (``coarse_to_fine``, on by default): at the coarsest level
    on both frames, then at each finer level on the first frame and the second frame warped by the
    flow so far (FlowNet 2.0's stacking through the differentiable warp, §2.3 of the survey, with the one
    network at every scale as in SPyNet: Ranjan and Black, Optical Flow Estimation using a Spatial
    Pyramid Network, CVPR 2017), composing each level's residual with the flow so far (``u <- u o
    (id + r)``, not a sum). Each coarser level halves the sides, down to a shortest side of at least
    ``min_side`` pixels; ``scale`` is the finest level's size relative to the frames (> 1 up-samples
    them, which refines the quarter-resolution output), lowered where the finest level would exceed
    ``max_pixels`` (default ``2**22``; 0 = no cap) so that memory stays bounded on large frames (a Sintel pair,
    a 1.0-megapixel finest level, peaked at 485 MB resident in all): a 1920x1080 pair runs at 1.42, a
    3840x2160 one at 0.71.

    Defaults (``scale`` 1.5, ``min_side`` 48) chosen on tuning pairs that no benchmark scores -- six
    384x512 synthetic pairs with motions up to 40 px (``SyntheticFlowPairs`` seed 4242) and the two
    Middlebury stereo pairs as flow -- among settings whose 640x480 time stays under 0.2 s on two CPU
    threads (``benchmarks/README.md``, ``learned_flow.py``, session 12).

    ``checkpoint``: a checkpoint file or run folder (default: the model shipped with alignkit, where
    one ships); ``transform``: a linear pre-alignment (``"affine"``; default none: frames of a video);
    ``similarity``: the refinement's data term (default: the ``flow`` preset's)."""

    refine_preset = "flow"

    def __init__(self, *, checkpoint: LearnedModel | str | os.PathLike | None = None,
                 transform: str | list[str] | None = None, similarity: str | None = None,
                 scale: float = 1.5, coarse_to_fine: bool = True, min_side: int = 48,
                 max_pixels: int = 1 << 22) -> None:
        super().__init__(checkpoint=checkpoint, transform=transform, similarity=similarity)
        if not 0.05 <= float(scale) <= 4.0:
            raise ConfigError(f"scale must lie in [0.05, 4], got {scale}")
        if int(min_side) < 8:
            raise ConfigError(f"min_side must be at least 8 pixels, got {min_side}")
        if int(max_pixels) < 0:
            raise ConfigError(f"max_pixels must be >= 0 (0: no cap), got {max_pixels}")
        self.scale = float(scale)
        self.coarse_to_fine = bool(coarse_to_fine)
        self.min_side = int(min_side)
        self.max_pixels = int(max_pixels)

    def finest_scale(self, shape: Sequence[int]) -> float:
        """``scale``, lowered so that the finest level of frames of ``shape`` has at most ``max_pixels``."""
        pixels = math.prod(int(s) for s in shape)
        if self.max_pixels and pixels * self.scale**2 > self.max_pixels:
            return math.sqrt(self.max_pixels / pixels)
        return self.scale

    def predict_options(self, learned: LearnedModel, inputs: Inputs) -> dict[str, Any]:
        scale = self.finest_scale(inputs.fixed.grid.shape)
        size = [max(8, round(s * scale)) for s in inputs.fixed.grid.shape]
        return {"size": size, "coarse_levels": pyramid_depth(size, self.min_side) if self.coarse_to_fine else 0}


def pyramid_depth(size: Sequence[int], min_side: int) -> int:
    """How many times ``size`` can be halved with its shortest side staying at least ``min_side``."""
    levels, side = 0, min(int(s) for s in size)
    while side / 2 ** (levels + 1) >= min_side:
        levels += 1
    return levels


class FlowNetModel(LearnedModel):
    """What the three FlowNet methods share (module docstring). Options:

    * ``unsupervised`` (False): train with the unsupervised loss instead of the end-point error (the
      data then need no ground truth); ``census_weight`` (1), ``charbonnier_weight`` (0),
      ``smoothness_weight`` (0.1), ``edge_constant`` (10), ``consistency_weight`` (0.02),
      ``occlusion`` (True: forward-backward masks) are its terms, ``frames_include_scored`` (False)
      whether the unlabelled pairs may include those the data set scores;
    * ``level_weights``: the multi-scale EPE weights, finest first (FlowNet's 0.32 ... 0.005);
    * ``max_motion`` (pixels, 12), ``layers`` ([3, 8]): the synthetic pairs' largest object motion and
      object count (:func:`alignkit.data.synthetic_flow.random_scene`);
    * ``train_coarse_levels`` (0): train through the runner's coarse-to-fine inference with this many
      halvings below the crop (the loss sees the composed flow of every level; supervised training then
      scores that flow's end-point error, not the per-level ones). Fine-tuning a model that users run
      coarse to fine should see what that inference feeds the network: small residual motions between
      a frame and the other one warped, at every scale.
    """

    def __init__(
        self,
        *,
        networks: Mapping[str, nn.Module],
        ndim: int,
        size: Sequence[int],
        unsupervised: bool = False,
        level_weights: Sequence[float] = FLOWNET_LEVEL_WEIGHTS,
        census_weight: float = 1.0,
        charbonnier_weight: float = 0.0,
        smoothness_weight: float = 0.1,
        edge_constant: float = 10.0,
        consistency_weight: float = 0.02,
        occlusion: bool = True,
        frames_include_scored: bool = False,
        max_motion: float = 12.0,
        layers: Sequence[int] = (3, 8),
        prealign: str | None = None,
        train_coarse_levels: int = 0,
    ) -> None:
        super().__init__(networks=networks, ndim=ndim, size=size)
        if ndim != 2:
            raise ConfigError(f"{self.method_name} is trained on 2D frames; got ndim={ndim}")
        if int(train_coarse_levels) < 0:
            raise ConfigError(f"train_coarse_levels must be >= 0, got {train_coarse_levels}")
        if max_motion <= 0 or len(layers) != 2 or not 0 <= int(layers[0]) <= int(layers[1]):
            raise ConfigError(f"need max_motion > 0 and layers = [min, max]; got {max_motion}, {layers}")
        self.unsupervised_loss = UnsupervisedFlowLoss(
            census_weight=census_weight, charbonnier_weight=charbonnier_weight, smoothness_weight=smoothness_weight,
            edge_constant=edge_constant, consistency_weight=consistency_weight, occlusion=occlusion,
        )
        self.options = {
            "unsupervised": bool(unsupervised), "level_weights": [float(w) for w in level_weights],
            "census_weight": float(census_weight), "charbonnier_weight": float(charbonnier_weight),
            "smoothness_weight": float(smoothness_weight), "edge_constant": float(edge_constant),
            "consistency_weight": float(consistency_weight), "occlusion": bool(occlusion),
            "frames_include_scored": bool(frames_include_scored), "max_motion": float(max_motion),
            "layers": [int(v) for v in layers], "prealign": prealign,
            "train_coarse_levels": int(train_coarse_levels),
        }

    # -- data -------------------------------------------------------------------------------------
    @classmethod
    def training_data(cls, config: Any) -> tuple[Any, Any] | None:
        """``--dataset synthetic-flow``: :class:`~alignkit.data.synthetic_flow.SyntheticFlowPairs` of
        ``size`` (rounded up to a multiple of the network's ``2**levels``), ``synthetic_length`` pairs per
        epoch (default 2000), validation on a fixed set from another seed stream. With
        ``unsupervised=true`` and a flow data set (``flow/sintel``, ``flow/middlebury``, a folder;
        several comma-separated): crops of its unlabelled consecutive frames, validated on the synthetic
        set (its end-point error is known there). Otherwise None (the loop's own pairs)."""
        from alignkit.data.synthetic_flow import SyntheticFlowPairs
        from alignkit.train.subjects import parse_size

        options = dict(config.method_options)
        size = list(parse_size(config.size, 2))
        multiple = cls.size_multiple(config)
        size = [int(math.ceil(s / multiple) * multiple) for s in size]
        percentiles = config.intensity_percentiles or list(cls.intensity_percentiles)
        scene = {"max_motion": float(options.get("max_motion", 12.0)),
                 "layers": tuple(int(v) for v in options.get("layers", (3, 8)))}
        length = int(config.synthetic_length or 2000)
        n_val = max(8, min(64, round(config.val_fraction * length))) if config.val_fraction > 0 else 0
        val = SyntheticFlowPairs(size, length=n_val, seed=config.seed + 7919, per_epoch=False,
                                 percentiles=percentiles, **scene) if n_val else None
        dataset = config.dataset or SYNTHETIC_DATASET
        if dataset == SYNTHETIC_DATASET:
            return SyntheticFlowPairs(size, length=length, seed=config.seed, percentiles=percentiles, **scene), val
        if not options.get("unsupervised"):
            return None
        from alignkit.data.datasets import load_dataset
        from alignkit.data.frame_pairs import FrameCropPairs, find_frame_pairs, scored_pairs

        pairs = []
        for name in [n.strip() for n in dataset.split(",") if n.strip()]:
            folder = load_dataset(name, layout=config.layout).root
            exclude = [] if options.get("frames_include_scored") else scored_pairs(name)
            pairs += find_frame_pairs(folder, exclude=exclude)
        train = FrameCropPairs(pairs, size, length=int(config.synthetic_length or 1000), seed=config.seed,
                               percentiles=percentiles)
        return train, val

    @classmethod
    def size_multiple(cls, config: Any) -> int:
        """``2**levels`` of the network the configuration builds."""
        specs = cls.network_specs_for(2, config.networks or ({"network": config.network} if config.network else None))
        levels = [len(spec.get("features", _FEATURES)) for spec in cls._flow_specs(specs)]
        return 2 ** max(levels)

    @staticmethod
    def _flow_specs(specs: Mapping[str, Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        out: list[Mapping[str, Any]] = []
        for spec in specs.values():
            if spec.get("name") == "flownet_stack":
                out += [spec["first"], spec["second"]]
            else:
                out.append(spec)
        return out

    # -- the networks' answer -----------------------------------------------------------------------
    def flows(self, first: Tensor, second: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        """The flows per decoder level, coarsest first (voxels of each level)."""
        raise NotImplementedError

    def full_resolution(self, flows: Sequence[Tensor]) -> Tensor:
        """The finest flow of ``flows`` at the input resolution (voxels of the input grid)."""
        return upsample_flow(flows[-1], 2 ** self.output_level())

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Any]:
        fixed, moving = batch["fixed"].float(), batch["moving"].float()
        levels = self.options.get("train_coarse_levels", 0)
        if levels:
            out: dict[str, Any] = {"displacement": self.coarse_to_fine_flow(fixed, moving, levels)}
            if self.options["unsupervised"]:
                out["backward"] = self.coarse_to_fine_flow(moving, fixed, levels)
            return out
        flows = self.flows(fixed, moving)
        out = {"flows": flows}
        with torch.autocast(device_type=fixed.device.type, enabled=False):
            out["displacement"] = self.full_resolution([f.float() for f in flows])
            if self.options["unsupervised"]:
                out["backward"] = self.full_resolution([f.float() for f in self.flows(moving, fixed)])
        return out

    def loss(self, batch: Mapping[str, Tensor], output: Mapping[str, Any], *, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Multi-scale EPE against ``batch["flow"]``, or (``unsupervised``) the bidirectional loss."""
        if self.options["unsupervised"]:
            total, parts = self.unsupervised_loss(batch["fixed"].float(), batch["moving"].float(),
                                                  output["displacement"], output["backward"])
            return total, {k: v.detach() for k, v in parts.items()}
        if "flow" not in batch:
            raise ConfigError(f"{self.method_name}: supervised training needs pairs with a true flow "
                              f"(--dataset {SYNTHETIC_DATASET}), or --option unsupervised=true")
        if "flows" not in output:  # trained through the pyramid: the composed flow's end-point error
            error = torch.linalg.vector_norm(output["displacement"] - batch["flow"].float(), dim=1, keepdim=True)
            mask = batch.get("flow_mask")
            total = error.mean() if mask is None else (error * mask).sum() / mask.sum().clamp_min(1.0)
            return total, {"epe": total.detach()}
        level = self.output_level()
        total, errors = multiscale_epe(output["flows"], batch["flow"].float(), output_level=level,
                                       weights=self.options["level_weights"], mask=batch.get("flow_mask"))
        parts = {f"epe_level{level + k}": e.detach() for k, e in enumerate(errors)}
        return total, parts

    def output_level(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def multiple(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def network_flow(self, first: Tensor, second: Tensor) -> Tensor:
        """The network's full-resolution flow from ``first`` to ``second`` (any size: padded to the
        network's multiple at the far end, then cropped back)."""
        first_p, size = pad_to_multiple(first.float(), self.multiple())
        second_p, _ = pad_to_multiple(second.float(), self.multiple())
        flow = self.full_resolution(self.flows(first_p, second_p))
        return flow[(slice(None), slice(None), *(slice(0, s) for s in size))].contiguous()

    def coarse_to_fine_flow(self, first: Tensor, second: Tensor, coarse_levels: int) -> Tensor:
        """The flow on ``first``'s grid from the network run coarse to fine (:class:`FlowNetRunner`):
        ``coarse_levels`` halvings below the frames' size, each finer level on ``first`` and ``second``
        warped by the flow so far, its residual composed with that flow."""
        size = [int(s) for s in first.shape[2:]]
        flow: Tensor | None = None
        for level in range(int(coarse_levels), -1, -1):
            shape = [max(8, round(s / 2**level)) for s in size]
            first_l, second_l = resize_frames(first, shape), resize_frames(second, shape)
            if flow is None:
                flow = self.network_flow(first_l, second_l)
                continue
            flow = resize_flow(flow, shape)
            residual = self.network_flow(first_l, warp_voxels(second_l, flow))
            flow = compose_displacements(flow, residual)
        assert flow is not None
        return flow

    def predict_transform(self, grid: Grid, fixed: Tensor, moving: Tensor, *, coarse_levels: int = 0) -> Transform:
        flow = self.coarse_to_fine_flow(fixed.float(), moving.float(), coarse_levels)
        return LearnedDisplacement(grid, flow)


class _SingleFlowNet(FlowNetModel):
    """One network (``network``): FlowNetS or FlowNetC."""

    network: nn.Module

    def flows(self, first: Tensor, second: Tensor) -> list[Tensor]:
        return self.network(first, second)

    def output_level(self) -> int:
        return self.network.decoder.output_level

    def multiple(self) -> int:
        return self.network.multiple()


_INFO: dict[str, Any] = {"kind": "learned", "ndims": (2,), "modalities": ("mono",), "case_kinds": ("flow",)}
_FLOWNET = "Dosovitskiy et al., FlowNet: Learning Optical Flow with Convolutional Networks, ICCV 2015"
_UNFLOW = "Meister, Hur, Roth, UnFlow: Unsupervised Learning of Optical Flow with a Bidirectional Census Loss, AAAI 2018"


@learned_method(MethodInfo(
    name="flownet-s",
    summary="FlowNetSimple: both frames stacked into an encoder-decoder with multi-scale flow outputs; "
    "trained on synthetic FlyingChairs-style motion, optionally fine-tuned without ground truth",
    needs_checkpoint=True,
    reference=f"{_FLOWNET}; {_UNFLOW}",
    **_INFO,
), runner=FlowNetRunner)
class FlowNetSimple(_SingleFlowNet):
    """FlowNetS (see the module docstring)."""

    @classmethod
    def default_networks(cls, ndim: int) -> dict[str, dict[str, Any]]:
        return {"network": {"name": "flownet_s", "ndim": ndim, "in_channels": 2, "features": list(_FEATURES),
                            "kernels": list(_KERNELS)}}


@learned_method(MethodInfo(
    name="flownet-c",
    summary="FlowNetCorr: a shared feature tower, the correlation layer (cost volume), aggregation and a "
    "multi-scale decoder; trained on synthetic FlyingChairs-style motion, optionally fine-tuned without "
    "ground truth (shipped model flownet_c_pyramid2d)",
    needs_checkpoint=True,
    reference=f"{_FLOWNET}; {_UNFLOW}",
    **_INFO,
), runner=FlowNetRunner)
class FlowNetCorr(_SingleFlowNet):
    """FlowNetC (see the module docstring): correlation at 1/8 resolution over ±4 cells (±32 pixels)."""

    @classmethod
    def default_networks(cls, ndim: int) -> dict[str, dict[str, Any]]:
        return {"network": {"name": "flownet_c", "ndim": ndim, "in_channels": 1, "features": list(_FEATURES),
                            "kernels": list(_KERNELS), "correlation_level": 3, "max_displacement": 4}}


@learned_method(MethodInfo(
    name="flownet-cs",
    summary="FlowNet 2.0 stacking: FlowNetC, then the second frame warped by its flow and a FlowNetS that "
    "refines it (frames, warped frame, flow and brightness error as input)",
    needs_checkpoint=True,
    reference="Ilg et al., FlowNet 2.0: Evolution of Optical Flow Estimation with Deep Networks, CVPR 2017; "
    f"{_FLOWNET}; {_UNFLOW}",
    **_INFO,
), runner=FlowNetRunner)
class FlowNetStacked(FlowNetModel):
    """FlowNet-CS (see the module docstring). Two networks, ``first`` (FlowNetC) and ``second``
    (FlowNetS on 6 channels), trained in stages as FlowNet 2.0 does: ``first`` alone, then ``second``
    on top of the frozen ``first``. ``first_from`` (a ``flownet-c`` checkpoint or run folder) starts
    ``first`` from a trained FlowNetC and trains only the ``second`` stage."""

    first: nn.Module
    second: nn.Module
    _STAGES: ClassVar[tuple[str, str]] = ("first", "second")

    @classmethod
    def default_networks(cls, ndim: int) -> dict[str, dict[str, Any]]:
        first = FlowNetCorr.default_networks(ndim)["network"]
        second = dict(FlowNetSimple.default_networks(ndim)["network"], in_channels=3 + ndim + 1)
        return {"first": first, "second": second}

    def __init__(self, *, first_from: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.options["first_from"] = None if first_from is None else os.fspath(first_from)
        self._first_loaded = False

    def training_stages(self) -> list[TrainingStage]:
        second = TrainingStage("second", networks=("second",))
        if self.options.get("first_from"):
            return [second]
        return [TrainingStage("first", networks=("first",)), second]

    def set_stage(self, name: str) -> None:
        super().set_stage(name)
        if name == "second" and self.options.get("first_from") and not self._first_loaded:
            from alignkit.train.checkpoint import load_checkpoint

            state = load_checkpoint(self.options["first_from"])
            if state.get("method", {}).get("name") != "flownet-c":
                raise ConfigError(f"first_from must be a flownet-c model, got {state.get('method', {}).get('name')!r}")
            weights = {k[len("network."):]: v for k, v in state["model"].items() if k.startswith("network.")}
            device = next(self.first.parameters()).device
            self.first.load_state_dict({k: v.to(device) for k, v in weights.items()})
            self._first_loaded = True

    def flows(self, first: Tensor, second: Tensor) -> list[Tensor]:
        if self.training and self.stage == "first":
            return self.first(first, second)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not (self.training and self.stage == "second")):
            first_flows = self.first(first, second)
        return stacked_flows(self.first, self.second, first, second, first_flows=first_flows)

    def output_level(self) -> int:
        net = self.first if (self.training and self.stage == "first") else self.second
        return net.decoder.output_level

    def multiple(self) -> int:
        return max(self.first.multiple(), self.second.multiple())
