"""FireANTs (``fireants``): moments -> affine -> greedy deformable, on CPU or GPU (``fireants:greedy``).

Settings (FireANTs' README pipeline, on the ``device`` the runner gives):

1. ``MomentsRegistration(scale=1, moments=1)``: centre-of-mass translation;
2. ``AffineRegistration(scales=[4, 2, 1], iterations=[200, 100, 50], loss_type="cc",
   cc_kernel_size=5, optimizer="Adam", optimizer_lr=3e-3)`` from the moments;
3. ``GreedyRegistration(scales=[4, 2, 1], iterations=[200, 100, 50], loss_type="cc",
   cc_kernel_size=5, deformation_type="compositive", smooth_grad_sigma=1, smooth_warp_sigma=0.5,
   optimizer="Adam", optimizer_lr=0.5)`` from the affine.

Constructor options override ``scales``, ``iterations``, ``affine_iterations``, ``cc_kernel_size``,
``optimizer_lr``.

FireANTs builds its images from SimpleITK images (so from our LPS origin/spacing/direction) and
works in ``grid_sample`` coordinates of the moving image (``[-1, 1]``, ``x`` = ITK index ``i``);
``get_warped_coordinates`` gives them for every fixed voxel, and we turn them into LPS world
points with the moving image's own ``index -> world`` matrix, computed here in float64.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from alignkit.data.case import Case
from alignkit.evaluate.method import Method, Prediction
from alignkit.evaluate.peers._common import (
    ItkLayout,
    apply_homogeneous,
    check_device,
    itk_layout,
    require,
    set_threads,
    sitk_image,
)
from alignkit.spatial.frames import unit_from_voxel

DEFAULTS: dict[str, Any] = {
    "scales": [4, 2, 1],
    "iterations": [200, 100, 50],
    "affine_iterations": [200, 100, 50],
    "cc_kernel_size": 5,
    "optimizer_lr": 0.5,
}


def world_from_normalized(layout: ItkLayout) -> np.ndarray:
    """``grid_sample`` coordinates (``align_corners=True``, components in ITK index order) of an image
    with this layout -> LPS world, as a homogeneous float64 matrix.

    FireANTs samples the SimpleITK array ``[k, j, i]``, so ``grid_sample``'s reversed components are
    ITK index order ``(i, j, k)``: its normalised frame is the unit frame of the ITK index grid.
    """
    n = layout.ndim
    world_from_index = np.eye(n + 1)
    world_from_index[:n, :n] = layout.direction * layout.spacing
    world_from_index[:n, n] = layout.origin
    index_from_unit = np.linalg.inv(unit_from_voxel(layout.size).numpy())
    return world_from_index @ index_from_unit


class FireANTsGreedy(Method):
    """FireANTs moments + affine + greedy deformable registration (see the module docstring)."""

    kinds: tuple[str, ...] = ("deformable", "flow", "affine")

    def __init__(self, name: str = "fireants:greedy", **options: Any) -> None:
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"{name}: unknown options {sorted(unknown)}")
        super().__init__(name, **options)
        self.settings = {**DEFAULTS, **options}
        self.description = "FireANTs: moments -> affine (CC) -> greedy compositive (CC)"

    def check_available(self) -> None:
        require("fireants")
        require("SimpleITK")

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        set_threads(threads)
        import torch

        check_device(device)
        torch.manual_seed(seed)
        from fireants.io.image import BatchedImages
        from fireants.io.image import Image as FImage
        from fireants.registration.affine import AffineRegistration
        from fireants.registration.greedy import GreedyRegistration
        from fireants.registration.moments import MomentsRegistration

        st = self.settings
        flayout, mlayout = itk_layout(case.fixed.grid), itk_layout(case.moving.grid)
        fixed = BatchedImages([FImage(sitk_image(case.fixed, flayout), device=device)])
        moving = BatchedImages([FImage(sitk_image(case.moving, mlayout), device=device)])
        common = {"loss_type": "cc", "cc_kernel_size": int(st["cc_kernel_size"]), "progress_bar": False}

        started = time.perf_counter()
        moments = MomentsRegistration(1.0, fixed, moving, moments=1, **common)
        moments.optimize()
        affine = AffineRegistration(
            list(st["scales"]), list(st["affine_iterations"]), fixed, moving, optimizer="Adam", optimizer_lr=3e-3,
            init_rigid=moments.get_affine_init(), **common,
        )
        affine.optimize()
        greedy = GreedyRegistration(
            scales=list(st["scales"]), iterations=list(st["iterations"]), fixed_images=fixed, moving_images=moving,
            deformation_type="compositive", smooth_grad_sigma=1.0, smooth_warp_sigma=0.5, optimizer="Adam",
            optimizer_lr=float(st["optimizer_lr"]), init_affine=affine.get_affine_matrix().detach(), **common,
        )
        greedy.optimize()
        with torch.no_grad():
            coords = greedy.get_warped_coordinates(fixed, moving)  # (1, *sitk-order fixed shape, ndim)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started

        normalized = flayout.from_sitk_order(coords[0].detach().double().cpu().numpy())  # (*shape, ndim)
        world = apply_homogeneous(world_from_normalized(mlayout), np.moveaxis(normalized, -1, 0))
        return Prediction(world_map=world, seconds=seconds, extra={"device": str(device)})
