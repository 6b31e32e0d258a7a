"""The files ``alignkit evaluate`` writes: ``results.csv``, ``results.json``, ``summary.md``, box plots.

* ``results.csv``: one row per (case, method): ``dataset, case, kind, method, status, seconds,
  peak_rss_mb``, then every metric :func:`~alignkit.evaluate.scoring.score_case` returned (first
  seen order), then the methods' ``extra_*`` numbers, then ``message`` (error or skip reason); the
  :data:`TRUTH_COLUMNS` follow ``kind`` when a row has them.
  Empty cells are missing values.
* ``results.json``: ``{"meta": {...run settings...}, "rows": [...]}`` with the same rows.
* ``summary.md``: per (dataset, kind) one paper-style table, one row per method: ``n ok/total``,
  mean ± sample standard deviation (n - 1) of each headline metric over the cases the method
  finished (success rates: over the runs attempted, an error counting as a failure), the best mean
  in bold, and the ratios of the main metric and of the time to a reference method's (means over
  the cases both finished). Every other metric is in ``results.csv``. A group with cases whose ground
  truth was *measured* by registration rather than given (:attr:`alignkit.data.Case.truth`; rows
  carrying :func:`case_truth`'s columns) gets a † in its heading and a footnote naming those cases,
  how their truth was measured and its uncertainty: no method can be judged more finely than that.
* ``boxplot_<metric>.png``: one box per method of each headline accuracy metric and of the time.

Every file is written next to its target and renamed into place (:mod:`alignkit.io.atomic`).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alignkit.data.case import Case
from alignkit.io.atomic import atomic_path

Row = dict[str, Any]

#: headline metrics of the summary, in column order, with +1 = higher is better, -1 = lower
METRIC_DIRECTIONS: dict[str, int] = {
    "dice_mean": +1,
    "hd95_mean": -1,
    "asd_mean": -1,
    "tre_mean": -1,
    "pck_3px": +1,
    "epe": -1,
    "epe_noc": -1,
    "fl_all": -1,
    "corner_error": -1,
    "success_1px": +1,
    "success_3px": +1,
    "success_5px": +1,
    "nonpositive_jacobian_percent": -1,
    "sdlogj": -1,
    "seconds": -1,
    "peak_rss_mb": -1,
}

#: per-case 0/1 flags whose mean is a rate: a run that failed counts as a failure (HPatches-style), so
#: their denominator is every attempted run (ok + error), and no ± is shown
RATE_METRICS = ("success_1px", "success_3px", "success_5px")

#: the main metric of a group of cases: the first of these its rows have (labels → points → flow → matrix)
MAIN_METRICS = ("dice_mean", "tre_mean", "epe", "corner_error")

#: summary columns that are not accuracy (no box plot of their own, except the time)
_NOT_ACCURACY = ("nonpositive_jacobian_percent", "sdlogj", "peak_rss_mb")

#: Jacobian statistics say nothing for a linear model, so they are left out of those tables
_LINEAR_KINDS = ("homography", "affine")

_BASE = ("dataset", "case", "kind", "method", "status", "seconds", "peak_rss_mb")

#: row columns saying that a case's ground truth was measured, not given (see :func:`case_truth`)
TRUTH_COLUMNS = ("truth", "truth_source", "truth_uncertainty")

#: the marker of measured ground truth in ``summary.md``
MEASURED_MARK = "†"


def case_truth(case: Case) -> Row:
    """The :data:`TRUTH_COLUMNS` of ``case``'s rows: ``{}`` when its ground truth is given (shipped or
    generated), else ``truth="measured"`` with its source and uncertainty, for ``summary.md`` to flag."""
    if case.truth == "given":
        return {}
    return {"truth": case.truth, "truth_source": case.truth_source, "truth_uncertainty": case.truth_uncertainty}


def arrow(metric: str) -> str:
    direction = METRIC_DIRECTIONS.get(metric)
    return "↑" if direction == 1 else "↓" if direction == -1 else ""


# ------------------------------------------------------------------------------------------------
# results.csv / results.json
# ------------------------------------------------------------------------------------------------
def columns_of(rows: Sequence[Row]) -> list[str]:
    """``results.csv`` columns: the fixed ones, metrics in first-seen order, ``extra_*``, ``message``."""
    metrics: list[str] = []
    extras: list[str] = []
    for row in rows:
        for key in row:
            if key in _BASE or key in TRUTH_COLUMNS or key == "message":
                continue
            target = extras if key.startswith("extra_") else metrics
            if key not in target:
                target.append(key)
    truth = [c for c in TRUTH_COLUMNS if any(c in row for row in rows)]
    return [*_BASE[:3], *truth, *_BASE[3:], *metrics, *extras, "message"]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "" if not math.isfinite(value) else format(value, ".8g")
    if isinstance(value, (list, tuple)):
        return ";".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def write_results(rows: Sequence[Row], out_dir: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> None:
    """``results.csv`` and ``results.json`` (rewritten whole, atomically)."""
    from alignkit.evaluate.worker import json_safe

    out = Path(out_dir)
    columns = columns_of(rows)
    with atomic_path(out / "results.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(json_safe({"meta": meta or {}, "rows": list(rows)}), indent=1) + "\n")


def read_results(path: str | os.PathLike[str]) -> list[Row]:
    """Rows of a ``results.json`` (for re-plotting or comparing runs)."""
    return list(json.loads(Path(path).read_text())["rows"])


# ------------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------------
def finite(values: Sequence[Any]) -> np.ndarray:
    arr = np.asarray([v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)], dtype=np.float64)
    return arr[np.isfinite(arr)]


def mean_std(values: Sequence[Any]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (n - 1; NaN for one value) and count of the finite values."""
    arr = finite(values)
    if arr.size == 0:
        return math.nan, math.nan, 0
    std = float(arr.std(ddof=1)) if arr.size > 1 else math.nan
    return float(arr.mean()), std, int(arr.size)


