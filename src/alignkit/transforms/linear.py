"""Linear (matrix) transform models: translation, rigid, similarity, affine, homography.

Convention
----------
Every model maps fixed-world points to moving-world points (see :mod:`alignkit.transforms.base`)
through a homogeneous ``(ndim+1, ndim+1)`` *moving_from_fixed* world matrix :meth:`matrix`.

The parametrised models act about a ``center`` ``c`` (a world point; the solver passes the fixed
image centre) so that rotating or scaling does not drag the image sideways::

    y = A (x - c) + c + t            (homography: the same in homogeneous coordinates)

i.e. ``matrix() = T(c) @ M0 @ T(-c)`` with ``M0 = [[A, t], [p^T, 1]]``.

Parameters are scaled so that one optimiser step size moves each of them by a comparable amount:

* translation ``t = t_param * length_scale`` (``length_scale`` in world units; the solver passes
  about half the fixed image extent, so ``t_param = 1`` is a half-image shift);
* affine/homography linear part ``A = I + P`` (unitless);
* rotation in radians: 2D ``A = R(theta)``, counter-clockwise from world ``x`` towards world ``y``;
  3D ``A = exp(hat(omega))`` (axis-angle / exponential map, ``omega = (wx, wy, wz)``, angle =
  ``|omega|``) -- the same convention as ``scipy.spatial.transform.Rotation.from_rotvec``;
* similarity scale ``exp(log_scale)`` (log-parametrised so it stays positive);
* homography perspective row ``p = p_param / length_scale``.

All parameters start at the identity transform.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError, ShapeError
from alignkit.spatial.points import apply_matrix
from alignkit.transforms.base import Transform

# Entries (row, col) of the skew-symmetric generator that hold +omega_k (the transposed entry
# holds -omega_k). 2D: one angle; 3D: the hat map of (wx, wy, wz).
_SKEW_ENTRIES: dict[int, list[tuple[int, int]]] = {2: [(1, 0)], 3: [(2, 1), (0, 2), (1, 0)]}


def _check_points(points: Tensor, ndim: int) -> None:
    if points.dim() < 3 or points.shape[1] != ndim:
        raise ShapeError(f"expected points (B, {ndim}, *S) or (B, {ndim}, N), got {tuple(points.shape)}")


def _translation_matrix(offset: Tensor) -> Tensor:
    ndim = offset.shape[0]
    out = torch.eye(ndim + 1, dtype=offset.dtype, device=offset.device)
    out[:ndim, ndim] = offset
    return out


def _as_matrix(matrix: Tensor | Sequence[Sequence[float]] | np.ndarray) -> Tensor:
    m = (
        torch.as_tensor(np.asarray(matrix) if not isinstance(matrix, Tensor) else matrix)
        .detach()
        .to(torch.float64)
        .cpu()
    )
    if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] not in (3, 4):
        raise ShapeError(f"expected a (3, 3) or (4, 4) homogeneous matrix, got {tuple(m.shape)}")
    if not torch.isfinite(m).all():
        raise ShapeError("matrix contains NaN or Inf")
    return m


def projective_apply(matrix: Tensor, points: Tensor) -> Tensor:
    """Apply a homogeneous matrix with the projective division always taken.

    :func:`alignkit.spatial.apply_matrix` skips the division when the last row is ``[0, ..., 1]``,
    which would leave the perspective parameters of a homography at identity without gradient.
    """
    ndim = points.shape[1]
    matrix = matrix.to(dtype=points.dtype, device=points.device)
    flat = points.reshape(points.shape[0], ndim, -1)
    out = matrix[:ndim, :ndim] @ flat + matrix[:ndim, ndim:]
    w = matrix[ndim:, :ndim] @ flat + matrix[ndim:, ndim:]
    return (out / w).reshape(points.shape)


class LinearTransform(Transform):
    """Base of the matrix models: ``transform_points = matrix() @ [x; 1]``."""

    kind = "linear"

    is_linear = True

    def transform_points(self, world: Tensor) -> Tensor:
        _check_points(world, self.ndim)
        return apply_matrix(self.matrix(), world)

    def inverse(self) -> Transform:
        """A *live* inverse: its matrix is ``inv(self.matrix())`` recomputed at each call, so it
        stays correct while ``self`` is optimised, and gradients flow back to ``self``'s
        parameters. Freeze it with ``MatrixTransform(t.inverse().matrix().detach())``."""
        return InverseLinearTransform(self)


class MatrixTransform(LinearTransform):
    """A fixed matrix (no parameters), e.g. a transform read from a file or a frozen stage."""

    kind = "matrix"

    moving_from_fixed: Tensor

    def __init__(self, matrix: Tensor | Sequence[Sequence[float]] | np.ndarray) -> None:
        m = _as_matrix(matrix)
        super().__init__(m.shape[0] - 1)
        self.register_buffer("moving_from_fixed", m)

    @classmethod
    def from_matrix(
        cls, matrix: Tensor | Sequence[Sequence[float]] | np.ndarray, **_: object
    ) -> MatrixTransform:
        return cls(matrix)

    def matrix(self) -> Tensor:
        return self.moving_from_fixed

    def transform_points(self, world: Tensor) -> Tensor:
        _check_points(world, self.ndim)
        return (
            projective_apply(self.moving_from_fixed, world)
            if self._projective()
            else apply_matrix(self.moving_from_fixed, world)
        )

    def _projective(self) -> bool:
        last = self.moving_from_fixed[self.ndim]
        return bool((last[: self.ndim] != 0).any())

    def inverse(self) -> Transform:
        return MatrixTransform(torch.linalg.inv(self.moving_from_fixed))


class InverseLinearTransform(LinearTransform):
    """``inv(source.matrix())``, recomputed from the source's current parameters at each call.

    The source is a registered sub-module: ``parameters()`` of the inverse are those of the source.
    """

    kind = "inverse-linear"

    def __init__(self, source: LinearTransform) -> None:
        super().__init__(source.ndim)
        self.source = source

    def matrix(self) -> Tensor:
        return torch.linalg.inv(self.source.matrix())

    def transform_points(self, world: Tensor) -> Tensor:
        _check_points(world, self.ndim)
        if isinstance(self.source, Homography):
            return projective_apply(self.matrix(), world)
        return apply_matrix(self.matrix(), world)

    def inverse(self) -> Transform:
        return self.source


class ParametricLinearTransform(LinearTransform):
    """Shared machinery of the centred, scaled models (see the module docstring)."""

    center: Tensor

    def __init__(
        self,
        ndim: int,
        *,
        center: Tensor | Sequence[float] | None = None,
        length_scale: float = 1.0,
    ) -> None:
        super().__init__(ndim)
        if not float(length_scale) > 0:
            raise ConfigError(f"length_scale must be positive, got {length_scale}")
        self.length_scale = float(length_scale)
        dtype = torch.get_default_dtype()
        if center is None:
            c = torch.zeros(ndim, dtype=dtype)
        else:
            c = torch.as_tensor(center, dtype=dtype).detach().clone().cpu()
            if c.shape != (ndim,):
                raise ShapeError(f"center must have {ndim} components, got shape {tuple(c.shape)}")
        self.register_buffer("center", c)
        self.translation = nn.Parameter(torch.zeros(ndim, dtype=dtype))

    # -- model-specific pieces ------------------------------------------------------------------
    def linear_part(self) -> Tensor:
        """``A`` (ndim, ndim) about the centre."""
        raise NotImplementedError

    def perspective(self) -> Tensor | None:
        """Last-row perspective terms (homography only)."""
        return None

    def _set_linear(self, a: Tensor) -> None:
        """Set parameters so that :meth:`linear_part` is (the model's projection of) ``a``."""
        raise NotImplementedError

    # -- matrices -------------------------------------------------------------------------------
    def centered_matrix(self) -> Tensor:
        """``M0 = [[A, t], [p^T, 1]]``, the matrix about the centre (world units)."""
        n = self.ndim
        a = self.linear_part()
        t = self.translation * self.length_scale
        top = torch.cat([a, t.unsqueeze(1)], dim=1)
        p = self.perspective()
        if p is None:
            p = torch.zeros(n, dtype=a.dtype, device=a.device)
        bottom = torch.cat([p, torch.ones(1, dtype=a.dtype, device=a.device)]).unsqueeze(0)
        return torch.cat([top, bottom], dim=0)

    def matrix(self) -> Tensor:
        """Differentiable moving_from_fixed world matrix ``T(c) @ M0 @ T(-c)`` (params dtype/device)."""
        c = self.center.to(self.translation)
        return _translation_matrix(c) @ self.centered_matrix() @ _translation_matrix(-c)

    @torch.no_grad()
    def set_matrix(self, matrix: Tensor | Sequence[Sequence[float]] | np.ndarray) -> None:
        """Set the parameters from a moving_from_fixed matrix, projected onto this model
        (the centre is mapped exactly where the matrix maps it)."""
        m = _as_matrix(matrix)
        n = self.ndim
        if m.shape[0] != n + 1:
            raise ShapeError(f"{type(self).__name__} is {n}D, got a {tuple(m.shape)} matrix")
        c = self.center.to(torch.float64)
        m0 = _translation_matrix(-c) @ m @ _translation_matrix(c)
        m0 = m0 / m0[n, n]
        if self.perspective() is None and not torch.allclose(
            m0[n, :n], torch.zeros(n, dtype=m0.dtype), atol=1e-12
        ):
            raise ConfigError(f"{type(self).__name__} cannot represent a projective matrix")
        self._set_linear(m0[:n, :n])
        self.translation.copy_(m0[:n, n] / self.length_scale)
        if isinstance(self, Homography):
            self.perspective_param.copy_(m0[n, :n] * self.length_scale)

    @classmethod
    def from_matrix(
        cls,
        matrix: Tensor | Sequence[Sequence[float]] | np.ndarray,
        *,
        center: Tensor | Sequence[float] | None = None,
        length_scale: float = 1.0,
    ) -> ParametricLinearTransform:
        """A model initialised from a moving_from_fixed matrix (see :meth:`set_matrix`)."""
        m = _as_matrix(matrix)
        out = cls(m.shape[0] - 1, center=center, length_scale=length_scale)
        out.set_matrix(m)
        return out

    def extra_repr(self) -> str:
        return f"ndim={self.ndim}, length_scale={self.length_scale:.4g}"


def _skew(omega: Tensor, ndim: int) -> Tensor:
    """Skew-symmetric generator ``sum_k omega_k G_k`` (built from a constant basis, so differentiable)."""
    basis = torch.zeros(len(_SKEW_ENTRIES[ndim]), ndim, ndim, dtype=omega.dtype, device=omega.device)
    for k, (i, j) in enumerate(_SKEW_ENTRIES[ndim]):
        basis[k, i, j] = 1.0
        basis[k, j, i] = -1.0
    return torch.einsum("k,kij->ij", omega, basis)


def _nearest_rotation(a: Tensor) -> tuple[Tensor, Tensor]:
    """Polar decomposition ``a = R S``: the closest rotation ``R`` and the mean scale ``det(S)^(1/n)``."""
    u, s, vh = torch.linalg.svd(a)
    d = torch.ones_like(s)
    d[-1] = torch.sign(torch.linalg.det(u @ vh))
    rot = u @ torch.diag(d) @ vh
    scale = torch.prod(s) ** (1.0 / a.shape[0])
    return rot, scale


def _rotation_log(rot: Tensor) -> Tensor:
    if rot.shape[0] == 2:
        return torch.atan2(rot[1, 0], rot[0, 0]).reshape(1)
    from scipy.spatial.transform import Rotation

    return torch.as_tensor(Rotation.from_matrix(rot.numpy()).as_rotvec(), dtype=torch.float64)


class Translation(ParametricLinearTransform):
    """``y = x + t``; parameter ``translation`` (ndim,), ``t = translation * length_scale``."""

    kind = "translation"

    def linear_part(self) -> Tensor:
        return torch.eye(self.ndim, dtype=self.translation.dtype, device=self.translation.device)

    def _set_linear(self, a: Tensor) -> None:
        # The linear part is ignored: a translation keeps only where the centre goes.
        pass


class Rigid(ParametricLinearTransform):
    """Rotation about the centre plus translation. Parameter ``rotation``: 2D one angle (radians),
    3D an axis-angle vector (exponential map ``A = exp(hat(omega))``)."""

    kind = "rigid"

    def __init__(
        self, ndim: int, *, center: Tensor | Sequence[float] | None = None, length_scale: float = 1.0
    ) -> None:
        super().__init__(ndim, center=center, length_scale=length_scale)
        self.rotation = nn.Parameter(torch.zeros(len(_SKEW_ENTRIES[ndim]), dtype=self.translation.dtype))

    def rotation_matrix(self) -> Tensor:
        return torch.linalg.matrix_exp(_skew(self.rotation, self.ndim))

    def linear_part(self) -> Tensor:
        return self.rotation_matrix()

    def _set_linear(self, a: Tensor) -> None:
        rot, _ = _nearest_rotation(a)
        self.rotation.copy_(_rotation_log(rot))


class Similarity(Rigid):
    """Rigid plus isotropic scale ``exp(log_scale)``: ``A = exp(log_scale) R``."""

    kind = "similarity"

    def __init__(
        self, ndim: int, *, center: Tensor | Sequence[float] | None = None, length_scale: float = 1.0
    ) -> None:
        super().__init__(ndim, center=center, length_scale=length_scale)
        self.log_scale = nn.Parameter(torch.zeros(1, dtype=self.translation.dtype))

    def linear_part(self) -> Tensor:
        return torch.exp(self.log_scale) * self.rotation_matrix()

    def _set_linear(self, a: Tensor) -> None:
        rot, scale = _nearest_rotation(a)
        self.rotation.copy_(_rotation_log(rot))
        self.log_scale.copy_(torch.log(scale).reshape(1))


class Affine(ParametricLinearTransform):
    """General affine: ``A = I + linear`` with parameter ``linear`` (ndim, ndim), unitless."""

    kind = "affine"

    def __init__(
        self, ndim: int, *, center: Tensor | Sequence[float] | None = None, length_scale: float = 1.0
    ) -> None:
        super().__init__(ndim, center=center, length_scale=length_scale)
        self.linear = nn.Parameter(torch.zeros(ndim, ndim, dtype=self.translation.dtype))

    def linear_part(self) -> Tensor:
        return torch.eye(self.ndim, dtype=self.linear.dtype, device=self.linear.device) + self.linear

    def _set_linear(self, a: Tensor) -> None:
        self.linear.copy_(a - torch.eye(self.ndim, dtype=a.dtype))


class Homography(Affine):
    """2D projective transform, 8 parameters: affine ``A = I + linear`` and ``t`` plus perspective
    terms ``p = perspective_param / length_scale``. :meth:`matrix` is normalised to ``H[2, 2] = 1``."""

    kind = "homography"

    def __init__(
        self, ndim: int = 2, *, center: Tensor | Sequence[float] | None = None, length_scale: float = 1.0
    ) -> None:
        if ndim != 2:
            raise ConfigError(f"Homography is a 2D model, got ndim={ndim}")
        super().__init__(ndim, center=center, length_scale=length_scale)
        self.perspective_param = nn.Parameter(torch.zeros(2, dtype=self.translation.dtype))

    def perspective(self) -> Tensor:
        return self.perspective_param / self.length_scale

    def matrix(self) -> Tensor:
        h = super().matrix()
        return h / h[2, 2]

    def transform_points(self, world: Tensor) -> Tensor:
        _check_points(world, self.ndim)
        return projective_apply(self.matrix(), world)
