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
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignkit.spatial import Grid, sample_voxels, voxel_to_world_vectors, world_to_voxel_vectors
from alignkit.spatial.banded import fast_gaussian_blur


def normalised_step(gradient: Tensor, grid: Grid, sigma_pre: float, step: float) -> Tensor:
    """The descent step of one greedy iteration, world units: ``-G_sigma_pre * gradient`` scaled so that
    its longest vector is ``step`` voxels of ``grid`` long (zero where the gradient is zero everywhere).

    ``gradient`` is the objective's gradient with respect to the world-unit displacement on ``grid``.
    """
    direction = -fast_gaussian_blur(gradient, sigma_pre) if sigma_pre > 0 else -gradient
    in_voxels = world_to_voxel_vectors(direction, grid)
    longest = in_voxels.square().sum(dim=1).max().sqrt()
    if not bool(longest > 0):
        return torch.zeros_like(direction)
    return direction * (step / longest)


def compose_displacement(displacement: Tensor, step: Tensor, grid: Grid) -> Tensor:
    """``(id + u) ∘ (id + s) - id = s + u ∘ (id + s)``: the displacement of the field followed by the
    small step (the step acts first, on the fixed side, where the gradient was taken). Linear
    interpolation, border values outside ``grid``; world units in and out."""
    u_vox = world_to_voxel_vectors(displacement, grid)
    s_vox = world_to_voxel_vectors(step, grid)
    identity = grid.voxel_points(dtype=displacement.dtype, device=displacement.device)
    moved = sample_voxels(u_vox, identity + s_vox, padding="border")
    return voxel_to_world_vectors(s_vox + moved, grid)


def smooth_field(field: Tensor, sigma_post: float) -> Tensor:
    """The field smoothed by ``sigma_post`` voxels (unchanged for 0)."""
    return fast_gaussian_blur(field, sigma_post) if sigma_post > 0 else field
