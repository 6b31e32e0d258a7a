"""ConvexAdam (``convexadam``): MIND-SSC features, coupled convex optimisation, then Adam instance
optimisation -- run after Greedy's affine, as in the issue-17 comparison (``convexadam``; 3D only).

Pipeline:

1. Greedy's affine with the ``greedy:affine`` settings (:mod:`alignkit.evaluate.peers.greedy`:
   12 dof, NCC 2x2x2, image-centre start, 100x50x10), on the CPU (Greedy has no GPU path);
2. the moving image resampled onto the fixed grid through that affine (trilinear, zeros outside),
   because ConvexAdam registers two arrays of one shape;
3. ``convexAdam.convex_adam_MIND.convex_adam_pt(fixed, moved)`` with the package's defaults
   (``mind_r=1, mind_d=2, lambda_weight=1.25, grid_sp=6, disp_hw=4, selected_niter=80,
   selected_smooth=0, grid_sp_adam=2, ic=True``) on the runner's device, in float16 on CUDA (the
   package's default) and float32 on the CPU (where it has no float16).

ConvexAdam's displacement ``(H, W, D, 3)`` is in voxels of the array it was given, in that array's
axis order, and its own ``apply_convex`` samples the moving array at ``p + disp(p)``: that is
alignkit's flow on the fixed grid (:mod:`alignkit.spatial.frames`), so the map is the affine
applied to the flowed point, ``y = A world(p + flow(p))``. ``extra["devices"]`` says where each
stage ran. Constructor options override the ``convex_adam_pt`` settings above and Greedy's
``affine_iterations``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from alignkit.data.case import Case
from alignkit.evaluate.method import Method, Prediction
from alignkit.evaluate.peers._common import apply_homogeneous, check_device, require, set_threads
from alignkit.evaluate.peers.greedy import DEFAULTS as GREEDY_DEFAULTS
from alignkit.evaluate.peers.greedy import GreedySession
from alignkit.spatial.frames import world_map_from_flow
from alignkit.spatial.points import sample_world

#: ``convex_adam_pt`` keyword arguments and their package defaults (convexadam 0.2.0)
CONVEX_DEFAULTS: dict[str, Any] = {
    "mind_r": 1,
    "mind_d": 2,
    "lambda_weight": 1.25,
    "grid_sp": 6,
    "disp_hw": 4,
    "selected_niter": 80,
    "selected_smooth": 0,
    "grid_sp_adam": 2,
    "ic": True,
}


class ConvexAdamMethod(Method):
    """Greedy affine, then ConvexAdam with MIND features (see the module docstring)."""

    kinds: tuple[str, ...] = ("deformable", "affine")
    ndims: tuple[int, ...] = (3,)  # MIND-SSC, the correlation volume and the Adam grid are 3D-only

    def __init__(self, name: str = "convexadam", **options: Any) -> None:
        unknown = set(options) - set(CONVEX_DEFAULTS) - {"affine_iterations"}
        if unknown:
            raise ValueError(f"{name}: unknown options {sorted(unknown)}")
        super().__init__(name, **options)
        self.convex = {k: options.get(k, v) for k, v in CONVEX_DEFAULTS.items()}
        self.greedy = {**GREEDY_DEFAULTS, "affine_iterations": options.get("affine_iterations", "100x50x10")}
        self.description = "Greedy affine (NCC 2x2x2), then ConvexAdam (MIND-SSC, convex + Adam, package defaults)"

    def check_available(self) -> None:
        require("convexAdam", "convexadam")
        require("picsl_greedy", "picsl-greedy")
        require("SimpleITK")

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        set_threads(threads)
        check_device(device)
        torch.manual_seed(seed)
        from convexAdam.convex_adam_MIND import convex_adam_pt

        torch_device = torch.device(device)
        dtype = torch.float16 if torch_device.type == "cuda" else torch.float32
        session = GreedySession(case, self.greedy, seed=seed, threads=threads)
        fixed_grid = case.fixed.grid

        started = time.perf_counter()
        matrix = session.affine()
        affine_seconds = time.perf_counter() - started
        affine_points = torch.as_tensor(apply_homogeneous(matrix, fixed_grid.world_points(dtype=torch.float64)[0].numpy()))
        moved = sample_world(case.moving.grey().batch(dtype=torch.float64), case.moving.grid, affine_points[None])
        disp = convex_adam_pt(
            case.fixed.grey().data[0].float(),
            moved[0, 0].float(),
            dtype=dtype,
            device=torch_device,
            **self.convex,
        )
        if torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)
        seconds = time.perf_counter() - started

        flow = torch.as_tensor(np.moveaxis(np.asarray(disp, dtype=np.float64), -1, 0))[None]  # (1, 3, *shape) voxels
        flowed = world_map_from_flow(flow, fixed_grid)[0].numpy()
        extra = {"devices": f"greedy=cpu,convexadam={torch_device}", "affine_seconds": affine_seconds}
        return Prediction(world_map=apply_homogeneous(matrix, flowed), seconds=seconds, extra=extra)
