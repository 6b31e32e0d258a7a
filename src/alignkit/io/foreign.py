"""Transform files other tools write -- ITK / SimpleITK / ANTs, PICSL Greedy, elastix, FSL FLIRT --
read into alignkit's one convention. Each tool's convention is handled here and nowhere else;
:mod:`alignkit.transforms.files` turns what this module returns into :class:`Transform` objects.

What comes out
--------------
:func:`read_foreign_transform` returns *pieces* in alignkit's **stage order** (that of
``ComposedTransform`` and of an ITK ``CompositeTransform``): a fixed-world point goes through the
*last* piece first, ``y = pieces[0](pieces[1](... pieces[-1](x)))``. Every piece maps **fixed-world
points to moving-world points in LPS** (the direction of ITK transforms and of alignkit's):

* :class:`LinearPiece` -- ``(ndim+1, ndim+1)`` float64 ``moving_from_fixed``;
* :class:`FieldPiece` -- ``y = x + u(x)``, ``u (ndim, *grid.shape)`` world (LPS) units and
  components, linear interpolation on ``grid``;
* :class:`BSplinePiece` -- ``y = x + sum_k c_k B3(t - k)``, ``t`` the lattice-voxel coordinate of
  ``x``, ``c (ndim, *lattice.shape)`` world (LPS) vectors; zero displacement outside ITK's valid region.

Per tool (each pinned against the tool itself in ``tests/test_foreign.py``)
--------------------------------------------------------------------------
* **ITK** text ``.txt``/``.tfm`` (``#Insight Transform File V1.0``), MATLAB v4 ``.mat`` (what ANTs
  writes, read with scipy), and (through SimpleITK) ``.h5``: already LPS and fixed->moving.
  Linear types are parsed here (Affine, MatrixOffsetTransformBase, Translation, Euler/Rigid 2D,
  Euler 3D with its ZYX flag, VersorRigid 3D, Similarity 2D/3D, Scale) as ``y = A (x - c) + t + c``
  with ``c`` the FixedParameters centre; BSplineTransform too. Other types, and ``.h5`` files
  (where ANTs puts composite affine + field transforms), go through SimpleITK. A composite lists its
  transforms in stage order (ITK applies the last-added one to a point first).
* **ANTs / ITK / Greedy displacement fields** (``*Warp.nii.gz``): see :mod:`alignkit.io.itk`; vector
  components are LPS as ITK stores them. ANTs' ``*InverseWarp.nii.gz`` is the inverse of the
  ``*Warp.nii.gz`` next to it (:func:`inverse_warp_path`); Greedy's ``-oinv`` file is the same kind.
* **Greedy** affine: a ``(ndim+1)^2`` text matrix in **RAS** mapping fixed to moving points;
  ``M_lps = F M_ras F`` with ``F = diag(-1, -1, 1[, 1])`` (:func:`alignkit.io.itk.lps_matrix_from_ras`).
* **elastix** ``TransformParameters.N.txt``: ITK physical space (LPS), fixed->moving. Euler,
  Similarity, Affine, Translation and (Recursive)BSpline transforms are parsed;
  ``InitialTransformParameterFileName`` chains (elastix 5's spelling; elastix 4 wrote
  ``InitialTransformParametersFileName``, read too) are followed with ``HowToCombineTransforms Compose``:
  the initial transform acts on a point first, ``y = T(T_initial(x))``.
* **FSL FLIRT** ``.mat``: a 4x4 text matrix between *scaled-voxel* coordinates mapping **input
  (moving) to reference (fixed)** points: ``x_ref = M x_in``. A scaled-voxel coordinate is
  ``diag(pixdim) @ (i, j, k)`` with ``i -> nx - 1 - i`` first when the image's qform/sform has a
  positive determinant. It needs both images' headers: ``moving_from_fixed =
  W_in inv(S_in) inv(M) S_ref inv(W_ref)`` with ``W`` the LPS ``world_from_voxel`` and ``S`` the
  scaled-voxel-from-voxel matrix (:func:`fsl_from_voxel`).

A 4x4 text matrix is either Greedy's or FLIRT's; nothing in the file says which, so such a file
must be named with its format (``format="greedy"`` / ``"fsl"``, or ``greedy:FILE`` / ``fsl:FILE``
on the command line). Every failure is one :class:`InputError` line naming the file.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from alignkit.errors import InputError
from alignkit.io.atomic import full_suffix
from alignkit.io.itk import lps_matrix_from_ras, read_displacement_field
from alignkit.spatial.grid import Grid

PathLike = str | os.PathLike[str]

#: how a transform file is read; ``auto`` tells from the suffix and content (never guesses between
#: Greedy and FSL, whose 4x4 text matrices look alike)
TransformFormat = Literal["auto", "alignkit", "itk", "ants", "greedy", "elastix", "fsl"]
FORMATS: tuple[str, ...] = get_args(TransformFormat)

_ITK_HEADER = "#Insight Transform File"
_NIFTI = (".nii", ".nii.gz")
_IMAGE_FIELDS = (*_NIFTI, ".mha", ".mhd", ".nrrd", ".nhdr")


# ------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearPiece:
    """``y = matrix @ [x; 1]``: ``(ndim+1, ndim+1)`` float64 LPS ``moving_from_fixed``."""

    matrix: Tensor

    @property
    def ndim(self) -> int:
        return int(self.matrix.shape[0]) - 1


@dataclass(frozen=True)
class FieldPiece:
    """``y = x + u(x)``: ``displacement (ndim, *grid.shape)`` world (LPS) units. ``path`` is the file
    it came from (its inverse may be a sibling file, see :func:`inverse_warp_path`)."""

    displacement: Tensor
    grid: Grid
    path: str | None = None

    @property
    def ndim(self) -> int:
        return self.grid.ndim


@dataclass(frozen=True)
class BSplinePiece:
    """``y = x + sum_k c_k B3(t - k)``: ``coefficients (ndim, *lattice.shape)`` world (LPS) vectors at
    the control points, placed in the world by ``lattice`` (control point ``k`` at
    ``lattice.world_from_voxel @ k``); zero displacement outside ITK's valid region."""

    coefficients: Tensor
    lattice: Grid

    @property
    def ndim(self) -> int:
        return self.lattice.ndim


