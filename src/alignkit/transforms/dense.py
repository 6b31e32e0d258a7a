"""Dense (non-parametric) transform models: displacement field, SVF and vector-momentum SVF.

Convention
----------
Each model stores a field ``(1, ndim, *grid.shape)`` on its own :class:`~alignkit.spatial.Grid`,
in **world units and world component order** ``(x, y[, z])``, like every field in alignkit. Its map
is ``x -> x + displacement(x)`` with the displacement interpolated linearly on the grid (border
values outside it, see :class:`~alignkit.transforms.base.FieldTransform`). Parameters start at zero
(the identity transform).

Velocity models integrate internally in the *voxel frame* of their grid (vectors ``L^-1 v`` with
``L`` the linear part of ``world_from_voxel``), which saves a matrix product per sampling step;
inputs and outputs are world-unit fields.

Inverses of the velocity models are *live views*: ``svf.inverse()`` holds ``svf`` as a registered
sub-module and negates its **current** velocity at every call, so it stays correct while ``svf``
is optimised further or its parameter is replaced, and gradients flow back into ``svf``. For a
frozen inverse, take ``copy.deepcopy(svf).inverse()`` (or ``.requires_grad_(False)`` on the copy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError, ShapeError
from alignkit.spatial.filters import gaussian_blur
from alignkit.spatial.frames import voxel_to_world_vectors, world_to_voxel_vectors
from alignkit.spatial.grid import Grid
from alignkit.spatial.jacobian import spatial_gradient
from alignkit.spatial.points import resize_field, sample_voxels, sample_world
from alignkit.transforms.base import FieldTransform, Transform

#: vSVF multi-Gaussian kernel of Shen et al. ("Networks for Joint Affine and Non-parametric Image
#: Registration", CVPR 2019, Sec. 4): standard deviations as fractions of the
#: image extent (the image scaled to [0, 1]^d) and their weights.
VSVF_SIGMAS: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25)
VSVF_WEIGHTS: tuple[float, ...] = (0.067, 0.133, 0.2, 0.267, 0.333)
#: Shen et al. 2019 integrate the advection equation with RK4 over 10 time steps.
VSVF_TIME_STEPS: int = 10


# -- helpers ------------------------------------------------------------------------------------
def resample_field(field: Tensor, grid: Grid, new_grid: Grid) -> Tensor:
    """Move a world-unit field ``(B, ndim, *grid.shape)`` onto ``new_grid``.

    Same field of view (``new_grid`` is ``grid.resized(...)``): corner-aligned interpolation with
    :func:`~alignkit.spatial.resize_field`. Otherwise the field is sampled at ``new_grid``'s world
    points, keeping its border values outside ``grid``.
    """
    if field.shape[2:] != grid.shape:
        raise ShapeError(f"field {tuple(field.shape)} does not live on {grid!r}")
    if new_grid.ndim != grid.ndim:
        raise ShapeError(f"cannot move a {grid.ndim}D field onto a {new_grid.ndim}D grid")
    if grid.resized(new_grid.shape).same_as(new_grid):
        return resize_field(field, new_grid.shape)
    points = new_grid.world_points(dtype=field.dtype, device=field.device)
    return sample_world(field, grid, points.expand(field.shape[0], *points.shape[1:]), padding="border")


#: largest Frobenius norm of the voxel-frame Jacobian of ``v / 2^N`` that :func:`squarings_needed`
#: allows: below 1 every scaled map ``id + v / 2^N`` is invertible (``I + D`` with ``||D||_2 < 1``), and
#: half of it leaves room for the linear interpolation of the squarings
SCALED_JACOBIAN_BOUND = 0.5


def squarings_needed(velocity: Tensor, grid: Grid, bound: float = SCALED_JACOBIAN_BOUND) -> int:
    """The fewest squarings ``N >= 0`` for which the scaled velocity ``v / 2^N`` has, at every voxel, a
    voxel-frame Jacobian (central differences) of Frobenius norm at most ``bound``: each factor
    ``id + v / 2^N`` is then a local diffeomorphism, and their ``2^N``-fold composition is too.

    Smooth, small velocities (coarse levels, early iterations) need few squarings; 7, the fixed
    default, is what a 10-voxel wiggle needs. ``velocity`` in world units ``(B, ndim, *grid.shape)``.
    """
    if bound <= 0:
        raise ConfigError(f"the scaled-Jacobian bound must be > 0, got {bound}")
    with torch.no_grad():
        grad = spatial_gradient(world_to_voxel_vectors(velocity.detach(), grid))  # (B, ndim, ndim, *S)
        largest = float(grad.square().sum(dim=(1, 2)).max().sqrt())
    if largest <= bound:
        return 0
    return math.ceil(math.log2(largest / bound))


def scaling_and_squaring(velocity: Tensor, grid: Grid, steps: int | None = 7) -> Tensor:
    """Displacement ``exp(v) - id`` of a stationary velocity ``(B, ndim, *grid.shape)`` (world units).

    ``u = v / 2^steps``, then ``steps`` times ``u <- u + u ∘ (id + u)`` (linear interpolation, border
    padding). Differentiable in ``velocity``. ``steps=None``: as many as :func:`squarings_needed`
    says for this velocity (the exactly diffeomorphic setting; fewer on smooth, small velocities).
    """
    if steps is None:
        steps = squarings_needed(velocity, grid)
    if steps < 0:
        raise ConfigError(f"scaling and squaring needs steps >= 0, got {steps}")
    u = world_to_voxel_vectors(velocity, grid) / (2.0**steps)
    identity = grid.voxel_points(dtype=velocity.dtype, device=velocity.device)
    for _ in range(steps):
        u = u + sample_voxels(u, identity + u, padding="border")
    return voxel_to_world_vectors(u, grid)


def advect_map(velocity: Tensor, grid: Grid, time_steps: int = VSVF_TIME_STEPS) -> Tensor:
    """Displacement of ``phi^-1(1)`` solving ``d/dt phi^-1 + D(phi^-1) v = 0``, ``phi^-1(0) = id``.

    Shen et al. 2019 eq. (8): RK4 over ``time_steps`` equal steps of unit total time, spatial derivatives by
    central differences (one-sided at the border). Written for the displacement ``d = phi^-1 - id``
    (``D(id) v = v``), which keeps world offsets out of float32. For small ``v``, ``d ≈ -v``.
    Returns world units ``(B, ndim, *grid.shape)``.
    """
    if time_steps < 1:
        raise ConfigError(f"advection needs time_steps >= 1, got {time_steps}")
    v_vox = world_to_voxel_vectors(velocity, grid)  # (B, ndim_axes, *S)

    def rhs(d: Tensor) -> Tensor:
        # D(phi^-1) v = v + (d d / d voxel) v_vox  (chain rule through the voxel frame)
        grad = spatial_gradient(d)  # (B, ndim, ndim_axes, *S)
        return -(velocity + torch.einsum("bia...,ba...->bi...", grad, v_vox))

    dt = 1.0 / time_steps
    d = torch.zeros_like(velocity)
    for _ in range(time_steps):
        k1 = rhs(d)
        k2 = rhs(d + 0.5 * dt * k1)
        k3 = rhs(d + 0.5 * dt * k2)
        k4 = rhs(d + dt * k3)
        d = d + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
    return d


def _zero_field(grid: Grid) -> nn.Parameter:
    return nn.Parameter(torch.zeros(1, grid.ndim, *grid.shape, dtype=torch.get_default_dtype()))


# -- models -------------------------------------------------------------------------------------
class DisplacementField(FieldTransform):
    """Free-form displacement: parameter ``field`` ``(1, ndim, *grid.shape)``, world units."""

    kind = "displacement"

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.field = _zero_field(grid)

    def displacement(self) -> Tensor:
        return self.field

    def regularizer_field(self) -> tuple[Tensor, Grid]:
        return self.field, self.grid

    def resampled(self, grid: Grid) -> DisplacementField:
        """The same map on ``grid`` (displacement interpolated, see :func:`resample_field`)."""
        out = DisplacementField(grid).to(self.field.device, self.field.dtype)
        with torch.no_grad():
            out.field.copy_(resample_field(self.field.detach(), self.grid, grid))
        return out


class _VelocityModel(FieldTransform):
    """Shared parts of the models integrated from a stationary velocity."""

    def velocity_field(self) -> Tensor:
        """World-unit velocity ``(1, ndim, *grid.shape)``."""
        raise NotImplementedError

    def integrate(self, velocity: Tensor) -> Tensor:
        """Displacement generated by ``velocity`` with this model's integrator."""
        raise NotImplementedError

    def displacement(self) -> Tensor:
        return self.integrate(self.velocity_field())

    def inverse(self) -> Transform:
        """Live inverse (see the module docstring): the same integrator applied to ``-v``."""
        return InverseVelocityTransform(self)  # type: ignore[arg-type]  # only the two subclasses exist


