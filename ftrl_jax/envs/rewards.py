"""FTRL's verifiable reward: execute the model's tool calls and match their outputs to expected answers.

Pure scoring functions (`answer_matches`, `match_outputs`, `score_turn`, `trajectory_metrics`)
plus `step_reward` / `step_rewards`, which run the calls in the sandbox first.

An environment ("sample") has `codes` (tool name -> source), `unsolved_set` (tool name -> expected
answers not yet solved), `answer` (the final answer) and `solve_rate`. A call solves an expected
answer when its tool is the one the answer is listed under and its output matches the answer.

The step reward comes in three semantics (`REWARD_SEMANTICS`; `step_reward(..., semantics=...)`):

| semantics | parsing | tool output | output matches answer | final answer in a no-call turn |
|---|---|---|---|---|
| `ftrl` (default) | FTRL's own split on the tags (`ftrl_reward` P1-P9) | FTRL's `call_function` text (E1-E7) | FTRL's `answer_verify` (M2) | whole answer, one substring (S4) |
| `strict` | every complete block outside `<think>`, text between calls or not; an unclosed block is broken markup; broken blocks next to good calls count as calls | the sandbox's output | `answer_matches`, and an error never matches (the sandbox's message, or a tool's `{"error": ...}`) | whole answer, at word boundaries |
| `lenient` | `tool_calls.parse_assistant_turn` (the product's robust parser; outside `<think>`) | the sandbox's output | `answer_matches` | `answer_matches` (parts in any order) |

`ftrl` reproduces bytedance/FTRL's reward; its rules, each with the FTRL function it comes from, are the
table in `ftrl_reward`'s docstring. `strict` keeps FTRL's reward values and kinds and fixes what is a flaw
in FTRL rather than a choice: FTRL drops calls that follow text, runs an unclosed call, lets error text
(which often echoes the arguments) earn credit, lets an empty expected answer match everything, lets a
final answer match inside a longer word or number, runs calls drafted in a think block, ignores broken
blocks beside good calls, and hides a tool's top-level imports from its own function (E2). `lenient` is
this project's reward before FTRL's semantics were reproduced (the main job's measured runs used it).

All three share the reward values: with calls, `REWARD_KINDS[kind](solved, calls)`; without, -0.3 for
tool-call markup, -0.5 for empty content, 1/(1+k) for the final answer (k = expected answers still
unsolved), 0.5 on an environment whose solve_rate is 1, else 0. The kinds `f1_no_format_penalty` and
`f1_half_format_penalty` are `f1` with those two format penalties (FTRL's `compute_solve_*` rules S2 and S3) set
to 0 and halved (`FORMAT_PENALTY_SCALE`).

Truncated turns, one rule for RL and evaluation: a turn cut at `max_new_tokens` (`truncated=True`) has its
calls neither run nor counted. `step_rewards` scores it with the no-call rules (so a cut turn holding call
markup gets -0.3, scaled as above, in every semantics), and evaluation (`rollout.episodes.play_episodes`) does
not run them while `trajectory_metrics` counts only calls that got a tool response. (FTRL itself scores a cut
response like any other.)
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

from ftrl_jax.envs import ftrl_reward
from ftrl_jax.envs.sandbox import Sandbox, ToolRequest, is_error_output, shared_sandbox
from ftrl_jax.envs.samples import Sample
from ftrl_jax.text.tool_calls import ParsedTurn, parse_assistant_turn, split_reasoning

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
    otherwise reward any output). (`ftrl_reward.answer_verify` is FTRL's exact function: it also strips
    each part, and lets an empty expected answer match everything.)
    """
    parts = [part for part in expected.split(", ") if part.strip()]
    if not parts:
        return False
    text = _normalise(_as_text(output))
    return all(_normalise(part) in text for part in parts)


