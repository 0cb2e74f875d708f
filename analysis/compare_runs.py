"""Paired comparison of main-job runs on the same held-out environments: a run against its start, one recipe
against another, and pooled over seeds.

    python -m analysis.compare_runs --after=RUN[,RUN...] [--before=RUN[,RUN...]] [--evaluation=greedy|sampled]
        [--output=OUT.json] [--confidence=0.95] [--bootstrap_resamples=10000] [--bootstrap_seed=0]

A RUN is a main-job workdir (or its `summary.json`), standing for its evaluation after RL; `RUN:before` stands
for its evaluation before RL. An evaluation file such as a workdir's `eval_before.json` is taken as it is.
Without `--before`, each `--after` run is compared with its own evaluation before RL, as the main job's
`paired_delta` does. With `--before`, the i-th `--after` run is compared with the i-th `--before` run: both must
hold the same environments in the same order (two recipes started from one seed's warm start, or the same
seed's environments). That is checked by every row's `env_key` (`ftrl_jax.envs.samples.environment_key`), or,
for rows of older runs without one, by the two workdirs' `envs/eval.jsonl`; when neither is there a note says
that only the order of scenario types was checked. Pooled pairs must be of different environments (different
seeds): two pairs of the same environments would count each of them twice and narrow the interval, so they
are refused.

For every pair, and pooled over all pairs when there are several (e.g. seeds 0, 1 and 2):
- greedy Solve-F1, Solve-P and Solve-R before and after, as the headline makes them (the mean over FTRL's four
  scenario types; sources outside them are left out when they are present, otherwise the plain mean over
  environments), in percent;
- the paired difference with its percentile bootstrap interval (`--confidence`), environments resampled within
  scenario type (`ftrl_jax.reporting.stats.paired_rows_bootstrap`; pooled, within (pair, scenario type),
  `pooled_rows_bootstrap`), and how many environments went up and down;
- per scenario type, Solve-F1 and the mean number of assistant turns per episode, before and after.

`--evaluation=sampled` compares the mean sampled Solve-F1 per environment instead (`eval.num_samples` > 0 in
both runs); Solve-P / R and turns are then not reported. Turns and the per-type lines count every row, the
headline's figures only the scenario types when any is present. Errors (a missing run, an unfinished run, runs on other
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
from ftrl_jax.reporting.report import confidence_level, interval_text
from ftrl_jax.rollout.evaluation import SCENARIO_TYPES, summarize

EVALUATIONS = ("greedy", "sampled")
GREEDY_METRICS = ("solve_f1", "solve_precision", "solve_rate")
_SUMMARY = "summary.json"
_EVAL_FILE = os.path.join("envs", "eval.jsonl")  # a main-job workdir's held-out environments


def load_evaluation(spec: str) -> tuple[dict[str, Any], str, bool]:
    """(evaluation dict, the absolute path of the file it was read from, whether that file is a run's summary
    rather than one evaluation) of a RUN spec (module docstring): `DIR`,
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
    summary = key in data
    if summary:
        evaluation = data[key]
    elif "episodes" in data and not suffixed:
        evaluation = data  # an evaluation file (eval_before.json)
    elif "episodes" in data:
        raise ValueError(f"{spec}: {path} is one evaluation, not a run's {_SUMMARY}, so it has no evaluation "
                         f"{which} RL; give it without :{which}, and name what to compare it with in --before")
    else:
        raise ValueError(f"{spec}: {path} holds no {key!r}; give a main-job workdir, its {_SUMMARY} or an "
                         "evaluation file such as eval_before.json")
    if not isinstance(evaluation, dict) or not evaluation.get("episodes"):
        raise ValueError(f"{spec}: the evaluation holds no per-environment rows ('episodes'); it comes from an "
                         "older run, so no paired comparison is possible")
    _check_rows(evaluation["episodes"], spec, "episodes")
    return evaluation, os.path.abspath(path), summary


def _check_rows(rows: Any, label: str, field: str) -> None:
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{label}: '{field}' must be a list of per-environment objects, got {type(rows).__name__}"
                         + (" of other values" if isinstance(rows, list) else ""))


def _file_digest(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _keyed(rows: Sequence[Mapping[str, Any]]) -> bool:
    return all("env_key" in r for r in rows)


def check_same_environments(rows_before, rows_after, dir_before: str, dir_after: str,
                            labels: tuple[str, str]) -> str | None:
    """Whether two evaluations are of the same environments: by the rows' `env_key` when every row has one
    (`stats.paired_rows_bootstrap` checks those), as one run's own two evaluations (the same directory), or
    else by the two runs' held-out files (`envs/eval.jsonl` in `dir_before`, `dir_after`). Returns a note when
    none of these can tell; raises UnpairedRowsError when the files differ."""
    if _keyed(rows_before) and _keyed(rows_after) or dir_before == dir_after:
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
    _check_rows(rows, label, "sampled.environments")
    return rows


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values))


