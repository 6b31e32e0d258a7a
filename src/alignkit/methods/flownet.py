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
* **inference** at the image's own resolution (the networks are fully convolutional; ``scale``
  runs them on a resized grid), padded to a multiple of ``2**levels``; the flow is a
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
from alignkit.nets.flownet import pad_to_multiple, stacked_flows, upsample_flow
from alignkit.registration import Inputs
from alignkit.spatial import Grid
from alignkit.train.protocol import TrainingStage
from alignkit.transforms import Transform

#: the ``--dataset`` name of the on-the-fly synthetic pairs
SYNTHETIC_DATASET = "synthetic-flow"

_FEATURES = [16, 32, 64, 96, 128]
_KERNELS = [7, 5, 5, 3, 3]


class FlowNetRunner(LearnedMethod):
    """Registers a pair of frames with a trained FlowNet: the network at the frames' own resolution
    (``scale`` < 1 runs it on a grid that many times smaller, for speed or motions beyond its reach),
    then, with ``refine=K``, K iterations of the classical ``flow`` preset's variational stage.

    ``checkpoint``: a checkpoint file or run folder (default: the model shipped with alignkit, where
    one ships); ``transform``: a linear pre-alignment (``"affine"``; default none: frames of a video);
    ``similarity``: the refinement's data term (default: the ``flow`` preset's)."""

    refine_preset = "flow"

    def __init__(self, *, checkpoint: LearnedModel | str | os.PathLike | None = None,
                 transform: str | list[str] | None = None, similarity: str | None = None,
                 scale: float = 1.0) -> None:
        super().__init__(checkpoint=checkpoint, transform=transform, similarity=similarity)
        if not 0.05 <= float(scale) <= 4.0:
            raise ConfigError(f"scale must lie in [0.05, 4], got {scale}")
        self.scale = float(scale)

    def predict_options(self, learned: LearnedModel, inputs: Inputs) -> dict[str, Any]:
        shape = inputs.fixed.grid.shape
        return {"size": [max(8, round(s * self.scale)) for s in shape]}


class FlowNetModel(LearnedModel):
    """What the three FlowNet methods share (module docstring). Options:

    * ``unsupervised`` (False): train with the unsupervised loss instead of the end-point error (the
      data then need no ground truth); ``census_weight`` (1), ``charbonnier_weight`` (0),
      ``smoothness_weight`` (0.1), ``edge_constant`` (10), ``consistency_weight`` (0.02),
      ``occlusion`` (True: forward-backward masks) are its terms, ``frames_include_scored`` (False)
      whether the unlabelled pairs may include those the data set scores;
    * ``level_weights``: the multi-scale EPE weights, finest first (FlowNet's 0.32 ... 0.005);
    * ``max_motion`` (pixels, 12), ``layers`` ([3, 8]): the synthetic pairs' largest object motion and
      object count (:func:`alignkit.data.synthetic_flow.random_scene`).
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
    ) -> None:
        super().__init__(networks=networks, ndim=ndim, size=size)
        if ndim != 2:
            raise ConfigError(f"{self.method_name} is trained on 2D frames; got ndim={ndim}")
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
        flows = self.flows(fixed, moving)
        out: dict[str, Any] = {"flows": flows}
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
        level = self.output_level()
        total, errors = multiscale_epe(output["flows"], batch["flow"].float(), output_level=level,
                                       weights=self.options["level_weights"], mask=batch.get("flow_mask"))
        parts = {f"epe_level{level + k}": e.detach() for k, e in enumerate(errors)}
        return total, parts

    def output_level(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def multiple(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict_transform(self, grid: Grid, fixed: Tensor, moving: Tensor) -> Transform:
        first, size = pad_to_multiple(fixed.float(), self.multiple())
        second, _ = pad_to_multiple(moving.float(), self.multiple())
        flow = self.full_resolution(self.flows(first, second))
        flow = flow[(slice(None), slice(None), *(slice(0, s) for s in size))]
        return LearnedDisplacement(grid, flow.contiguous())


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
    "ground truth (recipe flownet_c_synthetic2d)",
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