Piece = LinearPiece | FieldPiece | BSplinePiece


# ------------------------------------------------------------------------------------------------
# format names and detection
# ------------------------------------------------------------------------------------------------
def split_format(spec: str) -> tuple[TransformFormat, str]:
    """``"fsl:flirt.mat"`` -> ``("fsl", "flirt.mat")``; a plain path -> ``("auto", path)``. Only the
    names of :data:`FORMATS` are prefixes, so a Windows drive letter stays part of the path."""
    head, sep, tail = spec.partition(":")
    if sep and head.lower() in FORMATS and tail:
        return head.lower(), tail  # type: ignore[return-value]
    return "auto", spec


def _read_text(path: Path) -> str | None:
    """The file as text, or None if it is binary."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read transform file: {type(exc).__name__}", path) from exc
    if b"\0" in raw[:4096]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _text_matrix(text: str) -> np.ndarray | None:
    """A square 3x3 or 4x4 whitespace-separated numeric matrix, or None."""
    rows = [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    try:
        m = np.array([[float(v) for v in row] for row in rows], dtype=np.float64)
    except ValueError:
        return None
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] not in (3, 4):
        return None
    return m


def detect_format(path: PathLike) -> TransformFormat:
    """The format of a transform file or folder, told from its suffix and content; raises an
    :class:`InputError` naming the file when it cannot be told (e.g. a 4x4 text matrix, which
    Greedy and FSL both write)."""
    p = Path(path)
    if p.is_dir():
        if (p / "manifest.json").is_file():
            return "alignkit"
        raise InputError("folder is not an alignkit transform folder (no manifest.json)", path)
    if not p.is_file():
        raise InputError("file not found", path)
    suffix = full_suffix(p)
    if suffix in _IMAGE_FIELDS:
        return "itk"  # a displacement-field image (ANTs, ITK, Greedy all store LPS vectors)
    if suffix in (".h5", ".hdf5"):
        return "itk"
    text = _read_text(p)
    if text is None:
        if suffix == ".mat":
            return "itk"  # binary MATLAB v4: ANTs' *GenericAffine.mat, SimpleITK's .mat
        raise InputError("binary file of unknown transform format", path)
    head = text.lstrip()
    if head.startswith(_ITK_HEADER):
        return "itk"
    if re.search(r"^\s*\(Transform\s+\"", text, flags=re.MULTILINE):
        return "elastix"
    if _text_matrix(text) is not None:
        raise InputError(
            "a text matrix is either Greedy's (RAS world) or FSL FLIRT's (scaled voxels): name it "
            "greedy:FILE or fsl:FILE (format='greedy' or 'fsl')",
            path,
        )
    raise InputError("unknown transform format (not ITK, ANTs, Greedy, elastix or FSL)", path)


# ------------------------------------------------------------------------------------------------
# rotation parametrisations (ITK's, which elastix shares)
# ------------------------------------------------------------------------------------------------
def _rot2(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def _euler3(ax: float, ay: float, az: float, zyx: bool) -> np.ndarray:
    """ITK ``Euler3DTransform``: ``Rz Rx Ry`` (default) or ``Rz Ry Rx`` (ComputeZYX)."""
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx if zyx else rz @ rx @ ry


def _versor(vx: float, vy: float, vz: float, path: PathLike) -> np.ndarray:
    """ITK versor (the vector part of a unit quaternion) -> rotation matrix."""
    n2 = vx * vx + vy * vy + vz * vz
    if n2 > 1.0 + 1e-9:
        raise InputError(f"versor ({vx}, {vy}, {vz}) has norm > 1", path)
    w = math.sqrt(max(0.0, 1.0 - n2))
    x, y, z = vx, vy, vz
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _centered(a: np.ndarray, t: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``y = A (x - c) + t + c`` as a homogeneous matrix (ITK's MatrixOffsetTransformBase)."""
    n = a.shape[0]
    m = np.eye(n + 1)
    m[:n, :n] = a
    m[:n, n] = t + c - a @ c
    return m


