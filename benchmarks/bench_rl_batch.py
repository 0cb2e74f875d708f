"""Whole-trajectory RL batches: the flat layout against each environment's first prompt stored once.

In trajectory mode (`--config.rl.mode=trajectory`) every environment is played n times, and its n episodes
start from the same first prompt (system text, tool documents, question). The flat layout
(`rl.batch.pad_rows`) runs B = U x n rows of the whole episode, padded to the longest; the shared-prompt
layout (`rl.shared_prompt.trajectory_batch`, the main job's default) runs each first prompt once and the rest of
each episode (policy turns, tool responses) as its response: U x P + U x n x R tokens. Both give the same
update (`tests/rl/test_shared_prompt.py`).

The episodes here are synthetic, shaped like the tiny worlds' (the pool-8 world's first prompts average 316
tokens, 242-470; an episode of the shipped policy averages 3.5 turns of about 33 policy tokens): a first prompt
of `--prompt_len` tokens per environment, then `--turns` policy turns of `--turn_len` tokens, each followed by a
tool response of `--tool_len` tokens; each episode's number of turns is drawn uniformly from 1 to `--turns`.
Both layouts run in this process on the same rows: the old-log-prob pass (the reference pass costs the same)
and the jitted update (GRPO's clipped loss with KL, each call from the same starting state), each compiled
first, then timed `--steps` times, the two layouts' calls interleaved in alternating order so that a change in
machine load hits both; the medians are reported.

    python -m benchmarks.bench_rl_batch [--groups=16] [--group_size=8] [--prompt_len=320] [--turns=6]
        [--turn_len=32] [--tool_len=44] [--steps=3]
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import cli

from ftrl_jax import models, parallel
from ftrl_jax.pipeline.main_job import TrainingError, parse_overrides
from ftrl_jax.rl import batch as rl_batch
from ftrl_jax.rl.losses import LossConfig
from ftrl_jax.rl.shared_prompt import RESPONSE_LOSS_MASK, SHARED_PROMPT_KEYS, trajectory_batch
from ftrl_jax.rl.update import make_logprob_fn, make_rl_step, make_shared_prompt_logprob_fn, response_mask
from ftrl_jax.training.optim import make_optimizer
from ftrl_jax.training.train_state import create_train_state, shard_state


def synthetic_trajectories(args: flags.FlagValues, vocab_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Group-major (ids, loss_mask) rows: `groups` first prompts, `group_size` episodes each."""
    rng = np.random.default_rng(args.seed)
    rows = []
    for _ in range(args.groups):
        prompt = rng.integers(1, vocab_size, size=args.prompt_len)
        for _ in range(args.group_size):
            ids, mask = [prompt], [np.zeros(args.prompt_len, np.int32)]
            for _ in range(int(rng.integers(1, args.turns + 1))):
                ids += [rng.integers(1, vocab_size, size=args.turn_len),
                        rng.integers(1, vocab_size, size=args.tool_len)]
                mask += [np.ones(args.turn_len, np.int32), np.zeros(args.tool_len, np.int32)]
            rows.append((np.concatenate(ids).astype(np.int32), np.concatenate(mask)))
    return rows


