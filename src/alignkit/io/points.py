"""Landmark CSV files.

Convention: points are **world coordinates (LPS)**, one point per row, columns ``x, y[, z]`` --
the frame of :class:`alignkit.spatial.Grid` and of ANTs' point CSVs (which add a ``t`` column, read
and ignored here). Points of a 2D raster are ``(column, row)`` on :meth:`Grid.raster_2d`.
A first line that does not parse as numbers is a header; if it names ``x``, ``y`` (``z``) those
columns are used, otherwise the first ``ndim`` columns (an extra 4th ``t`` column is allowed).
Note that ANTs transforms *points* with the inverse of the transforms that warp images.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import torch
from torch import Tensor

from alignkit.errors import InputError
from alignkit.io.atomic import atomic_path

PathLike = str | os.PathLike[str]
AXES = ("x", "y", "z")


def _parse_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def read_points(path: PathLike, ndim: int) -> Tensor:
    """Read a landmark CSV -> ``(N, ndim)`` float64 world (LPS) coordinates."""
    if ndim not in (2, 3):
        raise InputError(f"ndim must be 2 or 3, got {ndim}", path)
    p = Path(path)
    if not p.is_file():
        raise InputError("file not found", path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read points file: {type(exc).__name__}", path) from exc
    sample = text[:4096]
    if "," not in sample and ";" not in sample:  # whitespace-separated
        rows = [line.split() for line in text.splitlines()]
    else:
        delimiter = ";" if sample.count(";") > sample.count(",") else ","
        rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    rows = [[c.strip() for c in r] for r in rows if any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]
    columns = list(range(ndim))
    start = 0
    if rows and any(_parse_float(c) is None for c in rows[0]):
        names = [c.lower() for c in rows[0]]
        if all(a in names for a in AXES[:ndim]):
            columns = [names.index(a) for a in AXES[:ndim]]
        start = 1
    out: list[list[float]] = []
    for number, row in enumerate(rows[start:], start=start + 1):
        if len(row) < ndim:
            raise InputError(f"row {number} has {len(row)} columns, expected at least {ndim}: {row}", path)
        if start == 0 and len(row) > ndim + 1:
            raise InputError(f"row {number} has {len(row)} columns, expected {ndim} (or {ndim + 1} with t)", path)
        values = [_parse_float(row[c]) for c in columns]
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if len(finite) != ndim:
            raise InputError(f"row {number} is not a finite numeric point: {row}", path)
        out.append(finite)
    if not out:
        raise InputError("no points in file", path)
    return torch.tensor(out, dtype=torch.float64)


def write_points(path: PathLike, points: Tensor, *, with_t: bool = False) -> None:
    """Write ``(N, ndim)`` world (LPS) points as CSV with header ``x,y[,z]`` (``,t`` with zeros
    when ``with_t``, the layout ANTs reads), atomically."""
    pts = torch.as_tensor(points, dtype=torch.float64).detach().cpu()
    if pts.dim() != 2 or pts.shape[1] not in (2, 3):
        raise InputError(f"points must be (N, 2) or (N, 3), got {tuple(pts.shape)}", path)
    ndim = pts.shape[1]
    header = list(AXES[:ndim]) + (["t"] if with_t else [])
    lines = [",".join(header)]
    for row in pts.tolist():
        lines.append(",".join(repr(float(v)) for v in row) + (",0" if with_t else ""))
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