def _linear_from_parameters(kind: str, n: int, p: np.ndarray, fixed: np.ndarray, path: PathLike) -> np.ndarray | None:
    """The matrix of an ITK linear transform type from its Parameters / FixedParameters, or None
    for a type this parser does not know (SimpleITK then reads it)."""

    def need(count: int) -> None:
        if p.size != count:
            raise InputError(f"{kind} ({n}D) needs {count} parameters, got {p.size}", path)

    c = fixed[:n] if fixed.size >= n else np.zeros(n)
    if kind in ("AffineTransform", "MatrixOffsetTransformBase"):
        need(n * n + n)
        return _centered(p[: n * n].reshape(n, n), p[n * n :], c)
    if kind == "TranslationTransform":
        need(n)
        return _centered(np.eye(n), p, np.zeros(n))
    if kind == "ScaleTransform":
        need(n)
        return _centered(np.diag(p), np.zeros(n), c)
    if n == 2 and kind in ("Euler2DTransform", "Rigid2DTransform"):
        need(3)
        return _centered(_rot2(p[0]), p[1:], c)
    if n == 2 and kind == "Similarity2DTransform":
        need(4)
        return _centered(p[0] * _rot2(p[1]), p[2:], c)
    if n == 3 and kind == "Euler3DTransform":
        need(6)
        zyx = bool(fixed.size >= 4 and fixed[3] != 0)
        return _centered(_euler3(p[0], p[1], p[2], zyx), p[3:], c)
    if n == 3 and kind == "VersorRigid3DTransform":
        need(6)
        return _centered(_versor(p[0], p[1], p[2], path), p[3:], c)
    if n == 3 and kind == "Similarity3DTransform":
        need(7)
        return _centered(p[6] * _versor(p[0], p[1], p[2], path), p[3:6], c)
    return None


# ------------------------------------------------------------------------------------------------
# ITK files
# ------------------------------------------------------------------------------------------------
_ITK_TYPE = re.compile(r"(\w+?)_(?:double|float)_(\d)_(\d)")


def _numbers(text: str, what: str, path: PathLike) -> np.ndarray:
    try:
        return np.array([float(v) for v in text.split()], dtype=np.float64)
    except ValueError as exc:
        raise InputError(f"non-numeric {what}: {exc}", path) from None


