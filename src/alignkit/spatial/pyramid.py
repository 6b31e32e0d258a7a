"""Gaussian pyramids on grids: blur, then resample with corner-aligned geometry."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from alignkit.spatial.filters import gaussian_blur
from alignkit.spatial.grid import Grid
from alignkit.spatial.points import resize_image


def downsample(tensor: Tensor, grid: Grid, factor: float, sigma: float | None = None) -> tuple[Tensor, Grid]:
    """Blur ``tensor (B, C, *grid.shape)`` then resample it on ``grid.downsampled(factor)``.

    ``sigma`` (voxels of the input) defaults to ``0.5 * factor``, enough to suppress aliasing
    without washing out structure (the choice of ANTs' ``shrink 4 / smooth 2``).
    """
    if factor <= 1:
        if sigma:
            return gaussian_blur(tensor, sigma), grid
        return tensor, grid
    small = grid.downsampled(factor)
    sigma = 0.5 * factor if sigma is None else sigma
    blurred = gaussian_blur(tensor, sigma) if sigma > 0 else tensor
    return resize_image(blurred, small.shape), small


def gaussian_pyramid(
    tensor: Tensor, grid: Grid, factors: Sequence[float], sigmas: Sequence[float] | None = None
) -> list[tuple[Tensor, Grid]]:
    """One ``(tensor, grid)`` level per shrink factor, in the order given (coarse first, usually)."""
    sigma_list: list[float | None] = [None] * len(factors) if sigmas is None else list(sigmas)
    return [downsample(tensor, grid, f, s) for f, s in zip(factors, sigma_list)]
