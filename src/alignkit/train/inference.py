"""Registering a pair with a trained method, optionally refined by the classical solver.

:func:`register_learned` is what ``alignkit.register(fixed, moving, method="voxelmorph",
checkpoint=..., refine=K)`` and ``alignkit register --method voxelmorph --checkpoint CKPT`` run.
It returns the same :class:`~alignkit.methods.classical.Registration` as the classical engine, so
the warped image, the ``transform/`` folder (ITK affine + displacement field), ``metrics.json`` and
``qc.png`` are written by the same code. The chain is::

    [linear pre-alignment stages] -> learned SVF -> [refinement SVF]     (y = A(L(R(x))))

* pre-alignment (``transform``, default: what the model was trained with, ``prealign`` in its
  config) is the classical engine's linear stages; the network then sees the moving image resampled
  through them, as it saw affinely aligned pairs in training;
* refinement ("instance optimisation", ``refine=K``) fits a new SVF on top of the prediction with
  the classical engine for at most ``K`` iterations at full resolution (capped at
  :data:`REFINE_MAX_VOXELS`), the similarity and regulariser of the dimension's default preset --
  the step that lifts learned methods in Learn2Reg.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import torch

from alignkit.errors import ConfigError, InputError
from alignkit.methods.classical import (
    ImageLike,
    Registration,
    compute_metrics,
    prepare_inputs,
)
from alignkit.solve import Engine, RegistrationConfig, StageConfig
from alignkit.solve.config import LINEAR_MODELS
from alignkit.train.methods import LearnedMethod
from alignkit.transforms import ComposedTransform, Transform


def flatten(transform: Transform) -> list[Transform]:
    """The stages of nested :class:`ComposedTransform` s in order, so the leading linear stages of a
    chain are visible to the transform writer (``affine.txt``) whatever nesting built it."""
    if isinstance(transform, ComposedTransform):
        return [s for stage in transform.stage_list() for s in flatten(stage)]
    return [transform]


def _progress_factory(quiet: bool) -> Any:
    if quiet:
        return None
    from tqdm.auto import tqdm

    def progress(**kwargs: Any) -> Any:
        return tqdm(leave=False, dynamic_ncols=True, **kwargs)

    return progress


def _linear_config(ndim: int, models: list[str]) -> RegistrationConfig:
    from alignkit.solve.presets import resolve_config

    bad = [m for m in models if m not in LINEAR_MODELS]
    if bad:
        raise ConfigError(
            f"with a learned method, --transform names the linear pre-alignment ({', '.join(LINEAR_MODELS)}); got {', '.join(bad)}"
        )
    return resolve_config(ndim, transform=models)


#: the refinement SVF is fitted on at most this many voxels (128³; a 1 mm head of 256x256x160 is
#: refined at 2 mm, as Learn2Reg's instance optimisers do) and interpolated to the full grid: at
#: full resolution one iteration on such a head costs ~17 s on two CPU cores (measured, OASIS-TRT-20),
#: 20 iterations six minutes; 2D images up to 1448² are refined at full resolution.
REFINE_MAX_VOXELS = 1 << 21


def refine_config(ndim: int, iterations: int, *, similarity: str | None = None) -> StageConfig:
    """The refinement stage: the default preset's SVF stage for ``iterations`` at full resolution,
    or on at most :data:`REFINE_MAX_VOXELS` voxels."""
    from alignkit.solve.presets import default_preset, get_preset

    template = next(s for s in get_preset(default_preset(ndim)).stages if not s.is_linear)
    stage = copy.deepcopy(template)
    stage.levels, stage.iterations, stage.smoothing = (1.0,), (int(iterations),), None
    stage.max_level_voxels = min(v for v in (template.max_level_voxels, REFINE_MAX_VOXELS) if v > 0)
    if similarity is not None:
        stage.similarity, stage.similarity_options = similarity, {}
    StageConfig.__post_init__(stage)
    return stage


def load_learned(method: str, checkpoint: LearnedMethod | str | os.PathLike, device: torch.device) -> LearnedMethod:
    """The trained model of ``checkpoint`` (a path, a run folder or an already loaded method), checked
    to be a ``method`` model."""
    from alignkit.train.trainer import load

    learned = checkpoint if isinstance(checkpoint, LearnedMethod) else load(checkpoint, device=device)
    if learned.method_name != method:
        raise ConfigError(f"the checkpoint holds a {learned.method_name!r} model, not {method!r}")
    return learned.to(device).eval()


def register_learned(
    fixed: ImageLike,
    moving: ImageLike,
    *,
    method: str = "voxelmorph",
    checkpoint: LearnedMethod | str | os.PathLike | None = None,
    refine: int = 0,
    transform: str | list[str] | None = None,
    similarity: str | None = None,
    fixed_labels: ImageLike | None = None,
    moving_labels: ImageLike | None = None,
    fixed_landmarks: Any = None,
    moving_landmarks: Any = None,
    device: str | torch.device | None = None,
    seed: int | None = 0,
    quiet: bool = True,
) -> Registration:
    """Register ``moving`` to ``fixed`` with a trained ``method`` (see the module docstring).

    ``transform``: linear pre-alignment models (``"affine"``, ``"rigid,affine"``, ``"none"``);
    default: the model's training ``prealign``. ``similarity`` replaces the refinement's. Labels and
    landmarks are only scored (never used by the network or the refinement).
    """
    from alignkit.solve import resolve_device
    from alignkit.train.methods import METHODS

    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose classical or one of {', '.join(sorted(METHODS))}")
    if checkpoint is None:
        raise ConfigError(f"method {method!r} needs a checkpoint (--checkpoint CKPT)")
    if refine < 0:
        raise ConfigError(f"refine must be >= 0 iterations, got {refine}")
    fixed_image, moving_image, fixed_lab, moving_lab, fixed_pts, moving_pts = prepare_inputs(
        fixed, moving, fixed_labels, moving_labels, fixed_landmarks, moving_landmarks
    )

    dev = resolve_device(device)
    learned = load_learned(method, checkpoint, dev)
    if learned.ndim != fixed_image.ndim:
        raise InputError(f"is {fixed_image.ndim}D but the {method} model is {learned.ndim}D", fixed_image.name)
    progress = _progress_factory(quiet)
    started = time.perf_counter()
    stage_seconds: dict[str, float] = {}

    if transform is None:
        prealign = learned.config.get("prealign")
        models = [prealign] if prealign else []
    else:
        models = transform.split(",") if isinstance(transform, str) else list(transform)
        models = [m.strip().lower() for m in models if m.strip() and m.strip().lower() != "none"]
    stage_configs: list[StageConfig] = []
    stages: list[Transform] = []
    if models:
        linear = _linear_config(fixed_image.ndim, models)
        engine = Engine(linear, device=dev, seed=seed, progress=progress)
        stages = flatten(engine.run(fixed_image, moving_image))
        stage_configs += linear.stages
        for log in engine.logs:
            stage_seconds[log.transform] = round(log.seconds, 3)

    tic = time.perf_counter()
    prior = ComposedTransform(stages) if stages else None
    predicted = learned.predict(fixed_image, moving_image, initial=prior, device=dev)
    stages.append(predicted)
    stage_seconds[method] = round(time.perf_counter() - tic, 3)
    # the learned stage, described like the others: an SVF that no solver iteration touched
    stage_configs.append(StageConfig(transform="svf", similarity=learned.config.get("similarity", "lncc"),
                                     levels=(1.0,), iterations=(0,)))
    chain = ComposedTransform(stages)

    name = method
    if refine > 0:
        stage = refine_config(fixed_image.ndim, refine, similarity=similarity)
        config = RegistrationConfig(stages=[stage], init="none", name=f"{method}+refine")
        engine = Engine(config, device=dev, seed=seed, progress=progress)
        refined = engine.run(fixed_image, moving_image, initial=chain)
        chain = ComposedTransform(flatten(refined))
        stage_configs.append(stage)
        stage_seconds["refine"] = round(engine.logs[-1].seconds, 3)
        name = f"{method}+refine"
    seconds = time.perf_counter() - started

    config = RegistrationConfig(stages=stage_configs, init="none", name=name)
    result = Registration(fixed_image, moving_image, chain, config, fixed_labels=fixed_lab, moving_labels=moving_lab)
    result.metrics = compute_metrics(result, fixed_points=fixed_pts, moving_points=moving_pts, seconds=seconds)
    result.metrics["stage_seconds"] = stage_seconds
    result.metrics["method"] = method
    result.metrics["refine_iterations"] = int(refine)
    if isinstance(checkpoint, (str, os.PathLike)):
        result.metrics["checkpoint"] = os.fspath(checkpoint)
    return result
