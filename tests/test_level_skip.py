"""A stage level whose grid and images are the previous level's is not run again once that level converged
(``Engine._fit_stage``): ``max_level_voxels`` or ``MIN_LEVEL_SIZE`` can give several levels the same grid."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from alignkit.image import Image
from alignkit.solve import RegistrationConfig, StageConfig
from alignkit.solve.engine import Engine, level_factor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from phantoms import phantom

_BARS: list[_Bar] = []


class _Bar:
    """A tqdm stand-in that counts what it is advanced by."""

    def __init__(self, total: int, **_: object) -> None:
        self.total, self.done = total, 0
        _BARS.append(self)

    def update(self, n: int = 1) -> None:
        self.done += n

    def set_postfix(self, **_: object) -> None:
        pass

    def close(self) -> None:
        pass


def _pair() -> tuple[Image, Image]:
    return Image.from_array(phantom(0, (64, 64))), Image.from_array(phantom(1, (64, 64)))


def _engine(levels: tuple[float, ...], iterations: tuple[int, ...], tolerance: float) -> Engine:
    # 64 x 64 = 4096 voxels capped at 256: every level is shrunk by 4 (a 16 x 16 grid)
    stage = StageConfig(transform="svf", similarity="mse", regularizer="diffusion", regularizer_weight=0.1,
                        levels=levels, iterations=iterations, learning_rate=0.1, tolerance=tolerance, patience=10,
                        lr_reductions=0, max_level_voxels=256)
    config = RegistrationConfig(stages=[stage], init="none", crop_foreground=False)
    return Engine(config, device="cpu", seed=0, progress=_Bar, keep_levels=True)


def test_a_converged_level_is_not_run_again_on_the_same_grid() -> None:
    assert level_factor(2, (64, 64), 256) == level_factor(1, (64, 64), 256) == 4.0
    fixed, moving = _pair()
    _BARS.clear()
    both = _engine((2, 1), (300, 40), tolerance=1e-3)
    chain = both.run(fixed, moving)
    log = both.logs[0]
    assert len(log.losses) == 1 and len(log.losses[0]) < 300  # the first level's stopping rule fired
    assert log.skipped == [1]
    assert [r.index for r in both.level_records] == [0]  # a skipped level has no record
    bar = _BARS[-1]
    assert bar.done == bar.total == 340  # the bar is advanced by the skipped level's budget

    first = _engine((2,), (300,), tolerance=1e-3)
    alone = first.run(fixed, moving)
    assert first.logs[0].losses == log.losses and first.logs[0].skipped == []
    world = fixed.grid.world_points()
    assert torch.equal(chain.transform_points(world), alone.transform_points(world))


def test_a_level_that_used_its_whole_budget_is_followed_on_the_same_grid() -> None:
    fixed, moving = _pair()
    _BARS.clear()
    engine = _engine((2, 1), (5, 4), tolerance=0.0)  # no stopping rule: every level runs its budget
    engine.run(fixed, moving)
    log = engine.logs[0]
    assert [len(losses) for losses in log.losses] == [5, 4] and log.skipped == []
    assert [r.index for r in engine.level_records] == [0, 1]
    assert _BARS[-1].done == 9
