"""The result every registration method returns, and the input preparation they all share.

:class:`Registration` holds the fixed and moving images, the transform (any
:class:`~alignkit.transforms.Transform`: a matrix, a homography, a field or a composed chain; it maps
fixed-world points to moving-world points, so ``warped = moving ∘ transform``), what produced it
(method, stage kinds, a JSON-safe description) and the metrics. Every method in
:mod:`alignkit.methods` -- classical optimisation, learned, learned per pair -- returns this same
object, so the warped image, the ``transform/`` folder (ITK affine + ANTs/ITK displacement field),
``metrics.json``, ``qc.png`` and ``flow.flo`` are written by the same code. A stereo registration (a
chain with a :class:`~alignkit.transforms.DisparityField` stage) also writes ``disparity.pfm``,
``disparity.png`` (KITTI 16-bit) and ``occlusion.png``, and its QC figure shows the disparity.

This module sits below ``train/`` and ``methods/``: both import it, it imports neither.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from alignkit.errors import InputError
from alignkit.image import Image, common_channels
from alignkit.solve import normalize_intensity
from alignkit.spatial import (
    Grid,
    flow_from_world_map,
    jacobian_determinant,
    points_to_tensor,
    sample_world,
    tensor_to_points,
    xy_from_flow,
)
from alignkit.transforms import DisparityField, Transform, flatten_stages
from alignkit.transforms.folder import save_transform

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


def device_of(transform: Transform) -> torch.device:
    tensor: Tensor | None = next(iter(transform.parameters()), None)
    if tensor is None:
        tensor = next(iter(transform.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def resample_image(
    transform: Transform, fixed_grid: Grid, image: Image, *, labels: bool = False, device: str | torch.device | None = None
) -> Image:
    """``image ∘ transform`` on ``fixed_grid``: linear interpolation, nearest for label maps."""
    device = torch.device(device) if device is not None else device_of(transform)
    world = transform.to(device).map_on(fixed_grid, device=device)
    out = sample_world(image.batch(device=device), image.grid, world, mode="nearest" if labels else "linear")
    if labels:
        out = out.round().to(image.data.dtype)
    return Image(out[0].cpu(), fixed_grid, path=None, meta=dict(image.meta))


@torch.no_grad()
def map_points(transform: Transform, points: Tensor) -> Tensor:
    """Fixed-space world points ``(N, ndim)`` → moving-space world points (the transform's direction)."""
    device = device_of(transform)
    return tensor_to_points(transform.transform_points(points_to_tensor(points.float()).to(device))).cpu()


@dataclass(frozen=True)
class Inputs:
    """A registration's checked inputs: images, optional label maps on their images' grids, optional
    corresponding landmarks (world points ``(N, ndim)``, given for both images or neither)."""

    fixed: Image
    moving: Image
    fixed_labels: Image | None = None
    moving_labels: Image | None = None
    fixed_points: Tensor | None = None
    moving_points: Tensor | None = None

    @property
    def ndim(self) -> int:
        return self.fixed.ndim


@dataclass
class Registration:
    """The result of :func:`alignkit.register`: the transform (fixed→moving points), the warped image
    and metrics.

    ``method`` is the registry name that produced it (``classical``, ``voxelmorph`` ...), ``name``
    what it ran (the preset, or ``voxelmorph+refine``), ``stages`` the kind of each stage in order
    (``["affine", "svf"]``), ``description`` a JSON-safe record of the settings (saved in the
    transform manifest).
    """

    fixed: Image
    moving: Image
    transform: Transform
    method: str = "classical"
    name: str = ""
    stages: list[str] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict)
    fixed_labels: Image | None = None
    moving_labels: Image | None = None
    _warped: Image | None = None
    _world_map: tuple[tuple, Tensor] | None = field(default=None, repr=False)
    _metrics: dict[str, Any] = field(default_factory=dict, repr=False)
    # computes the image metrics on first read of :attr:`metrics` (see :meth:`defer_metrics`)
    _pending_metrics: Callable[[], dict[str, Any]] | None = field(default=None, repr=False)

    # -- metrics --------------------------------------------------------------------------------
    @property
    def metrics(self) -> dict[str, Any]:
        """Similarity before/after, % non-positive Jacobians, Dice, TRE, run time and what the method
        recorded (stage seconds ...). Computed on first read when deferred (:meth:`defer_metrics`)."""
        if self._pending_metrics is not None:
            pending, self._pending_metrics = self._pending_metrics, None
            # the computed entries first, then those recorded directly (stage seconds, method extras),
            # as when everything was computed at once
            self._metrics = {**pending(), **self._metrics}
        return self._metrics

    @metrics.setter
    def metrics(self, value: dict[str, Any]) -> None:
        self._metrics = dict(value)
        self._pending_metrics = None

    def defer_metrics(self, compute: Callable[[], dict[str, Any]]) -> None:
        """Compute the image metrics with ``compute`` when :attr:`metrics` is first read, not now: they
        resample both images and differentiate the whole map (~0.3 s on a 2 mm brain, ~7 % of a
        registration), which a caller that wants only the transform should not pay for. Entries set in
        :attr:`metrics` meanwhile are kept (over computed ones of the same name)."""
        self._pending_metrics = compute

    # -- applying -------------------------------------------------------------------------------
    @torch.no_grad()
    def world_map(self, grid: Grid | None = None) -> Tensor:
        """The map on ``grid`` (default: the fixed grid), ``(1, ndim, *grid.shape)`` world points. The
        fixed grid's is kept while the transform's tensors are unchanged (the same objects, not modified
        in place): the metrics, :meth:`flow` and :meth:`disparity` all read it."""
        if grid is not None and grid is not self.fixed.grid:
            return self.transform.map_on(grid, device=device_of(self.transform))
        state = tuple((id(t), t._version) for t in (*self.transform.parameters(), *self.transform.buffers()))
        if self._world_map is None or self._world_map[0] != (id(self.transform), state):
            self._world_map = ((id(self.transform), state),
                               self.transform.map_on(self.fixed.grid, device=device_of(self.transform)))
        return self._world_map[1].clone()

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

    # -- flow -----------------------------------------------------------------------------------
    @torch.no_grad()
    def flow(self) -> np.ndarray:
        """The registration as a flow: ``(ndim, *fixed.shape)`` float32, voxels of the fixed grid,
        array-axis order (``(dy, dx)`` in 2D), ``fixed(p) ≈ moving(p + flow(p))`` -- the one flow of
        :mod:`alignkit.spatial` (2D and 3D). :func:`alignkit.spatial.xy_from_flow` gives the
        ``(H, W, 2)`` x-then-y layout of ``flow.flo`` and OpenCV."""
        return flow_from_world_map(self.world_map(), self.fixed.grid)[0].cpu().numpy().astype(np.float32)

    # -- stereo ---------------------------------------------------------------------------------
    @property
    def is_stereo(self) -> bool:
        """Whether the transform has a disparity stage (the ``stereo`` preset, ``stereo-net``)."""
        return self.fixed.ndim == 2 and any(isinstance(s, DisparityField) for s in flatten_stages(self.transform))

    @torch.no_grad()
    def disparity(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The left (fixed) image's disparity ``(H, W)`` float32 pixels, ``left(x) = right(x - d)``
        (minus the column component of :meth:`flow`, so it is defined for any 2D registration), and
        the occlusion mask a stage carries (the left-right check's; None when no stage has one)."""
        if self.fixed.ndim != 2:
            raise InputError("a disparity is defined for 2D image pairs")
        occluded = next((s.occluded.cpu().numpy().astype(bool) for s in flatten_stages(self.transform)
                         if isinstance(s, DisparityField) and s.occluded is not None), None)
        return -self.flow()[-1], occluded

    # -- saving ---------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, *, moving_suffix: str | None = None, qc: bool = True) -> Path:
        """Write warped image(s), ``transform/``, ``metrics.json``, ``qc.png`` (and ``flow.flo`` in
        2D: :meth:`flow` in the file's ``(H, W, 2)`` x-then-y layout) into ``directory``. Files appear
        only once all of them are written."""
        from alignkit.io import write_image

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        suffix = moving_suffix or suffix_of(self.moving) or (".nii.gz" if self.fixed.ndim == 3 else ".png")
        tmp = Path(tempfile.mkdtemp(prefix=".alignkit-tmp-", dir=directory))
        try:
            write_image(self.warped, tmp / f"warped{suffix}")
            if self.moving_labels is not None:
                labels = self.warped_labels
                assert labels is not None
                label_suffix = suffix_of(self.moving_labels) or suffix
                write_image(labels, tmp / f"warped_labels{label_suffix}")
            save_transform(
                self.transform, self.fixed.grid, tmp / "transform",
                extra={"method": self.method, "name": self.name, "stage_kinds": list(self.stages),
                       "config": self.description},
            )
            (tmp / "metrics.json").write_text(json.dumps(self.metrics, indent=2, default=float))
            if self.fixed.ndim == 2:
                from alignkit.io.flo import write_flo

                write_flo(tmp / "flow.flo", xy_from_flow(self.flow()))  # the file's (H, W, 2) x, y
            if self.is_stereo:
                self._write_stereo(tmp)
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

    def _write_stereo(self, directory: Path) -> None:
        """``disparity.pfm`` (float, Middlebury), ``disparity.png`` (KITTI: ``d * 256``, 0 where the
        disparity is not positive) and, when a stage carries one, ``occlusion.png`` (255 = rejected by
        the left-right check and filled)."""
        from PIL import Image as PILImage

        from alignkit.io.disparity import write_kitti_disparity, write_pfm

        disparity, occluded = self.disparity()
        write_pfm(directory / "disparity.pfm", disparity)
        write_kitti_disparity(directory / "disparity.png", disparity)
        if occluded is not None:
            PILImage.fromarray((occluded * 255).astype(np.uint8)).save(directory / "occlusion.png")

    @torch.no_grad()
    def _write_qc(self, path: Path) -> None:
        from alignkit.viz import save_qc_figure

        world = self.world_map()
        identity = self.fixed.grid.world_points(device=world.device)
        before = sample_world(self.moving.batch(device=world.device), self.moving.grid, identity)
        # the panels compare fixed and moving pixel by pixel: a grey fixed against an RGB(A) moving
        # (a grey picture stored as RGB, a NIR against a colour photo) is shown in grey on both sides
        fixed_shown, before = common_channels(self.fixed.batch(device=world.device), before)
        _, after = common_channels(self.fixed.batch(device=world.device), self.warped.batch(device=world.device))
        displacement = (world - identity)[0].cpu().numpy()
        det = jacobian_determinant(world, self.fixed.grid)[0, 0].cpu().numpy()

        def to_np(t: Tensor) -> np.ndarray:
            t = t[0].float().cpu()
            return t[0].numpy() if t.shape[0] == 1 else t.permute(*range(1, t.dim()), 0).numpy()

        save_qc_figure(
            path,
            to_np(fixed_shown),
            to_np(before),
            to_np(after),
            displacement=displacement,
            jacobian_det=det,
            grid=self.fixed.grid,
            title=f"alignkit {self.name or self.method}: {self.moving.name} → {self.fixed.name}",
            **(dict(zip(("disparity", "occluded"), self.disparity())) if self.is_stereo else {}),
            # a deformable 2D registration (optical flow, a field) also shows its flow in the colour wheel
            **({"flow": self.flow()} if self.fixed.ndim == 2 and not self.is_stereo and not self.transform.is_linear
               else {}),
        )


def suffix_of(image: Image) -> str | None:
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
    normalised: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Any]:
    """similarity before/after, Dice (per label and mean), TRE, % non-positive Jacobians, run time.

    ``normalised``: the images as this function normalises them (``normalize_intensity`` then
    ``common_channels`` of ``fixed`` and ``moving``), when the method computed them already (the
    classical engine's ``Engine.normalised``): used instead of normalising again."""
    from alignkit.metrics import dice_per_label, jacobian_stats, ncc, tre

    fixed, moving = registration.fixed, registration.moving
    world = registration.world_map()
    device = world.device
    if normalised is not None:
        fixed_t, moving_t = (t.to(device) for t in normalised)
    else:
        fixed_t = normalize_intensity(fixed.batch(device=device))
        moving_t = normalize_intensity(moving.batch(device=device))
        fixed_t, moving_t = common_channels(fixed_t, moving_t)
    # contiguous once (an image read from an (H, W, C) array is a channels-last view): the masked
    # selections and differences below are ~1.5x faster on it, with the same values
    fixed_t, moving_t = fixed_t.contiguous(), moving_t.contiguous()
    identity = fixed.grid.world_points(device=device)
    # the image and its overlap (ones) sampled together: one set of coordinates and one grid_sample per
    # map (channels are sampled independently: the same values as two calls)
    with_ones = torch.cat([moving_t, torch.ones_like(moving_t[:, :1])], dim=1)
    channels = moving_t.shape[1]
    before, overlap_before = sample_world(with_ones, moving.grid, identity).split([channels, 1], dim=1)
    after, overlap_after = sample_world(with_ones, moving.grid, world).split([channels, 1], dim=1)
    metrics: dict[str, Any] = {
        "method": registration.method,
        "preset": registration.name,
        "stages": list(registration.stages),
        "ncc_before": ncc(before, fixed_t, overlap_before > 0.5),
        "ncc_after": ncc(after, fixed_t, overlap_after > 0.5),
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
) -> Inputs:
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
    return Inputs(fixed_image, moving_image, fixed_lab, moving_lab, fixed_pts, moving_pts)


