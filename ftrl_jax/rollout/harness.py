"""The evaluation harness for data files: FTRL's test set (or any sample-format file) and ToolHop, as in the
paper's tables. `python -m experiments.evaluate` is its command line.

Sample-format data (.jsonl/.parquet rows with messages, tools, codes, unsolved_set, ...) is scored with
`rewards.trajectory_metrics`: Solve-P, Solve-R, Solve-F1 per data_source and averaged over FTRL's four
scenario types. ToolHop files (recognised by their `question`/`sub_task`/`functions` rows) are converted
and played in three scenarios: `direct` (no tools offered), `mandatory` (FTRL's instruction: use the tools)
and `free` (tools offered, use optional). An episode is correct when its final assistant text (outside
tool calls and thinking) or one of the tool outputs right before that turn contains the gold answer, by
`rewards.answer_matches`: every ", "-separated part of the gold answer occurs in the text, ignoring case
and commas. That is containment, so a short numeric answer also matches inside a longer number.

`run_evaluation` writes one JSON line per episode as it finishes (key = sample index / scenario; messages,
end_reason, metrics). Run it again on the same output to resume: finished episodes are skipped, failed ones
are tried again. An episode whose turn generator failed for good (`TurnGenerationError`, e.g. a remote
request after its retries) is recorded with status "failed" and left out of every mean; an episode whose
prompt outgrew the policy's context ends as `prompt_too_long` and is scored like any other (no answer
solved: Solve-R and Solve-F1 0, answer wrong; that is the policy's real outcome), counted apart and also
left out of the `*_fitting` means. Next to the output: `<stem>.summary.json` and `<stem>.summary.md`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from tqdm import tqdm

from ftrl_jax.rollout import evaluation
from ftrl_jax.envs.samples import FTRL_INSTRUCTION, RowError, Sample, read_samples, user_prompt
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.envs.toolhop import convert_toolhop
from ftrl_jax.envs.rewards import answer_matches
from ftrl_jax.rollout.episodes import Episode, TurnGenerationError, TurnGenerator, play_episodes
from ftrl_jax.text.tool_calls import parse_assistant_turn

SOLVE_SCENARIO = "solve"  # the one scenario of sample-format data
OK, FAILED = "ok", "failed"
TOO_LONG = "prompt_too_long"

DIRECT_INSTRUCTION = "Answer the question directly from your own knowledge; no tools are available.\n"
FREE_INSTRUCTION = ("Answer the question. You may call the given tools if they help, or answer directly if you "
                    "already know the answer.\n")


class UsageError(ValueError):
    """A command line or an output file that cannot be used as given; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# Tasks: one episode to play = (sample index, scenario, the sample as the policy sees it).


@dataclasses.dataclass(frozen=True)
class Task:
    index: int
    scenario: str
    sample: Sample

    @property
    def key(self) -> str:
        return f"{self.index}/{self.scenario}"


def question_of(sample: Sample) -> str:
    """The question of a converted ToolHop sample (its user message without FTRL's instruction)."""
    content = sample.messages[0].get("content") or ""
    prefix = FTRL_INSTRUCTION + "Question: "
    return content[len(prefix):] if content.startswith(prefix) else content


def _direct(sample: Sample) -> Sample:
    # No tools and no code: a call the model makes anyway fails in the sandbox, as a call to nothing should.
    return dataclasses.replace(sample, messages=[{"role": "user", "content": DIRECT_INSTRUCTION + "Question: "
                                                  + question_of(sample)}],
                               tools=[], codes={}, unsolved_set={}, oracle_calls=None)


def _mandatory(sample: Sample) -> Sample:
    return dataclasses.replace(sample, messages=[{"role": "user", "content": user_prompt(question_of(sample))}])


def _free(sample: Sample) -> Sample:
    return dataclasses.replace(sample, messages=[{"role": "user", "content": FREE_INSTRUCTION + "Question: "
                                                  + question_of(sample)}])