def _bspline_from_itk(n: int, p: np.ndarray, fixed: np.ndarray, path: PathLike) -> BSplinePiece:
    """ITK ``BSplineTransform`` FixedParameters ``[size, origin, spacing, direction (row-major)]``;
    Parameters: all x coefficients (first lattice axis fastest), then all y [, z]."""
    if fixed.size != 3 * n + n * n:
        raise InputError(f"BSplineTransform needs {3 * n + n * n} fixed parameters, got {fixed.size}", path)
    size = [round(v) for v in fixed[:n]]
    origin, spacing = fixed[n : 2 * n], fixed[2 * n : 3 * n]
    direction = fixed[3 * n :].reshape(n, n)
    return _bspline_piece(p, size, origin, spacing, direction, path)


def _bspline_piece(
    p: np.ndarray, size: list[int], origin: np.ndarray, spacing: np.ndarray, direction: np.ndarray, path: PathLike
) -> BSplinePiece:
    n = len(size)
    count = int(np.prod(size))
    if p.size != n * count:
        raise InputError(f"B-spline grid {size} needs {n * count} coefficients, got {p.size}", path)
    lattice = Grid.from_spacing(tuple(size), torch.tensor(spacing), torch.tensor(origin), torch.tensor(direction))
    # ITK stores each component image with the first axis varying fastest (Fortran order).
    coefficients = p.reshape(n, *size[::-1]).transpose(0, *range(n, 0, -1))
    return BSplinePiece(torch.from_numpy(np.ascontiguousarray(coefficients)), lattice)


def _itk_piece(kind_text: str, p: np.ndarray, fixed: np.ndarray, path: PathLike) -> Piece | None:
    match = _ITK_TYPE.fullmatch(kind_text)
    if match is None:
        raise InputError(f"cannot parse ITK transform type {kind_text!r}", path)
    kind, n = match.group(1), int(match.group(2))
    if n not in (2, 3):
        raise InputError(f"{kind_text} is {n}D; alignkit reads 2D and 3D transforms", path)
    if kind == "BSplineTransform":
        return _bspline_from_itk(n, p, fixed, path)
    matrix = _linear_from_parameters(kind, n, p, fixed, path)
    return None if matrix is None else LinearPiece(torch.from_numpy(matrix))


def _read_itk_text(text: str, path: Path) -> list[Piece] | None:
    """Pieces of an ITK text file, or None when it holds a type only SimpleITK knows."""
    blocks = re.split(r"^#Transform\s+\d+\s*$", text, flags=re.MULTILINE)[1:]
    entries = []
    for block in blocks:
        kind = re.search(r"^Transform:\s*(\S+)", block, flags=re.MULTILINE)
        if kind is None:
            raise InputError("ITK transform block without a 'Transform:' line", path)
        params = re.search(r"^Parameters:(.*)$", block, flags=re.MULTILINE)
        fixed = re.search(r"^FixedParameters:(.*)$", block, flags=re.MULTILINE)
        entries.append((
            kind.group(1),
            _numbers(params.group(1), "Parameters", path) if params else np.zeros(0),
            _numbers(fixed.group(1), "FixedParameters", path) if fixed else np.zeros(0),
        ))
    if not entries:
        raise InputError("ITK transform file holds no transform", path)
    if entries[0][0].startswith("CompositeTransform"):
        entries = entries[1:]
        if not entries:
            raise InputError("empty ITK CompositeTransform", path)
    elif len(entries) > 1:
        raise InputError(f"holds {len(entries)} transforms without a CompositeTransform header: their order is unknown", path)
    pieces = []
    for kind, p, fixed in entries:
        piece = _itk_piece(kind, p, fixed, path)
        if piece is None:
            return None
        pieces.append(piece)
    return pieces


def _read_itk_matlab(path: Path) -> list[Piece] | None:
    """ITK's MATLAB v4 ``.mat`` (ANTs' ``*GenericAffine.mat``): one variable named after the type
    holding the Parameters, and ``fixed`` holding the FixedParameters."""
    from scipy.io import loadmat

    try:
        data = loadmat(str(path))
    except Exception as exc:  # scipy raises ValueError / MatReadError / TypeError for non-MATLAB files
        raise InputError(f"cannot read MATLAB transform: {' '.join(str(exc).split())}", path) from exc
    kinds = [k for k in data if not k.startswith("__") and k != "fixed"]
    if len(kinds) != 1:
        raise InputError(f"expected one transform variable in the .mat file, found {kinds}", path)
    p = np.asarray(data[kinds[0]], dtype=np.float64).ravel()
    fixed = np.asarray(data.get("fixed", np.zeros(0)), dtype=np.float64).ravel()
    piece = _itk_piece(kinds[0], p, fixed, path)
    return None if piece is None else [piece]


