"""Trained models as :class:`~alignkit.evaluate.method.Method` s: ``<learned method>:<checkpoint>``.

Every name of :data:`alignkit.train.METHODS` (``voxelmorph``, ...) followed by a colon and a
checkpoint is a method of ``alignkit evaluate``::

    alignkit evaluate --dataset brain2d --method voxelmorph:runs/vxm2d -o eval/
    alignkit evaluate --dataset brain2d --method voxelmorph:runs/vxm2d/model.pt+refine50 -o eval/

Syntax: ``NAME:CHECKPOINT[+refineK]``

* ``NAME``: a learned method of :mod:`alignkit.train` (``alignkit train --method NAME``);
* ``CHECKPOINT``: a checkpoint file (``model.safetensors`` / ``model.pt``) or the run folder that
  ``alignkit train -o RUNDIR`` wrote; a relative path is relative to the working directory. It is
  everything after the first colon, so a path may hold colons;
* ``+refineK`` (optional, at the very end): instance optimisation, ``K`` iterations of the classical
  solver on top of the prediction (``alignkit register --refine K``). In Python the same is the
  ``refine=K`` option: ``resolve_method("voxelmorph:RUN", refine=50)`` is named
  ``voxelmorph:RUN+refine50``. A checkpoint path that itself ends in ``+refine<digits>`` cannot be named.

Each case runs :func:`alignkit.register` with ``method=NAME``, the trained model, ``refine``,
``seed``, ``device`` and ``quiet=True``, on the case's images only -- exactly as the classical
``alignkit:<preset>`` methods do (see :mod:`alignkit.evaluate.alignkit_methods`). Other options:
``transform`` (the linear pre-alignment, default: the model's training ``prealign``) and
``similarity`` (the refinement's similarity). The model is read once per process, before the timer:
``seconds`` covers the prediction (pre-alignment, network, refinement, the sampled world map);
the reading is ``extra_load_seconds``.

A checkpoint that does not exist makes the method *skipped* (with how to train one); a file that
exists but cannot be read, or holds another method's model, is an *error*. A case whose
dimensionality differs from the model's is *not applicable*.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import numpy as np

from alignkit.data.case import Case
from alignkit.errors import ConfigError, InputError
from alignkit.evaluate.method import Method, MethodUnavailable, Prediction

#: what ``LearnedMethod(..., **options)`` accepts
OPTIONS = ("refine", "transform", "similarity")

#: the checkpoint shown by :func:`learned_method_patterns` (``alignkit evaluate --list``)
PLACEHOLDER = "<checkpoint>"

_REFINE_SUFFIX = re.compile(r"\+refine(\d+)$")


def learned_names() -> list[str]:
    """The learned methods of :mod:`alignkit.train` (sorted)."""
    from alignkit.train.methods import method_names

    return method_names()


def learned_method_patterns() -> list[str]:
    """``["voxelmorph:<checkpoint>", ...]``: what ``alignkit evaluate --list`` shows for learned methods."""
    return [f"{name}:{PLACEHOLDER}" for name in learned_names()]


def train_hint(method: str) -> str:
    return f"train one with: alignkit train --method {method} --dataset NAME -o RUNDIR"


def parse_spec(spec: str) -> tuple[str, str, int | None] | None:
    """``(method, checkpoint, refine or None)`` of ``"NAME:CHECKPOINT[+refineK]"``, or None when
    ``spec`` does not start with a learned method's name and a colon."""
    name, sep, rest = spec.strip().partition(":")
    if not sep or name not in learned_names():
        return None
    refine: int | None = None
    match = _REFINE_SUFFIX.search(rest)
    if match:
        refine = int(match.group(1))
        rest = rest[: match.start()]
    if not rest.strip():
        raise ConfigError(
            f"{spec.strip()!r}: method {name!r} needs a checkpoint: {name}:CHECKPOINT[+refineK]"
        )
    return name, rest.strip(), refine


def learned_method_for(spec: str, **options: Any) -> LearnedMethod | None:
    """The :class:`LearnedMethod` named ``spec``, or None when ``spec`` names no learned method."""
    parsed = parse_spec(spec)
    if parsed is None:
        return None
    method, checkpoint, refine = parsed
    if refine is not None:
        given = options.get("refine")
        if given is not None and int(given) != refine:
            raise ConfigError(f"{spec.strip()!r} says refine {refine} but the refine option is {given}")
        options["refine"] = refine
        # the table shows the name the user asked for (e.g. with "+refine0")
        options.setdefault("name", spec.strip())
    return LearnedMethod(method, checkpoint, **options)