# ToolHop's three scenarios: name -> the sample the policy plays.
TOOLHOP_SCENARIOS: dict[str, Callable[[Sample], Sample]] = {"direct": _direct, "mandatory": _mandatory, "free": _free}


def detect_format(path: str) -> str:
    """'toolhop' for a .jsonl of ToolHop rows (question, sub_task, functions), else 'samples'."""
    if not path.lower().endswith(".jsonl"):
        return "samples"
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return "samples"  # read_samples reports the bad line
                return "toolhop" if isinstance(row, dict) and {"question", "sub_task", "functions"} <= set(row) \
                    else "samples"
    return "samples"


IndexedSamples = Sequence[tuple[int, Sample]]  # (row index among the file's readable rows, sample)


def _sample_tasks(rows: IndexedSamples, scenarios: Sequence[str]) -> list[Task]:
    return [Task(index, SOLVE_SCENARIO, sample) for index, sample in rows]


def _toolhop_tasks(rows: IndexedSamples, scenarios: Sequence[str]) -> list[Task]:
    return [Task(index, name, TOOLHOP_SCENARIOS[name](sample)) for index, sample in rows for name in scenarios]


@dataclasses.dataclass(frozen=True)
class DataKind:
    """How one kind of evaluation data is read, turned into tasks and scored."""

    read: Callable[[str], tuple[list[Sample], list[RowError]]]
    tasks: Callable[[IndexedSamples, Sequence[str]], list[Task]]
    score: Callable[[Task, Episode], dict[str, Any]]
    summarize: Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]
    table: Callable[[Mapping[str, Any]], list[str]]
    progress: Callable[[Sequence[Mapping[str, Any]]], dict[str, str]]


def first_per_source(rows: IndexedSamples, count: int) -> list[tuple[int, Sample]]:
    """The first `count` rows of every data_source, in file order."""
    seen: collections.Counter[str] = collections.Counter()
    kept = []
    for index, sample in rows:
        seen[sample.data_source] += 1
        if seen[sample.data_source] <= count:
            kept.append((index, sample))
    return kept


def load_tasks(path: str, data_format: str = "auto", scenarios: Sequence[str] = tuple(TOOLHOP_SCENARIOS),
               limit: int | None = None, limit_per_source: int | None = None
               ) -> tuple[str, list[Task], list[RowError]]:
    """(kind, tasks, rows that could not be read) for a data file.

    `limit_per_source` keeps the first rows of each data_source, then `limit` the first rows of what is
    left; a task's index is its row's position among the readable rows of the file either way.
    """
    if not os.path.exists(path):  # a file, or a datasets save_to_disk directory
        raise UsageError(f"--data={path!r} does not exist; pass a sample-format .jsonl file, .parquet file or "
                         "datasets save_to_disk directory, or a ToolHop .jsonl")
    kind = detect_format(path) if data_format == "auto" else data_format
    if kind not in DATA_KINDS:
        raise UsageError(f"--data_format={data_format!r} is not one of auto, {', '.join(DATA_KINDS)}")
    unknown = [name for name in scenarios if name not in TOOLHOP_SCENARIOS]
    if unknown or not scenarios:
        raise UsageError(f"--scenarios: unknown {unknown or 'empty list'}; use some of {','.join(TOOLHOP_SCENARIOS)}")
    try:
        samples, errors = DATA_KINDS[kind].read(path)
    except (ValueError, OSError) as exc:  # a form we do not read, or a file unreadable as a whole
        raise UsageError(f"--data: {exc}") from None
    rows = list(enumerate(samples))
    if limit_per_source is not None:
        rows = first_per_source(rows, limit_per_source)
    return kind, DATA_KINDS[kind].tasks(rows[:limit], scenarios), errors


# ---------------------------------------------------------------------------------------------
# Scoring one episode (pure).


