"""Ground truth that alignkit *measured*, for the few cases whose data ships none.

The values live in ``alignkit/data/groundtruth/<data set with / as ->.json`` (shipped in the package),
written by ``benchmarks/measure_ground_truth.py`` from the data -- loaders never register at load time.
Each case record holds the fixed -> moving ``matrix`` (world frame, like :attr:`Case.matrix`), the
``uncertainty`` (largest corner distance between two independent fits, in ``units``), the two fits
themselves, how they were made (``method``, ``script``, ``date``, ``commit``, ``versions``) and the
size and SHA-256 of the files measured (``measured_files``): a measured matrix applies to those files
only (:meth:`MeasuredTruth.matches`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from alignkit.errors import InputError


@dataclass(frozen=True)
class MeasuredTruth:
    """One measured ground truth (see the module doc)."""

    dataset: str
    case: str
    matrix: np.ndarray
    uncertainty: float
    units: str
    record: dict[str, Any]

    @property
    def source(self) -> str:
        """One line for :attr:`Case.truth_source`: how, by what, when, at which commit."""
        r = self.record
        return (f"measured by {r['script']} on {r['date']} (commit {str(r['commit'])[:10]}): {r['method']}; "
                f"uncertain to {self.uncertainty:.2g} {self.units}")

    def meta(self) -> dict[str, Any]:
        """The ``Case.meta`` entries (:data:`~alignkit.data.case.TRUTH_KEYS`) of a case that uses it."""
        return {"truth": "measured", "truth_source": self.source, "truth_uncertainty": self.uncertainty}

    def matches(self, fixed: Path, moving: Path) -> bool:
        """Whether ``fixed`` and ``moving`` are the files this truth was measured on (size and SHA-256)."""
        files = self.record["measured_files"]
        return all(
            path.is_file() and path.stat().st_size == files[role]["bytes"]
            and _sha256(str(path), path.stat().st_mtime_ns) == files[role]["sha256"]
            for role, path in (("fixed", fixed), ("moving", moving))
        )


@functools.lru_cache(maxsize=32)
def _sha256(path: str, stamp: int) -> str:
    del stamp  # keys the cache: a rewritten file is hashed again
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def truth_file(dataset: str) -> str:
    """The packaged file name holding ``dataset``'s measured ground truth (``multimodal/ct-mr-2d`` ->
    ``multimodal-ct-mr-2d.json``)."""
    return dataset.replace("/", "-") + ".json"


@functools.cache
def _records(dataset: str) -> dict[str, Any]:
    path = resources.files("alignkit.data") / "groundtruth" / truth_file(dataset)
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputError(f"no measured ground truth for {dataset} (run benchmarks/measure_ground_truth.py)",
                         str(path)) from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"corrupt measured ground truth: {exc}", str(path)) from exc
    return dict(content["cases"])


def measured_truth(dataset: str, case: str) -> MeasuredTruth:
    """The measured ground truth of ``case`` of the data set ``dataset`` (a registered layout name);
    :class:`InputError` when the package has none for it."""
    records = _records(dataset)
    if case not in records:
        raise InputError(f"no measured ground truth for case {case!r} of {dataset}; known: {', '.join(records)}")
    r = records[case]
    matrix = np.asarray(r["matrix"], dtype=np.float64)
    return MeasuredTruth(dataset, case, matrix, float(r["uncertainty"]), str(r["units"]), r)

