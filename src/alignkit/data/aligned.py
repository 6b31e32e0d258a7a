"""Aligned multimodal 2D pairs, and the scale-specific training patches of Zampieri et al., "Coarse to
fine non-rigid registration: a chain of scale-specific neural networks for multimodal image alignment
with application to remote sensing" (2018), made from them.

Aligned pairs (:func:`aligned_pairs`) are the analogue of the paper's aerial image ↔ cadastral map
pairs "which visually look already well aligned": two modalities of one scene on one pixel grid.

* ``brain3d-oasis-trt20``: sagittal T1 slices of each subject against their rasterised label map --
  ``map_kind="edges"`` (label boundaries: 1 where a pixel's DKT/subcortical label differs from a
  4-neighbour's, the closest thing to a cadastral map) or ``"cortex"`` (binary mask of the cortical
  labels 1000-2999);
* ``vis-nir``: NIR (fixed) ↔ grey RGB (moving). Test scenes are brought onto the NIR grid through
  their ground-truth affine. ``country`` has no ground truth and is *not* aligned well enough to trust
  as is (gradient-magnitude ECC affine fits on 13 of its pairs moved the image corners by 0.9-19 px),
  so each ``country`` pair is aligned by such a fit first and kept only when the fit's correlation
  reaches :data:`COUNTRY_MIN_CORRELATION`;
* ``multimodal/itk-t1-pd-slices``: the T1 and PD ``Border20`` slices (aligned, within 0.5 px);
* ``multimodal/ct-mr-2d``: MR ↔ the aligned CT (good to ~2 px), cropped to their common extent;
* ``multimodal/t1-pd-3d``: slices of one head's T1 against its PD brought onto the T1 grid through the
  measured rigid map of :class:`~alignkit.data.multimodal.T1PD3DDataset` (good to ~1 mm; a head other
  than the ITK slices'), cut across the PD's thick (2.4 mm) axis, where the PD covers the head.

Images are grey, float32, their intensity percentiles (0.5, 99.5) mapped to [0, 1]; ``valid`` marks
pixels that hold data (a resampled image's outside is not). Each pair has a ``group`` (subject or scene)
so training and held-out splits never share one.

:class:`ScalePatchPairs` makes the training pairs of one block of the chain: a patch of
``size`` pixels *at the block's scale* (a region ``factor`` times larger, Gaussian-downsampled as the
chain downsamples at inference), its fixed image resampled through a random eq.-3 field of length at
most ``max_displacement`` pixels at that scale (:func:`alignkit.data.synthetic.random_mixture_field`),
so the true displacement is known (§3.3, §3.5). The moving (map) patch stays put:
``moving(x + flow(x)) = fixed(x)``, alignkit's direction.

Modalities never seen in training (T1 ↔ PD, CT ↔ MR) are what a multimodal block must still align:
``synth_fraction`` of the training patches of pairs with a label map (OASIS) replace the moving
image -- and half of those the fixed one too -- by :func:`synthetic_contrast`, a new random "modality"
of the same anatomy drawn from its labels, the idea of SynthMorph (Hoffmann et al., "SynthMorph:
learning contrast-invariant registration without acquired images", IEEE TMI 2022): a block that
never sees the same contrast twice has to match structure, not intensities.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from alignkit.data.datasets import dataset_folder
from alignkit.data.synthetic import random_mixture_field
from alignkit.errors import ConfigError, InputError
from alignkit.spatial import Grid, sample_voxels
from alignkit.spatial.pyramid import downsample

#: ECC correlation (gradient magnitudes, affine) a ``vis-nir/country`` pair needs to be used
COUNTRY_MIN_CORRELATION = 0.5
#: residual misalignment of a VIS-NIR pair, pixels: where the learned homography of Dong et al. settles
#: from the ground truth on the test scenes (1-2 px, benchmarks/README.md), and the ECC fits of country
VIS_NIR_MISALIGNMENT = 1.5
PERCENTILES = (0.5, 99.5)
MapKind = str  # "edges" | "cortex"
SOURCES = ("brain3d-oasis-trt20", "vis-nir", "multimodal/itk-t1-pd-slices", "multimodal/ct-mr-2d", "multimodal/t1-pd-3d")


@dataclass(eq=False)
class AlignedPair:
    """Two modalities of one scene on one grid: ``fixed``, ``moving`` and ``valid`` are ``(1, H, W)``;
    ``binary_moving`` when the moving image is a map (0/1)."""

    name: str
    group: str
    fixed: Tensor
    moving: Tensor
    valid: Tensor
    binary_moving: bool = False
    #: pixels outside the image may be read as zero background (brain slices), not as missing data
    pad_is_background: bool = False
    #: ``(1, H, W)`` integer label map of the scene (0 = unlabelled) when it has one: the source of
    #: :func:`synthetic_contrast`
    labels: Tensor | None = None
    #: how far the two images may be from aligned, full-resolution pixels (what their source is known to):
    #: a block is not taught with pairs whose error is a sizeable part of its task at its scale
    misalignment: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.fixed.shape[-2]), int(self.fixed.shape[-1]))


def _normalise(array: np.ndarray, mask: np.ndarray | None = None) -> Tensor:
    values = array[mask] if mask is not None and mask.any() else array
    lo, hi = np.percentile(values, PERCENTILES)
    out = np.clip((array - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    return torch.from_numpy(out.astype(np.float32))[None]


def _grey(path: Path) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputError("cannot read image", path)
    if image.ndim == 3:
        image = image[..., :3].mean(axis=2)
    return image.astype(np.float32)


def label_edges(labels: np.ndarray) -> np.ndarray:
    """1 where a pixel's label differs from its right or lower neighbour's (boundaries one pixel thick)."""
    edges = np.zeros(labels.shape, dtype=bool)
    edges[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edges[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    return edges


def _oasis(folder: Path, map_kind: MapKind, stride: int) -> list[AlignedPair]:
    import nibabel as nib

    pairs = []
    for subject in sorted(p for p in folder.iterdir() if (p / "labels.all.nii.gz").is_file()):
        t1 = np.asarray(nib.load(subject / "t1weighted_brain.nii.gz").dataobj, dtype=np.float32)
        labels = np.asarray(nib.load(subject / "labels.all.nii.gz").dataobj).astype(np.int64)
        brain = t1 > 0
        lo, hi = np.percentile(t1[brain], PERCENTILES)
        depth = t1.shape[2]
        for k in range(int(depth * 0.25), int(depth * 0.75), stride):  # sagittal slices through the hemispheres
            slab = labels[:, :, k]
            if brain[:, :, k].mean() < 0.15 or (slab > 0).mean() < 0.03:
                continue
            if map_kind == "edges":
                drawn = label_edges(slab)
            elif map_kind == "cortex":
                drawn = (slab >= 1000) & (slab < 3000)
            else:
                raise ConfigError(f"map_kind must be 'edges' or 'cortex', got {map_kind!r}")
            image = np.clip((t1[:, :, k] - lo) / max(hi - lo, 1e-6), 0, 1)
            pairs.append(AlignedPair(
                name=f"{subject.name}/x{k:03d}", group=subject.name,
                fixed=torch.from_numpy(image.astype(np.float32))[None],
                moving=torch.from_numpy(drawn.astype(np.float32))[None],
                valid=torch.ones(1, *slab.shape, dtype=torch.bool), binary_moving=True, pad_is_background=True,
                labels=torch.from_numpy(slab.astype(np.int32))[None],
            ))
    return pairs


def _ecc_affine(fixed: np.ndarray, moving: np.ndarray) -> tuple[np.ndarray, float]:
    """Affine ``W`` (2x3, pixels) with ``moving(W [x; 1]) ≈ fixed(x)`` fitted by OpenCV's ECC on
    gradient magnitudes at half resolution, and the correlation it reached."""
    import cv2

    def magnitude(a: np.ndarray) -> np.ndarray:
        a = cv2.GaussianBlur(cv2.resize(a, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA), (0, 0), 1.5)
        g = np.hypot(cv2.Sobel(a, cv2.CV_32F, 1, 0), cv2.Sobel(a, cv2.CV_32F, 0, 1))
        return (g - g.mean()) / (g.std() + 1e-6)

    warp = np.eye(2, 3, dtype=np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 100, 1e-5)
    try:
        correlation, warp = cv2.findTransformECC(magnitude(fixed), magnitude(moving), warp, cv2.MOTION_AFFINE,
                                                 criteria, None, 5)
    except cv2.error:
        return np.eye(2, 3), float("nan")
    warp = warp.astype(np.float64)
    warp[:, 2] *= 2.0  # half-resolution pixels -> pixels (the linear part is scale-free)
    return warp, float(correlation)


def _vis_nir(folder: Path, subsets: Sequence[str] | None) -> list[AlignedPair]:
    import cv2

    pairs = []
    for scene_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if subsets is not None and scene_dir.name not in subsets:
            continue
        for nir_path in sorted(scene_dir.glob("*_nir.jpg")):
            stem = nir_path.name[: -len("_nir.jpg")]
            rgb_path = scene_dir / f"{stem}_rgb.jpg"
            if not rgb_path.is_file():
                continue
            nir, rgb = _grey(nir_path), _grey(rgb_path)
            npy = scene_dir / f"{stem}_nir.npy"
            if npy.is_file():  # ground truth: M maps RGB pixels to NIR pixels
                rgb_to_nir = np.asarray(np.load(npy), dtype=np.float64)
                flags = cv2.INTER_LINEAR
                warp = rgb_to_nir
            else:  # country: measure the residual misalignment, keep the pair only if the fit is good
                warp, correlation = _ecc_affine(nir, rgb)
                if not correlation >= COUNTRY_MIN_CORRELATION:
                    continue
                flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
            size = (nir.shape[1], nir.shape[0])
            moved = cv2.warpAffine(rgb, warp, size, flags=flags, borderValue=0)
            inside = cv2.warpAffine(np.ones_like(rgb), warp, size, flags=flags, borderValue=0) > 0.999
            valid = torch.from_numpy(inside)[None]
            pairs.append(AlignedPair(name=f"{scene_dir.name}/{stem}", group=f"{scene_dir.name}/{stem}",
                                     fixed=_normalise(nir), moving=_normalise(moved, inside), valid=valid,
                                     misalignment=VIS_NIR_MISALIGNMENT))
    return pairs


def _t1_pd_3d(folder: Path, stride: int) -> list[AlignedPair]:
    from alignkit.data.datasets import load_dataset
    from alignkit.registration import resample_image
    from alignkit.transforms import MatrixTransform

    case = load_dataset(folder, layout="multimodal/t1-pd-3d")["t1<-pd"]
    t1, pd = case.fixed, case.moving
    to_pd = MatrixTransform(case.matrix)
    on_t1 = resample_image(to_pd, t1.grid, pd).data[0].numpy()
    inside = resample_image(to_pd, t1.grid, pd.with_data(torch.ones_like(pd.data))).data[0].numpy() > 0.999
    # slice across the PD's thick axis: the T1 array axis closest to it in world space
    thick = int(torch.argmax(pd.grid.spacing))
    thick_world = pd.world_from_voxel[: pd.ndim, thick].double().numpy()
    t1_axes = t1.world_from_voxel[: t1.ndim, : t1.ndim].double().numpy()
    cosines = np.abs(thick_world @ t1_axes) / np.linalg.norm(t1_axes, axis=0)
    axis = int(np.argmax(cosines))
    t1_data = t1.data[0].numpy().astype(np.float32)
    head = t1_data > np.percentile(t1_data, 60)  # the scan's air is most of the volume
    lo_t1, hi_t1 = np.percentile(t1_data[head], PERCENTILES)
    lo_pd, hi_pd = np.percentile(on_t1[inside & head], PERCENTILES)
    pairs = []
    depth = t1_data.shape[axis]
    for k in range(int(depth * 0.2), int(depth * 0.8), stride):
        cut = [slice(None)] * 3
        cut[axis] = k
        t1_slice, pd_slice, covered, in_head = (a[tuple(cut)] for a in (t1_data, on_t1, inside, head))
        if in_head.mean() < 0.15 or (covered & in_head).sum() < 0.97 * in_head.sum():
            continue
        fixed = np.clip((t1_slice - lo_t1) / max(hi_t1 - lo_t1, 1e-6), 0, 1) * covered
        moving = np.clip((pd_slice - lo_pd) / max(hi_pd - lo_pd, 1e-6), 0, 1) * covered
        pairs.append(AlignedPair(f"t1-pd-3d/{'xyz'[axis]}{k:03d}", "t1-pd-3d",
                                 torch.from_numpy(fixed.astype(np.float32))[None],
                                 torch.from_numpy(moving.astype(np.float32))[None],
                                 torch.ones(1, *t1_slice.shape, dtype=torch.bool), pad_is_background=True,
                                 misalignment=1.3))  # the measured map's ~1.1 mm at 0.88 mm voxels
    return pairs


def aligned_pairs(
    source: str, *, root: str | Path | None = None, map_kind: MapKind = "edges", slice_stride: int = 8,
    subsets: Sequence[str] | None = None,
) -> list[AlignedPair]:
    """The aligned pairs of one of :data:`SOURCES` (module docstring); ``subsets`` picks ``vis-nir``
    scene folders (default all), ``slice_stride`` the spacing of the OASIS slices."""
    folder = dataset_folder(source, root)
    key = source.replace("\\", "/").strip("/")
    if key.endswith("brain3d-oasis-trt20"):
        return _oasis(folder, map_kind, slice_stride)
    if key.endswith("vis-nir"):
        return _vis_nir(folder, subsets)
    if key.endswith("itk-t1-pd-slices"):
        t1 = _grey(folder / "BrainT1SliceBorder20.png")
        pd = _grey(folder / "BrainProtonDensitySliceBorder20.png")
        return [AlignedPair("t1<-pd", "itk-t1-pd", _normalise(t1), _normalise(pd),
                            torch.ones(1, *t1.shape, dtype=torch.bool), pad_is_background=True, misalignment=0.5)]
    if key.endswith("ct-mr-2d"):
        mr = _grey(folder / "mri_2d.tif")
        ct = _grey(folder / "ct_2d_true.tif")
        h, w = min(mr.shape[0], ct.shape[0]), min(mr.shape[1], ct.shape[1])
        return [AlignedPair("mri<-ct_true", "ct-mr", _normalise(mr[:h, :w]), _normalise(ct[:h, :w]),
                            torch.ones(1, h, w, dtype=torch.bool), pad_is_background=True, misalignment=2.0)]
    if key.endswith("t1-pd-3d"):
        return _t1_pd_3d(folder, max(slice_stride, 1))
    raise ConfigError(f"c2f trains on aligned pairs of {', '.join(SOURCES)} (comma-separated); got {source!r}")


def pair_matches(pair: AlignedPair, patterns: Sequence[str]) -> bool:
    """Whether a pair's group or name matches one of the shell-style ``patterns``."""
    return any(fnmatch.fnmatchcase(pair.group, p) or fnmatch.fnmatchcase(pair.name, p) for p in patterns)