def _new_messages(task: Task, episode: Episode) -> list[dict[str, Any]]:
    return episode.messages[len(task.sample.messages):]


def final_answer_check(new_messages: Sequence[Mapping[str, Any]], gold: str, tool_format: str = "qwen") -> str | None:
    """Where the gold answer shows: 'final_answer', 'tool_output' (a tool response right before the last
    assistant turn), or None. The final answer is the last assistant text outside calls (in `tool_format`,
    the episode's) and thinking."""
    last = next((i for i in range(len(new_messages) - 1, -1, -1) if new_messages[i].get("role") == "assistant"), None)
    if last is None:
        return None
    final_text = parse_assistant_turn(str(new_messages[last].get("content") or ""), tool_format).content
    if answer_matches(final_text, gold):
        return "final_answer"
    before = last - 1
    while before >= 0 and new_messages[before].get("role") == "tool":
        if answer_matches(new_messages[before].get("content") or "", gold):
            return "tool_output"
        before -= 1
    return None


def _solve_metrics(task: Task, episode: Episode) -> dict[str, Any]:
    return dict(episode.metrics)


def _toolhop_metrics(task: Task, episode: Episode) -> dict[str, Any]:
    found = final_answer_check(_new_messages(task, episode), task.sample.answer, episode.tool_format)
    return {"answer_correctness": float(found is not None), "answered_by": found,
            "num_calls": episode.metrics.get("num_calls", 0)}


def episode_record(task: Task, episode: Episode, kind: str, run_id: str) -> dict[str, Any]:
    """The output line of a played episode."""
    record = {"key": task.key, "index": task.index, "scenario": task.scenario, "data_source": task.sample.data_source,
              "status": OK, "end_reason": episode.end_reason, "num_turns": len(episode.turns),
              "metrics": DATA_KINDS[kind].score(task, episode), "messages": episode.messages, "run": run_id}
    if "id" in task.sample.extra:
        record["id"] = task.sample.extra["id"]
    return record


def failed_record(task: Task, error: BaseException, run_id: str) -> dict[str, Any]:
    """The output line of an episode whose requests kept failing (it counts in no mean)."""
    return {"key": task.key, "index": task.index, "scenario": task.scenario, "data_source": task.sample.data_source,
            "status": FAILED, "error": f"{type(error).__name__}: {error}", "run": run_id}


# ---------------------------------------------------------------------------------------------
# Summaries (pure).


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _counts(records: Sequence[Mapping[str, Any]], field: str) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = collections.defaultdict(lambda: {TOO_LONG: 0, FAILED: 0})
    for record in records:
        entry = counts[record[field]]
        if record["status"] == FAILED:
            entry[FAILED] += 1
        elif record.get("end_reason") == TOO_LONG:
            entry[TOO_LONG] += 1
    return counts


