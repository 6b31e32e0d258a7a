"""``alignkit.register``: the classical engine behind one call, and the :class:`Registration` it returns."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from alignkit.errors import ConfigError, InputError
from alignkit.image import Image
from alignkit.methods.artifacts import save_transform
from alignkit.solve import Engine, RegistrationConfig, normalize_intensity
from alignkit.solve.presets import resolve_config
from alignkit.spatial import (
    Grid,
    apply_matrix,
    jacobian_determinant,
    points_to_tensor,
    sample_world,
    tensor_to_points,
)
from alignkit.transforms import ComposedTransform, Transform

ImageLike = Image | str | os.PathLike | np.ndarray | Tensor


def as_image(value: ImageLike, *, labels: bool = False, role: str = "image") -> Image:
    """Accept an :class:`Image`, a path, or an array (2D arrays get the raster grid)."""
    if isinstance(value, Image):
        return value
    if isinstance(value, (str, os.PathLike)):
        from alignkit.io import read_image

        return read_image(value, labels=labels)
    if isinstance(value, (np.ndarray, Tensor)):
        return Image.from_array(value)
    raise InputError(f"{role}: expected an Image, a path or an array, got {type(value).__name__}")


def as_points(value: Any, ndim: int, role: str) -> Tensor | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        from alignkit.io import read_points

        return read_points(value, ndim).float()
    points = torch.as_tensor(np.asarray(value), dtype=torch.float32)
    if points.dim() != 2 or points.shape[1] != ndim:
        raise InputError(f"{role}: landmarks must be (N, {ndim}), got {tuple(points.shape)}")
    return points


def check_pair(fixed: Image, moving: Image) -> None:
    for image in (fixed, moving):
        image.check_finite()
    if fixed.ndim != moving.ndim:
        raise InputError(f"is {moving.ndim}D but the fixed image {fixed.name} is {fixed.ndim}D", moving.name)


def check_labels(labels: Image, image: Image) -> None:
    if not labels.grid.same_as(image.grid, atol=1e-3):
        raise InputError(
            f"label map is on another grid ({labels.grid}) than its image {image.name} ({image.grid})", labels.name
        )


def _ncc(a: Tensor, b: Tensor, mask: Tensor | None = None) -> float:
    if mask is not None:
        mask = mask.expand_as(a)
    a, b = a.double().flatten(), b.double().flatten()
    if mask is not None:
        keep = mask.flatten() > 0
        a, b = a[keep], b[keep]
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def _device_of(transform: Transform) -> torch.device:
    tensor: Tensor | None = next(iter(transform.parameters()), None)
    if tensor is None:
        tensor = next(iter(transform.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def resample_image(
    transform: Transform, fixed_grid: Grid, image: Image, *, labels: bool = False, device: str | torch.device | None = None
) -> Image:
    """``image ∘ transform`` on ``fixed_grid``: linear interpolation, nearest for label maps."""
    device = torch.device(device) if device is not None else _device_of(transform)
    world = transform.to(device).map_on(fixed_grid, device=device)
    out = sample_world(image.batch(device=device), image.grid, world, mode="nearest" if labels else "linear")
    if labels:
        out = out.round().to(image.data.dtype)
    return Image(out[0].cpu(), fixed_grid, path=None, meta=dict(image.meta))


@torch.no_grad()
def map_points(transform: Transform, points: Tensor) -> Tensor:
    """Fixed-space world points ``(N, ndim)`` → moving-space world points (the transform's direction)."""
    device = _device_of(transform)
    return tensor_to_points(transform.transform_points(points_to_tensor(points.float()).to(device))).cpu()


@dataclass
class Registration:
    """The result of :func:`register`: the transform (fixed→moving points), the warped image and metrics."""

    fixed: Image
    moving: Image
    transform: ComposedTransform
    config: RegistrationConfig
    metrics: dict[str, Any] = field(default_factory=dict)
    fixed_labels: Image | None = None
    moving_labels: Image | None = None
    _warped: Image | None = None

    # -- applying -------------------------------------------------------------------------------
    @torch.no_grad()
    def world_map(self, grid: Grid | None = None) -> Tensor:
        grid = grid or self.fixed.grid
        return self.transform.map_on(grid, device=_device_of(self.transform))

    def apply(self, image: ImageLike, *, labels: bool = False) -> Image:
        """Resample an image of the moving space onto the fixed grid (nearest for label maps)."""
        return resample_image(self.transform, self.fixed.grid, as_image(image, labels=labels), labels=labels)

    def apply_points(self, points: Any) -> Tensor:
        """Map fixed-space world points ``(N, ndim)`` to the moving space (ITK's direction)."""
        pts = as_points(points, self.fixed.ndim, "points")
        if pts is None:
            raise InputError("no points given")
        return map_points(self.transform, pts)

    @property
    def warped(self) -> Image:
        if self._warped is None:
            self._warped = self.apply(self.moving)
        return self._warped

    @property
    def warped_labels(self) -> Image | None:
        if self.moving_labels is None:
            return None
        return self.apply(self.moving_labels, labels=True)

    # -- flow (2D) ------------------------------------------------------------------------------
    @torch.no_grad()
    def flow(self) -> np.ndarray:
        """2D only: displacement in pixels on the fixed grid, ``(H, W, 2)`` x then y, Middlebury
        convention ``fixed(p) ≈ moving(p + flow(p))``; x is the last array axis (the column)."""
        if self.fixed.ndim != 2:
            raise ConfigError("flow is defined for 2D registrations only")
        world = self.world_map()
        moving_voxel = apply_matrix(self.moving.grid.voxel_from_world, world)[0].cpu()
        fixed_voxel = self.fixed.grid.voxel_points(dtype=torch.float32)[0]
        # Both voxel frames are (row, col); moving pixel coordinates are compared with fixed ones,
        # which assumes the two rasters share a pixel frame (true for photographs and video frames).
        disp = (moving_voxel - fixed_voxel).flip(0)
        return disp.permute(1, 2, 0).numpy().astype(np.float32)

    # -- saving ---------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, *, moving_suffix: str | None = None, qc: bool = True) -> Path:
        """Write warped image(s), ``transform/``, ``metrics.json``, ``qc.png`` (and ``flow.flo`` in
        2D) into ``directory``. Files appear only once all of them are written."""
        from alignkit.io import write_image

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        suffix = moving_suffix or _suffix_of(self.moving) or (".nii.gz" if self.fixed.ndim == 3 else ".png")
        tmp = Path(tempfile.mkdtemp(prefix=".alignkit-tmp-", dir=directory))
        try:
            write_image(self.warped, tmp / f"warped{suffix}")
            if self.moving_labels is not None:
                labels = self.warped_labels
                assert labels is not None
                label_suffix = _suffix_of(self.moving_labels) or suffix
                write_image(labels, tmp / f"warped_labels{label_suffix}")
            save_transform(self.transform, self.fixed.grid, tmp / "transform", extra={"config": self.config.to_dict()})
            (tmp / "metrics.json").write_text(json.dumps(self.metrics, indent=2, default=float))
            if self.fixed.ndim == 2:
                from alignkit.io.flo import write_flo

                write_flo(tmp / "flow.flo", self.flow())
            if qc:
                self._write_qc(tmp / "qc.png")
            for entry in tmp.iterdir():
                target = directory / entry.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(entry, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory

    @torch.no_grad()
    def _write_qc(self, path: Path) -> None:
        from alignkit.viz import save_qc_figure

        world = self.world_map()
        before = sample_world(self.moving.batch(device=world.device), self.moving.grid, self.fixed.grid.world_points(device=world.device))
        identity = self.fixed.grid.world_points(device=world.device)
        displacement = (world - identity)[0].cpu().numpy()
        det = jacobian_determinant(world, self.fixed.grid)[0, 0].cpu().numpy()

        def to_np(t: Tensor) -> np.ndarray:
            t = t[0].float().cpu()
            return t[0].numpy() if t.shape[0] == 1 else t.permute(*range(1, t.dim()), 0).numpy()

        save_qc_figure(
            path,
            to_np(self.fixed.batch()),
            to_np(before),
            to_np(self.warped.batch()),
            displacement=displacement,
            jacobian_det=det,
            grid=self.fixed.grid,
            title=f"alignkit {self.config.name}: {self.moving.name} → {self.fixed.name}",
        )


def _suffix_of(image: Image) -> str | None:
    if not image.path:
        return None
    name = Path(image.path).name.lower()
    for double in (".nii.gz", ".tar.gz"):
        if name.endswith(double):
            return double
    return Path(image.path).suffix or None


@torch.no_grad()
def compute_metrics(
    registration: Registration,
    *,
    fixed_points: Tensor | None = None,
    moving_points: Tensor | None = None,
    seconds: float | None = None,
) -> dict[str, Any]:
    """similarity before/after, Dice (per label and mean), TRE, % non-positive Jacobians, run time."""
    from alignkit.metrics import dice_per_label, jacobian_stats, tre

    fixed, moving = registration.fixed, registration.moving
    world = registration.world_map()
    device = world.device
    fixed_t = normalize_intensity(fixed.batch(device=device))
    moving_t = normalize_intensity(moving.batch(device=device))
    if fixed_t.shape[1] != moving_t.shape[1]:
        fixed_t, moving_t = fixed_t.mean(1, keepdim=True), moving_t.mean(1, keepdim=True)
    identity = fixed.grid.world_points(device=device)
    before = sample_world(moving_t, moving.grid, identity)
    after = sample_world(moving_t, moving.grid, world)
    ones = torch.ones_like(moving_t[:, :1])
    overlap_before = sample_world(ones, moving.grid, identity)
    overlap_after = sample_world(ones, moving.grid, world)
    metrics: dict[str, Any] = {
        "preset": registration.config.name,
        "stages": [s.transform for s in registration.config.stages],
        "ncc_before": _ncc(before, fixed_t, overlap_before > 0.5),
        "ncc_after": _ncc(after, fixed_t, overlap_after > 0.5),
        "mse_before": float(((before - fixed_t) ** 2).mean()),
        "mse_after": float(((after - fixed_t) ** 2).mean()),
    }
    det = jacobian_determinant(world, fixed.grid)[0, 0].cpu()
    stats = jacobian_stats(det)
    metrics["jacobian"] = stats
    metrics["nonpositive_jacobian_percent"] = stats["percent_nonpositive"]
    if registration.fixed_labels is not None and registration.moving_labels is not None:
        warped_labels = registration.warped_labels
        assert warped_labels is not None
        before_labels = sample_world(
            registration.moving_labels.batch(device=device), registration.moving_labels.grid, identity, mode="nearest"
        )
        fixed_labels = registration.fixed_labels.data[0].cpu().numpy()
        per_label = dice_per_label(warped_labels.data[0].cpu().numpy(), fixed_labels)
        per_label_before = dice_per_label(before_labels[0, 0].cpu().numpy(), fixed_labels)
        metrics["dice_mean_before"] = float(np.mean(list(per_label_before.values()))) if per_label_before else float("nan")
        metrics["dice_mean"] = float(np.mean(list(per_label.values()))) if per_label else float("nan")
        metrics["dice"] = {str(k): v for k, v in per_label.items()}
    if fixed_points is not None and moving_points is not None:
        mapped = registration.apply_points(fixed_points)
        metrics["tre_before"] = tre(fixed_points.numpy(), moving_points.numpy())
        metrics["tre"] = tre(mapped.numpy(), moving_points.numpy())
    if seconds is not None:
        metrics["seconds"] = seconds
    return metrics


def prepare_inputs(
    fixed: Any, moving: Any, fixed_labels: Any, moving_labels: Any, fixed_landmarks: Any, moving_landmarks: Any
) -> tuple[Image, Image, Image | None, Image | None, Tensor | None, Tensor | None]:
    """Read and check a registration's inputs (shared by the classical and learned paths): images,
    optional label maps on their images' grids, optional landmark lists given for both or neither."""
    fixed_image = as_image(fixed, role="fixed")
    moving_image = as_image(moving, role="moving")
    check_pair(fixed_image, moving_image)
    fixed_lab = as_image(fixed_labels, labels=True) if fixed_labels is not None else None
    moving_lab = as_image(moving_labels, labels=True) if moving_labels is not None else None
    if fixed_lab is not None:
        check_labels(fixed_lab, fixed_image)
    if moving_lab is not None:
        check_labels(moving_lab, moving_image)
    fixed_pts = as_points(fixed_landmarks, fixed_image.ndim, "fixed landmarks")
    moving_pts = as_points(moving_landmarks, fixed_image.ndim, "moving landmarks")
    if (fixed_pts is None) != (moving_pts is None):
        raise InputError("landmarks must be given for both images")
    if fixed_pts is not None and moving_pts is not None and fixed_pts.shape != moving_pts.shape:
        raise InputError(f"fixed and moving landmark counts differ ({len(fixed_pts)} vs {len(moving_pts)})")
    return fixed_image, moving_image, fixed_lab, moving_lab, fixed_pts, moving_pts


def register(
    fixed: ImageLike,
    moving: ImageLike,
    *,
    preset: str | None = None,
    transform: str | list[str] | None = None,
    similarity: str | None = None,
    config: RegistrationConfig | dict[str, Any] | str | os.PathLike | None = None,
    fixed_labels: ImageLike | None = None,
    moving_labels: ImageLike | None = None,
    fixed_landmarks: Any = None,
    moving_landmarks: Any = None,
    device: str | torch.device | None = None,
    seed: int | None = 0,
    quiet: bool = True,
    initial: Transform | None = None,
    method: str = "classical",
    checkpoint: Any = None,
    refine: int = 0,
) -> Registration:
    """Register ``moving`` to ``fixed`` in world space and return a :class:`Registration`.

    ``fixed``/``moving`` are :class:`Image` objects, paths or arrays; they may differ in size,
    spacing and orientation. ``preset`` defaults to ``brain`` in 3D and ``default2d`` in 2D;
    ``transform`` (e.g. ``"rigid,affine,svf"``) and ``similarity`` override its choices. Labels
    and landmarks are used for metrics, and as test-time prompt terms when the configuration gives
    them a weight (``dice_weight``, ``landmark_weight``).

    ``method`` other than ``"classical"`` (e.g. ``"voxelmorph"``) predicts the transform with the
    trained model in ``checkpoint`` (see :func:`alignkit.train.inference.register_learned`: there
    ``transform`` names the linear pre-alignment) and refines it with ``refine`` iterations of the
    classical solver; the result is the same :class:`Registration`.
    """
    if method != "classical":
        if preset is not None or config is not None or initial is not None:
            raise ConfigError("preset, config and initial apply to the classical method, not to a learned one")
        from alignkit.train.inference import register_learned

        return register_learned(
            fixed, moving, method=method, checkpoint=checkpoint, refine=refine, transform=transform,
            similarity=similarity, fixed_labels=fixed_labels, moving_labels=moving_labels,
            fixed_landmarks=fixed_landmarks, moving_landmarks=moving_landmarks, device=device, seed=seed, quiet=quiet,
        )
    if checkpoint is not None or refine:
        raise ConfigError("checkpoint and refine need a learned method (e.g. method='voxelmorph')")
    fixed_image, moving_image, fixed_lab, moving_lab, fixed_pts, moving_pts = prepare_inputs(
        fixed, moving, fixed_labels, moving_labels, fixed_landmarks, moving_landmarks
    )

    cfg = resolve_config(fixed_image.ndim, preset=preset, transform=transform, similarity=similarity, config=config)
    progress = None
    if not quiet:
        from tqdm.auto import tqdm

        def progress(**kwargs: Any) -> Any:
            return tqdm(leave=False, dynamic_ncols=True, **kwargs)

    started = time.perf_counter()
    engine = Engine(cfg, device=device, seed=seed, progress=progress)
    chain = engine.run(
        fixed_image,
        moving_image,
        fixed_labels=fixed_lab,
        moving_labels=moving_lab,
        fixed_points=fixed_pts,
        moving_points=moving_pts,
        initial=initial,
    )
    seconds = time.perf_counter() - started
    result = Registration(fixed_image, moving_image, chain, cfg, fixed_labels=fixed_lab, moving_labels=moving_lab)
    result.metrics = compute_metrics(result, fixed_points=fixed_pts, moving_points=moving_pts, seconds=seconds)
    result.metrics["stage_seconds"] = {log.transform: round(log.seconds, 3) for log in engine.logs}
    if engine.init_info:
        result.metrics["init"] = dict(engine.init_info)
    return result
