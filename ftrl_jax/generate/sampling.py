"""Batched autoregressive generation with a static-shape KV cache.

Prefill and decode are compiled separately. Prompts are left-padded to a power-of-two bucket and the
batch is padded to a power of two, so a run compiles only a handful of shapes. Identical prompts (the n
samples per prompt of group RL) are prefilled once and their cache is shared, read-only, by their rows;
generated tokens go to a small per-row cache. The decode loop is a `jax.lax.while_loop` that stops as
soon as every sequence has emitted a stop token; its state is donated so XLA updates it in place, and
it reads per-layer weights prepared once per call (or once per policy: `decode_weights`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftrl_jax.models.config import ModelConfig, dtype_from_name
from ftrl_jax.models.transformer import KVCache, Params, decode_step, init_cache, output_head, prefill, split_layers


@dataclasses.dataclass
class GenerationResult:
    """New tokens per prompt (ending with the stop token if one was produced) and their log-probs."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    # True where generation ended on a stop token rather than on `max_new_tokens`.
    stopped: list[bool]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static sampling settings (each distinct value compiles once)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()


# (per-layer weight trees, output head [D, V]), both in compute dtype: see `decode_weights`.
DecodeWeights = tuple[tuple[Params, ...], jax.Array]


class DecodeState(NamedTuple):
    prefix: KVCache           # the distinct prompts' cache, [U, K, P, hd] per layer, read-only
    prefix_valid: jax.Array   # [U, P] which prompt slots hold real tokens
    cache: KVCache            # the generated tokens' cache, [B, K, N, hd] per layer; rows n per prompt
    key_valid: jax.Array      # [B, N] which generated slots are filled
    next_pos: jax.Array       # [B] RoPE position of the next token
    last_token: jax.Array     # [B] token to feed at the next step
    done: jax.Array           # [B]
    step: jax.Array           # [] tokens emitted so far
    tokens: jax.Array         # [B, N]
    logprobs: jax.Array       # [B, N]
    rng: jax.Array


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def _select(logits: jax.Array, rng: jax.Array, sp: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """Picks next tokens from float32 logits [B, V]; returns (token, its log-prob under the sampled distribution)."""
    if sp.temperature <= 0.0:
        token = jnp.argmax(logits, axis=-1)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    scaled = logits / sp.temperature
    logp = jax.nn.log_softmax(scaled, axis=-1)
    candidates = scaled
    if sp.top_k > 0:
        # Everything below the k-th largest logit is excluded.
        kth = jax.lax.top_k(scaled, sp.top_k)[0][:, -1:]
        candidates = jnp.where(scaled < kth, -jnp.inf, candidates)
    if sp.top_p < 1.0:
        sorted_desc = jnp.sort(candidates, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < sp.top_p
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        candidates = jnp.where(candidates < threshold, -jnp.inf, candidates)
    token = jax.random.categorical(rng, candidates, axis=-1)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def _logits_at(head: jax.Array, hidden_bd: jax.Array) -> jax.Array:
    return jnp.einsum("bd,dv->bv", hidden_bd, head, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "sp", "group_size", "max_new_bucket"))
def _prefill(config: ModelConfig, params: Params, head: jax.Array, tokens: jax.Array, prompt_mask: jax.Array,
             row_active: jax.Array, rng: jax.Array, *, sp: SamplingParams, group_size: int, max_new_bucket: int) -> DecodeState:
    """Runs the distinct left-padded prompts [U, P] through the model once and samples the first new token
    of each of their `group_size` rows (B = U * group_size)."""
    u = tokens.shape[0]
    b = u * group_size
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
    prompt_valid = prompt_mask.astype(bool)
    # The [U, P] validity (causal over valid tokens), not a [U, P, P] mask: memory stays linear in P and
    # blockwise attention skips the blocks above the diagonal.
    hidden, prefix = prefill(config, params, tokens, positions, prompt_valid)
    rng, sub = jax.random.split(rng)
    logits = _logits_at(head, hidden[:, -1])
    token, logp = _select(jnp.repeat(logits, group_size, axis=0), sub, sp)
    stop = jnp.asarray(sp.stop_token_ids or (-1,), jnp.int32)
    done = jnp.isin(token, stop) | ~row_active
    out_tokens = jnp.zeros((b, max_new_bucket), jnp.int32).at[:, 0].set(token)
    out_logprobs = jnp.zeros((b, max_new_bucket), jnp.float32).at[:, 0].set(logp)
    return DecodeState(prefix, prompt_valid, init_cache(config, b, max_new_bucket),
                       jnp.zeros((b, max_new_bucket), bool), jnp.repeat(positions[:, -1] + 1, group_size),
                       token.astype(jnp.int32), done, jnp.int32(1), out_tokens, out_logprobs, rng)


@functools.partial(jax.jit, static_argnames=("config",))
def decode_weights(config: ModelConfig, params: Params) -> DecodeWeights:
    """Per-layer weights and the output head in compute dtype, made outside the decode loop, so the loop reads
    weights where they lie instead of slicing, transposing or casting them at every step. (Matmul weights
    only: the layers cast them to the compute dtype anyway; norm scales stay as they are.)

    This copies the weights: a caller that generates many times from the same params (a rollout policy)
    makes them once and passes them to `generate(weights=...)`."""
    dtype = dtype_from_name(config.dtype)

    def cast(path, leaf):
        return leaf.astype(dtype) if path[-1].key in ("kernel", "bias") else leaf

    layers = tuple(jax.tree_util.tree_map_with_path(cast, layer) for layer in split_layers(params))
    return layers, output_head(config, params).astype(dtype)


@functools.partial(jax.jit, static_argnames=("config", "sp"), donate_argnames=("state",))
def _decode(config: ModelConfig, params: Params, weights: DecodeWeights, state: DecodeState,
            max_new_tokens: jax.Array, *, sp: SamplingParams) -> DecodeState:
    """Feeds the last token and samples the next one until all rows are done or the budget is spent."""
    layers, head = weights
    stop = jnp.asarray(sp.stop_token_ids or (-1,), jnp.int32)

    def cond(s: DecodeState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        slot = s.step - 1  # slot of the token being fed in the generated-token cache
        # The fed token sees its prompt, the earlier generated tokens and itself.
        key_valid = s.key_valid.at[:, slot].set(True)
        hidden, cache = decode_step(config, params, layers, s.last_token[:, None], s.next_pos[:, None], s.cache,
                                    slot, key_valid[:, None, :], s.prefix, s.prefix_valid)
        rng, sub = jax.random.split(s.rng)
        token, logp = _select(_logits_at(head, hidden[:, 0]), sub, sp)
        token = jnp.where(s.done, 0, token).astype(jnp.int32)
        logp = jnp.where(s.done, 0.0, logp)
        return s._replace(
            cache=cache, key_valid=key_valid, next_pos=s.next_pos + 1, last_token=token,
            done=s.done | jnp.isin(token, stop), step=s.step + 1, tokens=s.tokens.at[:, s.step].set(token),
            logprobs=s.logprobs.at[:, s.step].set(logp), rng=rng,
        )

    return jax.lax.while_loop(cond, body, state)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0, *, min_len: int = 16, rows_multiple: int = 1
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pads to power-of-two length and batch (rounded up to a multiple of `rows_multiple`, e.g. the data
    shards); returns tokens [B, P], mask [B, P], active rows [B]."""
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    b = bucket(len(prompts), minimum=1)
    b = -(-b // rows_multiple) * rows_multiple
    p = bucket(max(len(x) for x in prompts), minimum=min_len)
    tokens = np.full((b, p), pad_id, np.int32)
    mask = np.zeros((b, p), np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, p - len(prompt):] = prompt
        mask[i, p - len(prompt):] = 1
    mask[len(prompts):, -1] = 1  # filler rows: one dummy token, marked inactive below
    active = np.arange(b) < len(prompts)
    return tokens, mask, active


def _batch_shards(data_sharding: Any) -> int:
    """How many pieces `data_sharding` cuts the batch (first) dimension into; 1 without a sharding."""
    if data_sharding is None:
        return 1
    rows = 1 << 16  # divisible by any realistic shard count
    starts = {index[0].start for index in data_sharding.devices_indices_map((rows,)).values()}
    return len(starts)


def generate(config: ModelConfig, params: Params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop_token_ids: Sequence[int] = (),
             rng: jax.Array | None = None, pad_id: int = 0, data_sharding: Any = None,
             weights: DecodeWeights | None = None) -> GenerationResult:
    """Generates up to `max_new_tokens` for each prompt (token-id lists of any lengths).

    `temperature=0` is greedy. `logprobs` are log-probabilities of the chosen tokens under the model's
    logits divided by the temperature (before top-k/top-p truncation), the quantity RL needs.
    `data_sharding`, if given, places the batch (e.g. `NamedSharding(mesh, P(('data', 'fsdp')))`).
    `weights` = `decode_weights(config, params)` made once by the caller; otherwise they are made here.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sp = SamplingParams(float(temperature), float(top_p), int(top_k), tuple(int(t) for t in stop_token_ids))
    if sp.temperature > 0 and rng is None:
        raise ValueError("sampling with temperature > 0 needs an `rng` key")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    # Identical prompts (n samples of one prompt, as in group RL) are prefilled and cached once; their rows
    # sit side by side, `group_size` per distinct prompt (unused rows are inactive fillers).
    distinct: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        distinct.setdefault(tuple(prompt), []).append(i)
    group_size = bucket(max(len(rows) for rows in distinct.values()), minimum=1)
    # A sharded batch needs as many distinct-prompt rows as there are batch shards, whatever few prompts came.
    shards = _batch_shards(data_sharding)
    tokens, mask, _ = pad_prompts(list(distinct), pad_id, rows_multiple=shards)
    row_of = np.zeros(len(prompts), np.int64)
    for u, rows in enumerate(distinct.values()):
        row_of[rows] = u * group_size + np.arange(len(rows))
    row_active = np.zeros(tokens.shape[0] * group_size, bool)
    row_active[row_of] = True
    batch = (tokens, mask, row_active)
    if data_sharding is not None:
        batch = jax.device_put(batch, data_sharding)
    weights = decode_weights(config, params) if weights is None else weights
    state = _prefill(config, params, weights[1], *batch, rng, sp=sp, group_size=group_size,
                     max_new_bucket=bucket(max_new_tokens))
    state = _decode(config, params, weights, state, jnp.int32(max_new_tokens), sp=sp)
    out_tokens, out_logprobs = jax.device_get((state.tokens, state.logprobs))
    stop = set(sp.stop_token_ids)
    result = GenerationResult([], [], [])
    for i in range(len(prompts)):
        r = row_of[i]
        row = out_tokens[r, :max_new_tokens].tolist()
        n = next((j + 1 for j, t in enumerate(row) if t in stop), len(row))
        result.tokens.append(row[:n])
        result.logprobs.append(out_logprobs[r, :n].tolist())
        result.stopped.append(row[n - 1] in stop)
    return result
