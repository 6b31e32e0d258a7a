"""Transform files that ITK, SimpleITK and ANTs read: linear text transforms and displacement fields.

Conventions
-----------
* Everything is in the **LPS world** and maps **fixed points to moving points** -- the direction of
  ITK transforms and of :class:`alignkit.transforms.base.Transform`. A matrix is the
  ``(ndim+1, ndim+1)`` ``moving_from_fixed`` homogeneous matrix, ``y = A x + b``.
* ITK text transforms (``#Insight Transform File V1.0``) store ``AffineTransform_double_N_N`` as
  ``Parameters: A (row-major) t`` and ``FixedParameters: c`` with ``y = A (x - c) + t + c``.
  :func:`write_itk_linear` writes ``c`` (default 0) and the matching ``t = b - c + A c``.
* A displacement field is ``u (ndim, *grid.shape)`` in world (LPS) units and component order, so
  the map is ``y = x + u(x)`` for each fixed point ``x`` of ``grid``. It is written as the NIfTI
  vector image ITK and ANTs read as a ``DisplacementFieldTransform``: array ``(X, Y, Z, 1, ndim)``
  (2D: ``(X, Y, 1, 1, 2)``), intent ``NIFTI_INTENT_VECTOR`` (1007), the grid's affine converted to
  RAS in the header, and the vector components **kept in LPS** (ITK does not flip vector
  components when it reads NIfTI; ``tests/test_io.py`` checks this against SimpleITK and ANTs).
* **ANTs composition order** (established against ANTsPy 0.6 and pinned in ``tests/test_io.py``):
  ``ants.apply_transforms(fixed, moving, transformlist=[warp, affine])`` sends each fixed point
  through the warp first, then the affine: ``y = A (x + u(x)) + b``. (ANTs "applies the last
  transform first" to the *image*; to the *points* the first listed acts first.) This is alignkit's
  ``ComposedTransform([affine, warp])`` -- the ANTs list is alignkit's stage list reversed -- and
  it is *not* ``x' = A x + b; y = x' + u(x')``.
* **RAS matrices** (PICSL Greedy and c3d_affine_tool ``.mat`` files and Greedy's in-memory matrices;
  established against Greedy's own reslicing in ``tests/test_peers_greedy.py``): the same
  fixed -> moving direction, written in RAS, so ``M_lps = F M_ras F`` with ``F = diag(-1, -1, 1[, 1])``
  (:func:`lps_matrix_from_ras`; 2D flips x and y too). Greedy's warps are ITK images and keep
  their vectors in LPS like the displacement fields above.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from alignkit.errors import InputError, ShapeError
from alignkit.io.atomic import atomic_path, full_suffix
from alignkit.io.images import lps_from_ras_affine, ras_affine_from_grid
from alignkit.spatial.grid import Grid

PathLike = str | os.PathLike[str]
NIFTI_INTENT_VECTOR = 1007
_HEADER = "#Insight Transform File V1.0"


def _as_matrix(matrix: Tensor | np.ndarray, path: PathLike) -> np.ndarray:
    m = torch.as_tensor(matrix, dtype=torch.float64).detach().cpu().numpy()
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] not in (3, 4):
        raise InputError(f"matrix must be (3, 3) or (4, 4) homogeneous, got {m.shape}", path)
    n = m.shape[0] - 1
    if not np.isfinite(m).all():
        raise InputError("matrix holds NaN or Inf", path)
    if not np.allclose(m[n], np.eye(n + 1)[n]):
        raise InputError("matrix is projective (last row is not [0 ... 0 1]); ITK affine files cannot hold it", path)
    return m


def write_itk_linear(path: PathLike, matrix: Tensor | np.ndarray, *, center: Tensor | np.ndarray | None = None) -> None:
    """Write a ``moving_from_fixed`` LPS matrix as an ITK text ``AffineTransform_double_N_N``
    (``.txt``/``.tfm``; ``.mat`` goes through SimpleITK), atomically. ``center`` sets the
    FixedParameters (rotation centre; the mapping is the same whatever its value)."""
    m = _as_matrix(matrix, path)
    n = m.shape[0] - 1
    a, b = m[:n, :n], m[:n, n]
    c = np.zeros(n) if center is None else np.asarray(torch.as_tensor(center, dtype=torch.float64).cpu(), dtype=np.float64)
    if c.shape != (n,):
        raise InputError(f"center must have {n} components, got shape {c.shape}", path)
    t = b - c + a @ c
    suffix = full_suffix(path)
    if suffix == ".mat":
        sitk = _import_sitk(path)
        tx = sitk.AffineTransform(n)
        tx.SetMatrix(a.ravel().tolist())
        tx.SetTranslation(t.tolist())
        tx.SetCenter(c.tolist())
        with atomic_path(path) as tmp:
            sitk.WriteTransform(tx, str(tmp))
        return
    if suffix not in (".txt", ".tfm"):
        raise InputError(f"unsupported transform suffix {suffix!r}; use .txt, .tfm or .mat", path)
    fmt = lambda v: " ".join(repr(float(x)) for x in v)
    text = (
        f"{_HEADER}\n#Transform 0\nTransform: AffineTransform_double_{n}_{n}\n"
        f"Parameters: {fmt(np.concatenate([a.ravel(), t]))}\nFixedParameters: {fmt(c)}\n"
    )
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="ascii")


def lps_matrix_from_ras(matrix: Tensor | np.ndarray) -> np.ndarray:
    """A ``moving_from_fixed`` homogeneous matrix written in RAS (Greedy, c3d) -> the same map in LPS.

    ``F M F`` with ``F = diag(-1, -1, 1[, 1])``: the conversion is its own inverse, so it also turns
    an LPS matrix into the RAS one those tools read. 2D matrices ``(3, 3)`` flip both axes.
    """
    m = np.asarray(torch.as_tensor(matrix, dtype=torch.float64).detach().cpu().numpy())
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] not in (3, 4):
        raise ShapeError(f"expected a (3, 3) or (4, 4) homogeneous matrix, got {m.shape}")
    flip = np.ones(m.shape[0])
    flip[:2] = -1.0
    return flip[:, None] * m * flip[None, :]


def _import_sitk(path: PathLike) -> Any:
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise InputError("this transform file needs SimpleITK: pip install alignkit[itk]", path) from exc
    return sitk


def _parse_text_linear(text: str, path: PathLike) -> np.ndarray:
    """Parse an ITK text file holding one Affine / MatrixOffsetTransformBase / Translation transform."""
    kinds = re.findall(r"^Transform:\s*(\S+)", text, flags=re.MULTILINE)
    params = re.findall(r"^Parameters:(.*)$", text, flags=re.MULTILINE)
    fixed = re.findall(r"^FixedParameters:(.*)$", text, flags=re.MULTILINE)
    kinds = [k for k in kinds if not k.startswith("CompositeTransform")]
    if len(kinds) != 1 or len(params) != 1:
        raise InputError(f"expected one linear transform, found {len(kinds)}", path)
    match = re.fullmatch(r"(\w+?)_(?:double|float)_(\d)_(\d)", kinds[0])
    if match is None:
        raise InputError(f"cannot parse transform type {kinds[0]!r}", path)
    kind, n = match.group(1), int(match.group(2))
    try:
        p = np.array([float(v) for v in params[0].split()])
        c = np.array([float(v) for v in fixed[0].split()]) if fixed else np.zeros(0)
    except ValueError as exc:
        raise InputError(f"non-numeric parameters: {exc}", path) from exc
    m = np.eye(n + 1)
    if kind in ("AffineTransform", "MatrixOffsetTransformBase"):
        if p.size != n * n + n:
            raise InputError(f"{kinds[0]} needs {n * n + n} parameters, got {p.size}", path)
        a, t = p[: n * n].reshape(n, n), p[n * n :]
        c = c if c.size == n else np.zeros(n)
        m[:n, :n] = a
        m[:n, n] = t + c - a @ c
    elif kind == "TranslationTransform":
        if p.size != n:
            raise InputError(f"{kinds[0]} needs {n} parameters, got {p.size}", path)
        m[:n, n] = p
    else:
        raise InputError(f"{kinds[0]} needs SimpleITK to be read: pip install alignkit[itk]", path)
    return m


def read_itk_linear(path: PathLike) -> Tensor:
    """Read a linear ITK transform file -> ``(ndim+1, ndim+1)`` float64 ``moving_from_fixed`` (LPS).

    Through SimpleITK (when installed) any linear type is accepted (Affine, MatrixOffsetTransformBase,
    Euler, VersorRigid, Similarity, Scale, Translation, and a composite of them, ``.txt``/``.tfm``/
    ``.mat``): the matrix is recovered from mapped points and checked to be affine. Without
    SimpleITK, text files with Affine / MatrixOffsetTransformBase / Translation transforms are parsed.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError("file not found", path)
    try:
        import SimpleITK as sitk
    except ImportError:
        if full_suffix(p) == ".mat":
            raise InputError("binary .mat transforms need SimpleITK: pip install alignkit[itk]", path) from None
        try:
            text = p.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read transform file: {type(exc).__name__}", path) from exc
        return torch.from_numpy(_parse_text_linear(text, path))
    try:
        tx = sitk.ReadTransform(str(p))
    except Exception as exc:  # SimpleITK raises RuntimeError with a multi-line ITK message
        first = next((ln for ln in str(exc).splitlines() if "Description" in ln), str(exc).splitlines()[0] if str(exc) else "")
        raise InputError(f"cannot read transform: {' '.join(first.split())}", path) from exc
    n = tx.GetDimension()
    origin = np.zeros(n)
    y0 = np.array(tx.TransformPoint(origin.tolist()))
    m = np.eye(n + 1)
    m[:n, n] = y0
    for i in range(n):
        e = np.zeros(n)
        e[i] = 1.0
        m[:n, i] = np.array(tx.TransformPoint(e.tolist())) - y0
    probe = np.arange(1, n + 1, dtype=np.float64) * 37.0 - 11.0
    expected = m[:n, :n] @ probe + m[:n, n]
    if not np.allclose(np.array(tx.TransformPoint(probe.tolist())), expected, atol=1e-6 * (1 + np.abs(expected).max())):
        raise InputError(f"transform {tx.GetName()} is not linear", path)
    return torch.from_numpy(m)