def match_outputs(
    calls_and_outputs: Iterable[tuple[Any, Any]],
    unsolved_set: Mapping[str, Sequence[str]],
    matches: Callable[[Any, str], bool] = answer_matches,
) -> tuple[int, dict[str, list[str]]]:
    """Which expected answers a sequence of (tool name, output) pairs solves.

    Each output can solve one still-unsolved answer listed under its own tool name (the first, in list
    order, that `matches(output, answer)` accepts), and each expected answer is consumed once. Returns
    (number solved, the unsolved_set that remains); tools with nothing left are dropped from the
    remaining set. A name that cannot be a key (a list parsed from a call's JSON) solves nothing.
    """
    remaining = {name: list(answers) for name, answers in unsolved_set.items()}
    solved = 0
    for name, output in calls_and_outputs:
        try:
            answers = remaining.get(name)
        except TypeError:  # unhashable
            continue
        if not answers:
            continue
        for position, expected in enumerate(answers):
            if matches(output, expected):
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
# FTRL: compute_solve_f1 / compute_solve_precision / compute_solve_rate / compute_solve_pr.
# f1_no_format_penalty / f1_half_format_penalty: FTRL's f1 whose no-call format penalties (-0.3 tool-call
# markup without a call, -0.5 empty content) are 0 / halved (-0.15, -0.25): not FTRL's reward, options that
# weaken the penalties' share of the group-relative signal of a policy that still often breaks its markup.
REWARD_KINDS: dict[str, Callable[[int, int], float]] = {
    "f1": _f1,
    "precision": _precision,
    "rate": _rate,
    "pr": _precision_times_rate,
    "f1_no_format_penalty": _f1,
    "f1_half_format_penalty": _f1,
}
# Kinds whose no-call format penalties (BROKEN_MARKUP_REWARD, EMPTY_TURN_REWARD) are scaled by this factor
# (every other kind: 1, FTRL's penalties).
FORMAT_PENALTY_SCALE: dict[str, float] = {"f1_no_format_penalty": 0.0, "f1_half_format_penalty": 0.5}


def _format_penalty(penalty: float, scale: float) -> float:
    """`penalty` times `scale`, and 0.0 rather than -0.0 when the scale is 0."""
    return penalty * scale if scale else 0.0


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


def _reward_fields(
    sample: Mapping[str, Any] | Sample,
) -> tuple[dict[str, str], dict[str, list[str]], str | None, float]:
    """(codes, unsolved_set, answer, solve_rate) of a sample whose fields may still be JSON strings.

    `answer` is None when a row has none (FTRL's reward then skips the final-answer rule).
    """
    codes = _json_field(sample, "codes", {})
    unsolved = _json_field(sample, "unsolved_set", {})
    if not isinstance(codes, Mapping):
        raise ValueError(f"sample field 'codes' must map tool names to source, got {type(codes).__name__}")
    if not isinstance(unsolved, Mapping) or not all(isinstance(v, (list, tuple)) for v in unsolved.values()):
        raise ValueError("sample field 'unsolved_set' must map tool names to lists of answers")
    answer = _json_field(sample, "answer", None)
    solve_rate = _json_field(sample, "solve_rate", 0.0)
    return (dict(codes), {k: list(v) for k, v in unsolved.items()}, None if answer is None else str(answer),
            float(solve_rate))


@dataclasses.dataclass(frozen=True)
class TurnView:
    """A generated turn as one semantics reads it.

    `calls` are run (objects with `name` and `arguments`); `broken` more blocks count as calls that solved
    nothing; `content` and `markup` are what the no-call rules read (markup: tool-call tags in the content).
    """

    calls: list[Any]
    content: str
    markup: bool
    broken: int = 0


def _score_view(view: TurnView, outputs: Sequence[Any], unsolved_set: Mapping[str, Sequence[str]],
                answer: str | None, solve_rate: float, reward_of: Callable[[int, int], float],
                output_matches: Callable[[Any, str], bool], answer_in: Callable[[str, str | None], bool],
                format_penalty_scale: float = 1.0) -> float:
    if view.calls:
        solved, _ = match_outputs(zip((call.name for call in view.calls), outputs), unsolved_set, output_matches)
        return reward_of(solved, len(view.calls) + view.broken)
    # Markup before emptiness: a parser may leave unparsable blocks out of `content`.
    if view.markup:
        return _format_penalty(BROKEN_MARKUP_REWARD, format_penalty_scale)
    if not view.content:
        return _format_penalty(EMPTY_TURN_REWARD, format_penalty_scale)
    if answer_in(view.content, answer):
        return 1.0 / (1 + sum(len(answers) for answers in unsolved_set.values()))
    return SOLVED_BEFORE_REWARD if solve_rate == 1 else 0.0


# ---- lenient: the product parser -------------------------------------------------------------


