"""Oriented keypoint patches, their warping by a homography, and the contrastive loss: the parts of
Dong et al., "Learning to Align Images using Weak Geometric Supervision" (3DV 2018) that are not a network.

Convention: 2D only. Keypoint centres are *pixel* coordinates ``(x = column, y = row)`` of one image
(:func:`alignkit.spatial.frames.world_from_pixel`), orientations are radians measured from the
``x`` axis towards ``y``, scales are the spacing (pixels) between a patch's samples. A patch of
``size`` samples per side is the image sampled bilinearly at ``c + scale * R(orientation) u`` for
``u`` on a ``size x size`` lattice centred on 0; it is differentiable with respect to the centre,
orientation and scale, hence with respect to a homography that produced them
(:func:`warp_keypoints`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.errors import ShapeError
from alignkit.spatial.frames import reverse_components
from alignkit.spatial.points import sample_voxels


@dataclass
class Keypoints:
    """``n`` oriented keypoints of one image: ``xy (n, 2)`` pixels, ``orientation (n,)`` radians,
    ``scale (n,)`` pixels per patch sample."""

    xy: Tensor
    orientation: Tensor
    scale: Tensor

    def __len__(self) -> int:
        return int(self.xy.shape[0])

    def subset(self, index: Tensor) -> Keypoints:
        return Keypoints(self.xy[index], self.orientation[index], self.scale[index])


def patch_offsets(size: int, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The ``(size, size, 2)`` lattice ``u`` of a patch in ``(x, y)`` order, centred on 0, unit spacing."""
    ticks = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    y, x = torch.meshgrid(ticks, ticks, indexing="ij")
    return torch.stack([x, y], dim=-1)


def sample_patches(image: Tensor, keypoints: Keypoints, size: int) -> Tensor:
    """Patches ``(n, C, size, size)`` of ``image (1, C, H, W)`` at ``keypoints`` (module docstring);
    zero outside the image. Row ``i`` of a patch runs along the keypoint's rotated ``y`` axis."""
    if image.dim() != 4 or image.shape[0] != 1:
        raise ShapeError(f"sample_patches: expected a (1, C, H, W) image, got {tuple(image.shape)}")
    u = patch_offsets(size, dtype=keypoints.xy.dtype, device=keypoints.xy.device)
    cos, sin = torch.cos(keypoints.orientation), torch.sin(keypoints.orientation)
    # rotation (x, y) -> (cos x - sin y, sin x + cos y), then scale, then the centre
    rot_x = cos[:, None, None] * u[..., 0] - sin[:, None, None] * u[..., 1]
    rot_y = sin[:, None, None] * u[..., 0] + cos[:, None, None] * u[..., 1]
    s = keypoints.scale[:, None, None]
    xy = torch.stack([keypoints.xy[:, None, None, 0] + s * rot_x, keypoints.xy[:, None, None, 1] + s * rot_y], dim=1)
    # (n, 2, size, size) pixel -> (1, 2, n, size, size) voxel (array-axis order) for sample_voxels
    voxel = reverse_components(xy).permute(1, 0, 2, 3).unsqueeze(0)
    patches = sample_voxels(image, voxel.to(image.dtype), padding="zeros")  # (1, C, n, size, size)
    return patches[0].permute(1, 0, 2, 3)


def project(matrix: Tensor, xy: Tensor) -> Tensor:
    """``(n, 2)`` pixel points through a ``(3, 3)`` homography (target_from_source)."""
    homogeneous = xy @ matrix[:2, :2].T.to(xy.dtype) + matrix[:2, 2].to(xy.dtype)
    w = xy @ matrix[2, :2].to(xy.dtype) + matrix[2, 2].to(xy.dtype)
    return homogeneous / w[:, None]


def warp_keypoints(matrix: Tensor, keypoints: Keypoints, *, step: float = 1.0) -> Keypoints:
    """Keypoints carried into the other image by ``matrix`` (target pixel from source pixel), Dong et
    al. 2018 eqs. (10)-(12): the centre is projected, and the orientation and scale follow a short
    vector ``step`` pixels long along the keypoint's orientation, projected by finite differences
    (the local rotation and scale of the homography). Differentiable in ``matrix``."""
    direction = torch.stack([torch.cos(keypoints.orientation), torch.sin(keypoints.orientation)], dim=1)
    centre = project(matrix, keypoints.xy)
    tip = project(matrix, keypoints.xy + step * direction)
    vector = tip - centre
    length = vector.norm(dim=1)
    return Keypoints(centre, torch.atan2(vector[:, 1], vector[:, 0]), keypoints.scale * length / step)


