"""``weak-homography``: a homography and a patch descriptor learned together, from scratch, on the pair
itself -- Dong, Burnham, Boots, Rains, Dellaert, "Learning to Align Images using Weak Geometric
Supervision" (3DV 2018).

The whole system, per pyramid level (coarse to fine, a new network per level, the homography carried
over):

* keypoints where the gradient magnitude of the standardised image exceeds 0.05, in *both* images
  (``keypoints`` per image; the paper's 4000 is capped to 1500 by default for the CPU), with a
  random orientation and ``log2`` scale (§5.3, :func:`~alignkit.methods.patches.random_keypoints`);
* a patch descriptor network, siamese or partly shared pseudo-siamese (§4.4, §5.3;
  :mod:`alignkit.nets.descriptors`), fixed image on stream 0 and moving image on stream 1;
* the 8 homography parameters in the well-conditioned form of §5.1 (:class:`ConditionedHomography`);
* SGD with momentum 0.9, batches of 64 keypoints, a cosine-annealed learning rate, on the contrastive
  loss of eq. (5) (:func:`~alignkit.methods.patches.contrastive_loss`): each step resamples the
  positive patches through the *current* homography (keypoints carried by eqs. (10)-(12),
  :func:`~alignkit.methods.patches.warp_keypoints`, bilinear and differentiable), while the negatives
  -- patches at least ``negative_distance`` pixels from the start's correspondence -- are drawn once
  per level and stay fixed (§4.3).

What we added to the paper, each for a failure seen on real pairs: half of the negatives lie near the
correspondence (``negative_distance`` to ``near_radius`` times it; uniform ones alone left the descriptor
blind to misalignments of a few pixels); the homography is frozen for the first ``warmup`` fraction of a
level's steps (an untrained network sent it tens of pixels away); its rate is given in level pixels
(``homography_learning_rate`` / (frame_scale · size)^2 in the parameters) and a step is clipped at
``homography_max_step`` level pixels; a positive whose correspondence leaves the image counts as the
largest distance instead of being dropped (dropping let the homography escape to a zero loss).

Start (``start``): ``"auto"`` uses the SIFT + MAGSAC++ fit of :func:`alignkit.solve.features.feature_fit`
(the ``photo`` preset's start) when it is trusted and has at least ``min_inliers`` inliers, else the
classical engine's Mattes mutual-information similarity then affine stages (the ``multimodal``
preset's linear chain, about a second a pair; ``fallback="identity"`` for the identity instead);
from either of those only the finest ``feature_levels`` pyramid levels run. ``"identity"`` (the paper's
protocol); ``"features"`` (an error when no fit is trusted); ``"mi"`` (the MI chain whatever SIFT
finds); ``initial`` (a matrix, transform or transform file) overrides them. Why the MI fallback: from
the identity the learnt objective loses VIS-NIR pairs shifted by more than ~2.5 % of the image size
(its coarsest level is ~200 px wide), while the MI chain reached 0.0-3.7 px on the 8 pairs of the
benchmark's perturbation curve at 0 and 10 % (``benchmarks/README.md``, session 11). ``model="affine"`` keeps the two
perspective parameters at zero and fits the start as an affine map (GRIC then picks an affine or a
similarity): for pairs known to be related by an affine map (``alignkit evaluate`` sets it for cases of
kind ``affine``, as the presets run their affine chain and the OpenCV peers fit an affine there). **Never worse than the start**:
at the end of every level the start, the last iterate and the average of the last
``average_fraction`` iterates (Polyak averaging, which removes the minibatch noise of SGD) are scored
by the same loss on held-out keypoints with the level's final network, and the lowest is kept. After a
SIFT+MAGSAC start, the result must also stay compatible with the start's keypoint inliers
(``inlier_check``, the engine's chi-square test after a feature start): otherwise the start is returned;
after the MI start, its mutual information over the whole overlap may not fall below the start's
(``mi_check``): on the benchmark's two VIS-NIR pairs that SIFT does not trust, the learnt objective moved
field/0002 from MI's 0.0 and 1.0 px to 3.1 and 5.1 px (session 11 probe, affine model).

The result is a :class:`~alignkit.transforms.MatrixTransform` from fixed-world to moving-world points,
like the ``photo`` preset's homography stage.

Defaults were chosen for seconds-to-tens-of-seconds per pair on one CPU core: levels from about 200
pixels on the long side to the full image (at most ``max_size``), 150 iterations per level and 250 at
the finest, 1500 keypoints per image; after a trusted SIFT start only the finest level runs. Measured
on a 900 x 768 vis-nir pair, one thread, load average ~1.5: 66 ms per iteration (the network's forward
and backward passes on 192 patches take 35 ms of it), 43 s for three levels (650 iterations then);
on the loaded shared machine of ``benchmarks/README.md`` 65 s (finest level only) to 155 s per pair. With
two such runs side by side on an otherwise idle 2-core machine (one thread each, session 9): 13 s per vis-nir
pair and 14 s per homogr pair after a trusted SIFT start (the finest level only).

Precision costs iterations: from a start a few pixels off, the learnt objective alone needs a longer
finest level than the default's 250 iterations. Measured on five vis-nir pairs started 1 % of the image
size off their true affine by ``initial`` (6.4-8.6 px, affine model; session 11): ``coarsest=1024,
iterations=1500`` (the finest level only, ~52 s on one thread) ended at 0.37 / 0.49 / 0.83 / 0.59 /
1.25 px (field/0007, the pair it was chosen on, then forest/0003, indoor/0002, mountain/0002,
field/0006), the default budget (~21 s) at 3.86 / 0.41 / 1.15 / 3.60 / 1.88 px.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError, InputError
from alignkit.image import common_channels, grey_channels
from alignkit.methods.base import Method, MethodInfo, MethodOutput, ProgressFactory
from alignkit.methods.patches import (
    Keypoints,
    contrastive_loss,
    inside,
    negative_keypoints,
    random_keypoints,
    sample_patches,
    standardise,
    warp_keypoints,
)
from alignkit.methods.registry import register_method
from alignkit.nets.descriptors import PseudoSiameseDescriptor, SiameseDescriptor
from alignkit.registration import Inputs
from alignkit.spatial.frames import world_from_pixel
from alignkit.spatial.grid import Grid
from alignkit.spatial.pyramid import downsample
from alignkit.transforms import MatrixTransform, Transform

Network = Literal["siamese", "pseudo-siamese"]
Colour = Literal["rgb", "grey"]
Start = Literal["auto", "identity", "features", "mi"]
Fallback = Literal["mi", "identity"]
Model = Literal["homography", "affine"]

REFERENCE = ("Dong, Burnham, Boots, Rains, Dellaert: Learning to Align Images using Weak Geometric "
             "Supervision (3DV 2018)")


class ConditionedHomography(nn.Module):
    """The 8 homography parameters of Dong et al. 2018 §5.1 (eq. 9), scale-normalised so that SGD sees
    parameters of one magnitude: ``H_world = C · Hn(theta) · C⁻¹`` with
    ``Hn = [[1 + t0, t1, t2], [t3, 1 + t4, t5], [t6, t7, 1]]`` and ``C`` the fixed image's frame
    (``C = [[scale · width, 0, cx], [0, scale · height, cy], [0, 0, 1]]``, world units, centre
    ``(cx, cy)``). Translations are then fractions of the image size and perspective terms
    their inverse; ``theta = 0`` is the identity. Centring the frame (our choice) makes a rotation
    about the image centre independent of the translations. ``scale`` is the paper's scale
    hyperparameter; our default 0.5 puts the image in [-1, 1], where a change of 0.01 in any of
    the 8 parameters moves the image corners by about 1 % of the half-size (translations, linear and
    perspective terms alike; with 1 the perspective terms were 4-8 times weaker and SGD left them
    behind)."""

    def __init__(self, frame: Tensor, start: Tensor, affine: bool = False) -> None:
        super().__init__()
        self.register_buffer("frame", frame.to(torch.float64))
        normalised = torch.linalg.inv(self.frame) @ start.to(self.frame) @ self.frame
        normalised = normalised / normalised[2, 2]
        theta = (normalised - torch.eye(3, dtype=torch.float64)).flatten()[:8]
        # an affine model keeps the two perspective parameters at zero (masked: no gradient reaches them)
        mask = torch.ones(8, dtype=torch.float64)
        if affine:
            mask[6:] = 0
        self.register_buffer("mask", mask)
        self.theta = nn.Parameter(theta * mask)

    @staticmethod
    def frame_of(grid: Grid, scale: float = 1.0) -> Tensor:
        """``C`` for an image on ``grid`` (world extent and centre)."""
        extent = grid.extent().to(torch.float64).flip(0)  # array-axis order -> (x, y)
        centre = grid.center_world().to(torch.float64)
        frame = torch.eye(3, dtype=torch.float64)
        frame[0, 0], frame[1, 1] = scale * extent[0], scale * extent[1]
        frame[:2, 2] = centre
        return frame

    def normalised(self, theta: Tensor | None = None) -> Tensor:
        theta = (self.theta if theta is None else theta) * self.mask
        return torch.cat([theta, theta.new_zeros(1)]).reshape(3, 3) + torch.eye(3, dtype=theta.dtype, device=theta.device)

    def world(self, theta: Tensor | None = None) -> Tensor:
        """Moving-world-from-fixed-world ``(3, 3)`` float64 (differentiable in ``theta``)."""
        world = self.frame @ self.normalised(theta) @ torch.linalg.inv(self.frame)
        return world / world[2, 2]  # the same map; conjugating by a centred frame moves the scale


@dataclass
class PairFit:
    """What :meth:`WeakHomography.fit` learnt on one pair: ``matrix`` (moving-world-from-fixed-world,
    float64 ``(3, 3)``), the finest level's descriptor ``network`` (stream 0 fixed, 1 moving; eval
    mode), one record per level, how the start was found, the levels' shrink factors and iteration
    counts, and seconds per part."""

    matrix: Tensor
    network: nn.Module
    levels: list[dict[str, Any]]
    start: dict[str, Any]
    factors: list[float]
    iterations: list[int]
    seconds: dict[str, float]


@dataclass
class _Direction:
    """Keypoints of one image and their fixed negatives in the other: ``source`` is 0 (fixed) or 1
    (moving), which is also the descriptor network's stream for its patches."""

    source: int
    keypoints: Keypoints
    patches: Tensor  # (n, C, p, p) source patches (they do not depend on the homography)
    negatives: Tensor  # (n, C', p, p) target patches at least negative_distance from the correspondence