def _per_type(rows_before, rows_after, evaluation: str) -> dict[str, dict[str, Any]]:
    """Per data_source: count, Solve-F1 before / after and, for greedy episodes, mean turns before / after."""
    metrics = ("solve_f1", "num_turns") if evaluation == "greedy" else ("solve_f1",)
    before, after = summarize(rows_before, metrics)[0], summarize(rows_after, metrics)[0]
    out = {}
    for source in [t for t in SCENARIO_TYPES if t in before] + sorted(set(before) - set(SCENARIO_TYPES)):
        out[source] = {"count": int(before[source]["count"]), "before": before[source]["solve_f1"],
                       "after": after[source]["solve_f1"]}
        if evaluation == "greedy":
            out[source]["turns_before"] = before[source]["num_turns"]
            out[source]["turns_after"] = after[source]["num_turns"]
    return out


def _bootstrap(fn, *args, labels: str, metric: str, hint: str, **kwargs) -> dict[str, Any]:
    """`fn(*args, metric, **kwargs)`, its errors naming the runs and the metric; `hint` says what to do when
    the rows are not paired."""
    try:
        return fn(*args, metric, **kwargs)
    except stats.UnpairedRowsError as err:
        raise stats.UnpairedRowsError(f"{labels}: {err}; {hint}") from None
    except (TypeError, ValueError) as err:
        raise ValueError(f"{labels}: {metric}: {err}") from None


def compare(pairs: Sequence[tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]]],
            labels: Sequence[tuple[str, str]], *, evaluation: str = "greedy",
            bootstrap: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The comparison of the module docstring from per-environment rows: `pairs` of (rows before, rows after),
    `labels` (before label, after label) per pair. Scores stay in [0, 1]. Returns {"pairs": [...], "pooled":
    {...} or None, "evaluation", "bootstrap"}: per pair, `metrics[name]` is `paired_rows_bootstrap`'s dict, and
    `by_type` / `turns` as in the module docstring. Raises UnpairedRowsError naming the runs when a pair is
    not the same environments in the same order, or when pooled pairs share environments, and ValueError
    naming the runs and metric on scores that are not finite numbers."""
    bootstrap = dict(bootstrap or {})
    metrics = GREEDY_METRICS if evaluation == "greedy" else ("solve_f1",)
    out_pairs = []
    for (rows_before, rows_after), (label_before, label_after) in zip(pairs, labels):
        entry: dict[str, Any] = {"before": label_before, "after": label_after, "metrics": {
            m: _bootstrap(stats.paired_rows_bootstrap, rows_before, rows_after, metric=m,
                          labels=f"{label_before} and {label_after}", headline_sources=SCENARIO_TYPES,
                          hint="compare runs built from the same seed's environments", **bootstrap)
            for m in metrics}}
        entry["by_type"] = _per_type(rows_before, rows_after, evaluation)
        if evaluation == "greedy":
            entry["turns"] = {"before": _mean([r["num_turns"] for r in rows_before]),
                              "after": _mean([r["num_turns"] for r in rows_after])}
        out_pairs.append(entry)
    pooled = None
    if len(pairs) > 1:
        pooled = {"metrics": {m: _bootstrap(stats.pooled_rows_bootstrap, pairs, metric=m, labels="pooled pairs",
                                            hint="pool runs of different seeds, and compare same-seed runs pair by "
                                            "pair", headline_sources=SCENARIO_TYPES, **bootstrap) for m in metrics}}
        if evaluation == "greedy":
            pooled["turns"] = {"before": _mean([r["num_turns"] for b, _ in pairs for r in b]),
                               "after": _mean([r["num_turns"] for _, a in pairs for r in a])}
    return {"evaluation": evaluation, "pairs": out_pairs, "pooled": pooled, "bootstrap": bootstrap}


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def markdown(result: Mapping[str, Any]) -> str:
    """The comparison as a Markdown table (percent), one row per pair and a pooled row, then per-type lines."""
    greedy = result["evaluation"] == "greedy"
    level = confidence_level(result["pairs"][0]["metrics"]["solve_f1"]["confidence"])
    head = f"| before | after | {result['evaluation']} Solve-F1 before | after | change [{level}] | up / down |"
    if greedy:
        head += " Solve-P change | Solve-R change | turns |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def row(first: str, second: str, metrics: Mapping[str, Any], turns: Mapping[str, Any] | None) -> str:
        f1 = metrics["solve_f1"]
        line = (f"| {first} | {second} | {_pct(f1['before'])} | {_pct(f1['after'])} | {interval_text(f1)} | "
                f"{f1['num_increased']} / {f1['num_decreased']} |")
        if greedy:
            line += (f" {interval_text(metrics['solve_precision'])} | {interval_text(metrics['solve_rate'])} | "
                     f"{turns['before']:.2f} -> {turns['after']:.2f} |")
        return line

    for pair in result["pairs"]:
        lines.append(row(pair["before"], pair["after"], pair["metrics"], pair.get("turns")))
    if result["pooled"]:
        count = result["pooled"]["metrics"]["solve_f1"]["num_pairs"]
        lines.append(row("pooled", f"{len(result['pairs'])} pairs, {count} environments", result["pooled"]["metrics"],
                         result["pooled"].get("turns")))
    lines += ["", "Per scenario type, before -> after: Solve-F1" + (" (mean turns)" if greedy else "") + ":", ""]
    for pair in result["pairs"]:
        types = ", ".join(f"{source.split('/')[-1]} {_pct(v['before'])} -> {_pct(v['after'])}"
                          + (f" ({v['turns_before']:.2f} -> {v['turns_after']:.2f})" if greedy else "")
                          for source, v in pair["by_type"].items())
        lines.append(f"- {pair['after']}: {types}")
    return "\n".join(lines) + "\n"


def _specs(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _environments_of(path: str) -> str:
    """What identifies the environments of keyless rows: the digest of the run's held-out file, else the file."""
    return _file_digest(os.path.join(os.path.dirname(path), _EVAL_FILE)) or path


