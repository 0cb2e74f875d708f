"""Decoder-only transformer (Qwen2/Qwen2.5, Qwen3, Llama 3.x) in Flax Linen, used through pure functions.

Layers are stacked with `nn.scan`, so every per-layer parameter has a leading `[num_layers]` axis
(`layers/mlp/gate_proj/kernel` is `[L, D, F]`). This keeps compile time flat in depth and makes the
layer axis explicit for sharding and per-layer analysis. Cached decoding (`decode_step`) instead runs the
layers unrolled over per-layer copies of the weights (`split_layers`) and per-layer cache buffers: inside a
decode loop, slicing a layer out of a stack copies it at every step.

Parameter tree (names follow the Hugging Face modules they map to):
  embed_tokens/embedding [V, D]
  layers/input_layernorm/scale [L, D]          layers/post_attention_layernorm/scale [L, D]
  layers/self_attn/{q,k,v,o}_proj/kernel       [L, D, H*hd] / [L, D, K*hd] / [L, D, K*hd] / [L, H*hd, D]
  layers/self_attn/{q,k,v}_proj/bias           (Qwen2)     layers/self_attn/{q,k}_norm/scale [L, hd] (Qwen3)
  layers/mlp/{gate,up}_proj/kernel [L, D, F]    layers/mlp/down_proj/kernel [L, F, D]
  norm/scale [D]                                lm_head/kernel [D, V] (untied only)
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftrl_jax.models.attention import AttentionMask, dot_product_attention
from ftrl_jax.models.config import ModelConfig, dtype_from_name

Params = Any  # a nested dict of arrays


class KVCache(NamedTuple):
    """Static-shape key/value cache, one buffer per layer: `k[l]`, `v[l]` are [B, K, S, hd].

    Separate per-layer buffers (not one [L, ...] slab) let every decode step read and update each layer's
    cache in place; slicing a layer out of a stacked slab inside the decode loop copies it. Heads come before
    slots, so attention over the cache is a batched matmul with no transpose.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
    dtype = dtype or dtype_from_name(config.dtype)
    layers = range(config.num_layers)
    return KVCache(tuple(jnp.zeros(shape, dtype) for _ in layers), tuple(jnp.zeros(shape, dtype) for _ in layers))


# ---------------------------------------------------------------------------- RoPE

def _llama3_inv_freq(inv_freq: jax.Array, scaling: dict[str, Any]) -> jax.Array:
    """Llama 3.1 frequency scaling: low frequencies divided by `factor`, a smooth ramp in between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(is_medium, smoothed, scaled)


def rope_inv_freq(config: ModelConfig) -> jax.Array:
    exponents = jnp.arange(0, config.head_dim, 2, dtype=jnp.float32) / config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling_dict
    if scaling.get("rope_type") == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    return inv_freq


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, hd] for integer positions [B, T] (half-rotation layout, as in HF)."""
    angles = positions[..., None].astype(jnp.float32) * rope_inv_freq(config)  # [B, T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, heads, hd]; rotates pairs (i, i + hd/2)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x.astype(jnp.float32) * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------- modules

class RMSNorm(nn.Module):
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(jnp.float32) * x32).astype(x.dtype)


def _dot_accumulate_f32(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """Matmul that accumulates in float32 and returns the input dtype.

    With bfloat16 inputs this is both the accurate choice and, on CPUs with bf16 matrix units, the fast one:
    XLA:CPU runs bf16 x bf16 -> f32 ~3x faster than bf16 -> bf16 or f32 x f32.
    """
    del preferred_element_type
    (lhs_contract, rhs_contract), batch_dims = dimension_numbers
    if (lhs.ndim > 2 and rhs.ndim == 2 and batch_dims == ((), ()) and tuple(lhs_contract) == (lhs.ndim - 1,)
            and tuple(rhs_contract) == (0,)):
        # A projection of [..., D] rows: run it as one [N, D] x [D, F] matmul. The gradient of the kernel is
        # then a plain 2-D matmul too; with the rows left as [B, T, D], XLA:CPU contracts over two axes through
        # transposing copies that cost about as much as the whole backward pass besides.
        out = jax.lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())),
                                  precision=precision, preferred_element_type=jnp.float32)
        out = out.reshape(*lhs.shape[:-1], rhs.shape[-1])
    else:
        out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                  preferred_element_type=jnp.float32)
    return out.astype(jnp.result_type(lhs, rhs))


