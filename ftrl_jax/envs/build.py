"""Building environments in bulk: construct with an author, execute the oracle plan, validate.

An environment is kept only if really executing its oracle plan in the sandbox earns the full
FTRL reward: every entry of `unsolved_set` is matched by an output of its tool, the final
outputs contain `answer`, and every argument was available to the caller (in the question or
an earlier output). Drops are counted by reason.

Environment i depends only on (seed, i), so builds are deterministic and order-independent;
while the sandbox runs one batch, the next batch is constructed in another thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import json
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

from ftrl_jax.envs import rewards
from ftrl_jax.envs import sandbox as sandbox_lib
from ftrl_jax.envs.procedural import ProceduralAuthor
from ftrl_jax.envs.world import WorldSpec
from ftrl_jax.envs.stages import (SCENARIO_KINDS, Author, Complexity, Environment, StageError,
                                  construct, environment_rng)

# Drop reason -> what it means (reports print these).
DROP_REASONS: dict[str, str] = {
    "stage_failed": "an authoring stage broke its checks (the stage is named after the colon)",
    "tool_error": "an oracle call raised, timed out or crashed in the sandbox",
    "final_answer_missing": "the outputs of the last hops do not contain the final answer",
    "sub_answer_missing": "an unsolved_set answer is not in the output of its tool's oracle call",
    "argument_not_grounded": "an oracle argument appears neither in the question nor in an earlier output",
    "filtered": "valid, but left out by the build's `keep` filter (e.g. a held-out question in a training build)",
}


@dataclasses.dataclass
class BuildReport:
    """What a build did: attempts, kept environments, drops by reason, wall time."""

    attempted: int = 0
    kept: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    seconds: float = 0.0

    @property
    def envs_per_minute(self) -> float:
        return 60.0 * self.kept / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        lines = [f"kept {self.kept} of {self.attempted} environments in {self.seconds:.1f} s "
                 f"({self.envs_per_minute:,.0f} validated envs/min)"]
        for reason, count in sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0])):
            meaning = DROP_REASONS.get(reason.split(":")[0], "")
            lines.append(f"  dropped {count:>6} {reason}: {meaning}")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class BuiltEnvironment:
    """A validated environment with the outputs of its oracle plan (turn by turn)."""

    index: int
    environment: Environment
    outputs: list[list[str]]


# --- validation (pure) -------------------------------------------------------------------

def string_values(value: Any) -> Iterator[str]:
    """Every string in a JSON-like value (a call's arguments, a schema), nested dicts, lists and tuples included,
    in order; other leaves (numbers, booleans, None) are skipped."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from string_values(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from string_values(v)


def validate(environment: Environment, outputs: Sequence[Sequence[str]]) -> str | None:
    """The drop reason for an environment given its oracle outputs (aligned with oracle_plan), or None.

    Checks, in order: no call failed in the sandbox; the outputs of the chain ends contain
    `answer` (FTRL match rule); every unsolved_set entry is matched by its tool's output (and
    each call's output holds its sub-answer); every string argument could be known to the
    caller from the question, an earlier turn's outputs, or the called tool's document.
    """
    plan = environment.oracle_plan()
    flat = [(name, case, output) for turn, turn_outputs in zip(plan, outputs)
            for (name, case), output in zip(turn, turn_outputs)]
    if any(sandbox_lib.is_error_output(output) for _, _, output in flat):
        return "tool_error"
    final = set(environment.scenario.final_ids)
    final_text = " ".join(output for _, case, output in flat if case.sub_question in final)
    if not rewards.answer_matches(final_text, environment.answer):
        return "final_answer_missing"
    _, remaining = rewards.match_outputs([(name, output) for name, _, output in flat],
                                         environment.unsolved_set())
    if remaining or any(not rewards.answer_matches(output, case.answer) for _, case, output in flat):
        return "sub_answer_missing"
    known = environment.question.lower()
    documents = {t.name: json.dumps(t.schema(), ensure_ascii=False).lower() for t in environment.tools}
    for turn, turn_outputs in zip(plan, outputs):
        for name, case in turn:
            for value in string_values(dict(case.arguments)):
                # A value may come from the task (question, earlier outputs) or the tool's own
                # document (a selector's allowed values).
                if value.lower() not in known and value.lower() not in documents[name]:
                    return "argument_not_grounded"
        known += " " + " ".join(turn_outputs).lower()
    return None


# --- execution -------------------------------------------------------------------------

def run_oracle(environments: Sequence[Environment], sandbox: sandbox_lib.Sandbox) -> list[list[list[str]]]:
    """Outputs of every environment's oracle plan, executed as one sandbox batch.

    The plan's arguments are known in advance, so all turns run concurrently; outputs come
    back per environment, per turn, per call.
    """
    requests, shape = [], []
    for env in environments:
        plan = env.oracle_calls()
        shape.append([len(turn) for turn in plan])
        requests += [sandbox_lib.ToolRequest(env.codes, call["name"], call["arguments"])
                     for turn in plan for call in turn]
    flat = iter(sandbox.call_many(requests))
    return [[[next(flat) for _ in range(n)] for n in turns] for turns in shape]


def _construct_one(author: Author, seed: int, index: int, kinds: Sequence[str],
                   complexity: Complexity) -> Environment | str:
    """Environment `index`, or the drop reason if the author failed."""
    try:
        return construct(author, kinds[index % len(kinds)], complexity, environment_rng(seed, index))
    except StageError as exc:
        return f"stage_failed:{exc.stage}"


def _as_complexity(value: Complexity | str) -> Complexity:
    return value if isinstance(value, Complexity) else Complexity.parse(value)


def _default_author(seed: int, world: WorldSpec | str | None, kinds: Sequence[str],
                    levels: Sequence[Complexity]) -> ProceduralAuthor:
    """The procedural author of `seed` over `world`, checked against the kinds and levels asked for."""
    author = ProceduralAuthor(world_seed=seed, spec=world)
    errors = list(dict.fromkeys(e for level in levels for e in author.check(kinds, level)))
    if errors:
        raise ValueError("; ".join(errors))
    return author


def iter_environments(
    seed: int,
    author: Author | None = None,
    kinds: Sequence[str] = tuple(SCENARIO_KINDS),
    complexity: Complexity | str | Sequence[Complexity | str] = "medium",
    sandbox: sandbox_lib.Sandbox | None = None,
    batch_size: int = 64,
    author_threads: int = 1,
    report: BuildReport | None = None,
    start: int = 0,
    stop: int | None = None,
    world: WorldSpec | str | None = None,
    keep: Callable[[Environment], bool] | None = None,
) -> Iterator[BuiltEnvironment]:
    """Validated environments of indices start, start+1, ... (below `stop`; endless if None), in order.

    complexity: one level for all, or a sequence cycled by environment index.
    world: size of the default procedural author's world (WorldSpec or its text, e.g.
    'pool=32,relations=12,fixed_names=1'); give it to the author instead when passing one.
    author_threads > 1 constructs a batch's environments concurrently (for network-bound
    authors such as the LLM author; the procedural author gains nothing from threads).
    report, if given, is updated as environments are tried.
    keep: a filter on validated environments; the others are not yielded and count as dropped "filtered".
    """
    unknown = [k for k in kinds if k not in SCENARIO_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown scenario kinds {unknown or list(kinds)}; use some of {list(SCENARIO_KINDS)}")
    if author is not None and world is not None:
        raise ValueError("pass the world spec to the author (ProceduralAuthor(spec=...)), not next to it")
    levels = ([_as_complexity(complexity)] if isinstance(complexity, (Complexity, str))
              else [_as_complexity(c) for c in complexity])
    author = author if author is not None else _default_author(seed, world, kinds, levels)
    sandbox = sandbox if sandbox is not None else sandbox_lib.shared_sandbox()
    report = report if report is not None else BuildReport()
    builders = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, author_threads))
    runner = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # the sandbox takes one caller

    def construct_index(index: int) -> Environment | str:
        return _construct_one(author, seed, index, kinds, levels[index % len(levels)])

    def make_batch(first: int) -> list[tuple[int, Environment | str]]:
        last = first + batch_size if stop is None else min(first + batch_size, stop)
        indices = range(first, last)
        made = builders.map(construct_index, indices) if author_threads > 1 else map(construct_index, indices)
        return list(zip(indices, made))

    def execute(batch: list[tuple[int, Environment | str]]) -> list[list[list[str]]]:
        return run_oracle([env for _, env in batch if isinstance(env, Environment)], sandbox)

    try:
        batch = make_batch(start)
        for next_first in itertools.count(start + batch_size, batch_size):
            if not batch:
                return
            running = runner.submit(execute, batch)
            upcoming = make_batch(next_first)  # overlaps with the sandbox's work
            outputs = iter(running.result())
            for index, env in batch:
                report.attempted += 1
                reason = env if isinstance(env, str) else None
                env_outputs: list[list[str]] = []
                if reason is None:
                    env_outputs = next(outputs)
                    reason = validate(env, env_outputs)
                if reason is None and keep is not None and not keep(env):
                    reason = "filtered"
                if reason is not None:
                    report.dropped[reason] += 1
                    continue
                report.kept += 1
                yield BuiltEnvironment(index, env, env_outputs)
            batch = upcoming
    finally:
        builders.shutdown(wait=False, cancel_futures=True)
        runner.shutdown(wait=True)


