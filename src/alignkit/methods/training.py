"""Training a registered learned method: the registry builds the model, :mod:`alignkit.train` runs the loop.

::

    from alignkit.methods import train_method
    result = train_method({"method": "voxelmorph", "dataset": "brain2d", "size": 64, "epochs": 20}, "runs/vxm2d")
    alignkit.register(fixed, moving, method="voxelmorph", checkpoint="runs/vxm2d", refine=50)

``alignkit train --method NAME`` runs the same; ``--recipe NAME`` trains a shipped model again from
its committed recipe (:mod:`alignkit.methods.shipped`).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset

from alignkit.errors import ConfigError
from alignkit.methods.learned import LearnedModel, build_model, learned_class
from alignkit.train import TrainConfig, TrainResult, train
from alignkit.train.loop import EpochCallback


def model_factory(config: TrainConfig) -> Any:
    """``(ndim, size) -> model``: the method ``config.method`` with ``config``'s networks and options.
    The data's pre-alignment (``prealign``) is recorded in the model, so inference pre-aligns alike."""
    cls = learned_class(config.method)
    options = dict(config.method_options)
    if config.prealign is not None and "prealign" in inspect.signature(cls.__init__).parameters:
        options.setdefault("prealign", config.prealign)

    def build(ndim: int, size: Sequence[int]) -> LearnedModel:
        return build_model(config.method, ndim=ndim, size=size, network=config.network or None,
                           networks=config.networks or None, **options)

    return build


#: ``init_from`` of the form ``shipped:<name>`` starts from a model shipped with alignkit
SHIPPED_PREFIX = "shipped:"


def train_method(
    config: TrainConfig | Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    model: LearnedModel | None = None,
    train_set: Dataset | None = None,
    val_set: Dataset | None = None,
    resume: bool = False,
    callbacks: Sequence[EpochCallback] = (),
) -> TrainResult:
    """Train the learned method ``config.method`` (or the given ``model``) with :func:`alignkit.train.train`.
    ``init_from`` may name a shipped model (``"shipped:flownet_c_synthetic2d"``)."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if cfg.init_from and str(cfg.init_from).startswith(SHIPPED_PREFIX):
        # a recipe that continues a shipped model names it, not a path of one installation
        from alignkit.methods.shipped import get_shipped

        shipped = get_shipped(str(cfg.init_from)[len(SHIPPED_PREFIX):])
        if not shipped.available():
            raise ConfigError(f"init_from {cfg.init_from}: the shipped model's weights are not in this installation")
        cfg = dataclasses.replace(cfg, init_from=str(shipped.path()))
    cls = type(model) if model is not None else learned_class(cfg.method)
    if cfg.intensity_percentiles is None:
        # the data are normalised as the method's inference will normalise them
        cfg = dataclasses.replace(cfg, intensity_percentiles=list(cls.intensity_percentiles))
    if train_set is None:
        own = cls.training_data(cfg)  # a method that makes its own pairs (synthetic motion, harvests)
        if own is not None:
            train_set, made_val = own
            val_set = made_val if val_set is None else val_set
    return train(cfg, out_dir, method=model if model is not None else model_factory(cfg), train_set=train_set,
                 val_set=val_set, resume=resume, callbacks=callbacks)
