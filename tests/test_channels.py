"""Grey, grey stored as RGB, RGB and RGBA register in any combination (issue 18): from the command line
with each 2D preset, and from the API (where an RGBA array keeps its four channels).

The command line once failed after registering a grey NIR picture against an RGB photograph: the QC
figure compared the fixed image's one channel with the moving image's three. The presets run here with
their stages, similarities and initialisation unchanged but a few iterations per level, so that the
sixteen combinations times four presets stay fast; one full preset run repeats the reported case.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from alignkit import register
from alignkit.cli import main
from alignkit.image import Image, common_channels, grey_channels
from alignkit.io import read_image
from alignkit.solve.presets import get_preset

KINDS = ("grey", "grey_as_rgb", "rgb", "rgba")
PRESETS_2D = ("photo", "flow", "default2d", "multimodal")


def _scene(shift: tuple[float, float] = (0.0, 0.0), shape: tuple[int, int] = (72, 88)) -> np.ndarray:
    """A textured grey scene (blob, waves and a checker for keypoints), shifted by ``shift`` pixels."""
    rows, cols = np.mgrid[: shape[0], : shape[1]].astype(float)
    rows, cols = rows - shift[0], cols - shift[1]
    grey = (
        120
        + 60 * np.sin(rows / 4.0) * np.cos(cols / 5.0)
        + 50 * np.exp(-((rows - 30) ** 2 + (cols - 40) ** 2) / 120.0)
        + 30 * ((rows // 12 + cols // 12) % 2)
    )
    return np.clip(grey, 0, 255).astype(np.uint8)


def _as_kind(grey: np.ndarray, kind: str) -> np.ndarray:
    """``(H, W)`` grey, or ``(H, W, 3|4)`` colour whose channels differ (so no reader folds them)."""
    if kind == "grey":
        return grey
    if kind == "grey_as_rgb":
        return np.stack([grey] * 3, axis=-1)
    colour = [grey, 255 - grey, grey // 2]
    if kind == "rgba":
        colour.append(np.full_like(grey, 200))
    return np.stack(colour, axis=-1).astype(np.uint8)


def _save(grey: np.ndarray, kind: str, stem: Path) -> Path:
    # a grey picture stored as a 3-channel JPEG is the reported case (the VIS-NIR set's NIR images)
    path = stem.with_suffix(".jpg" if kind == "grey_as_rgb" else ".png")
    PILImage.fromarray(_as_kind(grey, kind)).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))
    return path


def _short(preset: str) -> dict:
    """The preset's full configuration with a few iterations per level."""
    config = get_preset(preset).to_dict()
    for stage in config["stages"]:
        stage["iterations"] = [4] * len(stage["iterations"])
    return config


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[tuple[str, str], Path]:
    folder = tmp_path_factory.mktemp("channels")
    fixed, moving = _scene(), _scene(shift=(2.0, 3.0))
    out = {}
    for kind in KINDS:
        out["fixed", kind] = _save(fixed, kind, folder / f"fixed_{kind}")
        out["moving", kind] = _save(moving, kind, folder / f"moving_{kind}")
    for preset in PRESETS_2D:
        out["config", preset] = folder / f"{preset}.json"
        out["config", preset].write_text(json.dumps(_short(preset)))
    return out


def test_common_channels_reconciles_every_combination():
    shapes = {"grey": 1, "grey_as_rgb": 3, "rgb": 3, "rgba": 4}
    for a, b in itertools.product(shapes.values(), repeat=2):
        fixed, moving = common_channels(torch.rand(1, a, 5, 6), torch.rand(1, b, 7, 8))
        assert fixed.shape[1] == moving.shape[1], (a, b)
        if a == b or {a, b} == {3, 4}:
            assert fixed.shape[1] == min(a, b)  # colour kept; RGBA's alpha dropped against RGB
        else:
            assert fixed.shape[1] == 1
    rgba = torch.rand(1, 4, 5, 6)
    # alpha is opacity: the grey of an RGBA image is the mean of R, G and B alone
    torch.testing.assert_close(grey_channels(rgba), rgba[:, :3].mean(1, keepdim=True))
    volume = torch.rand(1, 4, 3, 5, 6)  # four channels of a 3D image are not RGBA
    torch.testing.assert_close(grey_channels(volume), volume.mean(1, keepdim=True))


