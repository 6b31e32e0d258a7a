"""The ``flow`` preset (classical variational optical flow) recovers a known smooth flow.

A crop of a real Middlebury frame is warped by an analytic smooth field with alignkit's own
sampling, so the true flow is known exactly everywhere; registering the pair with the preset must
give a small end-point error. Skipped when the shared data is absent.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import alignkit
from alignkit.image import Image
from alignkit.metrics import endpoint_error
from alignkit.spatial import sample_voxels, xy_from_flow

FRAME = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flow" / "middlebury" / "RubberWhale" / "frame10.png"
H, W, MARGIN = 128, 160, 8
EPE_BOUND = 0.1  # pixels (measured ~0.02); identity (no motion estimated) gives ~1.5 px


def _smooth_flow() -> np.ndarray:
    """(H, W, 2) flow in pixels, x then y: a slow sinusoidal swirl of up to ~2.3 px."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    fx = 1.2 + 1.0 * np.sin(2 * math.pi * y / H)
    fy = -0.6 + 0.8 * np.cos(2 * math.pi * x / W)
    return np.stack([fx, fy], axis=-1).astype(np.float32)


@pytest.mark.skipif(not FRAME.is_file(), reason="Middlebury data not available")
def test_flow_preset_recovers_smooth_synthetic_flow() -> None:
    cv2 = pytest.importorskip("cv2")
    rgb = cv2.cvtColor(cv2.imread(str(FRAME)), cv2.COLOR_BGR2RGB).astype(np.float32)
    top, left = 200, 240  # a textured region, with a margin so the warp never samples outside
    big = torch.from_numpy(rgb[top - MARGIN : top + H + MARGIN, left - MARGIN : left + W + MARGIN]).permute(2, 0, 1)[None]
    flow = _smooth_flow()

    # moving = the crop; fixed(p) = moving(p + flow(p)) -- the direction of every flow in alignkit; here
    # written in the Middlebury (H, W, 2) x-then-y layout.
    rows, cols = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    fl = torch.from_numpy(flow)
    voxel = torch.stack([rows + fl[..., 1] + MARGIN, cols + fl[..., 0] + MARGIN])[None]  # (row, col) in `big`
    fixed = sample_voxels(big, voxel)[0].permute(1, 2, 0).numpy()
    moving = big[0, :, MARGIN : MARGIN + H, MARGIN : MARGIN + W].permute(1, 2, 0).numpy()

    reg = alignkit.register(Image.from_array(fixed), Image.from_array(moving), preset="flow")
    found = reg.flow()
    assert found.shape == (2, H, W)  # alignkit's flow: (rows, columns) first
    estimate = xy_from_flow(found)  # the metrics' (H, W, 2) x, y layout
    # Pixels whose target p + flow(p) falls outside the moving crop have no data: score the inside.
    valid = np.zeros((H, W), dtype=np.uint8)
    valid[4 : H - 4, 4 : W - 4] = 1
    before = endpoint_error(np.zeros_like(flow), flow, valid)
    after = endpoint_error(estimate, flow, valid)
    assert before > 1.2
    assert after < EPE_BOUND, f"EPE {after:.3f} px (identity {before:.3f} px)"
