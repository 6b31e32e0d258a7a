"""Unlabelled consecutive video frames, cropped at random: the training pairs of unsupervised optical
flow (the survey of deep-learning registration, §3: "the unlabeled data is abundant").

:func:`find_frame_pairs` finds, in every folder under a root, image files whose names differ only by
a trailing frame number (``frame_0001.png``/``frame_0002.png`` of MPI-Sintel, ``frame10.png``/
``frame11.png`` of Middlebury, ``<id>-img_0.png``/``<id>-img_1.png`` of the mmflow crops) and pairs
each frame with the next. No ground truth is read: by default the pairs a flow data set scores (those
with a ground-truth file, found by the data set's own loader) are **left out**, so a network
fine-tuned on the others is then evaluated on frames it never saw.

:class:`FrameCropPairs` serves crops of such pairs: item ``i`` of epoch ``e`` is a pure function of
``(seed, e, i)`` (a random pair, position, flip and order), so the training loop's determinism holds.
Frames are read once, made grey and normalised by their intensity percentiles as inference
normalises whole images (:func:`alignkit.train.subjects.to_network_grid`), then cropped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignkit.data.synthetic_flow import SeededItems
from alignkit.errors import ConfigError, InputError

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".tif", ".tiff", ".bmp")
_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def find_frame_pairs(root: str | os.PathLike, *, exclude: Sequence[tuple[str, str]] = ()) -> list[tuple[Path, Path]]:
    """Consecutive frame pairs ``(frame n, frame n + 1)`` in every folder under ``root``, sorted; pairs
    whose resolved paths are in ``exclude`` are left out."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise InputError("frame folder not found", base)
    excluded = {(os.path.realpath(a), os.path.realpath(b)) for a, b in exclude}
    pairs: list[tuple[Path, Path]] = []
    for dirpath, _, filenames in sorted(os.walk(base, followlinks=True)):
        numbered: dict[tuple[str, str], dict[int, Path]] = {}
        for name in filenames:
            path = Path(dirpath) / name
            if path.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            match = _NUMBERED.match(path.stem)
            if match:
                numbered.setdefault((match[1], path.suffix.lower()), {})[int(match[2])] = path
        for frames in numbered.values():
            for n in sorted(frames):
                if n + 1 in frames:
                    pair = (frames[n], frames[n + 1])
                    if (os.path.realpath(pair[0]), os.path.realpath(pair[1])) not in excluded:
                        pairs.append(pair)
    return sorted(pairs)


def scored_pairs(dataset: str, *, root: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """The (fixed, moving) image paths of every case of the flow data set ``dataset`` (a registered
    name such as ``flow/sintel``, or a folder): the pairs an evaluation scores."""
    from alignkit.data.datasets import load_dataset

    data = load_dataset(dataset, root=root)
    out = []
    for name in data.names:
        files = data[name].meta.get("files", {})
        if "fixed" in files and "moving" in files:
            out.append((files["fixed"], files["moving"]))
    return out


def _grey_frame(path: Path, percentiles: Sequence[float] | None) -> Tensor:
    from alignkit.data.base import read
    from alignkit.solve.engine import normalize_intensity

    if path.suffix.lower() in (".ppm", ".pgm", ".pnm"):
        from alignkit.data.flow import _read_pillow_raster

        image = _read_pillow_raster(path)
    else:
        image = read(path)
    if image.ndim != 2:
        raise InputError(f"frames must be 2D images, got {image.ndim}D", path)
    data = image.batch().mean(1, keepdim=True)
    if percentiles is not None:
        data = normalize_intensity(data, *percentiles)
    return data[0]


class FrameCropPairs(SeededItems):
    """Random crops ``size`` of unlabelled frame pairs (module docstring): items ``fixed``/``moving``
    ``(1, H, W)`` and ``index``; ``length`` items per epoch (``per_epoch=False``: the same ones every
    epoch, for validation). ``flip`` mirrors both frames along a random set of axes and ``swap``
    exchanges them at random (both keep a pair a valid pair of frames)."""

    ndim = 2

    def __init__(self, pairs: Sequence[tuple[str | os.PathLike, str | os.PathLike]], size: Sequence[int], *,
                 length: int = 1000, seed: int = 0, per_epoch: bool = True,
                 percentiles: Sequence[float] | None = (0.5, 99.5), flip: bool = True, swap: bool = True) -> None:
        if not pairs:
            raise ConfigError("no unlabelled frame pairs to train on")
        size = tuple(int(s) for s in size)
        if len(size) == 1:
            size = size * 2
        self.size = size
        self.frames: list[tuple[Tensor, Tensor]] = []
        self.names: list[str] = []
        for first, second in pairs:
            a = _grey_frame(Path(first), percentiles)
            b = _grey_frame(Path(second), percentiles)
            if a.shape != b.shape:
                raise InputError(f"frames of one pair differ in size: {tuple(a.shape)} and {tuple(b.shape)}", second)
            if any(s < c for s, c in zip(a.shape[1:], size)):
                continue  # smaller than a crop: left out
            self.frames.append((a, b))
            self.names.append(f"{first} -> {Path(second).name}")
        if not self.frames:
            raise ConfigError(f"no frame pair is at least {size} pixels large")
        super().__init__(length=length, seed=seed, per_epoch=per_epoch)
        self.flip, self.swap = bool(flip), bool(swap)

    def __getitem__(self, index: int) -> dict[str, Any]:
        generator = self.generator(index)
        k = int(torch.randint(len(self.frames), (), generator=generator))
        first, second = self.frames[k]
        corner = [int(torch.randint(s - c + 1, (), generator=generator)) for s, c in zip(first.shape[1:], self.size)]
        window = (slice(None), *(slice(o, o + c) for o, c in zip(corner, self.size)))
        first, second = first[window], second[window]
        if self.flip:
            axes = [1 + a for a in range(len(self.size)) if bool(torch.rand((), generator=generator) < 0.5)]
            if axes:
                first, second = first.flip(axes), second.flip(axes)
        if self.swap and bool(torch.rand((), generator=generator) < 0.5):
            first, second = second, first
        return {"fixed": first.contiguous(), "moving": second.contiguous(), "index": index}