def _lenient_answer_in(content: str, answer: str | None) -> bool:
    return answer is not None and answer_matches(content, answer)


def _lenient_view(text: str, truncated: bool) -> TurnView:
    turn = parse_assistant_turn(text)
    if truncated:
        return TurnView([], turn.content.strip(), turn.malformed or bool(turn.tool_calls))
    return TurnView(list(turn.tool_calls), turn.content.strip(), turn.malformed)


def score_turn(
    turn: ParsedTurn,
    outputs: Sequence[str],
    unsolved_set: Mapping[str, Sequence[str]],
    answer: str,
    solve_rate: float,
    kind: str = "f1",
) -> float:
    """The `lenient` reward of one parsed turn, given the outputs of its tool calls (pure).

    With calls: REWARD_KINDS[kind](solved, calls). Without: -0.3 if the turn holds tool-call
    markup that did not parse, -0.5 if its content is empty (both times FORMAT_PENALTY_SCALE's factor for
    the format-penalty kinds), 1/(1+k) if the content contains the
    final answer (`answer_matches`; k = expected answers still unsolved), else 0.5 if solve_rate is
    1, else 0. Content is the text outside any leading `<think>` block: an answer or a call only
    drafted while thinking earns nothing.
    """
    view = TurnView(list(turn.tool_calls), turn.content.strip(), turn.malformed)
    return _score_view(view, outputs, unsolved_set, answer, solve_rate, _check_kind(kind), answer_matches,
                       _lenient_answer_in, FORMAT_PENALTY_SCALE.get(kind, 1.0))


# ---- strict: FTRL's rules with its flaws fixed ------------------------------------------------

_END_MARKERS = ("<|im_end|>", "<|endoftext|>")


def _strict_text(text: str) -> str:
    """The text after every `<think>` block (tags inside a call's JSON are not tags; a block never closed,
    cut off while thinking, leaves nothing), without trailing end-of-turn tokens."""
    while True:
        _, rest = split_reasoning(text)
        if rest == text:
            break
        text = rest
    text = text.strip()
    while text.endswith(_END_MARKERS):
        for marker in _END_MARKERS:
            text = text.removesuffix(marker).strip()
    return text


def _strict_call(body: str) -> ftrl_reward.Call | None:
    """A block's JSON: an object with a non-empty string `name` and an `arguments` object (or its JSON text)."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return None
    return ftrl_reward.Call(value["name"], arguments) if isinstance(arguments, dict) else None


def _strict_view(text: str, truncated: bool) -> TurnView:
    text = _strict_text(text)
    markup = ftrl_reward.has_markup(text)
    if truncated:
        return TurnView([], text, markup)
    calls, broken, position = [], 0, 0
    open_tag, close_tag = ftrl_reward.OPEN_TAG, ftrl_reward.CLOSE_TAG
    while (start := text.find(open_tag, position)) >= 0:
        end = text.find(close_tag, start + len(open_tag))
        if end < 0:  # never closed: broken markup, not a call
            broken += 1
            break
        call = _strict_call(text[start + len(open_tag):end])
        if call is None:
            broken += 1
        else:
            calls.append(call)
        position = end + len(close_tag)
    return TurnView(calls, text, markup, broken if calls else 0)


def _words(text: str) -> str:
    return " ".join(text.lower().replace(",", "").split())


def strict_answer_in(content: str, answer: str | None) -> bool:
    """The whole final answer in the content (case, commas and runs of blanks ignored), not inside a longer
    word or number: `"Tokyo"` is in `"It is Tokyo."`, `"12"` is not in `"2012"`, `"a b c"` is not in
    `"I cannot answer this"`. An empty answer is in nothing."""
    wanted = _words(answer or "")
    if not wanted:
        return False
    before = r"(?<!\w)" if re.match(r"\w", wanted[0]) else ""
    after = r"(?!\w)" if re.match(r"\w", wanted[-1]) else ""
    return re.search(before + re.escape(wanted) + after, _words(content)) is not None


def _is_error(output: Any) -> bool:
    """The sandbox's error message, or a tool's own error report: a JSON object whose only key is "error"."""
    if not isinstance(output, str):
        return False
    if is_error_output(output):
        return True
    if not output.startswith('{"error"'):
        return False
    try:
        value = json.loads(output)
    except ValueError:
        return False
    return isinstance(value, dict) and list(value) == ["error"]


def _strict_output_matches(output: Any, expected: str) -> bool:
    return not _is_error(output) and answer_matches(output, expected)


# ---- ftrl --------------------------------------------------------------------------------------


def _ftrl_view(text: str, truncated: bool) -> TurnView:
    if truncated:
        content = ftrl_reward.clean_response(text)
        return TurnView([], content, ftrl_reward.has_markup(content))
    turn = ftrl_reward.parse_turn(text)
    return TurnView(turn.calls, turn.content, ftrl_reward.has_markup(turn.content))


# ---- the registry ------------------------------------------------------------------------------

Batches = Sequence[tuple[Sequence[Any], Mapping[str, Any]]]


def _run_in_sandbox(batches: Batches, sandbox: Sandbox, timeout: float | None) -> list[list[Any]]:
    """The sandbox's outputs of every (calls, codes) turn, all in one `call_many`."""
    requests = [ToolRequest(codes, call.name, call.arguments) for calls, codes in batches for call in calls]
    outputs = iter(sandbox.call_many(requests, timeout=timeout) if requests else ())
    return [[next(outputs) for _ in calls] for calls, _ in batches]


