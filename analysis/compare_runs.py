"""Paired comparison of main-job runs on the same held-out environments: a run against its start, one recipe
against another, and pooled over seeds.

    python -m analysis.compare_runs --after=RUN[,RUN...] [--before=RUN[,RUN...]] [--evaluation=greedy|sampled]
        [--output=OUT.json]

A RUN is a main-job workdir (or its `summary.json`), standing for its evaluation after RL; `RUN:before` stands
for its evaluation before RL. An evaluation file such as a workdir's `eval_before.json` is taken as it is.
Without `--before`, each `--after` run is compared with its own evaluation before RL, as the main job's
`paired_delta` does. With `--before`, the i-th `--after` run is compared with the i-th `--before` run: both must
hold the same environments in the same order (two recipes started from one seed's warm start, or the same
seed's environments). That is checked by every row's `env_key` (`ftrl_jax.envs.samples.environment_key`), or,
for rows of older runs without one, by the two workdirs' `envs/eval.jsonl`; when neither is there a note says
that only the order of scenario types was checked.

For every pair, and pooled over all pairs when there are several (e.g. seeds 0, 1 and 2):
- greedy Solve-F1, Solve-P and Solve-R before and after, as the headline makes them (the mean over FTRL's four
  scenario types; sources outside them are left out when they are present, otherwise the plain mean over
  environments), in percent;
- the paired difference with its percentile bootstrap interval, environments resampled within scenario type
  (`ftrl_jax.reporting.stats.paired_rows_bootstrap`; pooled, within (pair, scenario type),
  `pooled_rows_bootstrap`), and how many environments went up and down;
- per scenario type, Solve-F1 before and after, and the mean number of assistant turns of the episodes.

`--evaluation=sampled` compares the mean sampled Solve-F1 per environment instead (`eval.num_samples` > 0 in
both runs); Solve-P / R and turns are then not reported. Errors (a missing run, an unfinished run, runs on other
environments) name the run and what to do, and exit with code 2.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import flags

from experiments import cli
from ftrl_jax.reporting import stats
from ftrl_jax.rollout.evaluation import SCENARIO_TYPES

EVALUATIONS = ("greedy", "sampled")
GREEDY_METRICS = ("solve_f1", "solve_precision", "solve_rate")
_SUMMARY = "summary.json"
_EVAL_FILE = os.path.join("envs", "eval.jsonl")  # a main-job workdir's held-out environments


def load_evaluation(spec: str) -> tuple[dict[str, Any], str]:
    """(evaluation dict, the directory holding its file) of a RUN spec (module docstring): `DIR`,
    `DIR/summary.json`, either with `:before`, or an evaluation JSON file (a dict with `episodes`). Raises
    ValueError naming the spec when it cannot be read or holds no such evaluation."""
    path, which, suffixed = spec, "after", False
    for suffix in (":before", ":after"):
        if spec.endswith(suffix):
            path, which, suffixed = spec[: -len(suffix)], suffix[1:], True
    if os.path.isdir(path):
        path = os.path.join(path, _SUMMARY)
        if not os.path.isfile(path):
            raise ValueError(f"{spec}: no {_SUMMARY} in {os.path.dirname(path)}; the main job writes it after its "
                             "evaluation after RL (run it to the end, or resume it with --config.resume=True), or "
                             "give an evaluation file such as DIR/eval_before.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{spec}: cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{spec}: {path} holds no JSON object; give a main-job workdir or evaluation file")
    key = f"eval_{which}"
    if key in data:
        evaluation = data[key]
    elif "episodes" in data and not suffixed:
        evaluation = data  # an evaluation file (eval_before.json)
    else:
        raise ValueError(f"{spec}: {path} holds no {key!r}; give a main-job workdir, its {_SUMMARY} or an "
                         "evaluation file such as eval_before.json")
    if not isinstance(evaluation, dict) or not evaluation.get("episodes"):
        raise ValueError(f"{spec}: the evaluation holds no per-environment rows ('episodes'); it comes from an "
                         "older run, so no paired comparison is possible")
    return evaluation, os.path.dirname(os.path.abspath(path))


def _file_digest(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_same_environments(rows_before, rows_after, dir_before: str, dir_after: str,
                            labels: tuple[str, str]) -> str | None:
    """Whether two evaluations are of the same environments: by the rows' `env_key` when every row has one
    (`stats.paired_rows_bootstrap` checks those), otherwise by the two runs' held-out files
    (`envs/eval.jsonl` beside their summaries). Returns a note when neither can tell; raises
    UnpairedRowsError when the files differ."""
    if all("env_key" in r for r in rows_before) and all("env_key" in r for r in rows_after):
        return None
    digests = [_file_digest(os.path.join(d, _EVAL_FILE)) for d in (dir_before, dir_after)]
    if None in digests:
        return (f"{labels[0]} and {labels[1]}: the rows carry no env_key (an older run) and no {_EVAL_FILE} sits "
                "beside both; only their sources' order shows they are the same environments")
    if digests[0] != digests[1]:
        raise stats.UnpairedRowsError(f"{labels[0]} and {labels[1]}: their {_EVAL_FILE} differ, so the runs hold "
                                      "other environments; compare runs built from the same seed's environments")
    return None


def _rows(evaluation: Mapping[str, Any], which: str, label: str) -> list[dict[str, Any]]:
    if which == "greedy":
        return evaluation["episodes"]
    rows = (evaluation.get("sampled") or {}).get("environments")
    if not rows:
        raise ValueError(f"{label}: no sampled evaluation; run the main job with --config.eval.num_samples=K (K > 0) "
                         "or compare --evaluation=greedy")
    return rows


def _headline_sources(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The sources a headline averages: FTRL's scenario types present, or every source when none is."""
    present = {r["data_source"] for r in rows}
    return [s for s in SCENARIO_TYPES if s in present] or sorted(present)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _per_type(rows_before, rows_after, sources) -> dict[str, dict[str, Any]]:
    out = {}
    for source in sources:
        idx = [i for i, r in enumerate(rows_before) if r["data_source"] == source]
        out[source] = {"count": len(idx), "before": _mean([rows_before[i]["solve_f1"] for i in idx]),
                       "after": _mean([rows_after[i]["solve_f1"] for i in idx])}
        if "num_turns" in rows_before[0] and "num_turns" in rows_after[0]:
            out[source]["turns_before"] = _mean([rows_before[i]["num_turns"] for i in idx])
            out[source]["turns_after"] = _mean([rows_after[i]["num_turns"] for i in idx])
    return out


