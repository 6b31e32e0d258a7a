"""Run every method on the same cases, score each prediction the same way, and write the tables.

:func:`evaluate` is what ``alignkit evaluate`` calls. Each (method, case) becomes one row of the
results table (a list of flat dicts, the rows of ``results.csv``) with a status:

* ``ok``: the method ran and its prediction was scored by :func:`~alignkit.evaluate.scoring.score_case`;
* ``skipped``: the method cannot run here (peer not installed, no GPU); ``message`` says why;
* ``n/a``: the method does not handle this kind of case or dimensionality (not run);
* ``error``: the method (or its worker process) failed; ``message`` is one line.

Methods get the case without its ground truth (:func:`blind`); the runner scores the prediction
against the full case. With ``isolate=True`` (the default) every run is a fresh interpreter
(``python -m alignkit.evaluate.worker``): the peak RSS is that run's own, a segfault in a peer's
native code is an error row, and a ``timeout`` can be enforced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import pickle
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from alignkit.data.case import Case
from alignkit.errors import ConfigError
from alignkit.evaluate.method import Method, MethodUnavailable, Prediction

#: the columns every row has, in ``results.csv`` order (metric and ``extra_*`` columns follow)
BASE_COLUMNS = ("dataset", "case", "kind", "method", "status", "seconds", "peak_rss_mb")
STATUSES = ("ok", "skipped", "n/a", "error")

Row = dict[str, Any]

#: the fields of a Case a method is scored on; :func:`blind` removes them before a method sees the case
GROUND_TRUTH_FIELDS = (
    "fixed_labels",
    "moving_labels",
    "label_ids",
    "fixed_points",
    "moving_points",
    "flow",
    "valid",
    "occluded",
    "matrix",
)

#: thread-count variables of the native libraries peers use (BLAS, OpenMP, ITK)
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
)


def evaluate(
    cases: Iterable[Case],
    methods: Sequence[Method | str],
    *,
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    device: str = "cpu",
    isolate: bool = True,
    threads: int | None = 2,
    timeout: float | None = None,
    progress: bool = True,
    reference: str | None = None,
    dataset: str | None = None,
) -> list[Row]:
    """Run each method on each case, score, write ``results.csv/json``, ``summary.md`` and box plots
    into ``out_dir``, and return the rows.

    ``methods`` are :class:`Method` objects or names (``"alignkit:brain"``, ``"ants:syn"``).
    ``reference`` is the method the summary's ratio columns divide by (default: the first peer,
    i.e. the first method not named ``alignkit:*``). ``dataset`` names the rows whose case has no
    ``meta["dataset"]``. ``timeout`` (seconds per run) needs ``isolate``; ``threads`` sets the
    thread count of torch and of the native libraries (``OMP_NUM_THREADS``...) in each worker.
    ``progress=False`` silences stderr entirely (the bar, the error lines, in-process tracebacks).
    ``results.csv`` and ``results.json`` are rewritten after every run, so an interrupted
    evaluation keeps what it measured; an isolated run that fails leaves its output in ``logs/``.
    """
    from alignkit.evaluate.registry import resolve_method
    from alignkit.evaluate.report import case_truth, write_report, write_results

    resolved = [resolve_method(m) for m in methods]
    if not resolved:
        raise ConfigError("evaluate needs at least one method")
    names = [m.name for m in resolved]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"method given twice: {', '.join(duplicates)}")
    if reference is not None and reference not in names:
        raise ConfigError(f"reference method {reference!r} is not one of the evaluated methods ({', '.join(names)})")
    if timeout is not None and not isolate:
        raise ConfigError("a timeout needs isolated runs (drop --no-isolate)")
    device = _resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    meta: dict[str, Any] = {
        "dataset": dataset,
        "methods": names,
        "reference": reference,
        "seed": seed,
        "device": device,
        "isolate": isolate,
        "threads": threads,
        "timeout": timeout,
        "alignkit": _version(),
        "python": platform.python_version(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    # once per method: whether it can run at all (a peer's check is an import probe, not a run)
    availability = {m.name: _availability(m) for m in resolved}
    total = len(cases) * len(resolved) if isinstance(cases, Sequence) else None

    from tqdm.auto import tqdm

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="alignkit-eval-") as tmp, tqdm(
        total=total, unit="run", file=sys.stderr, disable=not progress, dynamic_ncols=True, desc="evaluate"
    ) as bar:
        work = Path(tmp)
        for case_index, case in enumerate(cases):
            case_file: Path | None = None  # pickled once, for the first isolated run of this case
            case_error = ""  # why the case cannot be sent to a worker (e.g. unpicklable meta)
            seen = blind(case)
            for method_index, method in enumerate(resolved):
                bar.set_postfix_str(f"{method.name} {case.name}", refresh=False)
                row: Row = {
                    "dataset": str(case.meta.get("dataset", dataset or "")),
                    "case": case.name,
                    "kind": case.kind,
                    **case_truth(case),  # measured (not given) ground truth is flagged in the tables
                    "method": method.name,
                    "status": "",
                    "seconds": None,
                    "peak_rss_mb": None,
                    "message": "",
                }
                reason = method.applicable(case)
                unavailable = availability[method.name]
                if reason is not None:
                    row.update(status="n/a", message=reason)
                elif unavailable is not None:
                    row.update(status=unavailable[0], message=unavailable[1])
                elif isolate:
                    if case_file is None and not case_error:
                        case_file = work / f"case-{case_index}.pkl"
                        case_error = _try_pickle(seen, case_file, "case")
                    if case_error or case_file is None:
                        row.update(status="error", message=case_error)
                    else:
                        run_dir = work / f"run-{case_index}-{method_index}"
                        run_dir.mkdir()
                        started = time.perf_counter()
                        status, prediction, message, log = _run_isolated(
                            method, case_file, run_dir, seed=seed, device=device, threads=threads, timeout=timeout
                        )
                        _finish(row, case, status, prediction, message)
                        if row["status"] == "ok":
                            row["extra_process_seconds"] = time.perf_counter() - started
                        if row["status"] == "error" and log:
                            _save_log(out, method.name, case.name, log)
                        # the prediction is in memory now; a 3D map on disk per run would add up
                        shutil.rmtree(run_dir, ignore_errors=True)
                else:
                    from alignkit.evaluate.worker import execute

                    status, prediction, message = execute(
                        method, seen, seed=seed, device=device, threads=threads, show_traceback=progress
                    )
                    _finish(row, case, status, prediction, message)
                if row["status"] == "error" and progress:
                    bar.write(f"{method.name} on {case.name}: error: {row['message']}", file=sys.stderr)
                rows.append(row)
                bar.update()
                write_results(rows, out, meta)
            if case_file is not None:
                case_file.unlink(missing_ok=True)
    meta["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_report(rows, out, meta=meta, reference=reference)
    return rows


def blind(case: Case) -> Case:
    """The case as a method gets it: images, kind, name and ``meta``, no ground truth. Enforced here
    rather than trusted to each adapter; it also keeps the labels out of an isolated run's memory."""
    cleared: dict[str, Any] = dict.fromkeys(GROUND_TRUTH_FIELDS)
    return dataclasses.replace(case, **cleared)


