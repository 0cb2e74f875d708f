"""Multi-turn episodes: the policy plays tool-use environments, and what RL trains on comes out of them.

FTRL's trajectory collection: render the conversation with its tools, sample an assistant turn, parse its
tool calls, run them in the sandbox, append the assistant message and the tool responses, and go on until
a turn makes no tool call or `max_turns` is reached. Many environments are played as one batch: each
round, every still-active episode goes through ONE call of the turn generator (one `generate` for the
local policy) and all their tool calls through ONE `Sandbox.call_many`. Overlapping one half's tool calls
with the other half's decoding (a worker thread for `call_many`) was measured and gave nothing: tool calls
take 1-2% of a round (128 procedural environments, tiny model, CPU), so the loop stays sequential.

The turn's tool calls are parsed in the generator's `tool_format` ("qwen" unless it says otherwise; see
`ftrl_jax.text.templates`). In the "qwen" format the assistant message keeps the generated text verbatim as
its content (tool calls stay `<tool_call>` markup; no structured `tool_calls`); in other formats (Llama 3's
bare JSON) a turn whose calls are run becomes `{"content": text outside the calls, "tool_calls": [...]}`,
the shape Hugging Face templates render calls from. The Qwen2.5 template writes a verbatim message back byte
for byte, so
the next prompt extends the previous prompt plus the generated tokens, which whole-trajectory RL
(`episode_token_arrays`) relies on. The Qwen3 template rewrites history instead: it drops the think block
of earlier assistant turns, the empty one of non-thinking mode included, so whole-trajectory token arrays
need episodes played with the qwen2.5 template (per-step prompts from `rl_prompts_from_episode` work with
either).

Pure functions at the core (`rl_prompts_from_episode`, `episode_token_arrays`); the Python loop in
`play_episodes` exists because tool execution and the generator's host work must run there.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from ftrl_jax.envs.rewards import match_outputs, trajectory_metrics
from ftrl_jax.envs.samples import Sample, SampleError, decode_sample
from ftrl_jax.envs.sandbox import Sandbox, ToolRequest, shared_sandbox
from ftrl_jax.text.chat import tool_message
from ftrl_jax.text.tool_calls import TOOL_CALL_FORMATS, ToolCall, parse_assistant_turn

# Why an episode ended -> what it means (reports print these).
END_REASONS: dict[str, str] = {
    "no_tool_call": "the policy answered without calling a tool (or its only calls were malformed)",
    "max_turns": "the policy was still calling tools when the turn limit was reached",
    "prompt_too_long": "the conversation outgrew the generator's prompt budget",
    "truncated": "a turn ran out of new tokens before its end-of-turn token; its calls were not run",
}

Messages = list[dict[str, Any]]
Conversation = tuple[Messages, list[dict[str, Any]]]  # (messages, tool schemas)


# ---------------------------------------------------------------------------------------------
# The turn generator: anything that turns conversations into assistant turns.


@dataclasses.dataclass(frozen=True)
class GeneratedTurn:
    """One sampled assistant turn and the token ids the model saw and produced.

    `text` is the turn as generated, without its end-of-turn token (it becomes the assistant message
    content verbatim). `token_ids` end with the end-of-turn token unless `truncated`; `logprobs` are the
    sampler's, one per token. `prompt_too_long` marks a conversation the generator refused (then
    everything else is empty).
    """

    text: str
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    truncated: bool
    prompt_too_long: bool = False


class TurnGenerationError(RuntimeError):
    """A turn generator could not produce a turn for good (for example a remote request after its retries).

    `fatal` says that no request can succeed (wrong key, URL or model name), not just this one; evaluation
    records a non-fatal failure as a failed episode and stops on a fatal one.
    """

    fatal: bool = False


class TurnGenerator(Protocol):
    """Samples the next assistant turn of each conversation, in order (one batch per call)."""

    def __call__(self, conversations: Sequence[Conversation]) -> list[GeneratedTurn]: ...



# ---------------------------------------------------------------------------------------------
# Episodes.


@dataclasses.dataclass
class TurnRecord:
    """One assistant turn of an episode: what the model saw and produced, and what its calls did.

    `tool_calls` are the calls that were run (none for a truncated turn); `tool_outputs` their outputs in
    the same order; `unsolved_before` the expected answers still open when the turn began; `num_solved`
    how many of them the outputs matched; `parse_errors` what was wrong with malformed call markup.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    tool_calls: list[ToolCall]
    tool_outputs: list[str]
    unsolved_before: dict[str, list[str]]
    num_solved: int = 0
    parse_errors: tuple[str, ...] = ()
    truncated: bool = False