@dataclass
class MethodSummary:
    method: str
    n_ok: int
    n_total: int
    stats: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # metric → (mean, std, n)
    ratios: dict[str, float] = field(default_factory=dict)  # metric → mean(method) / mean(reference)
    statuses: dict[str, int] = field(default_factory=dict)


@dataclass
class GroupSummary:
    """The summary of the cases of one (dataset, kind)."""

    dataset: str
    kind: str
    cases: list[str]
    main_metric: str | None
    metrics: list[str]
    reference: str | None
    methods: list[MethodSummary]
    not_applicable: list[str]
    measured: dict[str, tuple[str, float | None]] = field(default_factory=dict)  # case → (source, uncertainty)


def default_reference(methods: Sequence[str]) -> str | None:
    """The first peer (a method not named ``alignkit:*``), else None."""
    return next((m for m in methods if not m.startswith("alignkit:")), None)


def summarize(rows: Sequence[Row], *, reference: str | None = None) -> list[GroupSummary]:
    """Group rows by (dataset, kind) and compute each method's statistics (see the module doc)."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((str(row.get("dataset") or ""), str(row["kind"])), []).append(row)
    method_order = list(dict.fromkeys(str(r["method"]) for r in rows))
    out = []
    for (dataset, kind), group in groups.items():
        ok = [r for r in group if r["status"] == "ok"]
        cases = list(dict.fromkeys(str(r["case"]) for r in group))
        main = next((m for m in MAIN_METRICS if any(finite([r.get(m)]).size for r in ok)), None)
        metrics = [
            m
            for m in METRIC_DIRECTIONS
            if any(finite([r.get(m)]).size for r in ok)
            and not (kind in _LINEAR_KINDS and m in ("nonpositive_jacobian_percent", "sdlogj"))
        ]
        present = [m for m in method_order if any(r["method"] == m for r in group)]
        not_applicable = [m for m in present if all(r["status"] == "n/a" for r in group if r["method"] == m)]
        listed = [m for m in present if m not in not_applicable]
        ref = reference if reference is not None else default_reference(listed)
        ref_rows = {r["case"]: r for r in ok if r["method"] == ref}
        summaries = []
        for name in listed:
            mine = [r for r in group if r["method"] == name]
            mine_ok = [r for r in mine if r["status"] == "ok"]
            statuses: dict[str, int] = {}
            for r in mine:
                statuses[r["status"]] = statuses.get(r["status"], 0) + 1
            summary = MethodSummary(name, len(mine_ok), len(mine), statuses=statuses)
            attempted = [r for r in mine if r["status"] in ("ok", "error")]
            for metric in metrics:
                if metric in RATE_METRICS:
                    flags = finite([r.get(metric) for r in mine_ok])
                    rate = float(flags.sum()) / len(attempted) if attempted else math.nan
                    summary.stats[metric] = (rate, math.nan, len(attempted))
                else:
                    summary.stats[metric] = mean_std([r.get(metric) for r in mine_ok])
            if ref is not None and ref_rows:
                for metric in [m for m in (main, "seconds") if m is not None]:
                    summary.ratios[metric] = _paired_ratio(mine_ok, ref_rows, metric)
            summaries.append(summary)
        measured = {
            str(r["case"]): (str(r.get("truth_source") or ""), r.get("truth_uncertainty"))
            for r in group
            if r.get("truth") == "measured"
        }
        out.append(GroupSummary(dataset, kind, cases, main, metrics, ref, summaries, not_applicable, measured))
    return out


def _paired_ratio(rows: Sequence[Row], ref_rows: dict[Any, Row], metric: str) -> float:
    """mean(metric) / mean(reference's metric) over the cases both finished with a finite value, so a
    method that failed on the hard cases is not flattered by averaging over the easy ones only."""
    pairs = [
        (r[metric], ref_rows[r["case"]][metric])
        for r in rows
        if r["case"] in ref_rows
        and finite([r.get(metric)]).size
        and finite([ref_rows[r["case"]].get(metric)]).size
    ]
    if not pairs:
        return math.nan
    mine, theirs = (float(np.mean([p[i] for p in pairs])) for i in (0, 1))
    return mine / theirs if theirs != 0 else math.nan


def fmt(value: float) -> str:
    """A table number: 3 decimals below 1 (Dice 0.640), fewer as it grows (12.3 s, 1234 MB)."""
    if not math.isfinite(value):
        return "–"
    size = abs(value)
    if size == 0:
        return "0"
    if size >= 100:
        return f"{value:.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    if size >= 0.01:
        return f"{value:.3f}"
    return f"{value:.2g}"


def _best(summaries: Sequence[MethodSummary], metric: str) -> set[str]:
    """Methods whose mean is the best of the column (ties share it); none when all are equal."""
    direction = METRIC_DIRECTIONS.get(metric, 0)
    means = {s.method: s.stats[metric][0] for s in summaries if math.isfinite(s.stats[metric][0])}
    if not direction or len(means) < 2 or len(set(means.values())) == 1:
        return set()
    best = (max if direction > 0 else min)(means.values())
    return {name for name, value in means.items() if value == best}


def summary_markdown(rows: Sequence[Row], *, meta: dict[str, Any] | None = None, reference: str | None = None) -> str:
    meta = meta or {}
    lines = ["# alignkit evaluate", ""]
    keys = ("dataset", "seed", "device", "threads", "isolate")
    settings = [f"{k} {meta[k]}" for k in keys if meta.get(k) is not None]
    if meta.get("alignkit"):
        settings.append(f"alignkit {meta['alignkit']}")
    if meta.get("started"):
        settings.append(f"started {meta['started']}")
    if settings:
        lines += [", ".join(settings) + ".", ""]
    lines += [
        (
            "Mean ± sample standard deviation over the cases each method finished (`n ok/total`); "
            "↑ higher is better, ↓ lower is better; the best mean of a column is in bold. `success_<k>px` "
            "is the fraction of attempted runs with a corner error <= k px (an error counts as a failure). "
            "Ratios divide a method's mean by the reference's over the cases both finished. `seconds` is "
            "the registration's wall time, `peak_rss_mb` the peak resident memory of the run's own process "
            "(isolated runs only)."
        ),
        "",
    ]
    groups = summarize(rows, reference=reference)
    if any(group.measured for group in groups):
        lines += [
            (
                f"{MEASURED_MARK} The group has cases whose ground truth is *measured* (fitted by registration, "
                "because the data set ships none), not given: each footnote names them, how they were measured "
                "and the uncertainty, below which no error on them is meaningful."
            ),
            "",
        ]
    for group in groups:
        title = f"{group.dataset} · {group.kind}" if group.dataset else group.kind
        n = len(group.cases)
        counted = f"{n} case{'' if n == 1 else 's'}"
        if group.measured:
            counted += f", {len(group.measured)} with measured ground truth {MEASURED_MARK}"
        lines += [f"## {title} ({counted})", ""]
        if group.main_metric:
            lines += [f"Main metric: `{group.main_metric}` {arrow(group.main_metric)}.", ""]
        header = ["method", "n ok/total"] + [f"{m} {arrow(m)}" for m in group.metrics]
        ratio_metrics = [m for m in (group.main_metric, "seconds") if m is not None and m in group.metrics]
        show_ratios = group.reference is not None and any(s.ratios for s in group.methods)
        if show_ratios:
            header += [f"{'time' if m == 'seconds' else m} / {group.reference}" for m in ratio_metrics]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join([":--"] + ["--:"] * (len(header) - 1)) + "|")
        best = {m: _best(group.methods, m) for m in group.metrics}
        for s in group.methods:
            name = f"{s.method} (reference)" if show_ratios and s.method == group.reference else s.method
            cells = [name, f"{s.n_ok}/{s.n_total}"]
            for metric in group.metrics:
                mean, std, _ = s.stats[metric]
                text = fmt(mean) if not math.isfinite(std) else f"{fmt(mean)} ± {fmt(std)}"
                cells.append(f"**{text}**" if s.method in best[metric] else text)
            if show_ratios:
                cells += [fmt(s.ratios.get(m, math.nan)) for m in ratio_metrics]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if group.measured:
            lines += [_measured_footnote(group), ""]
        notes = _notes(rows, group)
        if notes:
            lines += notes + [""]
    return "\n".join(lines).rstrip() + "\n"


def _measured_footnote(group: GroupSummary) -> str:
    """One footnote naming the group's cases with measured ground truth, with source and uncertainty."""
    parts = []
    for case, (source, uncertainty) in group.measured.items():
        if source:  # it states the uncertainty with its unit
            parts.append(f"`{case}`: {source}")
        else:
            bound = f" (uncertain to {fmt(float(uncertainty))})" if isinstance(uncertainty, (int, float)) else ""
            parts.append(f"`{case}`{bound}")
    return f"{MEASURED_MARK} Measured ground truth: " + "; ".join(parts) + "."


def _notes(rows: Sequence[Row], group: GroupSummary) -> list[str]:
    """Why rows are missing: skip reasons (once per method), errors (one per case), n/a methods."""
    mine = [
        r for r in rows if str(r.get("dataset") or "") == group.dataset and r["kind"] == group.kind
    ]
    notes = []
    seen: set[tuple[str, str]] = set()
    for r in mine:
        if r["status"] == "skipped" and (r["method"], r["message"]) not in seen:
            seen.add((r["method"], r["message"]))
            notes.append(f"- {r['method']}: skipped: {r['message']}")
    for r in mine:
        if r["status"] == "error":
            notes.append(f"- {r['method']} on {r['case']}: error: {r['message']}")
    if group.not_applicable:
        notes.append(f"- not applicable to {group.kind} cases: {', '.join(group.not_applicable)}")
    return notes


# ------------------------------------------------------------------------------------------------
# box plots
# ------------------------------------------------------------------------------------------------
def plot_metrics(rows: Sequence[Row]) -> list[str]:
    """The metrics that get a box plot: the summary's accuracy columns present, then ``seconds``."""
    metrics: list[str] = []
    for group in summarize(rows):
        for metric in group.metrics:
            # a box of 0/1 success flags says nothing: their rate is in the table
            skip = metric in _NOT_ACCURACY or metric in RATE_METRICS or metric == "seconds"
            if not skip and metric not in metrics:
                metrics.append(metric)
    if any(finite([r.get("seconds")]).size for r in rows if r["status"] == "ok"):
        metrics.append("seconds")
    return metrics


def write_boxplots(rows: Sequence[Row], out_dir: str | os.PathLike[str]) -> list[Path]:
    """``boxplot_<metric>.png`` per :func:`plot_metrics` metric: one box per method, points on top."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    written = []
    for metric in plot_metrics(rows):
        data = [(m, finite([r.get(metric) for r in rows if r["method"] == m and r["status"] == "ok"])) for m in methods]
        data = [(m, v) for m, v in data if v.size]
        if not data:
            continue
        # a Figure with its own canvas, not pyplot: no global state, no GUI backend
        fig = Figure(figsize=(max(4.0, 1.1 * len(data) + 1.5), 4.0), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.boxplot([v for _, v in data], widths=0.5, showfliers=False)
        rng = np.random.default_rng(0)  # fixed jitter: the same results give the same picture
        for i, (_, values) in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, values.size), values, s=12, alpha=0.6, color="tab:blue", zorder=3)
        ax.set_xticks(range(1, len(data) + 1))
        crowded = len(data) > 3  # long method names overlap when more than three sit side by side
        ax.set_xticklabels([m for m, _ in data], rotation=20 if crowded else 0, ha="right" if crowded else "center")
        direction = METRIC_DIRECTIONS.get(metric, 0)
        better = " (higher is better)" if direction > 0 else " (lower is better)" if direction < 0 else ""
        ax.set_ylabel(f"{metric} {arrow(metric)}".strip())
        ax.set_title(f"{metric}{better}, per case")
        values = np.concatenate([v for _, v in data])
        if metric == "seconds" and values.min() > 0 and values.max() / values.min() > 50:
            ax.set_yscale("log")  # a 0.1 s peer and a 10-minute one on one axis
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out / f"boxplot_{metric}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        written.append(path)
    return written


def write_report(
    rows: Sequence[Row],
    out_dir: str | os.PathLike[str],
    *,
    meta: dict[str, Any] | None = None,
    reference: str | None = None,
) -> dict[str, Path | list[Path]]:
    """Every output file; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_results(rows, out, meta)
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(summary_markdown(rows, meta=meta, reference=reference))
    plots = write_boxplots(rows, out)
    return {"results_csv": out / "results.csv", "results_json": out / "results.json", "summary": out / "summary.md",
            "boxplots": plots}