def prepare_layout(layout: str, rows, config: models.ModelConfig, mesh, args: flags.FlagValues) -> dict:
    """Builds one layout's batch, compiles its old-log-prob pass and update (one call each, timed together as
    `compile_s`), and returns them with the batch's sizes."""
    if layout == "flat":
        arrays = rl_batch.pad_rows(rows, pad_id=0)
        fn = make_logprob_fn(config, mesh, chunk_size=args.chunk_size)
        logprobs = lambda p, b: fn(p, b["tokens"], b["attention_mask"])  # noqa: E731
        tokens, policy_tokens = arrays["tokens"].size, int(arrays["loss_mask"].sum())
    else:
        arrays = trajectory_batch(rows, args.group_size, pad_id=0, prompt_multiple=256)
        fn = make_shared_prompt_logprob_fn(config, mesh, chunk_size=args.chunk_size)
        logprobs = lambda p, b: fn(p, *(b[k] for k in SHARED_PROMPT_KEYS))  # noqa: E731
        tokens = arrays["prompt_tokens"].size + arrays["response_tokens"].size
        policy_tokens = int(arrays[RESPONSE_LOSS_MASK].sum())
    optimizer = make_optimizer(2e-4)
    params = jax.jit(models.init_params, static_argnums=0)(config, jax.random.PRNGKey(0))
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    start = time.perf_counter()
    old = jax.block_until_ready(logprobs(params, batch))
    mask = response_mask(batch)
    advantages = jnp.asarray(np.random.default_rng(1).normal(size=(len(rows), 1)), jnp.float32)
    per_token = jnp.broadcast_to(advantages, (len(rows), mask.size // len(rows))).reshape(mask.shape)
    batch.update(old_logprobs=old, ref_logprobs=old, advantages=per_token * mask)
    step = make_rl_step(config, optimizer, mesh, LossConfig(kl_coef=0.01), chunk_size=args.chunk_size, remat=False)
    # Every update starts from a fresh copy of the same state (the step donates its input), so each timed call
    # does the same work; the copy is made outside the timed call.
    fresh = lambda: shard_state(create_train_state(jax.tree.map(jnp.copy, params), optimizer), mesh)  # noqa: E731
    _, metrics = jax.block_until_ready(step(fresh(), batch))
    return {"layout": layout, "tokens": tokens, "policy_tokens": policy_tokens,
            "shape": {k: v.shape for k, v in arrays.items() if k in ("tokens", "prompt_tokens", "response_tokens")},
            "compile_s": time.perf_counter() - start, "loss": float(metrics["loss"]),
            # (prepare, run) per timed part: `run(prepare())` is timed, `prepare()` is not.
            "logprob": (lambda: params, lambda p: logprobs(p, batch)), "update": (fresh, lambda s: step(s, batch))}


def _seconds(prepare, run) -> float:
    """Seconds of one `run(prepare())`, the preparation not counted."""
    arg = jax.block_until_ready(prepare())
    start = time.perf_counter()
    jax.block_until_ready(run(arg))
    return time.perf_counter() - start


def define_flags(fv: flags.FlagValues) -> None:
    from ftrl_jax.models.config import PRESETS

    flags.DEFINE_enum("preset", "tiny", list(PRESETS), "Model preset.", flag_values=fv)
    flags.DEFINE_string("overrides", "num_kv_heads=4", "Integer ModelConfig fields replaced on the preset (the main "
                        "job's config.model.overrides for tiny).", flag_values=fv)
    flags.DEFINE_integer("groups", 16, "Environments per step (rl.prompts_per_step).", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("group_size", 8, "Episodes per environment (rl.num_rollouts).", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("prompt_len", 320, "Tokens of each environment's first prompt.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("turns", 6, "Most policy turns per episode (rollout.max_turns).", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("turn_len", 32, "Tokens per policy turn.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("tool_len", 44, "Tokens per tool response (and template text).", lower_bound=0,
                         flag_values=fv)
    flags.DEFINE_integer("steps", 3, "Timed calls per pass and layout (the median is reported).", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("chunk_size", 128, "Sequence chunk of the log-prob computation.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the synthetic episodes.", flag_values=fv)


def main(argv: Sequence[str]) -> int:
    try:
        args = cli.parse(argv, define_flags, __doc__)
    except cli.UsageError as exc:
        return cli.fail(exc)
    try:
        overrides = parse_overrides(args.overrides)
        not_int = [k for k, v in overrides.items() if type(v) is not int]
        if not_int:
            raise ValueError(f"{', '.join(not_int)} not an integer")
        config = models.preset(args.preset, **overrides)
    except (TrainingError, ValueError, TypeError) as exc:
        return cli.fail(cli.UsageError(f"--overrides={args.overrides}: {exc} (integer ModelConfig fields, e.g. "
                                       "num_kv_heads=4,num_layers=2)"))
    rows = synthetic_trajectories(args, config.vocab_size)
    lengths = [len(ids) for ids, _ in rows]
    print(f"{args.preset} ({config.num_params / 1e6:.2f}M parameters); {args.groups} environments x "
          f"{args.group_size} episodes; episode length {min(lengths)}-{max(lengths)} tokens (mean "
          f"{np.mean(lengths):.0f}, first prompt {args.prompt_len}); median of {args.steps} calls per layout after "
          "compiling, interleaved\n")
    print("| layout | arrays | tokens run (padded) | policy tokens | old log-prob pass (s) | update (s) "
          "| pass + update (s) | speed-up | compile + first calls (s) | loss |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    mesh = parallel.make_mesh(data=1)
    layouts = [prepare_layout(layout, rows, config, mesh, args) for layout in ("flat", "shared")]
    times = {r["layout"]: {"logprob": [], "update": []} for r in layouts}
    for call in range(args.steps):  # interleaved, the order alternating, so a change in load hits both layouts
        for r in (layouts if call % 2 == 0 else layouts[::-1]):
            for part in ("logprob", "update"):
                times[r["layout"]][part].append(_seconds(*r[part]))
    base = None
    for r in layouts:
        lp, up = (float(np.median(times[r["layout"]][part])) for part in ("logprob", "update"))
        base = base or lp + up
        shapes = ", ".join(f"{k} {list(v)}" for k, v in r["shape"].items())
        print(f"| {r['layout']} | {shapes} | {r['tokens']:,} | {r['policy_tokens']:,} | {lp:.2f} | {up:.2f} "
              f"| {lp + up:.2f} | {base / (lp + up):.2f}x | {r['compile_s']:.1f} | {r['loss']:.5f} |", flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
