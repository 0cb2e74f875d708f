"""Figures of a run as PNG files: RL learning curves and per-scenario bar charts.

Figures are drawn on matplotlib's Agg canvas directly (`FigureCanvasAgg`), never through `pyplot`, so no
display, global figure registry or backend switch is involved and drawing works in any thread or process.
Inputs are plain data: metric records as `MetricsLogger` writes them to `metrics.jsonl` (dicts with
`phase`, `step` and scalars), and summaries as dicts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# FTRL's scenario types (the columns of its results table) in table order, and short labels for axes.
SCENARIO_TYPES = ("self/single_hop", "self/parallel_single_hop", "self/multi_hop", "self/parallel_multi_hop")
SOLVE_METRICS = (("solve_precision", "Solve-P"), ("solve_rate", "Solve-R"), ("solve_f1", "Solve-F1"))
AVERAGE_LABEL = "average"

# Learning-curve panels: (metrics.jsonl key of an "rl" record, title, scale applied to the value, y label).
RL_PANELS = (
    ("reward_mean", "step reward, mean", 1.0, "reward"),
    ("reward_positive", "rollouts with reward > 0", 100.0, "% of rollouts"),
    ("groups_mixed", "mixed groups (rewards differ)", 100.0, "% of groups"),
    ("kl", "KL to the reference", 1.0, "KL"),
    ("response_length", "response length, mean", 1.0, "tokens"),
)
RL_PHASE, CURVE_PHASE, VALIDATION_PHASE = "rl", "eval_curve", "validation"


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` file, in order; blank and unreadable lines are skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a killed run
            if isinstance(record, dict):
                records.append(record)
    return records


def series(records: Iterable[Mapping[str, Any]], phase: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) [S] of `key` in the records of `phase`, sorted by step.

    A step logged more than once (a resumed run repeats the steps after its last checkpoint) keeps its last
    record; records without a finite numeric `key` are left out.
    """
    by_step: dict[int, float] = {}
    for record in records:
        if record.get("phase") != phase:
            continue
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            by_step[int(record["step"])] = float(value)
    steps = np.asarray(sorted(by_step), np.int64)
    return steps, np.asarray([by_step[s] for s in steps], np.float64)


