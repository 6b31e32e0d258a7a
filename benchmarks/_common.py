"""Helpers shared by the benchmark scripts (numpy and the standard library only, so that a worker
process running a peer package does not pay for importing torch).

* :func:`emit` prints the one JSON line of a benchmark on stdout (and optionally saves it);
  :func:`log` writes progress to stderr.
* :func:`peak_rss_mb` is this process's peak resident set size; :func:`run_worker` runs this same
  script in a fresh interpreter (``--worker``) so that each method's peak memory and import cost are
  its own.
* :func:`nonpositive_jacobian_percent` computes the % of non-positive Jacobian determinants of a
  displacement field given in world units on a grid, the same way for every method.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"

THREAD_ENV = {
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
    "OPENBLAS_NUM_THREADS": "2",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "2",
}


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/Inf -> None, numpy scalars -> Python, rounded floats."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return None if not math.isfinite(value) else round(value, 6)
    return value


def emit(payload: dict[str, Any], out: str | os.PathLike | None = None) -> None:
    line = json.dumps(_clean(payload), sort_keys=False)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(line + "\n")
    print(line, flush=True)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB: the evaluation workers' own measure
    (``VmHWM``, see there). Imported when called: alignkit imports torch, which must come after
    :func:`set_threads`."""
    from alignkit.evaluate.worker import peak_rss_mb as own_peak

    return own_peak()


def set_threads(n: int = 2) -> None:
    for key in THREAD_ENV:
        os.environ[key] = str(n)


def run_worker(script: str, args: list[str], *, timeout: float | None = None) -> dict[str, Any]:
    """Run ``python script --worker ARGS --result FILE`` in a fresh process; return its result dict
    (``{"status": "error", ...}`` when it fails), with ``wall_seconds_process`` added."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = handle.name
    env = dict(os.environ, **THREAD_ENV)
    cmd = [sys.executable, script, "--worker", *args, "--result", result_path]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        os.unlink(result_path)
        return {"status": "error", "error": f"timed out after {timeout} s"}
    elapsed = time.perf_counter() - started
    try:
        result = json.loads(Path(result_path).read_text()) if Path(result_path).stat().st_size else None
    except (OSError, json.JSONDecodeError):
        result = None
    finally:
        if os.path.exists(result_path):
            os.unlink(result_path)
    if proc.returncode != 0 or result is None:
        tail = (proc.stderr or "").strip().splitlines()[-5:]
        return {"status": "error", "error": " | ".join(tail) or f"exit code {proc.returncode}"}
    result["wall_seconds_process"] = elapsed
    return result


def nonpositive_jacobian_percent(displacement: np.ndarray, world_from_voxel: np.ndarray) -> dict[str, float]:
    """Jacobian determinant of ``x -> x + u(x)`` on a grid, in world units.

    ``displacement`` is ``(ndim, *shape)``, world units, in the same world frame as the grid's
    ``world_from_voxel`` matrix (``(ndim+1, ndim+1)`` or its linear part); a frame flip such as
    RAS<->LPS applied to both leaves the determinant unchanged. Derivatives are central differences
    along the array axes (one-sided at the border), chained with the inverse of the grid's linear part:
    ``J = I + (du/di) M^-1``. Counts every voxel of the grid.
    """
    u = np.asarray(displacement, dtype=np.float32)
    ndim = u.shape[0]
    lin = np.asarray(world_from_voxel, dtype=np.float64)[:ndim, :ndim]
    inv = np.linalg.inv(lin).astype(np.float32)
    # G[a][b] = d u_a / d index_b ; J[a][c] = delta_ac + sum_b G[a][b] inv[b][c]
    jac = [[None] * ndim for _ in range(ndim)]
    grads = [np.gradient(u[a], axis=tuple(range(ndim))) for a in range(ndim)]
    for a in range(ndim):
        for c in range(ndim):
            value = np.zeros(u.shape[1:], dtype=np.float32) + (1.0 if a == c else 0.0)
            for b in range(ndim):
                if inv[b, c] != 0:
                    value += grads[a][b] * inv[b, c]
            jac[a][c] = value
    del grads
    if ndim == 3:
        det = (
            jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
            - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
            + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
        )
    elif ndim == 2:
        det = jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    else:
        raise ValueError(f"unsupported dimension {ndim}")
    det = np.nan_to_num(det, nan=-1.0)
    return {
        "percent_nonpositive": 100.0 * float((det <= 0).sum()) / det.size,
        "min": float(det.min()),
        "max": float(det.max()),
        "mean": float(det.mean()),
    }


def mean_finite(values: Any) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else math.nan