def _sitk_pieces(path: Path) -> list[Piece]:
    """Any transform file SimpleITK reads: composites are unpacked; linear transforms become their
    matrix (found from mapped points, then checked on a further point); displacement-field and
    B-spline transforms keep their grids."""
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise InputError("this transform file needs SimpleITK: pip install alignkit[itk]", path) from exc
    try:
        tx = sitk.ReadTransform(str(path))
    except Exception as exc:  # SimpleITK raises RuntimeError with a multi-line ITK message
        lines = str(exc).splitlines()
        first = next((ln for ln in lines if "Description" in ln), lines[0] if lines else "")
        raise InputError(f"cannot read transform: {' '.join(first.split())}", path) from exc
    return _sitk_unpack(tx, sitk, path)


def _sitk_unpack(tx: Any, sitk: Any, path: Path) -> list[Piece]:
    tx = tx.Downcast() if hasattr(tx, "Downcast") else tx
    name = tx.GetName()
    n = tx.GetDimension()
    if name == "CompositeTransform":
        out: list[Piece] = []
        for i in range(tx.GetNumberOfTransforms()):
            out.extend(_sitk_unpack(tx.GetNthTransform(i), sitk, path))
        return out
    if name == "DisplacementFieldTransform":
        image = tx.GetDisplacementField()
        array = sitk.GetArrayFromImage(image)  # (z, y, x, n): reverse to ITK index order
        u = np.moveaxis(array, -1, 0).transpose(0, *range(n, 0, -1))
        grid = _sitk_grid(image, n)
        return [FieldPiece(torch.from_numpy(np.ascontiguousarray(u, dtype=np.float32)), grid, str(path))]
    if name == "BSplineTransform":
        images = tx.GetCoefficientImages()
        coefficients = np.stack([sitk.GetArrayFromImage(im).transpose(*range(n - 1, -1, -1)) for im in images])
        return [BSplinePiece(torch.from_numpy(np.ascontiguousarray(coefficients, dtype=np.float64)), _sitk_grid(images[0], n))]
    y0 = np.array(tx.TransformPoint([0.0] * n))
    m = np.eye(n + 1)
    m[:n, n] = y0
    for i in range(n):
        m[:n, i] = np.array(tx.TransformPoint(np.eye(n)[i].tolist())) - y0
    probe = np.arange(1, n + 1, dtype=np.float64) * 37.0 - 11.0
    expected = m[:n, :n] @ probe + m[:n, n]
    if not np.allclose(tx.TransformPoint(probe.tolist()), expected, atol=1e-6 * (1 + np.abs(expected).max())):
        raise InputError(f"ITK transform {name} is neither linear, a displacement field nor a B-spline", path)
    return [LinearPiece(torch.from_numpy(m))]


def _sitk_grid(image: Any, n: int) -> Grid:
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(n, n)
    return Grid.from_spacing(
        tuple(image.GetSize()), torch.tensor(image.GetSpacing()), torch.tensor(image.GetOrigin()), torch.tensor(direction)
    )


#: NIfTI intent codes FSL gives its warps (FNIRT fields and coefficients, TOPUP): 2006 ... 2018
_FSL_INTENTS = range(2006, 2019)


def _refuse_fsl_warp(path: Path) -> None:
    """FNIRT's warps are NIfTI vector images too, but in FSL's own convention: refuse them rather
    than read them as ITK fields."""
    import nibabel as nib

    try:
        code = int(nib.load(str(path)).header.get("intent_code", 0))
    except Exception as exc:
        raise InputError(f"cannot read NIfTI: {' '.join(str(exc).split())}", path) from exc
    if code in _FSL_INTENTS:
        raise InputError(f"an FSL warp (NIfTI intent {code}): FNIRT warps are not read; convert it to an ITK "
                         "displacement field first (wb_command -convert-warpfield -from-fnirt ... -to-itk ...)", path)