def _save(figure: Figure, path: str) -> str:
    FigureCanvasAgg(figure)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp.png"
    figure.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
    return path


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_learning_curves(records: Sequence[Mapping[str, Any]], path: str, *, title: str = "") -> str:
    """Writes a 2 x 3 PNG of per-RL-step metrics and the held-out greedy Solve-F1 curve; returns `path`.

    Panels: the `RL_PANELS` keys of the `"rl"` records (reward mean with a +-1 std band from `reward_std`,
    shares in percent) against the RL step, and the `"eval_curve"` (held-out subset) and `"validation"` records'
    `solve_f1` (percent) against the RL steps behind them. A panel with nothing logged says so instead of drawing.
    """
    figure = Figure(figsize=(13, 7), layout="constrained")
    axes = figure.subplots(2, 3).ravel()
    for ax, (key, name, scale, unit) in zip(axes, RL_PANELS):
        steps, values = series(records, RL_PHASE, key)
        ax.set_title(name)
        if not steps.size:
            _empty(ax, f"no '{key}' logged")
            continue
        ax.plot(steps, scale * values, marker="." if steps.size < 60 else None, color="tab:blue")
        if key == "reward_mean":
            std_steps, std = series(records, RL_PHASE, "reward_std")
            if np.array_equal(std_steps, steps):
                ax.fill_between(steps, values - std, values + std, color="tab:blue", alpha=0.15, linewidth=0)
            ax.axhline(0.0, color="0.6", linewidth=0.8)
        ax.set_xlabel("RL step")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    ax = axes[len(RL_PANELS)]
    ax.set_title("greedy Solve-F1 during RL")
    steps, values = series(records, CURVE_PHASE, "solve_f1")
    val_steps, val_values = series(records, VALIDATION_PHASE, "solve_f1")
    if steps.size or val_steps.size:
        if steps.size:
            ax.plot(steps, 100.0 * values, marker="o", color="tab:green", label="held-out (curve subset)")
        if val_steps.size:
            ax.plot(val_steps, 100.0 * val_values, marker="s", color="tab:orange", label="validation")
        ax.legend(fontsize="small")
        ax.set_xlabel("RL steps")
        ax.set_ylabel("Solve-F1 (%)")
        ax.grid(alpha=0.3)
    else:
        _empty(ax, "no 'eval_curve' or 'validation' records\n(eval.curve_every = 0 and eval.validation_envs = 0)")
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def _bar_groups(ax, categories: Sequence[str], values: Mapping[str, Sequence[float]], ylabel: str) -> None:
    """Grouped bars: one group per category, one bar per series (NaN values leave a gap)."""
    x = np.arange(len(categories))
    width = 0.8 / max(1, len(values))
    for i, (label, ys) in enumerate(values.items()):
        ys = np.asarray(ys, np.float64)
        bars = ax.bar(x + (i - (len(values) - 1) / 2) * width, np.nan_to_num(ys), width, label=label)
        ax.bar_label(bars, labels=["" if np.isnan(y) else f"{y:.1f}" for y in ys], fontsize=7, padding=1)
    ax.set_xticks(x, [c.replace("self/", "").replace("_", " ") for c in categories], rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def _categories(results: Mapping[str, Mapping[str, Any]], source_key: str) -> list[str]:
    present = list(dict.fromkeys(source for r in results.values() for source in (r.get(source_key) or {})))
    ordered = [t for t in SCENARIO_TYPES if t in present] + [s for s in present if s not in SCENARIO_TYPES]
    if any(r.get("scenario_average") for r in results.values()):
        ordered.append(AVERAGE_LABEL)
    return ordered


def _value(result: Mapping[str, Any], source_key: str, category: str, metric: str) -> float:
    if category == AVERAGE_LABEL:
        means = result.get("scenario_average")
    else:
        means = (result.get(source_key) or {}).get(category)
    if not means or means.get(metric) is None:
        return float("nan")
    return 100.0 * float(means[metric])


def plot_scenario_bars(results: Mapping[str, Mapping[str, Any]], path: str, *, title: str = "",
                       metrics: Sequence[tuple[str, str]] = SOLVE_METRICS, source_key: str = "per_source") -> str:
    """Writes a per-scenario grouped bar chart PNG (one panel per metric, values in percent); returns `path`.

    `results`: series label (e.g. "before RL", "after RL") -> {`source_key`: {data_source: {metric: value in
    [0, 1], ...}}, "scenario_average": {metric: value}}. Groups are FTRL's scenario types in table order, other
    sources after them in the order met, then the scenario-type average; a value a series lacks is drawn as a gap.
    Raises ValueError when `results` is empty.
    """
    if not results:
        raise ValueError("no results to draw; pass {label: {'per_source': ..., 'scenario_average': ...}}")
    categories = _categories(results, source_key)
    figure = Figure(figsize=(4.6 * len(metrics), 4.4), layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (metric, name) in zip(axes, metrics):
        ax.set_title(name)
        if not categories:
            _empty(ax, "no scenarios")
            continue
        _bar_groups(ax, categories, {label: [_value(r, source_key, c, metric) for c in categories]
                                     for label, r in results.items()}, f"{name} (%)")
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_evaluate_summary(summaries: Mapping[str, Any], path: str, *, label: str = "policy") -> str:
    """Per-scenario bar chart of an `experiments.evaluate` summary (`<stem>.summary.json`); returns `path`.

    `summaries` is one summary dict (drawn as the series `label`) or a mapping label -> summary to compare
    several policies on the same data. Sample-format summaries (`kind` "samples") give Solve-P/R/F1 per
    data_source and the scenario-type average; ToolHop summaries (`kind` "toolhop") give answer correctness
    per scenario. Raises ValueError on a mapping that mixes kinds or a dict that is not such a summary.
    """
    named = {label: summaries} if "kind" in summaries else dict(summaries)
    kinds = {s.get("kind") if isinstance(s, Mapping) else None for s in named.values()}
    if len(kinds) != 1 or kinds - {"samples", "toolhop"}:
        raise ValueError(f"expected experiments.evaluate summaries of one kind ('samples' or 'toolhop'), got {kinds}")
    policies = ", ".join(f"{name}: {os.path.basename(str(s.get('settings', {}).get('policy', '')).rstrip('/'))}"
                         for name, s in named.items())
    data = {os.path.basename(str(s.get("settings", {}).get("data", ""))) for s in named.values()}
    title = f"{', '.join(sorted(data))} ({policies})"
    if kinds == {"samples"}:
        return plot_scenario_bars({name: s["results"] for name, s in named.items()}, path, title=title)
    results = {name: {"per_scenario": s["results"]["per_scenario"],
                      "scenario_average": ({"answer_correctness": s["results"]["average"]}
                                           if s["results"].get("average") is not None else {})}
               for name, s in named.items()}
    return plot_scenario_bars(results, path, title=title, metrics=(("answer_correctness", "answer correctness"),),
                              source_key="per_scenario")
