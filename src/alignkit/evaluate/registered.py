"""Any method of alignkit's registry as an ``alignkit evaluate`` method.

:class:`RegisteredMethod` runs :func:`alignkit.register` with ``method=NAME`` and the method's
options on the case's images only (the ground truth -- labels, landmarks -- is never passed: a
method must not see what it is scored on) and returns the map it produced, plus the exact matrix
when the whole transform is linear (affine and homography cases are then scored from the model, not
from the sampled map). The case kinds and dimensions it accepts come from the method's
:class:`~alignkit.methods.base.MethodInfo`, so a method that predicts a matrix, a homography or a
field is evaluated on every case kind it declares.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from alignkit.data.case import Case
from alignkit.evaluate.method import Method, Prediction


class RegisteredMethod(Method):
    """``alignkit.register(case.fixed, case.moving, method=method, refine=refine, **options)``."""

    def __init__(
        self,
        method: str,
        *,
        name: str | None = None,
        refine: int = 0,
        kinds: tuple[str, ...] | None = None,
        ndims: tuple[int, ...] | None = None,
        **options: Any,
    ) -> None:
        from alignkit.methods import get_method

        info = get_method(method).info
        super().__init__(name or method, **options)
        self.method = method
        self.refine = int(refine)
        self.kinds = tuple(kinds or info.case_kinds)
        self.ndims = tuple(ndims or info.ndims)
        self.description = f'alignkit.register(method="{method}"' + (f", refine={self.refine}" if self.refine else "") + ")"

    def register_options(self, case: Case) -> dict[str, Any]:
        """The options passed to :func:`alignkit.register` for ``case`` (subclasses resolve presets).

        A case that says its pairs are related by an affine map (``kind="affine"``, e.g. VIS-NIR) sets
        ``model="affine"`` for a method that has that option (``weak-homography``) unless it is given:
        the presets then run their affine chain and the OpenCV peers fit an affine, so every method is
        told the same thing about the case (:meth:`AlignkitMethod.config_for`)."""
        options = dict(self.options)
        if case.kind == "affine" and "model" not in options and self._accepts("model"):
            options["model"] = "affine"
        return options

    def _accepts(self, option: str) -> bool:
        import inspect

        from alignkit.methods import get_method

        return option in inspect.signature(get_method(self.method).__init__).parameters

    def _run(self, case: Case, *, seed: int, device: str) -> Any:
        import alignkit

        return alignkit.register(case.fixed, case.moving, method=self.method, refine=self.refine, seed=seed,
                                 device=device, quiet=True, **self.register_options(case))

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        import torch

        previous_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(int(threads))
        try:
            started = time.perf_counter()
            result = self._run(case, seed=seed, device=device)
            # the sampled map is the method's output (a peer writes its field too), so it is timed
            world = result.world_map()[0].detach().cpu().numpy().astype(np.float32)
            seconds = time.perf_counter() - started
        finally:
            torch.set_num_threads(previous_threads)
        transform = result.transform
        # a chain of linear stages (centre/COM start included) is one exact matrix: corner errors then
        # use the model rather than the sampled map
        matrix = transform.matrix().double().cpu().numpy() if transform.is_linear else None
        metrics = result.metrics
        extra: dict[str, Any] = {
            "ncc_before": metrics.get("ncc_before"),
            "ncc_after": metrics.get("ncc_after"),
            "stages": ">".join(metrics.get("stages", [])),
            "register_seconds": metrics.get("seconds"),
        }
        if "refine_iterations" in metrics:
            extra["refine_iterations"] = metrics["refine_iterations"]
        for stage, value in (metrics.get("stage_seconds") or {}).items():
            if stage == self.method:
                extra["predict_seconds"] = value
            elif stage == "refine" or self.method != "classical":
                extra[f"{stage}_seconds"] = value
        return Prediction(world_map=world, matrix=matrix, seconds=seconds, extra=extra)