def read_itk_transform(path: PathLike) -> list[Piece]:
    """Pieces (stage order) of an ITK transform file: text ``.txt``/``.tfm``, MATLAB ``.mat``,
    ``.h5``, or a displacement-field image (``.nii[.gz]``, ``.mha``, ``.nrrd``)."""
    p = Path(path)
    if not p.is_file():
        raise InputError("file not found", path)
    suffix = full_suffix(p)
    if suffix in _NIFTI:
        _refuse_fsl_warp(p)
        u, grid = read_displacement_field(p)
        return [FieldPiece(u, grid, str(p))]
    if suffix in _IMAGE_FIELDS or suffix in (".h5", ".hdf5"):
        return _sitk_pieces(p)
    text = _read_text(p)
    if text is None:
        pieces = _read_itk_matlab(p)
    elif text.lstrip().startswith(_ITK_HEADER):
        pieces = _read_itk_text(text, p)
    else:
        raise InputError("not an ITK transform file (no '#Insight Transform File' header, not MATLAB)", path)
    return pieces if pieces is not None else _sitk_pieces(p)


def inverse_warp_path(path: PathLike) -> Path | None:
    """ANTs' name for the inverse of a field: ``xWarp.nii.gz`` <-> ``xInverseWarp.nii.gz`` (None
    when the name follows neither pattern)."""
    p = Path(path)
    name = p.name
    for a, b in (("InverseWarp", "Warp"), ("Warp", "InverseWarp")):
        stem, sep, rest = name.rpartition(a)
        if sep and rest.lower().startswith("."):
            return p.with_name(stem + b + rest)
    return None


# ------------------------------------------------------------------------------------------------
# Greedy
# ------------------------------------------------------------------------------------------------
def read_greedy_matrix(path: PathLike) -> list[Piece]:
    """Greedy's (and c3d_affine_tool's) RAS text matrix -> ``[LinearPiece]`` (LPS, fixed->moving);
    a displacement field (``-o warp.nii.gz``) is read as an ITK field."""
    p = Path(path)
    if not p.is_file():
        raise InputError("file not found", path)
    if full_suffix(p) in _IMAGE_FIELDS:
        return read_itk_transform(p)
    text = _read_text(p)
    m = None if text is None else _text_matrix(text)
    if m is None:
        raise InputError("not a Greedy matrix: expected 3x3 (2D) or 4x4 (3D) numbers", path)
    n = m.shape[0] - 1
    if not np.allclose(m[n], np.eye(n + 1)[n]):
        raise InputError(f"last row of the Greedy matrix is {m[n].tolist()}, not [0 ... 0 1]", path)
    return [LinearPiece(torch.from_numpy(lps_matrix_from_ras(m)))]


# ------------------------------------------------------------------------------------------------
# FSL FLIRT
# ------------------------------------------------------------------------------------------------
def fsl_from_voxel(grid: Grid) -> np.ndarray:
    """FSL's scaled-voxel coordinates of a NIfTI grid: ``diag(pixdim) @ voxel``, with the first
    axis reversed (``i -> nx - 1 - i``) when the voxel-to-world matrix has a positive determinant
    (the determinant of the RAS qform/sform has the same sign as that of the LPS matrix)."""
    if grid.ndim != 3:
        raise InputError(f"FSL matrices are 3D; the image grid is {grid.ndim}D")
    w = grid.world_from_voxel.numpy()
    out = np.diag([*grid.spacing.numpy(), 1.0])
    if np.linalg.det(w[:3, :3]) > 0:
        out[0, 0] = -out[0, 0]
        out[0, 3] = (grid.shape[0] - 1) * float(grid.spacing[0])
    return out