def _finish(row: Row, case: Case, status: str, prediction: Prediction | None, message: str) -> None:
    """Fill ``row`` from a run's outcome; an ok prediction is scored here, in the runner's process."""
    from alignkit.evaluate.scoring import score_case
    from alignkit.evaluate.worker import json_safe, one_line

    row["status"], row["message"] = status, message
    if status != "ok" or prediction is None:
        return
    row["seconds"] = prediction.seconds
    row["peak_rss_mb"] = prediction.peak_rss_mb
    try:
        scores = score_case(case, prediction)
    except Exception as exc:  # noqa: BLE001 - an unscorable prediction (wrong shape) is that run's error
        row.update(status="error", message=f"scoring failed: {one_line(exc)}")
        return
    row.update(json_safe(scores))
    for key, value in json_safe(prediction.extra).items():
        row[f"extra_{key}"] = value


def _availability(method: Method) -> tuple[str, str] | None:
    """``None`` when the method can run, else the (status, message) of its rows."""
    from alignkit.evaluate.worker import one_line

    try:
        method.check_available()
    except MethodUnavailable as exc:
        return "skipped", str(exc).strip() or "unavailable"
    except Exception as exc:  # noqa: BLE001 - a broken availability probe is reported, not raised
        return "error", f"availability check failed: {one_line(exc)}"
    return None


