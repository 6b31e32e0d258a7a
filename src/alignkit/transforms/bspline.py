"""Cubic B-spline free-form deformation (Rueckert et al. 1999; NiftyReg / elastix "BSpline").

Convention
----------
The coefficients ``(1, ndim, *control_grid.shape)`` are world-unit displacement vectors (world
component order), one per control point. The control lattice is itself a :class:`Grid`: control
point ``k`` sits at evaluation-voxel position ``(k - 1) * spacing`` along each axis, so the lattice
starts one control spacing before the first voxel and ends at least one after the last, which is
what a cubic spline needs to be complete (partition of unity) on the whole image.

The displacement at voxel ``x`` is ``sum_k c_k prod_a B3(u_a(x) - k_a)`` with ``u`` the lattice
coordinate of ``x`` and ``B3`` the cubic B-spline kernel (:func:`alignkit.spatial.bspline.cubic_bspline`,
the one kernel alignkit has). It is evaluated separably with one exact
``(n_a, K_a)`` basis matrix per axis, so the cost is ``sum_a K_a`` per output voxel, never a
``4^ndim`` stencil or a dense nD convolution.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError, ShapeError
from alignkit.spatial.bspline import cubic_bspline, cubic_bspline_taps
from alignkit.spatial.grid import Grid
from alignkit.spatial.points import apply_matrix
from alignkit.transforms.base import FieldTransform, Transform


def control_grid_for(grid: Grid, control_spacing: float | Sequence[float]) -> Grid:
    """The control lattice covering ``grid`` with ``control_spacing`` voxels (per axis or shared)."""
    ndim = grid.ndim
    spacing = (
        [float(control_spacing)] * ndim
        if isinstance(control_spacing, (int, float))
        else [float(s) for s in control_spacing]
    )
    if len(spacing) != ndim or min(spacing) <= 0:
        raise ConfigError(
            f"control_spacing must be one positive value or {ndim} of them, got {control_spacing}"
        )
    shape = [math.ceil((n - 1) / s - 1e-9) + 3 if n > 1 else 1 for n, s in zip(grid.shape, spacing)]
    voxel_from_index = torch.eye(ndim + 1, dtype=torch.float64)
    for a, s in enumerate(spacing):
        if grid.shape[a] > 1:
            voxel_from_index[a, a] = s
            voxel_from_index[a, ndim] = -s
    return Grid(tuple(shape), grid.world_from_voxel @ voxel_from_index)


def basis_matrices(
    grid: Grid, control_grid: Grid, *, dtype: torch.dtype, device: torch.device | None
) -> list[Tensor]:
    """Per array axis ``a``, the ``(grid.shape[a], control_grid.shape[a])`` B-spline weights.

    Requires the lattice axes to be parallel to ``grid``'s (true for the lattice built on any grid
    with the same orientation, e.g. any ``resized`` version of it).
    """
    ndim = grid.ndim
    index_from_voxel = control_grid.voxel_from_world @ grid.world_from_voxel
    lin = index_from_voxel[:ndim, :ndim]
    if not torch.allclose(lin, torch.diag(torch.diagonal(lin)), atol=1e-6 * float(lin.abs().max())):
        raise ConfigError("B-spline control lattice is not axis-aligned with the evaluation grid")
    out = []
    for a in range(ndim):
        x = torch.arange(grid.shape[a], dtype=torch.float64)
        u = lin[a, a] * x + index_from_voxel[a, ndim]
        if control_grid.shape[a] == 1:
            # A single control point along a degenerate axis (size-1 image axis): weight 1.
            w = torch.ones(grid.shape[a], 1, dtype=torch.float64)
        else:
            k = torch.arange(control_grid.shape[a], dtype=torch.float64)
            w = cubic_bspline(u[:, None] - k[None, :])
        out.append(w.to(dtype=dtype, device=device))
    return out


class BSplineFFD(FieldTransform):
    """Cubic B-spline FFD evaluated on ``grid``; parameter ``coefficients`` ``(1, ndim, *ctrl)``.

    ``control_spacing`` is in voxels of ``grid`` (per axis or shared); ``control_grid`` (used by
    :meth:`resampled`) gives the lattice explicitly instead.
    """

    kind = "bspline"

    def __init__(
        self,
        grid: Grid,
        *,
        control_spacing: float | Sequence[float] = 8.0,
        control_grid: Grid | None = None,
    ) -> None:
        super().__init__(grid)
        if control_grid is None:
            control_grid = control_grid_for(grid, control_spacing)
        elif control_grid.ndim != grid.ndim:
            raise ShapeError(f"control grid is {control_grid.ndim}D, evaluation grid {grid.ndim}D")
        self.control_grid = control_grid
        # Checked now so that a misaligned lattice fails at construction, not mid-optimisation.
        basis_matrices(grid, control_grid, dtype=torch.float64, device=None)
        self.coefficients = nn.Parameter(
            torch.zeros(1, grid.ndim, *control_grid.shape, dtype=torch.get_default_dtype())
        )

    def displacement(self) -> Tensor:
        """World displacement on ``self.grid``, separable evaluation (one matmul per axis)."""
        out: Tensor = self.coefficients
        bases = basis_matrices(self.grid, self.control_grid, dtype=out.dtype, device=out.device)
        for a, w in enumerate(bases):
            out = torch.movedim(torch.movedim(out, 2 + a, -1) @ w.t(), -1, 2 + a)
        return out

    def regularizer_field(self) -> tuple[Tensor, Grid]:
        return self.coefficients, self.control_grid

    def resampled(self, grid: Grid) -> BSplineFFD:
        """The same spline (same lattice and coefficients in world space) evaluated on ``grid``."""
        out = BSplineFFD(grid, control_grid=self.control_grid).to(
            self.coefficients.device, self.coefficients.dtype
        )
        with torch.no_grad():
            out.coefficients.copy_(self.coefficients.detach())
        return out

    def extra_repr(self) -> str:
        return f"grid={self.grid!r}, control_shape={self.control_grid.shape}"


class ControlPointBSpline(Transform):
    """A cubic B-spline displacement on any control lattice, evaluated exactly at each point: ITK's
    ``BSplineTransform`` (and elastix's), which :class:`BSplineFFD` can only approximate when the
    lattice is not aligned with the evaluation grid.

    ``y = x + sum_k c_k B3(t - k)`` with ``t = lattice.voxel_from_world @ x`` and ``c``
    ``(1, ndim, *lattice.shape)`` world displacement vectors (parameter ``coefficients``). As in ITK,
    a point whose four knots per axis do not all lie on the lattice (``t`` outside ``[1, n - 2)`` on
    some axis) is not moved. Costs ``4^ndim`` gathers per point.
    """

    kind = "bspline"

    def __init__(self, lattice: Grid, coefficients: Tensor | None = None) -> None:
        super().__init__(lattice.ndim)
        if min(lattice.shape) < 4:
            raise ShapeError(f"a cubic B-spline lattice needs at least 4 knots per axis, got {lattice.shape}")
        self.lattice = lattice
        shape = (1, lattice.ndim, *lattice.shape)
        if coefficients is None:
            coefficients = torch.zeros(shape, dtype=torch.get_default_dtype())
        coefficients = torch.as_tensor(coefficients)
        if coefficients.dim() == lattice.ndim + 1:
            coefficients = coefficients.unsqueeze(0)
        if tuple(coefficients.shape) != shape:
            raise ShapeError(f"coefficients must be {shape} for {lattice!r}, got {tuple(coefficients.shape)}")
        self.coefficients = nn.Parameter(coefficients.detach().clone())

    def transform_points(self, world: Tensor) -> Tensor:
        n = self.ndim
        if world.dim() < 3 or world.shape[1] != n:
            raise ShapeError(f"expected points (B, {n}, *S) or (B, {n}, N), got {tuple(world.shape)}")
        flat = world.reshape(world.shape[0], n, -1)
        coefficients = self.coefficients.to(world.dtype)
        # knots in float64: a float32 world coordinate of a large field of view loses the fraction
        t = apply_matrix(self.lattice.voxel_from_world.to(world.device), flat.double())
        first, weights, _ = cubic_bspline_taps(t)  # (B, n, N), (B, n, N, 4)
        weights = weights.to(world.dtype)
        size = torch.tensor(self.lattice.shape, device=world.device).view(1, n, 1)
        inside = ((first >= 0) & (first + 3 <= size - 1)).all(dim=1)  # (B, N): ITK's valid region
        flat_coefficients = coefficients.reshape(n, -1)  # (n, prod(shape)), last lattice axis fastest
        strides = [int(math.prod(self.lattice.shape[a + 1 :])) for a in range(n)]
        out = torch.zeros_like(flat)
        for offsets in itertools.product(range(4), repeat=n):
            index = torch.zeros_like(first[:, 0])
            weight = torch.ones_like(flat[:, 0])
            for a, o in enumerate(offsets):
                index = index + (first[:, a] + o).clamp(0, self.lattice.shape[a] - 1) * strides[a]
                weight = weight * weights[:, a, :, o]
            out = out + weight.unsqueeze(1) * flat_coefficients[:, index].movedim(0, 1)
        out = torch.where(inside.unsqueeze(1), out, torch.zeros_like(out))
        return (flat + out).reshape(world.shape)

    def extra_repr(self) -> str:
        return f"lattice={self.lattice!r}"
