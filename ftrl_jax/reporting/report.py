"""The main job's `report.md` and console table, from its `summary.json` dict.

The summary holds `eval_before` and `eval_after` (greedy headline Solve-P/R/F1 in [0, 1], `by_scenario`, and,
when measured, `sampled` and `train_subset`), `paired_delta` (bootstrap dicts from `stats.paired_bootstrap`),
`eval_seconds` and `wall_seconds`. Figures are given as paths relative to the report's folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ftrl_jax.reporting.plots import SCENARIO_TYPES

_METRIC_NAMES = {"solve_precision": "Solve-P", "solve_rate": "Solve-R", "solve_f1": "Solve-F1"}


def _pct(value: Any) -> str:
    return "" if value is None else f"{100 * float(value):.2f}"


def _signed(value: Any) -> str:
    return "" if value is None else f"{100 * float(value):+.2f}"


def confidence_level(confidence: Any) -> str:
    """'95%' for 0.95, '29%' for 0.29 (not the 28 that int(100 * 0.29) gives), '99.5%' for 0.995."""
    return f"{round(100 * float(confidence), 6):g}%"


def interval_label(summary: Mapping[str, Any]) -> str:
    """The change column's heading, with the confidence level of the summary's intervals (95% when none)."""
    deltas = summary.get("paired_delta") or {}
    result = deltas.get("greedy_solve_f1") or deltas.get("sampled_solve_f1") or {}
    return f"after - before [{confidence_level(result.get('confidence', 0.95))} interval]"


def interval_text(result: Mapping[str, Any] | None) -> str:
    """'+1.23 [-0.50, +3.10]' in percentage points, or '' when there is no interval."""
    if not result:
        return ""
    return f"{_signed(result['delta'])} [{_signed(result['low'])}, {_signed(result['high'])}]"


def headline_rows(summary: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, before, after, after - before [95% interval]) rows in percent, for the report and the console."""
    before, after = summary["eval_before"], summary["eval_after"]
    deltas = summary.get("paired_delta") or {}
    rows = []
    for key, name in _METRIC_NAMES.items():
        change = interval_text(deltas.get("greedy_solve_f1")) if key == "solve_f1" else ""
        rows.append((f"greedy {name} (headline)", _pct(before.get(key)), _pct(after.get(key)),
                     change or _signed(after[key] - before[key])))
    sb, sa = before.get("sampled"), after.get("sampled")
    if sb and sa:
        k = sa.get("num_samples")
        envs = f" on {sa['num_envs']} envs" if sa.get("num_envs") else ""
        rows.append((f"sampled Solve-F1, mean of {k}{envs}", _pct(sb["solve_f1"]), _pct(sa["solve_f1"]),
                     interval_text(deltas.get("sampled_solve_f1")) or _signed(sa["solve_f1"] - sb["solve_f1"])))
        rows.append((f"sampled Solve-F1, best of {k}{envs}", _pct(sb["best_solve_f1"]), _pct(sa["best_solve_f1"]),
                     _signed(sa["best_solve_f1"] - sb["best_solve_f1"])))
    tb, ta = before.get("train_subset"), after.get("train_subset")
    if tb and ta:
        rows.append((f"greedy Solve-F1, {ta['num_episodes']} RL training envs", _pct(tb["solve_f1"]),
                     _pct(ta["solve_f1"]), _signed(ta["solve_f1"] - tb["solve_f1"])))
    return rows


def _interval_note(summary: Mapping[str, Any]) -> str:
    deltas = summary.get("paired_delta") or {}
    result = deltas.get("greedy_solve_f1")
    if not result:
        return deltas.get("note", "No paired interval: the before and after evaluations do not hold the same "
                                  "environments' episodes.")
    strata = ", ".join(f"{name} {count}" for name, count in result["pairs_by_stratum"].items())
    changed = ""
    if "num_increased" in result:
        up, down = result["num_increased"], result["num_decreased"]
        changed = (f" Greedy Solve-F1 changed on {up + down} of the {result['num_pairs']} environments ({up} up, "
                   f"{down} down); the interval rests on those.")
    return (f"Intervals: paired percentile bootstrap of the per-environment difference (after - before, same "
            f"environments), {confidence_level(result['confidence'])} interval from {result['num_resamples']:,} "
            f"resamples (seed {result['seed']}) of the {result['num_pairs']} held-out environments drawn within each "
            f"scenario type ({strata}), the statistic averaged over scenario types as the headline is; "
            f"{100 * result['share_positive']:.1f}% of resamples show a gain in greedy Solve-F1.{changed} "
            "Percentage points.")


