"""FTRL's verifiable reward: execute the model's tool calls and match their outputs to expected answers.

Pure scoring functions (`answer_matches`, `match_outputs`, `score_turn`, `trajectory_metrics`)
plus `step_reward` / `step_rewards`, which run the calls in the sandbox first.

An environment ("sample") has `codes` (tool name -> source), `unsolved_set` (tool name -> expected
answers not yet solved), `answer` (the final answer) and `solve_rate`. A call solves an expected
answer when its tool is the one the answer is listed under and its output matches the answer.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

from ftrl_jax.envs.sandbox import Sandbox, ToolRequest, shared_sandbox
from ftrl_jax.envs.samples import Sample
from ftrl_jax.text.tool_calls import ParsedTurn, parse_assistant_turn

# Rewards of an assistant turn that makes no tool call.
EMPTY_TURN_REWARD = -0.5
BROKEN_MARKUP_REWARD = -0.3
SOLVED_BEFORE_REWARD = 0.5  # no call and no answer, on an environment whose solve_rate is 1


def _as_text(output: Any) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, (dict, list)):
        return json.dumps(output, ensure_ascii=False)
    return str(output)


def _normalise(text: str) -> str:
    return text.lower().replace(",", "")


def answer_matches(output: Any, expected: str) -> bool:
    """FTRL's answer_verify: every `", "`-separated part of `expected` occurs in the output.

    Case and commas are ignored (`"2,432"` matches `"2432 m"`); dict/list outputs are compared as
    their JSON text. An expected answer with no non-blank part matches nothing (it would
    otherwise reward any output).
    """
    parts = [part for part in expected.split(", ") if part.strip()]
    if not parts:
        return False
    text = _normalise(_as_text(output))
    return all(_normalise(part) in text for part in parts)


def match_outputs(
    calls_and_outputs: Iterable[tuple[str, Any]], unsolved_set: Mapping[str, Sequence[str]]
) -> tuple[int, dict[str, list[str]]]:
    """Which expected answers a sequence of (tool name, output) pairs solves.

    Each output can solve one still-unsolved answer listed under its own tool name, and each
    expected answer is consumed once. Returns (number solved, the unsolved_set that remains);
    tools with nothing left are dropped from the remaining set.
    """
    remaining = {name: list(answers) for name, answers in unsolved_set.items()}
    solved = 0
    for name, output in calls_and_outputs:
        answers = remaining.get(name)
        if not answers:
            continue
        for position, expected in enumerate(answers):
            if answer_matches(output, expected):
                del answers[position]
                solved += 1
                break
    return solved, {name: answers for name, answers in remaining.items() if answers}


# ---------------------------------------------------------------------------------------------
# Step reward: one generated assistant turn.


def _f1(solved: int, calls: int) -> float:
    return 2.0 * solved / (calls + 1)


def _precision(solved: int, calls: int) -> float:
    return solved / calls


def _rate(solved: int, calls: int) -> float:
    return float(solved)


def _precision_times_rate(solved: int, calls: int) -> float:
    return solved * solved / calls


# kind -> reward of a turn with `calls` >= 1 tool calls of which `solved` solved an answer.
REWARD_KINDS: dict[str, Callable[[int, int], float]] = {
    "f1": _f1,
    "precision": _precision,
    "rate": _rate,
    "pr": _precision_times_rate,
}


def _check_kind(kind: str) -> Callable[[int, int], float]:
    try:
        return REWARD_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown reward kind {kind!r}; expected one of {sorted(REWARD_KINDS)}") from None


_JSON_FIELDS = ("codes", "unsolved_set", "messages")


def _json_field(sample: Mapping[str, Any] | Sample, key: str, default: Any) -> Any:
    value = getattr(sample, key) if isinstance(sample, Sample) else sample.get(key, default)
    if isinstance(value, str) and key in _JSON_FIELDS:
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"sample field {key!r} is not valid JSON ({exc})") from None
    return default if value is None else value


def _reward_fields(sample: Mapping[str, Any] | Sample) -> tuple[dict[str, str], dict[str, list[str]], str, float]:
    """(codes, unsolved_set, answer, solve_rate) of a sample whose fields may still be JSON strings."""
    codes = _json_field(sample, "codes", {})
    unsolved = _json_field(sample, "unsolved_set", {})
    if not isinstance(codes, Mapping):
        raise ValueError(f"sample field 'codes' must map tool names to source, got {type(codes).__name__}")
    if not isinstance(unsolved, Mapping) or not all(isinstance(v, (list, tuple)) for v in unsolved.values()):
        raise ValueError("sample field 'unsolved_set' must map tool names to lists of answers")
    answer = _json_field(sample, "answer", "")
    solve_rate = _json_field(sample, "solve_rate", 0.0)
    return dict(codes), {k: list(v) for k, v in unsolved.items()}, str(answer), float(solve_rate)


def score_turn(
    turn: ParsedTurn,
    outputs: Sequence[str],
    unsolved_set: Mapping[str, Sequence[str]],
    answer: str,
    solve_rate: float,
    kind: str = "f1",
) -> float:
    """The reward of one parsed turn, given the outputs of its tool calls (pure).

    With calls: REWARD_KINDS[kind](solved, calls). Without: -0.3 if the turn holds tool-call
    markup that did not parse, -0.5 if its content is empty, 1/(1+k) if the content contains the
    final answer (k = expected answers still unsolved), else 0.5 if solve_rate is 1, else 0.
    Content is the text outside any leading `<think>` block: an answer or a call only drafted
    while thinking earns nothing.
    """
    reward_of = _check_kind(kind)
    if turn.tool_calls:
        solved, _ = match_outputs(zip((call.name for call in turn.tool_calls), outputs), unsolved_set)
        return reward_of(solved, len(turn.tool_calls))
    # Broken markup first: the parser leaves unparsable blocks out of `content`.
    if turn.malformed:
        return BROKEN_MARKUP_REWARD
    content = turn.content.strip()
    if not content:
        return EMPTY_TURN_REWARD
    if answer_matches(content, answer):
        return 1.0 / (1 + sum(len(answers) for answers in unsolved_set.values()))
    return SOLVED_BEFORE_REWARD if solve_rate == 1 else 0.0


def step_rewards(
    responses: Sequence[str],
    samples: Sequence[Mapping[str, Any] | Sample],
    kind: str = "f1",
    *,
    sandbox: Sandbox | None = None,
    timeout: float | None = None,
) -> list[float]:
    """Step rewards of many generated turns; all their tool calls run concurrently in one batch.

    `samples[i]` is the environment of `responses[i]` (fields may be JSON strings), with its
    current unsolved_set. `timeout` overrides the sandbox's per-call timeout.
    """
    if len(responses) != len(samples):
        raise ValueError(f"got {len(responses)} responses but {len(samples)} samples; pass one sample per response")
    _check_kind(kind)
    turns = [parse_assistant_turn(response) for response in responses]
    fields = [_reward_fields(sample) for sample in samples]
    requests = [
        ToolRequest(codes, call.name, call.arguments)
        for turn, (codes, _, _, _) in zip(turns, fields)
        for call in turn.tool_calls
    ]
    outputs = (sandbox or shared_sandbox()).call_many(requests, timeout=timeout) if requests else []
    rewards, start = [], 0
    for turn, (_, unsolved, answer, solve_rate) in zip(turns, fields):
        turn_outputs = outputs[start : start + len(turn.tool_calls)]
        start += len(turn.tool_calls)
        rewards.append(score_turn(turn, turn_outputs, unsolved, answer, solve_rate, kind))
    return rewards


def step_reward(
    response: str,
    sample: Mapping[str, Any] | Sample,
    kind: str = "f1",
    *,
    timeout: float = 10.0,
    sandbox: Sandbox | None = None,
) -> float:
    """FTRL's reward of one generated assistant turn (see `score_turn` for the rules)."""
    return step_rewards([response], [sample], kind, sandbox=sandbox, timeout=timeout)[0]