def run(after: Sequence[str], before: Sequence[str] = (), *, evaluation: str = "greedy",
        bootstrap: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Loads the RUN specs and compares them (`compare`). Without `before`, each run is compared with its own
    evaluation before RL. The result also lists the files read (`inputs`) and `notes`. Raises ValueError
    naming what is wrong (UnpairedRowsError for runs of other environments, or pooled runs of the same ones)."""
    if not after:
        raise ValueError("no run to compare: give --after=RUN[,RUN...]")
    if before and len(before) != len(after):
        raise ValueError(f"--before names {len(before)} runs and --after {len(after)}; give one before run per "
                         "after run, in the same order (or no --before to compare each run with its start)")
    if not before and any(spec.endswith(":before") for spec in after):
        raise ValueError("an --after run given as RUN:before has no evaluation before it: name what to compare it "
                         "with in --before")
    pairs, labels, notes, inputs, keyless = [], [], [], [], {}
    for index, spec_after in enumerate(after):
        eval_after, path_after, summary = load_evaluation(spec_after)
        if not before and not summary:
            raise ValueError(f"{spec_after}: one evaluation, with no evaluation before RL of its own; name what to "
                             "compare it with in --before")
        spec_before = before[index] if before else f"{spec_after.removesuffix(':after')}:before"
        eval_before, path_before, _ = load_evaluation(spec_before)
        rows = (_rows(eval_before, evaluation, spec_before), _rows(eval_after, evaluation, spec_after))
        note = check_same_environments(*rows, os.path.dirname(path_before), os.path.dirname(path_after),
                                       (spec_before, spec_after))
        notes += [note] if note else []
        if not (_keyed(rows[0]) and _keyed(rows[1])):  # keyed rows: pooled_rows_bootstrap checks the overlap
            identity = _environments_of(path_after)
            if identity in keyless:
                raise stats.UnpairedRowsError(f"{spec_after} and {after[keyless[identity]]} are of the same "
                                              "environments: pooling them would count each environment twice and "
                                              "narrow the interval; pool runs of different seeds, and compare "
                                              "same-seed runs pair by pair")
            keyless[identity] = index
        pairs.append(rows)
        labels.append((spec_before, spec_after))
        inputs += [path_before, path_after]
    return {**compare(pairs, labels, evaluation=evaluation, bootstrap=bootstrap), "notes": notes,
            "inputs": sorted(set(inputs))}


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("after", None, "Runs after the change: RUN[,RUN...] (module docstring) (required).",
                        required=True, flag_values=fv)
    flags.DEFINE_string("before", "", "Runs to compare with, one per --after run (empty: each run's own "
                        "evaluation before RL).", flag_values=fv)
    flags.DEFINE_enum("evaluation", "greedy", EVALUATIONS, "Which per-environment scores to compare.",
                      flag_values=fv)
    flags.DEFINE_string("output", "", "Also write the comparison to this JSON file.", flag_values=fv)
    cli.define_bootstrap_flags(fv)


def main(argv: Sequence[str]) -> int:
    try:
        args = cli.parse(argv, define_flags, __doc__)
    except cli.UsageError as exc:
        return cli.fail(exc)
    problem = cli.output_file_problem(args.output)
    if problem:
        return cli.fail(problem)
    try:
        result = run(_specs(args.after), _specs(args.before), evaluation=args.evaluation,
                     bootstrap=cli.bootstrap_settings(args))
    except (KeyError, ValueError) as exc:
        return cli.fail(f"a row lacks {exc.args[0]!r}" if isinstance(exc, KeyError) else exc)
    if args.output and os.path.abspath(args.output) in result["inputs"]:
        return cli.fail(f"--output={args.output} is one of the runs read; write the comparison elsewhere")
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