def inside(xy: Tensor, shape: tuple[int, int], margin: float) -> Tensor:
    """Whether pixel points ``(n, 2)`` lie at least ``margin`` pixels inside an image of array ``shape``."""
    rows, cols = shape
    return (
        (xy[:, 0] >= margin) & (xy[:, 0] <= cols - 1 - margin) & (xy[:, 1] >= margin) & (xy[:, 1] <= rows - 1 - margin)
    )


def gradient_magnitude(image: Tensor) -> Tensor:
    """``(H, W)`` gradient magnitude (central differences, per pixel) of the channel mean of
    ``image (1, C, H, W)``."""
    grey = image[0].mean(0)
    gy, gx = torch.gradient(grey)
    return torch.sqrt(gx * gx + gy * gy)


def standardise(image: Tensor) -> Tensor:
    """Each channel of ``(1, C, H, W)`` at mean 0 and standard deviation 1 (Dong et al. 2018 §5.3's
    intensities, on which the gradient threshold is defined)."""
    mean = image.mean(dim=(2, 3), keepdim=True)
    std = image.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    return (image - mean) / std


def random_keypoints(
    image: Tensor,
    count: int,
    *,
    threshold: float,
    log2_scale: tuple[float, float],
    margin: float,
    generator: torch.Generator,
) -> Keypoints:
    """Up to ``count`` keypoints of a standardised ``image (1, C, H, W)``: positions drawn uniformly
    among the pixels whose gradient magnitude exceeds ``threshold`` (all pixels when too few do),
    orientation uniform in ``[-pi, pi)``, ``log2(scale)`` uniform in ``log2_scale`` (Dong et al. 2018
    §5.3), at least ``margin`` pixels from the border."""
    magnitude = gradient_magnitude(image)
    rows, cols = magnitude.shape
    m = math.ceil(margin)
    valid = torch.zeros_like(magnitude, dtype=torch.bool)
    valid[m : rows - m, m : cols - m] = True
    strong = valid & (magnitude > threshold)
    pool = strong if int(strong.sum()) >= count else valid
    candidates = pool.flatten().nonzero()[:, 0]
    if candidates.numel() == 0:
        raise ShapeError(f"image of {rows}x{cols} pixels has no room for patches {margin} pixels from the border")
    choice = candidates[torch.randperm(candidates.numel(), generator=generator)[:count].to(candidates.device)]
    xy = torch.stack([(choice % cols), (choice // cols)], dim=1).to(torch.float64)
    n = xy.shape[0]
    orientation = (torch.rand(n, generator=generator, dtype=torch.float64) * 2.0 - 1.0) * math.pi
    lo, hi = log2_scale
    scale = torch.exp2(lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64))
    device = image.device
    return Keypoints(xy.to(device), orientation.to(device), scale.to(device))


def negative_keypoints(
    target_xy: Tensor,
    shape: tuple[int, int],
    *,
    min_distance: float,
    log2_scale: tuple[float, float],
    margin: float,
    generator: torch.Generator,
    max_distance: float | None = None,
    tries: int = 20,
) -> tuple[Keypoints, Tensor]:
    """One keypoint of the target image (array ``shape``) per row of ``target_xy`` (the true
    correspondences' positions), at least ``min_distance`` pixels from it (Dong et al. 2018 §4.1's
    negatives), with a random orientation and scale: drawn uniformly in the image, or, with
    ``max_distance``, uniformly in the ring ``[min_distance, max_distance]`` around the
    correspondence (near negatives: patches that overlap the true one, which make the descriptor
    sensitive to small misalignments). Also returns which rows found one inside the image within
    ``tries`` draws."""
    rows, cols = shape
    n = target_xy.shape[0]
    cpu = target_xy.detach().double().cpu()
    xy = torch.zeros(n, 2, dtype=torch.float64)
    found = torch.zeros(n, dtype=torch.bool)
    for _ in range(tries):
        todo = (~found).nonzero()[:, 0]
        if todo.numel() == 0:
            break
        draw = torch.rand(todo.numel(), 2, generator=generator, dtype=torch.float64)
        if max_distance is None:
            cand = torch.stack([margin + draw[:, 0] * (cols - 1 - 2 * margin),
                                margin + draw[:, 1] * (rows - 1 - 2 * margin)], 1)
            far = (cand - cpu[todo]).norm(dim=1) >= min_distance
        else:
            radius = min_distance + draw[:, 0] * (max_distance - min_distance)
            angle = draw[:, 1] * 2.0 * math.pi
            cand = cpu[todo] + radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
            far = inside(cand, shape, margin)
        xy[todo[far]] = cand[far]
        found[todo[far]] = True
    orientation = (torch.rand(n, generator=generator, dtype=torch.float64) * 2.0 - 1.0) * math.pi
    lo, hi = log2_scale
    scale = torch.exp2(lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64))
    device = target_xy.device
    return Keypoints(xy.to(device), orientation.to(device), scale.to(device)), found.to(device)


def other_keypoints(xy: Tensor, min_distance: float, generator: torch.Generator, tries: int = 20) -> tuple[Tensor, Tensor]:
    """For each of ``n`` keypoints ``xy (n, 2)``, the index of another one at least ``min_distance``
    pixels away (drawn uniformly, ``tries`` draws), and whether one was found: negatives from the
    keypoints' own distribution, where :func:`negative_keypoints` draws new places."""
    n = xy.shape[0]
    choice = torch.zeros(n, dtype=torch.long)
    found = torch.zeros(n, dtype=torch.bool)
    if n < 2:
        return choice, found
    points = xy.detach().double().cpu()
    for _ in range(tries):
        todo = (~found).nonzero()[:, 0]
        if todo.numel() == 0:
            break
        draw = torch.randint(0, n, (todo.numel(),), generator=generator)
        far = (points[draw] - points[todo]).norm(dim=1) >= min_distance
        choice[todo[far]] = draw[far]
        found[todo[far]] = True
    return choice, found


def contrastive_loss(
    positive_a: Tensor,
    positive_b: Tensor,
    negative_a: Tensor,
    negative_b: Tensor,
    *,
    margin: float = 1.0,
    positive_inside: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Dong et al. 2018 eqs. (1)/(3)/(5) on unit descriptors ``(n, D)``: the mean squared distance of the
    positive pairs plus the mean hinge ``max(0, margin - d^2)`` of the negative pairs. Zero exactly
    when every positive pair coincides and every negative pair is at least ``sqrt(margin)`` apart.

    ``positive_inside (n,)`` (bool) marks the positive pairs whose correspondence lies inside the
    other image; the others count as the largest squared distance of unit descriptors, 4 -- dropping
    them instead would let a homography lower the loss by carrying the keypoints out of the image
    (measured: it ran away to a zero loss).
    """
    d_pos = (positive_a - positive_b).pow(2).sum(1)
    d_neg = (negative_a - negative_b).pow(2).sum(1)
    if positive_inside is not None:
        d_pos = torch.where(positive_inside, d_pos, torch.full_like(d_pos, 4.0))
    pos = d_pos.mean()
    neg = F.relu(margin - d_neg).mean() if d_neg.numel() else d_pos.new_zeros(())
    return pos + neg, {"positive": pos.detach(), "negative": neg.detach()}


def hardest_in_batch_negatives(
    descriptors_a: Tensor, descriptors_b: Tensor, allowed: Tensor, *, margin: float = 1.0
) -> Tensor:
    """The hinge ``max(0, margin - d^2)`` of each row's and each column's *hardest* negative in a batch of
    positive pairs ``(a_i, b_i)`` (unit descriptors ``(n, D)``): for anchor ``a_i`` the nearest ``b_j``,
    ``j != i``, and for ``b_j`` the nearest ``a_i``, among the pairs ``allowed (n, n)`` marks as true
    negatives (e.g. not the same place of the same image); mean over both directions, rows without an
    allowed negative skipped. HardNet's sampling (Mishchuk et al., NeurIPS 2017) on Dong et al. 2018's
    contrastive hinge: negatives drawn from the positives' own distribution, so that the loss cannot be
    lowered by telling *where* a patch was sampled (keypoint or random place) instead of *what* it shows.
    """
    n = descriptors_a.shape[0]
    if n < 2:
        return descriptors_a.new_zeros(())
    squared = torch.cdist(descriptors_a, descriptors_b).pow(2)
    mask = allowed & ~torch.eye(n, dtype=torch.bool, device=squared.device)
    far = squared.detach().max() + 4.0  # masked entries never win the minimum
    masked = torch.where(mask, squared, far)
    terms = []
    for values, any_allowed in ((masked.min(dim=1).values, mask.any(dim=1)), (masked.min(dim=0).values, mask.any(dim=0))):
        if bool(any_allowed.any()):
            terms.append(F.relu(margin - values[any_allowed]).mean())
    return torch.stack(terms).mean() if terms else descriptors_a.new_zeros(())
