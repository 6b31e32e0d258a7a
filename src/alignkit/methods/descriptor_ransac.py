"""``learned-descriptor-ransac``: one general patch descriptor trained on an *automatic* data set of
positive patches harvested by ``weak-homography`` from a folder of unlabelled pairs (Dong et al., "Learning
to Align Images using Weak Geometric Supervision", 3DV 2018, §6.2), used to match SIFT keypoints whose
matches MAGSAC++ fits a homography to (the fast path: seconds per pair).

Training (``alignkit train --method weak-homography --dataset vis-nir/country -o RUN``, or
``--method learned-descriptor-ransac``): :meth:`DescriptorRansacModel.training_data` aligns every
``*_nir.* / *_rgb.*`` (or ``*A.* / *B.*``) pair of the folder with ``weak-homography`` (its default
start: SIFT+MAGSAC when trusted, else the identity), then, as the paper does, detects SIFT keypoints
in the RGB (moving) image, carries them into the NIR (fixed) image by the estimated homography
(orientation and scale too, :func:`~alignkit.methods.patches.warp_keypoints`) and keeps the pair of
patches as a positive; each positive also gets one fixed negative, the patch of another SIFT keypoint
of the moving image at least ``negative_distance`` pixels from the correspondence. The network (partly shared pseudo-siamese,
grey patches; §4.4, §5.3) is trained by the loop of :mod:`alignkit.train` on the contrastive loss of
eq. (3). Options (``--option KEY=VALUE``): ``harvest_pairs`` (at most this many pairs, 0 = all),
``harvest_keypoints`` (SIFT keypoints per pair), ``harvest_options`` (``weak-homography`` options,
e.g. ``{"iterations": [100, 100, 150]}``), ``negative_distance``, ``margin``, ``in_batch_negatives`` (also
the hardest negative among the batch's other positives, HardNet's sampling; default on),
``orientation_jitter_deg`` / ``scale_jitter`` (the fixed keypoint perturbed at harvest, as independent
SIFT detections in the two modalities disagree; defaults 20 degrees / 0.15 octave).

Registering (``alignkit register A B --method learned-descriptor-ransac --checkpoint RUN``): SIFT
keypoints of both images, their patches described by the network (fixed image on stream 0, moving on
1), mutual nearest neighbours passing Lowe's ratio test (``ratio``), and OpenCV's MAGSAC++
homography (``threshold_px``); the matrix comes back in world coordinates like the ``photo``
preset's.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from alignkit.errors import ConfigError, InputError
from alignkit.image import Image
from alignkit.methods.base import MethodInfo, MethodOutput, ProgressFactory
from alignkit.methods.learned import LearnedMethod, LearnedModel, learned_method
from alignkit.methods.patches import (
    Keypoints,
    contrastive_loss,
    hardest_in_batch_negatives,
    inside,
    other_keypoints,
    sample_patches,
    standardise,
    warp_keypoints,
)
from alignkit.registration import Inputs
from alignkit.spatial.frames import world_matrix_from_pixel_matrix
from alignkit.transforms import MatrixTransform

PATCH = 16
#: SIFT's keypoint size is a diameter in pixels; a patch of PATCH samples at scale s spans PATCH * s
#: pixels, clipped to the scales the per-pair method learns at (log2 scale in [0, 1])
SCALE_RANGE = (1.0, 2.0)


def _grey_standardised(image: Image, device: torch.device | str = "cpu") -> Tensor:
    from alignkit.image import grey_channels

    return standardise(grey_channels(image.batch(device=device)))


def _uint8(tensor: Tensor) -> np.ndarray:
    grey = tensor[0, 0].detach().float().cpu().numpy()
    lo, hi = np.percentile(grey, [1.0, 99.0])
    return np.clip((grey - lo) * (255.0 / max(hi - lo, 1e-6)), 0, 255).astype(np.uint8)


def sift_keypoints(image: Tensor, count: int) -> Keypoints:
    """Up to ``count`` SIFT keypoints of ``image (1, 1, H, W)`` as oriented keypoints (OpenCV's angle
    in degrees turns from +x towards +y in pixel coordinates; its size is the diameter)."""
    import cv2

    found = cv2.SIFT_create(nfeatures=int(count)).detect(_uint8(image), None)[: int(count)]
    xy = torch.tensor([k.pt for k in found], dtype=torch.float64).reshape(-1, 2)
    angle = torch.tensor([math.radians(k.angle) for k in found], dtype=torch.float64)
    scale = torch.tensor([k.size / PATCH for k in found], dtype=torch.float64).clamp(*SCALE_RANGE)
    return Keypoints(xy, angle, scale)


class PatchPairs(Dataset):
    """Harvested patches: ``fixed``, ``moving`` (the positive) and ``negative`` ``(N, 1, p, p)``, with the
    positive's keypoint in the moving image, ``xy (N, 2)`` pixels, and the index of its image pair,
    ``pair (N,)`` -- what tells in-batch negatives (another place or another pair) from near-duplicates.
    Items are dicts of per-patch tensors. ``ndim``/``size`` as the training loop expects."""

    ndim = 2

    def __init__(self, fixed: Tensor, moving: Tensor, negative: Tensor, xy: Tensor, pair: Tensor) -> None:
        self.fixed, self.moving, self.negative = fixed, moving, negative
        self.xy, self.pair = xy.to(torch.float32), pair.to(torch.long)
        self.size = tuple(fixed.shape[2:])

    def __len__(self) -> int:
        return int(self.fixed.shape[0])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"fixed": self.fixed[index], "moving": self.moving[index], "negative": self.negative[index],
                "xy": self.xy[index], "pair": self.pair[index]}

    @classmethod
    def concatenate(cls, parts: Sequence[PatchPairs]) -> PatchPairs:
        if not parts:
            empty = torch.zeros(0, 1, PATCH, PATCH)
            return cls(empty, empty, empty, torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
        return cls(*(torch.cat([getattr(p, k) for p in parts]) for k in ("fixed", "moving", "negative", "xy", "pair")))


def folder_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(fixed, moving) files of a folder: ``X_nir.*`` / ``X_rgb.*`` (VIS-NIR; NIR fixed) or ``XA.*`` /
    ``XB.*`` (homogr)."""
    suffixes = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes)
    pairs = []
    for path in files:
        stem = path.stem
        for fixed_tag, moving_tag in (("_nir", "_rgb"), ("A", "B")):
            if stem.endswith(fixed_tag):
                partner = [p for p in files if p.parent == path.parent and p.stem == stem[: -len(fixed_tag)] + moving_tag]
                if partner:
                    pairs.append((path, partner[0]))
    return pairs