def descriptor_input(image: Tensor, colour: Colour) -> Tensor:
    """``(1, C, H, W)`` float: grey, or the colour channels with a grey picture stored as RGB reduced to
    one channel (its channels are equal)."""
    image = image.float()
    if colour == "grey" or image.shape[1] == 1:
        return grey_channels(image)
    if image.shape[1] == 4:
        image = image[:, :3]
    if bool((image - image[:, :1]).abs().amax() == 0):
        return image[:, :1]
    return image


def _level_factors(shape_f: Sequence[int], shape_m: Sequence[int], coarsest: int, max_size: int) -> list[float]:
    """Shrink factors, coarse first: the finest level keeps the long side at most ``max_size``, and
    each coarser one halves it until the long side is about ``coarsest`` pixels."""
    long_side = max(max(shape_f), max(shape_m))
    finest = max(1.0, long_side / max_size)
    count = max(1, 1 + round(math.log2(max(1.0, long_side / finest / coarsest))))
    return [finest * 2.0**k for k in reversed(range(count))]


@register_method
class WeakHomography(Method):
    """A homography and descriptors learned from scratch for each pair (module docstring)."""

    info = MethodInfo(
        name="weak-homography",
        kind="learned-per-pair",
        summary="homography and patch descriptors learned jointly on the pair itself (SGD on a contrastive "
        "loss, coarse to fine); for pairs of different modalities (RGB/NIR) where SIFT fails; start from "
        "SIFT+MAGSAC or the identity",
        ndims=(2,),
        modalities=("mono", "multi"),
        case_kinds=("homography", "affine"),
        reference=REFERENCE,
    )

    def __init__(
        self,
        *,
        network: Network = "pseudo-siamese",
        colour: Colour = "rgb",
        start: Start = "auto",
        fallback: Fallback = "mi",
        initial: Transform | Tensor | np.ndarray | str | os.PathLike | None = None,
        min_inliers: int = 20,
        feature_levels: int = 1,
        inlier_check: bool = True,
        mi_check: bool = True,
        model: Model = "homography",
        keypoints: int = 1500,
        gradient_threshold: float = 0.05,
        patch_size: int = 16,
        log2_scale: tuple[float, float] = (0.0, 1.0),
        iterations: int | Sequence[int] | None = None,
        batch_size: int = 64,
        learning_rate: float = 0.01,
        homography_learning_rate: float = 10.0,
        homography_max_step: float = 0.5,
        momentum: float = 0.9,
        margin: float = 1.0,
        negative_distance: float = 16.0,
        near_negatives: float = 0.5,
        near_radius: float = 3.0,
        coarsest: int = 200,
        max_size: int = 1024,
        frame_scale: float = 0.5,
        average_fraction: float = 0.3,
        warmup: float = 0.2,
        held_out: int = 256,
    ) -> None:
        if network not in ("siamese", "pseudo-siamese"):
            raise ConfigError(f"weak-homography: network must be 'siamese' or 'pseudo-siamese', got {network!r}")
        if colour not in ("rgb", "grey"):
            raise ConfigError(f"weak-homography: colour must be 'rgb' or 'grey', got {colour!r}")
        if start not in ("auto", "identity", "features", "mi"):
            raise ConfigError(f"weak-homography: start must be 'auto', 'identity', 'features' or 'mi', got {start!r}")
        if fallback not in ("mi", "identity"):
            raise ConfigError(f"weak-homography: fallback must be 'mi' or 'identity', got {fallback!r}")
        if keypoints < batch_size or batch_size < 2:
            raise ConfigError(f"weak-homography: need keypoints >= batch_size >= 2, got {keypoints} and {batch_size}")
        if len(tuple(log2_scale)) != 2 or log2_scale[0] > log2_scale[1]:
            raise ConfigError(f"weak-homography: log2_scale is (low, high), got {log2_scale}")
        if not 0.0 <= average_fraction < 1.0:
            raise ConfigError(f"weak-homography: average_fraction must be in [0, 1), got {average_fraction}")
        if min(learning_rate, homography_learning_rate, margin, negative_distance, frame_scale) <= 0:
            raise ConfigError("weak-homography: learning rates, margin, negative_distance and frame_scale must be > 0")
        if coarsest < 4 * patch_size or max_size < coarsest:
            raise ConfigError(f"weak-homography: need max_size >= coarsest >= 4 * patch_size, got {max_size}, {coarsest}")
        self.network = network
        self.colour = colour
        self.start = start
        self.fallback = fallback
        self.initial = initial
        self.min_inliers = int(min_inliers)
        if feature_levels < 1:
            raise ConfigError(f"weak-homography: feature_levels must be >= 1, got {feature_levels}")
        self.feature_levels = int(feature_levels)
        self.inlier_check = bool(inlier_check)
        self.mi_check = bool(mi_check)
        if model not in ("homography", "affine"):
            raise ConfigError(f"weak-homography: model must be 'homography' or 'affine', got {model!r}")
        self.model = model
        self.keypoints = int(keypoints)
        self.gradient_threshold = float(gradient_threshold)
        self.patch_size = int(patch_size)
        self.log2_scale = (float(log2_scale[0]), float(log2_scale[1]))
        self.iterations = iterations
        self.batch_size = int(batch_size)
        self.learning_rate = float(learning_rate)
        self.homography_learning_rate = float(homography_learning_rate)
        self.homography_max_step = float(homography_max_step)
        self.momentum = float(momentum)
        self.margin = float(margin)
        self.negative_distance = float(negative_distance)
        if not 0.0 <= near_negatives <= 1.0 or near_radius <= 1.0:
            raise ConfigError("weak-homography: near_negatives must be in [0, 1] and near_radius > 1")
        self.near_negatives = float(near_negatives)
        self.near_radius = float(near_radius)
        self.coarsest = int(coarsest)
        self.max_size = int(max_size)
        self.frame_scale = float(frame_scale)
        self.average_fraction = float(average_fraction)
        if not 0.0 <= warmup < 1.0:
            raise ConfigError(f"weak-homography: warmup must be in [0, 1), got {warmup}")
        self.warmup = float(warmup)
        self.held_out = int(held_out)

    # -- start --------------------------------------------------------------------------------------
    def _start(self, inputs: Inputs, seed: int, device: torch.device) -> tuple[Tensor, dict[str, Any], Any]:
        """The start (moving-world-from-fixed-world, float64), how it was found, and the SIFT+MAGSAC
        fit (:class:`~alignkit.solve.features.FeatureFit`) when the start is that fit, else None."""
        if self.initial is not None:
            return self._given_initial(inputs), {"start": "initial"}, None
        identity = torch.eye(3, dtype=torch.float64)
        if self.start == "identity":
            return identity, {"start": "identity"}, None
        if self.start == "mi":
            return self._mi_start(inputs, seed, device, {"start": "mi"})
        from alignkit.solve.features import feature_fit

        def untrusted(record: dict[str, Any]) -> tuple[Tensor, dict[str, Any], Any]:
            if self.fallback == "mi":
                return self._mi_start(inputs, seed, device, {"start": "mi", **record})
            return identity, {"start": "identity", **record}, None

        try:
            fit = feature_fit(inputs.fixed.batch(), inputs.fixed.grid, inputs.moving.batch(), inputs.moving.grid,
                              model=self.model, seed=seed)
        except ValueError as exc:
            if self.start == "features":
                raise InputError(f"weak-homography: no trusted SIFT+MAGSAC start ({exc})") from None
            return untrusted({"features": str(exc)})
        stats = {k: float(v) for k, v in fit.stats.items()}
        if fit.stats["inliers"] < self.min_inliers:
            if self.start == "features":
                raise InputError(f"weak-homography: the SIFT+MAGSAC start has {int(fit.stats['inliers'])} inliers, "
                                 f"fewer than min_inliers={self.min_inliers}")
            return untrusted({"features": stats})
        return fit.matrix.double(), {"start": "features", "features": stats}, fit

    @staticmethod
    def _mi_start(
        inputs: Inputs, seed: int, device: torch.device, record: dict[str, Any]
    ) -> tuple[Tensor, dict[str, Any], Any]:
        """The classical engine's Mattes-MI similarity then affine stages (the ``multimodal`` preset's
        linear chain, its centre start) as the start; the engine's own never-worse rule keeps the
        identity-like centre start where MI does not improve."""
        from alignkit.solve.engine import Engine
        from alignkit.solve.presets import resolve_config
        from alignkit.transforms import ComposedTransform
        from alignkit.transforms.base import flatten_stages

        config = resolve_config(2, preset="multimodal", transform="similarity,affine")
        engine = Engine(config, device=device, seed=seed)
        chain = engine.run(inputs.fixed, inputs.moving)
        matrix = ComposedTransform(flatten_stages(chain)).matrix().detach().double().cpu()
        record["mi"] = {"stages": [s.transform for s in config.stages],
                        "stage_checks": [dict(check) for check in engine.stage_checks]}
        return matrix / matrix[2, 2], record, None

    def _given_initial(self, inputs: Inputs) -> Tensor:
        initial = self.initial
        if isinstance(initial, (str, os.PathLike)):
            from alignkit.transforms.files import read_transform

            initial = read_transform(os.fspath(initial), fixed=inputs.fixed.grid, moving=inputs.moving.grid)
        if isinstance(initial, Transform):
            if not initial.is_linear or initial.ndim != 2:
                raise InputError("weak-homography: the initial transform must be a 2D matrix (affine or homography)")
            matrix = initial.matrix().detach()
        else:
            matrix = torch.as_tensor(np.asarray(initial, dtype=np.float64))
        matrix = matrix.to(torch.float64).cpu()
        if matrix.shape != (3, 3) or not torch.isfinite(matrix).all() or abs(float(matrix[2, 2])) < 1e-12:
            raise ConfigError(f"weak-homography: initial must be a finite 3x3 matrix, got shape {tuple(matrix.shape)}")
        return matrix / matrix[2, 2]

    # -- one level ----------------------------------------------------------------------------------
    def _network(self, channels: tuple[int, int], device: torch.device) -> nn.Module:
        if self.network == "siamese":
            net: nn.Module = SiameseDescriptor(ndim=2, in_channels=channels[0], patch_size=self.patch_size)
        else:
            net = PseudoSiameseDescriptor(ndim=2, in_channels=list(channels), patch_size=self.patch_size)
        return net.to(device)

    def _directions(
        self,
        images: tuple[Tensor, Tensor],
        pixel_matrix: Tensor,
        generator: torch.Generator,
    ) -> list[_Direction]:
        """Keypoints of each image whose start correspondence lies in the other image, their patches,
        and one fixed negative patch each."""
        margin = self.patch_size / 2.0
        directions = []
        for source in (0, 1):
            image, other = images[source], images[1 - source]
            matrix = pixel_matrix if source == 0 else torch.linalg.inv(pixel_matrix)
            kps = random_keypoints(image, self.keypoints, threshold=self.gradient_threshold, log2_scale=self.log2_scale,
                                   margin=margin, generator=generator)
            warped = warp_keypoints(matrix, kps)
            keep = inside(warped.xy, tuple(other.shape[2:]), margin) & torch.isfinite(warped.scale)
            kps, warped = kps.subset(keep), warped.subset(keep)
            if len(kps) < self.batch_size:
                continue
            # a share of the negatives near the correspondence (negative_distance .. near_radius times
            # it), the rest anywhere in the image: all of them at least negative_distance away
            near = torch.rand(len(kps), generator=generator) < self.near_negatives
            negatives, found = negative_keypoints(
                warped.xy, tuple(other.shape[2:]), min_distance=self.negative_distance, log2_scale=self.log2_scale,
                margin=margin, generator=generator,
            )
            if bool(near.any()):
                close, close_found = negative_keypoints(
                    warped.xy[near.to(warped.xy.device)], tuple(other.shape[2:]), min_distance=self.negative_distance,
                    max_distance=self.near_radius * self.negative_distance, log2_scale=self.log2_scale,
                    margin=margin, generator=generator,
                )
                rows = near.nonzero()[:, 0].to(warped.xy.device)
                negatives.xy[rows], negatives.orientation[rows], negatives.scale[rows] = (
                    close.xy, close.orientation, close.scale)
                found[rows] = close_found
            kps, negatives = kps.subset(found), negatives.subset(found)
            directions.append(_Direction(source, kps, sample_patches(image, kps, self.patch_size),
                                         sample_patches(other, negatives, self.patch_size)))
        if not directions:
            raise InputError("weak-homography: the start leaves too little overlap between the images to learn from")
        return directions

    def _loss(
        self,
        net: nn.Module,
        images: tuple[Tensor, Tensor],
        directions: list[_Direction],
        pixel_matrix: Tensor,
        index: list[Tensor],
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Eq. (5) on the keypoints ``index[d]`` of each direction, positives through ``pixel_matrix``."""
        margin = self.patch_size / 2.0
        pos_a, pos_b, neg_a, neg_b, weights = [], [], [], [], []
        for direction, rows in zip(directions, index):
            source, target = direction.source, 1 - direction.source
            matrix = pixel_matrix if source == 0 else torch.linalg.inv(pixel_matrix)
            kps = direction.keypoints.subset(rows)
            warped = warp_keypoints(matrix, kps)
            target_patches = sample_patches(images[target], warped, self.patch_size)
            source_desc = net(direction.patches[rows], stream=source)
            pos_a.append(source_desc)
            pos_b.append(net(target_patches, stream=target))
            neg_a.append(source_desc)
            neg_b.append(net(direction.negatives[rows], stream=target))
            weights.append(inside(warped.xy.detach(), tuple(images[target].shape[2:]), margin))
        return contrastive_loss(torch.cat(pos_a), torch.cat(pos_b), torch.cat(neg_a), torch.cat(neg_b),
                                margin=self.margin, positive_inside=torch.cat(weights))

    def _level(
        self,
        level: int,
        images: tuple[Tensor, Tensor],
        grids: tuple[Grid, Grid],
        homography: ConditionedHomography,
        iterations: int,
        generator: torch.Generator,
        bar: Any,
    ) -> tuple[nn.Module, dict[str, Any]]:
        device = images[0].device
        world_f = world_from_pixel(grids[0]).to(device)
        pixel_from_world_m = torch.linalg.inv(world_from_pixel(grids[1])).to(device)

        def pixel_matrix(theta: Tensor | None = None) -> Tensor:
            return pixel_from_world_m @ homography.world(theta) @ world_f

        start_theta = homography.theta.detach().clone()
        with torch.no_grad():
            directions = self._directions(images, pixel_matrix(), generator)
        # held-out keypoints judge the candidates at the end: the network never trained on them
        held, train = [], []
        for direction in directions:
            order = torch.randperm(len(direction.keypoints), generator=generator).to(device)
            n_held = min(self.held_out, len(order) // 4)
            held.append(order[:n_held])
            train.append(order[n_held:])
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        net = self._network((images[0].shape[1], images[1].shape[1]), device)
        # theta is a fraction of L = frame_scale x the image size: a move of one level pixel is 1 / L in
        # theta and the gradient in theta is L times the gradient in pixels, so a rate of r level
        # pixels per unit pixel gradient is r / L^2 in theta (the same pixel steps at every level)
        long_side = self.frame_scale * float(max(images[0].shape[2:]))
        rate = self.homography_learning_rate / long_side**2
        # no single step may move the homography by more than max_step level pixels (before momentum):
        # an outlying minibatch, or a network still learning, must not throw it out of the basin
        max_gradient = self.homography_max_step / (rate * long_side)
        optimiser = torch.optim.SGD(
            [{"params": net.parameters(), "lr": self.learning_rate},
             {"params": homography.parameters(), "lr": rate}],
            momentum=self.momentum,
        )
        base_lrs = [group["lr"] for group in optimiser.param_groups]
        per_direction = max(1, self.batch_size // len(directions))
        averaged_from = round(iterations * (1.0 - self.average_fraction))
        theta_sum, theta_count = torch.zeros_like(start_theta), 0
        last = 0.0
        frozen = round(iterations * self.warmup)
        for step in range(iterations):
            anneal = 0.5 * (1.0 + math.cos(math.pi * step / iterations))  # cosine annealing to 0
            for group, lr in zip(optimiser.param_groups, base_lrs):
                group["lr"] = lr * anneal
            # warm-up: a network that has not learnt anything yet gives the homography noise, not
            # a direction; it first learns descriptors at the level's start
            optimiser.param_groups[1]["lr"] *= float(step >= frozen)
            index = [rows[torch.randint(len(rows), (per_direction,), generator=generator).to(device)] for rows in train]
            loss, _ = self._loss(net, images, directions, pixel_matrix(), index)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(homography.parameters(), max_gradient)
            optimiser.step()
            if step >= averaged_from:
                theta_sum += homography.theta.detach()
                theta_count += 1
            last = float(loss.detach())
            if bar is not None:
                bar.update()
                bar.set_postfix_str(f"level {level} loss {last:.3f}", refresh=False)
        candidates = {"start": start_theta, "last": homography.theta.detach().clone()}
        if theta_count:
            candidates["average"] = theta_sum / theta_count
        scores = {}
        with torch.no_grad():
            for name, theta in candidates.items():
                scores[name] = float(self._loss(net, images, directions, pixel_matrix(theta), held)[0])
        best = min(scores, key=lambda name: (scores[name], name != "start"))
        with torch.no_grad():
            homography.theta.copy_(candidates[best])
        return net, {
            "level": level, "shape": list(images[0].shape[2:]), "iterations": iterations,
            "keypoints": [len(d.keypoints) for d in directions], "last_loss": round(last, 5),
            "held_out_loss": {k: round(v, 5) for k, v in scores.items()}, "kept": best,
        }

    # -- the method ---------------------------------------------------------------------------------
    def _iterations(self, count: int) -> list[int]:
        if self.iterations is None:
            # coarse levels move far with little detail; the finest one sets the accuracy
            values = [150] * (count - 1) + [250]
        elif isinstance(self.iterations, int):
            values = [int(self.iterations)] * count
        else:
            values = [int(v) for v in self.iterations]
            if len(values) != count:
                raise ConfigError(f"weak-homography: {count} pyramid levels but {len(values)} iteration counts")
        if min(values) < 1:
            raise ConfigError(f"weak-homography: iterations must be >= 1, got {values}")
        return values

    def fit(
        self, inputs: Inputs, *, device: torch.device, seed: int | None, progress: ProgressFactory = None
    ) -> PairFit:
        """Align one pair: the homography, the finest level's descriptor network and the record of
        each level (what :meth:`run` wraps; the network is what the descriptor benchmarks score)."""
        if inputs.ndim != 2:
            raise ConfigError("weak-homography registers 2D images")
        seed = 0 if seed is None else int(seed)
        generator = torch.Generator().manual_seed(seed)
        tic = time.perf_counter()
        start, start_record, feature_fit = self._start(inputs, seed, device)
        seconds = {"start": round(time.perf_counter() - tic, 3)}
        fixed = descriptor_input(inputs.fixed.batch(device=device), self.colour)
        moving = descriptor_input(inputs.moving.batch(device=device), self.colour)
        if self.network == "siamese":
            fixed, moving = common_channels(fixed, moving)
        homography = ConditionedHomography(ConditionedHomography.frame_of(inputs.fixed.grid, self.frame_scale), start,
                                           affine=self.model == "affine")
        homography = homography.to(device)
        factors = _level_factors(inputs.fixed.shape, inputs.moving.shape, self.coarsest, self.max_size)
        # iteration counts are given for the whole pyramid (coarse first); skipped levels drop theirs
        iterations = self._iterations(len(factors))
        if start_record["start"] in ("features", "mi"):
            # a trusted SIFT+MAGSAC start (or the MI chain's) is a few pixels off: the coarse levels could
            # only add their SGD noise (measured on vis-nir mountain/0000: a 0.66 px start ended 8.0 px
            # off through all three levels), so only the finest feature_levels run
            factors, iterations = factors[-self.feature_levels :], iterations[-self.feature_levels :]
        bar = progress(total=sum(iterations), desc="weak-homography", unit="it") if progress else None
        levels = []
        net: nn.Module | None = None
        tic = time.perf_counter()
        try:
            for level, (factor, count) in enumerate(zip(factors, iterations)):
                fixed_l, grid_f = downsample(fixed, inputs.fixed.grid, factor)
                moving_l, grid_m = downsample(moving, inputs.moving.grid, factor)
                images = (standardise(fixed_l), standardise(moving_l))
                net, record = self._level(level, images, (grid_f, grid_m), homography, count, generator, bar)
                levels.append(record)
        finally:
            if bar is not None:
                bar.close()
        seconds["weak-homography"] = round(time.perf_counter() - tic, 3)
        matrix = homography.world().detach().cpu()
        if feature_fit is not None and self.inlier_check:
            matrix = self._check_inliers(feature_fit, start, matrix / matrix[2, 2], inputs.fixed.grid, start_record)
        if start_record["start"] == "mi" and self.mi_check:
            matrix = self._check_mi(inputs, start, matrix / matrix[2, 2], start_record)
        assert net is not None  # at least one level always runs
        return PairFit(matrix / matrix[2, 2], net.eval(), levels, start_record, factors, iterations, seconds)

    @staticmethod
    def _check_inliers(feature_fit: Any, start: Tensor, matrix: Tensor, grid: Grid, record: dict[str, Any]) -> Tensor:
        """The learnt ``matrix``, or the SIFT+MAGSAC ``start`` when the start's keypoint inliers rule the
        learnt one out -- the engine's test for a stage after a feature start
        (:data:`alignkit.solve.engine.INLIER_CHI2_LIMIT`: their squared residuals may not rise past a
        chi-square's 0.999 quantile in units of the fit's noise variance). The contrastive loss can
        prefer another alignment than the matches: on wide-baseline photographs its keypoints also lie
        off the dominant plane the matches were fitted to (homogr BruggeSquare and Eiffel ended 2.8 and
        2.6 px further from the manual correspondences than their start), which the loss's own
        never-worse test cannot see. Writes the test into ``record["inlier_check"]``."""
        from alignkit.solve.engine import INLIER_CHI2_LIMIT

        def carry(m: Tensor) -> Any:  # a callable on (1, 2, N) world points through a 3x3 matrix
            return lambda world: MatrixTransform(m.to(world.dtype)).transform_points(world)

        spacing = float(grid.spacing.min())
        rise = feature_fit.chi2_rise(carry(start), carry(matrix), spacing)
        medians = [feature_fit.median_residual_px(carry(m), spacing) for m in (start, matrix)]
        kept = rise <= INLIER_CHI2_LIMIT
        record["inlier_check"] = {"chi2_rise": rise, "limit": INLIER_CHI2_LIMIT, "kept_learnt": kept,
                                  "inlier_median_px_start": medians[0], "inlier_median_px_learnt": medians[1]}
        return matrix if kept else start / start[2, 2]

    @staticmethod
    @torch.no_grad()
    def _check_mi(inputs: Inputs, start: Tensor, matrix: Tensor, record: dict[str, Any]) -> Tensor:
        """The learnt ``matrix``, or the MI ``start`` when the learnt one has less mutual information
        (Mattes, every pixel of the overlap, grey levels) -- the start's own evidence, as the keypoint
        inliers are a feature start's. Writes the test into ``record["mi_check"]``."""
        from alignkit.losses import MattesMI
        from alignkit.spatial.frames import apply_matrix
        from alignkit.spatial.points import sample_voxels_with_inside

        grid_f, grid_m = inputs.fixed.grid, inputs.moving.grid
        fixed = grey_channels(inputs.fixed.batch().float())
        moving = grey_channels(inputs.moving.batch().float())
        metric = MattesMI()

        def information(m: Tensor) -> float:
            voxel = apply_matrix(grid_m.voxel_from_world, MatrixTransform(m.float()).map_on(grid_f))
            warped, overlap = sample_voxels_with_inside(moving, voxel)  # the overlap: inside the moving image
            # zeros outside it, as the engine pads: MattesMI's intensity range is taken over every pixel
            return -float(metric(warped * overlap, fixed, overlap))

        values = [information(m) for m in (start, matrix)]
        kept = values[1] >= values[0]
        record["mi_check"] = {"mi_start": values[0], "mi_learnt": values[1], "kept_learnt": kept}
        return matrix if kept else start / start[2, 2]

    def run(
        self, inputs: Inputs, *, device: torch.device, seed: int | None, progress: ProgressFactory
    ) -> MethodOutput:
        fit = self.fit(inputs, device=device, seed=seed, progress=progress)
        transform = MatrixTransform(fit.matrix)
        transform.kind = "affine" if self.model == "affine" else "homography"  # the perspective row is 0 0 1
        description = {
            "method": self.info.name, "network": self.network, "colour": self.colour, "model": self.model,
            "start": fit.start, "levels": [float(f) for f in fit.factors], "iterations": fit.iterations,
            "keypoints": self.keypoints, "batch_size": self.batch_size, "learning_rate": self.learning_rate,
            "homography_learning_rate": self.homography_learning_rate, "margin": self.margin,
            "negative_distance": self.negative_distance, "patch_size": self.patch_size,
            "log2_scale": list(self.log2_scale), "matrix": fit.matrix.tolist(),
        }
        return MethodOutput(
            transform=transform, name=self.info.name, stages=["homography"], description=description,
            stage_seconds=fit.seconds,
            extra={"method": self.info.name, "start": fit.start["start"], "levels": fit.levels,
                   # whether the learnt matrix passed the start's inlier test (metrics.json, not only the manifest)
                   **{check: fit.start[check] for check in ("inlier_check", "mi_check") if check in fit.start}},
        )
