"""The greedy update of a dense field stage (``StageConfig(optimizer="greedy")``), after PICSL Greedy.

Yushkevich et al., "Fast Automatic Segmentation of Hippocampal Subfields and Medial Temporal Lobe
Subregions in 3 Tesla and 7 Tesla T2-Weighted MRI" (Greedy's method) and the demons family it
belongs to (Vercauteren et al., "Diffeomorphic demons"): at every iteration

1. the metric's gradient with respect to the current displacement, voxel by voxel (for LNCC the
   local-correlation gradient times the warped image's gradient; here by autograd through the
   one objective the Adam path minimises as well);
2. smoothed by a Gaussian of ``sigma_pre`` voxels (Greedy's first ``-s`` sigma, the "fluid" part);
3. scaled so that its largest vector moves ``step`` voxels (Greedy's ``-e``): the step length no
   longer depends on the metric's scale, so one setting serves NCC, MSE or MI;
4. composed with the field -- ``phi <- phi ∘ (id + step)`` for a displacement -- or, in the exactly
   diffeomorphic setting (Greedy's ``-sv``), added to a stationary velocity ``v`` whose
   exponential (scaling and squaring with enough squarings, see
   :func:`alignkit.transforms.dense.squarings_needed`) is the map;
5. then the field (displacement or velocity) smoothed by ``sigma_post`` voxels (the second ``-s``
   sigma, the "elastic" part).

Why it beats Adam on an SVF for this problem (measured in ``benchmarks/README.md``, issue 17): the
gradient is taken with respect to the displacement, not back through the squarings (a backward pass
through 7 grid samplings per step saved); the normalised step makes every iteration move the field by
a known amount whatever the similarity's scale, so a fixed, short schedule suffices; the Gaussian of
the update is a preconditioner that spreads the gradient of the edges over their neighbourhood, which
Adam's per-voxel step sizes do the opposite of.

Both Gaussians are :func:`alignkit.spatial.banded.fast_gaussian_blur` (matrix products; the same
kernel as :func:`alignkit.spatial.gaussian_blur`, ten times faster on a 2 mm brain). All functions work on world-unit fields ``(B, ndim, *grid.shape)`` of a :class:`~alignkit.spatial.Grid`
(alignkit's convention for every field) and are written once for 2D and 3D.

With numba installed (``pip install alignkit[fast]``) one float32 field on the CPU takes the compiled
kernels of :mod:`alignkit.spatial.compiled` instead: the Gaussians, the composition and, through
:class:`LNCCForce`, the warp with its derivative and the LNCC force in closed form -- one fused loop
each instead of a dozen torch operations (a greedy iteration on a 2 mm brain ~2x faster; figures in
``benchmarks/README.md``, issue 17); a displacement stage then takes its whole update there
(:func:`update_displacement`: steps 2-5 without the passes between them). The torch code here is the reference they are tested against
(``tests/test_compiled_greedy.py``); ``backend="torch"`` or ``ALIGNKIT_COMPILED=0`` forces it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from alignkit.spatial import (
    Grid,
    gaussian_kernel1d,
    sample_voxels,
    voxel_to_world_vectors,
    world_to_voxel_vectors,
)
from alignkit.spatial import compiled as _compiled
from alignkit.spatial.banded import fast_gaussian_blur

#: ``backend`` values: ``auto`` = the compiled kernels where they apply, else torch
BACKENDS = ("auto", "torch", "compiled")


def _use_compiled(backend: str, *tensors: Tensor) -> bool:
    """Whether the compiled kernels take these tensors (:func:`alignkit.spatial.compiled.fits`, numba
    installed): ``compiled`` insists, ``torch`` refuses, ``auto`` decides."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    fits = _compiled.fits(*tensors)
    if backend == "compiled":
        if not (fits and _compiled.available()):
            raise ValueError("the compiled greedy kernels need numba and one float32 CPU batch item without autograd")
        return True
    return fits and _compiled.available()


