"""One (method, case) run, in this process or in a fresh interpreter.

    python -m alignkit.evaluate.worker CASE.pkl JOB.pkl OUTDIR

The runner writes the :class:`~alignkit.data.case.Case` and the job (the pickled
:class:`~alignkit.evaluate.method.Method`, seed, device, threads) as pickles into a temporary
folder it owns; the worker writes back ``OUTDIR/prediction.npz`` (the arrays of the
:class:`~alignkit.evaluate.method.Prediction`) and ``OUTDIR/result.json`` (status, seconds, peak
RSS, extra, message). A fresh interpreter per run makes the peak RSS that run's own, and turns a
crash of a peer's native code (a segfault) into an error row instead of the end of the evaluation.
Nothing is scored here: scoring happens in the runner, the same way for every method.
"""

from __future__ import annotations

import json
import math
import pickle
import resource
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from alignkit.data.case import Case
from alignkit.evaluate.method import Method, MethodUnavailable, Prediction

#: the arrays of a Prediction that travel through ``prediction.npz``
ARRAY_FIELDS = ("world_map", "matrix", "warped_labels")

MAX_MESSAGE = 300


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this process's own address
    space. Not ``ru_maxrss``: the kernel carries the *parent's* peak into it across fork + exec, so a
    worker started by a process holding 2.5 GB of volumes would report at least 2.5 GB whatever it
    used. Elsewhere ``ru_maxrss`` (bytes on macOS, KiB otherwise).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, short enough for a table cell."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 3] + "..."


def json_safe(value: Any) -> Any:
    """Numbers, strings, lists and dicts only; NaN/Inf → None; anything else → its ``str``."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


def execute(
    method: Method, case: Case, *, seed: int, device: str, threads: int | None, show_traceback: bool = True
) -> tuple[str, Prediction | None, str]:
    """Run ``method`` on ``case``: ``("ok", prediction, "")``, ``("skipped", None, reason)`` or
    ``("error", None, one-line message)``; an error's traceback goes to stderr when ``show_traceback``.
    Availability and applicability are the caller's business."""
    try:
        prediction = method.register(case, seed=seed, device=device, threads=threads)
    except MethodUnavailable as exc:  # found out only when running (no GPU, no checkpoint)
        return "skipped", None, str(exc).strip().splitlines()[0] if str(exc).strip() else "unavailable"
    except Exception as exc:  # noqa: BLE001 - any failure of a method is one error row, not the end of the run
        if show_traceback:
            traceback.print_exc(file=sys.stderr)
        return "error", None, one_line(exc)
    if not isinstance(prediction, Prediction):
        return "error", None, f"{method.name}.register returned {type(prediction).__name__}, not a Prediction"
    if prediction.world_map is None and prediction.matrix is None:
        return "error", None, f"{method.name} returned neither a map nor a matrix"
    return "ok", prediction, ""


def save_prediction(prediction: Prediction, out_dir: Path) -> None:
    arrays: dict[str, Any] = {
        k: np.asarray(getattr(prediction, k)) for k in ARRAY_FIELDS if getattr(prediction, k) is not None
    }
    np.savez(out_dir / "prediction.npz", **arrays)


def load_prediction(out_dir: Path, result: dict[str, Any]) -> Prediction:
    with np.load(out_dir / "prediction.npz") as data:
        arrays = {k: data[k] for k in ARRAY_FIELDS if k in data.files}
    seconds = result.get("seconds")
    return Prediction(
        **arrays,
        seconds=float("nan") if seconds is None else float(seconds),
        peak_rss_mb=result.get("peak_rss_mb"),
        extra=dict(result.get("extra") or {}),
    )


def current_rss_mb() -> float | None:
    """Resident set size right now, MiB (Linux ``/proc/self/statm``; ``None`` elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * resource.getpagesize() / 2**20


def _gpu_peak_mb() -> float | None:
    """Peak CUDA memory allocated by torch in this process, when torch used the GPU."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return float(max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**20)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m alignkit.evaluate.worker CASE.pkl JOB.pkl OUTDIR", file=sys.stderr)
        return 2
    case_path, job_path, out = Path(args[0]), Path(args[1]), Path(args[2])
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any]
    try:
        with case_path.open("rb") as handle:
            case = pickle.load(handle)  # a file the parent runner wrote itself
        with job_path.open("rb") as handle:
            job = pickle.load(handle)
    except Exception as exc:  # noqa: BLE001 - e.g. a method class the worker cannot import
        traceback.print_exc(file=sys.stderr)
        result = {"status": "error", "message": f"worker cannot load the job: {one_line(exc)}"}
    else:
        threads = job.get("threads")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        # every worker imports torch and holds the case before the method starts: report that floor
        # so a table can show the method's own memory (peak - baseline) next to the process's
        baseline = current_rss_mb()
        status, prediction, message = execute(
            job["method"], case, seed=job["seed"], device=job["device"], threads=threads
        )
        # read before writing the arrays: the measure is the registration's, not the npz writer's
        peak = peak_rss_mb()
        result = {"status": status, "message": message}
        if prediction is not None:
            save_prediction(prediction, out)
            extra = dict(prediction.extra)
            gpu = _gpu_peak_mb()
            if gpu is not None:
                extra.setdefault("gpu_peak_mb", gpu)
            if baseline is not None:
                extra.setdefault("baseline_rss_mb", baseline)
            result.update(seconds=prediction.seconds, peak_rss_mb=peak, extra=extra)
    # written then renamed: a worker killed while writing leaves no half file for the runner to parse
    partial = out / "result.json.partial"
    partial.write_text(json.dumps(json_safe(result)))
    partial.replace(out / "result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
