"""Regularisers of transformations: every one is an ``nn.Module`` returning a scalar to minimise.

Convention
----------
Field regularisers take ``forward(field, spacing=None)`` with ``field (B, ndim, *S)`` -- a
displacement (or velocity) in **world units**, components in world order ``(x, y[, z])`` -- and
``spacing``, the world size of a voxel along each *array* axis (``Grid.spacing``; a tensor, a
sequence of floats, one float, or None for 1). Derivatives are finite differences along the array
axes divided by the spacing, so values are in world units. The energies are Frobenius norms
(of the Jacobian or Hessian of the field) or traces, which do not change under a rotation of the
axes: any orthonormal grid direction gives the same value as the axis-aligned grid.

Each difference stencil is evaluated **only where it fits inside the grid** (no padding): the
result is the mean over the voxels where the stencil is defined, summed over the terms. Forward
differences are used (not central ones) so that a checkerboard field is penalised. For a field
that is polynomial of the stencil's order (linear for first, quadratic for second derivatives)
the discrete values equal the analytic ones exactly, borders included.

The batch mean is taken last. :class:`JacobianFoldPenalty`, :class:`InverseConsistency`,
:class:`AffinePrior` and :class:`AffineInverseConsistency` take other inputs (documented there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError, ShapeError
from alignkit.losses.similarity import build_loss
from alignkit.spatial.grid import Grid
from alignkit.spatial.jacobian import jacobian_determinant
from alignkit.spatial.points import sample_world
from alignkit.transforms.base import Transform

RegularizerName = Literal[
    "diffusion",
    "bending",
    "laplacian",
    "tv",
    "jacobian-fold",
    "inverse-consistency",
    "affine",
    "affine-inverse-consistency",
]
#: the regularisers that take ``(field, spacing)`` alone: what an iterative solver can call on its
#: model's field (the others need a grid, a reverse map or a matrix)
FieldRegularizerName = Literal["diffusion", "bending", "laplacian", "tv"]
Spacing = Tensor | Sequence[float] | float | None


# -- helpers ----------------------------------------------------------------------------------
def _check_field(field: Tensor, min_size: int) -> int:
    """Validate ``field (B, ndim, *S)``; return ndim."""
    ndim = field.dim() - 2
    if ndim not in (2, 3) or field.shape[1] != ndim:
        raise ShapeError(
            f"a field must be (B, ndim, *spatial) with ndim = 2 or 3 components, got {tuple(field.shape)}"
        )
    if min(field.shape[2:]) < min_size:
        raise ShapeError(
            f"this regulariser needs at least {min_size} voxels per axis, got spatial {tuple(field.shape[2:])}"
        )
    return ndim


def _spacing(spacing: Spacing, ndim: int) -> list[float]:
    """Per-array-axis voxel size as Python floats (spacing is data, never differentiated)."""
    if spacing is None:
        return [1.0] * ndim
    if isinstance(spacing, Tensor):
        values = [float(v) for v in spacing.detach().flatten().tolist()]
    elif isinstance(spacing, (int, float)):
        values = [float(spacing)]
    else:
        values = [float(v) for v in spacing]
    if len(values) == 1:
        values = values * ndim
    if len(values) != ndim or min(values) <= 0:
        raise ShapeError(f"spacing must be one positive value or {ndim} positive values, got {values}")
    return values


def _diff(x: Tensor, axis: int) -> Tensor:
    """Forward difference ``x[i + 1] - x[i]`` along spatial ``axis`` (output one shorter)."""
    dim = 2 + axis
    n = x.shape[dim]
    return x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)


def _crop(x: Tensor, sizes: Sequence[int], offsets: Sequence[int]) -> Tensor:
    """``x`` restricted to ``sizes`` voxels starting at ``offsets`` along each spatial axis."""
    for axis, (size, start) in enumerate(zip(sizes, offsets)):
        x = x.narrow(2 + axis, start, size)
    return x


def _energy(x: Tensor) -> Tensor:
    """Mean over batch and voxels of the squared norm over components ``(B, C, *S)``."""
    return (x * x).sum(dim=1).mean()


# -- field regularisers -----------------------------------------------------------------------
class Diffusion(nn.Module):
    """Diffusion (membrane) energy: mean over voxels of ``||grad u||_F^2`` (sum over components
    and axes of squared first derivatives). A linear field ``u_x = a * x`` gives ``a^2``."""

    def forward(self, field: Tensor, spacing: Spacing = None) -> Tensor:
        ndim = _check_field(field, 2)
        h = _spacing(spacing, ndim)
        return sum((_energy(_diff(field, a) / h[a]) for a in range(ndim)), field.new_zeros(()))


class BendingEnergy(nn.Module):
    """Bending (thin-plate) energy: mean of ``sum_c ||Hessian u_c||_F^2`` =
    ``sum_a (d2u/dx_a^2)^2 + 2 sum_{a<b} (d2u/dx_a dx_b)^2``.

    Pure terms use the centred stencil ``u[i+1] - 2u[i] + u[i-1]`` (interior along that axis),
    mixed terms the forward stencil ``u[i+1,j+1] - u[i+1,j] - u[i,j+1] + u[i,j]``; each term is
    averaged over the voxels where its stencil fits. Exact for quadratic fields.
    """

    def forward(self, field: Tensor, spacing: Spacing = None) -> Tensor:
        ndim = _check_field(field, 3)
        h = _spacing(spacing, ndim)
        total = field.new_zeros(())
        for a in range(ndim):
            total = total + _energy(_diff(_diff(field, a), a) / h[a] ** 2)
            for b in range(a + 1, ndim):
                total = total + 2.0 * _energy(_diff(_diff(field, a), b) / (h[a] * h[b]))
        return total


class Laplacian(nn.Module):
    """Zampieri et al. 2018 eq. 4: mean over voxels of ``||Laplacian u||^2`` (sum over components), which
    vanishes only for affine-like (harmonic) fields. The 5-point (2D) / 7-point (3D) stencil is
    evaluated on interior voxels; with unit spacing in 2D it is 4x the deviation of ``u`` from the
    average of its 4 neighbours, the paper's discrete form."""

    def forward(self, field: Tensor, spacing: Spacing = None) -> Tensor:
        ndim = _check_field(field, 3)
        h = _spacing(spacing, ndim)
        interior = [s - 2 for s in field.shape[2:]]
        lap = field.new_zeros(())
        for a in range(ndim):
            second = _diff(_diff(field, a), a) / h[a] ** 2  # already interior along axis a
            offsets = [0 if b == a else 1 for b in range(ndim)]
            lap = lap + _crop(second, interior, offsets)
        return _energy(lap)


