"""The never-worse rule (issue 18): a stage that ends worse than it began, by its own objective, or that
diverges, is rejected and its start kept, with the reason in ``metrics.json``; and the feature start's
check that a fit is well conditioned."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import alignkit
from alignkit.image import Image
from alignkit.solve import engine as engine_module
from alignkit.solve.presets import get_preset


def _pair() -> tuple[Image, Image]:
    skdata = pytest.importorskip("skimage.data")
    image = skdata.camera()[::4, ::4].astype(np.float32) / 255.0
    return Image.from_array(image), Image.from_array(np.roll(image, (3, -2), axis=(0, 1)))


def _config(learning_rate: float) -> dict:
    return {
        "init": "center",
        "stages": [{"transform": "affine", "similarity": "ncc", "levels": [4, 2, 1], "iterations": [30, 30, 30],
                    "learning_rate": learning_rate}],
    }


def test_a_refinement_that_diverges_is_rejected(tmp_path):
    fixed, moving = _pair()
    # a step size 500x the preset's makes Adam throw the affine parameters far off: NCC ends worse
    result = alignkit.register(fixed, moving, config=_config(5.0))
    (check,) = result.metrics["stage_checks"]
    assert check["kept"] is False
    assert check["objective_end"] > check["objective_start"]
    assert "objective rose" in check["reason"]
    # the start (centres aligned: identity here) is what comes back, not the diverged fit
    assert result.metrics["ncc_after"] == pytest.approx(result.metrics["ncc_before"], abs=1e-6)
    result.save(tmp_path / "out", qc=False)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["stage_checks"][0]["kept"] is False and saved["stage_checks"][0]["reason"] == check["reason"]


def test_a_refinement_that_improves_is_kept():
    fixed, moving = _pair()
    result = alignkit.register(fixed, moving, config=_config(1e-2))
    (check,) = result.metrics["stage_checks"]
    assert check["kept"] is True and "reason" not in check
    assert check["objective_end"] < check["objective_start"]
    assert result.metrics["ncc_after"] > result.metrics["ncc_before"] + 0.05


def test_a_stage_whose_objective_turns_nan_is_rejected_not_raised():
    fixed, moving = _pair()

    class Poisoned(engine_module.Engine):
        def _post_step(self, cfg, transform):  # type: ignore[no-untyped-def]
            # a step that overflows, as a too-large learning rate on a field can
            with torch.no_grad():
                for p in transform.parameters():
                    p.fill_(float("nan"))

    from alignkit.solve.presets import resolve_config

    engine = Poisoned(resolve_config(2, config=_config(1e-2)), device="cpu", seed=0, progress=None)
    chain = engine.run(fixed, moving)
    (check,) = engine.stage_checks
    assert check["kept"] is False and check["reason"].startswith("diverged: a step made the parameters non-finite")
    json.dumps(check, allow_nan=False)  # the record is valid JSON whatever the objective became
    assert all(torch.isfinite(p).all() for p in chain.parameters())
    assert len(chain.stage_list()) == 1  # the start alone


def test_every_stage_of_a_preset_is_judged():
    fixed, moving = _pair()
    result = alignkit.register(fixed, moving, preset="default2d")
    checks = result.metrics["stage_checks"]
    assert [c["stage"] for c in checks] == [s.transform for s in get_preset("default2d").stages]
    assert all(np.isfinite(c["objective_start"]) for c in checks)


def test_well_conditioned_rejects_degenerate_fits():
    from alignkit.solve.features import _well_conditioned

    shape = (400, 500)
    assert _well_conditioned(np.eye(3), shape) is None
    mild = np.array([[1.1, 0.05, 12.0], [-0.03, 0.95, -7.0], [1e-4, -5e-5, 1.0]])
    assert _well_conditioned(mild, shape) is None
    assert "mirrors" in _well_conditioned(np.diag([-1.0, 1.0, 1.0]), shape)
    assert "horizon" in _well_conditioned(np.array([[1.0, 0, 0], [0, 1.0, 0], [-0.01, 0, 1.0]]), shape)
    assert "scale" in _well_conditioned(np.diag([200.0, 200.0, 1.0]), shape)
    assert "anisotropy" in _well_conditioned(np.diag([30.0, 1.0, 1.0]), shape)
    assert "not finite" in _well_conditioned(np.full((3, 3), np.nan), shape)


def test_ground_truth_homographies_count_as_well_conditioned():
    """The bounds must not reject the real wide-baseline and zoom pairs of homogr (both directions)."""
    from pathlib import Path

    from PIL import Image as PILImage

    from alignkit.solve.features import _well_conditioned

    folder = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "homography" / "homogr"
    models = sorted(folder.glob("*_model.txt"))
    if not models:
        pytest.skip(f"homogr data not found under {folder}")
    for model in models:
        name = model.name[: -len("_model.txt")]
        size_a = PILImage.open(next(folder.glob(f"{name}A.*"))).size[::-1]
        size_b = PILImage.open(next(folder.glob(f"{name}B.*"))).size[::-1]
        b_to_a = np.loadtxt(model)
        assert _well_conditioned(b_to_a, size_b) is None, name
        assert _well_conditioned(np.linalg.inv(b_to_a), size_a) is None, name


def test_feature_start_records_its_model_and_falls_back(monkeypatch):
    pytest.importorskip("cv2")
    fixed, moving = _pair()
    from alignkit.solve.features import feature_fit

    fit = feature_fit(fixed.batch(), fixed.grid, moving.batch(), moving.grid, model="homography")
    # a pure shift: a similarity explains the matches as well as a homography (GRIC), and is preferred
    assert fit.stats["model"] == 2.0 and fit.stats["simpler_preferred"] == 1.0 and fit.stats["fallbacks"] == 0.0
    assert fit.stats["keypoints_fixed"] >= fit.stats["matches"] >= fit.stats["inliers"] >= 12
    # a pure shift: every inlier lands within a pixel of its match
    assert float(fit.residuals(lambda p: p + torch.tensor([-2.0, 3.0]).view(1, 2, 1)).median()) < 1.0

    from alignkit.solve import features

    # make the homography (and only it) look degenerate: the fit falls back to the affine model
    monkeypatch.setattr(
        features, "_well_conditioned", lambda pixel, shape: "forced" if abs(pixel[2, 0]) + abs(pixel[2, 1]) > 0 else None
    )
    fallen = feature_fit(fixed.batch(), fixed.grid, moving.batch(), moving.grid, model="homography")
    assert fallen.stats["fallbacks"] == 1.0 and fallen.stats["model"] in (1.0, 2.0)

    # and when the affine map is refused too, a similarity (OpenCV's partial affine estimator)
    calls = []

    def third_time_lucky(pixel, shape):  # type: ignore[no-untyped-def]
        calls.append(pixel)
        return None if len(calls) == 3 else "forced"

    monkeypatch.setattr(features, "_well_conditioned", third_time_lucky)
    similar = feature_fit(fixed.batch(), fixed.grid, moving.batch(), moving.grid, model="homography")
    assert similar.stats["model"] == 2.0 and similar.stats["fallbacks"] == 2.0
    assert float(similar.residuals(lambda p: p + torch.tensor([-2.0, 3.0]).view(1, 2, 1)).median()) < 1.0


def test_every_stage_rejected_without_a_start_gives_the_identity():
    fixed, moving = _pair()
    config = _config(5.0)
    config["init"] = "none"
    result = alignkit.register(fixed, moving, config=config)
    assert result.metrics["stage_checks"][0]["kept"] is False
    identity = fixed.grid.world_points()
    torch.testing.assert_close(result.world_map().cpu(), identity, rtol=0, atol=1e-4)


def test_a_refinement_the_keypoint_matches_rule_out_is_rejected():
    """Clause 2: a stage pulled away from the matches (here by a landmark prompt that contradicts them,
    standing in for a biased multimodal similarity) gains by its own objective, yet the feature start's
    inliers rule it out (chi-square rise over ``INLIER_CHI2_LIMIT``), and the start is kept."""
    pytest.importorskip("cv2")
    from alignkit.solve.engine import INLIER_CHI2_LIMIT

    fixed, moving = _pair()
    config = {
        "init": "features",
        "landmark_weight": 50.0,
        "stages": [{"transform": "translation", "similarity": "ncc", "levels": [2, 1], "iterations": [60, 40],
                    "learning_rate": 0.05}],
    }
    # the matches say: moving = fixed shifted by (-2, 3) in world (x, y); the prompt says (+4, -3) more
    fixed_points = torch.tensor([[40.0, 40.0], [80.0, 60.0], [60.0, 100.0]])
    moving_points = fixed_points + torch.tensor([-2.0 + 4.0, 3.0 - 3.0])
    result = alignkit.register(fixed, moving, config=config, fixed_landmarks=fixed_points, moving_landmarks=moving_points)
    (check,) = result.metrics["stage_checks"]
    assert check["objective_end"] < check["objective_start"]  # it did improve its own objective
    assert check["kept"] is False and check["inlier_chi2_rise"] > INLIER_CHI2_LIMIT
    assert "keypoint inliers rule it out" in check["reason"]
    # the result is the feature start: every pixel moved by the matches' shift
    shift = (result.world_map() - fixed.grid.world_points()).mean(dim=(2, 3))[0]
    torch.testing.assert_close(shift, torch.tensor([-2.0, 3.0]), atol=0.3, rtol=0)


@pytest.mark.parametrize("case", ["stereo", "affine-one-level", "affine-three-levels"])
def test_the_start_objective_reused_from_the_fit_is_the_one_evaluated(case):
    """A one-level stage's first loss is its objective at its start: the never-worse rule reuses it
    instead of evaluating it again -- the same number, bit for bit, as the evaluation it replaces."""
    from alignkit.solve.presets import resolve_config

    if case == "stereo":
        from alignkit.data.synthetic_stereo import render_stereo_pair, training_photographs

        pair = render_stereo_pair(training_photographs()[1], (48, 80), rng=np.random.default_rng(2), max_disparity=10)
        fixed, moving = (Image.from_array(a.transpose(1, 2, 0)) for a in (pair.left, pair.right))
        config = dataclasses.replace(resolve_config(2, preset="stereo"),
                                     init_options={"min_disparity": 0, "max_disparity": 10})
    else:
        fixed, moving = _pair()
        config = _config(1e-2)
        if case == "affine-one-level":
            config["stages"][0].update(levels=[1], iterations=[20])
        config = resolve_config(2, config=config)

    class Evaluating(engine_module.Engine):
        evaluations = 0

        def _objective(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            type(self).evaluations += 1
            return super()._objective(*args, **kwargs)

    class NoReuse(Evaluating):
        evaluations = 0

        def _fit_stage(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            transform = super()._fit_stage(*args, **kwargs)
            self._start_objective = None  # the judge evaluates the start itself
            return transform

    reused = Evaluating(config, device="cpu", seed=0, progress=None)
    reused.run(fixed, moving)
    plain = NoReuse(config, device="cpu", seed=0, progress=None)
    plain.run(fixed, moving)
    assert reused.stage_checks == plain.stage_checks
    one_level = all(len(stage.levels) == 1 for stage in config.stages)
    assert Evaluating.evaluations == NoReuse.evaluations - (len(config.stages) if one_level else 0)
