"""Transform files as alignkit :class:`Transform` objects: alignkit's own folder and the files ANTs,
ITK/SimpleITK, Greedy, elastix and FSL write.

Each tool's convention is undone in :mod:`alignkit.io.foreign` (LPS world, fixed -> moving points);
this module only builds models from its pieces: a matrix becomes a :class:`MatrixTransform`, a
displacement field a frozen :class:`DisplacementField` on the file's grid, an ITK/elastix B-spline
a :class:`ControlPointBSpline` (exact, on the file's lattice).

Chains are given in **ANTs order**, as ``ants.apply_transforms(fixed, moving, transformlist)`` takes
them: a fixed point goes through the *first* listed transform first (``[warp, affine]``:
``y = A(x + u(x))``; ANTs says the last is "applied first" to the image). That is alignkit's
stage order reversed: ``read_transform_chain([warp, affine]) == ComposedTransform([affine, warp])``.
``invert`` (ANTs' ``whichtoinvert``) inverts single files: a matrix exactly, an ANTs
``*Warp.nii.gz`` by reading the ``*InverseWarp.nii.gz`` next to it (and back); other fields and
B-splines have no inverse (:class:`NotInvertibleError` naming the file).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from alignkit.errors import InputError, NotInvertibleError
from alignkit.image import Image
from alignkit.io.foreign import (
    BSplinePiece,
    FieldPiece,
    LinearPiece,
    Piece,
    TransformFormat,
    detect_format,
    inverse_warp_path,
    read_foreign_transform,
    split_format,
)
from alignkit.spatial.grid import Grid
from alignkit.transforms.base import ComposedTransform, Transform, flatten_stages
from alignkit.transforms.bspline import ControlPointBSpline
from alignkit.transforms.dense import DisplacementField
from alignkit.transforms.folder import load_manifest, load_transform
from alignkit.transforms.linear import MatrixTransform

PathLike = str | os.PathLike[str]
#: a grid, an image (its grid), or the path of an image (only its header matters)
GridLike = Grid | Image | PathLike


def _grid(value: GridLike | None) -> Grid | None:
    if value is None or isinstance(value, Grid):
        return value
    if isinstance(value, Image):
        return value.grid
    from alignkit.io.images import read_image

    return read_image(value).grid


def _field(piece: FieldPiece) -> DisplacementField:
    field = DisplacementField(piece.grid)
    with torch.no_grad():
        field.field.copy_(piece.displacement.to(field.field.dtype).unsqueeze(0))
    return field.requires_grad_(False)


def _model(piece: Piece) -> Transform:
    if isinstance(piece, LinearPiece):
        return MatrixTransform(piece.matrix)
    if isinstance(piece, FieldPiece):
        return _field(piece)
    if isinstance(piece, BSplinePiece):
        return ControlPointBSpline(piece.lattice, piece.coefficients.to(torch.get_default_dtype())).requires_grad_(False)
    raise TypeError(f"not a transform piece: {type(piece).__name__}")


def transform_from_pieces(pieces: Sequence[Piece]) -> Transform:
    """One model for one piece, a :class:`ComposedTransform` (same, stage order) for several."""
    if not pieces:
        raise ValueError("no transform pieces")
    models = [_model(p) for p in pieces]
    return models[0] if len(models) == 1 else ComposedTransform(models)


def _inverse_pieces(pieces: list[Piece], path: PathLike) -> list[Piece]:
    out: list[Piece] = []
    for piece in reversed(pieces):
        if isinstance(piece, LinearPiece):
            out.append(LinearPiece(torch.linalg.inv(piece.matrix)))
        elif isinstance(piece, FieldPiece):
            sibling = inverse_warp_path(piece.path) if piece.path else None
            if sibling is None or not sibling.is_file():
                raise NotInvertibleError(
                    f"{path}: a displacement field has no inverse here"
                    + (f" (looked for {sibling.name})" if sibling is not None else "")
                    + "; give its inverse field file instead"
                )
            inverse = read_foreign_transform(sibling, format="itk")
            out.extend(inverse)
        else:
            raise NotInvertibleError(f"{path}: a B-spline transform has no inverse; invert it with its own tool")
    return out


def read_transform(
    path: PathLike,
    *,
    format: TransformFormat | str = "auto",
    invert: bool = False,
    fixed: GridLike | None = None,
    moving: GridLike | None = None,
) -> Transform:
    """A transform file or folder -> a :class:`Transform` mapping fixed-world points to moving-world
    points (LPS), frozen (no gradient).

    ``path`` is an alignkit ``transform/`` folder or a file of ITK/SimpleITK/ANTs, Greedy, elastix or
    FSL FLIRT (:mod:`alignkit.io.foreign`); a ``greedy:`` / ``fsl:`` prefix (or ``format``) names the
    format of a text matrix, which the file itself does not tell. ``fixed`` / ``moving`` (grids,
    images or image paths) are FLIRT's reference and input images. ``invert=True`` returns the
    inverse (see the module docstring). Raises :class:`InputError` naming the file when it cannot be
    read.
    """
    prefixed, path_text = split_format(os.fspath(path))
    fmt = str(format).lower()
    if prefixed != "auto":
        if fmt not in ("auto", prefixed):
            raise InputError(f"format {format!r} contradicts the prefix {prefixed}:", path)
        fmt = prefixed
    p = Path(path_text)
    if fmt == "auto" and p.is_dir():
        fmt = detect_format(p)
    if fmt == "alignkit":
        transform: Transform = load_transform(p)[0]
        if invert:
            try:
                transform = transform.inverse()
            except NotInvertibleError as exc:
                raise NotInvertibleError(f"{p}: {exc}; only its linear part has an inverse") from None
        return transform.requires_grad_(False)
    pieces = read_foreign_transform(p, format=fmt, reference=_grid(fixed), moving=_grid(moving))
    if invert:
        pieces = _inverse_pieces(pieces, p)
    return transform_from_pieces(pieces)


def read_transform_chain(
    paths: Sequence[PathLike],
    *,
    invert: Sequence[bool] | None = None,
    fixed: GridLike | None = None,
    moving: GridLike | None = None,
) -> Transform:
    """Transform files in **ANTs order** (``transformlist`` of ``ants.apply_transforms``: a fixed point
    goes through the first listed first) -> one :class:`Transform`; ``invert`` is ANTs'
    ``whichtoinvert``. Every FSL matrix of the chain is read between ``fixed`` and ``moving``."""
    if not paths:
        raise InputError("no transform files given")
    flags = [False] * len(paths) if invert is None else [bool(f) for f in invert]
    if len(flags) != len(paths):
        raise InputError(f"invert has {len(flags)} flags for {len(paths)} transforms")
    fixed_grid, moving_grid = _grid(fixed), _grid(moving)
    files = [read_transform(path, invert=flag, fixed=fixed_grid, moving=moving_grid) for path, flag in zip(paths, flags)]
    ndims = {t.ndim for t in files}
    if len(ndims) != 1:
        raise InputError(f"the chain mixes {' and '.join(f'{n}D' for n in sorted(ndims))} transforms")
    # ANTs order -> alignkit's stage order: the files are reversed, each file's own stages are not
    stages = [stage for t in reversed(files) for stage in flatten_stages(t)]
    return stages[0] if len(stages) == 1 else ComposedTransform(stages)


def default_reference(paths: Sequence[PathLike], transform: Transform, *, invert: Sequence[bool] | None = None) -> Grid | None:
    """The fixed grid a chain (ANTs order) implies when nothing else gives one: the fixed grid of an
    alignkit folder listed first, or the grid of the displacement field a fixed point meets first
    (ANTs and Greedy write their warps on the fixed image's grid); None when the chain starts with a
    matrix, a B-spline or an inverted alignkit folder."""
    if not paths:
        return None
    first_path = Path(split_format(os.fspath(paths[0]))[1])
    inverted = bool(invert[0]) if invert else False
    if first_path.is_dir() and not inverted:
        return load_manifest(first_path)[0]
    first = flatten_stages(transform)[-1]  # the stage a fixed point meets first
    return first.grid if isinstance(first, DisplacementField) else None