def compare(pairs: Sequence[tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]]],
            labels: Sequence[tuple[str, str]], *, evaluation: str = "greedy",
            bootstrap: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The comparison of the module docstring from per-environment rows: `pairs` of (rows before, rows after),
    `labels` (before label, after label) per pair. Scores stay in [0, 1]. Returns {"pairs": [...], "pooled":
    {...} or None, "evaluation", "bootstrap"}: per pair, `metrics[name]` is `paired_rows_bootstrap`'s dict, and
    `by_type` / `turns` as in the module docstring. Raises ValueError (UnpairedRowsError naming the pair) when
    a pair is not the same environments in the same order."""
    bootstrap = dict(bootstrap or {})
    metrics = GREEDY_METRICS if evaluation == "greedy" else ("solve_f1",)
    out_pairs = []
    for index, ((rows_before, rows_after), (label_before, label_after)) in enumerate(zip(pairs, labels)):
        sources = _headline_sources(rows_before)
        entry: dict[str, Any] = {"before": label_before, "after": label_after, "metrics": {}}
        for metric in metrics:
            try:
                entry["metrics"][metric] = stats.paired_rows_bootstrap(rows_before, rows_after, metric,
                                                                       headline_sources=SCENARIO_TYPES, **bootstrap)
            except stats.UnpairedRowsError as err:
                raise stats.UnpairedRowsError(f"{label_before} and {label_after}: {err}; compare runs built from "
                                              "the same seed's environments") from None
        entry["by_type"] = _per_type(rows_before, rows_after, sources)
        if evaluation == "greedy":
            entry["turns"] = {"before": _mean([r["num_turns"] for r in rows_before]),
                              "after": _mean([r["num_turns"] for r in rows_after])}
        out_pairs.append(entry)
    pooled = None
    if len(pairs) > 1:
        pooled = {"metrics": {m: stats.pooled_rows_bootstrap(pairs, m, headline_sources=SCENARIO_TYPES, **bootstrap)
                              for m in metrics}}
        if evaluation == "greedy":
            pooled["turns"] = {"before": _mean([r["num_turns"] for b, _ in pairs for r in b]),
                               "after": _mean([r["num_turns"] for _, a in pairs for r in a])}
    return {"evaluation": evaluation, "pairs": out_pairs, "pooled": pooled, "bootstrap": bootstrap}


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _change(result: Mapping[str, Any]) -> str:
    return f"{100 * result['delta']:+.2f} [{100 * result['low']:+.2f}, {100 * result['high']:+.2f}]"


def markdown(result: Mapping[str, Any]) -> str:
    """The comparison as a Markdown table (percent), one row per pair and a pooled row."""
    name = "greedy" if result["evaluation"] == "greedy" else "sampled"
    confidence = result["pairs"][0]["metrics"]["solve_f1"]["confidence"]
    head = (f"| before | after | {name} Solve-F1 before | after | change [{100 * confidence:.0f}%] | up / down |")
    extra = result["evaluation"] == "greedy"
    if extra:
        head += " Solve-P change | Solve-R change | turns |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def row(first: str, second: str, metrics: Mapping[str, Any], turns: Mapping[str, Any] | None) -> str:
        f1 = metrics["solve_f1"]
        line = (f"| {first} | {second} | {_pct(f1['before'])} | {_pct(f1['after'])} | {_change(f1)} | "
                f"{f1['num_increased']} / {f1['num_decreased']} |")
        if extra:
            line += (f" {_change(metrics['solve_precision'])} | {_change(metrics['solve_rate'])} | "
                     f"{turns['before']:.2f} -> {turns['after']:.2f} |")
        return line

    for pair in result["pairs"]:
        lines.append(row(pair["before"], pair["after"], pair["metrics"], pair.get("turns")))
    if result["pooled"]:
        count = result["pooled"]["metrics"]["solve_f1"]["num_pairs"]
        lines.append(row("pooled", f"{len(result['pairs'])} pairs, {count} environments", result["pooled"]["metrics"],
                         result["pooled"].get("turns")))
    lines += ["", "Solve-F1 per scenario type, before -> after:", ""]
    for pair in result["pairs"]:
        types = ", ".join(f"{source.split('/')[-1]} {_pct(v['before'])} -> {_pct(v['after'])}"
                          for source, v in pair["by_type"].items())
        lines.append(f"- {pair['after']}: {types}")
    return "\n".join(lines) + "\n"


def _specs(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def run(after: Sequence[str], before: Sequence[str] = (), *, evaluation: str = "greedy",
        bootstrap: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Loads the RUN specs and compares them (`compare`). Without `before`, each run is compared with its own
    evaluation before RL. Raises ValueError naming what is wrong."""
    if not after:
        raise ValueError("no run to compare: give --after=RUN[,RUN...]")
    if before and len(before) != len(after):
        raise ValueError(f"--before names {len(before)} runs and --after {len(after)}; give one before run per "
                         "after run, in the same order (or no --before to compare each run with its start)")
    if not before and any(spec.endswith(":before") for spec in after):
        raise ValueError("an --after run given as RUN:before has no evaluation before it: name what to compare it "
                         "with in --before")
    before = list(before) or [f"{spec.removesuffix(':after')}:before" for spec in after]
    pairs, labels, notes = [], [], []
    for spec_before, spec_after in zip(before, after):
        eval_before, dir_before = load_evaluation(spec_before)
        eval_after, dir_after = load_evaluation(spec_after)
        rows = (_rows(eval_before, evaluation, spec_before), _rows(eval_after, evaluation, spec_after))
        note = check_same_environments(*rows, dir_before, dir_after, (spec_before, spec_after))
        notes += [note] if note else []
        pairs.append(rows)
        labels.append((spec_before, spec_after))
    return {**compare(pairs, labels, evaluation=evaluation, bootstrap=bootstrap), "notes": notes}


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("after", None, "Runs after the change: RUN[,RUN...] (module docstring) (required).",
                        required=True, flag_values=fv)
    flags.DEFINE_string("before", "", "Runs to compare with, one per --after run (empty: each run's own "
                        "evaluation before RL).", flag_values=fv)
    flags.DEFINE_enum("evaluation", "greedy", EVALUATIONS, "Which per-environment scores to compare.",
                      flag_values=fv)
    flags.DEFINE_string("output", "", "Also write the comparison to this JSON file.", flag_values=fv)
    flags.DEFINE_integer("bootstrap_resamples", stats.DEFAULT_RESAMPLES, "Resamples of the paired intervals.",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("bootstrap_seed", 0, "Seed of the paired intervals' resampling.", flag_values=fv)
    flags.DEFINE_float("confidence", 0.95, "Confidence level of the paired intervals.", lower_bound=0.5,
                       upper_bound=0.999, flag_values=fv)


def main(argv: Sequence[str]) -> int:
    try:
        args = cli.parse(argv, define_flags, __doc__)
    except cli.UsageError as exc:
        return cli.fail(exc)
    bootstrap = {"num_resamples": args.bootstrap_resamples, "seed": args.bootstrap_seed,
                 "confidence": args.confidence}
    try:
        result = run(_specs(args.after), _specs(args.before), evaluation=args.evaluation, bootstrap=bootstrap)
    except (KeyError, ValueError) as exc:
        return cli.fail(f"a row lacks {exc.args[0]!r}" if isinstance(exc, KeyError) else exc)
    print(markdown(result), end="")
    for note in result["notes"]:
        print(f"note: {note}")
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1)
        except OSError as exc:
            return cli.fail(f"--output={args.output}: {exc.strerror or exc}")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    cli.run(main)
