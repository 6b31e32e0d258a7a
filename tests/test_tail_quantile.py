"""The percentile fast path of intensity normalisation (issue 18) against its reference, torch.quantile."""

from __future__ import annotations

import pytest
import torch

from alignkit.solve.engine import normalize_intensity, tail_quantile


@pytest.mark.parametrize("count", [1, 2, 3, 7, 100, 1001, 20_000])
@pytest.mark.parametrize("kind", ["continuous", "ties"])
def test_tail_quantile_matches_torch_quantile(count, kind):
    generator = torch.Generator().manual_seed(count)
    if kind == "continuous":
        values = torch.randn(2, 3, count, generator=generator)
    else:  # 8-bit-like images: many equal values
        values = torch.randint(0, 5, (2, 3, count), generator=generator).float()
    for q in (0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.3, 0.5, 0.9, 0.95, 0.99, 0.995, 1.0):
        expected = torch.quantile(values, q, dim=-1, keepdim=True)
        # bit for bit: a registration amplifies a last-bit change of the normalisation
        torch.testing.assert_close(tail_quantile(values, q), expected, rtol=0, atol=0, msg=f"q={q}")


def test_normalize_intensity_is_unchanged_by_the_fast_path():
    image = torch.rand(1, 3, 40, 50, generator=torch.Generator().manual_seed(1)) ** 3 * 255
    flat = image.flatten(2)
    lo = torch.quantile(flat, 0.005, dim=-1, keepdim=True).view(1, 3, 1, 1)
    hi = torch.quantile(flat, 0.995, dim=-1, keepdim=True).view(1, 3, 1, 1)
    reference = ((image - lo) / (hi - lo)).clamp(-0.5, 1.5)
    torch.testing.assert_close(normalize_intensity(image), reference, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["continuous", "ties", "sample-holds-the-extremes"])
def test_the_long_row_fast_path_gives_topks_values(kind):
    from alignkit.solve.engine import _extremes

    generator = torch.Generator().manual_seed(7)
    count = 120_000  # past the fast path's 65536
    if kind == "continuous":
        values = torch.randn(2, 3, count, generator=generator)
    elif kind == "ties":  # an 8-bit photo: 256 levels
        values = torch.randint(0, 256, (1, 3, count), generator=generator).float()
    else:  # the strided subsample sees only the smallest values: its threshold selects too few (fallback)
        values = torch.rand(1, 2, count, generator=generator) + 1
        values[..., ::32] = torch.rand(1, 2, values[..., ::32].shape[-1], generator=generator) - 1
    for k in (1, 2, 601, 7000):
        for largest in (False, True):
            expected = torch.topk(values, k, dim=-1, largest=largest, sorted=True).values
            assert torch.equal(_extremes(values, k, largest=largest), expected), (k, largest)
    for q in (0.0, 0.005, 0.01, 0.99, 0.995, 1.0):
        assert torch.equal(tail_quantile(values, q), torch.quantile(values, q, dim=-1, keepdim=True)), q