def _as_vectors(field: Tensor) -> np.ndarray:
    """A world-unit ``(1, ndim, *S)`` field as the kernels' 3-component ``(3, D, H, W)`` (2D: a zero
    component for the added depth axis, which the kernels' matrices leave untouched)."""
    array = _compiled.volumes(field)
    if field.shape[1] == 3:
        return array
    return np.concatenate([np.zeros_like(array[:1]), array], axis=0)


def _from_vectors(array: np.ndarray, like: Tensor) -> Tensor:
    """The inverse of :func:`_as_vectors`: ``(1, ndim, *S)`` shaped like ``like``."""
    if like.shape[1] != 3:
        array = array[1:]
    return torch.from_numpy(array.reshape(like.shape[1:])).unsqueeze(0)


def blur(field: Tensor, sigma: float, *, backend: str = "auto") -> Tensor:
    """:func:`~alignkit.spatial.banded.fast_gaussian_blur` of ``field`` (same kernel, replicate padding),
    compiled where it applies."""
    if sigma <= 0:
        return field
    if _use_compiled(backend, field):
        taps = gaussian_kernel1d(sigma, dtype=torch.float64).numpy()
        out = _compiled.gaussian(_compiled.volumes(field), taps)
        return torch.from_numpy(out.reshape(field.shape[1:])).unsqueeze(0)
    return fast_gaussian_blur(field, sigma)


def normalised_step(gradient: Tensor, grid: Grid, sigma_pre: float, step: float, *, backend: str = "auto") -> Tensor:
    """The descent step of one greedy iteration, world units: ``-G_sigma_pre * gradient`` scaled so that
    its longest vector is ``step`` voxels of ``grid`` long (zero where the gradient is zero everywhere).

    ``gradient`` is the objective's gradient with respect to the world-unit displacement on ``grid``.
    """
    direction = -blur(gradient, sigma_pre, backend=backend)
    in_voxels = world_to_voxel_vectors(direction, grid)
    longest = in_voxels.square().sum(dim=1).max().sqrt()
    if not bool(longest > 0):
        return torch.zeros_like(direction)
    return direction * (step / longest)


def compose_displacement(displacement: Tensor, step: Tensor, grid: Grid, *, backend: str = "auto") -> Tensor:
    """``(id + u) ∘ (id + s) - id = s + u ∘ (id + s)``: the displacement of the field followed by the
    small step (the step acts first, on the fixed side, where the gradient was taken). Linear
    interpolation, border values outside ``grid``; world units in and out."""
    if _use_compiled(backend, displacement, step):
        matrix = grid.voxel_from_world.numpy()
        out = _compiled.compose_step(_as_vectors(displacement), _as_vectors(step), matrix)
        return _from_vectors(out, displacement)
    u_vox = world_to_voxel_vectors(displacement, grid)
    s_vox = world_to_voxel_vectors(step, grid)
    identity = grid.voxel_points(dtype=displacement.dtype, device=displacement.device)
    moved = sample_voxels(u_vox, identity + s_vox, padding="border")
    return voxel_to_world_vectors(s_vox + moved, grid)


def smooth_field(field: Tensor, sigma_post: float, *, backend: str = "auto") -> Tensor:
    """The field smoothed by ``sigma_post`` voxels (unchanged for 0)."""
    return blur(field, sigma_post, backend=backend)


