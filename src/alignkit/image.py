"""Image: a tensor plus the grid that places it in the world. Nothing else in alignkit knows headers."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from alignkit.errors import InputError, ShapeError
from alignkit.spatial.grid import Grid


@dataclass(eq=False)
class Image:
    """``data`` is ``(C, *spatial)``; ``grid`` places its voxels in the LPS world.

    ``meta`` carries what a writer needs to round-trip the file (original header, dtype, suffix);
    ``path`` names the file the image came from, for error messages.
    """

    data: Tensor
    grid: Grid
    path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.data.dim() != self.grid.ndim + 1:
            raise ShapeError(
                f"Image data must be (C, *spatial) with {self.grid.ndim} spatial dims, got {tuple(self.data.shape)}"
            )
        if tuple(self.data.shape[1:]) != self.grid.shape:
            raise ShapeError(f"Image data {tuple(self.data.shape)} does not match grid shape {self.grid.shape}")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_array(
        cls,
        array: Any,
        *,
        spacing: float | tuple[float, ...] = 1.0,
        world_from_voxel: Tensor | None = None,
        channels_first: bool = False,
        raster: bool | None = None,
        path: str | None = None,
    ) -> Image:
        """Wrap a numpy array or tensor ``(*spatial)`` or ``(*spatial, C)`` (``(C, *spatial)`` with
        ``channels_first``). A 2D array with no affine gets the raster grid (x = column, y = row)."""
        data = torch.as_tensor(array)
        if not data.is_floating_point():
            data = data.float()
        if channels_first:
            spatial = tuple(data.shape[1:])
        elif data.dim() in (2, 3) and (data.dim() == 2 or world_from_voxel is not None or data.shape[-1] > 4):
            spatial = tuple(data.shape)
            data = data.unsqueeze(0)
        elif data.dim() == 3 and data.shape[-1] in (1, 3, 4):
            spatial = tuple(data.shape[:2])
            data = data.movedim(-1, 0)
        elif data.dim() == 4:
            spatial = tuple(data.shape[:3])
            data = data.movedim(-1, 0)
        else:
            raise InputError(f"cannot interpret an array of shape {tuple(data.shape)} as a 2D or 3D image", path)
        if world_from_voxel is not None:
            grid = Grid(spatial, world_from_voxel)
        elif len(spatial) == 2 and (raster is None or raster):
            grid = Grid.raster_2d(spatial, float(spacing) if isinstance(spacing, (int, float)) else spacing[0])
        else:
            grid = Grid.from_spacing(spatial, spacing)
        return cls(data, grid, path=path)

    # -- properties ---------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return self.grid.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        return self.grid.shape

    @property
    def channels(self) -> int:
        return int(self.data.shape[0])

    @property
    def world_from_voxel(self) -> Tensor:
        return self.grid.world_from_voxel

    @property
    def name(self) -> str:
        return self.path or "<array>"

    def batch(self, *, dtype: torch.dtype | None = torch.float32, device: torch.device | str | None = None) -> Tensor:
        """``(1, C, *spatial)`` tensor ready for the solver."""
        return self.data.to(dtype=dtype, device=device).unsqueeze(0)

    def with_data(self, data: Tensor) -> Image:
        """Same grid and metadata, new ``(C, *spatial)`` (or ``(1, C, *spatial)``) data."""
        if data.dim() == self.ndim + 2:
            data = data[0]
        return replace(self, data=data, meta=dict(self.meta))

    def grey(self) -> Image:
        """Mean over the colour channels (RGB photographs -> one channel; a 2D RGBA image's alpha is
        left out, see :func:`colour_channels`); single-channel images unchanged."""
        if self.channels == 1:
            return self
        return self.with_data(grey_channels(self.data.float().unsqueeze(0))[0])

    def check_finite(self) -> None:
        """Raise :class:`InputError` naming the file when the image cannot be registered."""
        if self.data.numel() == 0:
            raise InputError("image is empty", self.name)
        # one pass: the extremes are finite exactly when every voxel is (a NaN propagates into both,
        # an infinity is one of them); isfinite + all + max + min were four passes (~6 ms a photo)
        data = self.data if self.data.dtype != torch.bool else self.data.to(torch.uint8)
        low, high = torch.aminmax(data)
        if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
            raise InputError("image contains NaN or Inf voxels", self.name)
        if float(high - low) == 0.0:
            raise InputError("image is constant (nothing to register)", self.name)

    def __repr__(self) -> str:
        return f"Image({self.name}, channels={self.channels}, {self.grid!r}, dtype={self.data.dtype})"


def colour_channels(tensor: Tensor) -> Tensor:
    """``(B, C, H, W)`` without an alpha channel: a 2D four-channel image is RGBA (the raster
    convention of PNG, TIFF and ``Image.from_array`` on ``(H, W, 4)``), and alpha is opacity, not
    brightness -- averaging it in would mix a constant into the luminance. Other shapes unchanged."""
    if tensor.dim() == 4 and tensor.shape[1] == 4:
        return tensor[:, :3]
    return tensor


def grey_channels(tensor: Tensor) -> Tensor:
    """``(B, C, *S)`` -> ``(B, 1, *S)``: the mean of the colour channels (alpha left out)."""
    if tensor.shape[1] == 1:
        return tensor
    return colour_channels(tensor).mean(1, keepdim=True)


def common_channels(fixed: Tensor, moving: Tensor) -> tuple[Tensor, Tensor]:
    """Bring ``fixed (B, Cf, *S)`` and ``moving (B, Cm, *S')`` to one channel layout so a voxel-wise
    comparison (a similarity, a checkerboard) means something: unchanged when ``Cf == Cm``, else both
    grey (:func:`grey_channels`) -- grey against RGB, RGB against RGBA, a grey picture stored as RGB
    against a colour one. The one place where mixed channel counts are reconciled."""
    if fixed.shape[1] == moving.shape[1]:
        return fixed, moving
    fixed_c, moving_c = colour_channels(fixed), colour_channels(moving)
    if fixed_c.shape[1] == moving_c.shape[1]:  # RGB against RGBA: the colour survives
        return fixed_c, moving_c
    return grey_channels(fixed_c), grey_channels(moving_c)
