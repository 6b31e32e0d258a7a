"""Descriptor matching mean average precision with the protocol of Dong et al. 2018 §6.

Protocol (Dong et al., "Learning to Align Images using Weak Geometric Supervision", §6 and §6.1)
-----------------------------------------------------------------------------------------------
* For an image pair (A, B), keypoints are detected in A (Dong et al. 2018: up to 2000 SIFT keypoints), warped into
  B by the ground-truth homography, and a patch is sampled around each keypoint in both images; a
  descriptor is computed for every patch. Row ``i`` of ``desc_a`` and row ``i`` of ``desc_b`` are
  therefore the **positive** (corresponding) pair, and every other row of ``desc_b`` is a
  **negative** for query ``i`` -- there are no separately sampled negatives at test time.
* For each descriptor of A, "the exact nearest neighbor within the set of descriptors extracted
  from B" is found (Dong et al. 2018 writes "in the [L2] distance sense"; ``metric`` defaults to Euclidean).
* "The average precision (AP) is the fraction of times the correct nearest neighbor was found", and
  "the mean AP (mAP) is the average AP across multiple image pairs". That is Dong et al. 2018's ``ap`` / ``map``.
* Ties: a query counts as correct only when its true match is *strictly* closer than every other
  descriptor of B (with a tie the nearest neighbour is not determined, so it is not "found").

Because "AP" also names the area under a precision-recall curve, the result also carries
``ranked_ap``: the HPatches-matching style AP of the list of nearest-neighbour matches ranked by
their distance (closest first), with precision/recall taken at every distinct distance and recall
counted against all ``N`` queries (a query whose NN is wrong can never be recalled), i.e.
``Σ_k (R_k - R_{k-1}) P_k``. It is ``<= ap`` and rewards descriptors whose wrong matches are far.

Inputs are ``(N, D)`` arrays (numpy or torch) for one pair; ``desc_b`` may have extra rows
(``N_b >= N``), which act as distractors only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from alignkit.errors import InputError, ShapeError
from alignkit.metrics.overlap import to_numpy

_CHUNK = 1024
"""Queries per block of the distance matrix (keeps memory at ``_CHUNK * N_b`` doubles)."""


def _nearest(desc_a: np.ndarray, desc_b: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per query: whether the true match is the strict nearest neighbour, and the NN distance."""
    from scipy.spatial.distance import cdist

    n = desc_a.shape[0]
    correct = np.zeros(n, dtype=bool)
    nn_dist = np.zeros(n)
    for start in range(0, n, _CHUNK):
        rows = np.arange(start, min(start + _CHUNK, n))
        dist = cdist(desc_a[rows], desc_b, metric=metric)
        true = dist[np.arange(rows.size), rows].copy()
        dist[np.arange(rows.size), rows] = np.inf
        others = dist.min(axis=1)
        correct[rows] = true < others
        nn_dist[rows] = np.minimum(true, others)
    return correct, nn_dist


def _ranked_ap(correct: np.ndarray, nn_dist: np.ndarray) -> float:
    """AP of the NN matches ranked by distance; recall over all queries; ties grouped."""
    order = np.argsort(nn_dist, kind="mergesort")
    dist, hits = nn_dist[order], correct[order]
    tp = np.cumsum(hits)
    rank = np.arange(1, hits.size + 1)
    # one operating point per distinct distance (its last occurrence), as sklearn's PR curve does
    last = np.r_[dist[1:] != dist[:-1], True]
    tp_at, rank_at = tp[last], rank[last]
    recall_step = np.diff(np.r_[0, tp_at]) / hits.size
    return float((recall_step * tp_at / rank_at).sum())


def descriptor_ap(desc_a: Any, desc_b: Any, *, metric: str = "euclidean") -> dict[str, float]:
    """Dong et al. 2018's AP of one image pair: ``{"ap", "ranked_ap", "n"}`` (module docstring).

    ``desc_a`` is ``(N, D)``, ``desc_b`` is ``(N_b, D)`` with ``N_b >= N`` and row ``i`` of both the
    same scene point. ``metric`` is any :func:`scipy.spatial.distance.cdist` metric ("euclidean",
    "sqeuclidean", "cosine", ...; for binary descriptors unpack the bits and use "hamming").
    """
    a = to_numpy(desc_a, "desc_a").astype(np.float64)
    b = to_numpy(desc_b, "desc_b").astype(np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ShapeError(f"descriptors must be (N, D) and (N_b, D), same D, got {a.shape} and {b.shape}")
    if a.shape[0] == 0 or b.shape[0] < a.shape[0]:
        raise ShapeError(f"need N >= 1 queries and N_b >= N descriptors, got {a.shape[0]} and {b.shape[0]}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise InputError("descriptors contain NaN or Inf")
    correct, nn_dist = _nearest(a, b, metric)
    return {"ap": float(correct.mean()), "ranked_ap": _ranked_ap(correct, nn_dist), "n": int(a.shape[0])}


def descriptor_map(desc_a: Any, desc_b: Any, *, metric: str = "euclidean") -> dict[str, Any]:
    """Dong et al. 2018's mean AP over image pairs: ``{"map", "ranked_map", "ap", "n_pairs", "n_queries"}``.

    ``desc_a`` / ``desc_b`` are one pair ``(N, D)`` / ``(N_b, D)``, a batch ``(P, N, D)`` /
    ``(P, N_b, D)``, or two equally long sequences of per-pair arrays (``N`` may differ between
    pairs). ``map`` is the unweighted mean of the per-pair APs (Dong et al. 2018: "the average AP across multiple
    image pairs"), ``ranked_map`` that of :func:`descriptor_ap`'s ``ranked_ap``; ``ap`` lists the
    per-pair APs.
    """
    pairs_a, pairs_b = _as_pairs(desc_a, "desc_a"), _as_pairs(desc_b, "desc_b")
    if len(pairs_a) != len(pairs_b):
        raise ShapeError(f"desc_a has {len(pairs_a)} image pairs but desc_b has {len(pairs_b)}")
    if not pairs_a:
        raise InputError("descriptor_map needs at least one image pair")
    per_pair = [descriptor_ap(a, b, metric=metric) for a, b in zip(pairs_a, pairs_b)]
    return {
        "map": float(np.mean([p["ap"] for p in per_pair])),
        "ranked_map": float(np.mean([p["ranked_ap"] for p in per_pair])),
        "ap": [p["ap"] for p in per_pair],
        "n_pairs": len(per_pair),
        "n_queries": int(sum(p["n"] for p in per_pair)),
    }


def _as_pairs(desc: Any, name: str) -> Sequence[Any]:
    """One array per image pair, from ``(N, D)``, ``(P, N, D)`` or a sequence of ``(N_i, D)``."""
    if isinstance(desc, (list, tuple)) and desc and to_numpy(desc[0], name).ndim == 2:
        return list(desc)
    values = to_numpy(desc, name)
    if values.ndim == 2:
        return [values]
    if values.ndim == 3:
        return list(values)
    raise ShapeError(f"{name} must be (N, D), (P, N, D) or a sequence of (N_i, D), got {values.shape}")