def _scenario_table(summary: Mapping[str, Any]) -> list[str]:
    before, after = summary["eval_before"], summary["eval_after"]
    sampled = bool(before.get("sampled") and after.get("sampled"))
    head = "| scenario | n | P before | P after | R before | R after | F1 before | F1 after |"
    rule = "|---|---|---|---|---|---|---|---|"
    if sampled:
        head += " sampled F1 before | sampled F1 after |"
        rule += "---|---|"
    lines = [head, rule]
    sources = list(dict.fromkeys([*before.get("by_scenario", {}), *after.get("by_scenario", {})]))
    sources = [t for t in SCENARIO_TYPES if t in sources] + [s for s in sources if s not in SCENARIO_TYPES]
    for source in sources:
        b, a = before.get("by_scenario", {}).get(source, {}), after.get("by_scenario", {}).get(source, {})
        count = int(a.get("count", b.get("count", 0)))
        cells = [v for key in _METRIC_NAMES for v in (_pct(b.get(key)), _pct(a.get(key)))]
        if sampled:
            cells += [_pct(before["sampled"]["by_scenario"].get(source, {}).get("solve_f1")),
                      _pct(after["sampled"]["by_scenario"].get(source, {}).get("solve_f1"))]
        lines.append(f"| {source} | {count} | " + " | ".join(cells) + " |")
    cells = [v for key in _METRIC_NAMES for v in (_pct(before.get(key)), _pct(after.get(key)))]
    if sampled:
        cells += [_pct(before["sampled"]["solve_f1"]), _pct(after["sampled"]["solve_f1"])]
    lines.append("| **average of scenario types** | | " + " | ".join(cells) + " |")
    return lines


def _costs(summary: Mapping[str, Any]) -> list[str]:
    lines = [f"Wall time: {float(summary.get('wall_seconds', 0.0)):.1f} s for the whole job."]
    costs = summary.get("eval_seconds") or {}
    if costs:
        lines.append("Evaluation wall time (held-out before + after RL; the curve and validation points during RL): "
                     + ", ".join(f"{name.replace('_', ' ')} {float(sec):.1f} s" for name, sec in costs.items()) + ".")
    return lines


def selection_note(summary: Mapping[str, Any]) -> str:
    """Which RL step's policy "after RL" is, and the validation points behind the choice ("" without them)."""
    validation = summary.get("validation")
    if not validation or not validation.get("points"):
        return ""
    points = validation["points"]
    last = summary.get("rl_steps")
    scores = ", ".join(f"{p['step']}: {_pct(p['solve_f1'])}" for p in points)
    if summary.get("select") == "validation":
        head = (f"After RL is the policy of step {summary.get('selected_step')} of {last}, the best greedy "
                f"Solve-F1 on {validation.get('num_envs')} validation environments (training-side questions RL "
                "never drew; the earliest of ties)")
        if summary.get("selected_step") == 0:
            head += ": the starting policy, so after equals before by construction"
    else:
        head = (f"After RL is the policy of the last step ({last}); greedy Solve-F1 on "
                f"{validation.get('num_envs')} validation environments was best at step {validation.get('best_step')}")
    return f"{head}. Validation Solve-F1 (%) by RL step: {scores}."


def render_report(summary: Mapping[str, Any], figures: Mapping[str, str] | None = None) -> str:
    """The markdown report: settings, the before/after table, per-scenario table, costs and figure links.

    `figures`: caption -> image path relative to the report's folder, linked in order.
    """
    lines = [f"# Main job report: {summary.get('preset', '')}, seed {summary.get('seed', '')}", "",
             f"{summary.get('algorithm', '')} for {summary.get('rl_steps', '')} RL steps; "
             f"{summary.get('num_eval_envs', '')} held-out and {summary.get('num_train_envs', '')} training "
             "environments. Figures in percent; the headline averages the scenario types' means as FTRL's table does.",
             "", f"| figure | before RL | after RL | {interval_label(summary)} |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in headline_rows(summary)]
    lines += ["", _interval_note(summary)]
    if selection_note(summary):
        lines += ["", selection_note(summary)]
    lines += ["", "## Per scenario type (held-out)", ""]
    lines += _scenario_table(summary)
    lines += ["", "## Cost", ""] + _costs(summary)
    if figures:
        lines += ["", "## Figures", ""]
        for caption, path in figures.items():
            lines += [f"![{caption}]({path})", "", f"*{caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(summary: Mapping[str, Any], path: str, figures: Mapping[str, str] | None = None) -> str:
    """Writes `render_report(summary, figures)` to `path` (atomically); returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(render_report(summary, figures))
    os.replace(tmp, path)
    return path


def console_table(summary: Mapping[str, Any]) -> str:
    """The before/after rows as fixed-width text for the console (percent, interval in points)."""
    rows: Sequence[tuple[str, str, str, str]] = headline_rows(summary)
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'before':>8}  {'after':>8}  {interval_label(summary)}"]
    lines += [f"{name:<{width}}  {b:>8}  {a:>8}  {change}" for name, b, a, change in rows]
    note = selection_note(summary)
    if note:
        lines.append(note)
    return "\n".join(lines)