def _dense(config: ModelConfig, features: int, use_bias: bool, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dot_general=_dot_accumulate_f32,
        use_bias=use_bias,
        dtype=dtype_from_name(config.dtype),
        param_dtype=dtype_from_name(config.param_dtype),
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, prefix=None, prefix_mask=None):
        """x [B, T, D]. Returns (output [B, T, D], keys/values).

        `mask` is an `AttentionMask` or a bool array [B, T, S] (which key slots each new token may see).
        Without a cache, S = T and the keys/values returned are the new tokens' ([B, K, T, hd] each). With
        `cache` = this layer's (k, v) buffers [B, K, S, hd], the new keys/values are first written at slots
        `cache_index...`, then attention runs over the whole buffer; the updated buffers are returned.
        Writing before reading lets XLA update the buffers in place inside a decode loop (a read of the old
        buffer next to a write would force a copy of it at every step).

        `prefix` = (k, v) [U, K, P, hd] is a read-only prompt cache shared by groups of B/U consecutive rows
        (n samples of one prompt), visible where `prefix_mask` [U, P] is True; it comes before the cache.
        Attention itself is `attention.dot_product_attention` with `config.attention_impl`.
        """
        c = self.config
        b, t, _ = x.shape
        q = _dense(c, c.num_heads * c.head_dim, c.attention_bias, "q_proj")(x).reshape(b, t, c.num_heads, c.head_dim)
        k = _dense(c, c.num_kv_heads * c.head_dim, c.attention_bias, "k_proj")(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = _dense(c, c.num_kv_heads * c.head_dim, c.attention_bias, "v_proj")(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            pdt = dtype_from_name(c.param_dtype)
            q = RMSNorm(c.rms_norm_eps, pdt, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, pdt, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        q = q.transpose(0, 2, 1, 3)                                 # [B, H, T, hd]
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, hd]
        if cache is not None:
            start = (0, 0, jnp.asarray(cache_index, jnp.int32), 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)
        shared = None if prefix is None else (prefix[0], prefix[1], prefix_mask)
        out = dot_product_attention(q, k, v, mask, prefix=shared, impl=c.attention_impl,
                                    block_q=c.attention_block_size, block_k=c.attention_block_size,
                                    scale=1.0 / math.sqrt(c.head_dim))
        out = out.transpose(0, 2, 1, 3).reshape(b, t, c.num_heads * c.head_dim)
        return _dense(c, c.hidden_size, False, "o_proj")(out), (k, v)


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = _dense(c, c.intermediate_size, c.mlp_bias, "gate_proj")(x)
        up = _dense(c, c.intermediate_size, c.mlp_bias, "up_proj")(x)
        return _dense(c, c.hidden_size, c.mlp_bias, "down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: ModelConfig

    def setup(self):
        c = self.config
        pdt = dtype_from_name(c.param_dtype)
        self.input_layernorm = RMSNorm(c.rms_norm_eps, pdt)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.rms_norm_eps, pdt)
        self.mlp = MLP(c)

    def __call__(self, x, cache, cos, sin, mask, cache_index=None, prefix=None, prefix_mask=None):
        """One block; `cache`/`prefix` are this layer's (k, v) buffers or None (see `Attention`).
        Returns (x, (k, v))."""
        h, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index, prefix, prefix_mask)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), new_kv

    def shared_prompt(self, carry, prompt_rope, prompt_mask, response_rope, response_mask, prompt_valid):
        """The block over prompts [U, P, D] and their responses [U*n, R, D] (n per prompt, consecutive).

        The prompts attend among themselves; each response attends to its prompt's keys/values of this
        layer (computed once per prompt, not once per response) and causally to itself.
        """
        x_prompt, x_response = carry
        x_prompt, prompt_kv = self(x_prompt, None, *prompt_rope, prompt_mask)
        x_response, _ = self(x_response, None, *response_rope, response_mask, prefix=prompt_kv,
                             prefix_mask=prompt_valid)
        return (x_prompt, x_response), None