@dataclasses.dataclass
class Episode:
    """A played environment: the sample's messages plus the new ones, per-turn records, why it ended.

    `metrics` is `rewards.trajectory_metrics(messages, sample)` (solve precision / rate / F1 and counts;
    the calls of a truncated last turn were not run and do not count as calls made). `tool_format` is the
    format the turns were parsed in.
    """

    sample: Sample
    messages: Messages
    turns: list[TurnRecord]
    end_reason: str
    metrics: dict[str, float]
    unsolved_after: dict[str, list[str]]  # the expected answers no call of the episode matched
    tool_format: str = "qwen"


@dataclasses.dataclass
class _Playing:
    """An episode in progress."""

    sample: Sample
    messages: Messages
    unsolved: dict[str, list[str]]
    turns: list[TurnRecord] = dataclasses.field(default_factory=list)
    end_reason: str | None = None


def _begin_turn(play: _Playing, turn: GeneratedTurn, tool_format: str) -> list[ToolCall]:
    """Records a generated turn; returns the calls to run (none when the episode ends with this turn)."""
    if turn.prompt_too_long:
        play.end_reason = "prompt_too_long"
        return []
    parsed = parse_assistant_turn(turn.text, tool_format)
    calls = [] if turn.truncated else list(parsed.tool_calls)
    if tool_format == "qwen" or not calls:
        play.messages.append({"role": "assistant", "content": turn.text})
    else:
        play.messages.append({"role": "assistant", "content": parsed.content,
                              "tool_calls": [call.to_openai() for call in calls]})
    play.turns.append(TurnRecord(
        prompt_ids=list(turn.prompt_ids), token_ids=list(turn.token_ids), logprobs=list(turn.logprobs),
        text=turn.text, tool_calls=calls, tool_outputs=[], unsolved_before=copy.deepcopy(play.unsolved),
        parse_errors=parsed.errors, truncated=turn.truncated,
    ))
    if turn.truncated:
        play.end_reason = "truncated"
    elif not calls:
        play.end_reason = "no_tool_call"
    return calls


def _finish_turn(play: _Playing, outputs: Sequence[str], max_turns: int) -> None:
    """Appends the tool responses of the last turn and scores them against the open answers."""
    record = play.turns[-1]
    record.tool_outputs = list(outputs)
    for call, output in zip(record.tool_calls, outputs):
        play.messages.append(tool_message(call.name, output))
    record.num_solved, play.unsolved = match_outputs(
        zip((call.name for call in record.tool_calls), outputs), play.unsolved)
    if len(play.turns) >= max_turns:
        play.end_reason = "max_turns"


def _checked_samples(samples: Sequence[Sample | Mapping[str, Any]]) -> list[Sample]:
    checked = []
    for index, sample in enumerate(samples):
        try:
            checked.append(decode_sample(sample))
        except SampleError as exc:
            raise SampleError(f"samples[{index}]: {exc}") from None
        if not checked[-1].messages:
            raise SampleError(f"samples[{index}] has no messages; it needs at least the user question")
    return checked


