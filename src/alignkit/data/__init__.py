"""Data: registration cases with ground truth -- real data-set loaders, synthetic pairs, demo pairs.

* :class:`Case` (:mod:`alignkit.data.case`): one (fixed, moving) pair and its ground truth, always
  fixed → moving in the world frame;
* :func:`load_dataset` / :func:`available_datasets` / :class:`CaseDataset`
  (:mod:`alignkit.data.datasets`): the folders of ``../shared/data`` or a user's folder laid out the
  same way; the loaders live by domain (:mod:`~alignkit.data.brain`, :mod:`~alignkit.data.multimodal`,
  :mod:`~alignkit.data.flow`, :mod:`~alignkit.data.homography`) on :mod:`alignkit.data.base`;
* :mod:`alignkit.data.groundtruth`: the ground truth alignkit measured for the few cases whose data
  ships none (packaged JSON with provenance and uncertainty; ``Case.truth == "measured"``);
* :mod:`alignkit.data.synthetic`: known transforms applied to real images (:func:`random_affine`,
  :func:`random_homography`, :func:`random_smooth_deformation`, :func:`photometric`,
  :func:`modality_change`, :class:`SyntheticDataset`).

Names are resolved on first use, so ``import alignkit.data`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CASE_KINDS": "alignkit.data.case",
    "Case": "alignkit.data.case",
    "CaseDataset": "alignkit.data.datasets",
    "CaseSelection": "alignkit.data.datasets",
    "available_datasets": "alignkit.data.datasets",
    "load_dataset": "alignkit.data.datasets",
    "SyntheticDataset": "alignkit.data.synthetic",
    "modality_change": "alignkit.data.synthetic",
    "photometric": "alignkit.data.synthetic",
    "random_affine": "alignkit.data.synthetic",
    "random_homography": "alignkit.data.synthetic",
    "random_smooth_deformation": "alignkit.data.synthetic",
}

__all__ = [
    "CASE_KINDS",
    "Case",
    "CaseDataset",
    "CaseSelection",
    "SyntheticDataset",
    "available_datasets",
    "load_dataset",
    "modality_change",
    "photometric",
    "random_affine",
    "random_homography",
    "random_smooth_deformation",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'alignkit.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
