"""Training pairs: torch ``Dataset`` s of (fixed, moving[, labels][, ground-truth flow]) tensors.

Pairs are made of :class:`~alignkit.train.subjects.Subject` s (images on their network grids, see
:mod:`alignkit.train.subjects`). A pair's moving image is sampled on the *fixed* network grid
through the world identity, as inference does.

Items are dicts of CPU tensors (what the default collate stacks):

* ``fixed``, ``moving``: ``(1, *size)`` float32;
* ``fixed_labels``, ``moving_labels``: ``(1, *size)`` int64, when any subject has labels (the others
  get empty maps);
* ``flow`` (synthetic pairs, and a data set's own cases with a true field): ``(ndim, *size)``
  float32, the true displacement in voxels of the network grid, **array-axis order**, fixed →
  moving: ``fixed(p) = moving(p + flow(p))`` -- alignkit's one meaning of "flow" (stated in
  :mod:`alignkit.spatial`), here on the network grid (a case's ``flow_mask`` ``(1, *size)`` says
  where it is known);
* ``matrix`` (synthetic affine pairs, and cases with a true matrix): ``(ndim+1, ndim+1)`` float32,
  fixed network voxels → moving network voxels (homogeneous; a homography's last row is not
  ``[0 ... 0 1]``), the linear counterpart of ``flow``;
* ``index``: the item's index.

Randomness: a random item is a pure function of ``(seed, epoch, index)`` -- it draws from its own
generator -- so what a pair holds does not depend on the sampler's order, on data-loader workers
or on the number of processes. Resume and the DDP/single-process equality rely on this.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from alignkit.errors import ConfigError, ShapeError
from alignkit.spatial import (
    Grid,
    apply_matrix,
    gaussian_blur,
    points_to_tensor,
    resize_image,
    sample_voxels,
    sample_world,
    tensor_to_points,
)
from alignkit.train.subjects import Subject, SubjectSet, label_ids_of
from alignkit.transforms import scaling_and_squaring

PairKind = Literal["inter", "atlas", "synthetic", "warped-copy", "synthetic-affine", "cases"]
PAIR_KINDS: tuple[str, ...] = get_args(PairKind)


# -- pair datasets -------------------------------------------------------------------------------
def item_generator(seed: int, *keys: int) -> torch.Generator:
    """A generator for one item, seeded from ``(seed, *keys)`` by numpy's SeedSequence (well mixed,
    so neighbouring indices or epochs do not draw correlated streams)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(k) & 0xFFFFFFFF for k in keys]])
    return torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0] >> np.uint64(1)))


def _moving_on(fixed: Subject, moving: Subject) -> tuple[Tensor, Tensor | None]:
    """``moving`` (image, labels) sampled on ``fixed``'s network grid through the world identity."""
    if moving.grid.same_as(fixed.grid):
        return moving.image, moving.labels
    world = fixed.grid.world_points()
    image = sample_world(moving.image[None], moving.grid, world)[0]
    labels = None
    if moving.labels is not None:
        labels = sample_world(moving.labels[None].float(), moving.grid, world, mode="nearest")[0].round().long()
    return image, labels