# ---------------------------------------------------------------------------------------------
# Trajectory metrics: a whole multi-turn episode.


def _assistant_calls(message: Mapping[str, Any]) -> list[str]:
    """Names of the tools an assistant message calls, from `tool_calls` or else `<tool_call>` markup."""
    names = []
    for item in message.get("tool_calls") or []:
        function = item.get("function", item) if isinstance(item, Mapping) else None
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            names.append(function["name"])
    if names:
        return names
    content = message.get("content")
    if isinstance(content, str) and content:
        return [call.name for call in parse_assistant_turn(content).tool_calls]
    return []


def _message_text(content: Any) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    return _as_text("" if content is None else content)


def _same_messages(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> bool:
    return len(a) == len(b) and all(
        x.get("role") == y.get("role") and x.get("content") == y.get("content") for x, y in zip(a, b)
    )


def trajectory_metrics(messages: Sequence[Mapping[str, Any]], sample: Mapping[str, Any] | Sample) -> dict[str, float]:
    """Solve precision / rate / F1 of one episode on one environment.

    `messages` is either the whole conversation, beginning with the sample's own `messages`
    (those are skipped), or only the messages the episode added. Assistant messages carry calls
    in `tool_calls` (OpenAI style) or as `<tool_call>` markup in `content`; tool messages answer
    them in call order. With c calls made, s expected answers solved and u expected at the start:
    solve_precision = s/c (1 if c = 0), solve_rate = s/u (1 if u = 0), solve_f1 = 2s/(c+u)
    (1 if both are 0). The counts come back too, as num_calls, num_solved, num_expected.
    """
    initial = _json_field(sample, "messages", [])
    unsolved = _reward_fields(sample)[1]
    new_messages = messages[len(initial) :] if _same_messages(messages[: len(initial)], initial) else messages
    awaiting: deque[str] = deque()  # tool names of calls whose responses have not arrived yet
    pairs: list[tuple[str, str]] = []
    num_calls = 0
    for message in new_messages:
        role = message.get("role")
        if role == "assistant":
            names = _assistant_calls(message)
            num_calls += len(names)
            awaiting.extend(names)
        elif role == "tool":
            name = awaiting.popleft() if awaiting else message.get("name")
            if isinstance(name, str):
                pairs.append((name, _message_text(message.get("content"))))
    solved, _ = match_outputs(pairs, unsolved)
    expected = sum(len(answers) for answers in unsolved.values())
    return {
        "solve_precision": solved / num_calls if num_calls else 1.0,
        "solve_rate": solved / expected if expected else 1.0,
        "solve_f1": 2.0 * solved / (num_calls + expected) if num_calls + expected else 1.0,
        "num_calls": num_calls,
        "num_solved": solved,
        "num_expected": expected,
    }