def read_fsl_matrix(path: PathLike, reference: Grid | None, moving: Grid | None) -> list[Piece]:
    """FLIRT's ``.mat`` (input -> reference scaled-voxel coordinates) -> ``[LinearPiece]``
    (LPS, fixed->moving); ``reference`` is FLIRT's ``-ref`` (the fixed image) and ``moving`` its
    ``-in`` image, both as read from their NIfTI files."""
    if reference is None or moving is None:
        raise InputError("an FSL FLIRT matrix needs its reference (fixed) and input (moving) images", path)
    p = Path(path)
    if not p.is_file():
        raise InputError("file not found", path)
    text = _read_text(p)
    m = None if text is None else _text_matrix(text)
    if m is None or m.shape != (4, 4):
        raise InputError("not an FSL FLIRT matrix: expected 4x4 numbers", path)
    if not np.allclose(m[3], [0, 0, 0, 1]):
        raise InputError(f"last row of the FLIRT matrix is {m[3].tolist()}, not [0 0 0 1]", path)
    w_ref, w_in = reference.world_from_voxel.numpy(), moving.world_from_voxel.numpy()
    matrix = w_in @ np.linalg.inv(fsl_from_voxel(moving)) @ np.linalg.inv(m) @ fsl_from_voxel(reference) @ np.linalg.inv(w_ref)
    return [LinearPiece(torch.from_numpy(matrix))]


# ------------------------------------------------------------------------------------------------
# elastix
# ------------------------------------------------------------------------------------------------
def parse_elastix_parameters(text: str) -> dict[str, list[str | float]]:
    """``(Key value ...)`` lines -> ``{Key: [values]}``; quoted values stay strings, others become
    floats; ``//`` comments are dropped."""
    out: dict[str, list[str | float]] = {}
    for line in text.splitlines():
        line = line.split("//", 1)[0].strip()
        match = re.fullmatch(r"\(\s*(\w+)\s*(.*?)\s*\)", line)
        if match is None:
            continue
        values: list[str | float] = []
        for quoted, bare in re.findall(r"\"([^\"]*)\"|(\S+)", match.group(2)):
            if bare:
                try:
                    values.append(float(bare))
                except ValueError:
                    values.append(bare)
            else:
                values.append(quoted)
        out[match.group(1)] = values
    return out


def _elastix_numbers(params: dict[str, list[str | float]], key: str, path: PathLike, count: int | None = None) -> np.ndarray:
    if key not in params:
        raise InputError(f"elastix parameters lack ({key} ...)", path)
    try:
        values = np.array([float(v) for v in params[key]], dtype=np.float64)
    except ValueError:
        raise InputError(f"elastix ({key} ...) is not numeric", path) from None
    if count is not None and values.size != count:
        raise InputError(f"elastix ({key} ...) needs {count} values, got {values.size}", path)
    return values


def _elastix_string(params: dict[str, list[str | float]], key: str, default: str) -> str:
    values = params.get(key)
    return str(values[0]) if values else default


def _elastix_piece(params: dict[str, list[str | float]], path: Path) -> Piece:
    kind = _elastix_string(params, "Transform", "")
    n = int(_elastix_numbers(params, "FixedImageDimension", path, 1)[0]) if "FixedImageDimension" in params else 3
    if n not in (2, 3):
        raise InputError(f"elastix transform is {n}D; alignkit reads 2D and 3D transforms", path)
    p = _elastix_numbers(params, "TransformParameters", path)
    c = _elastix_numbers(params, "CenterOfRotationPoint", path, n) if "CenterOfRotationPoint" in params else np.zeros(n)
    if kind in ("BSplineTransform", "RecursiveBSplineTransform"):
        order = int(_elastix_numbers(params, "BSplineTransformSplineOrder", path, 1)[0]) if "BSplineTransformSplineOrder" in params else 3
        if order != 3:
            raise InputError(f"elastix B-spline of order {order}; alignkit evaluates cubic (order 3) B-splines", path)
        if _elastix_string(params, "UseCyclicTransform", "false").lower() == "true":
            raise InputError("cyclic elastix B-spline transforms are not supported", path)
        size = [round(v) for v in _elastix_numbers(params, "GridSize", path, n)]
        index = _elastix_numbers(params, "GridIndex", path, n) if "GridIndex" in params else np.zeros(n)
        spacing = _elastix_numbers(params, "GridSpacing", path, n)
        origin = _elastix_numbers(params, "GridOrigin", path, n)
        # elastix writes direction cosines column by column (column a = world direction of axis a)
        direction = (
            _elastix_numbers(params, "GridDirection", path, n * n).reshape(n, n).T if "GridDirection" in params else np.eye(n)
        )
        # the coefficient image's first voxel has index GridIndex (usually 0)
        origin = origin + direction @ (spacing * index)
        return _bspline_piece(p, size, origin, spacing, direction, path)
    zero = np.zeros(0)
    if kind == "EulerTransform":
        zyx = _elastix_string(params, "ComputeZYX", "false").lower() == "true"
        matrix = _linear_from_parameters("Euler2DTransform" if n == 2 else "Euler3DTransform", n, p,
                                         np.concatenate([c, [1.0 if zyx else 0.0]]), path)
    elif kind == "SimilarityTransform":
        matrix = _linear_from_parameters(f"Similarity{n}DTransform", n, p, c, path)
    elif kind == "AffineTransform":
        matrix = _linear_from_parameters("AffineTransform", n, p, c, path)
    elif kind == "TranslationTransform":
        matrix = _linear_from_parameters("TranslationTransform", n, p, zero, path)
    else:
        raise InputError(f"elastix transform {kind!r} is not supported (Euler, Similarity, Affine, Translation, "
                         "BSpline are)", path)
    assert matrix is not None  # every name above is one the parser knows
    return LinearPiece(torch.from_numpy(matrix))