def split_pairs(
    pairs: Sequence[AlignedPair], *, train: Sequence[str] | None, val: Sequence[str] | None, val_fraction: float,
    seed: int,
) -> tuple[list[AlignedPair], list[AlignedPair]]:
    """(training, held-out) pairs. Patterns match a pair's group or name (shell style); without
    ``val`` patterns a seeded ``val_fraction`` of the groups is held out (never a group on both sides)."""
    groups = sorted({p.group for p in pairs})
    if val:
        held = {g for g in groups if any(pair_matches(p, val) for p in pairs if p.group == g)}
    else:
        order = np.random.default_rng(seed).permutation(len(groups))
        count = round(val_fraction * len(groups)) if len(groups) > 1 else 0
        held = {groups[i] for i in order[:count]}
    training = [p for p in pairs if p.group not in held and (not train or pair_matches(p, train))]
    held_out = [p for p in pairs if p.group in held]
    if not training:
        raise ConfigError(f"no aligned pair left to train on (groups: {', '.join(groups)})")
    return training, held_out


def synthetic_contrast(labels: Tensor, intensity: Tensor, rng: np.random.Generator) -> Tensor:
    """A new random "modality" of a labelled scene (module docstring), ``(1, H, W)`` in [0, 1].

    Each label gets a uniform random mean; unlabelled pixels are split by ``intensity`` (the scene's
    image in [0, 1]) into background (under 0.02) and three intensity tertiles, each its own class, so
    tissue without a label keeps its structure. Then, each drawn per call: up to half of the image
    replaced by a random non-monotonic remap of ``intensity`` (:func:`~alignkit.data.synthetic.random_intensity_map`:
    texture inside the labels), a smooth multiplicative bias field (up to ±35 %), a gamma (log-normal, σ 0.3),
    a Gaussian blur (σ up to 1.2 px), additive noise (σ up to 0.04), and the percentile scaling of
    real images. The background is black 3 times in 4, as in most scans."""
    from alignkit.data.synthetic import random_intensity_map
    from alignkit.spatial import gaussian_blur

    value = intensity.float().clamp(0, 1)
    ids, classes = torch.unique(labels.long(), return_inverse=True)
    unlabelled = labels == 0
    foreground = unlabelled & (value >= 0.02)
    if bool(foreground.any()):
        edges = torch.quantile(value[foreground][::7], torch.tensor([1 / 3, 2 / 3]))  # a sample is enough
        tertile = torch.bucketize(value.contiguous(), edges)  # 0, 1, 2
    else:
        tertile = torch.zeros_like(classes)
    # classes: 0 background, 1-3 unlabelled tertiles, 4+ the labels (the id 0, if present, unused)
    classes = torch.where(unlabelled, torch.where(foreground, 1 + tertile, torch.zeros_like(classes)), 4 + classes)
    means = torch.from_numpy(rng.uniform(0.0, 1.0, 4 + len(ids)).astype(np.float32))
    if rng.random() < 0.75:
        means[0] = 0.0
    out = means[classes]
    texture = float(rng.uniform(0.0, 0.5))
    table = random_intensity_map(rng)
    remapped = np.interp(value.numpy(), np.linspace(0.0, 1.0, len(table)), table).astype(np.float32)
    out = (1 - texture) * out + texture * torch.from_numpy(remapped) * (classes > 0)
    h, w = out.shape[-2:]
    coarse = torch.from_numpy(rng.standard_normal((1, 1, 4, 4)).astype(np.float32))
    bias = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0]
    out = out * torch.exp(float(rng.uniform(0.0, 0.3)) * bias.clamp(-2, 2) / 2)
    out = out.clamp(0, None) ** float(np.exp(rng.normal(0.0, 0.3)))
    sigma = float(rng.uniform(0.0, 1.2))
    if sigma > 0.1:
        out = gaussian_blur(out[None], sigma)[0]
    out = out + float(rng.uniform(0.0, 0.04)) * torch.from_numpy(rng.standard_normal(out.shape).astype(np.float32))
    lo, hi = torch.quantile(out[..., ::3, ::3].flatten(), torch.tensor(PERCENTILES) / 100)
    return ((out - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


def segment_labels(image: Tensor, rng: np.random.Generator) -> Tensor:
    """A label map for an image that has none, the source of :func:`synthetic_contrast` for natural scenes:
    ``image`` ``(1, H, W)`` blurred (σ 0.5-2 px) and cut at 2-7 random intensity quantiles into 3-8 classes;
    half the time each class's connected regions are numbered apart (so one material may change contrast
    from region to region, as vegetation or water does between visible and near-infrared), else each class
    is one label. ``(1, H, W)`` int64, every pixel labelled (1, 2, ...)."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(image[0].float().numpy(), float(rng.uniform(0.5, 2.0)))
    count = int(rng.integers(3, 9))
    thresholds = np.sort(np.quantile(smooth, rng.uniform(0.05, 0.95, count - 1)))
    classes = np.digitize(smooth, thresholds)  # 0 .. count - 1
    if rng.random() < 0.5:
        labels = classes + 1
    else:
        labels = np.zeros(classes.shape, dtype=np.int64)
        offset = 0
        for c in range(count):
            regions, found = ndimage.label(classes == c)
            labels = np.where(regions > 0, regions + offset, labels)
            offset += found
    return torch.from_numpy(labels.astype(np.int64))[None]


def minor_class_fraction(patch: Tensor) -> float:
    """The share of the smaller class when ``patch`` is split at its mean (0 for a flat patch)."""
    above = float((patch > patch.mean()).float().mean())
    return min(above, 1.0 - above)


#: ``epoch -> (block factor, warm-up?)``: which block's task an epoch's patches pose
ScaleOfEpoch = Callable[[int], tuple[int, bool]]


class ScalePatchPairs(torch.utils.data.Dataset):
    """Training pairs for one block of the chain at a time (module docstring). Item ``i`` of epoch
    ``e`` is a pure function of ``(seed, e, i)`` (held-out sets: of ``(seed, i)`` and the block);
    ``scale_of_epoch`` says which block's task (shrink factor) an epoch poses and whether it is a
    warm-up epoch (patches from 4 images only, to overfit them first: §A.4.1).

    Items: ``fixed``, ``moving`` ``(1, size, size)``, ``flow`` ``(2, size, size)`` (pixels of the
    block's scale, array-axis order) and ``weight`` ``(1, size, size)`` (``edge_weight`` where the map
    has an edge, else 1). Patches whose minor class is below ``min_minor_class`` are redrawn (up to 20
    times), as are patches reaching outside an image's data. ``mono_fraction`` of the training
    patches (never the held-out ones) pair the fixed modality with itself: c2f serves one-modality
    pairs too, and plain shifts are the easier half of the task to learn first. ``synth_fraction``
    of the other training patches whose pair has labels get :func:`synthetic_contrast` images: the
    moving one always, the fixed one half the time. A block at shrink factor ``f`` draws only from
    pairs whose :attr:`AlignedPair.misalignment` shrinks to at most ``max_misalignment`` of its task
    (``misalignment / f <= max_misalignment * max_displacement``): a VIS-NIR pair known to 1.5 px teaches
    the scale-4 block (0.4 px there) but would teach the scale-1 block noise as large as its task
    (training sets only). With ``misaligned_as_mono`` such a pair still teaches that block, but only as a
    one-modality pair (its fixed image against itself, exactly aligned): the block sees its kind of image.
    ``segment_synth`` does better for pairs without labels (natural scenes): that share of their patches,
    and every patch of a pair too rough for the block's scale, pairs one of the two images (either alone is
    exact) with a :func:`synthetic_contrast` of its own :func:`segment_labels` (half the time both sides
    synthetic): exactly aligned multimodal patches of the kind of scene the pair shows."""

    ndim = 2

    def __init__(
        self,
        pairs: Sequence[AlignedPair],
        *,
        size: int = 64,
        length: int = 1000,
        scale_of_epoch: ScaleOfEpoch = lambda epoch: (1, False),
        max_displacement: float = 2.0,
        min_minor_class: float = 0.05,
        edge_weight: float = 1.0,
        mono_fraction: float = 0.0,
        synth_fraction: float = 0.0,
        max_misalignment: float = 0.25,
        misaligned_as_mono: bool = False,
        segment_synth: float = 0.0,
        seed: int = 0,
        held_out: bool = False,
        clock: list[int] | None = None,
    ) -> None:
        if not pairs:
            raise ConfigError("ScalePatchPairs needs at least one aligned pair")
        if size < 16:
            raise ConfigError(f"patch size must be >= 16 pixels, got {size}")
        self.pairs = list(pairs)
        self.size = (int(size), int(size))
        self.length = int(length)
        self.scale_of_epoch = scale_of_epoch
        self.max_displacement = float(max_displacement)
        self.min_minor_class = float(min_minor_class)
        self.edge_weight = float(edge_weight)
        if not 0.0 <= mono_fraction <= 1.0:
            raise ConfigError(f"mono_fraction must be in [0, 1], got {mono_fraction}")
        self.mono_fraction = float(mono_fraction)
        if not 0.0 <= synth_fraction <= 1.0:
            raise ConfigError(f"synth_fraction must be in [0, 1], got {synth_fraction}")
        self.synth_fraction = float(synth_fraction)
        self.max_misalignment = float(max_misalignment)
        self.misaligned_as_mono = bool(misaligned_as_mono)
        if not 0.0 <= segment_synth <= 1.0:
            raise ConfigError(f"segment_synth must be in [0, 1], got {segment_synth}")
        self.segment_synth = float(segment_synth)
        self._pools: dict[int, list[AlignedPair]] = {}
        self.seed = int(seed)
        self.held_out = held_out
        # one epoch counter shared by a training set and its held-out set: the loop tells the
        # training set the epoch; validation must pose the same block's task
        self.clock = clock if clock is not None else [1]
        self.margin = math.ceil(self.max_displacement) + 1

    def set_epoch(self, epoch: int) -> None:
        self.clock[0] = int(epoch)

    def __len__(self) -> int:
        return self.length

    def pool(self, factor: int) -> list[AlignedPair]:
        """The pairs aligned well enough to teach the block at ``factor`` (class docstring)."""
        if factor not in self._pools:
            bound = self.max_misalignment * self.max_displacement * factor
            # held-out sets measure on every pair they were given (their scores are only logged)
            self._pools[factor] = [p for p in self.pairs
                                   if self.held_out or self.misaligned_as_mono or self.segment_synth > 0
                                   or p.misalignment <= bound]
            if not self._pools[factor]:
                worst = min(p.misalignment for p in self.pairs)
                raise ConfigError(f"no aligned pair is aligned well enough for the block at scale {factor}: the best "
                                  f"is known to {worst} px, the block needs {bound:g} (max_misalignment)")
        return self._pools[factor]

    def _region(self, factor: int) -> int:
        """Full-resolution side of the region that shrinks to ``size + 2 margin`` pixels at ``factor``."""
        return (self.size[0] + 2 * self.margin - 1) * factor + 1

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        epoch = max(self.clock[0], 1)
        factor, warmup = self.scale_of_epoch(epoch)
        key = [self.seed, factor, index] if self.held_out else [self.seed, epoch, index]
        rng = np.random.default_rng(key)
        pool = self.pool(factor)
        if warmup and not self.held_out:
            pool = [pool[i] for i in np.random.default_rng([self.seed, factor]).permutation(len(pool))[:4]]
        region = self._region(factor)
        crop = None
        for _ in range(20):
            pair = pool[int(rng.integers(len(pool)))]
            crop = self._crop(pair, region, rng)
            if crop is None:
                continue
            if minor_class_fraction(crop[1]) >= self.min_minor_class:
                break
        if crop is None:
            raise ConfigError(f"no aligned pair holds a {region}-pixel region of data for the block at scale {factor}")
        fixed, moving, binary, labels = crop
        rough = not self.held_out and pair.misalignment > self.max_misalignment * self.max_displacement * factor
        if rough and self.segment_synth > 0:
            # too rough for this scale as a pair: either image alone against a new contrast of itself
            fixed, moving, binary = self._segment_synthetic(fixed if rng.random() < 0.5 else moving, rng)
        elif rough:
            moving, binary = fixed, False  # too rough for this scale as a pair (misaligned_as_mono): itself only
        elif self.mono_fraction > 0 and not self.held_out and rng.random() < self.mono_fraction:
            moving, binary = fixed, False  # a one-modality pair: the block sees plain shifts too
        elif (self.synth_fraction > 0 and not self.held_out and labels is not None
              and rng.random() < self.synth_fraction):
            intensity = fixed
            moving, binary = synthetic_contrast(labels, intensity, rng), False
            if rng.random() < 0.5:
                fixed = synthetic_contrast(labels, intensity, rng)
        elif (self.segment_synth > 0 and not self.held_out and labels is None and not binary
              and rng.random() < self.segment_synth):
            fixed, moving, binary = self._segment_synthetic(fixed, rng)
        return self._deform(fixed, moving, binary, factor, rng)

    @staticmethod
    def _segment_synthetic(image: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor, bool]:
        """(fixed, moving, binary) of an exactly aligned pair made from one image (class docstring)."""
        labels = segment_labels(image, rng)
        moving = synthetic_contrast(labels, image, rng)
        fixed = synthetic_contrast(labels, image, rng) if rng.random() < 0.5 else image
        return fixed, moving, False

    def _crop(self, pair: AlignedPair, region: int,
              rng: np.random.Generator) -> tuple[Tensor, Tensor, bool, Tensor | None] | None:
        h, w = pair.shape
        if pair.pad_is_background:  # the region may reach past the image into its zero background
            top = int(rng.integers(-region // 4, max(h - 3 * region // 4, -region // 4 + 1)))
            left = int(rng.integers(-region // 4, max(w - 3 * region // 4, -region // 4 + 1)))
        else:
            if h < region or w < region:
                return None
            top, left = int(rng.integers(0, h - region + 1)), int(rng.integers(0, w - region + 1))
            if not bool(pair.valid[:, top : top + region, left : left + region].all()):
                return None

        def cut(image: Tensor) -> Tensor:
            out = image.new_zeros(1, region, region)
            t0, l0 = max(top, 0), max(left, 0)
            t1, l1 = min(top + region, h), min(left + region, w)
            if t1 > t0 and l1 > l0:
                out[:, t0 - top : t1 - top, l0 - left : l1 - left] = image[:, t0:t1, l0:l1]
            return out

        labels = cut(pair.labels) if pair.labels is not None else None
        return cut(pair.fixed), cut(pair.moving), pair.binary_moving, labels

    def _deform(self, fixed: Tensor, moving: Tensor, binary: bool, factor: int, rng: np.random.Generator) -> dict[str, Tensor]:
        region = fixed.shape[-1]
        grid = Grid.from_spacing((region, region))
        both = torch.stack([fixed, moving])  # (2, 1, L, L)
        small, _ = downsample(both, grid, factor)  # the chain's own shrink (blur + corner-aligned resize)
        fixed_pad, moving_pad = small[:1], small[1:]
        m, size = self.margin, self.size
        flow = random_mixture_field(size, seed=rng, max_displacement=self.max_displacement)
        points = Grid.from_spacing(size).voxel_points() + m + flow
        out = {
            "fixed": sample_voxels(fixed_pad, points, padding="border")[0],
            "moving": moving_pad[0, :, m : m + size[0], m : m + size[1]].contiguous(),
            "flow": flow[0],
        }
        weight = torch.ones(1, *size)
        if binary and self.edge_weight != 1.0:
            edges = moving_pad > 0.5
            boundary = torch.zeros_like(edges)
            boundary[..., :-1, :] |= edges[..., :-1, :] != edges[..., 1:, :]
            boundary[..., :, :-1] |= edges[..., :, :-1] != edges[..., :, 1:]
            # the map's edges where each fixed pixel truly corresponds (x + flow(x))
            on_edge = sample_voxels(boundary.float(), points, padding="zeros")[0] > 0.25
            weight = torch.where(on_edge, torch.full_like(weight, self.edge_weight), weight)
        out["weight"] = weight
        return out
