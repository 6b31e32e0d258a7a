"""kornia: gradient-descent homography (``kornia:registrator``) and SIFT + RANSAC (``kornia:sift-ransac``).

Both run offline (no pretrained weights: LoFTR, DISK, KeyNet and LightGlue would need downloads and
are not offered), on the ``device`` the runner gives, on grey 2D images scaled jointly to [0, 1].

* ``kornia:registrator`` -- ``kornia.geometry.ImageRegistrator("homography", loss_fn=F.l1_loss,
  pyramid_levels=5, lr=1e-3, num_iterations=100, tolerance=1e-4)`` (kornia's defaults),
  ``register(src=moving, dst=fixed)``. kornia documents the returned model as mapping
  *destination* (fixed) coordinates to *source* (moving) coordinates, normalised with
  ``align_corners=False``; ``denormalize_homography(M, (H, W), (H, W), align_corners=False)`` turns it
  into pixels (pixel centres on integers), i.e. fixed pixel -> moving pixel, our direction. Both
  images must have one size (``ImageRegistrator`` refuses others).
* ``kornia:sift-ransac`` -- ``kornia.feature.SIFTFeature(num_features=2000, upright=False)`` (DoG
  detector, orientation and RootSIFT descriptor, all hand-crafted), ``match_snn(th=0.8)`` (ratio
  test), ``kornia.geometry.RANSAC("homography", inl_th=3.0, max_iter=100)`` (``"affine"`` for
  ``affine`` cases; its sampling draws from torch's generator, seeded with the run's seed) from
  fixed keypoints to moving keypoints.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from alignkit.data.case import Case
from alignkit.evaluate.method import Method, Prediction
from alignkit.evaluate.peers._common import (
    check_device,
    grey_array,
    joint_unit,
    require,
    same_shape_2d,
    set_threads,
    world_matrix_from_pixel_matrix,
)

REGISTRATOR: dict[str, Any] = {"pyramid_levels": 5, "lr": 1e-3, "num_iterations": 100, "tolerance": 1e-4}


def _tensors(case: Case, device: str) -> tuple[Any, Any]:
    import torch

    fixed, moving = joint_unit(grey_array(case.fixed), grey_array(case.moving))
    return torch.from_numpy(fixed)[None, None].to(device), torch.from_numpy(moving)[None, None].to(device)


class KorniaRegistrator(Method):
    """``kornia.geometry.ImageRegistrator`` with a homography model (see the module docstring)."""

    name = "kornia:registrator"
    description = "kornia.geometry.ImageRegistrator('homography'), L1 loss, 5-level pyramid, Adam lr 1e-3"
    kinds: tuple[str, ...] = ("homography", "affine")
    ndims = (2,)

    def __init__(self, name: str = "kornia:registrator", **options: Any) -> None:
        unknown = set(options) - set(REGISTRATOR)
        if unknown:
            raise ValueError(f"{name}: unknown options {sorted(unknown)}")
        super().__init__(name, **options)
        self.settings = {**REGISTRATOR, **options}

    def check_available(self) -> None:
        require("kornia")

    def applicable(self, case: Case) -> str | None:
        return super().applicable(case) or same_shape_2d(case.fixed, case.moving, self.name)

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        set_threads(threads, itk_env=False)
        check_device(device)
        import torch
        import torch.nn.functional as F
        from kornia.geometry import ImageRegistrator
        from kornia.geometry.conversions import denormalize_homography

        torch.manual_seed(seed)
        fixed, moving = _tensors(case, device)
        registrator = ImageRegistrator("homography", loss_fn=F.l1_loss, **self.settings).to(device)
        started = time.perf_counter()
        model = registrator.register(moving, fixed)
        assert isinstance(model, torch.Tensor)  # a tuple only with output_intermediate_models=True
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        size = (int(fixed.shape[-2]), int(fixed.shape[-1]))
        pixel = denormalize_homography(model.detach().double().cpu(), size, size, align_corners=False)[0].numpy()
        matrix = world_matrix_from_pixel_matrix(pixel, case.fixed.grid, case.moving.grid)
        return Prediction(matrix=matrix, seconds=seconds, extra=dict(self.settings))


class KorniaSiftRansac(Method):
    """kornia's SIFT features, ratio-test matching and RANSAC (see the module docstring)."""

    name = "kornia:sift-ransac"
    description = "kornia.feature.SIFTFeature + match_snn(0.8) + kornia RANSAC (3 px)"
    kinds: tuple[str, ...] = ("homography", "affine")
    ndims = (2,)

    def __init__(self, name: str = "kornia:sift-ransac", **options: Any) -> None:
        super().__init__(name, **options)
        rest = dict(options)
        self.num_features = int(rest.pop("num_features", 2000))
        self.ratio = float(rest.pop("ratio", 0.8))
        self.threshold = float(rest.pop("ransac_threshold", 3.0))
        self.max_iter = int(rest.pop("max_iter", 100))
        if rest:
            raise ValueError(f"{name}: unknown options {sorted(rest)}")

    def check_available(self) -> None:
        require("kornia")

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        set_threads(threads, itk_env=False)
        check_device(device)
        import torch
        from kornia.feature import SIFTFeature, get_laf_center, match_snn
        from kornia.geometry import RANSAC

        torch.manual_seed(seed)
        fixed, moving = _tensors(case, device)
        started = time.perf_counter()
        sift = SIFTFeature(num_features=self.num_features, upright=False, device=torch.device(device))
        with torch.no_grad():
            laf_f, _, desc_f = sift(fixed)
            laf_m, _, desc_m = sift(moving)
            pts_f = get_laf_center(laf_f)[0]  # (N, 2) pixels, (x, y)
            pts_m = get_laf_center(laf_m)[0]
            _, idx = match_snn(desc_f[0], desc_m[0], th=self.ratio)
            extra: dict[str, Any] = {"keypoints_fixed": int(pts_f.shape[0]), "keypoints_moving": int(pts_m.shape[0])}
            extra["matches"] = int(idx.shape[0])
            pixel = np.eye(3)
            inliers = 0
            model_type = "affine" if case.kind == "affine" else "homography"
            if idx.shape[0] >= 8:
                # unseeded, RANSAC samples from torch's global generator, seeded above (older kornia
                # releases have no ``seed`` argument)
                ransac = RANSAC(model_type, inl_th=self.threshold, max_iter=self.max_iter)
                model, mask = ransac(pts_f[idx[:, 0]].double(), pts_m[idx[:, 1]].double())
                model = model.double().cpu().numpy()
                if model.shape == (2, 3):  # some kornia versions return affine models without the last row
                    model = np.vstack([model, [0.0, 0.0, 1.0]])
                inliers = int(mask.sum())
                # RANSAC returns zeros when no model has enough inliers: keep the identity then
                if inliers > 0 and abs(model[2, 2]) > 1e-12:
                    pixel = model / model[2, 2]
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        extra.update(inliers=inliers, failed=bool(inliers == 0))
        matrix = world_matrix_from_pixel_matrix(pixel, case.fixed.grid, case.moving.grid)
        return Prediction(matrix=matrix, seconds=seconds, extra=extra)