def play_episodes(generator: TurnGenerator, samples: Sequence[Sample | Mapping[str, Any]], *, max_turns: int = 20,
                  sandbox: Sandbox | None = None, tool_format: str | None = None) -> list[Episode]:
    """Plays every sample to the end as one batch; returns one `Episode` per sample, in order.

    Each round, all active episodes go through one `generator` call and all their tool calls through
    one `sandbox.call_many` (default: the shared sandbox). An episode ends on a turn without a
    well-formed tool call, a truncated turn, a prompt the generator refused, or after `max_turns`
    turns (the calls of the last one are still run). Samples may be `Sample`s or FTRL rows. Calls are parsed
    in `tool_format` (None: the generator's `tool_format` attribute, else "qwen"; see
    `ftrl_jax.text.tool_calls.parse_assistant_turn`).

    Truncated turns, the same rule as RL's step reward (`rewards.step_rewards(..., truncated=...)`): a
    turn that hits the generator's token limit before its end-of-turn token has its calls neither run
    nor counted, even complete ones: it adds no call to the episode's Solve-P/R/F1 (trajectory_metrics
    counts only calls that got a response), and in RL it earns the no-call reward (-0.3 with call markup
    under FTRL's f1; `rewards.FORMAT_PENALTY_SCALE` scales it for the format-penalty kinds).
    """
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    fmt = tool_format if tool_format is not None else getattr(generator, "tool_format", "qwen")
    if fmt not in TOOL_CALL_FORMATS:
        raise ValueError(f"tool_format {fmt!r} is not a tool-call format; use one of {list(TOOL_CALL_FORMATS)}")
    box = sandbox if sandbox is not None else shared_sandbox()
    plays = [_Playing(sample, copy.deepcopy(sample.messages), copy.deepcopy(sample.unsolved_set))
             for sample in _checked_samples(samples)]
    active = list(plays)
    while active:
        turns = generator([(play.messages, play.sample.tools) for play in active])
        if len(turns) != len(active):
            raise RuntimeError(f"turn generator {type(generator).__name__} returned {len(turns)} turns for "
                               f"{len(active)} conversations; it must return one turn per conversation")
        calling = [(play, _begin_turn(play, turn, fmt)) for play, turn in zip(active, turns)]
        calling = [(play, calls) for play, calls in calling if calls]
        requests = [ToolRequest(play.sample.codes, call.name, call.arguments) for play, calls in calling
                    for call in calls]
        outputs = iter(box.call_many(requests)) if requests else iter(())
        for play, calls in calling:
            _finish_turn(play, [next(outputs) for _ in calls], max_turns)
        active = [play for play in active if play.end_reason is None]
    return [Episode(play.sample, play.messages, play.turns, play.end_reason or "",
                    trajectory_metrics(play.messages, play.sample), play.unsolved, fmt) for play in plays]


# ---------------------------------------------------------------------------------------------
# What RL trains on.


def _solve_rate(start_rate: float, expected_at_start: int, still_open: int) -> float:
    """Share of the sample's original answers solved, given its own solve_rate when the episode began.

    The unsolved share shrinks by the fraction of the episode's open answers that are still open, so
    states derived from an already reduced sample keep counting against the original set.
    """
    if expected_at_start == 0:
        return start_rate
    return 1.0 - (1.0 - start_rate) * still_open / expected_at_start


def _rl_states(sample: Sample, turns: Iterable[tuple[Sequence[Mapping[str, Any]], Sequence[str], Sequence[str]]],
               *, include_initial: bool) -> list[Sample]:
    """The RL prompts of `sample` after each tool-calling turn, given per turn as (the messages through its tool
    responses, its call names, their outputs): the `unsolved_set` reduced by the answers matched so far and the
    `solve_rate` that follows; other fields copied from `sample`. The fresh question first if `include_initial`."""
    states = [copy.deepcopy(sample)] if include_initial else []
    expected = sample.num_expected
    unsolved = sample.unsolved_set
    for messages, names, outputs in turns:
        _, unsolved = match_outputs(zip(names, outputs), unsolved)
        still_open = sum(len(answers) for answers in unsolved.values())
        states.append(copy.deepcopy(dataclasses.replace(
            sample, messages=list(messages), unsolved_set=unsolved,
            solve_rate=_solve_rate(sample.solve_rate, expected, still_open))))
    return states


def rl_prompts_from_episode(episode: Episode, *, include_initial: bool = True) -> list[Sample]:
    """FTRL's RL prompts from one episode: every state right after a turn whose tool calls were run.

    A state is the messages so far (through that turn's tool responses), the `unsolved_set` reduced by
    the answers already matched and its `solve_rate`; other fields are copied from the episode's sample.
    With `include_initial`, the sample itself (the fresh question) comes first.
    """
    def turns():
        end = len(episode.sample.messages)
        for turn in episode.turns:
            end += 1 + len(turn.tool_outputs)
            if turn.tool_calls:
                yield episode.messages[:end], [c.name for c in turn.tool_calls], turn.tool_outputs

    return _rl_states(episode.sample, turns(), include_initial=include_initial)


