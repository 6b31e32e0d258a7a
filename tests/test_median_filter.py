"""spatial.median_filter: OpenCV's medianBlur fast path gives exactly the plain torch median."""

from __future__ import annotations

import pytest
import torch

from alignkit.spatial.filters import median_filter, median_filter_reference


@pytest.mark.parametrize("window", [3, 5])
@pytest.mark.parametrize("shape", [(1, 2, 48, 64), (2, 3, 17, 9), (1, 1, 5, 5)])
def test_fast_path_equals_reference(shape, window):
    pytest.importorskip("cv2")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + window))
    assert torch.equal(median_filter(x, window), median_filter_reference(x, window))


def test_reference_removes_an_outlier_and_keeps_a_step_edge():
    x = torch.zeros(1, 1, 9, 9)
    x[..., 5:] = 1.0  # a step edge: a median keeps it where it is
    x[0, 0, 2, 2] = 50.0  # an isolated outlier: a median removes it
    for out in (median_filter_reference(x, 3), median_filter(x, 3), median_filter_reference(x[..., None], 3)[..., 0]):
        assert out[0, 0, 2, 2] == 0.0
        assert torch.equal(out[0, 0, :, 5:], torch.ones(9, 4)) and torch.equal(out[0, 0, :, :5], torch.zeros(9, 5))


def test_3d_and_float64_use_the_reference_and_bad_windows_are_refused():
    x = torch.randn(1, 2, 6, 7, 8, dtype=torch.float64)
    assert torch.equal(median_filter(x, 3), median_filter_reference(x, 3))
    with pytest.raises(ValueError, match="odd"):
        median_filter(x, 4)