class StationaryVelocityField(_VelocityModel):
    """Diffeomorphic ``exp(v)`` by scaling and squaring; parameter ``velocity`` (world units).

    ``steps`` is the number of squarings, or ``"auto"``: at every evaluation the fewest that keep the
    scaled velocity's Jacobian near the identity (:func:`squarings_needed`), so that no voxel folds
    however large the velocity grows, and coarse levels or small velocities pay for few squarings.
    """

    kind = "svf"

    def __init__(self, grid: Grid, *, steps: int | Literal["auto"] = 7) -> None:
        super().__init__(grid)
        if steps != "auto" and (isinstance(steps, str) or int(steps) < 0):
            raise ConfigError(f"steps must be >= 0 or 'auto', got {steps!r}")
        self.steps: int | Literal["auto"] = "auto" if steps == "auto" else int(steps)
        self.velocity = _zero_field(grid)

    def velocity_field(self) -> Tensor:
        return self.velocity

    def integrate(self, velocity: Tensor) -> Tensor:
        return scaling_and_squaring(velocity, self.grid, None if self.steps == "auto" else self.steps)

    def regularizer_field(self) -> tuple[Tensor, Grid]:
        return self.velocity, self.grid

    def resampled(self, grid: Grid) -> StationaryVelocityField:
        out = StationaryVelocityField(grid, steps=self.steps).to(self.velocity.device, self.velocity.dtype)
        with torch.no_grad():
            out.velocity.copy_(resample_field(self.velocity.detach(), self.grid, grid))
        return out

    def extra_repr(self) -> str:
        return f"grid={self.grid!r}, steps={self.steps}"


