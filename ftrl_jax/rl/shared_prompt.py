"""Shared-prompt RL batches: n sampled turns of one prompt, with the prompt stored and run once.

In FTRL's step mode every RL prompt (a conversation state, tool documents included) gets n rollouts
of one short assistant turn, so a flat batch spends most of its tokens on n copies of each prompt,
in the old/reference log-prob passes and again in the update. Here each group keeps one copy:

  prompt_tokens, prompt_mask        [U, P]     left-padded prompts (one per group)
  response_tokens, response_mask    [U, n, R]  right-padded sampled turns, n per prompt
  response_loss_mask (optional)     [U, n, R]  1 on the response tokens the policy generated
  old_logprobs, ref_logprobs,       [U, n, R]  per response token (position j concerns
  advantages                                   response_tokens[..., j])

Whole-trajectory mode has the same structure: the n episodes of one environment start from the same
first prompt (system text, tool documents, question), which is most of an episode's tokens in the tiny
world. `trajectory_batch` stores that prefix once and the rest of each episode (policy turns, tool
responses, template text) as its response; `response_mask` is then 1 on every real response token (the
model attends to all of them) and `response_loss_mask` on the policy's own, the tokens the loss and the
advantages concern (`rl.update.response_mask`).

Every array leads with the group axis, so mini-batch and micro-batch splits and the batch sharding
keep groups whole. The model runs U*P + U*n*R tokens instead of U*n*(P + R)
(`models.shared_prompt_hidden_states`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftrl_jax import models
from ftrl_jax.training.logprobs import token_logprobs_and_entropy
from ftrl_jax.rollout.episodes import GeneratedTurn
from ftrl_jax.training.warmstart import length_bucket

SHARED_PROMPT_KEYS = ("prompt_tokens", "prompt_mask", "response_tokens", "response_mask")
RESPONSE_LOSS_MASK = "response_loss_mask"


def response_logprobs(config: models.ModelConfig, params, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                      response_tokens: jax.Array, response_mask: jax.Array, *, chunk_size: int = 128,
                      temperature: float = 1.0, remat: bool = False) -> tuple[jax.Array, jax.Array]:
    """`(logprobs, entropy)` [U, n, R]: position j scores `response_tokens[..., j]` given the group's prompt
    and the response before it; padding holds 0. The entropy is that of the distribution it was drawn from."""
    u, n, r = response_tokens.shape
    hidden_prompt, hidden_response = models.shared_prompt_hidden_states(
        config, params, prompt_tokens, prompt_mask, response_tokens.reshape(u * n, r),
        response_mask.reshape(u * n, r), remat=remat)
    # The prompt's last position (prompts are left-padded) predicts the first response token; response
    # position j predicts token j + 1.
    last_prompt = jnp.repeat(hidden_prompt[:, -1:], n, axis=0)
    predictors = jnp.concatenate([last_prompt, hidden_response[:, :-1]], axis=1)
    logprobs, entropy = token_logprobs_and_entropy(predictors, models.output_head(config, params),
                                                   response_tokens.reshape(u * n, r), chunk_size=chunk_size,
                                                   temperature=temperature)
    valid = response_mask.reshape(u * n, r).astype(jnp.float32)
    return (logprobs * valid).reshape(u, n, r), (entropy * valid).reshape(u, n, r)


def step_batch(turns: Sequence[GeneratedTurn], group_size: int, pad_id: int, multiple: int = 64,
               prompt_multiple: int | None = None) -> dict[str, np.ndarray]:
    """Sampled turns, group-major (`group_size` consecutive turns per prompt) -> the arrays above (less the
    log-probs and advantages). Each group's turns must share their prompt ids; response lengths are bucketed to
    multiples of `multiple`, prompt lengths to multiples of `prompt_multiple` (default `multiple`), so few shapes
    compile: every new (P, R) compiles the log-prob pass and the update again (about 10 s for `tiny` on a
    2-core CPU, several times a padded step's work)."""
    if not turns or len(turns) % group_size:
        raise ValueError(f"{len(turns)} turns do not split into groups of {group_size}")
    groups = [turns[i:i + group_size] for i in range(0, len(turns), group_size)]
    for g, group in enumerate(groups):
        if any(list(t.prompt_ids) != list(group[0].prompt_ids) for t in group):
            raise ValueError(f"group {g}: its turns were sampled from different prompts; a shared-prompt batch "
                             "needs the n turns of each prompt to be consecutive")
    p = length_bucket(max(len(group[0].prompt_ids) for group in groups), prompt_multiple or multiple)
    r = length_bucket(max(max(len(t.token_ids) for t in turns), 1), multiple)
    u = len(groups)
    out = {"prompt_tokens": np.full((u, p), pad_id, np.int32), "prompt_mask": np.zeros((u, p), np.int32),
           "response_tokens": np.full((u, group_size, r), pad_id, np.int32),
           "response_mask": np.zeros((u, group_size, r), np.int32)}
    for g, group in enumerate(groups):
        prompt = list(group[0].prompt_ids)
        out["prompt_tokens"][g, p - len(prompt):] = prompt
        out["prompt_mask"][g, p - len(prompt):] = 1
        for i, turn in enumerate(group):
            out["response_tokens"][g, i, :len(turn.token_ids)] = turn.token_ids
            out["response_mask"][g, i, :len(turn.token_ids)] = 1
    return out


def _shared_prefix_length(rows: Sequence[tuple[np.ndarray, np.ndarray]]) -> int:
    """The longest prefix the rows share that holds no loss token (no policy token)."""
    first = [np.asarray(ids) for ids, _ in rows]
    limit = min(int(np.argmax(mask)) if np.any(mask) else len(mask) for _, mask in rows)
    limit = min([limit] + [len(ids) for ids in first])
    differs = np.flatnonzero(np.any(np.stack([ids[:limit] for ids in first]) != first[0][:limit], axis=0))
    return int(differs[0]) if differs.size else limit


def trajectory_batch(rows: Sequence[tuple[np.ndarray, np.ndarray]], group_size: int, pad_id: int,
                     multiple: int = 64, prompt_multiple: int | None = None) -> dict[str, np.ndarray]:
    """Whole trajectories, group-major (`group_size` consecutive rows per environment), as `(ids [T], loss_mask
    [T])` rows (`rl.batch.trajectory_rows`) -> the shared-prompt arrays above with `response_loss_mask` (less the
    log-probs and advantages).

    Each group's prompt is the longest prefix its rows share before any row's first policy token (the episode's
    first prompt); the rest of each row is its response. The update is the flat layout's (`rl.batch.pad_rows`)
    for U*P + U*n*R tokens instead of B*T. Lengths are bucketed as in `step_batch`.

    Raises ValueError when the rows do not split into groups, when a row holds no policy token, or when a group
    shares no prefix (its first token differs, or a policy token comes first): then nothing predicts its first
    response token, so the rows belong in the flat layout (`rl.batch.pad_rows`).
    """
    if not rows or len(rows) % group_size:
        raise ValueError(f"{len(rows)} trajectories do not split into groups of {group_size}")
    for i, (ids, mask) in enumerate(rows):
        if len(ids) != len(mask):
            raise ValueError(f"trajectory {i}: {len(ids)} ids but {len(mask)} loss-mask entries")
        if not np.any(mask):
            raise ValueError(f"trajectory {i} holds no policy token; there is nothing to train on, leave it out")
    groups = [rows[i:i + group_size] for i in range(0, len(rows), group_size)]
    prefixes = [_shared_prefix_length(group) for group in groups]
    for g, length in enumerate(prefixes):
        if length == 0:
            raise ValueError(f"group {g}: its trajectories share no first prompt (they differ at token 0, or a "
                             "policy token comes first); build a flat batch (rl.batch.pad_rows) instead")
    p = length_bucket(max(prefixes), prompt_multiple or multiple)
    r = length_bucket(max(len(ids) - length for group, length in zip(groups, prefixes) for ids, _ in group), multiple)
    u = len(groups)
    out = {"prompt_tokens": np.full((u, p), pad_id, np.int32), "prompt_mask": np.zeros((u, p), np.int32),
           "response_tokens": np.full((u, group_size, r), pad_id, np.int32),
           "response_mask": np.zeros((u, group_size, r), np.int32),
           RESPONSE_LOSS_MASK: np.zeros((u, group_size, r), np.int32)}
    for g, (group, length) in enumerate(zip(groups, prefixes)):
        out["prompt_tokens"][g, p - length:] = np.asarray(group[0][0])[:length]
        out["prompt_mask"][g, p - length:] = 1
        for i, (ids, mask) in enumerate(group):
            rest = len(ids) - length
            out["response_tokens"][g, i, :rest] = np.asarray(ids)[length:]
            out["response_mask"][g, i, :rest] = 1
            out[RESPONSE_LOSS_MASK][g, i, :rest] = np.asarray(mask)[length:]
    return out
