"""Where RL's signal can raise greedy decoding: per state, the greedy turn's reward against k sampled turns'.

    python -m analysis.headroom --model=DIR --data=FILE.jsonl [--states=initial|oracle] [--num=256]
        [--temperature=0.7] [--num_samples=16] [--output=OUT.json]

RL with a sampled, verifiable reward raises the probability of the sampled turns that score above their
group, while the main job's evaluation decodes greedily. On a state whose greedy turn already succeeds, the
successful samples mostly push toward what greedy writes anyway; the states where greedy fails and some sample
succeeds are where a positive advantage pushes toward a different greedy turn (updates are shared, so any state's
greedy turn can still change, for better or worse). This measures how much of the sampled success lands there.
For each state of the first `--num` environments of a sample-format file (`--states=initial`: each
environment's question; `oracle`: every state along its oracle plan, as `rl.prompt_source=oracle` makes RL
prompts), one greedy turn and `--num_samples` turns at `--temperature` are generated with the main job's sampler
(prompts of at most `--max_prompt_tokens`, the main job's default; a state with a longer prompt is left out and
counted) and scored with RL's step reward (FTRL's semantics, kind `--reward_kind`); a turn succeeds when its
reward is at least `--success_threshold` (with the default f1 kind and threshold 1: every call solves an answer
and every expected answer of the state is solved, e.g. two calls solving one of two answers score 0.667, a
failure). Per scenario type and over all states (fractions in [0, 1], rewards in the reward's units):

    greedy_success           share of states whose greedy turn succeeds
    best_of_k                share of states with at least one successful sample
    flippable                share of states where greedy fails and at least one sample succeeds
    sampled_success_greedy_succeeds / _greedy_fails
                             success rate of the samples on the states where greedy succeeds / fails
                             (None when there are no such states)
    successes_where_greedy_fails
                             share of all successful samples that are on states where greedy fails: the part of
                             RL's positive signal that could change a greedy turn (None without successes)
    greedy_reward, sampled_reward   mean step reward of the greedy turns, of the samples
    groups_mixed, positive_advantage_on_failures
                             the k samples of a state taken as one GRPO group (`ftrl_jax.rl.group_signal` with
                             `scale_by_std=True`): share of states whose samples' rewards differ, and the share of
                             the positive advantages that lands on samples scoring at most zero (no call and no
                             answer, or a format penalty), pushed up only because a group-mate scored below them

It also counts the string argument values of the greedy turns' calls that occur nowhere in their prompt (question,
tool results and tool schemas) and names the most frequent ones: on first turns, a name the policy wrote from
memory instead of copying it (`values_not_in_prompt`), and in how many failing and successful greedy turns such a
value stands. The output file adds the greedy turns' texts.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from experiments import cli
from ftrl_jax.envs.build import string_values
from ftrl_jax.envs.rewards import REWARD_KINDS
from ftrl_jax.rl.advantages import group_signal

STATES = ("initial", "oracle")


def _rate(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def figures(greedy: np.ndarray, sampled: np.ndarray, threshold: float = 1.0) -> dict[str, Any]:
    """The module docstring's figures for `greedy` rewards `[S]` and `sampled` rewards `[S, k]` (float, any
    reward units); a turn succeeds when its reward >= `threshold`. Raises ValueError on mismatched shapes or an
    empty set."""
    greedy = np.asarray(greedy, np.float64)
    sampled = np.asarray(sampled, np.float64)
    if greedy.ndim != 1 or sampled.ndim != 2 or sampled.shape[0] != greedy.shape[0] or not greedy.size \
            or not sampled.shape[1]:
        raise ValueError(f"need greedy [S] and sampled [S, k] rewards with S, k >= 1; got shapes {greedy.shape} "
                         f"and {sampled.shape}")
    wins = greedy >= threshold
    hits = sampled >= threshold
    total_hits = int(hits.sum())
    return {
        "states": int(greedy.size), "num_samples": int(sampled.shape[1]),
        "greedy_success": float(wins.mean()),
        "best_of_k": float(hits.any(axis=1).mean()),
        "flippable": float((~wins & hits.any(axis=1)).mean()),
        "sampled_success_greedy_succeeds": _rate(hits[wins]),
        "sampled_success_greedy_fails": _rate(hits[~wins]),
        "successes_where_greedy_fails": float(hits[~wins].sum() / total_hits) if total_hits else None,
        "greedy_reward": float(greedy.mean()), "sampled_reward": float(sampled.mean()),
        **{key: value for key, value in group_signal(sampled.reshape(-1), sampled.shape[1], scale_by_std=True).items()
           if key != "reward_positive"},
    }


def figures_by_source(greedy: np.ndarray, sampled: np.ndarray, sources: Sequence[str],
                      threshold: float = 1.0) -> dict[str, dict[str, Any]]:
    """`figures` per data source (scenario type), sorted by name, and over all states as `"all"`."""
    sources = np.asarray(list(sources), dtype=object)
    if sources.shape != (len(greedy),):
        raise ValueError(f"need one source per state: {len(sources)} sources for {len(greedy)} states")
    out = {str(s): figures(np.asarray(greedy)[sources == s], np.asarray(sampled)[sources == s], threshold)
           for s in sorted(set(sources.tolist()))}
    out["all"] = figures(greedy, sampled, threshold)
    return out


def states_of(samples: Sequence[Any], kind: str, sandbox: Any) -> tuple[list[Any], list[int]]:
    """The RL prompt states of `samples` and the index of the sample each comes from: their questions
    (`initial`) or every state along their oracle plans (`oracle`; samples without a plan: ValueError)."""
    if kind == "initial":
        return list(samples), list(range(len(samples)))
    if kind != "oracle":
        raise ValueError(f"states must be one of {', '.join(STATES)}, got {kind!r}")
    from ftrl_jax.rollout.episodes import rl_prompts_from_conversation
    from ftrl_jax.training.warmstart import oracle_conversations

    missing = [i for i, s in enumerate(samples) if not s.oracle_calls]
    if missing:
        raise ValueError(f"--states=oracle needs samples with an oracle plan; {len(missing)} of {len(samples)} "
                         f"have none (the first: #{missing[0]}); use --states=initial")
    pairs = [(state, index) for index, (sample, conversation)
             in enumerate(zip(samples, oracle_conversations(samples, sandbox)))
             for state in rl_prompts_from_conversation(sample, conversation)]
    return [state for state, _ in pairs], [index for _, index in pairs]


def turn_rewards(policy: Any, states: Sequence[Any], repeats: int, sandbox: Any, *, reward_kind: str = "f1",
                 semantics: str = "ftrl") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """`[len(states), repeats]` float step rewards of `policy`'s turns from each state, scored as RL scores them
    (`pipeline.main_job.scored_turns`), `[len(states)]` bool: the policy refused a state's prompt as too long
    (its turns are empty; leave such states out), and the turns' texts, state-major."""
    from ftrl_jax.pipeline.main_job import scored_turns

    turns, scores = scored_turns(policy, states, repeats, sandbox, reward_kind=reward_kind, semantics=semantics)
    too_long = np.asarray([t.prompt_too_long for t in turns], bool).reshape(len(states), repeats)
    return (np.asarray(scores, np.float64).reshape(len(states), repeats), too_long.any(axis=1),
            [t.text for t in turns])