class Decoder(nn.Module):
    """Returns final hidden states (after the last norm) and every layer's new keys/values, stacked:
    ([B, T, D], (k, v) each [L, B, K, T, hd]). `mask`: an `AttentionMask` or a bool [B, T, T] array."""

    config: ModelConfig
    # Recompute each layer's activations in the backward pass (training memory vs. compute).
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, positions, mask):
        c = self.config
        pdt = dtype_from_name(c.param_dtype)
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=dtype_from_name(c.dtype), param_dtype=pdt,
                         embedding_init=nn.initializers.normal(0.02), name="embed_tokens")
        x = embed(input_ids)
        cos, sin = rope_tables(c, positions)
        stack = nn.scan(
            nn.remat(DecoderLayer, prevent_cse=False) if self.remat else DecoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_layers,
        )
        x, new_kv = stack(c, name="layers")(x, None, cos, sin, mask, None)
        return RMSNorm(c.rms_norm_eps, pdt, name="norm")(x), new_kv


class SharedPromptDecoder(nn.Module):
    """`Decoder` (same parameters) over prompts and n responses to each: the prompt is run once per group.

    Returns final hidden states of the prompts [U, P, D] and of the responses [U*n, R, D].
    """

    config: ModelConfig
    remat: bool = False

    @nn.compact
    def __call__(self, prompt_ids, prompt_positions, prompt_mask, prompt_valid, response_ids, response_positions,
                 response_mask):
        c = self.config
        pdt = dtype_from_name(c.param_dtype)
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=dtype_from_name(c.dtype), param_dtype=pdt,
                         embedding_init=nn.initializers.normal(0.02), name="embed_tokens")
        body = lambda layer, carry, *args: layer.shared_prompt(carry, *args)  # noqa: E731
        stack = nn.scan(
            nn.remat(body, prevent_cse=False) if self.remat else body,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,) * 5,
            length=c.num_layers,
        )
        (x_prompt, x_response), _ = stack(
            DecoderLayer(c, name="layers"), (embed(prompt_ids), embed(response_ids)),
            rope_tables(c, prompt_positions), prompt_mask, rope_tables(c, response_positions), response_mask,
            prompt_valid,
        )
        norm = RMSNorm(c.rms_norm_eps, pdt, name="norm")
        return norm(x_prompt), norm(x_response)


# ---------------------------------------------------------------------------- pure functions

def _decoder(config: ModelConfig, remat: bool = False) -> Decoder:
    return Decoder(config, remat=remat)


# Jitted once per config (static): a fresh jax.jit per call would recompile the initializer every time.
@functools.partial(jax.jit, static_argnums=0)
def _init_decoder_variables(config: ModelConfig, rng: jax.Array):
    ids = jnp.zeros((1, 1), jnp.int32)
    return _decoder(config).init(rng, ids, ids, jnp.ones((1, 1, 1), bool))


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Random parameters (normal(0.02) weights, unit norms, zero biases)."""
    params = dict(_init_decoder_variables(config, rng)["params"])
    if not config.tie_word_embeddings:
        head = nn.initializers.normal(0.02)(jax.random.fold_in(rng, 7), (config.hidden_size, config.vocab_size),
                                            dtype_from_name(config.param_dtype))
        params["lm_head"] = {"kernel": head}
    return params


def output_head(config: ModelConfig, params: Params) -> jax.Array:
    """The [D, V] output projection (the transposed embedding when tied)."""
    if config.tie_word_embeddings:
        return params["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids counting only real tokens (left or right padding alike)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, T] validity -> [B, T, T] causal attention mask over valid keys (T x T memory: the model itself uses
    `AttentionMask.causal_padding(attention_mask)`, the same mask without the array)."""
    t = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return causal[None] & attention_mask.astype(bool)[:, None, :]