class PairDataset(Dataset):
    """Base class: ``subjects`` and the label values (``label_ids``) a Dice term and the validation
    Dice are computed over (default: every non-zero label of any subject).

    Labels are returned when any subject has them; a subject without is given an empty (all-zero)
    map, which adds a constant to a Dice loss (no gradient) and is skipped by the validation Dice,
    so partly labelled data sets (e.g. landmark blobs on two of six slices) still batch.
    ``set_epoch(epoch)`` is called by the trainer before each epoch (random pairs redraw).
    """

    def __init__(self, subjects: Sequence[Subject], *, label_ids: Sequence[int] | None = None, seed: int = 0) -> None:
        if not subjects:
            raise ConfigError("a pair data set needs at least one subject")
        ndims = {s.ndim for s in subjects}
        if len(ndims) != 1:
            raise ShapeError("subjects mix 2D and 3D images")
        shapes = {tuple(s.image.shape[1:]) for s in subjects}
        if len(shapes) != 1:
            raise ShapeError(f"subjects must share one network size, got {sorted(shapes)}")
        self.subjects = list(subjects)
        self.seed = int(seed)
        self.epoch = 0
        self.has_labels = any(s.labels is not None for s in self.subjects)
        counts = {int(s.points.shape[0]) for s in self.subjects if s.points is not None}
        if len(counts) > 1:
            raise ConfigError(f"landmark sets must have one length to batch, got {sorted(counts)} points")
        #: landmarks per subject (0: none); a subject without is given masked-out zeros
        self.n_points = counts.pop() if counts else 0
        if not self.has_labels:
            self.label_ids: list[int] = []
        else:
            self.label_ids = sorted(int(v) for v in label_ids) if label_ids is not None else label_ids_of(self.subjects)

    @property
    def ndim(self) -> int:
        return self.subjects[0].ndim

    @property
    def size(self) -> tuple[int, ...]:
        return tuple(self.subjects[0].image.shape[1:])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _labels(self, labels: Tensor | None) -> Tensor:
        return labels if labels is not None else torch.zeros((1, *self.size), dtype=torch.long)

    def _pair(self, index: int, fixed: Subject, moving: Subject) -> dict[str, Any]:
        moving_image, moving_labels = _moving_on(fixed, moving)
        item: dict[str, Any] = {"fixed": fixed.image, "moving": moving_image, "index": index}
        if self.has_labels:
            item["fixed_labels"], item["moving_labels"] = self._labels(fixed.labels), self._labels(moving_labels)
        if self.n_points:
            item.update(self._points(fixed, moving))
        return item

    def _points(self, fixed: Subject, moving: Subject) -> dict[str, Tensor]:
        """Both subjects' landmarks as voxel coordinates ``(N, ndim)`` (array-axis order) of the fixed
        network grid, where the moving image is resampled too, and ``points_mask (N,)``: 1 where
        both subjects have them. Row k of both is the same landmark."""
        zeros = torch.zeros(self.n_points, self.ndim)
        if fixed.points is None or moving.points is None:
            return {"fixed_points": zeros, "moving_points": zeros, "points_mask": torch.zeros(self.n_points)}
        to_voxel = fixed.grid.voxel_from_world

        def voxels(points: Tensor) -> Tensor:
            return tensor_to_points(apply_matrix(to_voxel, points_to_tensor(points.double()))).float()

        return {
            "fixed_points": voxels(fixed.points),
            "moving_points": voxels(moving.points),
            "points_mask": torch.ones(self.n_points),
        }


