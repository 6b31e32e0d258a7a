"""Atomic file writes: write next to the target, then ``os.replace`` it into place.

A reader never sees a half-written file and an interrupted write leaves the old file untouched.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alignkit.errors import InputError

#: Multi-part suffixes kept whole on temporary names (nibabel dispatches on them).
_DOUBLE_SUFFIXES = (".nii.gz", ".nhdr.gz", ".tar.gz")


def full_suffix(path: str | os.PathLike[str]) -> str:
    """Lower-case suffix of ``path``, keeping ``.nii.gz`` whole (``"a/b.nii.gz" -> ".nii.gz"``)."""
    name = Path(path).name.lower()
    for double in _DOUBLE_SUFFIXES:
        if name.endswith(double):
            return double
    return Path(name).suffix


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the directory of ``path`` with the same suffix; on normal exit the
    temporary file replaces ``path`` atomically (``os.replace``), on an exception it is removed.
    Raises :class:`InputError` when the target directory does not exist.

    The temporary name is ``.<name>.tmp-XXXX<suffix>`` so writers that dispatch on the suffix
    (nibabel, SimpleITK, Pillow) pick the right format.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise InputError(f"cannot write: directory {directory} does not exist", target)
    suffix = full_suffix(target)
    stem = target.name[: len(target.name) - len(suffix)] if suffix else target.name
    fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.tmp-", suffix=suffix, dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
