"""The method registry and the learned contract changed no result: the classical presets and a small
VoxelMorph model give, on the same inputs and seeds, what they gave before (``tests/golden``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))

from make_golden import GOLDEN, cases


@pytest.fixture(scope="module")
def produced(tmp_path_factory):
    import os

    import torch

    threads = torch.get_num_threads()
    # the reference (torch) path of the greedy update, with or without numba: the golden arrays pin it;
    # the compiled kernels are checked against it in tests/test_compiled_greedy.py
    switch = os.environ.get("ALIGNKIT_COMPILED")
    os.environ["ALIGNKIT_COMPILED"] = "0"
    try:
        return cases(tmp_path_factory.mktemp("golden"))
    finally:
        torch.set_num_threads(threads)
        if switch is None:
            del os.environ["ALIGNKIT_COMPILED"]
        else:
            os.environ["ALIGNKIT_COMPILED"] = switch


@pytest.mark.parametrize(
    "name",
    ["classical_default2d_2d", "classical_flow_2d", "classical_brain_2d", "classical_brain_3d",
     "voxelmorph_val_loss", "voxelmorph_2d", "voxelmorph_refine5_2d"],
)
def test_same_result_as_before_the_method_registry(produced, name):
    golden = np.load(GOLDEN)
    assert name in produced, f"the golden case {name} is no longer produced"
    if name in PLATFORM_SENSITIVE:
        difference = np.abs(produced[name] - golden[name])
        mean_limit, p99_limit = PLATFORM_SENSITIVE[name]
        assert difference.mean() <= mean_limit and np.percentile(difference, 99) <= p99_limit, (
            f"{name}: mean |difference| {difference.mean():.4f}, 99th percentile {np.percentile(difference, 99):.4f}"
        )
        return
    np.testing.assert_allclose(produced[name], golden[name], rtol=1e-5, atol=1e-4)


#: The brain preset's greedy iterations filter by matrix products (``spatial.banded``): BLAS's last bits
#: differ between CPU models (MKL picks its kernels by processor), and a hundred iterations amplify them.
#: On one machine the same commit (3909d17, which wrote these entries) reproduced them exactly, on another
#: (2026-12-04, Xeon with AVX-512) it gave mean / 99th-percentile / max differences of 0.076 / 0.49 / 1.37
#: (2D) and 0.011 / 0.069 / 0.14 (3D), world units, the default2d and flow entries to 4e-5. So these two
#: are held to about twice that drift on average and in the tail; a real change of results moves them more.
PLATFORM_SENSITIVE = {"classical_brain_2d": (0.15, 1.0), "classical_brain_3d": (0.03, 0.15)}