def rl_prompts_from_conversation(sample: Sample, conversation: Sequence[Mapping[str, Any]], *,
                                 include_initial: bool = True) -> list[Sample]:
    """RL prompts along a conversation given as messages, such as an environment's oracle play
    (`ftrl_jax.training.warmstart.oracle_conversations`): every state right after an assistant turn with
    structured `tool_calls` and its tool responses, as `rl_prompts_from_episode` makes them from a played
    episode (messages so far, the `unsolved_set` reduced by the answers the tool outputs matched, the
    `solve_rate`). The conversation must start with `sample.messages`; each such turn must be followed by one
    tool message per call. Only structured `tool_calls` count: calls written as text in an assistant message's
    content (how `play_episodes` records the "qwen" format) are not read, so pass such an episode to
    `rl_prompts_from_episode` instead. Raises ValueError naming the message that breaks this.
    """
    sample = decode_sample(sample)
    start = len(sample.messages)
    if list(conversation[:start]) != list(sample.messages):
        raise ValueError("the conversation does not start with the sample's messages; pass the conversation "
                         "played from this sample")

    def turns():
        index = start
        while index < len(conversation):
            message = conversation[index]
            calls = (message.get("tool_calls") or []) if message.get("role") == "assistant" else []
            index += 1
            if not calls:
                continue
            names = [call["function"]["name"] for call in calls]
            responses = list(conversation[index: index + len(names)])
            if len(responses) < len(names) or any(r.get("role") != "tool" for r in responses):
                raise ValueError(f"conversation[{index - 1}] makes {len(names)} tool calls but is not followed by "
                                 f"{len(names)} tool messages")
            index += len(names)
            yield conversation[:index], names, [r["content"] for r in responses]

    return _rl_states(sample, turns(), include_initial=include_initial)


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def episode_token_arrays(episode: Episode, tokenizer: Any, template: str = "qwen2.5"
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole trajectory as one sequence for multi-turn RL: (ids [T], loss_mask [T], old_logprobs [T]).

    Built from the recorded per-turn ids, not by re-tokenizing text, so the ids are what the model saw.
    Generated tokens have mask 1 and their sampler log-probs; prompt, tool-response and template tokens
    have mask 0 and log-prob 0. Every turn's prompt must extend the previous prompt plus its generated
    ids; when it does not (the chat `template` rewrote history, as Qwen3's does), ValueError says where,
    decoding the differing text with `tokenizer`.
    """
    if not episode.turns:
        raise ValueError("the episode has no generated turn (its first prompt was too long); there is nothing "
                         "to train on, so leave it out of the batch")
    ids: list[int] = []
    mask: list[int] = []
    logprobs: list[float] = []
    for number, turn in enumerate(episode.turns):
        if len(turn.token_ids) != len(turn.logprobs):
            raise ValueError(f"turn {number} has {len(turn.token_ids)} token ids but {len(turn.logprobs)} "
                             "log-probs; the generator must return one log-prob per generated token")
        if turn.prompt_ids[: len(ids)] != ids:
            at = _first_difference(turn.prompt_ids, ids)
            seen = tokenizer.decode(ids[at: at + 16], skip_special_tokens=False)
            now = tokenizer.decode(turn.prompt_ids[at: at + 16], skip_special_tokens=False)
            raise ValueError(
                f"the prompt of turn {number} does not extend turn {number - 1}'s prompt and generated ids: at "
                f"token {at} the model had seen {seen!r} but was now shown {now!r}. The {template!r} chat "
                "template rewrote history (Qwen3 drops earlier think blocks, even the empty one of non-thinking "
                "mode), or the generator re-tokenized generated text. Play episodes with the qwen2.5 template "
                "and LocalPolicy for whole-trajectory RL, or train on per-step prompts (rl_prompts_from_episode)"
            )
        context = turn.prompt_ids[len(ids):]
        ids += context + turn.token_ids
        mask += [0] * len(context) + [1] * len(turn.token_ids)
        logprobs += [0.0] * len(context) + list(turn.logprobs)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32), np.asarray(logprobs, np.float32)
