"""``alignkit.register``: every method behind one call, and ``refine=K`` on top of any of them.

::

    alignkit.register(fixed, moving, method="classical", preset="brain")
    alignkit.register(fixed, moving, method="voxelmorph")                    # the shipped model
    alignkit.register(fixed, moving, method="voxelmorph", checkpoint="runs/vxm", refine=20)

The steps are the same for every method: read and check the inputs
(:func:`alignkit.registration.prepare_inputs`), run the method, optionally refine its transform with
``refine`` iterations of the classical solver ("instance optimisation"; the SVF stage of the default
preset, or the deformable stage of the preset the method names in ``refine_preset``), then score and return a
:class:`~alignkit.registration.Registration`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from typing import Any

import torch

from alignkit.errors import ConfigError
from alignkit.methods.base import ProgressFactory
from alignkit.methods.registry import get_method
from alignkit.registration import ImageLike, Registration, compute_metrics, prepare_inputs
from alignkit.solve import Engine, RegistrationConfig, StageConfig, resolve_device
from alignkit.transforms import ComposedTransform, Transform, flatten_stages

#: the refinement SVF is fitted on at most this many voxels (128³; a 1 mm head of 256x256x160 is
#: refined at 2 mm, as Learn2Reg's instance optimisers do) and interpolated to the full grid: at
#: full resolution one iteration on such a head costs ~17 s on two CPU cores (measured, OASIS-TRT-20),
#: 20 iterations six minutes; 2D images up to 1448² are refined at full resolution.
REFINE_MAX_VOXELS = 1 << 21


def refine_config(ndim: int, iterations: int, *, similarity: str | None = None, preset: str | None = None) -> StageConfig:
    """The refinement stage: the last deformable stage of ``preset`` (default: the default preset's SVF
    stage) for ``iterations`` at full resolution, or on at most :data:`REFINE_MAX_VOXELS` voxels. A
    method names its preset with a ``refine_preset`` attribute (e.g. the flow networks: ``flow``)."""
    from alignkit.solve.presets import default_preset, get_preset

    template = [s for s in get_preset(preset or default_preset(ndim)).stages if not s.is_linear][-1]
    stage = copy.deepcopy(template)
    stage.levels, stage.iterations, stage.smoothing = (1.0,), (int(iterations),), None
    stage.max_level_voxels = min(v for v in (template.max_level_voxels, REFINE_MAX_VOXELS) if v > 0)
    if similarity is not None:
        stage.similarity, stage.similarity_options = similarity, {}
    StageConfig.__post_init__(stage)
    return stage


def progress_factory(quiet: bool) -> ProgressFactory:
    if quiet:
        return None
    from tqdm.auto import tqdm

    def progress(**kwargs: Any) -> Any:
        return tqdm(leave=False, dynamic_ncols=True, **kwargs)

    return progress


def register(
    fixed: ImageLike,
    moving: ImageLike,
    *,
    method: str = "classical",
    refine: int = 0,
    fixed_labels: ImageLike | None = None,
    moving_labels: ImageLike | None = None,
    fixed_landmarks: Any = None,
    moving_landmarks: Any = None,
    device: str | torch.device | None = None,
    seed: int | None = 0,
    quiet: bool = True,
    **options: Any,
) -> Registration:
    """Register ``moving`` to ``fixed`` in world space with the method ``method`` and return a
    :class:`~alignkit.registration.Registration`.

    ``fixed``/``moving`` are :class:`~alignkit.image.Image` objects, paths or arrays; they may differ
    in size, spacing and orientation. ``options`` go to the method (``alignkit methods`` lists them;
    e.g. ``preset``, ``transform``, ``similarity``, ``config``, ``initial`` for ``classical``;
    ``checkpoint``, ``transform`` (the linear pre-alignment), ``similarity`` (the refinement's) for a
    learned method); an unknown option is a one-line :class:`~alignkit.errors.ConfigError`.
    ``refine=K`` runs K iterations of the classical SVF solver on top of the method's transform.
    Labels and landmarks are scored, and used as prompt terms by methods that take them.
    """
    runner = get_method(method).create(**options)
    if int(refine) < 0:
        raise ConfigError(f"refine must be >= 0 iterations, got {refine}")
    inputs = prepare_inputs(fixed, moving, fixed_labels, moving_labels, fixed_landmarks, moving_landmarks)
    info = runner.info
    if inputs.ndim not in info.ndims:
        raise ConfigError(f"method {method!r} handles {'/'.join(map(str, info.ndims))}D images, not {inputs.ndim}D")
    progress = progress_factory(quiet)
    dev = resolve_device(device)
    started = time.perf_counter()
    output = runner.run(inputs, device=dev, seed=seed, progress=progress)
    transform: Transform = output.transform
    name, stages = output.name, list(output.stages)
    stage_seconds = dict(output.stage_seconds)
    description = dict(output.description)
    if refine:
        stage = refine_config(inputs.ndim, int(refine), similarity=getattr(runner, "refine_similarity", None),
                              preset=getattr(runner, "refine_preset", None))
        config = RegistrationConfig(stages=[stage], init="none", name=f"{name}+refine")
        engine = Engine(config, device=dev, seed=seed, progress=progress)
        refined = engine.run(inputs.fixed, inputs.moving, initial=transform)
        transform = ComposedTransform(flatten_stages(refined))
        stages.append(stage.transform)
        stage_seconds["refine"] = round(engine.logs[-1].seconds, 3)
        description["refine"] = {"iterations": int(refine), "stage": dataclasses.asdict(stage)}
        name = f"{name}+refine"
    seconds = time.perf_counter() - started
    result = Registration(
        inputs.fixed, inputs.moving, transform, method=method, name=name, stages=stages,
        description=description, fixed_labels=inputs.fixed_labels, moving_labels=inputs.moving_labels,
    )
    recorded: dict[str, Any] = {"stage_seconds": stage_seconds, **output.extra}
    if info.kind != "optimisation" or refine:
        recorded["refine_iterations"] = int(refine)
    result.metrics = recorded
    # the image metrics (similarity, Jacobians, Dice ...) when first read: not part of the run
    result.defer_metrics(functools.partial(compute_metrics, result, fixed_points=inputs.fixed_points,
                                           moving_points=inputs.moving_points, seconds=seconds,
                                           normalised=output.normalised))
    return result
