"""Data sets by name: each folder of ``../shared/data`` becomes a sequence of :class:`Case`.

Every loader converts its data set's own convention into the one of :class:`~alignkit.data.case.Case`
(ground truth fixed → moving, world frame; raster images: x = column, y = row). The conversions that
are not obvious were checked numerically on the data (see each class and ``tests/test_data.py``).

* :func:`load_dataset` resolves a registered name (the folder names of ``../shared/data``; a sub-folder
  such as ``flow/sintel/clean`` or ``vis-nir/field`` works too) under a data root, or a user's folder
  with the same layout (``layout=NAME``, or detected when the folder is named like one).
* A :class:`CaseDataset` (:mod:`alignkit.data.base`) lists its cases when it is built (file names only)
  and reads a case when it is indexed, so a 3D data set costs nothing until a pair is asked for.
* :meth:`CaseDataset.cases` is the reproducible pair list of a benchmark: a data set's preferred pairs
  first (e.g. OASIS 01→02, 03→04, ...), then the others in an order fixed by ``seed``.

The loaders live by domain -- :mod:`alignkit.data.brain`, :mod:`alignkit.data.multimodal`,
:mod:`alignkit.data.flow` (flow and stereo), :mod:`alignkit.data.homography` (homogr and VIS-NIR) --
and are imported here, which registers them; every loader class is importable from this module too.
"""

from __future__ import annotations

import os
from pathlib import Path

from alignkit.data.base import _REGISTRY, CaseDataset, CaseSelection, register
from alignkit.data.brain import AsegPairDataset, Brain2DDataset, OasisTRT20Dataset
from alignkit.data.flow import MiddleburyDataset, MmflowCropsDataset, SintelDataset, StereoDataset
from alignkit.data.homography import HomogrDataset, VisNirDataset
from alignkit.data.multimodal import (
    CtMr2DDataset,
    ItkT1PDSlicesDataset,
    ProstateMRUSDataset,
    T1PD3DDataset,
    itk_slice_matrix,
)
from alignkit.errors import InputError

__all__ = [
    "AsegPairDataset",
    "Brain2DDataset",
    "CaseDataset",
    "CaseSelection",
    "CtMr2DDataset",
    "HomogrDataset",
    "ItkT1PDSlicesDataset",
    "MiddleburyDataset",
    "MmflowCropsDataset",
    "OasisTRT20Dataset",
    "ProstateMRUSDataset",
    "SintelDataset",
    "StereoDataset",
    "T1PD3DDataset",
    "VisNirDataset",
    "available_datasets",
    "dataset_folder",
    "default_root",
    "itk_slice_matrix",
    "load_dataset",
    "register",
]

#: folders of ``../shared/data`` that hold data but no registration pair, and why
_NO_LOADER = {
    "flow/kitti-format": "one KITTI frame and no image pair; read its flow with alignkit.io.read_kitti_flow",
    "multimodal/ch2-atlas": "a single-subject atlas with no second image; use it as a base for alignkit.data.synthetic",
}



def available_datasets() -> list[str]:
    """The registered data-set names (the folder names of ``../shared/data`` that have a loader)."""
    return sorted(_REGISTRY)


def default_root() -> Path:
    """Where registered names are looked up: ``$ALIGNKIT_DATA``, else ``../shared/data`` relative to the
    current directory, else ``../shared/data`` relative to the repository this file lives in."""
    env = os.environ.get("ALIGNKIT_DATA")
    if env:
        return Path(env).expanduser()
    here = Path.cwd() / ".." / "shared" / "data"
    if here.is_dir():
        return here.resolve()
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def dataset_folder(text: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """The folder ``text`` names: a path, else a folder of the data root (``root`` or
    :func:`default_root`); :class:`InputError` naming it when neither exists."""
    folder = Path(text).expanduser()
    base = Path(root).expanduser() if root is not None else default_root()
    if not folder.is_dir() and not folder.is_absolute() and (base / folder).is_dir():
        folder = base / folder
    if not folder.is_dir():
        raise InputError(f"data-set folder not found (nor under the data root {base}; set ALIGNKIT_DATA)", folder)
    return folder


# ------------------------------------------------------------------------------------------------
# lookup
# ------------------------------------------------------------------------------------------------
def _split_name(name: str) -> tuple[str, str] | None:
    """``"flow/sintel/clean"`` -> ``("flow/sintel", "clean")``: the longest registered prefix and the
    sub-folder under it; ``None`` when no registered name is a prefix."""
    parts = [p for p in name.replace("\\", "/").strip("/").split("/") if p]
    for k in range(len(parts), 0, -1):
        head = "/".join(parts[:k])
        if head in _REGISTRY:
            return head, "/".join(parts[k:])
    return None


def _detect_layout(path: Path) -> str | None:
    """The registered layout a folder belongs to, from its path: a registered name appearing as
    consecutive path components (``.../flow/sintel/clean`` -> ``flow/sintel``) or a component named
    like a registered name's last part (``.../my/middlebury`` -> ``flow/middlebury``). The match
    deepest in the path wins (``.../stereo/middlebury`` is Middlebury flow), then a full-name match."""
    parts = [p.lower() for p in Path(os.path.abspath(path)).parts]  # the name as given, links unresolved
    best: tuple[int, int, int] | None = None
    chosen: str | None = None
    for name in _REGISTRY:
        want = name.lower().split("/")
        for end in range(len(parts)):
            full = end + 1 >= len(want) and parts[end + 1 - len(want) : end + 1] == want
            if full or parts[end] == want[-1]:
                score = (end, int(full), len(want))
                if best is None or score > best:
                    best, chosen = score, name
    return chosen


def load_dataset(
    name_or_path: str | os.PathLike[str], *, layout: str | None = None, root: str | os.PathLike[str] | None = None
) -> CaseDataset:
    """A data set by registered name (resolved under ``root``, default :func:`default_root`) or by
    folder (``layout=`` a registered name, or detected from the folder's name).

    Raises :class:`InputError` (one line naming the path) for an unknown name, a missing folder or a
    folder whose layout cannot be told.
    """
    text = os.fspath(name_or_path)
    base = Path(root).expanduser() if root is not None else default_root()
    if layout is not None:
        split = _split_name(layout)
        if split is None:
            raise InputError(f"unknown layout {layout!r}; known: {', '.join(available_datasets())}")
        return _REGISTRY[split[0]](dataset_folder(text, base), name=text)
    split = _split_name(text)
    if split is not None and not Path(text).is_absolute():
        folder = base / text
        if not folder.is_dir():
            raise InputError(f"data-set folder not found (data root {base}; set ALIGNKIT_DATA)", folder)
        return _REGISTRY[split[0]](folder, name=text.strip("/"))
    if text.strip("/") in _NO_LOADER:
        raise InputError(f"no loader: {_NO_LOADER[text.strip('/')]}", base / text)
    folder = Path(text).expanduser()
    if folder.is_dir():
        detected = _detect_layout(folder)
        if detected is None:
            raise InputError(f"cannot tell the layout of this folder; pass layout= one of {', '.join(available_datasets())}",
                             folder)
        return _REGISTRY[detected](folder, name=text)
    if os.sep in text or "/" in text or text.startswith("."):
        raise InputError("data-set folder not found", folder)
    raise InputError(f"unknown data set {text!r}; known: {', '.join(available_datasets())}", base)
