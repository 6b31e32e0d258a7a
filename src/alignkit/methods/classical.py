"""``classical``: the multi-scale optimisation engine with its presets, as a registered method.

Options: ``preset`` (``brain``, ``multimodal``, ``photo``, ``flow``, ``stereo``, ``default2d``; default ``brain``
in 3D and ``default2d`` in 2D), ``transform`` (a chain such as ``"rigid,affine,svf"``) and
``similarity`` overriding the preset's, ``config`` (a :class:`~alignkit.solve.RegistrationConfig`,
a dict or a JSON/TOML file: a full stage list, or a preset plus options), ``initial`` (a transform
to start from, or a linear transform file of ANTs, ITK, Greedy, elastix or FSL -- see
:func:`alignkit.transforms.files.read_transform` -- recorded as ``initial_transform`` in the
description, i.e. in the saved manifest; the stages refine it, so ``transform="svf"`` skips the
linear ones), ``min_disparity``/``max_disparity`` (the search range of the ``stereo`` preset's
semi-global matching, pixels; default 0 and a fifth of the width). Label maps and landmarks are prompt terms when the configuration weights them
(``dice_weight``, ``landmark_weight``), and are scored either way.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from alignkit.errors import ConfigError
from alignkit.methods.base import Method, MethodInfo, MethodOutput, ProgressFactory
from alignkit.methods.registry import register_method
from alignkit.registration import Inputs
from alignkit.solve import Engine, RegistrationConfig
from alignkit.solve.presets import resolve_config
from alignkit.transforms import MatrixTransform, Transform


@register_method
class Classical(Method):
    """Optimisation per pair: the stages of a preset (or a configuration), coarse to fine."""

    info = MethodInfo(
        name="classical",
        kind="optimisation",
        summary="multi-scale optimisation of any transform chain (rigid, affine, homography, SVF, "
        "B-spline, disparity ...) under any similarity; presets brain, multimodal, photo, flow, stereo, default2d",
        ndims=(2, 3),
        modalities=("mono", "multi"),
        case_kinds=("deformable", "affine", "homography", "flow", "stereo"),
    )

    def __init__(
        self,
        *,
        preset: str | None = None,
        transform: str | list[str] | None = None,
        similarity: str | None = None,
        config: RegistrationConfig | dict[str, Any] | str | os.PathLike | None = None,
        initial: Transform | str | os.PathLike | None = None,
        min_disparity: float | None = None,
        max_disparity: float | None = None,
    ) -> None:
        self.preset = preset
        self.disparity_range = {k: float(v) for k, v in (("min_disparity", min_disparity),
                                                         ("max_disparity", max_disparity)) if v is not None}
        self.transform = transform
        self.similarity = similarity
        self.config = config
        self.initial = initial

    def resolve(self, ndim: int) -> RegistrationConfig:
        config = resolve_config(
            ndim, preset=self.preset, transform=self.transform, similarity=self.similarity, config=self.config
        )
        if self.disparity_range:
            if config.init != "sgm":
                raise ConfigError(f"min_disparity/max_disparity set the stereo search range; the configuration "
                                  f"{config.name!r} does not start from stereo matching (use preset='stereo')")
            config.init_options = {**config.init_options, **self.disparity_range}
            RegistrationConfig.__post_init__(config)
        return config

    def _initial(self, inputs: Inputs) -> tuple[Transform | None, dict[str, Any]]:
        """The starting transform, read from its file (FLIRT's reference and input are the fixed and
        moving images), and what the manifest records of it."""
        if self.initial is None or isinstance(self.initial, Transform):
            return self.initial, {}
        from alignkit.errors import InputError
        from alignkit.transforms.files import read_transform

        source = os.fspath(self.initial)
        transform = read_transform(source, fixed=inputs.fixed.grid, moving=inputs.moving.grid)
        if not transform.is_linear:
            raise InputError("an initial transform must be linear (a matrix); apply deformable ones with "
                             "`alignkit apply`", source)
        if transform.ndim != inputs.ndim:
            raise InputError(f"is {transform.ndim}D but the images are {inputs.ndim}D", source)
        matrix = transform.matrix().detach().double().cpu()
        start = MatrixTransform(matrix)
        start.kind = "init:file"  # manifests name the stage by how it was found, as the engine's init:center
        return start, {"file": source, "matrix": matrix.tolist()}

    def run(
        self, inputs: Inputs, *, device: torch.device, seed: int | None, progress: ProgressFactory
    ) -> MethodOutput:
        cfg = self.resolve(inputs.ndim)
        initial, record = self._initial(inputs)
        engine = Engine(cfg, device=device, seed=seed, progress=progress)
        chain = engine.run(
            inputs.fixed,
            inputs.moving,
            fixed_labels=inputs.fixed_labels,
            moving_labels=inputs.moving_labels,
            fixed_points=inputs.fixed_points,
            moving_points=inputs.moving_points,
            initial=initial,
        )
        extra: dict[str, Any] = {}
        if engine.init_info:
            extra["init"] = dict(engine.init_info)
        # the never-worse rule's verdict on each stage (kept, or rejected and why) for metrics.json
        extra["stage_checks"] = [dict(check) for check in engine.stage_checks]
        description = cfg.to_dict()
        if record:
            description["initial_transform"] = record
        return MethodOutput(
            transform=chain,
            name=cfg.name,
            stages=[s.transform for s in cfg.stages],
            description=description,
            stage_seconds={log.transform: round(log.seconds, 3) for log in engine.logs},
            extra=extra,
            normalised=getattr(engine, "normalised", None),
        )
