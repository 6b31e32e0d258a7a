"""Subjects: images (and label maps) of a data set brought onto the network grid, once.

Convention
----------
Every image is brought once onto its **network grid**: its own grid resized to ``size`` (corner
voxels kept, :meth:`~alignkit.spatial.Grid.resized`), Gaussian-smoothed first when it shrinks,
colour averaged to grey and intensities mapped to [0, 1] by robust percentiles
(:func:`~alignkit.solve.normalize_intensity`). :func:`to_network_grid` does this, and inference
(:meth:`alignkit.methods.LearnedModel.predict`) calls the same function, so a trained
network sees the same kind of input at test time.

Images are assumed to be aligned in world space -- data sets that are (``brain3d-aseg-pair``, the
2D slices), or made so by ``prealign="affine"``: the classical engine's affine to a reference subject,
run once per subject and cached (``brain3d-oasis-trt20`` is in native space and needs it).
Inference composes the same way: affine first, then the network.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from alignkit.errors import ConfigError, InputError, ShapeError
from alignkit.image import Image
from alignkit.solve import RegistrationConfig
from alignkit.solve.engine import normalize_intensity
from alignkit.spatial import (
    Grid,
    apply_matrix,
    gaussian_blur,
    points_to_tensor,
    resize_image,
    sample_world,
    tensor_to_points,
    voxel_to_world_vectors,
)

PrealignName = Literal["affine", "rigid"]

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy", ".npz")
_LABEL_MARKERS = ("_seg", "_labels", "_label", "lm")


# -- sizes and grids -----------------------------------------------------------------------------
#: the intensity percentiles mapped to 0 and 1 on the network grid, unless a method asks otherwise
DEFAULT_PERCENTILES: tuple[float, float] = (0.5, 99.5)


def parse_size(value: int | str | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    """``64`` / ``"64"`` / ``"64,80"`` / ``(64, 80)`` → one size per axis (one value is shared)."""
    if value is None:
        raise ConfigError("a training size is needed (e.g. --size 64)")
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").split(",") if p.strip()]
        try:
            sizes = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"size must be integers like 64 or 64,80, got {value!r}") from None
    elif isinstance(value, int):
        sizes = [value]
    else:
        sizes = [int(v) for v in value]
    if len(sizes) == 1:
        sizes = sizes * ndim
    if len(sizes) != ndim:
        raise ConfigError(f"size {tuple(sizes)} has {len(sizes)} values for {ndim}D images")
    if min(sizes) < 8:
        raise ConfigError(f"every size must be >= 8 voxels, got {tuple(sizes)}")
    return tuple(sizes)


def to_network_grid(
    tensor: Tensor, grid: Grid, size: Sequence[int], *, labels: bool = False,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> tuple[Tensor, Grid]:
    """``tensor (B, C, *grid.shape)`` on ``grid.resized(size)`` (the same field of view).

    Images are smoothed before shrinking (sigma ``0.5 x`` the shrink factor per axis, as the
    pyramids do, against aliasing), averaged to one channel and normalised so that the intensity
    ``percentiles`` (low, high) map to 0 and 1 (a method may ask for its paper's, e.g. AVSM's 0.1 and
    99.9); label maps are read nearest-neighbour and stay integers.
    """
    size = tuple(int(s) for s in size)
    if len(size) != grid.ndim:
        raise ShapeError(f"size {size} does not fit a {grid.ndim}D grid")
    net_grid = grid.resized(size)
    if labels:
        out = resize_image(tensor.float(), size, mode="nearest").round().long()
        return out, net_grid
    x = tensor.float()
    if x.shape[1] > 1:
        x = x.mean(1, keepdim=True)
    factors = [(n - 1) / max(s - 1, 1) for n, s in zip(grid.shape, size)]
    sigmas = [0.5 * f if f > 1.0 + 1e-6 else 0.0 for f in factors]
    if any(s > 0 for s in sigmas):
        x = gaussian_blur(x, sigmas)
    x = resize_image(x, size)
    low, high = (float(v) for v in percentiles)
    return normalize_intensity(x, low, high), net_grid


# -- subjects ------------------------------------------------------------------------------------
@dataclass(eq=False)
class Subject:
    """One image on its network grid: ``image (1, *size)`` in [0, 1], ``labels (1, *size)`` int64 or
    None, ``points (N, ndim)`` landmarks in world coordinates (LPS, the frame of ``grid`` after any
    pre-alignment), float32, or None."""

    name: str
    image: Tensor
    grid: Grid
    labels: Tensor | None = None
    points: Tensor | None = None

    @property
    def ndim(self) -> int:
        return self.grid.ndim


def prepare_subject(
    image: Image, size: Sequence[int], *, labels: Image | None = None, points: Tensor | None = None,
    name: str | None = None, percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> Subject:
    """:func:`to_network_grid` applied to an image (and its label map, resampled nearest-neighbour onto
    the image's grid through the world when it lives on another one); ``points`` (N, ndim) world
    landmarks are kept as they are (the network grid spans the same world)."""
    data, grid = to_network_grid(image.batch(), image.grid, size, percentiles=percentiles)
    lab = None
    if labels is not None:
        label_data = labels.batch(dtype=None)
        if not labels.grid.same_as(image.grid, atol=1e-3):
            # e.g. an ITK-written NIfTI beside a PNG: same world, other voxel order -- go through the world
            world = image.grid.world_points()
            label_data = sample_world(label_data.float(), labels.grid, world, mode="nearest").round().long()
        lab = to_network_grid(label_data, image.grid, size, labels=True)[0][0]
    pts = None
    if points is not None:
        pts = torch.as_tensor(points, dtype=torch.float32)
        if pts.dim() != 2 or pts.shape[1] != image.ndim or pts.shape[0] == 0:
            raise ShapeError(f"landmarks of {name or image.name} must be (N, {image.ndim}), got {tuple(pts.shape)}")
    return Subject(name or image.name, data[0], grid, lab, pts)


def select_names(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The ``names`` (in their order) that match any of the shell-style ``patterns``
    (:func:`fnmatch.fnmatchcase`: ``*``, ``?``, ``[...]``); a pattern that matches nothing is an error
    naming what there is, so a typo never silently trains on the wrong subjects."""
    patterns = [str(p) for p in patterns]
    if not patterns:
        raise ConfigError("an empty list of subject patterns selects nothing")
    unmatched = [p for p in patterns if not any(fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ConfigError(f"subject pattern(s) {', '.join(unmatched)} match none of: {', '.join(names)}")
    return [n for n in names if any(fnmatchcase(n, p) for p in patterns)]


def label_ids_of(subjects: Sequence[Subject]) -> list[int]:
    """Sorted non-zero label values found in any subject (the one-hot channels of a Dice loss)."""
    values: set[int] = set()
    for s in subjects:
        if s.labels is not None:
            values |= {int(v) for v in torch.unique(s.labels).tolist()}
    return sorted(values - {0})


def _is_label_file(path: Path) -> bool:
    stem = path.name.lower()
    for suffix in _IMAGE_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return any(stem.endswith(m) for m in _LABEL_MARKERS) or stem in ("labels", "label")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def folder_images(directory: str | os.PathLike) -> list[tuple[str, Image, Image | None]]:
    """Every image file directly in ``directory`` (sorted by name), with the label map named
    ``<stem>_seg`` / ``<stem>_labels`` / ``<stem>LM`` next to it when there is one (or the ``seg``
    array of an ``.npz`` that holds ``vol`` and ``seg``).

    The plain-folder layout of ``alignkit train --dataset DIR`` when ``DIR`` is not a data set
    that :func:`alignkit.data.datasets.load_dataset` knows.
    """
    from alignkit.io import read_image

    root = Path(directory)
    if not root.is_dir():
        raise InputError("not a folder of images", str(root))
    files = sorted(p for p in root.iterdir() if p.is_file() and p.name.lower().endswith(_IMAGE_SUFFIXES))
    by_stem = {_stem(p).lower(): p for p in files}
    out: list[tuple[str, Image, Image | None]] = []
    for path in files:
        if _is_label_file(path):
            continue
        stem = _stem(path).lower()
        label_path = next((by_stem[stem + m] for m in _LABEL_MARKERS if stem + m in by_stem), None)
        image = read_image(path)
        labels = read_image(label_path, labels=True) if label_path is not None else None
        if labels is None and path.name.lower().endswith(".npz"):
            # learn2reg/voxelmorph archives keep the segmentation beside the volume ("vol" + "seg")
            with np.load(path, allow_pickle=False) as npz:
                has_seg = "seg" in npz.files and image.meta.get("npz_key") != "seg"
            labels = read_image(path, labels=True, key="seg") if has_seg else None
        out.append((_stem(path), image, labels))
    if not out:
        raise InputError("no images found (expected .nii.gz, .png, .npz, ... files)", str(root))
    return out


#: a landmark file beside a folder image ``<stem>.<ext>``: ``<stem><marker>.csv`` (world LPS, x, y[, z])
_LANDMARK_MARKERS = ("_landmarks", "_points")


def folder_landmarks(directory: str | os.PathLike, names: Sequence[str], ndim: int) -> dict[str, Tensor]:
    """The landmark CSVs ``<name>_landmarks.csv`` / ``<name>_points.csv`` of ``directory`` for the
    image ``names`` that have one: ``{name: (N, ndim) world points}`` (:func:`alignkit.io.read_points`)."""
    from alignkit.io.points import read_points

    root = Path(directory)
    out: dict[str, Tensor] = {}
    for name in names:
        path = next((root / f"{name}{m}.csv" for m in _LANDMARK_MARKERS if (root / f"{name}{m}.csv").is_file()), None)
        if path is not None:
            out[name] = read_points(path, ndim).float()
    return out


def _folder_data(directory: str | os.PathLike) -> RawData:
    images = folder_images(directory)
    points = folder_landmarks(directory, [name for name, _, _ in images], images[0][1].ndim)
    return RawData(images, points=points)


@dataclass
class RawData:
    """Images (with label maps) of a data set before they go onto network grids."""

    images: list[tuple[str, Image, Image | None]]
    #: the labels the data set scores (``Case.label_ids`` common to its cases); None: every label found
    label_ids: list[int] | None = None
    #: (fixed, moving) indices into ``images`` of the data set's own cases, for case-based data sets
    case_pairs: list[tuple[int, int]] | None = None
    #: world landmarks ``(N, ndim)`` of the images that have some, by image name
    points: dict[str, Tensor] = field(default_factory=dict)
    #: per case pair, its ground truth (:func:`case_truth`), for case-based data sets
    case_truth: list[dict[str, Any]] | None = None


def _subject_ids(names: Sequence[str]) -> list[tuple[str, str]] | None:
    """``"B<-A"`` case names as (fixed id, moving id), or None when the data set is not subject-based."""
    out = []
    for name in names:
        if name.count("<-") != 1:
            return None
        fixed, moving = name.split("<-")
        out.append((fixed, moving))
    return out


def dataset_data(source: str | os.PathLike, *, layout: str | None = None) -> RawData:
    """The images of a data set: a name or folder :func:`alignkit.data.datasets.load_dataset` knows,
    or a plain folder of images (:func:`folder_images`; also forced with ``layout="folder"``).

    Subject-based data sets (cases named ``"B<-A"``, e.g. OASIS's 132 ordered pairs of 12 subjects)
    load only as many cases as cover every subject once and name each image by its subject id
    (``"subject01"``); case-based ones (flow, multimodal pairs) keep their own pairs in
    :attr:`RawData.case_pairs`. Images of a plain folder are named by their file stem (``"r16slice"``).
    """
    if layout == "folder":
        from alignkit.data.datasets import dataset_folder

        return _folder_data(dataset_folder(source))
    from alignkit.data.datasets import load_dataset

    dataset = None
    try:
        dataset = load_dataset(str(source), layout=layout)
    except (InputError, ConfigError):
        if not Path(source).is_dir() or layout is not None:
            raise
    if dataset is None:
        if not Path(source).is_dir():
            raise InputError("no such data set or folder", str(source))
        return _folder_data(source)
    names = list(getattr(dataset, "names", [])) or [dataset[k].name for k in range(len(dataset))]
    ids = _subject_ids(names)
    if ids is not None:  # read the fewest cases that show every subject
        wanted, chosen = {i for pair in ids for i in pair}, []
        for index, pair in enumerate(ids):
            if wanted & set(pair):
                chosen.append(index)
                wanted -= set(pair)
    else:
        chosen = list(range(len(dataset)))
    images: list[tuple[str, Image, Image | None]] = []
    keys: dict[str, int] = {}
    case_pairs: list[tuple[int, int]] = []
    truths: list[dict[str, Any]] = []
    common: set[int] | None = None
    for index in chosen:
        case = dataset[index]
        truths.append(case_truth(case))
        slots = []
        sides = (("fixed", case.fixed, case.fixed_labels), ("moving", case.moving, case.moving_labels))
        for k, (side, image, labels) in enumerate(sides):
            key = image.path or f"{case.name}:{side}"
            if key not in keys:
                keys[key] = len(images)
                # subjects are named by their id ("subject01"; OASIS files all share one file name)
                name = ids[index][k] if ids is not None else Path(image.path).name if image.path else key
                images.append((name, image, labels))
            slots.append(keys[key])
        case_pairs.append((slots[0], slots[1]))
        if case.label_ids is not None:
            common = set(case.label_ids) if common is None else common & set(case.label_ids)
    label_ids = sorted(common) if common is not None else None
    if ids is not None:
        return RawData(images, label_ids)
    return RawData(images, label_ids, case_pairs, case_truth=truths)


def case_truth(case: Any) -> dict[str, Any]:
    """A case's ground truth as training needs it, in world units: ``matrix`` (fixed world → moving
    world, float64) and/or ``displacement`` (world vectors ``(1, ndim, *S)`` on ``grid``, the fixed
    grid: :func:`~alignkit.spatial.voxel_to_world_vectors` of ``Case.flow``, a flow as
    :mod:`alignkit.spatial` defines it) with ``valid`` (``(1, 1, *S)``, where the flow is known)."""
    truth: dict[str, Any] = {}
    if case.matrix is not None:
        truth["matrix"] = torch.as_tensor(case.matrix, dtype=torch.float64)
    if case.flow is not None:
        grid = case.fixed.grid
        flow = torch.as_tensor(case.flow, dtype=torch.float64)[None]
        valid = torch.isfinite(flow).all(1, keepdim=True) & (flow.abs() < 1e6).all(1, keepdim=True)
        if case.valid is not None:
            valid &= torch.as_tensor(case.valid, dtype=torch.bool)[None, None]
        truth["displacement"] = voxel_to_world_vectors(torch.where(valid, flow, torch.zeros_like(flow)), grid)
        truth["valid"] = valid
        truth["grid"] = grid
    return truth


def truth_on_network_grid(truth: dict[str, Any], grid: Grid) -> dict[str, Tensor]:
    """:func:`case_truth` in the units of training pairs on the fixed network grid ``grid``:
    ``matrix`` maps fixed network voxels to moving network voxels (the moving image is resampled on
    the fixed network grid through the world identity), ``flow`` is the displacement in those voxels,
    array-axis order, with ``flow_mask`` (1 where the truth is known)."""
    out: dict[str, Tensor] = {}
    if "matrix" in truth:
        matrix = grid.voxel_from_world.double() @ truth["matrix"] @ grid.world_from_voxel.double()
        out["matrix"] = matrix.float()
    if "displacement" in truth:
        world = grid.world_points(dtype=torch.float64)
        full: Grid = truth["grid"]
        displacement = sample_world(truth["displacement"], full, world, padding="border")
        valid = sample_world(truth["valid"].double(), full, world, mode="nearest", padding="zeros")
        voxels = apply_matrix(grid.voxel_from_world.double(), world + displacement)
        out["flow"] = (voxels - grid.voxel_points(dtype=torch.float64))[0].float()
        out["flow_mask"] = (valid[0] > 0.5).float()
    return out


def _prealign_key(reference: Image, image: Image, mode: str) -> str:
    parts = [mode]
    for item in (reference, image):
        if item.path and Path(item.path).is_file():
            stat = Path(item.path).stat()
            parts += [os.path.abspath(item.path), str(stat.st_size), str(int(stat.st_mtime))]
        else:  # arrays: hash the content
            parts.append(hashlib.sha1(item.data.float().numpy().tobytes()).hexdigest())
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:20]


def prealign_config(ndim: int, mode: PrealignName, finest: float = 1.0) -> RegistrationConfig:
    """The learned methods' linear pre-alignment (:func:`alignkit.solve.presets.learned_prealign_config`), stopped at shrink factor
    ``finest``: pre-aligning for a network that sees the image ``finest`` times coarser gains
    nothing from finer levels, which cost the most (about 2 min per OASIS subject at 1/2
    resolution on two cores, seconds at 1/4)."""
    from alignkit.solve.presets import learned_prealign_config

    config = learned_prealign_config(ndim, mode)
    for stage in config.stages:
        keep = [k for k, level in enumerate(stage.levels) if level >= finest] or [0]
        stage.levels = tuple(stage.levels[k] for k in keep)
        stage.iterations = tuple(stage.iterations[k] for k in keep)
        if stage.smoothing is not None:
            stage.smoothing = tuple(stage.smoothing[k] for k in keep)
    return config


def prealign_matrix(
    reference: Image, image: Image, *, mode: PrealignName = "affine", cache_dir: str | os.PathLike | None = None,
    seed: int = 0, finest: float = 1.0,
) -> Tensor:
    """Moving-from-fixed world matrix (float64) aligning ``image`` to ``reference`` with the classical
    engine (:func:`prealign_config`), cached as JSON in ``cache_dir`` so each subject is registered
    once, not once per epoch or per run."""
    config = prealign_config(reference.ndim, mode, finest)
    levels = ",".join(f"{level:g}" for stage in config.stages for level in stage.levels)
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"{_prealign_key(reference, image, f'{mode}@{levels}')}.json"
        if cache.is_file():
            return torch.tensor(json.loads(cache.read_text())["matrix"], dtype=torch.float64)
    import alignkit

    result = alignkit.register(reference, image, config=config, seed=seed, quiet=True)
    matrix = result.transform.matrix().double().cpu()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        record = {"matrix": matrix.tolist(), "reference": reference.name, "image": image.name, "levels": levels}
        tmp.write_text(json.dumps(record))
        os.replace(tmp, cache)
    return matrix


def _resample_into(reference: Image, image: Image, matrix: Tensor, *, labels: bool) -> Image:
    """``image ∘ matrix`` on the reference grid (nearest for labels)."""
    world = apply_matrix(matrix, reference.grid.world_points(dtype=torch.float64)).float()
    data = image.batch(dtype=torch.float32)
    out = sample_world(data, image.grid, world, mode="nearest" if labels else "linear")
    if labels:
        out = out.round().long()
    return Image(out[0], reference.grid, path=image.path)


def _points_into(matrix: Tensor, points: Tensor) -> Tensor:
    """World landmarks of an image resampled into the reference space by :func:`_resample_into`
    (``image ∘ matrix``): ``matrix⁻¹ q``."""
    inverse = torch.linalg.inv(matrix.double())
    return tensor_to_points(apply_matrix(inverse, points_to_tensor(points.double()))).float()


@dataclass
class SubjectSet:
    """Subjects on their network grids, with the data set's scored labels and own pairs (if any)."""

    subjects: list[Subject]
    label_ids: list[int] | None = None
    case_pairs: list[tuple[int, int]] | None = None
    #: per case pair, its ground truth on the fixed subject's network grid (:func:`truth_on_network_grid`)
    case_truth: list[dict[str, Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.subjects)


def load_subjects(
    source: str | os.PathLike | Sequence[Image | tuple[Image, Image | None] | tuple[Image, Image | None, Tensor | None]],
    size: int | str | Sequence[int],
    *,
    layout: str | None = None,
    prealign: PrealignName | None = None,
    reference: int | str = 0,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    include: Sequence[str] | None = None,
    held_out: Sequence[str] | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> SubjectSet:
    """Subjects on their network grids from a data set name/folder (:func:`dataset_data`) or images.

    ``include``: shell-style patterns (:func:`select_names`) of the subject names to keep, e.g.
    ``["r*slice"]`` for the brain slices of the ``brain2d`` folder without its atlas; default: all.
    ``prealign="affine"`` (or ``"rigid"``) first brings every image into the space of subject
    ``reference`` (an index among the kept ones, or a name) with the classical engine (once per
    subject, cached in ``cache_dir``): native-space data such as ``brain3d-oasis-trt20`` need it;
    data sets already aligned do not (``brain3d-aseg-pair``, the 2D slices). ``held_out``: patterns
    of validation subjects; the default reference is then the first subject *not* held out, so a
    validation image never defines the space the network trains in. ``percentiles``: the intensity
    normalisation of :func:`to_network_grid`.
    """
    if isinstance(source, (str, os.PathLike)):
        data = dataset_data(source, layout=layout)
    else:
        items = [tuple(item) + (None,) * (3 - len(item)) if isinstance(item, tuple) else (item, None, None) for item in source]
        names = [image.path or f"image{k}" for k, (image, _, _) in enumerate(items)]
        data = RawData(
            [(name, image, labels) for name, (image, labels, _) in zip(names, items)],
            points={name: torch.as_tensor(pts) for name, (_, _, pts) in zip(names, items) if pts is not None},
        )
    if include is not None:
        if data.case_pairs is not None:
            raise ConfigError("subject patterns apply to subject-based data sets, not to ones with own pairs")
        keep = set(select_names([name for name, _, _ in data.images], include))
        data.images = [item for item in data.images if item[0] in keep]
    raw = data.images
    if not raw:
        raise InputError("the data set holds no images", str(source))
    ndim = raw[0][1].ndim
    if any(image.ndim != ndim for _, image, _ in raw):
        raise InputError("the data set mixes 2D and 3D images", str(source))
    sizes = parse_size(size, ndim)
    ref_image, finest = None, 1.0
    if prealign is not None:
        if prealign not in get_args(PrealignName):
            raise ConfigError(f"prealign must be one of {', '.join(get_args(PrealignName))}, got {prealign!r}")
        if held_out is not None and reference == 0:
            held = set(select_names([name for name, _, _ in raw], held_out))
            reference = next((k for k, (name, _, _) in enumerate(raw) if name not in held), 0)
        if isinstance(reference, str):
            found = [k for k, (name, _, _) in enumerate(raw) if name == reference]
            if not found:
                raise ConfigError(f"reference subject {reference!r} is not among {', '.join(n for n, _, _ in raw)}")
            reference = found[0]
        if not 0 <= reference < len(raw):
            raise ConfigError(f"reference subject {reference} out of range (0..{len(raw) - 1})")
        ref_image = raw[reference][1].grey()
        # the network sees the reference this many times coarser (along its least-shrunk axis)
        finest = max(1.0, min((n - 1) / max(k - 1, 1) for n, k in zip(ref_image.shape, sizes)))
    subjects = []
    pending: list[tuple[str, Image, Image | None] | None] = list(raw)
    data.images = []  # only `pending` holds the full-resolution arrays now
    del raw
    for k in range(len(pending)):
        item = pending[k]
        assert item is not None
        # let go of each full-resolution image once its subject is made: a dozen 3D volumes with
        # their label maps weigh gigabytes
        pending[k] = None
        name, image, labels = item
        points = data.points.get(name)
        if ref_image is not None and prealign is not None and k != reference:
            matrix = prealign_matrix(
                ref_image, image.grey(), mode=prealign, cache_dir=cache_dir, seed=seed, finest=finest
            )
            image = _resample_into(ref_image, image, matrix, labels=False)
            labels = _resample_into(ref_image, labels, matrix, labels=True) if labels is not None else None
            if points is not None:  # the image now shows point q at the reference's world M^-1 q
                points = _points_into(matrix, points)
        subjects.append(prepare_subject(image, sizes, labels=labels, points=points, name=name, percentiles=percentiles))
    truth = None
    if data.case_pairs is not None and data.case_truth is not None and prealign is None:
        # (with a pre-alignment the moving images moved: their truth no longer holds as is)
        truth = [truth_on_network_grid(t, subjects[i].grid) for t, (i, _) in zip(data.case_truth, data.case_pairs)]
    return SubjectSet(subjects, data.label_ids, data.case_pairs, truth)
