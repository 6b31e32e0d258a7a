"""Registered methods other than the classical presets as ``alignkit evaluate`` methods:
``NAME``, ``NAME:CHECKPOINT``, ``NAME+refineK``.

Every method of :func:`alignkit.methods.available` but ``classical`` (which ``alignkit:<preset>``
covers) is a method of ``alignkit evaluate``::

    alignkit evaluate --dataset brain3d-oasis-trt20 --method voxelmorph -o eval/        # shipped model
    alignkit evaluate --dataset brain2d --method voxelmorph:runs/vxm2d -o eval/
    alignkit evaluate --dataset brain2d --method voxelmorph:runs/vxm2d/model.pt+refine50 -o eval/

Syntax: ``NAME[:CHECKPOINT][+refineK]``

* ``NAME``: a method of the registry (``alignkit methods``);
* ``CHECKPOINT`` (learned methods): a checkpoint file (``model.safetensors`` / ``model.pt``) or the
  run folder that ``alignkit train -o RUNDIR`` wrote; a relative path is relative to the working
  directory. It is everything after the first colon, so a path may hold colons. Without it, the
  model shipped with alignkit for the case's dimension is used (a case without one is skipped);
* ``+refineK`` (optional, at the very end): instance optimisation, ``K`` iterations of the classical
  solver on top of the prediction (``alignkit register --refine K``). In Python the same is the
  ``refine=K`` option: ``resolve_method("voxelmorph:RUN", refine=50)`` is named
  ``voxelmorph:RUN+refine50``. A checkpoint path that itself ends in ``+refine<digits>`` cannot be named.

Each case runs :func:`alignkit.register` with ``method=NAME``, the trained model, ``refine``,
``seed``, ``device`` and ``quiet=True``, on the case's images only (:mod:`alignkit.evaluate.registered`).
Other options: ``transform`` (the linear pre-alignment, default: the model's training ``prealign``) and
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

from alignkit.data.case import Case
from alignkit.errors import ConfigError, InputError
from alignkit.evaluate.method import MethodUnavailable, Prediction
from alignkit.evaluate.registered import RegisteredMethod

#: what ``LearnedMethod(..., **options)`` accepts
OPTIONS = ("refine", "transform", "similarity")

#: the checkpoint shown by :func:`learned_method_patterns` (``alignkit evaluate --list``)
PLACEHOLDER = "<checkpoint>"

_REFINE_SUFFIX = re.compile(r"\+refine(\d+)$")


def learned_names() -> list[str]:
    """The registered methods other than ``classical`` (sorted)."""
    from alignkit.methods import method_names

    return sorted(name for name in method_names() if name != "classical")


def _is_learned(name: str) -> bool:
    from alignkit.methods import get_method

    return get_method(name).info.kind == "learned"


def learned_method_patterns() -> list[str]:
    """``["voxelmorph", "voxelmorph:<checkpoint>", ...]``: what ``alignkit evaluate --list`` shows."""
    out: list[str] = []
    for name in learned_names():
        out.append(name)
        if _is_learned(name):
            out.append(f"{name}:{PLACEHOLDER}")
    return out


def train_hint(method: str) -> str:
    return f"train one with: alignkit train --method {method} --dataset NAME -o RUNDIR"


def parse_spec(spec: str) -> tuple[str, str | None, int | None] | None:
    """``(method, checkpoint or None, refine or None)`` of ``"NAME[:CHECKPOINT][+refineK]"``, or None
    when ``spec`` does not start with a registered method's name (other than ``classical``)."""
    text = spec.strip()
    refine: int | None = None
    match = _REFINE_SUFFIX.search(text)
    if match:
        refine = int(match.group(1))
        text = text[: match.start()]
    name, sep, rest = text.partition(":")
    if name not in learned_names():
        return None
    if sep and not rest.strip():
        raise ConfigError(f"{spec.strip()!r}: name a checkpoint after the colon: {name}:CHECKPOINT[+refineK]")
    if sep and not _is_learned(name):
        raise ConfigError(f"{spec.strip()!r}: method {name!r} is not trained; it takes no checkpoint")
    return name, rest.strip() if sep else None, refine


def learned_method_for(spec: str, **options: Any) -> LearnedMethod | None:
    """The :class:`LearnedMethod` named ``spec``, or None when ``spec`` names no learned method."""
    parsed = parse_spec(spec)
    if parsed is None:
        return None
    method, checkpoint, refine = parsed
    if not _is_learned(method):
        from alignkit.evaluate.registered import RegisteredMethod

        if refine is not None:
            options["refine"] = refine
            options.setdefault("name", spec.strip())
        return RegisteredMethod(method, **options)  # type: ignore[return-value]
    if refine is not None:
        given = options.get("refine")
        if given is not None and int(given) != refine:
            raise ConfigError(f"{spec.strip()!r} says refine {refine} but the refine option is {given}")
        options["refine"] = refine
        # the table shows the name the user asked for (e.g. with "+refine0")
        options.setdefault("name", spec.strip())
    return LearnedMethod(method, checkpoint, **options)