class TotalVariation(nn.Module):
    """Isotropic (vectorial) total variation: mean over voxels of
    ``sqrt(||grad u||_F^2 + eps^2) - eps`` with forward differences on the voxels where every
    axis has one. Subtracting ``eps`` keeps a constant field at exactly 0; ``eps`` (world units per
    world unit) makes it differentiable there. A linear field ``u_x = a * x`` gives ``~|a|``."""

    def __init__(self, *, eps: float = 1e-6) -> None:
        super().__init__()
        if eps <= 0:
            raise ConfigError(f"TotalVariation eps must be > 0, got {eps}")
        self.eps = float(eps)

    def forward(self, field: Tensor, spacing: Spacing = None) -> Tensor:
        ndim = _check_field(field, 2)
        h = _spacing(spacing, ndim)
        common = [s - 1 for s in field.shape[2:]]
        squared = field.new_zeros(())
        for a in range(ndim):
            d = _crop(_diff(field, a) / h[a], common, [0] * ndim)
            squared = squared + (d * d).sum(dim=1)
        return (torch.sqrt(squared + self.eps**2) - self.eps).mean()


class JacobianFoldPenalty(nn.Module):
    """Mean over voxels of ``relu(eps - det J)`` of the map ``id + u`` on ``grid``
    (:func:`alignkit.spatial.jacobian_determinant`, world units). With the default ``eps = 0``
    only folding (negative determinant) is penalised; ``eps > 0`` also pushes towards
    ``det J >= eps`` (a margin away from singularity)."""

    def __init__(self, *, eps: float = 0.0) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, displacement: Tensor, grid: Grid) -> Tensor:
        _check_field(displacement, 2)
        if tuple(displacement.shape[2:]) != grid.shape or displacement.shape[1] != grid.ndim:
            raise ShapeError(f"displacement {tuple(displacement.shape)} does not live on {grid}")
        identity = grid.world_points(dtype=displacement.dtype, device=displacement.device)
        det = jacobian_determinant(identity + displacement, grid)
        return torch.relu(self.eps - det).mean()