class InterSubjectPairs(PairDataset):
    """Ordered pairs ``(fixed=i, moving=j)`` of subjects: all ``i != j`` by default, or the given
    ``pairs``; ``max_pairs`` keeps a seeded subset."""

    def __init__(
        self,
        subjects: Sequence[Subject],
        *,
        pairs: Sequence[tuple[int, int]] | None = None,
        max_pairs: int | None = None,
        label_ids: Sequence[int] | None = None,
        truth: Sequence[dict[str, Tensor]] | None = None,
        pose_augment: dict[str, float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(subjects, label_ids=label_ids, seed=seed)
        self.pose_augment = check_pose_augment(pose_augment)
        if self.pose_augment and (self.n_points or truth is not None):
            raise ConfigError("pose_augment moves the moving image only: not with landmarks or pair ground truth")
        n = len(self.subjects)
        if truth is not None and (pairs is None or len(truth) != len(pairs)):
            raise ConfigError("pair ground truth needs one record per given pair")
        if pairs is None:
            if n < 2:
                raise ConfigError("inter-subject pairs need at least two subjects (use synthetic pairs for one)")
            pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
        pairs = [(int(i), int(j)) for i, j in pairs]
        if not pairs or any(not (0 <= i < n and 0 <= j < n) for i, j in pairs):
            raise ConfigError(f"pairs must index the {n} subjects, got {pairs[:4]}...")
        truths = list(truth) if truth is not None else None
        if max_pairs is not None and max_pairs < len(pairs):
            order = torch.randperm(len(pairs), generator=item_generator(seed, 0x5EED)).tolist()
            pairs = [pairs[k] for k in sorted(order[:max_pairs])]
            truths = [truths[k] for k in sorted(order[:max_pairs])] if truths is not None else None
        self.pairs = pairs
        # only the kinds of truth every pair has (a batch needs the same keys in every item)
        keys = set.intersection(*(set(t) for t in truths)) if truths else set()
        self.truth = [{k: t[k] for k in sorted(keys)} for t in truths] if truths and keys else None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, j = self.pairs[index]
        item = self._pair(index, self.subjects[i], self.subjects[j])
        if self.truth is not None:
            item.update(self.truth[index])
        if self.pose_augment:
            # a new pose of the moving subject every epoch (a pure function of seed, epoch and index): a method
            # that learns the pose (a learned affine) sees more than the few poses of its training subjects
            matrix = random_voxel_affine(self.size, item_generator(self.seed, 0x905E, self.epoch, index),
                                         **self.pose_augment)
            points = _voxel_points_through(matrix, self.size)
            item["moving"] = sample_voxels(item["moving"][None], points, padding="zeros")[0]
            if "moving_labels" in item:
                item["moving_labels"] = sample_voxels(item["moving_labels"][None].float(), points, mode="nearest",
                                                      padding="zeros")[0].round().long()
        return item


class AtlasPairs(PairDataset):
    """Atlas-to-subject: the atlas is the fixed image of every pair (``atlas_fixed=True``, the
    VoxelMorph atlas setting), or the moving one."""

    def __init__(
        self, atlas: Subject, subjects: Sequence[Subject], *, atlas_fixed: bool = True,
        label_ids: Sequence[int] | None = None, seed: int = 0,
    ) -> None:
        super().__init__([atlas, *subjects], label_ids=label_ids, seed=seed)
        self.atlas_fixed = bool(atlas_fixed)

    def __len__(self) -> int:
        return len(self.subjects) - 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        atlas, subject = self.subjects[0], self.subjects[index + 1]
        return self._pair(index, atlas, subject) if self.atlas_fixed else self._pair(index, subject, atlas)


def random_displacement(
    size: Sequence[int], generator: torch.Generator, *, magnitude: float = 3.0, control: int = 6, steps: int = 7
) -> Tensor:
    """A smooth diffeomorphic displacement ``(1, ndim, *size)`` in voxels (array-axis order).

    A random velocity on a ``control``-point lattice (Gaussian, smoothed), upsampled, scaled so its
    largest vector is ``magnitude`` voxels, integrated by scaling and squaring.
    """
    size = tuple(int(s) for s in size)
    ndim = len(size)
    coarse = tuple(max(2, min(control, s)) for s in size)
    velocity = torch.randn(1, ndim, *coarse, generator=generator)
    velocity = gaussian_blur(velocity, 0.7)
    velocity = resize_image(velocity, size)
    velocity = velocity * (float(magnitude) / velocity.norm(dim=1).amax().clamp_min(1e-6))
    grid = Grid.from_spacing(size, 1.0)  # world = voxel frame: world units are voxels
    return scaling_and_squaring(velocity, grid, steps)


class _RandomCopies(PairDataset):
    """Base of pairs made of a subject and a randomly transformed copy of it: ``length`` items (default:
    the number of subjects; index ``k`` uses subject ``k % n``), redrawn every epoch with
    ``per_epoch=True`` (online augmentation) or fixed per index (a data set and its warped copy)."""

    #: what the copy shows outside the subject's grid
    padding: str = "border"

    def __init__(self, subjects: Sequence[Subject], *, length: int | None, per_epoch: bool,
                 label_ids: Sequence[int] | None, seed: int) -> None:
        super().__init__(subjects, label_ids=label_ids, seed=seed)
        self.length = int(length) if length is not None else len(self.subjects)
        if self.length < 1:
            raise ConfigError(f"synthetic pairs need length >= 1, got {self.length}")
        self.per_epoch = bool(per_epoch)

    def __len__(self) -> int:
        return self.length

    def _draw(self, index: int, stream: int) -> tuple[Subject, torch.Generator]:
        """The item's subject and its own generator (a pure function of seed, epoch and index)."""
        keys = (self.epoch, index) if self.per_epoch else (index,)
        return self.subjects[index % len(self.subjects)], item_generator(self.seed, stream, *keys)

    def _copy(self, index: int, subject: Subject, points: Tensor, truth: dict[str, Tensor]) -> dict[str, Any]:
        """``fixed = subject ∘ points`` (voxel points ``(1, ndim, *size)`` of the network grid)."""
        fixed = sample_voxels(subject.image[None], points, padding=self.padding)[0]
        item: dict[str, Any] = {"fixed": fixed, "moving": subject.image, **truth, "index": index}
        if self.has_labels:
            labels = self._labels(subject.labels)
            warped = sample_voxels(labels[None].float(), points, mode="nearest", padding=self.padding)
            item["fixed_labels"], item["moving_labels"] = warped[0].round().long(), labels
        return item


class SyntheticPairs(_RandomCopies):
    """A subject and a randomly deformed copy of it, with the true field for supervised losses.

    ``fixed = moving ∘ (id + flow)``; ``flow`` is :func:`random_displacement`. With
    ``per_epoch=True`` a new deformation is drawn every epoch (online augmentation); with
    ``per_epoch=False`` each index keeps one deformation -- a data set and its warped copy.
    ``length`` defaults to the number of subjects; index ``k`` uses subject ``k % n``.
    """

    def __init__(
        self,
        subjects: Sequence[Subject],
        *,
        length: int | None = None,
        magnitude: float = 3.0,
        control: int = 6,
        per_epoch: bool = True,
        label_ids: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(subjects, length=length, per_epoch=per_epoch, label_ids=label_ids, seed=seed)
        if magnitude < 0:
            raise ConfigError(f"deformation magnitude must be >= 0 voxels, got {magnitude}")
        self.magnitude = float(magnitude)
        self.control = int(control)

    def __getitem__(self, index: int) -> dict[str, Any]:
        subject, generator = self._draw(index, 0xF10)
        flow = random_displacement(self.size, generator, magnitude=self.magnitude, control=self.control)
        points = Grid.from_spacing(self.size, 1.0).voxel_points() + flow
        return self._copy(index, subject, points, {"flow": flow[0]})


def _voxel_points_through(matrix: Tensor, size: Sequence[int]) -> Tensor:
    """``(1, ndim, *size)`` float32: the voxel points of the grid of ``size`` mapped by the voxel affine ``matrix``
    (computed in float64)."""
    identity = Grid.from_spacing(tuple(size), 1.0).voxel_points(dtype=torch.float64)
    return apply_matrix(matrix, identity).float()


#: the bounds ``pose_augment`` may set (:func:`random_voxel_affine`'s keywords); an unnamed one is 0
POSE_AUGMENT_KEYS = ("rotation", "scaling", "shear", "translation")


def check_pose_augment(value: Any) -> dict[str, float] | None:
    """``pose_augment`` as ``{bound: value}`` over :data:`POSE_AUGMENT_KEYS` (missing bounds 0), or None when
    not given or empty."""
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"pose_augment must be a mapping of {', '.join(POSE_AUGMENT_KEYS)} to bounds, got {value!r}")
    unknown = sorted(set(value) - set(POSE_AUGMENT_KEYS))
    if unknown:
        raise ConfigError(f"pose_augment: unknown bound(s) {', '.join(unknown)}; use {', '.join(POSE_AUGMENT_KEYS)}")
    out = {key: 0.0 for key in POSE_AUGMENT_KEYS}
    for key, bound in value.items():
        try:
            out[key] = float(bound)
        except (TypeError, ValueError):
            raise ConfigError(f"pose_augment {key} must be a number, got {bound!r}") from None
        if not out[key] >= 0:
            raise ConfigError(f"pose_augment {key} must be >= 0, got {bound!r}")
    return out


def random_voxel_affine(
    size: Sequence[int], generator: torch.Generator, *, rotation: float = 10.0, scaling: float = 0.1,
    shear: float = 0.05, translation: float = 3.0,
) -> Tensor:
    """A random affine ``(ndim+1, ndim+1)`` float64 on the voxel grid of ``size`` (voxels, array-axis
    order), about the grid centre: rotations up to ``rotation`` degrees about every axis (one angle
    in 2D, three in 3D), per-axis scaling in ``[1 - scaling, 1 + scaling]``, shears up to ``shear``,
    translations up to ``translation`` voxels per axis; all uniform."""
    size = tuple(int(s) for s in size)
    ndim = len(size)

    def uniform(n: int, bound: float) -> Tensor:
        return (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * bound

    linear = torch.eye(ndim, dtype=torch.float64)
    for (a, b), angle in zip([(0, 1)] if ndim == 2 else [(0, 1), (0, 2), (1, 2)], uniform(1 if ndim == 2 else 3, rotation)):
        turn = torch.eye(ndim, dtype=torch.float64)
        c, s = torch.cos(torch.deg2rad(angle)), torch.sin(torch.deg2rad(angle))
        turn[a, a], turn[a, b], turn[b, a], turn[b, b] = c, -s, s, c
        linear = turn @ linear
    shears = torch.eye(ndim, dtype=torch.float64) + torch.triu(torch.ones(ndim, ndim, dtype=torch.float64), 1) * uniform(1, shear)
    linear = linear @ shears @ torch.diag(1 + uniform(ndim, scaling))
    centre = torch.tensor([(n - 1) / 2 for n in size], dtype=torch.float64)
    matrix = torch.eye(ndim + 1, dtype=torch.float64)
    matrix[:ndim, :ndim] = linear
    matrix[:ndim, ndim] = centre - linear @ centre + uniform(ndim, translation)
    return matrix


class SyntheticAffinePairs(_RandomCopies):
    """A subject and a randomly affinely transformed copy, with the true matrix (and its field).

    ``fixed = moving ∘ M``: ``fixed(p) = moving(M [p; 1])`` with ``M`` from
    :func:`random_voxel_affine` (``magnitude`` is its translation bound in voxels); ``matrix`` and
    ``flow`` (``M p - p``) are in voxels of the network grid. ``per_epoch`` and ``length`` as in
    :class:`SyntheticPairs`; outside the subject the copy is 0.
    """

    padding = "zeros"

    def __init__(
        self,
        subjects: Sequence[Subject],
        *,
        length: int | None = None,
        magnitude: float = 3.0,
        rotation: float = 10.0,
        scaling: float = 0.1,
        per_epoch: bool = True,
        label_ids: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(subjects, length=length, per_epoch=per_epoch, label_ids=label_ids, seed=seed)
        if min(magnitude, rotation, scaling) < 0:
            raise ConfigError("synthetic affine bounds (magnitude, rotation, scaling) must be >= 0")
        self.magnitude, self.rotation, self.scaling = float(magnitude), float(rotation), float(scaling)

    def __getitem__(self, index: int) -> dict[str, Any]:
        subject, generator = self._draw(index, 0xAFF)
        matrix = random_voxel_affine(self.size, generator, rotation=self.rotation, scaling=self.scaling,
                                     translation=self.magnitude)
        points = _voxel_points_through(matrix, self.size)
        identity = Grid.from_spacing(self.size, 1.0).voxel_points()
        return self._copy(index, subject, points, {"matrix": matrix.float(), "flow": (points - identity)[0]})


def split_subjects(subjects: Sequence[Subject], val_fraction: float, seed: int) -> tuple[list[Subject], list[Subject]]:
    """A seeded split into (train, validation) subjects: at least two training subjects (a pair) and
    one held out, when there are at least three."""
    n = len(subjects)
    if n < 3 or val_fraction <= 0:
        return list(subjects), []
    n_val = min(n - 2, max(1, round(val_fraction * n)))
    order = torch.randperm(n, generator=item_generator(seed, 0x5B11)).tolist()
    val = sorted(order[:n_val])
    return [subjects[k] for k in range(n) if k not in val], [subjects[k] for k in val]


def named_split(subjects: Sequence[Subject], patterns: Sequence[str]) -> tuple[list[Subject], list[Subject]]:
    """(train, validation) subjects: validation = those whose name matches a shell-style pattern
    (:func:`~alignkit.train.subjects.select_names`), e.g. ``["subject11", "subject12"]``."""
    from alignkit.train.subjects import select_names

    names = [s.name for s in subjects]
    if len(set(names)) != len(names):
        raise ConfigError(f"validation subjects are chosen by name, but the names repeat: {', '.join(names)}")
    held = set(select_names(names, patterns))
    train = [s for s in subjects if s.name not in held]
    if not train:
        raise ConfigError(f"the validation patterns {', '.join(patterns)} leave no training subject")
    return train, [s for s in subjects if s.name in held]


def _involving(
    train_subjects: list[Subject],
    val_subjects: list[Subject],
    *,
    max_pairs: int | None,
    label_ids: Sequence[int] | None,
    seed: int,
) -> InterSubjectPairs:
    """Every ordered pair that involves a validation subject (with a training one, or another one)."""
    everyone = train_subjects + val_subjects
    first_val = len(train_subjects)
    pairs = [
        (i, j) for i in range(len(everyone)) for j in range(len(everyone))
        if i != j and (i >= first_val or j >= first_val)
    ]
    return InterSubjectPairs(everyone, pairs=pairs, max_pairs=max_pairs, label_ids=label_ids, seed=seed)


def build_pairs(
    kind: PairKind | str,
    data: SubjectSet | Sequence[Subject],
    *,
    val_fraction: float = 0.2,
    max_pairs: int | None = None,
    synthetic_length: int | None = None,
    magnitude: float = 3.0,
    seed: int = 0,
    val_subjects: Sequence[str] | None = None,
    pose_augment: dict[str, float] | None = None,
) -> tuple[PairDataset, PairDataset | None]:
    """(training pairs, validation pairs or None) of ``kind`` from subjects.

    * ``inter``/``atlas``: hold out validation *subjects* when there are at least four
      (generalisation to unseen anatomy; validation pairs are those that involve one); with fewer,
      validation is a seeded subset of the pairs, which then only measures fitting;
    * ``synthetic`` (a new deformation every epoch) / ``warped-copy`` (one per index): validation on
      fixed deformations from another seed stream, never drawn in training;
    * ``cases``: the data set's own pairs (:attr:`SubjectSet.case_pairs`), a seeded part held out.

    ``val_subjects`` (shell-style patterns of subject names, :func:`named_split`) names the held-out
    subjects instead of the seeded split (``val_fraction`` is then unused): every kind of training
    pair is made of the other subjects only, and validation is every inter-subject pair that involves
    a held-out one -- e.g. train on unlabelled brain slices, validate on the two labelled ones.

    ``pose_augment`` (``inter`` only; :func:`check_pose_augment`): the training pairs' moving subject is resampled
    through a new random affine (:func:`random_voxel_affine` with these bounds) every epoch; validation pairs never.
    """
    if kind not in PAIR_KINDS:
        raise ConfigError(f"unknown pair kind {kind!r}; choose one of {', '.join(PAIR_KINDS)}")
    if check_pose_augment(pose_augment) and kind != "inter":
        raise ConfigError(f"pose_augment applies to inter-subject pairs, not {kind!r}")
    if isinstance(data, SubjectSet):
        subjects, label_ids, case_pairs, truth = data.subjects, data.label_ids, data.case_pairs, data.case_truth
    else:
        subjects, label_ids, case_pairs, truth = list(data), None, None, None
    named: tuple[list[Subject], list[Subject]] | None = None
    if val_subjects is not None:
        if kind == "cases":
            raise ConfigError("validation subjects apply to subject pairs, not to a data set's own (cases)")
        named = named_split(subjects, val_subjects)
        if label_ids is None and any(s.labels is not None for s in subjects):
            label_ids = label_ids_of(subjects)  # the held-out subjects' labels count too
    if kind == "synthetic-affine":
        train_subjects, held = named if named is not None else (list(subjects), [])
        affine_train = SyntheticAffinePairs(train_subjects, length=synthetic_length, magnitude=magnitude,
                                            label_ids=label_ids, seed=seed)
        if held:
            return affine_train, SyntheticAffinePairs(held, length=len(held), magnitude=magnitude, per_epoch=False,
                                                      label_ids=label_ids, seed=seed + 7919)
        n_val = max(1, round(val_fraction * len(affine_train))) if val_fraction > 0 else 0
        return affine_train, SyntheticAffinePairs(
            subjects, length=n_val, magnitude=magnitude, per_epoch=False, label_ids=label_ids, seed=seed + 7919
        ) if n_val else None
    if kind in ("synthetic", "warped-copy") and named is not None:
        train_subjects, held = named
        train = SyntheticPairs(
            train_subjects, length=synthetic_length, magnitude=magnitude, per_epoch=kind == "synthetic",
            label_ids=label_ids, seed=seed,
        )
        return train, _involving(train_subjects, held, max_pairs=None, label_ids=label_ids, seed=seed)
    if kind in ("synthetic", "warped-copy"):
        train = SyntheticPairs(
            subjects, length=synthetic_length, magnitude=magnitude, per_epoch=kind == "synthetic",
            label_ids=label_ids, seed=seed,
        )
        n_val = max(1, round(val_fraction * len(train))) if val_fraction > 0 else 0
        # another seed stream: validation deformations are never training ones
        val = SyntheticPairs(
            subjects, length=n_val, magnitude=magnitude, per_epoch=False, label_ids=label_ids, seed=seed + 7919
        ) if n_val else None
        return train, val
    if kind == "cases":
        if not case_pairs:
            raise ConfigError("this data set has no pairs of its own; use inter, atlas or synthetic pairs")
        order = torch.randperm(len(case_pairs), generator=item_generator(seed, 0xCA5E)).tolist()
        n_val = min(len(case_pairs) - 1, round(val_fraction * len(case_pairs))) if val_fraction > 0 else 0
        val_pairs = [case_pairs[k] for k in sorted(order[:n_val])]
        train_pairs = [case_pairs[k] for k in sorted(order[n_val:])]
        val_truth = [truth[k] for k in sorted(order[:n_val])] if truth is not None else None
        train_truth = [truth[k] for k in sorted(order[n_val:])] if truth is not None else None
        train_set: PairDataset = InterSubjectPairs(subjects, pairs=train_pairs, max_pairs=max_pairs,
                                                   label_ids=label_ids, truth=train_truth, seed=seed)
        val_set: PairDataset | None = (
            InterSubjectPairs(subjects, pairs=val_pairs, label_ids=label_ids, truth=val_truth, seed=seed)
            if val_pairs else None
        )
        return train_set, val_set
    if named is not None:
        train_subjects, held_subjects = named
    elif len(subjects) >= 4:
        train_subjects, held_subjects = split_subjects(subjects, val_fraction, seed)
    else:
        train_subjects, held_subjects = list(subjects), []
    if kind == "atlas":
        atlas, rest = train_subjects[0], train_subjects[1:]
        if not rest:
            raise ConfigError("atlas pairs need an atlas and at least one subject")
        train_set = AtlasPairs(atlas, rest, label_ids=label_ids, seed=seed)
        val_set = None
        if held_subjects:
            val_set = AtlasPairs(atlas, held_subjects, label_ids=label_ids, seed=seed)
        elif val_fraction > 0:
            val_set = AtlasPairs(atlas, rest, label_ids=label_ids, seed=seed)
        return train_set, val_set
    if len(train_subjects) < 2:
        names = [s.name for s in train_subjects]
        raise ConfigError(f"inter-subject pairs need two training subjects, got {names}")
    train_set = InterSubjectPairs(train_subjects, max_pairs=max_pairs, label_ids=label_ids, seed=seed,
                                  pose_augment=pose_augment)
    if held_subjects:
        val_set = _involving(train_subjects, held_subjects, max_pairs=max_pairs, label_ids=label_ids, seed=seed)
        return train_set, val_set
    if val_fraction > 0:
        n_val = max(1, round(val_fraction * len(train_set)))
        return train_set, InterSubjectPairs(list(subjects), max_pairs=n_val, label_ids=label_ids, seed=seed + 1)
    return train_set, None
