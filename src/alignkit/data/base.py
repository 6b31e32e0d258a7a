"""The base of every data-set loader: :class:`CaseDataset` (a lazily read sequence of
:class:`~alignkit.data.case.Case`), :class:`CaseSelection`, the loader registry (:func:`register`)
and the small readers the domain modules share.

The loaders themselves live by domain (:mod:`alignkit.data.brain`, :mod:`alignkit.data.multimodal`,
:mod:`alignkit.data.flow`, :mod:`alignkit.data.homography`); :mod:`alignkit.data.datasets` imports
them all and resolves names (:func:`~alignkit.data.datasets.load_dataset`). This module imports none
of them, so the domain modules import it without a cycle.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar, overload

import numpy as np

from alignkit.data.case import Case
from alignkit.errors import InputError
from alignkit.image import Image

#: registered name -> loader class (filled by :func:`register` when a domain module is imported)
_REGISTRY: dict[str, type[CaseDataset]] = {}

_D = TypeVar("_D", bound="CaseDataset")


def register(name: str) -> Callable[[type[_D]], type[_D]]:
    """Class decorator: make a :class:`CaseDataset` subclass loadable as ``name``."""

    def decorate(cls: type[_D]) -> type[_D]:
        cls.layout = name
        _REGISTRY[name] = cls
        return cls

    return decorate



# ------------------------------------------------------------------------------------------------
# base classes
# ------------------------------------------------------------------------------------------------
class CaseSelection(Sequence[Case]):
    """An ordered, lazily loaded subset of a data set (what :meth:`CaseDataset.cases` returns)."""

    def __init__(self, dataset: CaseDataset, names: list[str]) -> None:
        self.dataset = dataset
        self.names = list(names)

    def __len__(self) -> int:
        return len(self.names)

    @overload
    def __getitem__(self, index: int) -> Case: ...

    @overload
    def __getitem__(self, index: slice) -> CaseSelection: ...

    def __getitem__(self, index: int | slice) -> Case | CaseSelection:
        if isinstance(index, slice):
            return CaseSelection(self.dataset, self.names[index])
        return self.dataset[self.names[index]]

    def __iter__(self) -> Iterator[Case]:
        for name in self.names:
            yield self.dataset[name]

    def __repr__(self) -> str:
        return f"CaseSelection({self.dataset.name!r}, {len(self)} cases)"


class CaseDataset(Sequence[Case]):
    """A data set of registration cases, read lazily.

    Subclasses fill :attr:`names` in :meth:`_discover` (listing files only) and read one case in
    :meth:`_load`. ``dataset[i]`` and ``dataset["name"]`` both work; nothing is cached, so a loop
    over 3D pairs holds one pair in memory at a time.

    Attributes
    ----------
    root:
        The folder the cases are read from (``None`` for generated data sets).
    layout:
        The registered name of the loader (``"flow/middlebury"``), whatever folder it reads.
    name:
        What the data set was asked for by (``"flow/sintel/clean"``, a path, ...); ``Case.meta["dataset"]``.
    names:
        Case names in the canonical order.
    skipped:
        ``{file or case: reason}`` for data present in the folder that has no usable ground truth.
    """

    layout: ClassVar[str] = ""
    #: how many leading ``names`` :meth:`cases` always takes first, in order, before the seeded rest
    n_preferred: int = 0

    def __init__(self, root: str | os.PathLike[str] | None, *, name: str | None = None) -> None:
        self.root = None if root is None else Path(root)
        self.name = name or self.layout
        self.names: list[str] = []
        self.skipped: dict[str, str] = {}
        if self.root is not None:
            if not self.root.is_dir():
                raise InputError("data-set folder not found", self.root)
            self._discover()
            if not self.names:
                raise InputError(f"no cases found for layout {self.layout!r}", self.root)

    # -- to implement -------------------------------------------------------------------------
    def _discover(self) -> None:
        raise NotImplementedError

    def _load(self, name: str) -> Case:
        raise NotImplementedError

    # -- sequence -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    @overload
    def __getitem__(self, index: int | str) -> Case: ...

    @overload
    def __getitem__(self, index: slice) -> CaseSelection: ...

    def __getitem__(self, index: int | str | slice) -> Case | CaseSelection:
        if isinstance(index, slice):
            return CaseSelection(self, self.names[index])
        if isinstance(index, str):
            if index not in self.names:
                raise InputError(f"no case named {index!r} in {self.name}", self.root)
            name = index
        else:
            name = self.names[index]
        case = self._load(name)
        case.meta.setdefault("dataset", self.name)
        return case

    def __iter__(self) -> Iterator[Case]:
        for name in self.names:
            yield self[name]

    def cases(self, n: int | None = None, seed: int = 0) -> CaseSelection:
        """``n`` cases (all when ``None``): the :attr:`n_preferred` leading names in order, then the
        remaining names permuted by ``numpy.random.default_rng(seed)``. Same ``(n, seed)``, same list."""
        if n is not None and n < 0:
            raise InputError(f"cases: n must be >= 0, got {n}")
        head = self.names[: self.n_preferred]
        rest = self.names[self.n_preferred :]
        order = np.random.default_rng(seed).permutation(len(rest))
        chosen = head + [rest[i] for i in order]
        return CaseSelection(self, chosen if n is None else chosen[:n])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} cases, root={str(self.root)!r})"

    # -- helpers for subclasses -----------------------------------------------------------------
    def _rel(self, path: Path) -> str:
        assert self.root is not None
        rel = path.relative_to(self.root).as_posix()
        return "" if rel == "." else rel

    def _meta(self, **files: Path) -> dict[str, Any]:
        return {"dataset": self.name, "layout": self.layout, "files": {k: str(v) for k, v in files.items()}}


# ------------------------------------------------------------------------------------------------
# small readers and geometry helpers
# ------------------------------------------------------------------------------------------------
def rglob(root: Path, pattern: str) -> list[Path]:
    """Files under ``root`` whose path ends like ``pattern`` (``PurePath.match``), sorted -- like
    ``Path.rglob`` but following symlinked folders, since a user's data folder is often a tree of links
    to the real data."""
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link cycle
            dirnames[:] = []
            continue
        seen.add(real)
        found += [Path(dirpath) / f for f in filenames if (Path(dirpath) / f).match(pattern)]
    return sorted(found)


def read(path: Path, *, labels: bool = False, key: str | None = None) -> Image:
    from alignkit.io import read_image

    return read_image(path, labels=labels, key=key)