def _run_like_ftrl(batches: Batches, sandbox: Sandbox, timeout: float | None) -> list[list[Any]]:
    return ftrl_reward.run_calls(batches, sandbox, ftrl_reward.FTRL_TIMEOUT_S if timeout is None else timeout)


@dataclasses.dataclass(frozen=True)
class RewardSemantics:
    """How a step reward reads a turn (`view(text, truncated)`), runs its calls (`run(batches, sandbox,
    timeout)`), matches a call's output to an expected answer and finds the final answer in content."""

    name: str
    view: Callable[[str, bool], TurnView]
    run: Callable[[Batches, Sandbox, float | None], list[list[Any]]]
    output_matches: Callable[[Any, str], bool]
    answer_in: Callable[[str, str | None], bool]


REWARD_SEMANTICS: dict[str, RewardSemantics] = {
    "ftrl": RewardSemantics("ftrl", _ftrl_view, _run_like_ftrl, ftrl_reward.answer_verify,
                            ftrl_reward.final_answer_in),
    "strict": RewardSemantics("strict", _strict_view, _run_in_sandbox, _strict_output_matches, strict_answer_in),
    "lenient": RewardSemantics("lenient", _lenient_view, _run_in_sandbox, answer_matches, _lenient_answer_in),
}


def _check_semantics(semantics: str) -> RewardSemantics:
    try:
        return REWARD_SEMANTICS[semantics]
    except (KeyError, TypeError):
        raise ValueError(f"unknown reward semantics {semantics!r}; expected one of "
                         f"{sorted(REWARD_SEMANTICS)}") from None


def step_rewards(
    responses: Sequence[str],
    samples: Sequence[Mapping[str, Any] | Sample],
    kind: str = "f1",
    *,
    sandbox: Sandbox | None = None,
    timeout: float | None = None,
    semantics: str = "ftrl",
    truncated: Sequence[bool] | None = None,
) -> list[float]:
    """Step rewards of many generated turns; all their tool calls run concurrently in one batch.

    `samples[i]` is the environment of `responses[i]` (fields may be JSON strings), with its
    current unsolved_set. `semantics` is a key of REWARD_SEMANTICS (default: FTRL's own). `timeout`
    overrides the per-call timeout (default: FTRL's 10 s under "ftrl", else the sandbox's).
    `truncated[i]` says that turn i hit the token limit: its calls are not run and the no-call rules
    score it (-0.3 if it holds tool-call markup, scaled by the kind's FORMAT_PENALTY_SCALE), as evaluation
    does not run them either.
    """
    if len(responses) != len(samples):
        raise ValueError(f"got {len(responses)} responses but {len(samples)} samples; pass one sample per response")
    cut = [False] * len(responses) if truncated is None else [bool(flag) for flag in truncated]
    if len(cut) != len(responses):
        raise ValueError(f"got {len(cut)} truncated flags for {len(responses)} responses")
    reward_of = _check_kind(kind)
    rules = _check_semantics(semantics)
    views = [rules.view(response, flag) for response, flag in zip(responses, cut)]
    fields = [_reward_fields(sample) for sample in samples]
    batches = [(view.calls, codes) for view, (codes, _, _, _) in zip(views, fields)]
    outputs = rules.run(batches, sandbox or shared_sandbox(), timeout) if any(v.calls for v in views) else \
        [[] for _ in views]
    penalty_scale = FORMAT_PENALTY_SCALE.get(kind, 1.0)
    return [_score_view(view, turn_outputs, unsolved, answer, solve_rate, reward_of, rules.output_matches,
                        rules.answer_in, penalty_scale)
            for view, turn_outputs, (_, unsolved, answer, solve_rate) in zip(views, outputs, fields)]