def hidden_states(config: ModelConfig, params: Params, input_ids: jax.Array,
                  attention_mask: jax.Array | None = None, *, remat: bool = False) -> jax.Array:
    """Final hidden states [B, T, D] (after the last norm), without the output head."""
    if attention_mask is None:
        # No padding: cuDNN (where "auto" picks it) then needs no per-row lengths.
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        mask = AttentionMask.causal_padding()
    else:
        positions, mask = positions_from_mask(attention_mask), AttentionMask.causal_padding(attention_mask)
    decoder_params = {k: v for k, v in params.items() if k != "lm_head"}
    h, _ = _decoder(config, remat).apply({"params": decoder_params}, input_ids, positions, mask)
    return h


def shared_prompt_hidden_states(config: ModelConfig, params: Params, prompt_ids: jax.Array, prompt_mask: jax.Array,
                                response_ids: jax.Array, response_mask: jax.Array, *, remat: bool = False
                                ) -> tuple[jax.Array, jax.Array]:
    """Final hidden states of left-padded prompts [U, P] and of right-padded responses [U*n, R] that continue
    them (rows n per prompt, consecutive), running each prompt once for its whole group.

    Equal to `hidden_states` over each concatenated (prompt, response) row, at a cost of U*P + U*n*R tokens
    instead of U*n*(P + R): in group RL (n samples per prompt, long tool-laden prompts, short turns) most
    of the work. Returns ([U, P, D], [U*n, R, D]).
    """
    n = response_ids.shape[0] // prompt_ids.shape[0]
    prompt_valid = prompt_mask.astype(bool)
    prompt_lengths = jnp.sum(prompt_mask.astype(jnp.int32), axis=-1)
    response_positions = (jnp.repeat(prompt_lengths, n)[:, None]
                          + jnp.maximum(jnp.cumsum(response_mask.astype(jnp.int32), axis=-1) - 1, 0))
    decoder_params = {k: v for k, v in params.items() if k != "lm_head"}
    return SharedPromptDecoder(config, remat=remat).apply(
        {"params": decoder_params}, prompt_ids, positions_from_mask(prompt_mask),
        AttentionMask.causal_padding(prompt_valid), prompt_valid, response_ids, response_positions,
        AttentionMask.causal_padding(response_mask),
    )


