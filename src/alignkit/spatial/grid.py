"""Grids: a shape plus the affine that places its voxels in the world.

Convention (the one every other module follows; see ``alignkit.spatial`` for the whole list):

* **voxel frame** -- continuous array indices in *array-axis order* (axis 0, axis 1[, axis 2]) of
  the spatial dimensions of a tensor ``(B, C, *spatial)``; voxel centres sit on integers.
* **world frame** -- physical coordinates in the ITK/DICOM **LPS** frame, components ``(x, y[, z])``,
  in millimetres (pixels for photographs). NIfTI's RAS affines are converted to LPS by the NIfTI
  reader and back by its writer; nothing else in alignkit knows RAS.
* ``world_from_voxel`` is a ``(ndim + 1, ndim + 1)`` float64 homogeneous matrix:
  ``world = world_from_voxel @ [voxel; 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from alignkit.errors import ShapeError


def _as_affine(matrix: Tensor | Sequence[Sequence[float]], ndim: int) -> Tensor:
    affine = torch.as_tensor(matrix, dtype=torch.float64).detach().cpu().clone()
    if affine.shape != (ndim + 1, ndim + 1):
        raise ShapeError(f"world_from_voxel must be {(ndim + 1, ndim + 1)} for a {ndim}D grid, got {tuple(affine.shape)}")
    if not torch.isfinite(affine).all():
        raise ShapeError("world_from_voxel contains NaN or Inf")
    if abs(float(torch.linalg.det(affine[:ndim, :ndim]))) < 1e-12:
        raise ShapeError("world_from_voxel is singular (zero spacing or degenerate directions)")
    return affine


@dataclass(frozen=True, eq=False)
class Grid:
    """A regular grid of voxels placed in the world by ``world_from_voxel`` (LPS, float64, CPU)."""

    shape: tuple[int, ...]
    world_from_voxel: Tensor

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if len(shape) not in (2, 3) or min(shape) < 1:
            raise ShapeError(f"a grid is 2D or 3D with positive sizes, got shape {shape}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "world_from_voxel", _as_affine(self.world_from_voxel, len(shape)))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_spacing(
        cls,
        shape: Sequence[int],
        spacing: Sequence[float] | float = 1.0,
        origin: Sequence[float] | None = None,
        direction: Tensor | None = None,
    ) -> Grid:
        """ITK-style construction: ``world = origin + direction @ diag(spacing) @ voxel``.

        ``spacing``/``origin``/``direction`` are given in *array-axis* order of the voxel frame
        (column ``a`` of ``direction`` is the world direction of array axis ``a``). The default
        direction maps array axis ``a`` to world axis ``a``.
        """
        ndim = len(shape)
        spacing_t = torch.as_tensor(spacing, dtype=torch.float64).expand(ndim)
        direction_t = torch.eye(ndim, dtype=torch.float64) if direction is None else torch.as_tensor(direction, dtype=torch.float64)
        affine = torch.eye(ndim + 1, dtype=torch.float64)
        affine[:ndim, :ndim] = direction_t * spacing_t
        if origin is not None:
            affine[:ndim, ndim] = torch.as_tensor(origin, dtype=torch.float64)
        return cls(tuple(shape), affine)

    @classmethod
    def raster_2d(cls, shape: Sequence[int], spacing: float = 1.0) -> Grid:
        """The grid of a photograph or PNG slice: world x = column, world y = row (as ITK reads PNGs)."""
        if len(shape) != 2:
            raise ShapeError(f"raster_2d expects (rows, cols), got {tuple(shape)}")
        swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
        return cls.from_spacing(shape, spacing, direction=swap)

    # -- properties ---------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def voxel_from_world(self) -> Tensor:
        return torch.linalg.inv(self.world_from_voxel)

    @property
    def spacing(self) -> Tensor:
        """Voxel size along each array axis (float64)."""
        return torch.linalg.norm(self.world_from_voxel[: self.ndim, : self.ndim], dim=0)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def center_world(self) -> Tensor:
        """World coordinates of the grid's geometric centre (float64, ``(ndim,)``)."""
        centre = torch.tensor([(s - 1) / 2 for s in self.shape] + [1.0], dtype=torch.float64)
        return (self.world_from_voxel @ centre)[: self.ndim]

    def extent(self) -> Tensor:
        """Physical length along each array axis (float64)."""
        return self.spacing * torch.tensor([max(s - 1, 1) for s in self.shape], dtype=torch.float64)

    # -- derived grids ------------------------------------------------------------------------
    def resized(self, shape: Sequence[int]) -> Grid:
        """Same field of view with another number of voxels; first and last voxel centres stay put
        (the ``align_corners=True`` convention used for every resize in alignkit)."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != self.ndim:
            raise ShapeError(f"resized: expected {self.ndim} sizes, got {shape}")
        scale = torch.tensor(
            [(old - 1) / (new - 1) if new > 1 else 1.0 for old, new in zip(self.shape, shape)], dtype=torch.float64
        )
        old_from_new = torch.eye(self.ndim + 1, dtype=torch.float64)
        old_from_new[: self.ndim, : self.ndim] = torch.diag(scale)
        return Grid(shape, self.world_from_voxel @ old_from_new)

    def downsampled(self, factor: float) -> Grid:
        return self.resized([max(2, round((s - 1) / factor) + 1) if s > 1 else 1 for s in self.shape])

    # -- points -------------------------------------------------------------------------------
    def voxel_points(self, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
        """Identity map in the voxel frame: ``(1, ndim, *shape)``, component ``a`` = index along axis ``a``."""
        axes = [torch.arange(s, dtype=dtype, device=device) for s in self.shape]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)

    def world_points(self, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
        """Identity map in the world frame: ``(1, ndim, *shape)`` world coordinates ``(x, y[, z])``."""
        from alignkit.spatial.points import apply_matrix

        return apply_matrix(self.world_from_voxel, self.voxel_points(dtype=torch.float64, device=device)).to(dtype)

    def same_as(self, other: Grid, atol: float = 1e-4) -> bool:
        return self.shape == other.shape and torch.allclose(self.world_from_voxel, other.world_from_voxel, atol=atol)

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.3g}" for s in self.spacing.tolist())
        return f"Grid(shape={self.shape}, spacing=({sp}))"
