"""``stereo-net``: a learned matching cost in the semi-global matching pipeline (issue 16).

The deep-learning registration survey §2.1: MC-CNN (Žbontar and LeCun, "Stereo Matching by Training a
Convolutional Neural Network to Compare Image Patches", JMLR 2016) replaces a hand-made matching cost
by a siamese network that tells matching 9x9 patches from non-matching ones; the rest of the stereo
pipeline stays classical. Here:

* network: ``features`` (:class:`~alignkit.nets.stereo.MatchingFeatures`, MC-CNN-fast: four 3x3
  convolutions by default, five -- 11x11 patches, the paper's Middlebury depth -- in the shipped
  model's recipe; unit feature vectors; the score of two patches is their cosine);
* training, ``objective="hinge"`` (the paper's "fast" hinge loss): for a left pixel ``p`` with known
  disparity ``d``, the positive is the right pixel at ``x - d``, the negative at ``x - d + o`` with
  ``|o|`` drawn in ``[negative_low, negative_high]`` (1.5 and 6 px in the paper's fast architecture;
  either side); ``loss = max(0, margin + s(p, neg) - s(p, pos))`` with the paper's ``margin`` 0.2,
  averaged over ``samples`` non-occluded pixels per pair;
* training, ``objective="softmax"`` (Luo, Schwing and Urtasun, CVPR 2016, the same siamese features):
  at *every* non-occluded pixel of a crop, a softmax of ``cos / temperature`` over all integer
  disparities of the batch's range, against a target ``exp(-(k - d)^2 / 2)`` within 2 px of the truth
  -- every disparity is a negative, and a crop gives thousands of supervised pixels instead of
  ``samples`` pairs of patches (:meth:`StereoNet._softmax_loss`);
* augmentation (``photometric``, training only): the right camera's gain and offset and both images'
  gamma drawn per pair (:func:`photometric_jitter`);
* training pairs (:meth:`StereoNet.training_data`): synthetic rectified pairs rendered from
  scikit-image's photographs with a random depth layering (:mod:`alignkit.data.synthetic_stereo`),
  plus random crops of the real pairs of ``dataset`` (supervised by their ground truth; pixels the
  ground truth shows occluded are left out), validated on held-out synthetic pairs;
* hybrid cost (``census_weight``, 0 = the network's cost alone): the cost SGM aggregates is
  ``(1 - w) * network + w * census`` (the classical preset's 7x9 census, :mod:`alignkit.stereo.cost`),
  a learned + hand-made hybrid as in Mei et al., "On Building an Accurate Stereo Matching System on
  Graphics Hardware" (ICCV workshops 2011: AD + census) and the learned + census costs of later MC-CNN
  pipelines; **the shipped model uses it** (its recipe sets ``census_weight``; the weight was chosen on
  motorcycle and held-out synthetic pairs, never on aloe, which is the report-only pair);
* inference (:class:`StereoNetMethod`): the (hybrid) cost volume goes through the same SGM,
  sub-pixel winner-take-all, left-right check and filling as the classical ``stereo`` preset
  (:func:`alignkit.stereo.match`); the result is a :class:`~alignkit.transforms.DisparityField`. The
  cost scales the images ``match`` hands it by the pair's percentiles (:func:`normalise_pair`), as in
  training (``match`` rescales by the min-max range first, which the network never saw).

``alignkit train --method stereo-net --dataset stereo/motorcycle --size 96 128 -o RUN`` trains one;
``alignkit register LEFT RIGHT --method stereo-net [--checkpoint RUN] [--max-disparity D]`` uses it
(the shipped model when no checkpoint is given).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from alignkit.errors import ConfigError, InputError
from alignkit.methods.base import MethodInfo, MethodOutput, ProgressFactory
from alignkit.methods.learned import LearnedMethod, LearnedModel, learned_method
from alignkit.registration import Inputs
from alignkit.stereo import check_rectified_pair, match, occlusion_from_disparity
from alignkit.stereo.cost import cost_volume, grey
from alignkit.transforms import ComposedTransform, DisparityField, Transform

#: intensity percentiles mapped to 0 and 1, jointly over the pair, in training and at inference
PAIR_PERCENTILES = (1.0, 99.0)

#: training objectives: MC-CNN-fast's hinge on one negative, or a softmax over a window of disparities
Objective = Literal["hinge", "softmax"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)

#: the softmax objective's target reaches this far (px) from the true disparity (Luo et al. 2016)
SOFT_TARGET_REACH = 2.0


def normalise_pair(left: Tensor | np.ndarray, right: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
    """Grey ``(H, W)`` float32 images scaled jointly so the pair's 1st/99th percentiles go to 0/1
    (one scale for both: a brightness difference between the cameras stays visible to the network,
    as it will be at test time)."""
    left_g, right_g = grey(left), grey(right)
    values = torch.cat([left_g.flatten(), right_g.flatten()])
    step = max(1, values.numel() // 200_000)
    low, high = torch.quantile(values[::step], torch.tensor([p / 100 for p in PAIR_PERCENTILES]))
    scale = float(high - low) if float(high - low) > 1e-6 else 1.0
    return (left_g - low) / scale, (right_g - low) / scale


class StereoPairs(Dataset):
    """Map-style training pairs ``{"fixed", "moving": (1, H, W), "disparity": (1, H, W) px,
    "valid": (1, H, W)}`` (``valid``: known and not occluded): ``synthetic`` pairs rendered from
    ``photos`` then ``real_crops`` crops of the real ``cases`` (``(left, right, disparity, valid)``
    arrays; ``slant``: the synthetic planes' largest slope). Items are pure functions of
    ``(seed, epoch, index)``."""

    def __init__(self, photos: Sequence[np.ndarray], size: Sequence[int], *, synthetic: int, max_disparity: float,
                 cases: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = (), real_crops: int = 0,
                 seed: int = 0, photometric: float = 0.0, slant: float = 0.02) -> None:
        self.photos = list(photos)
        self.size = tuple(int(s) for s in size)
        self.ndim = 2
        self.synthetic, self.real_crops = int(synthetic), int(real_crops) if cases else 0
        self.max_disparity = float(max_disparity)
        self.cases = list(cases)
        self.seed = int(seed)
        self.photometric = float(photometric)
        self.slant = float(slant)
        self.epoch = 0
        if not self.photos and self.synthetic:
            raise ConfigError("synthetic stereo pairs need photographs (scikit-image's: pip install scikit-image)")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.synthetic + self.real_crops

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        from alignkit.data.synthetic_stereo import render_stereo_pair

        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        height, width = self.size
        if index < self.synthetic:
            photo = self.photos[int(rng.integers(len(self.photos)))]
            pair = render_stereo_pair(photo, (height, width), rng=rng, max_disparity=self.max_disparity,
                                      layers=int(rng.integers(1, 5)), slant=self.slant)
            left, right, disparity, valid = pair.left, pair.right, pair.disparity, ~pair.occluded
        else:
            left_all, right_all, disparity_all, valid_all = self.cases[int(rng.integers(len(self.cases)))]
            top = int(rng.integers(0, left_all.shape[-2] - height + 1))
            start = int(rng.integers(0, left_all.shape[-1] - width + 1))
            window = (slice(top, top + height), slice(start, start + width))
            left, right = left_all[(Ellipsis, *window)], right_all[(Ellipsis, *window)]
            disparity, valid = disparity_all[window], valid_all[window]
        if self.photometric > 0:
            left, right = photometric_jitter(left, right, self.photometric, rng)
        left_n, right_n = normalise_pair(left, right)
        return {"fixed": left_n[None], "moving": right_n[None],
                "disparity": torch.as_tensor(np.ascontiguousarray(disparity), dtype=torch.float32)[None],
                "valid": torch.as_tensor(np.ascontiguousarray(valid), dtype=torch.bool)[None]}


def photometric_jitter(left: np.ndarray, right: np.ndarray, strength: float,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The pair with the right camera's response changed: its intensities times ``exp(u)`` plus ``v``
    times the pair's spread (``u``, ``v`` uniform in ``[-strength, strength]``), then a gamma
    ``exp(w)`` (``w`` in ``[-strength, strength]``) on both images' [0, 1]-scaled values -- the
    radiometric differences between two cameras that a real pair shows and a rendered one does not."""
    left, right = np.asarray(left, dtype=np.float32), np.asarray(right, dtype=np.float32)
    low = float(min(left.min(), right.min()))
    spread = max(float(max(left.max(), right.max())) - low, 1e-6)
    gain, offset, gamma = (float(v) for v in rng.uniform(-strength, strength, 3))
    right = (right - low) * np.float32(np.exp(gain)) + np.float32(offset * spread)
    left = left - low
    top = max(float(left.max()), float(right.max()), 1e-6)
    exponent = np.float32(np.exp(gamma))
    left = np.clip(left / top, 0, 1) ** exponent
    right = np.clip(right / top, 0, 1) ** exponent
    return left.astype(np.float32), right.astype(np.float32)


def real_stereo_cases(dataset: str, size: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """``(left, right, disparity, valid)`` arrays of every case of the stereo data set ``dataset``
    (a name under the data root, or a folder), ``valid`` leaving out unknown and occluded pixels."""
    from alignkit.data.datasets import load_dataset

    cases = []
    data = load_dataset(dataset)
    for name in data.names:
        case = data[name]
        if case.kind != "stereo":
            raise InputError(f"case {name!r} is a {case.kind} case, not a stereo pair", dataset)
        disparity = -case.flow[-1]
        valid = case.valid & ~occlusion_from_disparity(disparity, case.valid)
        left, right = case.fixed.data.cpu().numpy(), case.moving.data.cpu().numpy()
        if left.shape[-2] < size[0] or left.shape[-1] < size[1]:
            raise ConfigError(f"training crops {tuple(size)} are larger than the pair {name!r} {left.shape[-2:]}")
        cases.append((left, right, disparity.astype(np.float32), valid))
    return cases


class StereoNetMethod(LearnedMethod):
    """Registers a rectified pair (fixed = left, moving = right) with a trained ``stereo-net``: the
    network's matching cost through semi-global matching (:func:`alignkit.stereo.match`). Options:
    ``checkpoint`` (default: the shipped model), ``min_disparity``/``max_disparity`` (pixels; default
    0 and a fifth of the width), ``census_weight`` (the census share of the hybrid cost, 0 = the
    network alone; default: the model's own, :class:`StereoNet`)."""

    def __init__(
        self,
        *,
        checkpoint: LearnedModel | str | os.PathLike | None = None,
        min_disparity: float | None = None,
        max_disparity: float | None = None,
        census_weight: float | None = None,
    ) -> None:
        super().__init__(checkpoint=checkpoint)
        self.min_disparity, self.max_disparity = min_disparity, max_disparity
        if census_weight is not None and not 0 <= census_weight <= 1:
            raise ConfigError(f"stereo-net's census_weight is a share in [0, 1], got {census_weight}")
        self.census_weight = census_weight

    def run(self, inputs: Inputs, *, device: torch.device, seed: int | None, progress: ProgressFactory) -> MethodOutput:
        check_rectified_pair(inputs.fixed.shape, inputs.moving.shape, "stereo-net", error=InputError)
        learned, source = self.model(2, device)
        assert isinstance(learned, StereoNet)
        started = time.perf_counter()
        left, right = normalise_pair(inputs.fixed.data.cpu(), inputs.moving.data.cpu())
        result = match(left, right, min_disparity=self.min_disparity, max_disparity=self.max_disparity,
                       cost=learned.cost_function(device, census_weight=self.census_weight), progress=progress,
                       **learned.sgm_options())
        census_weight = learned.options["census_weight"] if self.census_weight is None else self.census_weight
        return disparity_output(self.info.name, learned, source, inputs, result.disparity, result.occluded, started,
                                min_disparity=result.min_disparity, max_disparity=result.max_disparity,
                                matching_scale=result.scale, census_weight=float(census_weight))


def disparity_output(name: str, learned: LearnedModel, source: str | None, inputs: Inputs, disparity: Tensor,
                     occluded: Tensor, started: float, **settings: Any) -> MethodOutput:
    """The :class:`MethodOutput` of a learned stereo method: the disparity (pixels, fixed = left) as a
    :class:`DisparityField` on the fixed grid, its occlusion mask, the model's description plus
    ``settings`` (the disparity range ...), and the seconds since ``started``."""

    field = DisparityField.from_pixels(disparity, inputs.fixed.grid, occluded=occluded)
    field.requires_grad_(False)
    seconds = round(time.perf_counter() - started, 3)
    description = {"method": name, "model": learned.config, "networks": learned.network_specs(),
                   "checkpoint": source, **settings}
    extra: dict[str, Any] = {"method": name, "occluded_fraction": float(occluded.float().mean()),
                             **({"checkpoint": source} if source is not None else {})}
    return MethodOutput(transform=ComposedTransform([field]), name=name, stages=["disparity"],
                        description=description, stage_seconds={name: seconds}, extra=extra)


@learned_method(MethodInfo(
    name="stereo-net",
    kind="learned",
    summary="MC-CNN-style siamese patch network as the matching cost of semi-global matching (rectified "
    "stereo: fixed = left, moving = right); trained on synthetic layered scenes and real pairs",
    ndims=(2,),
    modalities=("mono",),
    case_kinds=("stereo",),
    reference="Žbontar and LeCun, Stereo Matching by Training a Convolutional Neural Network to Compare "
    "Image Patches, JMLR 2016; Hirschmüller, Stereo Processing by Semiglobal Matching and Mutual "
    "Information, IEEE TPAMI 2008",
), runner=StereoNetMethod)
class StereoNet(LearnedModel):
    """MC-CNN-fast matching cost (module docstring). Options: ``objective`` (``"hinge"``, MC-CNN-fast's,
    or ``"softmax"`` over all disparities at every pixel), ``margin`` (0.2), ``negative_low``/
    ``negative_high`` (1.5, 6 px) and ``samples`` (pixels per pair and step, 1024) of the hinge,
    ``temperature`` (0.1) of the softmax, ``photometric`` (the training pairs' radiometric jitter, 0 =
    none), ``max_disparity`` (of the synthetic training scenes and of the validation's
    winner-take-all, 32), ``slant`` (the synthetic scenes' largest plane slope, px of disparity per
    px, 0.02), ``p1``/``p2`` (SGM penalties on this cost, in its [0, 1] units), ``census_weight``
    (the census share ``w`` of the inference cost ``(1 - w) * network + w * census``, 0: the network
    alone; used by the validation's SGM too, not by the training loss)."""

    @classmethod
    def default_networks(cls, ndim: int) -> dict[str, dict[str, Any]]:
        return {"features": {"name": "mccnn_fast", "ndim": 2, "in_channels": 1, "features": 32, "layers": 4}}

    def __init__(
        self,
        *,
        networks: Mapping[str, nn.Module],
        ndim: int,
        size: Sequence[int],
        margin: float = 0.2,
        negative_low: float = 1.5,
        negative_high: float = 6.0,
        samples: int = 1024,
        max_disparity: float = 32.0,
        p1: float = 0.05,
        p2: float = 0.6,
        objective: Objective = "hinge",
        temperature: float = 0.1,
        photometric: float = 0.0,
        slant: float = 0.02,
        census_weight: float = 0.0,
    ) -> None:
        super().__init__(networks=networks, ndim=ndim, size=size)
        if ndim != 2:
            raise ConfigError("stereo-net is 2D")
        if not 0 < negative_low <= negative_high or margin <= 0 or samples < 1 or max_disparity <= 2:
            raise ConfigError("stereo-net needs 0 < negative_low <= negative_high, margin > 0, samples >= 1, "
                              "max_disparity > 2")
        if objective not in OBJECTIVES:
            raise ConfigError(f"unknown stereo-net objective {objective!r}; choose {', '.join(OBJECTIVES)}")
        if temperature <= 0 or photometric < 0 or slant < 0:
            raise ConfigError("stereo-net needs temperature > 0, photometric >= 0 and slant >= 0")
        if not 0 <= census_weight <= 1:
            raise ConfigError(f"stereo-net's census_weight is a share in [0, 1], got {census_weight}")
        self.options = {"margin": float(margin), "negative_low": float(negative_low),
                        "negative_high": float(negative_high), "samples": int(samples),
                        "max_disparity": float(max_disparity), "p1": float(p1), "p2": float(p2),
                        "objective": objective, "temperature": float(temperature),
                        "photometric": float(photometric), "slant": float(slant),
                        "census_weight": float(census_weight)}

    @classmethod
    def training_data(cls, config: Any) -> tuple[Dataset, Dataset]:
        """Synthetic layered pairs (``config.synthetic_length`` per epoch, default 64) plus, when
        ``config.dataset`` names stereo pairs, as many random crops of them as ``config.max_pairs``
        (default: a quarter of the synthetic count); validation: held-out synthetic pairs (a sixth of the
        synthetic count, at least 8)."""
        from alignkit.data.synthetic_stereo import training_photographs

        size = list(config.size) if isinstance(config.size, (list, tuple)) else [config.size]
        if len(size) == 1:
            size = size * 2
        if len(size) != 2:
            raise ConfigError(f"stereo-net trains on 2D crops; size must be one or two numbers, got {config.size}")
        max_disparity = float(config.method_options.get("max_disparity", 32.0))
        synthetic = int(config.synthetic_length or 64)
        cases = real_stereo_cases(config.dataset, size) if config.dataset else []
        crops = int(config.max_pairs) if config.max_pairs is not None else max(1, synthetic // 4)
        photos = training_photographs()
        slant = float(config.method_options.get("slant", 0.02))
        train = StereoPairs(photos, size, synthetic=synthetic, max_disparity=max_disparity, cases=cases,
                            real_crops=crops, seed=config.seed,
                            photometric=float(config.method_options.get("photometric", 0.0)), slant=slant)
        validation = StereoPairs(photos, size, synthetic=max(8, synthetic // 6), max_disparity=max_disparity,
                                 seed=config.seed + 10_000, slant=slant)
        return train, validation

    # -- training -------------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"left_features": self.features(batch["fixed"].float()),
                "right_features": self.features(batch["moving"].float())}

    @staticmethod
    def _features_at(features: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
        """``(B, F, N)`` features of ``(B, F, H, W)`` at ``(B, N)`` rows and (fractional) columns
        (linear along the row, border values)."""
        _, _, height, width = features.shape
        grid = torch.stack([2 * columns / max(width - 1, 1) - 1, 2 * rows / max(height - 1, 1) - 1], dim=-1)
        sampled = F.grid_sample(features, grid[:, None], mode="bilinear", padding_mode="border", align_corners=True)
        return F.normalize(sampled[:, :, 0], dim=1, eps=1e-6)

    def loss(self, batch: Mapping[str, Tensor], output: Mapping[str, Tensor], *, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        left, right = output["left_features"], output["right_features"]
        batch_size, _, height, width = left.shape
        disparity, valid = batch["disparity"][:, 0].float(), batch["valid"][:, 0]
        columns = torch.arange(width, device=left.device).expand(height, width)
        # pixels whose positive match lies inside the right image
        usable = valid & ((columns - disparity) >= 0) & ((columns - disparity) <= width - 1)
        if self.options["objective"] == "softmax":
            return self._softmax_loss(left, right, disparity, usable & (disparity >= 0))
        generator = torch.Generator(device="cpu").manual_seed(int(epoch) * 7919 + int(usable.sum()))
        rows_all, cols_all, counts = [], [], []
        samples = self.options["samples"]
        for k in range(batch_size):
            index = torch.nonzero(usable[k].flatten().cpu()).flatten()
            if index.numel() == 0:
                index = torch.arange(height * width)
            chosen = index[torch.randint(index.numel(), (samples,), generator=generator)]
            rows_all.append(chosen // width)
            cols_all.append(chosen % width)
            counts.append(index.numel())
        rows = torch.stack(rows_all).to(left.device).float()
        cols = torch.stack(cols_all).to(left.device).float()
        d = disparity.flatten(1).gather(1, (rows * width + cols).long())
        low, high = self.options["negative_low"], self.options["negative_high"]
        offset = low + (high - low) * torch.rand(rows.shape, generator=generator).to(left.device)
        offset = offset * torch.where(torch.rand(rows.shape, generator=generator) < 0.5, -1.0, 1.0).to(left.device)
        anchor = self._features_at(left, rows, cols)
        positive = self._features_at(right, rows, cols - d)
        negative = self._features_at(right, rows, (cols - d + offset).clamp(0, width - 1))
        s_pos, s_neg = (anchor * positive).sum(1), (anchor * negative).sum(1)
        hinge = F.relu(self.options["margin"] + s_neg - s_pos).mean()
        parts = {"hinge": hinge.detach(), "ranked": (s_pos > s_neg).float().mean().detach()}
        return hinge, parts

    def _softmax_loss(self, left: Tensor, right: Tensor, disparity: Tensor,
                      usable: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Dense cross-entropy (Luo, Schwing and Urtasun, "Efficient Deep Learning for Stereo
        Matching", CVPR 2016): at every usable left pixel, a softmax of ``cos / temperature`` over all
        integer disparities ``0..D`` whose right pixel ``x - k`` lies in the image (``D``: the batch's
        largest true disparity + 3), against a target ``exp(-(k - d)^2 / 2)`` for ``|k - d| <= 2``
        (normalised): every disparity of the range is a negative, at every pixel, not one per sample."""
        width = left.shape[-1]
        known = disparity[usable]
        high = min(width - 1, math.ceil(float(known.max())) + 3 if known.numel() else 2)
        scores = torch.stack([F.pad((left[..., k:] * right[..., : width - k]).sum(1), (k, 0), value=float("-inf"))
                              for k in range(high + 1)], dim=1)  # (B, D + 1, H, W), -inf: outside
        inside = torch.isfinite(scores)
        shifts = torch.arange(high + 1, device=left.device, dtype=disparity.dtype)[None, :, None, None]
        distance = shifts - disparity[:, None]
        target = torch.exp(-0.5 * distance**2) * ((distance.abs() <= SOFT_TARGET_REACH) & inside)
        target = target / target.sum(1, keepdim=True).clamp_min(1e-12)
        log_p = torch.log_softmax(scores / self.options["temperature"], dim=1)
        per_pixel = -torch.where(inside, target * log_p, torch.zeros_like(log_p)).sum(1)
        weight = usable.float()
        loss = (per_pixel * weight).sum() / weight.sum().clamp_min(1.0)
        with torch.no_grad():
            best = scores.argmax(1).to(disparity.dtype)
            close = ((best - disparity).abs() <= 2).float()
            parts = {"softmax": loss.detach(), "wta_within2": (close * weight).sum() / weight.sum().clamp_min(1.0)}
        return loss, parts

    @torch.no_grad()
    def validation_metrics(self, batch: Mapping[str, Tensor], output: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per pair, the share of its valid pixels off by more than 2 px: ``bad2`` after the whole
        pipeline (SGM, sub-pixel winner-take-all, left-right filling: what inference returns) and
        ``wta_bad2`` of the cost alone (winner-take-all, no aggregation); both of the hybrid cost when
        ``census_weight`` > 0."""
        disparities = np.arange(0, int(np.ceil(self.options["max_disparity"])) + 1)
        scores: dict[str, list[float]] = {"bad2": [], "wta_bad2": []}
        for k in range(output["left_features"].shape[0]):
            volume = self.features.cost_volume(output["left_features"][k : k + 1], output["right_features"][k : k + 1],
                                               disparities).cpu()
            volume = self._with_census(volume, batch["fixed"][k, 0].cpu(), batch["moving"][k, 0].cpu(), disparities,
                                       self.options["census_weight"])
            valid = batch["valid"][k, 0].cpu()
            truth = batch["disparity"][k, 0].cpu()
            result = match(batch["fixed"][k, 0].cpu(), batch["moving"][k, 0].cpu(), min_disparity=0,
                           max_disparity=float(disparities[-1]), cost=lambda *_, v=volume: v, **self.sgm_options())
            for name, estimate in (("bad2", result.disparity), ("wta_bad2", volume.argmin(0).float())):
                wrong = (estimate - truth).abs() > 2
                scores[name].append(float(wrong[valid].float().mean()) if bool(valid.any()) else float("nan"))
        return {name: torch.tensor(values, dtype=torch.float64) for name, values in scores.items()}

    # -- inference ------------------------------------------------------------------------------
    def sgm_options(self) -> dict[str, float]:
        return {"p1": self.options["p1"], "p2": self.options["p2"]}

    @staticmethod
    def _with_census(volume: Tensor, left: Tensor, right: Tensor, disparities: np.ndarray, weight: float) -> Tensor:
        """``(1 - weight) * volume + weight * census`` (the classical preset's 7x9 census cost of the
        grey pair, :func:`alignkit.stereo.cost.cost_volume`; both 1 where ``x - d`` leaves the right
        image); ``volume`` itself when ``weight`` is 0."""
        if weight <= 0:
            return volume
        census = cost_volume(left, right, disparities, cost="census").to(volume.dtype)
        return volume.mul(1.0 - weight).add_(census, alpha=weight)

    def cost_function(self, device: torch.device | str | None = None, *, census_weight: float | None = None):
        """``(left (H, W), right (H, W), disparities) -> (D, H, W)`` cost in [0, 1] for
        :func:`alignkit.stereo.match` (images normalised by :func:`normalise_pair`): the network's
        ``(1 - cos) / 2``, mixed with the census cost by ``census_weight`` (default: the model's
        option; 0 = the network alone)."""
        device = torch.device(device or "cpu")
        weight = self.options["census_weight"] if census_weight is None else float(census_weight)

        @torch.no_grad()
        def cost(left: Tensor, right: Tensor, disparities: np.ndarray) -> Tensor:
            self.eval()
            # match() hands over its min-max rescaled (maybe shrunk) images: scale them as in training
            left, right = normalise_pair(left, right)
            network = self.features
            if device.type == "cpu":
                # channels-last weights make the convolutions channels-last (oneDNN's faster layout on
                # the CPU: motorcycle's two feature maps ~0.7 against ~1.1 s on one thread), and the
                # output is then already the (H, W, F) layout the compiled cost volume reads
                network = copy.deepcopy(network).to(memory_format=torch.channels_last)
            features_left = network(left[None, None].to(device))
            features_right = network(right[None, None].to(device))
            volume = self.features.cost_volume(features_left, features_right, disparities).cpu()
            return self._with_census(volume, left, right, disparities, weight)

        return cost

    def predict_transform(self, grid: Any, fixed: Tensor, moving: Tensor) -> Transform:
        """The disparity of a pair already on the network grid (``(1, 1, H, W)`` each)."""
        result = match(fixed[0, 0].cpu(), moving[0, 0].cpu(), cost=self.cost_function(fixed.device),
                       **self.sgm_options())
        field = DisparityField.from_pixels(result.disparity, grid, occluded=result.occluded)
        return field.requires_grad_(False)