@pytest.mark.parametrize("preset", PRESETS_2D)
def test_cli_registers_every_channel_combination(files, preset, tmp_path, capsys):
    for fixed_kind, moving_kind in itertools.product(KINDS, repeat=2):
        out = tmp_path / f"{fixed_kind}-{moving_kind}"
        argv = ["register", files["fixed", fixed_kind], files["moving", moving_kind], "-o", out,
                "--config", files["config", preset], "--quiet"]
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 0, f"{preset} {fixed_kind} <- {moving_kind}: {err}"
        for name in ("metrics.json", "qc.png", "flow.flo"):
            assert (out / name).is_file(), (preset, fixed_kind, moving_kind, name)
        warped = next(out.glob("warped.*"))
        moving = read_image(files["moving", moving_kind])
        # the warped image keeps the moving image's colour, on the fixed image's grid
        assert read_image(warped).data.shape == (moving.channels, 72, 88), (preset, fixed_kind, moving_kind)
        metrics = json.loads((out / "metrics.json").read_text())
        assert np.isfinite(metrics["ncc_after"]), (preset, fixed_kind, moving_kind)


def test_cli_photo_preset_grey_fixed_rgb_moving(files, tmp_path, capsys):
    """The reported command, with the full preset: a grey picture stored as RGB against a colour one."""
    out = tmp_path / "out"
    code = main([str(a) for a in ["register", files["fixed", "grey_as_rgb"], files["moving", "rgb"], "-o", out,
                                  "--preset", "photo", "--quiet"]])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ncc_after"] > metrics["ncc_before"] + 0.1
    assert (out / "qc.png").is_file()


@pytest.mark.parametrize("fixed_kind", KINDS)
def test_api_registers_arrays_of_every_channel_count(fixed_kind, tmp_path):
    """Arrays keep their channels (an RGBA array is four channels, a grey-as-RGB array three equal ones)."""
    fixed = Image.from_array(_as_kind(_scene(), fixed_kind).astype(np.float32))
    for moving_kind in KINDS:
        moving = Image.from_array(_as_kind(_scene(shift=(2.0, 3.0)), moving_kind).astype(np.float32))
        result = register(fixed, moving, config=_short("photo"))
        assert result.warped.data.shape == moving.data.shape, (fixed_kind, moving_kind)
        assert np.isfinite(result.metrics["ncc_after"]), (fixed_kind, moving_kind)
        result.save(tmp_path / f"{fixed_kind}-{moving_kind}")
        assert (tmp_path / f"{fixed_kind}-{moving_kind}" / "qc.png").is_file()


def test_grey_stages_average_channels_before_the_pyramid_with_the_same_levels():
    """A ``grey`` stage's pyramid is built from the channel mean (a third of the work on a colour
    photograph); blur and resampling are linear, so the level equals the mean of the colour level."""
    from alignkit.solve.engine import Engine
    from alignkit.spatial import Grid

    colour = torch.rand(1, 3, 61, 47, generator=torch.Generator().manual_seed(4))
    grid = Grid.raster_2d((61, 47))
    engine = Engine(get_preset("photo"))
    engine._pyramid = {}
    for factor, sigma in ((4.0, None), (2.0, 1.5), (1.0, 0.5)):
        grey, grey_grid = engine._downsample("fixed", colour, grid, factor, sigma, grey=True)
        full, full_grid = engine._downsample("fixed", colour, grid, factor, sigma, grey=False)
        assert grey.shape[1] == 1 and full.shape[1] == 3 and grey_grid.same_as(full_grid)
        torch.testing.assert_close(grey, full.mean(1, keepdim=True), rtol=1e-5, atol=1e-6)