class LearnedMethod(Method):
    """``NAME:CHECKPOINT[+refineK]``: :func:`alignkit.register` with a trained model (module docstring).

    ``name`` defaults to ``NAME:CHECKPOINT`` plus ``+refineK`` when ``refine`` > 0.
    """

    kinds = ("deformable",)
    ndims = (2, 3)

    def __init__(
        self,
        method: str,
        checkpoint: str | os.PathLike[str],
        *,
        refine: int | None = None,
        transform: str | list[str] | None = None,
        similarity: str | None = None,
        name: str | None = None,
        **unknown: Any,
    ) -> None:
        if method not in learned_names():
            raise ConfigError(
                f"unknown learned method {method!r}; known: {', '.join(learned_names()) or '(none)'}"
            )
        if unknown:
            raise ConfigError(
                f"{method}: unknown options {', '.join(sorted(unknown))}; known: {', '.join(OPTIONS)}"
            )
        refine = 0 if refine is None else int(refine)
        if refine < 0:
            raise ConfigError(f"{method}: refine must be >= 0 iterations, got {refine}")
        shown = os.fspath(checkpoint)
        if not shown.strip():
            raise ConfigError(f"method {method!r} needs a checkpoint: {method}:CHECKPOINT[+refineK]")
        if name is None:
            name = f"{method}:{shown}" + (f"+refine{refine}" if refine else "")
        super().__init__(name, refine=refine, transform=transform, similarity=similarity)
        self.method = method
        self.refine = refine
        self.transform = transform
        self.similarity = similarity
        # resolved now: an isolated worker (same working directory today) must not depend on it
        self.checkpoint = shown if shown == PLACEHOLDER else os.path.abspath(os.path.expanduser(shown))
        self.description = f'alignkit.register(method="{method}", checkpoint="{shown}", refine={refine})'
        self._loaded: Any = None  # the model, read once per process (never pickled)
        self._load_seconds = 0.0

    # a worker gets the path, not the model: the runner pickles methods, and a checkpoint is never
    # unpickled (alignkit.train.checkpoint)
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_loaded"], state["_load_seconds"] = None, 0.0
        return state

    def _find(self) -> str:
        """The checkpoint file; :class:`MethodUnavailable` (with how to train one) when there is none."""
        from alignkit.train.checkpoint import find_checkpoint

        if self.checkpoint == PLACEHOLDER:
            usage = f"{self.method}:<checkpoint file or RUNDIR>[+refineK]"
            raise MethodUnavailable(f"name a checkpoint: {usage}; {train_hint(self.method)}")
        try:
            return os.fspath(find_checkpoint(self.checkpoint))
        except InputError as exc:
            raise MethodUnavailable(f"{exc}; {train_hint(self.method)}") from None

    def model(self) -> Any:
        """The trained :class:`alignkit.train.LearnedMethod` (read on first use, on the CPU)."""
        if self._loaded is None:
            from alignkit.train import load

            path = self._find()
            tic = time.perf_counter()
            learned = load(path, device="cpu")
            if learned.method_name != self.method:
                raise ConfigError(
                    f"{path}: the checkpoint holds a {learned.method_name!r} model, not {self.method!r}"
                )
            self._loaded, self._load_seconds = learned, time.perf_counter() - tic
        return self._loaded

    def check_available(self) -> None:
        # a missing checkpoint is "skipped"; an unreadable one or another method's model is an error
        self._find()
        self.model()

    def applicable(self, case: Case) -> str | None:
        reason = super().applicable(case)
        if reason is not None:
            return reason
        try:
            ndim = int(self.model().ndim)
        except (MethodUnavailable, InputError, ConfigError):
            return None  # not readable: the availability check reports it
        if ndim != case.ndim:
            return f"{self.name}: the checkpoint's model is {ndim}D, not {case.ndim}D"
        return None

    def register(
        self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None
    ) -> Prediction:
        import torch

        import alignkit

        previous_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(int(threads))
        try:
            cached = self._loaded is not None
            learned = self.model()
            load_seconds = 0.0 if cached else self._load_seconds
            started = time.perf_counter()
            result = alignkit.register(
                case.fixed,
                case.moving,
                method=self.method,
                checkpoint=learned,
                refine=self.refine,
                transform=self.transform,
                similarity=self.similarity,
                seed=seed,
                device=device,
                quiet=True,
            )
            # the sampled map is the method's output, so it is timed (to host memory: a GPU run syncs)
            world = result.world_map()[0].detach().cpu().numpy().astype(np.float32)
            seconds = time.perf_counter() - started
        finally:
            torch.set_num_threads(previous_threads)
        metrics = result.metrics
        extra: dict[str, Any] = {
            "ncc_before": metrics.get("ncc_before"),
            "ncc_after": metrics.get("ncc_after"),
            "stages": ">".join(metrics.get("stages", [])),
            "register_seconds": metrics.get("seconds"),
            "refine_iterations": self.refine,
            "load_seconds": load_seconds,  # 0 when this process had read it already
        }
        for stage, value in (metrics.get("stage_seconds") or {}).items():
            extra[f"{'predict' if stage == self.method else stage}_seconds"] = value
        return Prediction(world_map=world, seconds=seconds, extra=extra)