@torch.no_grad()
def update_displacement(field: Tensor, gradient: np.ndarray, grid: Grid, sigma_pre: float, step: float,
                        sigma_post: float) -> None:
    """One greedy update of the displacement ``field`` ``(1, ndim, *grid.shape)`` in place, by the compiled
    kernels: ``field <- smooth_field(compose_displacement(field, normalised_step(gradient, ...)), sigma_post)``
    with the objective's ``gradient`` as the kernels' ``(3, D, H, W)`` array (:meth:`LNCCForce.chained`).

    The same float32 operations as those three functions (tested to agree), without their intermediate
    passes over the volume: the step's sign and scale are applied inside the composition, its length is
    one reduction, and the smoothed field is written into ``field``'s memory (3D) -- a third of an
    iteration's time on a 2 mm brain's 1/2 level went to those passes and their Python overhead."""
    if not (_compiled.fits(field) and _compiled.available()) or tuple(field.shape[2:]) != tuple(grid.shape):
        raise ValueError("update_displacement needs numba and a float32 CPU displacement (1, ndim, *grid.shape)")
    direction = gradient
    if sigma_pre > 0:
        direction = _compiled.gaussian(gradient, gaussian_kernel1d(sigma_pre, dtype=torch.float64).numpy())
    matrix = grid.voxel_from_world.numpy()
    # the scale as normalised_step rounds it (torch's float32 sqrt and division on one value)
    longest = torch.tensor(_compiled.longest_squared(direction, matrix), dtype=torch.float32).sqrt()
    factor = float(step / longest) if bool(longest > 0) else 0.0  # no step without a gradient
    composed = _compiled.compose_step(_as_vectors(field), direction, matrix, -factor)
    if field.shape[1] == 3 and field.is_contiguous():
        target = _compiled.volumes(field)  # a view of the field's memory
        if sigma_post > 0:
            _compiled.gaussian(composed, gaussian_kernel1d(sigma_post, dtype=torch.float64).numpy(), out=target)
        else:
            target[...] = composed
        # the kernels wrote behind autograd's back: what caches key on the field's version must see it
        torch.autograd.graph.increment_version(field)
    else:
        smoothed = composed if sigma_post <= 0 else _compiled.gaussian(
            composed, gaussian_kernel1d(sigma_post, dtype=torch.float64).numpy())
        field.copy_(_from_vectors(smoothed, field))


class LNCCForce:
    """The LNCC objective of a greedy level and its gradient with respect to the world displacement, by
    the compiled kernels: the warp and the interpolant's derivative in one pass
    (:func:`alignkit.spatial.compiled.warp_with_gradient`), then the local NCC force in closed form
    (:func:`alignkit.spatial.compiled.local_ncc_force`). The reference is the engine's own path
    (``grid_sample``, :meth:`alignkit.losses.LNCC.value_and_gradient`, autograd through the warp).

    ``prior_matrix``: the homogeneous world matrix of a linear transform applied after the displacement
    (fixed world -> moving world), or None. :meth:`applies` says whether a level can take this path.
    """

    def __init__(self, fixed: Tensor, grid: Grid, moving: Tensor, moving_grid: Grid, prior_matrix: Tensor | None,
                 similarity) -> None:
        self.fixed = _compiled.volumes(fixed)[0]
        self.moving = _compiled.volumes(moving)[0]
        moving_from_world = moving_grid.voxel_from_world.double()
        if prior_matrix is not None:
            moving_from_world = moving_from_world @ prior_matrix.double().cpu()
        self.moving_from_world = moving_from_world.numpy()
        self.world_from_voxel = grid.world_from_voxel.numpy()
        self.window = similarity.window
        self.eps = similarity.eps
        self.squared = similarity.squared

    @staticmethod
    def applies(similarity, fixed: Tensor, moving: Tensor, prior_matrix: Tensor | None) -> bool:
        from alignkit.losses import LNCC

        return (
            type(similarity) is LNCC
            and similarity.dilation == 1
            and fixed.shape[1] == 1
            and moving.shape[1] == 1
            and (prior_matrix is None or bool((prior_matrix[-1, :-1] == 0).all()))
            and _use_compiled("auto", fixed, moving)
        )

    def __call__(self, displacement: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss, d loss / d displacement)`` for the world displacement ``(1, ndim, *S)`` on the grid."""
        value, gradient = self.chained(displacement)
        return torch.tensor(value), _from_vectors(gradient, displacement)

    def chained(self, displacement: Tensor) -> tuple[float, np.ndarray]:
        """The loss and its gradient with respect to the displacement as the kernels' ``(3, D, H, W)`` array
        (what :func:`update_displacement` takes), the force and the warp's derivative multiplied in one pass."""
        warped, derivative, inside = _compiled.warp_with_gradient(
            self.moving, _as_vectors(displacement), self.world_from_voxel, self.moving_from_world
        )
        return _compiled.local_ncc_force(warped, self.fixed, inside, self.window, self.eps, self.squared,
                                         derivative=derivative)