def harvest_pair(
    fixed: Image,
    moving: Image,
    matrix: Tensor,
    *,
    keypoints: int,
    negative_distance: float,
    generator: torch.Generator,
    pair_index: int = 0,
    orientation_jitter_deg: float = 0.0,
    scale_jitter: float = 0.0,
) -> PatchPairs:
    """Positive and negative patches of one aligned pair (``matrix``: moving-pixel-from-fixed-pixel).

    Positives (Dong et al. 2018 §6.2): SIFT keypoints of the moving image and the same keypoints carried
    into the fixed image by ``matrix`` (centre, orientation and scale). Each positive's negative is the
    patch of *another SIFT keypoint* of the moving image at least ``negative_distance`` pixels from it --
    drawn from the positives' own distribution (measured: negatives at random places and scales let the
    network separate keypoint patches from random ones, and its nearest-neighbour rate on held-out
    pairs stayed at chance). ``orientation_jitter_deg`` / ``scale_jitter``: the fixed keypoint's
    orientation turned by a uniform angle in +-that many degrees and its scale multiplied by
    ``2 ** uniform(+-scale_jitter)``, because at matching time both images' SIFT keypoints are detected
    independently (measured on 13 of the ``vis-nir/country`` training pairs aligned by SIFT+MAGSAC: the
    orientations of keypoints found at the same place in both images differ by a median of 8-71
    degrees, 34 over the pairs, with 32-67 % within 20 degrees)."""
    fixed_t, moving_t = _grey_standardised(fixed), _grey_standardised(moving)
    in_moving = sift_keypoints(moving_t, keypoints)
    if len(in_moving) == 0:
        return PatchPairs.concatenate([])
    in_fixed = warp_keypoints(torch.linalg.inv(matrix), in_moving)
    keep = inside(in_fixed.xy, tuple(fixed_t.shape[2:]), PATCH / 2) & torch.isfinite(in_fixed.scale)
    in_fixed, in_moving = in_fixed.subset(keep), in_moving.subset(keep)
    n = len(in_moving)
    if orientation_jitter_deg > 0:
        turn = (torch.rand(n, generator=generator, dtype=torch.float64) * 2.0 - 1.0) * math.radians(orientation_jitter_deg)
        in_fixed.orientation = in_fixed.orientation + turn.to(in_fixed.orientation)
    if scale_jitter > 0:
        factor = torch.exp2((torch.rand(n, generator=generator, dtype=torch.float64) * 2.0 - 1.0) * scale_jitter)
        in_fixed.scale = in_fixed.scale * factor.to(in_fixed.scale)
    in_fixed.scale = in_fixed.scale.clamp(*SCALE_RANGE)
    other, found = other_keypoints(in_moving.xy, negative_distance, generator)
    rows = found.nonzero()[:, 0]
    with torch.no_grad():
        return PatchPairs(
            sample_patches(fixed_t, in_fixed.subset(rows), PATCH),
            sample_patches(moving_t, in_moving.subset(rows), PATCH),
            sample_patches(moving_t, in_moving.subset(other[rows]), PATCH),
            in_moving.xy[rows],
            torch.full((len(rows),), int(pair_index), dtype=torch.long),
        )