def step_reward(
    response: str,
    sample: Mapping[str, Any] | Sample,
    kind: str = "f1",
    *,
    timeout: float = 10.0,
    sandbox: Sandbox | None = None,
    semantics: str = "ftrl",
    truncated: bool = False,
) -> float:
    """The reward of one generated assistant turn (see `step_rewards`, and the module docstring for the rules)."""
    return step_rewards([response], [sample], kind, sandbox=sandbox, timeout=timeout, semantics=semantics,
                        truncated=[truncated])[0]


# ---------------------------------------------------------------------------------------------
# Trajectory metrics: a whole multi-turn episode.


def _assistant_calls(message: Mapping[str, Any]) -> list[tuple[Any, str]]:
    """(id, tool name) of the calls an assistant message makes, from `tool_calls` or else `<tool_call>` markup
    (whose calls have no id)."""
    calls = []
    for item in message.get("tool_calls") or []:
        function = item.get("function", item) if isinstance(item, Mapping) else None
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            calls.append((item.get("id"), function["name"]))
    if calls:
        return calls
    content = message.get("content")
    if isinstance(content, str) and content:
        return [(None, call.name) for call in parse_assistant_turn(content).tool_calls]
    return []


def _message_text(content: Any) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    return _as_text("" if content is None else content)


def _same_messages(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> bool:
    return len(a) == len(b) and all(
        x.get("role") == y.get("role") and x.get("content") == y.get("content") for x, y in zip(a, b)
    )


def _answered_call(pending: list[tuple[Any, str]], tool_call_id: Any) -> str | None:
    """Takes the call a tool message answers out of `pending`: the one with its `tool_call_id`, else the first."""
    if not pending:
        return None
    if tool_call_id is not None:
        for position, (call_id, _) in enumerate(pending):
            if call_id == tool_call_id:
                return pending.pop(position)[1]
    return pending.pop(0)[1]


def trajectory_metrics(messages: Sequence[Mapping[str, Any]], sample: Mapping[str, Any] | Sample) -> dict[str, float]:
    """Solve precision / rate / F1 of one episode on one environment.

    `messages` is either the whole conversation, beginning with the sample's own `messages`
    (those are skipped), or only the messages the episode added. Assistant messages carry calls
    in `tool_calls` (OpenAI style) or as `<tool_call>` markup in `content`; the tool messages that
    follow answer them: a tool message with a `tool_call_id` answers the call with that id, one
    without (or with an unknown id) the earliest call still unanswered, as FTRL's evaluation pairs
    each call with its own response. A call counts as made when a response answers it before the
    next assistant message: the calls of a truncated turn, which evaluation does not run, do not
    count, and a tool message that answers no call solves nothing. With c calls made, s expected answers solved and u expected at the start:
    solve_precision = s/c (1 if c = 0), solve_rate = s/u (1 if u = 0), solve_f1 = 2s/(c+u)
    (1 if both are 0). The counts come back too, as num_calls, num_solved, num_expected.
    """
    initial = _json_field(sample, "messages", [])
    unsolved = _reward_fields(sample)[1]
    new_messages = messages[len(initial) :] if _same_messages(messages[: len(initial)], initial) else messages
    pending: list[tuple[Any, str]] = []  # (id, tool name) of the last assistant message's unanswered calls
    pairs: list[tuple[str, str]] = []
    num_calls = 0
    for message in new_messages:
        role = message.get("role")
        if role == "assistant":
            pending = _assistant_calls(message)
        elif role == "tool":
            # A tool message that answers no call of the last assistant turn solves nothing: crediting it
            # (by its `name`) would let solved exceed calls made.
            name = _answered_call(pending, message.get("tool_call_id"))
            if name is not None:
                num_calls += 1
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