def build_environments(
    num: int,
    seed: int,
    author: Author | None = None,
    kinds: Sequence[str] = tuple(SCENARIO_KINDS),
    complexity: Complexity | str | Sequence[Complexity | str] = "medium",
    sandbox: sandbox_lib.Sandbox | None = None,
    batch_size: int = 64,
    author_threads: int = 1,
    max_attempts: int | None = None,
    on_kept: Callable[[BuiltEnvironment], None] | None = None,
    world: WorldSpec | str | None = None,
    keep: Callable[[Environment], bool] | None = None,
) -> tuple[list[Environment], BuildReport]:
    """The first `num` validated environments under `seed`, and a report of the build.

    world: size of the default procedural author's world (see `iter_environments`).
    keep: a filter on validated environments (e.g. `splits.is_held_out` of the question); the others are
        counted in the report as dropped for "filtered" and do not count towards `num`.

    Stops early (fewer than `num` kept) after `max_attempts` tries (default 4 * num + 256, sixteen times as
    many with `keep`), so an author that fails everything cannot loop forever; the report says why they
    were dropped.
    """
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    limit = max_attempts if max_attempts is not None else (4 * num + 256) * (16 if keep is not None else 1)
    report = BuildReport()
    kept: list[Environment] = []
    started = time.perf_counter()
    stream = iter_environments(seed, author, kinds, complexity, sandbox,
                               batch_size=min(batch_size, max(1, num)),
                               author_threads=author_threads, report=report, stop=limit, world=world, keep=keep)
    try:
        for built in stream if num > 0 else ():
            kept.append(built.environment)
            if on_kept is not None:
                on_kept(built)
            if len(kept) == num:
                break
    finally:
        stream.close()
        report.seconds = time.perf_counter() - started
    return kept, report


def corpus_texts(num: int, seed: int,
                 complexity: Complexity | str | Sequence[Complexity | str] = ("low", "medium", "high"),
                 sandbox: sandbox_lib.Sandbox | None = None,
                 world: WorldSpec | str | None = None) -> Iterator[str]:
    """Plain text from `num` validated procedural environments, for training a tokenizer.

    Per environment: the user prompt (instruction and question), each tool document as JSON,
    and each oracle output. Complexity levels are cycled so every document size is seen.
    """
    stream = iter_environments(seed, complexity=complexity, sandbox=sandbox, world=world)
    try:
        for built in itertools.islice(stream, num):
            env = built.environment
            yield env.to_sample().messages[0]["content"]
            for tool in env.tools:
                yield json.dumps(tool.schema(), ensure_ascii=False)
            for turn in built.outputs:
                yield from turn
    finally:
        stream.close()


def distinct_tool_names(environments: Iterable[Environment]) -> set[str]:
    """All tool names used across environments."""
    return {tool.name for env in environments for tool in env.tools}