#: elastix 5 writes the first spelling; elastix 4 (and older hand-written files) the second
ELASTIX_INITIAL_KEYS = ("InitialTransformParameterFileName", "InitialTransformParametersFileName")


def _elastix_initial(params: dict[str, list[str | float]]) -> str:
    """The file an elastix transform composes onto, under either spelling, or ``NoInitialTransform``."""
    for key in ELASTIX_INITIAL_KEYS:
        if key in params:
            return _elastix_string(params, key, "NoInitialTransform")
    return "NoInitialTransform"


def read_elastix_parameters(path: PathLike) -> list[Piece]:
    """Pieces (stage order) of an elastix ``TransformParameters.N.txt``, following its
    ``InitialTransformParameterFileName`` chain (or elastix 4's ``InitialTransformParametersFileName``;
    relative names are looked up as given, then next to the file)."""
    pieces: list[Piece] = []
    seen: set[Path] = set()
    current: Path | None = Path(path)
    while current is not None:
        if not current.is_file():
            raise InputError("file not found", current)
        if current.resolve() in seen:
            raise InputError("elastix InitialTransformParameterFileName chain loops", current)
        seen.add(current.resolve())
        text = _read_text(current)
        if text is None:
            raise InputError("elastix parameter files are text", current)
        params = parse_elastix_parameters(text)
        if "Transform" not in params:
            raise InputError("no (Transform ...) entry: not an elastix transform parameter file", current)
        combine = _elastix_string(params, "HowToCombineTransforms", "Compose")
        initial = _elastix_initial(params)
        if combine != "Compose" and initial != "NoInitialTransform":
            raise InputError(f"HowToCombineTransforms {combine!r} is not supported (Compose is)", current)
        pieces.append(_elastix_piece(params, current))  # acts after its initial transform
        if initial == "NoInitialTransform":
            current = None
        else:
            given = Path(initial)
            current = given if given.is_file() or given.is_absolute() else current.parent / given.name
    return pieces


# ------------------------------------------------------------------------------------------------
# one entry point
# ------------------------------------------------------------------------------------------------
def read_foreign_transform(
    path: PathLike,
    *,
    format: TransformFormat | str = "auto",
    reference: Grid | None = None,
    moving: Grid | None = None,
) -> list[Piece]:
    """The pieces (stage order, LPS, fixed->moving; see the module docstring) of a transform file
    written by ITK, SimpleITK, ANTs, Greedy, elastix or FSL FLIRT.

    ``format`` is ``auto`` (told from the file, see :func:`detect_format`) or one of
    :data:`FORMATS`; ``fsl`` needs ``reference`` (FLIRT's ``-ref``, the fixed grid) and ``moving``
    (FLIRT's ``-in``). An alignkit folder is read by :func:`alignkit.transforms.files.read_transform`.
    """
    fmt = str(format).lower()
    if fmt not in FORMATS:
        raise InputError(f"unknown transform format {format!r}; valid: {', '.join(FORMATS)}", path)
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt in ("itk", "ants"):
        return read_itk_transform(path)
    if fmt == "greedy":
        return read_greedy_matrix(path)
    if fmt == "elastix":
        return read_elastix_parameters(path)
    if fmt == "fsl":
        return read_fsl_matrix(path, reference, moving)
    raise InputError("an alignkit transform folder is read with alignkit.transforms.files.read_transform", path)