class DescriptorRansacMethod(LearnedMethod):
    """Registers a pair by SIFT keypoints matched with the trained descriptor and a MAGSAC++ homography.

    ``checkpoint``: a run folder, checkpoint file or loaded model (default: the shipped model);
    ``keypoints``: SIFT keypoints per image; ``ratio``: Lowe's ratio test on descriptor distances;
    ``threshold_px``: MAGSAC++'s noise bound (pixels)."""

    def __init__(
        self,
        *,
        checkpoint: LearnedModel | str | os.PathLike | None = None,
        keypoints: int = 4000,
        ratio: float = 0.95,
        threshold_px: float = 3.0,
    ) -> None:
        super().__init__(checkpoint=checkpoint)
        if keypoints < 4 or not 0.0 < ratio <= 1.0 or threshold_px <= 0:
            raise ConfigError("learned-descriptor-ransac: need keypoints >= 4, 0 < ratio <= 1, threshold_px > 0")
        self.keypoints, self.ratio, self.threshold_px = int(keypoints), float(ratio), float(threshold_px)

    def run(self, inputs: Inputs, *, device: torch.device, seed: int | None, progress: ProgressFactory) -> MethodOutput:
        import cv2

        if inputs.ndim != 2:
            raise ConfigError("learned-descriptor-ransac registers 2D images")
        learned, source = self.model(2, device)
        tic = time.perf_counter()
        cv2.setRNGSeed(0 if seed is None else int(seed))
        points, stats = learned.matches(inputs.fixed, inputs.moving, keypoints=self.keypoints, ratio=self.ratio,
                                        device=device)
        if len(points[0]) < 4:
            raise InputError(f"learned-descriptor-ransac: {len(points[0])} descriptor matches, too few for a homography")
        method = getattr(cv2, "USAC_MAGSAC", cv2.RANSAC)
        pixel, mask = cv2.findHomography(points[0], points[1], method, self.threshold_px, maxIters=10000,
                                         confidence=0.999)
        if pixel is None or mask is None or int(mask.sum()) < 8:
            raise InputError(f"learned-descriptor-ransac: no homography fits the {len(points[0])} descriptor matches")
        matrix = world_matrix_from_pixel_matrix(torch.as_tensor(pixel), inputs.fixed.grid, inputs.moving.grid)
        transform = MatrixTransform(matrix)
        transform.kind = "homography"
        stats.update(inliers=int(mask.sum()))
        seconds = round(time.perf_counter() - tic, 3)
        return MethodOutput(
            transform=transform, name=self.info.name, stages=["homography"],
            description={"method": self.info.name, "checkpoint": source, "keypoints": self.keypoints,
                         "ratio": self.ratio, "threshold_px": self.threshold_px, "model": learned.config},
            stage_seconds={self.info.name: seconds}, extra={"method": self.info.name, "matching": stats},
        )