class VectorMomentumSVF(_VelocityModel):
    """Vector-momentum parametrised SVF (vSVF, Shen et al., Networks for Joint Affine and Non-parametric Image Registration, CVPR 2019, Sec. 2.2, eqs. 6-8).

    Parameter ``momentum`` ``m`` (world units). The velocity is ``v = K ⋆ m`` with ``K`` a sum of
    normalised Gaussians, ``K = sum_k w_k G_{sigma_k}`` (replicate padding). The map
    ``phi^-1(1)`` solves the advection equation with RK4 over ``time_steps`` (see :func:`advect_map`).

    ``sigma_unit="fraction"`` (default, the paper's): ``sigmas`` are fractions of each axis's extent,
    i.e. the image is scaled to ``[0, 1]^d`` as in the paper, so the kernel covers the same part of
    the image at every resolution. ``sigma_unit="world"``: ``sigmas`` in world units (mm).
    """

    kind = "vsvf"

    def __init__(
        self,
        grid: Grid,
        *,
        time_steps: int = VSVF_TIME_STEPS,
        sigmas: Sequence[float] = VSVF_SIGMAS,
        weights: Sequence[float] = VSVF_WEIGHTS,
        sigma_unit: Literal["fraction", "world"] = "fraction",
    ) -> None:
        super().__init__(grid)
        if time_steps < 1:
            raise ConfigError(f"time_steps must be >= 1, got {time_steps}")
        if len(sigmas) != len(weights) or len(sigmas) == 0:
            raise ConfigError(f"need as many kernel weights as sigmas, got {len(weights)} and {len(sigmas)}")
        if min(sigmas) <= 0 or min(weights) < 0:
            raise ConfigError("kernel sigmas must be positive and weights non-negative")
        if sigma_unit not in ("fraction", "world"):
            raise ConfigError(f"sigma_unit must be 'fraction' or 'world', got {sigma_unit!r}")
        self.time_steps = int(time_steps)
        self.sigmas = tuple(float(s) for s in sigmas)
        self.weights = tuple(float(w) for w in weights)
        self.sigma_unit = sigma_unit
        self.momentum = _zero_field(grid)

    def kernel_sigmas_voxels(self) -> list[list[float]]:
        """Per Gaussian, its standard deviation along each array axis of ``self.grid`` in voxels."""
        spacing = self.grid.spacing.tolist()
        out = []
        for s in self.sigmas:
            if self.sigma_unit == "fraction":
                out.append([s * max(n - 1, 1) for n in self.grid.shape])
            else:
                out.append([s / h for h in spacing])
        return out

    def smooth(self, momentum: Tensor) -> Tensor:
        """``K ⋆ m``: the multi-Gaussian kernel applied to a field on ``self.grid``."""
        v = torch.zeros_like(momentum)
        for w, sig in zip(self.weights, self.kernel_sigmas_voxels()):
            v = v + w * gaussian_blur(momentum, sig)
        return v

    def velocity_field(self) -> Tensor:
        return self.smooth(self.momentum)

    def integrate(self, velocity: Tensor) -> Tensor:
        return advect_map(velocity, self.grid, self.time_steps)

    def energy(self) -> Tensor:
        """``<m, v> = <m, K m>`` (the vSVF regulariser ``||v||_L^2``), mean over voxels; scalar."""
        return (self.momentum * self.velocity_field()).sum(dim=1).mean()

    def regularizer_field(self) -> tuple[Tensor, Grid]:
        """The momentum and its grid; the paper's regulariser on it is :meth:`energy`."""
        return self.momentum, self.grid

    def resampled(self, grid: Grid) -> VectorMomentumSVF:
        out = VectorMomentumSVF(
            grid,
            time_steps=self.time_steps,
            sigmas=self.sigmas,
            weights=self.weights,
            sigma_unit=self.sigma_unit,
        ).to(self.momentum.device, self.momentum.dtype)
        with torch.no_grad():
            out.momentum.copy_(resample_field(self.momentum.detach(), self.grid, grid))
        return out

    def extra_repr(self) -> str:
        return f"grid={self.grid!r}, time_steps={self.time_steps}, sigmas={self.sigmas} ({self.sigma_unit})"


class InverseVelocityTransform(FieldTransform):
    """Live inverse of an SVF or vSVF: ``source``'s integrator applied to ``-source.velocity_field()``.

    ``source`` is a registered sub-module, so this view's parameters are the source's.
    """

    kind = "inverse-velocity"

    source: StationaryVelocityField | VectorMomentumSVF

    def __init__(self, source: StationaryVelocityField | VectorMomentumSVF) -> None:
        super().__init__(source.grid)
        self.source = source

    def displacement(self) -> Tensor:
        return self.source.integrate(-self.source.velocity_field())

    def inverse(self) -> Transform:
        return self.source

    def regularizer_field(self) -> tuple[Tensor, Grid]:
        return self.source.regularizer_field()

    def resampled(self, grid: Grid) -> InverseVelocityTransform:
        return InverseVelocityTransform(self.source.resampled(grid))
