"""Shared fixtures: the real data folder (skip when absent) and small real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def data_path(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} (../shared/data is absent)")
    return path


@pytest.fixture(autouse=True)
def _threads_and_seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def brain_slice():
    """A real 256x256 brain MRI slice (ANTs r16), as an alignkit Image, downsampled to 128x128."""
    from alignkit.io import read_image
    from alignkit.spatial import resize_image

    image = read_image(data_path("brain2d", "r16slice.jpg"))
    from alignkit.image import Image

    small = resize_image(image.batch(), (128, 128))[0]
    return Image(small, image.grid.resized((128, 128)), path=image.path)
