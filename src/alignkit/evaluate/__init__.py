"""Evaluation: run alignkit's configurations and peer tools on the same cases and score them alike.

    from alignkit.evaluate import evaluate
    rows = evaluate(cases, ["alignkit:brain", "ants:syn"], out_dir="eval/")   # results.csv, summary.md, plots

The contracts (:class:`Method`, :class:`Prediction`, :class:`MethodUnavailable`) are imported
eagerly; the runner, reports and registry are loaded on first use (they pull in tqdm and
matplotlib), so ``import alignkit.evaluate`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from alignkit.evaluate.method import Method, MethodUnavailable, Prediction

if TYPE_CHECKING:
    from alignkit.evaluate.alignkit_methods import AlignkitMethod
    from alignkit.evaluate.registry import list_methods, resolve_method
    from alignkit.evaluate.report import (
        summarize,
        summary_markdown,
        write_boxplots,
        write_report,
        write_results,
    )
    from alignkit.evaluate.runner import evaluate
    from alignkit.evaluate.scoring import score_case

_LAZY = {
    "AlignkitMethod": "alignkit.evaluate.alignkit_methods",
    "evaluate": "alignkit.evaluate.runner",
    "list_methods": "alignkit.evaluate.registry",
    "resolve_method": "alignkit.evaluate.registry",
    "score_case": "alignkit.evaluate.scoring",
    "summarize": "alignkit.evaluate.report",
    "summary_markdown": "alignkit.evaluate.report",
    "write_boxplots": "alignkit.evaluate.report",
    "write_report": "alignkit.evaluate.report",
    "write_results": "alignkit.evaluate.report",
}

__all__ = [
    "AlignkitMethod",
    "Method",
    "MethodUnavailable",
    "Prediction",
    "evaluate",
    "list_methods",
    "resolve_method",
    "score_case",
    "summarize",
    "summary_markdown",
    "write_boxplots",
    "write_report",
    "write_results",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'alignkit.evaluate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
