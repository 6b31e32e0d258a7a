"""Data terms of classical variational optical flow (the deep-learning registration survey §1.2), same convention as
:mod:`alignkit.losses.similarity`: ``forward(warped, fixed, mask=None)`` returns a scalar to minimise.

:class:`FlowData` is the robust data term of Brox et al. / Sun et al.: a generalised Charbonnier
penalty of the brightness (colour) constancy residual plus, weighted by ``gradient_weight``, one of
the *gradient* constancy residual -- spatial image derivatives are invariant to additive
illumination changes (shadows, exposure), which brightness constancy is not.
"""

from __future__ import annotations

from torch import Tensor, nn

from alignkit.errors import ConfigError
from alignkit.losses.similarity import _check_pair, _compute_dtype, _weighted_mean


class FlowData(nn.Module):
    """``rho(w - f) + gradient_weight * sum_axes rho(d_a w - d_a f)`` averaged over channels and
    voxels, with ``rho(r) = (r^2 + eps^2)^alpha`` (Charbonnier; ``alpha = 0.45`` as Sun et al.).

    Gradients are central differences in voxels of the images given (the pyramid level's), averaged
    over the voxels where the stencil fits. With ``gradient_weight = 0`` this is
    :class:`alignkit.losses.Charbonnier`.
    """

    def __init__(self, *, eps: float = 1e-3, alpha: float = 0.45, gradient_weight: float = 1.0) -> None:
        super().__init__()
        if eps <= 0 or alpha <= 0 or gradient_weight < 0:
            raise ConfigError(
                f"FlowData needs eps > 0, alpha > 0, gradient_weight >= 0; got {eps}, {alpha}, {gradient_weight}"
            )
        self.eps, self.alpha, self.gradient_weight = float(eps), float(alpha), float(gradient_weight)

    def _rho(self, r: Tensor) -> Tensor:
        return (r * r + self.eps**2) ** self.alpha

    def forward(self, warped: Tensor, fixed: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = _check_pair(warped, fixed, mask)
        dtype = _compute_dtype(warped)
        diff = warped.to(dtype) - fixed.to(dtype)
        loss = _weighted_mean(self._rho(diff), mask)
        if self.gradient_weight > 0:
            # d_a w - d_a f = d_a (w - f): central differences of the residual, on the voxels where
            # the stencil fits (each axis its own interior).
            for axis in range(2, diff.dim()):
                n = diff.shape[axis]
                if n < 3:
                    continue
                grad = (diff.narrow(axis, 2, n - 2) - diff.narrow(axis, 0, n - 2)) * 0.5
                inner = None if mask is None else mask.narrow(axis, 1, n - 2)
                loss = loss + self.gradient_weight * _weighted_mean(self._rho(grad), inner)
        return loss.to(warped.dtype)