def _prompt_strings(value: Any) -> list[str]:
    # Every string of a message or schema, and the string leaves of those that are JSON text (tool results).
    out = []
    for text in string_values(value):
        out.append(text)
        if text.lstrip().startswith(("{", "[")):
            try:
                out.extend(string_values(json.loads(text)))
            except ValueError:
                pass
    return out


def values_not_in_prompt(text: str, messages: Sequence[dict[str, Any]], tools: Sequence[Any]) -> tuple[int, list[str]]:
    """The number of string argument values (nested ones included) in the tool calls of a generated turn `text`
    (Qwen format, the one FTRL's reward reads), and those of them that occur nowhere in the prompt: in no string
    of the messages (contents, earlier calls' arguments, and the decoded strings of JSON tool results) or of the
    tool schemas, compared as exact substrings of the decoded text (no JSON escaping). On a question's first turn
    every value a correct call needs stands in the question or the schemas, so a value from elsewhere is one the
    policy wrote from memory (an entity of another question, say) or invented (a field value no schema offers).
    Messages are dicts (`role`, `content`, optional `tool_calls`), tools JSON-like schemas."""
    from ftrl_jax.text.tool_calls import parse_qwen_turn

    haystack = "\n".join(_prompt_strings([[m.get("content"), m.get("tool_calls")] for m in messages])
                         + _prompt_strings(list(tools)))
    values = [v for call in parse_qwen_turn(text).tool_calls for v in string_values(call.arguments)]
    return len(values), [v for v in values if v not in haystack]


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("model", None, "Policy: a Hugging Face directory or a shipped policy's name "
                        "(tiny-instruct) (required).", required=True, flag_values=fv)
    flags.DEFINE_string("data", None, "Sample-format .jsonl/.parquet of environments (required), e.g. a run's "
                        "envs/eval.jsonl.", required=True, flag_values=fv)
    flags.DEFINE_enum("states", "initial", STATES, "initial: each environment's question; oracle: every state "
                      "along its oracle plan.", flag_values=fv)
    flags.DEFINE_integer("num", 256, "Use the first NUM environments.", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("temperature", 0.7, "Sampling temperature of the k samples.", lower_bound=0.0, flag_values=fv)
    flags.DEFINE_integer("num_samples", 16, "k: sampled turns per state.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
    flags.DEFINE_string("template", "qwen2.5", "Chat template the policy was trained with.", flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 96, "Token limit of a turn.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("max_prompt_tokens", 1024, "Longest prompt generated from (the main job's "
                         "rollout.max_prompt_tokens); states with longer prompts are left out.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_string("reward_kind", "f1", f"Step reward kind ({' | '.join(REWARD_KINDS)}).", flag_values=fv)
    flags.DEFINE_float("success_threshold", 1.0, "A turn succeeds when its reward is at least this.", flag_values=fv)
    flags.DEFINE_string("output", "", "Also write the figures and per-state rewards to this JSON file.",
                        flag_values=fv)


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: Sequence[str]) -> int:
    try:
        args = cli.parse(argv, define_flags, __doc__)
    except cli.UsageError as exc:
        return cli.fail(exc)
    from analysis.checkpoints import load_policy
    from ftrl_jax.envs.rewards import REWARD_KINDS
    from ftrl_jax.envs.samples import read_samples
    from ftrl_jax.envs.sandbox import Sandbox
    from ftrl_jax.rollout.policy import LocalPolicy

    if args.reward_kind not in REWARD_KINDS:
        return cli.fail(f"--reward_kind={args.reward_kind}: use one of {', '.join(sorted(REWARD_KINDS))}")
    problem = cli.output_file_problem(args.output)
    if problem:
        return cli.fail(problem)
    try:
        samples, errors = read_samples(args.data)
        model_config, params, tokenizer = load_policy(args.model)

        def policy(temperature: float) -> LocalPolicy:
            return LocalPolicy(model_config, params, tokenizer, template=args.template,
                               max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                               temperature=temperature, seed=args.seed)

        greedy_policy, sampler = policy(0.0), policy(args.temperature)
    except (OSError, ValueError) as exc:
        return cli.fail(exc)
    samples = samples[:args.num]
    if not samples:
        return cli.fail(f"{args.data} has no readable samples ({len(errors)} unreadable rows)")
    with Sandbox() as sandbox:
        try:
            states, env_index = states_of(samples, args.states, sandbox)
            greedy, too_long, greedy_texts = turn_rewards(greedy_policy, states, 1, sandbox,
                                                          reward_kind=args.reward_kind)
            kept = np.flatnonzero(~too_long)
            states, env_index, greedy = [states[i] for i in kept], [env_index[i] for i in kept], greedy[kept, 0]
            greedy_texts = [greedy_texts[i] for i in kept]
            if not states:
                return cli.fail(f"every prompt is longer than --max_prompt_tokens={args.max_prompt_tokens}")
            sampled, _, _ = turn_rewards(sampler, states, args.num_samples, sandbox, reward_kind=args.reward_kind)
        except ValueError as exc:
            return cli.fail(exc)
    sources = [s.data_source for s in states]
    table = figures_by_source(greedy, sampled, sources, args.success_threshold)
    print(f"{len(states)} {args.states} states of {len(samples)} environments of {args.data}; greedy against "
          f"{args.num_samples} samples at temperature {args.temperature:g}; success: reward >= "
          f"{args.success_threshold:g}")
    if too_long.any():
        print(f"{int(too_long.sum())} states left out: prompt longer than --max_prompt_tokens={args.max_prompt_tokens}")
    print("| scenario type | states | greedy success | best of k | flippable | sampled success where greedy "
          "succeeds / fails | successes where greedy fails | greedy / sampled reward | groups mixed | positive "
          "advantage on failures |\n|---|---|---|---|---|---|---|---|---|---|")
    for source, f in table.items():
        print(f"| {source} | {f['states']} | {f['greedy_success']:.3f} | {f['best_of_k']:.3f} | "
              f"{f['flippable']:.3f} | {_cell(f['sampled_success_greedy_succeeds'])} / "
              f"{_cell(f['sampled_success_greedy_fails'])} | {_cell(f['successes_where_greedy_fails'])} | "
              f"{f['greedy_reward']:.3f} / {f['sampled_reward']:.3f} | {f['groups_mixed']:.3f} | "
              f"{f['positive_advantage_on_failures']:.3f} |")
    counted = [values_not_in_prompt(text, state.messages, state.tools) for state, text in zip(states, greedy_texts)]
    num_values = sum(count for count, _ in counted)
    foreign = [value for _, elsewhere in counted for value in elsewhere]
    writes_foreign = np.asarray([bool(elsewhere) for _, elsewhere in counted], bool)
    wins = greedy >= args.success_threshold
    common = Counter(foreign).most_common(5)
    print(f"greedy calls' string argument values not in the prompt: {len(foreign)} of {num_values}, in "
          f"{int(writes_foreign[~wins].sum())} of {int((~wins).sum())} failing and {int(writes_foreign[wins].sum())} "
          f"of {int(wins.sum())} successful greedy turns"
          + (f"; most often: {', '.join(f'{v!r} x{n}' for v, n in common)}" if common else ""))
    if args.output:
        settings = {k: getattr(args, k) for k in ("model", "data", "states", "num", "temperature", "num_samples",
                                                  "seed", "template", "max_new_tokens", "max_prompt_tokens",
                                                  "reward_kind", "success_threshold")}
        with open(args.output, "w") as f:
            json.dump({**settings, "num_envs": len(samples), "states_too_long": int(too_long.sum()),
                       "figures": table, "data_source": sources, "env_index": env_index,
                       "greedy_rewards": greedy.tolist(), "sampled_rewards": sampled.tolist(),
                       "greedy_texts": greedy_texts, "greedy_values": num_values,
                       "greedy_values_not_in_prompt": foreign,
                       "greedy_writes_value_not_in_prompt": writes_foreign.tolist()}, f, indent=2)
    return 0


if __name__ == "__main__":
    cli.run(main)
