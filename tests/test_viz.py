"""Flow colour coding and QC figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from alignkit.errors import InputError, ShapeError
from alignkit.spatial import Grid
from alignkit.viz import colorwheel_legend, flow_to_color, make_colorwheel, save_qc_figure
from alignkit.viz.qc import _in_plane_voxels


# -- flow colours -----------------------------------------------------------------------------------
def test_colorwheel_follows_the_published_segments() -> None:
    wheel = make_colorwheel()
    assert wheel.shape == (55, 3)
    # segment starts: R, Y, G, C, B, M (RY 15, YG 6, GC 4, CB 11, BM 13, MR 6)
    starts = {
        0: (255, 0, 0),
        15: (255, 255, 0),
        21: (0, 255, 0),
        25: (0, 255, 255),
        36: (0, 0, 255),
        49: (255, 0, 255),
    }
    for index, rgb in starts.items():
        assert tuple(wheel[index]) == rgb
    assert tuple(wheel[1]) == (255, np.floor(255 / 15), 0)
    assert tuple(wheel[54]) == (255, 0, 255 - np.floor(255 * 5 / 6))


def test_flow_to_color_known_directions() -> None:
    flow = np.zeros((1, 8, 2), np.float32)
    flow[0, 1] = [1, 0]  # +x
    flow[0, 2] = [0, 1]  # +y (down)
    flow[0, 3] = [-1, 0]  # -x
    flow[0, 4] = [0, -1]  # -y (up)
    flow[0, 5] = [0.5, 0]  # half magnitude +x -> half-way to white
    flow[0, 6] = [2, 0]  # beyond max -> darkened to 75 %
    flow[0, 7] = [np.nan, 0]  # unknown -> black
    img = flow_to_color(torch.from_numpy(flow), max_magnitude=1.0)
    assert img.dtype == np.uint8 and img.shape == (1, 8, 3)
    zero, px, py, mx, my, half, far, unknown = (tuple(int(c) for c in img[0, i]) for i in range(8))
    assert zero == (255, 255, 255)
    assert px == (255, 0, 0)  # red
    assert py[0] == 255 and 200 < py[1] < 255 and py[2] == 0  # yellow-orange
    assert mx[0] == 0 and mx[1] > 150 and mx[2] == 255  # cyan-ish
    assert my[2] == 255 and my[1] == 0 and my[0] < 128  # blue-violet
    assert half == (255, 127, 127)
    assert far == (191, 0, 0)
    assert unknown == (0, 0, 0)


def test_flow_to_color_default_scale_and_errors() -> None:
    flow = np.zeros((2, 2, 2))
    assert (flow_to_color(flow) == 255).all()  # zero flow: white, no division by zero
    flow[0, 0] = [10.0, 0.0]
    flow[1, 1] = [5.0, 0.0]
    flow[0, 1] = [1e10, 0.0]  # unknown, must not set the scale
    img = flow_to_color(flow)
    assert tuple(img[0, 0]) == (255, 0, 0)
    assert tuple(img[1, 1]) == (255, 127, 127)
    assert tuple(img[0, 1]) == (0, 0, 0)
    with pytest.raises(ShapeError):
        flow_to_color(np.zeros((2, 4, 4)))
    with pytest.raises(InputError):
        flow_to_color(flow, max_magnitude=0.0)


def test_colorwheel_legend() -> None:
    legend = colorwheel_legend(65)
    assert legend.shape == (65, 65, 3)
    assert tuple(legend[32, 32]) == (255, 255, 255)
    assert tuple(legend[32, 64]) == (255, 0, 0)  # right edge: +x is red


# -- QC figure --------------------------------------------------------------------------------------
def test_displacement_components_follow_the_grid() -> None:
    # raster 2D grid: world x = column (axis 1), world y = row (axis 0); spacing 2
    grid = Grid.raster_2d((5, 7), spacing=2.0)
    disp = np.zeros((2, 5, 7), np.float32)
    disp[0] = 4.0  # world x
    vox = _in_plane_voxels(disp, grid, (0, 1))
    assert np.allclose(vox[0], 0.0) and np.allclose(vox[1], 2.0)
    grid3 = Grid.from_spacing((4, 5, 6), (1.0, 2.0, 4.0))
    disp3 = np.zeros((3, 4, 6), np.float32)  # a slice with axis 1 removed
    disp3[2] = 8.0
    vox3 = _in_plane_voxels(disp3, grid3, (0, 2))
    assert np.allclose(vox3[0], 0.0) and np.allclose(vox3[1], 2.0)


def _blobs(shape: tuple[int, ...], shift: int) -> np.ndarray:
    coords = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    centre = [s / 2 for s in shape]
    r2 = sum((c - m) ** 2 for c, m in zip(coords, centre))
    image = np.exp(-r2 / (2 * (min(shape) / 5) ** 2)) + 0.3 * (np.sin(coords[-1] / 3) > 0)
    return np.roll(image, shift, axis=-1).astype(np.float32)


def _read_png(path: Path) -> np.ndarray:
    with PILImage.open(path) as png:
        assert png.format == "PNG"
        return np.asarray(png.convert("RGB"))


def _count_pure_green(pixels: np.ndarray) -> int:
    return int(np.all(pixels == (0, 255, 0), axis=-1).sum())


@pytest.mark.parametrize("with_extras", [False, True])
def test_qc_figure_2d(tmp_path: Path, with_extras: bool) -> None:
    shape = (48, 64)
    fixed, before, after = _blobs(shape, 0), _blobs(shape, 6), _blobs(shape, 1)
    kwargs = {}
    if with_extras:
        disp = np.zeros((2, *shape), np.float32)
        disp[0] = 2.0 * np.sin(np.arange(shape[0]) / 6.0)[:, None]
        kwargs = {
            "displacement": disp,
            "jacobian_det": 1.0 + 0.2 * np.cos(np.arange(shape[1]) / 5.0)[None, :].repeat(48, 0),
        }
    out = save_qc_figure(tmp_path / "sub" / "qc.png", fixed, before, after, title="2D", **kwargs)  # type: ignore[arg-type]
    pixels = _read_png(out)
    height, width = pixels.shape[:2]
    assert 250 < width < 2000 and 200 < height < 1500
    assert (height > 400) == with_extras  # the second row exists only with the optional panels
    assert pixels.std() > 10
    assert [p.name for p in out.parent.iterdir()] == ["qc.png"]  # no temp file left behind


def test_qc_figure_rgb_and_torch_inputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.random((40, 50, 3)).astype(np.float32)
    out = save_qc_figure(tmp_path / "rgb.png", torch.from_numpy(rgb), rgb[::-1].copy(), rgb)
    assert _read_png(out).shape[2] == 3
    # a (D, H, 3) volume is read as 3D once a 3D Jacobian says so
    vol = rng.random((10, 12, 3)).astype(np.float32)
    out3 = save_qc_figure(tmp_path / "vol.png", vol, vol, vol, jacobian_det=np.ones((10, 12, 3)))
    assert _read_png(out3).shape[0] > 600  # three rows, one per axis


def test_qc_figure_3d_highlights_folds_and_overwrites(tmp_path: Path) -> None:
    shape = (20, 24, 16)
    fixed, before, after = _blobs(shape, 0), _blobs(shape, 4), _blobs(shape, 1)
    disp = np.zeros((3, *shape), np.float32)
    disp[2] = 1.5
    grid = Grid.from_spacing(shape, (1.0, 1.0, 2.0))
    det = np.ones(shape, np.float32)
    path = tmp_path / "qc3d.png"
    save_qc_figure(path, fixed, before, after, displacement=disp, jacobian_det=det, grid=grid)
    no_folds = _read_png(path)
    det[6:14, 8:16, 4:12] = -0.5  # a folded block through every middle slice
    save_qc_figure(path, fixed, before, after, displacement=disp, jacobian_det=det, grid=grid, title="folds")
    folds = _read_png(path)
    assert folds.shape[0] > 600 and folds.shape[1] > 1200  # 3 rows x 6 panels
    assert _count_pure_green(folds) > _count_pure_green(no_folds) + 300


def test_qc_figure_rejects_bad_shapes(tmp_path: Path) -> None:
    a = np.zeros((8, 9), np.float32)
    with pytest.raises(ShapeError):
        save_qc_figure(tmp_path / "x.png", a, a[:, :8], a)
    with pytest.raises(ShapeError):
        save_qc_figure(tmp_path / "x.png", a, a, a, displacement=np.zeros((3, 8, 9)))
    with pytest.raises(ShapeError):
        save_qc_figure(tmp_path / "x.png", a, a, a, jacobian_det=np.zeros((9, 8)))
    with pytest.raises(ShapeError):
        save_qc_figure(tmp_path / "x.png", a, a, a, grid=Grid.raster_2d((9, 8)))
    assert not list(tmp_path.iterdir())


def test_importing_viz_leaves_pyplot_alone() -> None:
    code = "import sys, alignkit.viz; sys.exit('matplotlib.pyplot' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