# -- inverse consistency ----------------------------------------------------------------------
MapLike = Tensor | Transform


def _apply(t: MapLike, grid: Grid, points: Tensor) -> Tensor:
    """Map world points ``(B, ndim, *S)`` through a Transform, or through ``id + u`` for a
    displacement tensor ``u`` on ``grid`` (trilinear, border values outside the grid -- the
    :class:`FieldTransform` convention)."""
    if isinstance(t, Transform):
        return t.transform_points(points)
    if tuple(t.shape[2:]) != grid.shape or t.shape[1] != grid.ndim:
        raise ShapeError(f"displacement {tuple(t.shape)} does not live on {grid}")
    batch = max(t.shape[0], points.shape[0])
    points = points.expand(batch, *points.shape[1:])
    return points + sample_world(t.expand(batch, *t.shape[1:]), grid, points, padding="border")


def _dtype_device(*items: MapLike) -> tuple[torch.dtype, torch.device]:
    for item in items:
        if isinstance(item, Tensor):
            return item.dtype, item.device
    for item in items:
        param = next(iter(item.parameters()), None)  # type: ignore[union-attr]
        if param is not None:
            return param.dtype, param.device
    return torch.float32, torch.device("cpu")


class InverseConsistency(nn.Module):
    """Inverse-consistency (symmetry) penalty of Shen et al. 2019 eq. 10 (eq. 5 is its affine case, see
    :class:`AffineInverseConsistency`).

    ``forward(phi, psi, grid, moving_grid=None)``: ``phi`` maps fixed-world to moving-world
    points (the registration fixed <- moving, the :class:`Transform` direction) and ``psi`` the
    reverse registration (moving-world to fixed-world). Each is a :class:`Transform` (composed
    point-wise, no resampling) or a displacement tensor ``(B, ndim, *S)`` in world units --
    ``phi``'s on ``grid`` (fixed), ``psi``'s on ``moving_grid`` (defaults to ``grid``; AVSM
    registers both images on one grid), interpolated linearly where it is composed.

    Returns the mean over ``grid`` of ``||psi(phi(x)) - x||^2`` (like eq. 5,
    ``A_ts(Ax + b) + b_ts = x``), plus, when ``symmetric`` (default), the mean over
    ``moving_grid`` of ``||phi(psi(y)) - y||^2``. Zero for an exact inverse pair.
    """

    def __init__(self, *, symmetric: bool = True) -> None:
        super().__init__()
        self.symmetric = bool(symmetric)

    def forward(self, phi: MapLike, psi: MapLike, grid: Grid, moving_grid: Grid | None = None) -> Tensor:
        moving_grid = grid if moving_grid is None else moving_grid
        dtype, device = _dtype_device(phi, psi)
        x = grid.world_points(dtype=dtype, device=device)
        loss = _energy(_apply(psi, moving_grid, _apply(phi, grid, x)) - x)
        if self.symmetric:
            y = moving_grid.world_points(dtype=dtype, device=device)
            loss = loss + _energy(_apply(phi, grid, _apply(psi, moving_grid, y)) - y)
        return loss