def _resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``: every method gets the same device."""
    if str(device) != "auto":
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _try_pickle(obj: Any, path: Path, what: str) -> str:
    """Pickle ``obj`` to ``path``; ``""`` or the one-line reason it cannot be sent to a worker."""
    from alignkit.evaluate.worker import one_line

    try:
        with path.open("wb") as handle:
            pickle.dump(obj, handle, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - e.g. a method holding an open handle, a lambda in meta
        path.unlink(missing_ok=True)
        return f"cannot pass the {what} to a worker: {one_line(exc)}"
    return ""


def worker_environment(threads: int | None) -> dict[str, str]:
    """The worker's environment: this one, the thread counts, this interpreter's import path (so a
    method class defined in a script or test module unpickles), and faulthandler for native crashes."""
    env = dict(os.environ)
    if threads:
        env.update({name: str(int(threads)) for name in THREAD_VARIABLES})
    paths = [os.path.abspath(p or os.getcwd()) for p in sys.path]
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join([p for p in paths if os.path.isdir(p)] + ([existing] if existing else []))
    env["PYTHONFAULTHANDLER"] = "1"
    return env


def _run_isolated(
    method: Method,
    case_file: Path,
    run_dir: Path,
    *,
    seed: int,
    device: str,
    threads: int | None,
    timeout: float | None,
) -> tuple[str, Prediction | None, str, str]:
    """One run in a fresh interpreter: ``(status, prediction, message, worker stderr)``."""
    from alignkit.evaluate.worker import load_prediction, one_line

    job_file = run_dir / "job.pkl"
    error = _try_pickle({"method": method, "seed": seed, "device": device, "threads": threads}, job_file, "method")
    if error:
        return "error", None, error, ""
    cmd = [sys.executable, "-m", "alignkit.evaluate.worker", str(case_file), str(job_file), str(run_dir)]
    # its own session, so that a timeout kills the worker and anything it started
    proc = subprocess.Popen(  # our own interpreter and module, no shell
        cmd,
        env=worker_environment(threads),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        _, stderr = proc.communicate()
        return "error", None, f"timed out after {timeout:g} s", stderr or ""
    except BaseException:  # Ctrl-C in the runner: the worker is in another session and would live on
        _kill_group(proc)
        proc.wait()
        raise
    log = (stdout or "") + (stderr or "")
    result_file = run_dir / "result.json"
    if proc.returncode != 0 or not result_file.exists():
        if proc.returncode < 0:
            what = f"worker killed by signal {_signal_name(-proc.returncode)}"
        else:
            what = f"worker exited with code {proc.returncode}"
        detail = _stderr_summary(stderr or "")
        return "error", None, what + (f": {detail}" if detail else ""), log
    try:
        result = json.loads(result_file.read_text())
        prediction = load_prediction(run_dir, result) if result.get("status") == "ok" else None
    except (OSError, ValueError, KeyError) as exc:
        return "error", None, f"unreadable worker result: {one_line(exc)}", log
    return str(result.get("status", "error")), prediction, str(result.get("message") or ""), log


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _stderr_summary(stderr: str) -> str:
    """The line of a worker's stderr that says what went wrong (faulthandler's, or the last one)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("Fatal Python error"):
            return line
    return lines[-1][:200] if lines else ""


def _save_log(out: Path, method: str, case: str, log: str) -> None:
    """Keep a failed worker's output as ``logs/<method>__<case>.log`` (the row holds one line only)."""
    from alignkit.io.atomic import atomic_path

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{method}__{case}")
    (out / "logs").mkdir(exist_ok=True)
    with atomic_path(out / "logs" / f"{safe}.log") as tmp:
        tmp.write_text(log)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("alignkit")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source checkout)
        return "unknown"
