"""Quality-control figure of a registration: checkerboards, colour overlays, deformed grid, Jacobian map.

Conventions
-----------
* Images are arrays (numpy or torch) on the **fixed grid**: ``(H, W)`` grey, ``(H, W, 3)`` RGB (2D
  only; RGBA loses its alpha) or ``(D, H, W)`` grey; leading singleton axes (``(1, 1, *S)``) are
  dropped. ``moving_resampled_before`` is the moving image resampled on the fixed grid *without* the
  registration (identity or initial transform), ``warped_after`` the registered result.
* Panels show array axes as they are: the first remaining array axis runs down the panel, the
  second across, each pixel drawn with its physical aspect (``grid.spacing``). A 3D volume gets one
  row per array axis, cut through its middle slice.
* ``displacement`` is ``(ndim, *S)`` in **world units and world component order** (alignkit's map
  minus identity, ITK's displacement field); ``grid`` (default: what ``Image.from_array`` assigns:
  the raster grid in 2D -- world x = column, y = row -- and the identity in 3D) converts it to voxels.
  The grid panel draws ``x + u(x)`` for a regular lattice of fixed-grid points ``x``: where each fixed
  point samples the moving image, using the in-plane components.
* Intensities are scaled per image between its 1st and 99th percentiles over the shown slices
  (a constant background covering over a quarter of them is left out of the percentiles).
* Overlay colours: fixed in magenta, moving in green; aligned structures turn grey/white.
* Jacobian panel: diverging colormap centred at 1 (blue = shrinking, red = growing); folds
  (``det <= 0``) painted bright green. The title gives the percent of folding voxels in the volume.
* Disparity panel (stereo, 2D): the left image's disparity in pixels with the ``turbo`` colormap
  between its 1st and 99th percentiles (near = red), occluded pixels (the left-right check's) dark.
* Flow panel (2D): the registration's flow (alignkit's ``(2, H, W)``, pixels, array-axis order) in
  the Middlebury colour wheel (:func:`alignkit.viz.flow_to_color`: hue = direction, saturation =
  length up to the largest one, named in the title), with the wheel as an inset legend.
* Matplotlib is used through ``Figure`` + ``FigureCanvasAgg`` only: no pyplot, no global state.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from alignkit.errors import InputError, ShapeError
from alignkit.spatial.grid import Grid

_FOLD_RGBA = (0.0, 1.0, 0.0, 1.0)
_GRID_LINES = 24  # lattice lines per panel side
_CHECKER_TILES = 8  # checkerboard tiles along the longer side


def _as_array(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} cannot be read as a numeric array: {exc}") from exc
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    return array


def _squeeze_to(array: np.ndarray, ndim: int, name: str) -> np.ndarray:
    while array.ndim > ndim and array.shape[0] == 1:
        array = array[0]
    if array.ndim != ndim:
        raise ShapeError(f"{name} must have {ndim} dimensions here, got shape {array.shape}")
    return array


def _robust_unit(slices: list[np.ndarray]) -> list[np.ndarray]:
    """Scale slices of one image jointly to [0, 1] between its 1st and 99th percentiles (ignoring a
    constant background that fills over a quarter of them)."""
    values = np.concatenate([s[np.isfinite(s)].ravel() for s in slices])
    if values.size == 0:
        return [np.zeros_like(s) for s in slices]
    floor = values.min()
    if np.count_nonzero(values == floor) > 0.25 * values.size and np.any(values > floor):
        values = values[values > floor]  # a large constant background would pull the percentiles down
    lo, hi = np.percentile(values, [1.0, 99.0])
    scale = float(hi - lo) if hi > lo else 1.0
    return [np.clip(np.nan_to_num((s - lo) / scale, nan=0.0), 0.0, 1.0) for s in slices]


def _grey(image: np.ndarray, rgb: bool) -> np.ndarray:
    return image.mean(axis=-1) if rgb else image


def _in_plane_voxels(disp_world: np.ndarray, grid: Grid, axes: tuple[int, int]) -> np.ndarray:
    """World displacement ``(ndim, *s)`` (world components) -> voxel displacement along array ``axes``,
    ``(2, *s)``; done on slices only, so a 3D volume costs three slices, not the whole field."""
    ndim = grid.ndim
    voxel_from_world = np.linalg.inv(grid.world_from_voxel[:ndim, :ndim].numpy())[list(axes)]
    return np.einsum("ij,j...->i...", voxel_from_world.astype(np.float32), disp_world)


def _checkerboard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    tile = max(1, max(h, w) // _CHECKER_TILES)
    rows = (np.arange(h) // tile)[:, None]
    cols = (np.arange(w) // tile)[None, :]
    mask = (rows + cols) % 2 == 0
    if a.ndim == 3:
        mask = mask[..., None]
    return np.where(mask, a, b)


def _overlay(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    return np.stack([fixed, moving, fixed], axis=-1)


def _show(ax: Axes, image: np.ndarray, aspect: float, title: str, **kwargs: Any) -> Any:
    cmap = None if image.ndim == 3 else kwargs.pop("cmap", "gray")
    handle = ax.imshow(image, cmap=cmap, aspect=aspect, interpolation="nearest", **kwargs)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return handle


def _draw_grid(ax: Axes, background: np.ndarray, disp_rc: np.ndarray, aspect: float) -> None:
    """Lattice ``x + u(x)`` on the slice; ``disp_rc`` is ``(2, h, w)`` voxel displacement (row, col)."""
    h, w = background.shape
    ax.imshow(background, cmap="gray", vmin=0.0, vmax=2.0, aspect=aspect, interpolation="nearest")
    rows = np.unique(np.linspace(0, h - 1, min(_GRID_LINES, h)).round().astype(int))
    cols = np.unique(np.linspace(0, w - 1, min(_GRID_LINES, w)).round().astype(int))
    all_c, all_r = np.arange(w), np.arange(h)
    segments = [np.stack([all_c + disp_rc[1, r, :], r + disp_rc[0, r, :]], axis=-1) for r in rows]
    segments += [np.stack([c + disp_rc[1, :, c], all_r + disp_rc[0, :, c]], axis=-1) for c in cols]
    ax.add_collection(LineCollection(segments, colors="tab:orange", linewidths=0.7))
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_title("deformed grid", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_jacobian(
    fig: Figure, ax: Axes, det: np.ndarray, aspect: float, span: float, fold_pct: float
) -> None:
    handle = ax.imshow(
        det,
        cmap="RdBu_r",
        norm=TwoSlopeNorm(vmin=1.0 - span, vcenter=1.0, vmax=1.0 + span),
        aspect=aspect,
        interpolation="nearest",
    )
    folds = np.zeros(det.shape + (4,), dtype=np.float32)
    folds[det <= 0] = _FOLD_RGBA
    ax.imshow(folds, aspect=aspect, interpolation="nearest")
    fig.colorbar(handle, ax=ax, fraction=0.046, pad=0.03)
    ax.set_title(f"Jacobian det (folds {fold_pct:.2f} %)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _write_atomically(fig: Figure, path: Path, dpi: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, format="png", dpi=dpi)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def _draw_disparity(fig: Figure, ax: Axes, disparity: np.ndarray, occluded: Any | None, aspect: float) -> None:
    finite = disparity[np.isfinite(disparity)]
    lo, hi = np.percentile(finite, [1.0, 99.0]) if finite.size else (0.0, 1.0)
    shown = np.ma.masked_invalid(disparity)
    if occluded is not None:
        shown = np.ma.masked_where(_as_array(occluded, "occluded").astype(bool), shown)
    import matplotlib

    cmap = matplotlib.colormaps["turbo"].with_extremes(bad=(0.1, 0.1, 0.1))
    image = ax.imshow(shown, cmap=cmap, vmin=float(lo), vmax=float(max(hi, lo + 1e-3)), aspect=aspect,
                      interpolation="nearest")
    share = "" if occluded is None else f", {100.0 * float(np.mean(_as_array(occluded, 'occluded') > 0)):.1f}% occluded"
    ax.set_title(f"disparity (px){share}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)


def _draw_flow(ax: Axes, flow_rc: np.ndarray, aspect: float) -> None:
    from alignkit.spatial import xy_from_flow
    from alignkit.viz.flowcolor import colorwheel_legend, flow_to_color

    xy = xy_from_flow(flow_rc)
    finite = np.all(np.isfinite(xy), axis=-1)
    largest = float(np.hypot(xy[..., 0], xy[..., 1])[finite].max(initial=0.0))
    ax.imshow(flow_to_color(xy, max_magnitude=largest if largest > 0 else None), aspect=aspect, interpolation="nearest")
    ax.set_title(f"flow (colour wheel, max {largest:.2f} px)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    inset = ax.inset_axes((0.78, 0.0, 0.22, 0.22))
    inset.imshow(colorwheel_legend(65))
    inset.set_axis_off()


def save_qc_figure(
    path: str | os.PathLike[str],
    fixed: Any,
    moving_resampled_before: Any,
    warped_after: Any,
    *,
    displacement: Any | None = None,
    jacobian_det: Any | None = None,
    title: str | None = None,
    grid: Grid | None = None,
    rgb: bool | None = None,
    dpi: int = 100,
    disparity: Any | None = None,
    occluded: Any | None = None,
    flow: Any | None = None,
) -> Path:
    """Write one PNG summarising a registration (see the module docstring for every convention).

    Panels per view: checkerboard fixed/moving before and after, colour overlay before and after,
    then -- when given -- the deformed grid (``displacement``) and the Jacobian determinant map
    (``jacobian_det``, ``(*S)``) and the coloured disparity (``disparity`` ``(H, W)`` pixels, 2D, with
    an optional ``occluded`` mask) and the colour-wheel flow (``flow`` ``(2, H, W)``, alignkit's flow in pixels,
    2D). ``rgb`` forces (``True``) or forbids (``False``) reading a
    ``(H, W, 3)`` array as a colour image; by default a 3-axis array whose last axis is 3 or 4 is
    colour unless ``displacement``/``jacobian_det`` say the images are 3D. The file is written to a
    temporary name in the same folder and moved into place (``os.replace``). Returns the path.
    """
    out_path = Path(path)
    images = [
        _as_array(a, n)
        for a, n in (
            (fixed, "fixed"),
            (moving_resampled_before, "moving_resampled_before"),
            (warped_after, "warped_after"),
        )
    ]
    shape = images[0].shape
    for image, name in zip(images[1:], ("moving_resampled_before", "warped_after")):
        if image.shape != shape:
            raise ShapeError(f"{name} {image.shape} must have the shape of fixed {shape}")
    disp = None if displacement is None else _as_array(displacement, "displacement")
    det = None if jacobian_det is None else _as_array(jacobian_det, "jacobian_det")
    if rgb is None:
        says_3d = (disp is not None and disp.ndim == 4) or (
            det is not None and det.ndim == 3 and det.shape == shape
        )
        rgb = len(shape) == 3 and shape[-1] in (3, 4) and not says_3d
    if rgb:
        if len(shape) != 3 or shape[-1] not in (3, 4):
            raise ShapeError(f"an RGB image must be (H, W, 3) or (H, W, 4), got {shape}")
        images = [im[..., :3] for im in images]
        spatial = shape[:2]
    else:
        spatial = shape
    ndim = len(spatial)
    if ndim not in (2, 3):
        raise ShapeError(f"images must be 2D (H, W), (H, W, 3) or 3D (D, H, W), got {shape}")
    if grid is None:
        grid = Grid.raster_2d(spatial) if ndim == 2 else Grid.from_spacing(spatial)
    if grid.shape != tuple(spatial):
        raise ShapeError(f"grid shape {grid.shape} does not match the images' spatial shape {tuple(spatial)}")
    spacing = grid.spacing.numpy()

    disp_vox: np.ndarray | None = None
    if disp is not None:
        disp = _squeeze_to(disp, ndim + 1, "displacement")
        if disp.shape != (ndim, *spatial):
            raise ShapeError(
                f"displacement must be {(ndim, *spatial)} (world components first), got {disp.shape}"
            )
        disp_vox = disp
    fold_pct, span = 0.0, 1.0
    if det is not None:
        det = _squeeze_to(det, ndim, "jacobian_det")
        if det.shape != tuple(spatial):
            raise ShapeError(f"jacobian_det must be {tuple(spatial)}, got {det.shape}")
        fold_pct = 100.0 * float((det <= 0).mean())

    # views: (label, slicer, remaining array axes)
    views: list[tuple[str, tuple[Any, ...], tuple[int, int]]] = []
    if ndim == 2:
        views.append(("", (slice(None), slice(None)), (0, 1)))
    else:
        for axis in range(3):
            index = spatial[axis] // 2
            slicer = tuple(index if a == axis else slice(None) for a in range(3))
            views.append((f"axis {axis} = {index}", slicer, tuple(a for a in range(3) if a != axis)))  # type: ignore[arg-type]

    shown = [_robust_unit([im[s] for _, s, _ in views]) for im in images]
    f_sl, b_sl, a_sl = shown
    if det is not None:
        values = np.concatenate([det[s].ravel() for _, s, _ in views])
        values = values[np.isfinite(values)]
        if values.size:
            lo, hi = np.percentile(values, [1.0, 99.0])
            span = max(1.0 - float(lo), float(hi) - 1.0, 0.05)

    panels: list[str] = ["checker before", "checker after", "overlay before", "overlay after"]
    if disp_vox is not None:
        panels.append("grid")
    if det is not None:
        panels.append("jacobian")
    disp_px = None
    if disparity is not None:
        disp_px = _squeeze_to(_as_array(disparity, "disparity"), 2, "disparity")
        if ndim != 2 or disp_px.shape != tuple(spatial):
            raise ShapeError(f"disparity must be {tuple(spatial)} (2D images only), got {disp_px.shape}")
        panels.append("disparity")
    flow_rc = None
    if flow is not None:
        flow_rc = _squeeze_to(_as_array(flow, "flow"), 3, "flow")
        if ndim != 2 or flow_rc.shape != (2, *spatial):
            raise ShapeError(f"flow must be {(2, *spatial)} (2D images only, array-axis order), got {flow_rc.shape}")
        panels.append("flow")
    if ndim == 2:
        ncols = min(4, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        positions = [(i // ncols, i % ncols) for i in range(len(panels))]
    else:
        ncols, nrows = len(panels), 3
        positions = [(0, i) for i in range(len(panels))]

    fig = Figure(figsize=(3.0 * ncols, 3.0 * nrows + (0.4 if title else 0.0)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for row in axes:
        for ax in row:
            ax.set_axis_off()
    for v, (label, slicer, (ra, ca)) in enumerate(views):
        aspect = float(spacing[ra] / spacing[ca])
        fixed_grey, before_grey, after_grey = (_grey(x[v], rgb) for x in (f_sl, b_sl, a_sl))
        disp_rc = (
            None if disp_vox is None else _in_plane_voxels(disp_vox[(slice(None), *slicer)], grid, (ra, ca))
        )
        det_slice = None if det is None else det[slicer]
        for name, (r, c) in zip(panels, positions):
            ax = axes[r + v][c]
            ax.set_axis_on()
            if name == "checker before":
                _show(ax, _checkerboard(f_sl[v], b_sl[v]), aspect, "checkerboard before")
            elif name == "checker after":
                _show(ax, _checkerboard(f_sl[v], a_sl[v]), aspect, "checkerboard after")
            elif name == "overlay before":
                _show(ax, _overlay(fixed_grey, before_grey), aspect, "fixed (magenta) / before (green)")
            elif name == "overlay after":
                _show(ax, _overlay(fixed_grey, after_grey), aspect, "fixed (magenta) / after (green)")
            elif name == "grid" and disp_rc is not None:
                _draw_grid(ax, fixed_grey, disp_rc, aspect)
            elif name == "jacobian" and det_slice is not None:
                _draw_jacobian(fig, ax, det_slice, aspect, span, fold_pct)
            elif name == "disparity" and disp_px is not None:
                _draw_disparity(fig, ax, disp_px, occluded, aspect)
            elif name == "flow" and flow_rc is not None:
                _draw_flow(ax, flow_rc, aspect)
            if label and c == 0:
                ax.set_ylabel(label, fontsize=9)
    # fixed margins instead of tight_layout: it would draw the whole figure once more
    top_inches = 0.35 + (0.4 if title else 0.0)
    fig.subplots_adjust(
        left=0.25 / fig.get_figwidth() + (0.02 if ndim == 3 else 0.0),
        right=1.0 - (0.45 if det is not None else 0.1) / fig.get_figwidth(),  # room for colorbar ticks
        bottom=0.1 / fig.get_figheight(),
        top=1.0 - top_inches / fig.get_figheight(),
        wspace=0.2,
        hspace=0.15,
    )
    if title:
        fig.suptitle(title, fontsize=11, y=1.0 - 0.1 / fig.get_figheight(), va="top")
    _write_atomically(fig, out_path, dpi)
    return out_path