def logits_from_hidden(config: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
    head = output_head(config, params).astype(hidden.dtype)
    return jnp.einsum("btd,dv->btv", hidden, head, preferred_element_type=jnp.float32)


def forward(config: ModelConfig, params: Params, input_ids: jax.Array,
            attention_mask: jax.Array | None = None) -> jax.Array:
    """Logits [B, T, V] in float32. Pure and jittable (`config` static)."""
    return logits_from_hidden(config, params, hidden_states(config, params, input_ids, attention_mask))


def prefill(config: ModelConfig, params: Params, input_ids: jax.Array, positions: jax.Array,
            mask: jax.Array | AttentionMask) -> tuple[jax.Array, KVCache]:
    """Runs prompts [B, T] with nothing cached yet; `mask` says which prompt tokens each may see: a bool
    [B, T, T] array, or (memory linear in T) a [B, T] validity of left-padded prompts, read as causal
    attention over the valid tokens, or an `AttentionMask`.

    Returns final hidden states [B, T, D] and the prompts' cache (T slots, compute dtype), to be passed to
    `decode_step` as its read-only `prefix`.
    """
    if not isinstance(mask, AttentionMask) and jnp.ndim(mask) == 2:
        mask = AttentionMask.causal_padding(mask)
    decoder_params = {k: v for k, v in params.items() if k != "lm_head"}
    hidden, (k, v) = _decoder(config).apply({"params": decoder_params}, input_ids, positions, mask)
    dtype = dtype_from_name(config.dtype)
    return hidden, KVCache(tuple(k[i].astype(dtype) for i in range(config.num_layers)),
                           tuple(v[i].astype(dtype) for i in range(config.num_layers)))


def attention_probabilities(config: ModelConfig, params: Params, input_ids: jax.Array,
                            query_positions: jax.Array | None = None) -> jax.Array:
    """Every layer's causal self-attention probabilities, float32, for unpadded sequences `input_ids` [B, T]
    (positions 0..T-1): [L, B, H, T, T], or [L, B, H, Q, T] for the query rows `query_positions` (int [Q]) only.
    Row t of a head is the softmax over key slots <= t (later slots hold 0).

    For analysis (which tokens a head reads from): the layers run one by one in the config's compute dtype, each
    head's queries and keys are captured after their projection (and Qwen3's q/k norms), rotated, and scored as
    `Attention` scores them (scale 1/sqrt(head_dim); a key head serves num_heads / num_kv_heads query heads).
    Jittable (`config` static). Memory grows with L * H * Q * T; pass `query_positions` for long sequences.
    """
    c = config
    input_ids = jnp.asarray(input_ids)
    b, t = input_ids.shape
    rows = jnp.arange(t) if query_positions is None else jnp.asarray(query_positions, jnp.int32)
    x = jnp.take(params["embed_tokens"]["embedding"].astype(dtype_from_name(c.dtype)), input_ids, axis=0)
    cos, sin = rope_tables(c, jnp.broadcast_to(jnp.arange(t), (b, t)))
    mask = AttentionMask.causal_padding()  # as `hidden_states` runs unpadded input
    visible = rows[:, None] >= jnp.arange(t)[None, :]  # [Q, T]
    probs = []
    for layer in split_layers(params):
        (x, _), state = DecoderLayer(c).apply({"params": layer}, x, None, cos, sin, mask,
                                              capture_intermediates=True, mutable=["intermediates"])
        captured = state["intermediates"]["self_attn"]
        if c.qk_norm:
            q, k = captured["q_norm"]["__call__"][0], captured["k_norm"]["__call__"][0]
        else:
            q = captured["q_proj"]["__call__"][0].reshape(b, t, c.num_heads, c.head_dim)
            k = captured["k_proj"]["__call__"][0].reshape(b, t, c.num_kv_heads, c.head_dim)
        q, k = apply_rope(q, cos, sin).astype(jnp.float32)[:, rows], apply_rope(k, cos, sin).astype(jnp.float32)
        k = jnp.repeat(k, c.num_heads // c.num_kv_heads, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(c.head_dim)
        probs.append(jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1))
    return jnp.stack(probs)


def split_layers(params: Params) -> tuple[Params, ...]:
    """The stacked `layers` subtree as one tree per layer (copies: do it once, outside a decode loop)."""
    num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
    return tuple(jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(num_layers))


def decode_step(config: ModelConfig, params: Params, layers: tuple[Params, ...], input_ids: jax.Array,
                positions: jax.Array, cache: KVCache, cache_index: jax.Array, mask: jax.Array | AttentionMask,
                prefix: KVCache | None = None, prefix_mask: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Feeds new tokens input_ids/positions [B, T] against the cache, layer by layer (unrolled).

    `layers` is `split_layers(params)`: separate per-layer weights, so nothing is sliced out of a stack at
    each step. The new tokens' keys/values are written at slots `cache_index...` of every layer's buffer, in
    place; then each new token sees the slots that `mask` allows (its own slot included; a bool [B, T, S] or
    an `AttentionMask`, e.g. `AttentionMask.causal_padding(key_valid, offset=cache_index)`), after
    the slots of its prompt's read-only `prefix` cache ([U, K, P, hd] per layer, from `prefill`; rows come
    in groups of B/U per prompt) that `prefix_mask` [U, P] allows. Returns final hidden states [B, T, D]
    and the updated cache.
    """
    c = config
    x = jnp.take(params["embed_tokens"]["embedding"].astype(dtype_from_name(c.dtype)), input_ids, axis=0)
    cos, sin = rope_tables(c, positions)
    new_k, new_v = [], []
    for i, (layer, k_cache, v_cache) in enumerate(zip(layers, cache.k, cache.v)):
        shared = None if prefix is None else (prefix.k[i], prefix.v[i])
        x, (k, v) = DecoderLayer(c).apply({"params": layer}, x, (k_cache, v_cache), cos, sin, mask, cache_index,
                                          shared, prefix_mask)
        new_k.append(k)
        new_v.append(v)
    x = RMSNorm(c.rms_norm_eps, dtype_from_name(c.param_dtype)).apply({"params": params["norm"]}, x)
    return x, KVCache(tuple(new_k), tuple(new_v))
