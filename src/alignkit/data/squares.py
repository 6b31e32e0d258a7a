"""The two-squares toy of Jena, Chaudhari and Gee, Deep Implicit Optimization for Robust and Flexible
Image Registration, §4.1: a fixed and a moving image each hold one bright square on a dark
background; the moving square is the fixed one translated, and the two overlap in half of the pairs.
Where they do not overlap, squared intensity differences are flat in the transform (no gradient),
so an intensity-driven solver cannot move: only features that spread the square's presence across
the image make the pair solvable.

:class:`TwoSquares` is a map-style pair data set for :mod:`alignkit.train` (items are pure functions
of ``(seed, index)``): ``fixed``/``moving`` ``(1, *size)`` float in [0, 1], ``fixed_labels`` /
``moving_labels`` ``(1, *size)`` int64 (1 inside the square), ``shift`` ``(ndim,)`` the moving
square's offset in voxels (array-axis order; the fixed → moving map is ``x + shift``), ``overlap``
(1.0 or 0.0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from alignkit.errors import ConfigError


class TwoSquares(Dataset):
    """``length`` pairs of ``size`` images with a ``square``-voxel square (module docstring). The
    moving square is shifted by up to ``2 * square - 1`` voxels per axis; with probability
    ``overlap_fraction`` every axis' shift is below ``square`` (the squares overlap), otherwise at least
    one axis' shift is ``square`` or more (they do not)."""

    def __init__(self, length: int, *, size: Sequence[int] = (48, 48), square: int = 10, overlap_fraction: float = 0.5,
                 seed: int = 0) -> None:
        self.length, self.square, self.seed = int(length), int(square), int(seed)
        self._size = tuple(int(s) for s in size)
        self.overlap_fraction = float(overlap_fraction)
        if self.length < 1 or self.square < 2 or not 0 <= self.overlap_fraction <= 1:
            raise ConfigError("TwoSquares needs length >= 1, square >= 2 and 0 <= overlap_fraction <= 1")
        if min(self._size) < 4 * self.square:
            raise ConfigError(f"images of {self._size} are too small for a {self.square}-voxel square moved by up to "
                              f"twice its size (need {4 * self.square} per axis)")
        self.label_ids = [1]

    @property
    def ndim(self) -> int:
        return len(self._size)

    @property
    def size(self) -> tuple[int, ...]:
        return self._size

    def __len__(self) -> int:
        return self.length

    def _square(self, corner: Sequence[int]) -> torch.Tensor:
        image = torch.zeros(self._size)
        image[tuple(slice(c, c + self.square) for c in corner)] = 1.0
        return image

    def __getitem__(self, index: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        overlap = bool(torch.rand((), generator=generator) < self.overlap_fraction)
        limit = 2 * self.square - 1
        while True:
            shift = torch.randint(-limit, limit + 1, (self.ndim,), generator=generator)
            if bool((shift.abs() < self.square).all()) == overlap:
                break
        low = [max(0, -int(s)) + 1 for s in shift]  # keep both squares inside the image, with a margin
        high = [n - self.square - max(0, int(s)) - 1 for n, s in zip(self._size, shift)]
        corner = [int(torch.randint(lo, hi + 1, (), generator=generator)) for lo, hi in zip(low, high)]
        fixed = self._square(corner)
        moving = self._square([c + int(s) for c, s in zip(corner, shift)])
        return {"fixed": fixed[None], "moving": moving[None], "fixed_labels": fixed[None].long(),
                "moving_labels": moving[None].long(), "shift": shift.float(), "overlap": float(overlap),
                "index": index}