@learned_method(
    MethodInfo(
        name="learned-descriptor-ransac",
        kind="learned",
        summary="SIFT keypoints matched with a patch descriptor learnt from pairs that weak-homography aligned "
        "(an automatic data set), homography by MAGSAC++; seconds per pair",
        ndims=(2,),
        modalities=("mono", "multi"),
        case_kinds=("homography", "affine"),
        needs_checkpoint=True,
        reference="Dong, Burnham, Boots, Rains, Dellaert: Learning to Align Images using Weak Geometric "
        "Supervision (3DV 2018), §6.2",
    ),
    runner=DescriptorRansacMethod,
)
class DescriptorRansacModel(LearnedModel):
    """The automatic-data-set descriptor (module docstring): one network, ``descriptor``."""

    descriptor: nn.Module
    #: a harvest is slow (a weak-homography run per pair); the pairs made once per process are reused
    _harvests: ClassVar[dict[str, tuple[PatchPairs, PatchPairs]]] = {}

    def __init__(
        self,
        *,
        networks: Mapping[str, nn.Module],
        ndim: int,
        size: tuple[int, ...] | list[int],
        margin: float = 1.0,
        negative_distance: float = 16.0,
        harvest_pairs: int = 0,
        harvest_keypoints: int = 1000,
        harvest_options: dict[str, Any] | None = None,
        in_batch_negatives: bool = True,
        orientation_jitter_deg: float = 20.0,
        scale_jitter: float = 0.15,
    ) -> None:
        super().__init__(networks=networks, ndim=ndim, size=size)
        if margin <= 0 or negative_distance < 0 or orientation_jitter_deg < 0 or scale_jitter < 0:
            raise ConfigError("learned-descriptor-ransac: need margin > 0 and non-negative distances and jitters")
        self.margin = float(margin)
        self.negative_distance = float(negative_distance)
        self.in_batch_negatives = bool(in_batch_negatives)
        self.options = {"margin": self.margin, "negative_distance": self.negative_distance,
                        "harvest_pairs": int(harvest_pairs), "harvest_keypoints": int(harvest_keypoints),
                        "harvest_options": dict(harvest_options or {}), "in_batch_negatives": self.in_batch_negatives,
                        "orientation_jitter_deg": float(orientation_jitter_deg), "scale_jitter": float(scale_jitter)}

    @classmethod
    def default_networks(cls, ndim: int) -> dict[str, dict[str, Any]]:
        return {"descriptor": {"name": "pseudo_siamese_descriptor", "ndim": ndim, "in_channels": 1,
                               "patch_size": PATCH}}

    # -- training -----------------------------------------------------------------------------------
    @classmethod
    def training_data(cls, config: Any) -> tuple[PatchPairs, PatchPairs]:
        """Harvest the folder ``config.dataset`` (module docstring) into (train, validation) patch pairs
        (a seeded ``config.val_fraction`` of the *pairs* for validation)."""
        from alignkit.data.datasets import dataset_folder
        from alignkit.io import read_image
        from alignkit.methods.weak_homography import WeakHomography
        from alignkit.registration import prepare_inputs

        if not config.dataset:
            raise ConfigError("learned-descriptor-ransac trains on a folder of image pairs: give --dataset")
        options = dict(config.method_options)
        folder = dataset_folder(config.dataset)
        key = repr((os.fspath(folder), sorted(options.items(), key=str), config.seed, config.val_fraction))
        if key in cls._harvests:
            return cls._harvests[key]
        pairs = folder_pairs(folder)
        limit = int(options.get("harvest_pairs", 0))
        if limit > 0:
            pairs = pairs[:limit]
        if len(pairs) < 2:
            raise InputError("needs at least two image pairs (X_nir/X_rgb or XA/XB) to harvest from", folder)
        generator = torch.Generator().manual_seed(int(config.seed))
        order = torch.randperm(len(pairs), generator=generator).tolist()
        n_val = max(1, round(len(pairs) * float(config.val_fraction)))
        aligner = WeakHomography(**dict(options.get("harvest_options") or {}))
        parts: dict[bool, list[PatchPairs]] = {True: [], False: []}
        from tqdm.auto import tqdm

        for rank, index in enumerate(tqdm(order, desc="harvest", unit="pair", disable=bool(config.quiet))):
            fixed_path, moving_path = pairs[index]
            inputs = prepare_inputs(read_image(fixed_path), read_image(moving_path), None, None, None, None)
            fit = aligner.fit(inputs, device=torch.device("cpu"), seed=int(config.seed) + index)
            # the estimate in pixels (these folders hold raster images: world = pixels up to the grids)
            from alignkit.spatial.frames import world_from_pixel

            pixel = torch.linalg.inv(world_from_pixel(inputs.moving.grid)) @ fit.matrix @ world_from_pixel(inputs.fixed.grid)
            parts[rank < n_val].append(harvest_pair(
                inputs.fixed, inputs.moving, pixel, keypoints=int(options.get("harvest_keypoints", 1000)),
                negative_distance=float(options.get("negative_distance", 16.0)), generator=generator, pair_index=index,
                orientation_jitter_deg=float(options.get("orientation_jitter_deg", 20.0)),
                scale_jitter=float(options.get("scale_jitter", 0.15))))
        sets = [PatchPairs.concatenate(parts[flag]) for flag in (False, True)]
        cls._harvests[key] = (sets[0], sets[1])
        return sets[0], sets[1]

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"fixed": self.descriptor(batch["fixed"], stream=0), "moving": self.descriptor(batch["moving"], stream=1),
                "negative": self.descriptor(batch["negative"], stream=1)}

    def loss(self, batch: Mapping[str, Tensor], output: Mapping[str, Tensor], *, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Dong et al. 2018 eq. (3) on the harvested positive and negative of each patch, plus (with
        ``in_batch_negatives``) the hardest negative among the batch's other positives
        (:func:`~alignkit.methods.patches.hardest_in_batch_negatives`; a pair of patches counts as
        negative when it comes from another image pair or lies ``negative_distance`` pixels away)."""
        total, parts = contrastive_loss(output["fixed"], output["moving"], output["fixed"], output["negative"],
                                        margin=self.margin)
        if self.in_batch_negatives and "xy" in batch and "pair" in batch:
            xy, pair = batch["xy"], batch["pair"]
            allowed = (pair[:, None] != pair[None, :]) | (torch.cdist(xy, xy) >= self.negative_distance)
            hard = hardest_in_batch_negatives(output["fixed"], output["moving"], allowed, margin=self.margin)
            total = total + hard
            parts = {**parts, "hardest_negative": hard.detach()}
        return total, parts

    @torch.no_grad()
    def validation_metrics(self, batch: Mapping[str, Tensor], output: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``nn_correct``: whether each fixed patch's nearest moving descriptor in the batch is its own
        (Dong et al. 2018's AP within a batch)."""
        distance = torch.cdist(output["fixed"], output["moving"])
        return {"nn_correct": (distance.argmin(1) == torch.arange(distance.shape[0], device=distance.device)).float()}

    def predict_transform(self, grid: Any, fixed: Tensor, moving: Tensor) -> Any:
        raise ConfigError("learned-descriptor-ransac registers through its keypoint matches (alignkit.register)")

    # -- matching -----------------------------------------------------------------------------------
    @torch.no_grad()
    def describe(self, image: Tensor, keypoints: Keypoints, stream: int) -> Tensor:
        """Unit descriptors ``(n, D)`` of a standardised grey ``image (1, 1, H, W)`` at ``keypoints``."""
        patches = sample_patches(image, keypoints, PATCH)
        if patches.shape[0] == 0:
            return patches.new_zeros(0, getattr(self.descriptor, "descriptor_dim", 256))
        return torch.cat([self.descriptor(chunk, stream=stream) for chunk in patches.split(1024)])

    def matches(
        self, fixed: Image, moving: Image, *, keypoints: int, ratio: float, device: torch.device | str = "cpu"
    ) -> tuple[tuple[np.ndarray, np.ndarray], dict[str, Any]]:
        """Mutual nearest-neighbour matches passing the ratio test: pixel points ``(n, 2)`` of each image."""
        self.eval()
        images = [_grey_standardised(im, device) for im in (fixed, moving)]
        found = [sift_keypoints(im, keypoints) for im in images]
        found = [Keypoints(k.xy.to(device), k.orientation.to(device), k.scale.to(device)) for k in found]
        desc = [self.describe(im, k, stream) for stream, (im, k) in enumerate(zip(images, found))]
        if min(d.shape[0] for d in desc) < 2:
            return (np.zeros((0, 2)), np.zeros((0, 2))), {"keypoints": [len(k) for k in found], "matches": 0}
        distance = torch.cdist(desc[0], desc[1])
        best2 = distance.topk(2, dim=1, largest=False)
        forward = best2.indices[:, 0]
        backward = distance.argmin(0)
        mutual = backward[forward] == torch.arange(distance.shape[0], device=distance.device)
        passes = best2.values[:, 0] < ratio * best2.values[:, 1]
        rows = (mutual & passes).nonzero()[:, 0]
        pts_f = found[0].xy[rows].cpu().numpy()
        pts_m = found[1].xy[forward[rows]].cpu().numpy()
        return (pts_f, pts_m), {"keypoints": [len(k) for k in found], "matches": len(rows)}


def _attach_to_weak_homography() -> None:
    """``alignkit train --method weak-homography`` trains this model (the §6.2 automatic data set is
    what the per-pair method is trained *for*): :func:`alignkit.methods.learned.learned_class`
    resolves a method class's ``model_class``."""
    from alignkit.methods.weak_homography import WeakHomography

    WeakHomography.model_class = DescriptorRansacModel  # type: ignore[attr-defined]


_attach_to_weak_homography()
