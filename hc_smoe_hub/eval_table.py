"""Original-vs-merged lm-eval results as card table rows, the headline mean, and the comparison figure (PNG)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hc_smoe_hub.errors import HcSmoeError

Results = Mapping[str, Mapping[str, float]]

_METRIC_ORDER = ["acc", "acc_norm", "word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity"]


def format_value(value: float | None, signed: bool = False) -> str:
    """Scores with 4 decimals; huge values (random-model perplexities) in scientific notation."""
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    spec = "+" if signed else ""
    return f"{value:{spec}.3e}" if abs(value) >= 1e5 else f"{value:{spec}.4f}"


def _cell(metrics: Mapping[str, float] | None, metric: str) -> str:
    if not metrics or metric not in metrics:
        return "n/a"
    text = format_value(metrics[metric])
    stderr = metrics.get(f"{metric}_stderr")
    if stderr is not None and math.isfinite(stderr):
        text += f" ± {format_value(stderr)}"
    return text


def _change(before: Mapping[str, float] | None, after: Mapping[str, float] | None, metric: str) -> str:
    if not before or not after or metric not in before or metric not in after:
        return "n/a"
    return format_value(after[metric] - before[metric], signed=True)


def _metrics_of(*tables: Mapping[str, float] | None) -> list[str]:
    names = {m for table in tables if table for m in table if "_stderr" not in m}
    return [m for m in _METRIC_ORDER if m in names] + sorted(names - set(_METRIC_ORDER))


def _task_order(before: Results | None, after: Results | None) -> list[str]:
    tasks = list(after or {})
    return tasks + [t for t in (before or {}) if t not in tasks]


def eval_rows(before: Results | None, after: Results | None) -> list[dict[str, str]]:
    """One table row per (task, metric): original, merged, change (merged minus original)."""
    rows = []
    for task in _task_order(before, after):
        b, a = (before or {}).get(task), (after or {}).get(task)
        for metric in _metrics_of(b, a):
            rows.append({"task": task, "metric": metric, "before": _cell(b, metric),
                         "after": _cell(a, metric), "change": _change(b, a, metric)})
    return rows


def _mean_acc(results: Results | None, tasks: Sequence[str]) -> float | None:
    accs = [results[t]["acc"] for t in tasks if results and t in results and "acc" in results[t]]
    return sum(accs) / len(accs) if accs else None


def headline_row(before: Results | None, after: Results | None) -> dict[str, Any] | None:
    """Mean acc on both sides over the same tasks, so the two means compare like with like."""
    with_acc = [t for t in _task_order(before, after)
                if all(r is None or "acc" in r.get(t, {}) for r in (before, after))]
    if not with_acc:
        return None
    mb, ma = _mean_acc(before, with_acc), _mean_acc(after, with_acc)
    if mb is None and ma is None:
        return None
    change = format_value(ma - mb, signed=True) if mb is not None and ma is not None else "n/a"
    return {"count": len(with_acc), "before": format_value(mb), "after": format_value(ma), "change": change}


def acc_tasks(before: Results | None, after: Results | None) -> list[str]:
    return [t for t in _task_order(before, after)
            if any(r and "acc" in r.get(t, {}) for r in (before, after))]


def write_eval_figure(results_before: Results | None, results_after: Results | None, path: Path) -> None:
    """Grouped bar chart of acc per task, original vs merged (PNG)."""
    try:
        # The object API renders with Agg without touching pyplot's global state (safe in a Space's threads).
        from matplotlib.figure import Figure
    except ModuleNotFoundError as exc:
        raise HcSmoeError("matplotlib is not installed: pip install 'hc-smoe-hub[eval]'") from exc
    tasks = acc_tasks(results_before, results_after)
    if not tasks:
        raise ValueError("no task reports acc: nothing to plot")
    series = [(label, {t: results[t]["acc"] for t in tasks if "acc" in results.get(t, {})}, color)
              for label, results, color in
              (("original", results_before, "#9aa5b1"), ("merged", results_after, "#e8833a")) if results]
    # The headline mean, over the tasks both sides report, as in the card's table.
    common = [t for t in tasks if all(t in values for _, values, _ in series)]
    labels = list(tasks)
    if len(common) > 1:
        labels.append(f"mean ({len(common)})")
        for _, values, _ in series:
            values[labels[-1]] = sum(values[t] for t in common) / len(common)
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(6.0, 0.9 * len(labels) + 2), 4.0), dpi=120)
    ax = fig.add_subplot()
    for i, (label, values, color) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        present = [(k, values[t]) for k, t in enumerate(labels) if t in values]
        xs, ys = [k + offset for k, _ in present], [y for _, y in present]
        bars = ax.bar(xs, ys, width=width, label=label, color=color)
        ax.bar_label(bars, labels=[f"{y:.3f}" for y in ys], fontsize=7, padding=2)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylim(0, 1.2)  # room above the tallest bar for its label and the legend
    ax.set_ylabel("acc")
    ax.set_title("lm-eval accuracy per task")
    ax.legend(loc="upper right", fontsize=8, ncol=len(series))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