class LearnedMethod(RegisteredMethod):
    """``NAME[:CHECKPOINT][+refineK]``: :func:`alignkit.register` with a trained model (module docstring).

    ``name`` defaults to ``NAME[:CHECKPOINT]`` plus ``+refineK`` when ``refine`` > 0. ``checkpoint``
    None uses the model shipped for the case's dimension.
    """

    def __init__(
        self,
        method: str,
        checkpoint: str | os.PathLike[str] | None = None,
        *,
        refine: int | None = None,
        transform: str | list[str] | None = None,
        similarity: str | None = None,
        name: str | None = None,
        **unknown: Any,
    ) -> None:
        if method not in learned_names() or not _is_learned(method):
            known = [n for n in learned_names() if _is_learned(n)]
            raise ConfigError(f"unknown learned method {method!r}; known: {', '.join(known) or '(none)'}")
        # the method's own inference options (c2f's mode and tile, stereo-net's disparity range ...)
        # are passed to alignkit.register as `register --option` passes them
        from alignkit.methods import get_method

        own = [n for n in get_method(method).option_names() if n not in ("checkpoint", *OPTIONS)]
        bad = sorted(set(unknown) - set(own))
        if bad:
            raise ConfigError(
                f"{method}: unknown options {', '.join(bad)}; known: {', '.join([*OPTIONS, *own])}"
            )
        refine = 0 if refine is None else int(refine)
        if refine < 0:
            raise ConfigError(f"{method}: refine must be >= 0 iterations, got {refine}")
        shown = None if checkpoint is None else os.fspath(checkpoint)
        if shown is not None and not shown.strip():
            raise ConfigError(f"method {method!r} needs a checkpoint after the colon: {method}:CHECKPOINT[+refineK]")
        if name is None:
            name = method + (f":{shown}" if shown is not None else "") + (f"+refine{refine}" if refine else "")
        options = {k: v for k, v in (("transform", transform), ("similarity", similarity)) if v is not None}
        super().__init__(method, name=name, refine=refine, **options, **unknown)
        self.transform = transform
        self.similarity = similarity
        # resolved now: an isolated worker (same working directory today) must not depend on it
        self.checkpoint = (
            None if shown is None else shown if shown == PLACEHOLDER else os.path.abspath(os.path.expanduser(shown))
        )
        self.description = (f'alignkit.register(method="{method}"'
                            + (f', checkpoint="{shown}"' if shown is not None else "") + f", refine={refine})")
        self._loaded: dict[int, Any] = {}  # models read in this process, by dimension (never pickled)
        self._load_seconds = 0.0

    # a worker gets the path, not the model: the runner pickles methods, and a checkpoint is never
    # unpickled (alignkit.train.checkpoint)
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_loaded"], state["_load_seconds"] = {}, 0.0
        return state

    def _source(self, ndim: int | None) -> str:
        """The checkpoint file (or the shipped model's); :class:`MethodUnavailable` (with how to train
        one) when there is none."""
        if self.checkpoint is None:
            from alignkit.methods.shipped import shipped_for, shipped_models

            shipped = shipped_for(self.method, ndim) if ndim is not None else next(iter(shipped_models(self.method)), None)
            if shipped is None:
                where = f" for {ndim}D images" if ndim is not None else ""
                raise MethodUnavailable(f"no {self.method} model ships{where}; name one: {self.method}:<checkpoint>; "
                                        f"{train_hint(self.method)}")
            return os.fspath(shipped.path())
        from alignkit.train.checkpoint import find_checkpoint

        if self.checkpoint == PLACEHOLDER:
            usage = f"{self.method}:<checkpoint file or RUNDIR>[+refineK]"
            raise MethodUnavailable(f"name a checkpoint: {usage}; {train_hint(self.method)}")
        try:
            return os.fspath(find_checkpoint(self.checkpoint))
        except InputError as exc:
            raise MethodUnavailable(f"{exc}; {train_hint(self.method)}") from None

    def model(self, ndim: int | None = None) -> Any:
        """The trained :class:`alignkit.methods.LearnedModel` (read on first use, on the CPU)."""
        key = -1 if self.checkpoint is not None else int(ndim or 0)
        if key not in self._loaded:
            from alignkit.methods import load_model

            path = self._source(ndim)
            tic = time.perf_counter()
            learned = load_model(path, device="cpu")
            if learned.method_name != self.method:
                raise ConfigError(
                    f"{path}: the checkpoint holds a {learned.method_name!r} model, not {self.method!r}"
                )
            self._loaded[key], self._load_seconds = learned, time.perf_counter() - tic
        return self._loaded[key]

    def check_available(self) -> None:
        # a missing checkpoint is "skipped"; an unreadable one or another method's model is an error
        self._source(None)
        if self.checkpoint is not None:
            self.model()

    def applicable(self, case: Case) -> str | None:
        reason = super().applicable(case)
        if reason is not None:
            return reason
        if self.checkpoint is None:
            from alignkit.methods.shipped import shipped_for

            if shipped_for(self.method, case.ndim) is None:
                return f"{self.name}: no {self.method} model ships for {case.ndim}D images"
            return None
        try:
            ndim = int(self.model().ndim)
        except (MethodUnavailable, InputError, ConfigError):
            return None  # not readable: the availability check reports it
        if ndim != case.ndim:
            return f"{self.name}: the checkpoint's model is {ndim}D, not {case.ndim}D"
        return None

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        key = -1 if self.checkpoint is not None else case.ndim
        cached = key in self._loaded
        self.model(case.ndim)
        prediction = super().register(case, seed=seed, device=device, threads=threads)
        prediction.extra["load_seconds"] = 0.0 if cached else self._load_seconds  # 0 when read already
        return prediction

    def register_options(self, case: Case) -> dict[str, Any]:
        options = dict(self.options)
        options["checkpoint"] = self.model(case.ndim)
        return options