# ------------------------------------------------------------------------------------------------
# displacement fields
# ------------------------------------------------------------------------------------------------
def write_displacement_field(path: PathLike, displacement: Tensor | np.ndarray, grid: Grid) -> None:
    """Write ``displacement (ndim, *grid.shape)`` (or ``(1, ndim, *grid.shape)``), world LPS units,
    as an ITK/ANTs displacement-field NIfTI (see the module docstring), atomically, with nibabel."""
    import nibabel as nib

    if full_suffix(path) not in (".nii", ".nii.gz"):
        raise InputError("displacement fields are written as NIfTI (.nii or .nii.gz)", path)
    u = torch.as_tensor(displacement).detach().cpu().to(torch.float64).numpy()
    if u.ndim == grid.ndim + 2 and u.shape[0] == 1:
        u = u[0]
    if u.shape != (grid.ndim, *grid.shape):
        raise InputError(f"displacement must be {(grid.ndim, *grid.shape)}, got {u.shape}", path)
    if not np.isfinite(u).all():
        raise InputError("displacement holds NaN or Inf", path)
    array = np.moveaxis(u, 0, -1).astype(np.float32)  # (*spatial, ndim)
    if grid.ndim == 2:
        array = array[:, :, None, :]
    array = array[:, :, :, None, :]  # (X, Y, Z, 1, ndim)
    affine = ras_affine_from_grid(grid)
    img = nib.Nifti1Image(array, affine)
    img.header.set_intent("vector", (), "")
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def read_displacement_field(path: PathLike) -> tuple[Tensor, Grid]:
    """Read an ITK/ANTs displacement-field NIfTI -> ``(u (ndim, *shape) float32 world LPS, grid)``.

    Accepts ``(X, Y, Z, 1, C)`` (the standard layout) and ``(X, Y, Z, C)``; the field is 2D when
    ``Z == 1`` and ``C == 2``. Components are LPS as stored (ITK's convention).
    """
    import nibabel as nib

    p = Path(path)
    if not p.is_file():
        raise InputError("file not found", path)
    try:
        img: Any = nib.load(str(p))
        data = np.asarray(img.get_fdata(dtype=np.float32))
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:
        raise InputError(f"cannot read NIfTI: {' '.join(str(exc).split())}", path) from exc
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    if data.ndim != 4 or data.shape[3] not in (2, 3):
        raise InputError(f"not a displacement field: shape {img.shape}, expected (X, Y, Z, 1, ndim)", path)
    ndim = data.shape[3]
    if ndim == 2:
        if data.shape[2] != 1:
            raise InputError(f"2-component field must have Z == 1, got shape {img.shape}", path)
        data = data[:, :, 0, :]
    if min(data.shape) < 1:
        raise InputError(f"field has zero size {img.shape}", path)
    grid = Grid(data.shape[:ndim], torch.from_numpy(lps_from_ras_affine(affine, ndim)))
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(data, -1, 0))), grid