def summarize_solve(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Solve-P/R/F1 per data_source and averaged over FTRL's scenario types, over finished episodes; the
    same over episodes whose prompt fitted (`*_fitting`); prompt_too_long and failed counts per source."""
    finished = [r for r in records if r["status"] == OK]
    rows = [{"data_source": r["data_source"], **r["metrics"]} for r in finished]
    per_source, average, missing = evaluation.summarize(rows)
    fitting = [row for row, r in zip(rows, finished) if r.get("end_reason") != TOO_LONG]
    per_source_fitting, average_fitting, _ = evaluation.summarize(fitting)
    counts = _counts(records, "data_source")
    for source, means in per_source.items():
        means.update(counts[source])
    return {"per_source": per_source, "scenario_average": average, "missing_types": missing,
            "per_source_fitting": per_source_fitting, "scenario_average_fitting": average_fitting,
            "failed_by_source": {s: c[FAILED] for s, c in counts.items() if c[FAILED]}}


def summarize_toolhop(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Answer correctness per scenario (finished episodes) and its mean over the scenarios present."""
    counts = _counts(records, "scenario")
    per_scenario = {}
    for name in TOOLHOP_SCENARIOS:
        finished = [r for r in records if r["scenario"] == name and r["status"] == OK]
        if finished or counts[name][FAILED]:
            per_scenario[name] = {"answer_correctness": _mean([r["metrics"]["answer_correctness"] for r in finished]),
                                  "count": len(finished), **counts[name]}
    present = [means["answer_correctness"] for means in per_scenario.values() if means["count"]]
    return {"per_scenario": per_scenario, "average": _mean(present) if present else None}


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def solve_table(results: Mapping[str, Any]) -> list[str]:
    """Markdown rows: Solve-P/R/F1 (percent) per data_source and the scenario-type average."""
    lines = ["| data source | n | Solve-P | Solve-R | Solve-F1 | prompt too long | failed |",
             "|---|---|---|---|---|---|---|"]
    per_source = results["per_source"]
    for source in sorted(per_source):
        means = per_source[source]
        lines.append(f"| {source} | {int(means['count'])} | "
                     + " | ".join(_percent(means[m]) for m in evaluation.METRICS)
                     + f" | {means[TOO_LONG]} | {means[FAILED]} |")
    for source, failed in sorted(results["failed_by_source"].items()):
        if source not in per_source:
            lines.append(f"| {source} | 0 |  |  |  | 0 | {failed} |")
    average = results["scenario_average"]
    if average:
        star = " *" if results["missing_types"] else ""
        count = sum(int(per_source[t]["count"]) for t in evaluation.SCENARIO_TYPES if t in per_source)
        lines.append(f"| **average of scenario types**{star} | {count} | "
                     + " | ".join(_percent(average[m]) for m in evaluation.METRICS) + " |  |  |")
    fitting = results["scenario_average_fitting"]
    if fitting and fitting != average:
        lines.append("| average, episodes whose prompt fitted | | "
                     + " | ".join(_percent(fitting[m]) for m in evaluation.METRICS) + " |  |  |")
    if results["missing_types"]:
        lines.append("")
        lines.append(f"\\* scenario types missing from the data: {', '.join(results['missing_types'])}")
    return lines


def toolhop_table(results: Mapping[str, Any]) -> list[str]:
    """Markdown rows: answer correctness (percent) per ToolHop scenario and their mean."""
    lines = ["| scenario | n | answer correctness | prompt too long | failed |", "|---|---|---|---|---|"]
    for name, means in results["per_scenario"].items():
        lines.append(f"| {name} | {means['count']} | {_percent(means['answer_correctness'])} | {means[TOO_LONG]} | "
                     f"{means[FAILED]} |")
    if results["average"] is not None:
        lines.append(f"| **average** | | {_percent(results['average'])} | | |")
    return lines


def _solve_progress(records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    finished = [r["metrics"] for r in records if r["status"] == OK]
    return {"P": _percent(_mean([m["solve_precision"] for m in finished])),
            "R": _percent(_mean([m["solve_rate"] for m in finished])),
            "F1": _percent(_mean([m["solve_f1"] for m in finished]))}


def _toolhop_progress(records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    by_scenario = collections.defaultdict(list)
    for r in records:
        if r["status"] == OK:
            by_scenario[r["scenario"]].append(r["metrics"]["answer_correctness"])
    return {name: _percent(_mean(values)) for name, values in by_scenario.items()}


def _read_toolhop(path: str) -> tuple[list[Sample], list[RowError]]:
    return convert_toolhop(path)


DATA_KINDS: dict[str, DataKind] = {
    "samples": DataKind(read=read_samples, tasks=_sample_tasks, score=_solve_metrics, summarize=summarize_solve,
                        table=solve_table, progress=_solve_progress),
    "toolhop": DataKind(read=_read_toolhop, tasks=_toolhop_tasks, score=_toolhop_metrics, summarize=summarize_toolhop,
                        table=toolhop_table, progress=_toolhop_progress),
}


def build_summary(kind: str, tasks: Sequence[Task], records: Mapping[str, Mapping[str, Any]], *,
                  settings: Mapping[str, Any], run_id: str, row_errors: Sequence[RowError] = (),
                  this_run: Mapping[str, Any] | None = None, backend_stats: Mapping[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Everything the evaluation measured over the planned tasks (records of other keys are ignored)."""
    planned = [records[task.key] for task in tasks if task.key in records]
    failed = [r for r in planned if r["status"] == FAILED]
    return {
        "kind": kind,
        "settings": dict(settings),
        "run": run_id,
        "episodes": {"planned": len(tasks), "finished": len(planned) - len(failed), "failed": len(failed),
                     TOO_LONG: sum(r.get("end_reason") == TOO_LONG for r in planned if r["status"] == OK),
                     "not_run": len(tasks) - len(planned)},
        "end_reasons": dict(collections.Counter(r["end_reason"] for r in planned if r["status"] == OK)),
        "results": DATA_KINDS[kind].summarize(planned),
        "failures": [{"key": r["key"], "error": r["error"]} for r in failed[:20]],
        "row_errors": [str(error) for error in row_errors],
        "this_run": dict(this_run or {}),
        "backend_stats": dict(backend_stats or {}),
    }


def markdown_report(summary: Mapping[str, Any]) -> str:
    """The summary as a short markdown block: what was evaluated, the table, the counts."""
    settings = summary["settings"]
    episodes = summary["episodes"]
    lines = [f"policy `{settings['policy']}` ({settings['backend']}) on `{os.path.basename(settings['data'])}`, "
             f"greedy, max_turns={settings['max_turns']}, max_new_tokens={settings['max_new_tokens']}", ""]
    lines += DATA_KINDS[summary["kind"]].table(summary["results"])
    lines += ["", f"{episodes['finished']} episodes finished ({episodes[TOO_LONG]} ended prompt_too_long: their prompt "
              "did not fit the context, so no turn was generated), "
              f"{episodes['failed']} failed (left out of the means), {episodes['not_run']} not run"]
    if episodes["failed"]:
        first = summary["failures"][:3]
        lines += [f"failed {f['key']}: {f['error']}" for f in first]
        more = episodes["failed"] - len(first)
        lines.append((f"({more} more in the summary JSON.) " if more > 0 else "")
                     + "Failed episodes are tried again when the same command runs again.")
    if summary["row_errors"]:
        lines.append(f"{len(summary['row_errors'])} data rows could not be read and were skipped "
                     "(see the summary JSON).")
    run = summary["this_run"]
    if run.get("episodes"):
        lines.append(f"This run: {run['episodes']} episodes in {run['seconds']:.1f} s "
                     f"({run['episodes_per_minute']:.1f} episodes/min).")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The output file.


def read_records(path: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Records by key from an output file (later lines win) and one note per unreadable line."""
    records: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    if not os.path.exists(path):
        return records, problems
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("key"), str) \
                        or record.get("status") not in (OK, FAILED):
                    raise ValueError("not an episode record")
            except ValueError as exc:  # JSONDecodeError included: a line cut by an interrupted run
                problems.append(f"{path}:{number}: unreadable line skipped ({str(exc)[:80]}); its episode runs again")
                continue
            records[record["key"]] = record
    return records, problems


def run_fingerprint(settings: Mapping[str, Any]) -> str:
    """A short hash of the settings that decide an episode's outcome (resuming needs the same)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def summary_paths(output: str) -> tuple[str, str]:
    stem = output[: -len(".jsonl")] if output.endswith(".jsonl") else output
    return stem + ".summary.json", stem + ".summary.md"


Player = Callable[[Sequence[Task]], Iterator[tuple[Task, "Episode | TurnGenerationError"]]]


def prompt_size(sample: Sample) -> int:
    """Characters of a sample's first prompt (messages and tool documents): a cheap proxy of its tokens."""
    return sum(len(str(m.get("content") or "")) for m in sample.messages) + len(json.dumps(sample.tools))


def play_in_batches(generator: TurnGenerator, *, batch_size: int, max_turns: int, sandbox: Sandbox) -> Player:
    """Plays tasks `batch_size` at a time through one `play_episodes` call (in-process policies).

    Tasks are batched in order of prompt size (longest first), so a batch's rows pad to similar lengths
    (FTRL test prompts run from ~500 to ~7,000 tokens); episodes come back in that order, each with its task."""

    def play(tasks: Sequence[Task]) -> Iterator[tuple[Task, Episode]]:
        tasks = sorted(tasks, key=lambda task: (-prompt_size(task.sample), task.index, task.scenario))
        for start in range(0, len(tasks), batch_size):
            chunk = tasks[start: start + batch_size]
            episodes = play_episodes(generator, [task.sample for task in chunk], max_turns=max_turns, sandbox=sandbox)
            yield from zip(chunk, episodes)

    return play


def play_concurrently(generator: TurnGenerator, *, concurrency: int, max_turns: int, sandbox: Sandbox) -> Player:
    """Plays each task on its own thread, `concurrency` at a time (remote policies); an episode whose
    request keeps failing comes back as its TurnGenerationError. A fatal one (wrong key, URL or model) stops
    everything."""

    def play_one(task: Task) -> Episode:
        return play_episodes(generator, [task.sample], max_turns=max_turns, sandbox=sandbox)[0]

    def play(tasks: Sequence[Task]) -> Iterator[tuple[Task, Episode | TurnGenerationError]]:
        with concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="episode") as pool:
            futures = {pool.submit(play_one, task): task for task in tasks}
            try:
                for future in concurrent.futures.as_completed(futures):
                    try:
                        yield futures[future], future.result()
                    except TurnGenerationError as exc:
                        if exc.fatal:
                            raise
                        yield futures[future], exc
            finally:
                for future in futures:
                    future.cancel()

    return play


def evaluate_tasks(tasks: Sequence[Task], play: Player, *, output: str, kind: str, run_id: str,
                   records: dict[str, dict[str, Any]], progress: bool = True) -> dict[str, Any]:
    """Plays the tasks not finished in `records`, appending one line per episode to `output` as it ends.

    `records` is updated in place. Returns this run's counts and throughput.
    """
    todo = [task for task in tasks if records.get(task.key, {}).get("status") != OK]
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if os.path.exists(output) and os.path.getsize(output):
        with open(output, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"  # an interrupted run left half a line: start on a fresh one
    else:
        cut = False
    started = time.perf_counter()
    played = turns = 0
    planned = {task.key for task in tasks}
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), unit="episode", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    with open(output, "a", encoding="utf-8") as f, bar:
        if cut:
            f.write("\n")
        for task, outcome in play(todo):
            if isinstance(outcome, TurnGenerationError):
                record = failed_record(task, outcome, run_id)
            else:
                record = episode_record(task, outcome, kind, run_id)
                turns += record["num_turns"]
            played += 1
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            records[task.key] = record
            bar.update(1)
            current = [r for key, r in records.items() if key in planned]
            bar.set_postfix({**DATA_KINDS[kind].progress(current),
                             "too_long": sum(r.get("end_reason") == TOO_LONG for r in current),
                             "failed": sum(r["status"] == FAILED for r in current)}, refresh=False)
    seconds = time.perf_counter() - started
    return {"episodes": played, "turns": turns, "seconds": seconds,
            "episodes_per_minute": 60.0 * played / seconds if seconds > 0 and played else 0.0}


# ---------------------------------------------------------------------------------------------
# A whole run: resume, play, summarize, write.


def run_settings(kind: str, data: str, *, backend: str, policy: str, template: str | None = None,
                 enable_thinking: bool | None = None, max_turns: int, max_new_tokens: int,
                 max_prompt_tokens: int | None = None) -> dict[str, Any]:
    """What decides the outcome of an episode; a resumed output must have been written with the same.

    `policy` names the policy (a local directory, or a server URL and model name); `template` None means the
    model type's own (recorded as "auto").
    """
    if backend == "local":
        policy = os.path.realpath(policy)
    return {"kind": kind, "data": os.path.realpath(data), "backend": backend, "policy": policy,
            "template": template or ("auto" if backend == "local" else "server"), "enable_thinking": enable_thinking,
            "max_turns": max_turns, "max_new_tokens": max_new_tokens, "max_prompt_tokens": max_prompt_tokens}


def open_run(output: str, settings: Mapping[str, Any], *, overwrite: bool = False
             ) -> tuple[dict[str, dict[str, Any]], str]:
    """(records already in `output`, this run's id) for an evaluation with these `settings`.

    `overwrite` starts again. Raises UsageError when `output` holds episodes of another evaluation (another
    policy, data file or generation setting): resuming it would mix two runs in one summary.
    """
    run_id = run_fingerprint(settings)
    records, problems = ({}, []) if overwrite else read_records(output)
    if overwrite and os.path.exists(output):
        os.remove(output)
    for problem in problems:
        print(problem, file=sys.stderr)
    others = sorted({r.get("run") for r in records.values()} - {run_id}, key=str)
    if others:
        raise UsageError(f"{output} holds episodes of another evaluation (run {others[0]}, this one is "
                         f"{run_id}: another policy, data file or generation setting); pass a new --output, "
                         "or --overwrite to start it again")
    return records, run_id


def run_evaluation(tasks: Sequence[Task], kind: str, *, output: str, settings: Mapping[str, Any], run_id: str,
                   records: dict[str, dict[str, Any]], row_errors: Sequence[RowError],
                   build_generator: Callable[[], TurnGenerator],
                   make_player: Callable[[TurnGenerator, Sandbox], Player],
                   sandbox_workers: int | None = None, tool_timeout: float = 10.0, progress: bool = True) -> int:
    """Plays the unfinished tasks, writes `output` and its summaries, prints the report; returns an exit code.

    0: every episode played; 1: some failed for good (they are in the output as failed, and a rerun retries
    them); 2: the policy could not be loaded, or the generator failed fatally; 130: interrupted (rerun to
    resume). `build_generator` is called only when there is something to play.
    """
    this_run: dict[str, Any] = {}
    backend_stats: dict[str, Any] = {}
    interrupted = False
    if all(records.get(task.key, {}).get("status") == OK for task in tasks):
        print(f"all {len(tasks)} episodes are already in {output}; nothing to play", file=sys.stderr)
    else:
        try:
            generator = build_generator()
        except (UsageError, FileNotFoundError, NotADirectoryError, ValueError, KeyError) as exc:
            print(f"error: cannot load the policy: {exc}", file=sys.stderr)
            return 2
        try:
            with Sandbox(num_workers=sandbox_workers, timeout=tool_timeout) as sandbox:
                this_run = evaluate_tasks(tasks, make_player(generator, sandbox), output=output, kind=kind,
                                          run_id=run_id, records=records, progress=progress)
        except TurnGenerationError as exc:  # only fatal ones get here: no request can succeed
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            interrupted = True
            print("interrupted; run the same command again to resume", file=sys.stderr)
        finally:
            backend_stats = dict(getattr(generator, "stats", {}) or {})
            if hasattr(generator, "close"):
                generator.close()
    summary = build_summary(kind, tasks, records, settings=settings, run_id=run_id, row_errors=row_errors,
                            this_run=this_run, backend_stats=backend_stats)
    json_path, md_path = summary_paths(output)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    report = markdown_report(summary)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(report)
    print(report)
    print(f"episodes: {output}\nsummary: {json_path}, {md_path}")
    if interrupted:
        return 130
    return 1 if summary["episodes"]["failed"] else 0