# -- affine -----------------------------------------------------------------------------------
def _affine_deviation(matrix: Tensor, center: Tensor | None, translation_scale: float) -> Tensor:
    """``||A - I||_F^2 + ||b / scale||^2`` for homogeneous ``(…, n+1, n+1)`` matrices, with ``b``
    re-expressed about ``center`` when given (``b_c = A c + b - c``: the shift of the centre)."""
    if matrix.dim() not in (2, 3) or matrix.shape[-1] != matrix.shape[-2] or matrix.shape[-1] not in (3, 4):
        raise ShapeError(
            f"expected a (ndim+1, ndim+1) or (B, ndim+1, ndim+1) matrix, got {tuple(matrix.shape)}"
        )
    matrix = matrix if matrix.dim() == 3 else matrix.unsqueeze(0)
    ndim = matrix.shape[-1] - 1
    linear, shift = matrix[:, :ndim, :ndim], matrix[:, :ndim, ndim]
    if center is not None:
        c = torch.as_tensor(center, dtype=matrix.dtype, device=matrix.device).reshape(ndim)
        shift = shift + linear @ c - c
    eye = torch.eye(ndim, dtype=matrix.dtype, device=matrix.device)
    dev = ((linear - eye) ** 2).sum(dim=(-1, -2)) + ((shift / translation_scale) ** 2).sum(dim=-1)
    return dev.mean()


class AffinePrior(nn.Module):
    """Shen et al. 2019 eq. 4: ``||A - I||_F^2 + ||b||_2^2`` for a moving-from-fixed homogeneous matrix
    ``(ndim+1, ndim+1)`` or a batch ``(B, ndim+1, ndim+1)`` (batch mean). The paper weighs both
    parts 1:1 in coordinates normalised to the image size; in world units divide ``b`` by
    ``translation_scale`` (e.g. the image extent in mm) to recover that balance. ``center``
    (world point, e.g. ``grid.center_world()``) measures the translation at the image centre
    instead of at the world origin, so a pure rotation about the centre costs no translation.
    Zero at the identity. The paper's epoch-dependent weight ``lambda_ar`` is the caller's."""

    def __init__(self, *, translation_scale: float = 1.0) -> None:
        super().__init__()
        if translation_scale <= 0:
            raise ConfigError(f"translation_scale must be > 0, got {translation_scale}")
        self.translation_scale = float(translation_scale)

    def forward(self, matrix: Tensor, center: Tensor | None = None) -> Tensor:
        return _affine_deviation(matrix, center, self.translation_scale)


class AffineInverseConsistency(nn.Module):
    """Shen et al. 2019 eq. 5: ``||A_ts A - I||_F^2 + ||A_ts b + b_ts||^2`` for the forward matrix
    ``(A, b)`` and the reverse registration's ``(A_ts, b_ts)`` -- i.e. :class:`AffinePrior` of
    ``matrix_ts @ matrix`` (same ``translation_scale`` and ``center`` options). Zero when the two
    are exact inverses."""

    def __init__(self, *, translation_scale: float = 1.0) -> None:
        super().__init__()
        if translation_scale <= 0:
            raise ConfigError(f"translation_scale must be > 0, got {translation_scale}")
        self.translation_scale = float(translation_scale)

    def forward(self, matrix: Tensor, matrix_ts: Tensor, center: Tensor | None = None) -> Tensor:
        if matrix.shape[-2:] != matrix_ts.shape[-2:]:
            raise ShapeError(f"matrices {tuple(matrix.shape)} and {tuple(matrix_ts.shape)} differ")
        return _affine_deviation(matrix_ts @ matrix, center, self.translation_scale)


# -- registry ---------------------------------------------------------------------------------
_REGULARIZERS: dict[str, type[nn.Module]] = {
    "diffusion": Diffusion,
    "bending": BendingEnergy,
    "laplacian": Laplacian,
    "tv": TotalVariation,
    "jacobian-fold": JacobianFoldPenalty,
    "inverse-consistency": InverseConsistency,
    "affine": AffinePrior,
    "affine-inverse-consistency": AffineInverseConsistency,
}


def build_regularizer(name: RegularizerName | str, **options: object) -> nn.Module:
    """Build a regulariser by name (see :data:`RegularizerName`) with keyword options.

    An unknown name or option raises a one-line :class:`ConfigError` naming it and the choices."""
    key = str(name).lower()
    if key not in _REGULARIZERS:
        raise ConfigError(
            f"unknown regularizer {name!r}; valid names: {', '.join(get_args(RegularizerName))}"
        )
    return build_loss(_REGULARIZERS[key], f"regularizer {key!r}", options)
