"""Gaussian pyramids on grids: blur, then resample with corner-aligned geometry."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from alignkit.spatial.filters import gaussian_blur
from alignkit.spatial.grid import Grid
from alignkit.spatial.points import resize_image


def downsample(tensor: Tensor, grid: Grid, factor: float, sigma: float | None = None) -> tuple[Tensor, Grid]:
    """Blur ``tensor (B, C, *grid.shape)`` then resample it on ``grid.downsampled(factor)``.

    ``sigma`` (voxels of the input) defaults to about ``0.5 * factor``, enough to suppress
    aliasing without washing out structure (the choice of ANTs' ``shrink 4 / smooth 2``); the
    default is reached by repeated halving, which is much cheaper for large factors.
    """
    if factor <= 1:
        if sigma:
            return gaussian_blur(tensor, sigma), grid
        return tensor, grid
    small = grid.downsampled(factor)
    if sigma is None:
        # Halve repeatedly (blur sigma 1, then resample): each blur runs on an already smaller
        # array, so shrinking a 256x256x160 volume by 8 costs a fraction of one sigma-4 blur at
        # full size. The accumulated sigma, sqrt(1 + 4 + 16 ...) input voxels, is ~0.55 x factor.
        current, current_grid, remaining = tensor, grid, float(factor)
        while remaining >= 2.0 - 1e-6 and min(current_grid.shape) > 3:
            current_grid = current_grid.downsampled(2)
            current = resize_image(gaussian_blur(current, 1.0, truncate=2.0), current_grid.shape)
            remaining /= 2.0
        if remaining > 1.0 + 1e-6:
            current = gaussian_blur(current, 0.5 * remaining)
        return resize_image(current, small.shape), small
    blurred = gaussian_blur(tensor, sigma) if sigma > 0 else tensor
    return resize_image(blurred, small.shape), small


def gaussian_pyramid(
    tensor: Tensor, grid: Grid, factors: Sequence[float], sigmas: Sequence[float] | None = None
) -> list[tuple[Tensor, Grid]]:
    """One ``(tensor, grid)`` level per shrink factor, in the order given (coarse first, usually)."""
    sigma_list: list[float | None] = [None] * len(factors) if sigmas is None else list(sigmas)
    return [downsample(tensor, grid, f, s) for f, s in zip(factors, sigma_list)]
