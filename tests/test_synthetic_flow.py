"""The FlyingChairs-style generator: exact flow, exact occlusion, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignkit.data.synthetic_flow import (
    FlowLayer,
    SyntheticFlowPairs,
    photo_textures,
    render_scene,
    synthetic_flow_pair,
)
from alignkit.errors import ConfigError
from alignkit.spatial import sample_voxels, voxel_identity


def _warp(frame2: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    identity = voxel_identity(flow.shape[1:], like=flow)
    return sample_voxels(frame2[None], identity + flow[None], padding="border")[0]


def _smooth_texture(size: int = 256, variant: int = 0) -> torch.Tensor:
    r, c = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    a, b = 7.0 + 2 * variant, 5.0 + variant
    return (0.5 + 0.25 * torch.sin(r / a) * torch.cos(c / b) + 0.2 * torch.sin((r + 2 * c) / 11.0 + variant))[None]


@pytest.mark.parametrize(("seed", "smooth"), [(0, False), (1, False), (2, False), (0, True), (1, True)])
def test_flow_is_exact_on_visible_pixels(seed, smooth):
    """Warping frame 2 by the flow gives frame 1 on visible pixels to interpolation error: small on the
    photographs (their fine detail is resampled through two different affine maps), tiny on smooth
    textures (where bilinear interpolation is nearly exact)."""
    textures = [_smooth_texture(256, k) for k in range(4)] if smooth else None
    out = synthetic_flow_pair(torch.Generator().manual_seed(seed), (96, 128), photometric=False, textures=textures)
    f1, f2, flow, occluded = out["frame1"], out["frame2"], out["flow"], out["occluded"]
    error = (_warp(f2, flow) - f1).abs()[0]
    # pixels away from motion boundaries and occlusions (bilinear reads there mix two layers)
    layer = out["layer"].float()[None, None]
    interior = (F.max_pool2d(layer, 5, 1, 2) == -F.max_pool2d(-layer, 5, 1, 2))[0, 0]
    near_occlusion = F.max_pool2d(occluded.float()[None, None], 5, 1, 2)[0, 0] > 0
    clear = interior & ~near_occlusion
    assert clear.float().mean() > 0.5
    unwarped = (f2 - f1).abs()[0][clear].mean()
    # interpolation error only: frames are textures resampled through different affine maps
    assert error[clear].mean() < (0.001 if smooth else 0.01)
    assert error[clear].mean() < 0.15 * unwarped
    assert torch.quantile(error[clear], 0.99) < (0.005 if smooth else 0.1)
    # the occluded pixels are where the warp fails
    if occluded.sum() > 50:
        assert error[occluded].mean() > 3 * error[clear].mean()


def test_occlusion_mask_of_a_hand_made_scene():
    """A static background and a 20-pixel square moving 10 pixels to the right: the background strip
    the square covers in frame 2 (rows of the square, the 10 columns right of it) is occluded, nothing
    else; the flow is (0, 10) on the square and 0 elsewhere."""
    size = (64, 80)
    eye = torch.eye(3, dtype=torch.float64)
    background = FlowLayer(texture=_smooth_texture(), texture_from_local=eye.clone(), local_from_image=eye.clone(),
                           motion=eye.clone(), exponent=None)
    # square of half side 10 centred on (31.5, 29.5): local = (p - centre) / 10, |local|_inf <= 1
    local_from_image = torch.tensor([[0.1, 0.0, -3.15], [0.0, 0.1, -2.95], [0.0, 0.0, 1.0]], dtype=torch.float64)
    texture_from_local = torch.tensor([[10.0, 0.0, 100.0], [0.0, 10.0, 120.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    motion = eye.clone()
    motion[1, 2] = 10.0
    square = FlowLayer(texture=1.0 - _smooth_texture(), texture_from_local=texture_from_local,
                       local_from_image=local_from_image, motion=motion, exponent=math.inf)
    out = render_scene([background, square], size)
    rows = torch.arange(size[0])[:, None].expand(size)
    cols = torch.arange(size[1])[None, :].expand(size)
    on_square = ((rows - 31.5).abs() <= 10) & ((cols - 29.5).abs() <= 10)
    strip = ((rows - 31.5).abs() <= 10) & (cols > 39.5) & (cols <= 49.5)
    assert torch.equal(out["layer"] == 1, on_square)
    assert torch.equal(out["occluded"], strip)
    assert torch.equal(out["flow"][1][on_square], torch.full((int(on_square.sum()),), 10.0))
    assert float(out["flow"][0].abs().max()) == 0.0
    assert float(out["flow"][1][~on_square].abs().max()) == 0.0
    # and frame 2 shows the square shifted by exactly 10 columns
    assert torch.allclose(out["frame2"][0, 23:41, 31:49], out["frame1"][0, 23:41, 21:39], atol=1e-5)


def test_items_are_pure_functions_of_seed_epoch_index():
    data = SyntheticFlowPairs((48, 64), length=4, seed=3)
    first = data[2]
    data.set_epoch(1)
    other_epoch = data[2]
    data.set_epoch(0)
    again = data[2]
    assert torch.equal(first["fixed"], again["fixed"]) and torch.equal(first["flow"], again["flow"])
    assert not torch.equal(first["flow"], other_epoch["flow"])
    assert first["fixed"].shape == (1, 48, 64) and first["flow"].shape == (2, 48, 64)
    assert first["occluded"].shape == (1, 48, 64) and first["flow_mask"].shape == (1, 48, 64)
    fixed_set = SyntheticFlowPairs((48, 64), length=4, seed=3, per_epoch=False)
    fixed_set.set_epoch(5)
    assert torch.equal(fixed_set[1]["flow"], SyntheticFlowPairs((48, 64), length=4, seed=3, per_epoch=False)[1]["flow"])


def test_bad_options_fail_in_one_line():
    with pytest.raises(ConfigError):
        SyntheticFlowPairs((8, 8))
    with pytest.raises(TypeError):
        SyntheticFlowPairs((32, 32), wobble=3)


def test_textures_are_grey_photographs():
    textures = photo_textures()
    assert len(textures) >= 10
    assert all(t.dim() == 3 and t.shape[0] == 1 and 0.0 <= float(t.min()) and float(t.max()) <= 1.0 for t in textures)
