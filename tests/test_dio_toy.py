"""The two-squares toy of Jena, Chaudhari and Gee (DIO §4.1); its benchmark twin is
``python benchmarks/dio.py --toy`` (success rates over 40 pairs, printed as JSON)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from alignkit.data.squares import TwoSquares
from alignkit.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_two_squares_overlap_as_asked():
    pairs = TwoSquares(40, size=(48, 48), square=10, seed=3)
    overlaps = 0
    for k in range(len(pairs)):
        item = pairs[k]
        fixed, moving = item["fixed"][0], item["moving"][0]
        assert float(fixed.sum()) == float(moving.sum()) == 100.0  # both squares whole, inside the image
        touching = bool((fixed * moving).sum() > 0)
        assert touching == bool(item["overlap"])
        # the moving square is the fixed one moved by `shift`
        shift = item["shift"].long()
        assert torch.equal(torch.nonzero(moving), torch.nonzero(fixed) + shift)
        overlaps += touching
    assert 10 <= overlaps <= 30
    assert torch.equal(pairs[5]["fixed"], TwoSquares(40, size=(48, 48), square=10, seed=3)[5]["fixed"])
    with pytest.raises(ConfigError):
        TwoSquares(4, size=(20, 20), square=10)


@pytest.mark.slow  # ~2-4 min on one core: a few hundred training steps through the solver
def test_dio_features_recover_what_intensities_cannot():
    """Intensity MSE has no gradient when the squares do not overlap, so the affine solver stays put on
    those pairs; DIO features trained for 300 steps (Dice loss through the solver layer, exact implicit
    gradient: the affine has 6 parameters, so conjugate gradient is cheap) let the same solver recover
    the shift on non-overlapping pairs too. Measured (one core, this seed): intensity 1.00 / 0.10 on the
    20 overlapping / 20 non-overlapping test pairs, DIO 0.90 / 0.40 (with Jacobian-free backprop
    instead: 0.75 / 0.30)."""
    from dio import toy

    result = toy(steps=300, test_pairs=40, seed=0, lr=1e-3, gradient="ift")
    rates = result["success_rate"]
    assert rates["intensity"]["overlapping"] >= 0.8
    assert rates["intensity"]["non_overlapping"] <= 0.35
    assert rates["dio"]["non_overlapping"] >= rates["intensity"]["non_overlapping"] + 0.2
