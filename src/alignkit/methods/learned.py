"""Learned methods: a model (networks + how they predict + a training loss) and the registry entry
that registers pairs with a trained or shipped model.

A learned method is a :class:`LearnedModel` subclass decorated with :func:`learned_method`:

* ``default_networks(ndim)``: ``{name: network spec}`` (:mod:`alignkit.nets` names and arguments);
  the networks become attributes of that name, so their weights are ``<name>.*`` in checkpoints,
  and any number of them, with any number of inputs, is fine;
* ``forward(batch) -> dict``: training-time outputs on the network grid (see
  :mod:`alignkit.methods.heads` for the conventions);
* ``loss(batch, output, *, epoch) -> (total, parts)``: parts are logged by name;
* ``predict_transform(grid, fixed, moving) -> Transform``: one pair on the network grid, in world
  units (a :class:`~alignkit.methods.heads.LearnedSVF`, a matrix, a displacement, a chain);
* optionally ``training_stages()`` (train part A, freeze it, train part B; or one block of a chain
  per stage), ``set_stage``, ``validation_metrics``.

The decorator registers a :class:`LearnedMethod` under the model's name: ``alignkit.register(...,
method=NAME, checkpoint=RUN)`` pre-aligns linearly as the model was trained (``transform``), predicts,
and (``refine=K``) lets the classical solver refine. The training loop (:mod:`alignkit.train`) gets
the model from :func:`build_model` / :func:`alignkit.methods.train_method`.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError, InputError, ShapeError
from alignkit.image import Image
from alignkit.methods.base import Method, MethodInfo, MethodOutput, ProgressFactory
from alignkit.methods.heads import landmark_errors, voxel_grid
from alignkit.methods.registry import get_method, register_method
from alignkit.registration import Inputs
from alignkit.solve import Engine
from alignkit.solve.config import LINEAR_MODELS
from alignkit.solve.presets import learned_prealign_config
from alignkit.spatial import sample_voxels, sample_world
from alignkit.train.protocol import TrainingStage
from alignkit.train.subjects import DEFAULT_PERCENTILES
from alignkit.transforms import ComposedTransform, Transform, flatten_stages

NetworkSpecs = Mapping[str, Mapping[str, Any]]


class LearnedModel(nn.Module):
    """Base class of learned models (module docstring). ``options`` (JSON-safe) and the network specs
    rebuild the model: :attr:`config` + :meth:`network_specs` are what a checkpoint stores."""

    method_name: ClassVar[str] = ""
    info: ClassVar[MethodInfo]
    #: the intensity percentiles mapped to 0 and 1 on the network grid, in training and inference
    intensity_percentiles: ClassVar[tuple[float, float]] = DEFAULT_PERCENTILES

    def __init__(self, *, networks: Mapping[str, nn.Module], ndim: int, size: Sequence[int]) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ConfigError(f"learned methods are 2D or 3D, got ndim={ndim}")
        size = tuple(int(s) for s in size)
        if len(size) != ndim:
            raise ConfigError(f"size {size} does not fit ndim={ndim}")
        expected = set(self.default_networks(ndim))
        if set(networks) != expected:
            raise ConfigError(f"{self.method_name} needs the networks {sorted(expected)}, got {sorted(networks)}")
        self._network_names = tuple(self.default_networks(ndim))
        for name in self._network_names:
            self.add_module(name, networks[name])
        self.ndim = ndim
        self.size = size
        self.options: dict[str, Any] = {}
        self.stage = self.training_stages()[0].name
        # the identity map of the training grid, built once per size and device (not per step)
        self._identity: dict[tuple[Any, ...], Tensor] = {}

    @classmethod
    def training_data(cls, config: Any) -> tuple[Any, Any] | None:
        """(training pairs, validation pairs or None) that this method makes itself for ``config``
        (a :class:`~alignkit.train.TrainConfig`) -- e.g. synthetic motion generated on the fly, or
        patches harvested from a folder -- or None (the default) for the loop's own pairs of
        ``config.dataset`` (:func:`alignkit.train.loop.build_datasets`). Pair data sets are map-style
        (``__len__``/``__getitem__`` returning dicts of tensors, items pure functions of (seed, epoch,
        index), ``set_epoch`` when they change per epoch) with ``ndim`` and ``size`` attributes."""
        return None

    # -- networks -------------------------------------------------------------------------------
    @classmethod
    def default_networks(cls, ndim: int) -> dict[str, dict[str, Any]]:  # pragma: no cover - abstract
        """``{attribute name: full network spec}`` for ``ndim`` (channel counts included)."""
        raise NotImplementedError

    @classmethod
    def network_specs_for(cls, ndim: int, overrides: NetworkSpecs | None = None) -> dict[str, dict[str, Any]]:
        """The default specs updated by ``overrides`` (by network name). An override that names another
        registered network gets that network's own defaults plus the default's ``ndim`` and channel
        counts (the default's other options, e.g. the U-Net's ``residual``, need not exist there)."""
        defaults = cls.default_networks(ndim)
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(defaults))
        if unknown:
            raise ConfigError(f"{cls.method_name} has no networks {unknown}; its networks: {sorted(defaults)}")
        specs: dict[str, dict[str, Any]] = {}
        for name, default in defaults.items():
            override = dict(overrides.get(name, {}))
            same = override.get("name", default["name"]) == default["name"]
            base = dict(default) if same else {k: default[k] for k in ("ndim", "in_channels", "out_channels") if k in default}
            specs[name] = {**base, **override}
        return specs

    def networks(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self._network_names}

    def network_specs(self) -> dict[str, dict[str, Any]]:
        from alignkit.nets import network_config

        return {name: network_config(module) for name, module in self.networks().items()}

    @property
    def config(self) -> dict[str, Any]:
        """Everything but the networks that :func:`build_model` needs (plain, JSON-safe values)."""
        return {"ndim": self.ndim, "size": list(self.size), **copy.deepcopy(self.options)}

    # -- training -------------------------------------------------------------------------------
    def training_stages(self) -> list[TrainingStage]:
        """One stage that trains every network (override for training in stages)."""
        return [TrainingStage("train")]

    def set_stage(self, name: str) -> None:
        names = [s.name for s in self.training_stages()]
        if name not in names:
            raise ConfigError(f"{self.method_name} has no training stage {name!r}; its stages: {names}")
        self.stage = name

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, batch: Mapping[str, Tensor], output: Mapping[str, Tensor], *, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError  # pragma: no cover - abstract

    def _identity_on(self, like: Tensor) -> Tensor:
        key = (tuple(like.shape[2:]), like.device, like.dtype)
        if key not in self._identity:
            self._identity[key] = voxel_grid(like.shape[2:]).voxel_points(dtype=like.dtype, device=like.device)
        return self._identity[key]

    def warp(self, tensor: Tensor, displacement: Tensor, *, mode: Literal["linear", "nearest"] = "linear") -> Tensor:
        """``tensor ∘ (id + displacement)`` on the network grid (border values outside)."""
        points = self._identity_on(displacement) + displacement
        return sample_voxels(tensor, points, mode=mode, padding="border")

    @torch.no_grad()
    def validation_metrics(self, batch: Mapping[str, Tensor], output: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-pair scores of a ``displacement`` output (network-grid voxels): ``epe`` to a true
        ``flow``, ``tre`` of landmarks, ``dice`` (mean over :attr:`label_ids`, labels warped
        nearest-neighbour; NaN for a pair without labels), and ``similarity`` when the model has
        :meth:`similarity_score`; ``matrix_error`` (mean corner displacement error, voxels) when
        both the output and the batch hold a ``matrix``."""
        from alignkit.metrics import dice_per_label

        out: dict[str, Tensor] = {}
        displacement = output.get("displacement")
        if hasattr(self, "similarity_score") and "warped" in output:
            out["similarity"] = self.similarity_score(output["warped"], batch["fixed"])  # type: ignore[attr-defined]
        if displacement is None:
            return out
        if "flow" in batch:
            epe = (displacement - batch["flow"]).norm(dim=1).flatten(1)
            if "flow_mask" in batch:
                mask = batch["flow_mask"].float().flatten(1)
                out["epe"] = (epe * mask).sum(1) / mask.sum(1)  # NaN for a pair with no known flow
            else:
                out["epe"] = epe.mean(1)
        if "fixed_points" in batch:
            out["tre"] = landmark_errors(displacement, batch["fixed_points"], batch["moving_points"], batch["points_mask"])
        if "matrix" in batch and "matrix" in output:
            from alignkit.methods.heads import matrix_displacement

            truth = matrix_displacement(batch["matrix"].to(displacement.dtype), displacement.shape[2:])
            out["matrix_error"] = (displacement - truth).norm(dim=1).flatten(1).mean(1)
        ids = getattr(self, "label_ids", None)
        if "fixed_labels" in batch and ids:
            warped = self.warp(batch["moving_labels"].float(), displacement, mode="nearest")
            scores = []
            for k in range(displacement.shape[0]):
                if not (batch["fixed_labels"][k].any() and batch["moving_labels"][k].any()):
                    scores.append(float("nan"))  # an unlabelled subject in a partly labelled data set
                    continue
                per_label = dice_per_label(warped[k, 0].round().long(), batch["fixed_labels"][k, 0], ids)
                scores.append(sum(per_label.values()) / len(per_label) if per_label else float("nan"))
            out["dice"] = torch.tensor(scores, dtype=torch.float64)
        return out

    # -- inference ------------------------------------------------------------------------------
    def predict_transform(self, grid: Any, fixed: Tensor, moving: Tensor) -> Transform:  # pragma: no cover
        """The transform for one pair already on the network grid ``grid`` (world-placed)."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(
        self,
        fixed: Image,
        moving: Image,
        *,
        initial: Transform | None = None,
        device: str | torch.device | None = None,
        size: Sequence[int] | None = None,
        **options: Any,
    ) -> Transform:
        """The fixed → moving transform of a pair of :class:`~alignkit.image.Image` s (world space).

        Both images go through :func:`~alignkit.train.subjects.to_network_grid` (of ``size``, default
        the training :attr:`size`; a fully convolutional network may run at another); the moving one is then
        sampled on the fixed network grid through ``initial`` (e.g. an affine pre-alignment;
        default: the world identity). The returned transform is meant to be composed *after*
        ``initial``: ``y = initial(T(x))``, i.e. ``ComposedTransform([initial, T])``. Other ``options``
        (a runner's inference options, e.g. FlowNet's ``coarse_levels``) go to :meth:`predict_transform`.
        """
        from alignkit.train.subjects import to_network_grid

        if fixed.ndim != self.ndim or moving.ndim != self.ndim:
            raise ShapeError(f"this {self.method_name} model is {self.ndim}D; got {fixed.ndim}D and {moving.ndim}D images")
        if device is None:
            param = next(iter(self.parameters()), None)
            device = param.device if param is not None else torch.device("cpu")
        device = torch.device(device)
        was_training = self.training
        self.eval()
        try:
            percentiles = self.intensity_percentiles
            size = self.size if size is None else tuple(int(s) for s in size)
            fixed_t, grid = to_network_grid(fixed.batch(device=device), fixed.grid, size, percentiles=percentiles)
            moving_t, moving_grid = to_network_grid(moving.batch(device=device), moving.grid, size,
                                                    percentiles=percentiles)
            world = grid.world_points(device=device)
            if initial is not None:
                world = initial.to(device).transform_points(world)
            if initial is not None or not moving_grid.same_as(grid):
                moving_t = sample_world(moving_t, moving_grid, world)
            return self.predict_transform(grid, fixed_t, moving_t, **options)
        finally:
            self.train(was_training)


# -- building and loading ------------------------------------------------------------------------
def learned_class(name: str) -> type[LearnedModel]:
    """The model class of the learned method ``name``; a one-line error for other methods."""
    method = get_method(name)
    model_class = getattr(method, "model_class", None)
    if model_class is None:
        from alignkit.methods.registry import available

        trainable = [info.name for info in available() if info.trainable]
        raise ConfigError(f"method {name!r} is not trained on a data set; trainable methods: {', '.join(trainable)}")
    return model_class


def build_model(
    name: str,
    *,
    ndim: int,
    size: Sequence[int],
    network: nn.Module | Mapping[str, Any] | None = None,
    networks: Mapping[str, nn.Module | Mapping[str, Any]] | None = None,
    **options: Any,
) -> LearnedModel:
    """The learned method ``name`` with its networks: modules or specs (missing keys from the method's
    defaults), by name in ``networks``; ``network`` is the same for a one-network method."""
    cls = learned_class(name)
    given = dict(networks or {})
    if network is not None:
        defaults = cls.default_networks(ndim)
        if len(defaults) != 1:
            raise ConfigError(f"{name} has several networks ({sorted(defaults)}); give them by name (networks=...)")
        given[next(iter(defaults))] = network
    specs = cls.network_specs_for(ndim, {k: v for k, v in given.items() if not isinstance(v, nn.Module)})
    from alignkit.nets import build_network

    modules: dict[str, nn.Module] = {}
    for key, spec in specs.items():
        module = given.get(key)
        modules[key] = module if isinstance(module, nn.Module) else build_network(dict(spec))
    try:
        return cls(networks=modules, ndim=ndim, size=size, **options)
    except TypeError as exc:
        raise ConfigError(f"bad options for method {name!r}: {exc}") from None


def load_model(source: str | os.PathLike | LearnedModel, *, device: str | torch.device = "cpu") -> LearnedModel:
    """Rebuild the trained model in a checkpoint (a file, a run folder, or a shipped model's file) in
    eval mode. Needs nothing but the checkpoint: the method's options and network specs are in it;
    float16 (shipped) weights are read into the model's float32 parameters."""
    if isinstance(source, LearnedModel):
        return source.to(torch.device(device)).eval()
    from alignkit.train.checkpoint import load_checkpoint

    state = load_checkpoint(source)
    method = state.get("method") or {}
    if "name" not in method:
        raise InputError("not an alignkit model checkpoint (no method record)", source)
    networks = state.get("networks") or {}
    if not networks and "network" in state:  # one-network checkpoints written before several networks
        networks = {next(iter(learned_class(method["name"]).default_networks(int(method["config"]["ndim"])))): state["network"]}
    model = build_model(method["name"], networks=networks, **method["config"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise InputError(f"weights do not fit the {method['name']} model they name ({str(exc).splitlines()[0]})", source) from None
    return model.to(torch.device(device)).eval()


# -- registering pairs ---------------------------------------------------------------------------
def _linear_models(ndim: int, transform: str | list[str] | None, default: str | None) -> list[str]:
    if transform is None:
        return [default] if default else []
    models = transform.split(",") if isinstance(transform, str) else list(transform)
    models = [m.strip().lower() for m in models if m.strip() and m.strip().lower() != "none"]
    bad = [m for m in models if m not in LINEAR_MODELS]
    if bad:
        raise ConfigError(
            f"with a learned method, transform names the linear pre-alignment ({', '.join(LINEAR_MODELS)}); got {', '.join(bad)}"
        )
    return models


class LearnedMethod(Method):
    """Registers a pair with a trained model: the linear pre-alignment it was trained with (or
    ``transform``: ``"affine"``, ``"rigid,affine"``, ``"none"``), then the prediction.

    ``checkpoint``: a checkpoint file, a run folder, or a loaded model; default: the model shipped
    with alignkit for the images' dimension (:mod:`alignkit.methods.shipped`). ``similarity``: the
    similarity of a refinement (``refine=K``). Labels and landmarks are only scored.
    """

    model_class: ClassVar[type[LearnedModel]]

    def __init__(
        self,
        *,
        checkpoint: LearnedModel | str | os.PathLike | None = None,
        transform: str | list[str] | None = None,
        similarity: str | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.transform = transform
        self.refine_similarity = similarity

    def model(self, ndim: int, device: torch.device) -> tuple[LearnedModel, str | None]:
        """(the trained model for ``ndim``-D images, where it was read from)."""
        from alignkit.methods.shipped import shipped_for

        name = self.info.name
        source = self.checkpoint
        if source is None:
            shipped = shipped_for(name, ndim)
            if shipped is None:
                raise ConfigError(
                    f"no {name} model ships for {ndim}D images; train one (alignkit train --method {name} "
                    f"--dataset NAME -o RUNDIR) and pass --checkpoint RUNDIR"
                )
            source = shipped.path()
        learned = load_model(source, device=device)
        if learned.method_name != name:
            raise ConfigError(f"the checkpoint holds a {learned.method_name!r} model, not {name!r}")
        if learned.ndim != ndim:
            raise InputError(f"the {name} model is {learned.ndim}D but the images are {ndim}D",
                             None if isinstance(source, LearnedModel) else source)
        return learned, None if isinstance(source, LearnedModel) else os.fspath(source)

    def predict_options(self, learned: LearnedModel, inputs: Inputs) -> dict[str, Any]:
        """Keyword arguments of :meth:`LearnedModel.predict` for this pair (a runner's inference
        options, e.g. the network grid ``size``); none by default."""
        return {}

    def prealign(
        self, inputs: Inputs, default: str | None, *, device: torch.device, seed: int | None,
        progress: ProgressFactory, preset: str | None = None,
    ) -> tuple[list[str], list[Transform], list[str], dict[str, float]]:
        """The linear pre-alignment (``transform``, else ``default``, e.g. the model's recorded
        ``prealign``) by the classical engine, with ``preset``'s linear stages (default: the dimension's
        default preset): (models, stages, stage names, stage seconds); no stages when there is none."""
        models = _linear_models(inputs.ndim, self.transform, default)
        stages: list[Transform] = []
        names: list[str] = []
        stage_seconds: dict[str, float] = {}
        if models:
            linear = learned_prealign_config(inputs.ndim, models, preset)
            engine = Engine(linear, device=device, seed=seed, progress=progress)
            stages = flatten_stages(engine.run(inputs.fixed, inputs.moving))
            names += [s.transform for s in linear.stages]
            for log in engine.logs:
                stage_seconds[log.transform] = round(log.seconds, 3)
        return models, stages, names, stage_seconds

    def run(
        self, inputs: Inputs, *, device: torch.device, seed: int | None, progress: ProgressFactory
    ) -> MethodOutput:
        learned, source = self.model(inputs.ndim, device)
        models, stages, names, stage_seconds = self.prealign(
            inputs, learned.config.get("prealign"), device=device, seed=seed, progress=progress)
        tic = time.perf_counter()
        prior = ComposedTransform(stages) if stages else None
        predicted = learned.predict(inputs.fixed, inputs.moving, initial=prior, device=device,
                                    **self.predict_options(learned, inputs))
        stage_seconds[self.info.name] = round(time.perf_counter() - tic, 3)
        stages += flatten_stages(predicted)
        names += [s.kind for s in flatten_stages(predicted)]
        description = {"method": self.info.name, "prealign": models, "model": learned.config,
                       "networks": learned.network_specs(), "checkpoint": source}
        extra: dict[str, Any] = {"method": self.info.name}
        if source is not None:
            extra["checkpoint"] = source
        return MethodOutput(
            transform=ComposedTransform(stages), name=self.info.name, stages=names, description=description,
            stage_seconds=stage_seconds, extra=extra,
        )


def learned_method(info: MethodInfo, *, runner: type[LearnedMethod] | None = None):
    """Class decorator for a :class:`LearnedModel`: names it and registers its :class:`LearnedMethod`
    -- or ``runner``, a :class:`LearnedMethod` subclass with the method's own inference options
    (``mode``, ``tile`` ...) and steps."""
    if info.kind != "learned":
        raise ConfigError(f"{info.name}: a learned model's method kind is 'learned', not {info.kind!r}")
    base = runner or LearnedMethod
    if not issubclass(base, LearnedMethod):
        raise ConfigError(f"{info.name}: the runner must be a LearnedMethod subclass, not {base.__name__}")

    def decorate(cls: type[LearnedModel]) -> type[LearnedModel]:
        cls.method_name = info.name
        cls.info = info
        runner = type(f"{cls.__name__}Method", (base,), {"info": info, "model_class": cls,
                                                         "__doc__": base.__doc__})
        register_method(runner)
        return cls

    return decorate
