"""Multi-head attention for prefill, decode and training, with implementations chosen by name.

One function, `dot_product_attention`, serves every caller in `transformer.py`: a causal forward pass over
padded rows (training, `hidden_states`), a prefill, a decode step of one token over a static KV cache, and
responses that continue a read-only prompt cache shared by groups of rows (`prefix`). Implementations:

  "dense"      the plain computation: float32 scores [B, H, T, S], a softmax, a weighted sum. Memory grows
               with T x S, so it is for short sequences and for checking the others.
  "blockwise"  pure JAX, any backend: query blocks x key blocks with an online softmax, so no more than one
               [block_q, block_k] tile of scores per head exists at a time and memory grows linearly with
               length. Its gradient is written by hand (a `jax.custom_vjp`) and recomputes the tiles from
               q, k, v and the saved log-sum-exp, so training memory is linear too. Causal masks skip the
               key blocks above the diagonal in both passes. When T x S is at most one tile (decoding,
               short prompts) it runs the dense computation.
  "cudnn"      `jax.nn.dot_product_attention(implementation="cudnn")` on GPU, for the one mask form it
               expresses here: causal self-attention over right-padded (or unpadded) rows in bf16/fp16.
               Everything else (left padding, caches, prefixes, float32, CPU/TPU) goes to "blockwise".
  "auto"       "cudnn" on GPU (so, in effect, cuDNN where it applies and "blockwise" elsewhere),
               "blockwise" on every other backend.

The online (running max / running sum) softmax is that of Milakov & Gimelshein, "Online normalizer
calculation for softmax" (2018, arXiv:1805.02867); its use for tiled attention with a recomputing
backward pass follows FlashAttention (Dao, Fu, Ermon, Rudra & Ré, NeurIPS 2022, arXiv:2205.14135) and
FlashAttention-2 (Dao, 2023, arXiv:2307.08691).

Masks. A query sees a key slot where every given condition holds (`AttentionMask`): the key is valid
(`key_valid` [U, S], e.g. not padding), it is not in the query's future (`causal`: query i sits at slot
`offset + i`), and an explicit `dense` [B, T, S] mask allows it. Only `dense` costs T x S memory; a plain
bool [B, T, S] array (the convention `transformer.py` has always accepted) is taken as `dense`, and since it
is not known to be causal, no blocks are skipped for it (about twice the work of `causal=True`). A query
that sees no key at all (a left-padding position) gets a zero output and zero gradients, in every
implementation.

Layouts: heads before positions, like the KV cache: q [B, H, T, hd], k and v [U, K, S, hd] with H a
multiple of K (grouped-query attention, never materialising the repeated K/V) and B a multiple of U (U < B:
a key/value row shared by B/U consecutive query rows, as a prompt cache is by its n samples).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "dense", "blockwise", "cudnn")
DEFAULT_BLOCK_SIZE = 512

# The fill for masked scores in the dense softmax (finite: no inf - inf in a row that sees nothing).
_MASKED = float(jnp.finfo(jnp.float32).min)


@functools.partial(jax.tree_util.register_dataclass, data_fields=("key_valid", "dense", "offset"),
                   meta_fields=("causal",))
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which key slots each query may see, as the AND of the parts that are set; nothing set: all of them.

    key_valid: bool [U, S], U = the keys' batch: key slot j of row u holds a real token.
    dense:     bool [B, T, S]: an explicit per-query mask (memory T x S; avoid for long sequences).
    causal:    static bool: query i (at key slot `offset + i`) sees key slots j <= offset + i only.
    offset:    int32 [] (traced or not) or None (= 0): the key slot of the first query, e.g. the cache
               index where a prefill continuing a cache, or a decode step, writes its keys.
    """

    key_valid: jax.Array | None = None
    dense: jax.Array | None = None
    causal: bool = False
    offset: jax.Array | None = None

    @classmethod
    def causal_padding(cls, key_valid: jax.Array | None = None, offset: Any = None) -> "AttentionMask":
        """Causal attention over the valid keys: key_valid bool/int [B, S] (None: all valid)."""
        return cls(key_valid=None if key_valid is None else jnp.asarray(key_valid).astype(bool), causal=True,
                   offset=None if offset is None else jnp.asarray(offset, jnp.int32))

    @classmethod
    def padding(cls, key_valid: jax.Array) -> "AttentionMask":
        """Every query sees the valid keys: key_valid bool/int [U, S]."""
        return cls(key_valid=jnp.asarray(key_valid).astype(bool))


def as_mask(mask: AttentionMask | jax.Array | None) -> AttentionMask:
    """An `AttentionMask` from itself, from a bool [B, T, S] array (`dense`) or from None (see everything)."""
    if mask is None:
        return AttentionMask()
    if isinstance(mask, AttentionMask):
        return mask
    mask = jnp.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"an attention mask array must be [batch, queries, keys]; got shape {mask.shape}")
    return AttentionMask(dense=mask.astype(bool))


def _visible(mask: AttentionMask, u: int, n: int, row0, rows: int, col0, cols: int, num_keys: int) -> jax.Array:
    """bool, broadcastable to [u, n, 1, 1, rows, cols]: whether query row0 + r (of row group (u, n)) sees key
    slot col0 + c. Slots at or beyond `num_keys` are block padding and never seen."""
    r = row0 + jnp.arange(rows)
    c = col0 + jnp.arange(cols)
    vis = jnp.broadcast_to((c < num_keys)[None, :], (1, cols))
    if mask.causal:
        offset = 0 if mask.offset is None else mask.offset
        vis = vis & (c[None, :] <= r[:, None] + offset)
    vis = vis[None, None, None, None]
    if mask.key_valid is not None:
        valid = jax.lax.dynamic_slice_in_dim(mask.key_valid, col0, cols, axis=1).astype(bool)
        vis = vis & valid.reshape(u, 1, 1, 1, 1, cols)
    if mask.dense is not None:
        dense = jax.lax.dynamic_slice(mask.dense, (0, row0, col0), (u * n, rows, cols)).astype(bool)
        vis = vis & dense.reshape(u, n, 1, 1, rows, cols)
    return vis


Segment = tuple[jax.Array, jax.Array, AttentionMask]  # (k [U, K, S, hd], v [U, K, S, hd], mask)


# Matmuls run on [U, K, rows, ...] with rows = (n, G, queries): the queries of all G heads of a key/value head
# and of all n query rows that share a key/value row side by side, so each is one plain batched matmul
# (and bf16 x bf16 -> f32 dots stay in the forms XLA:CPU implements).

def _to_groups(x: jax.Array, u: int) -> jax.Array:
    """[B, K, G, Q, ...] -> [u, K, n*G*Q, ...] (n = B/u consecutive rows per group)."""
    b, kv, g, q = x.shape[:4]
    rest = x.shape[4:]
    return x.reshape(u, b // u, kv, g, q, *rest).swapaxes(1, 2).reshape(u, kv, (b // u) * g * q, *rest)


def _from_groups(x: jax.Array, b: int, g: int) -> jax.Array:
    """Inverse of `_to_groups`: [u, K, n*G*Q, ...] -> [B, K, G, Q, ...]."""
    u, kv, r = x.shape[:3]
    rest = x.shape[3:]
    n = b // u
    return x.reshape(u, kv, n, g, r // (n * g), *rest).swapaxes(1, 2).reshape(b, kv, g, r // (n * g), *rest)


def _mask_scores(s: jax.Array, vis: jax.Array, n: int, g: int, fill: float) -> jax.Array:
    """s [u, K, n*G*Q, C] float32; vis from `_visible` ([u, n, 1, 1, Q, C]-broadcastable): fill where False."""
    u, kv, r, c = s.shape
    s = s.reshape(u, kv, n, g, r // (n * g), c)
    return jnp.where(jnp.swapaxes(vis, 1, 2), s, fill).reshape(u, kv, r, c)


# ---------------------------------------------------------------------------- dense

def dense_attention(q: jax.Array, segments: Sequence[Segment], scale: float) -> jax.Array:
    """The direct computation. q [B, H, T, hd]; each segment's keys/values [U, K, S, hd] are attended together
    (one softmax over all their slots). Scores are float32; probabilities are cast to q's dtype before the
    weighted sum, as the model has always done. Returns [B, H, T, hd] in q.dtype."""
    b, h, t, hd = q.shape
    kv = segments[0][0].shape[1]
    g = h // kv
    q5 = q.reshape(b, kv, g, t, hd)
    scores, seen = [], jnp.zeros((b, 1, 1, t), bool)
    for k, _, mask in segments:
        u, _, s, _ = k.shape
        n = b // u
        logits = jnp.einsum("ukrd,uksd->ukrs", _to_groups(q5, u), k.astype(q.dtype),
                            preferred_element_type=jnp.float32) * scale
        vis = _visible(mask, u, n, 0, t, 0, s, s)
        scores.append(_from_groups(_mask_scores(logits, vis, n, g, _MASKED), b, g))
        seen = seen | jnp.broadcast_to(jnp.any(vis, axis=-1), (u, n, 1, 1, t)).reshape(b, 1, 1, t)
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1) if len(scores) > 1 else scores[0], axis=-1)
    # A row that sees nothing would otherwise average all values; give it zero, as the tiled version does.
    probs = jnp.where(seen[..., None], probs, 0.0).astype(q.dtype)
    out, start = None, 0
    for k, v, _ in segments:
        u, _, s, _ = k.shape
        part = jnp.einsum("ukrs,uksd->ukrd", _to_groups(probs[..., start:start + s], u), v.astype(probs.dtype))
        part = _from_groups(part, b, g)
        out = part if out is None else out + part
        start += s
    return out.reshape(b, h, t, hd)


# ---------------------------------------------------------------------------- blockwise

# Static description of a tiled call: (scale, block_q, num_q_blocks, ((block_k, num_k_blocks, num_keys), ...)).
_Tiling = tuple[float, int, int, tuple[tuple[int, int, int], ...]]


def _key_blocks_end(mask: AttentionMask, row0, block_q: int, block_k: int, num_blocks: int):
    """One past the last key block that queries row0 ... row0 + block_q - 1 can see."""
    if not mask.causal:
        return num_blocks
    offset = 0 if mask.offset is None else mask.offset
    return jnp.clip((row0 + block_q - 1 + offset) // block_k + 1, 0, num_blocks)


def _query_blocks_start(mask: AttentionMask, col0, block_q: int, num_blocks: int):
    """The first query block with a query that can see key slot col0 (or a later one)."""
    if not mask.causal:
        return 0
    offset = 0 if mask.offset is None else mask.offset
    return jnp.clip((col0 - offset) // block_q, 0, num_blocks)


def _tiled_forward(tiling: _Tiling, q: jax.Array, segments: Sequence[Segment]) -> tuple[jax.Array, jax.Array]:
    """q [B, K, G, Tp, hd] (Tp a multiple of block_q), segments' k/v [U, K, Sp, hd] (Sp a multiple of their
    block_k). Returns (out [B, K, G, Tp, hd] in q.dtype, log-sum-exp [B, K, G, Tp] float32, -inf where a
    query sees nothing)."""
    scale, bq, nq, seg_tiling = tiling
    b, kv, g, tp, hd = q.shape

    def query_block(i, carry):
        out, lse = carry
        row0 = i * bq
        q_blk = jax.lax.dynamic_slice_in_dim(q, row0, bq, axis=3)
        m = jnp.full((b, kv, g, bq), -jnp.inf, jnp.float32)  # running max of the scores seen so far
        l = jnp.zeros((b, kv, g, bq), jnp.float32)            # running sum of exp(score - m)
        acc = jnp.zeros((b, kv, g, bq, hd), jnp.float32)      # running sum of exp(score - m) * value
        for (k, v, mask), (bk, nk, num_keys) in zip(segments, seg_tiling):
            u = k.shape[0]
            n = b // u
            q_grp = _to_groups(q_blk, u)  # [u, K, n*G*bq, hd]

            def key_block(j, state, k=k, v=v, mask=mask, bk=bk, num_keys=num_keys, u=u, n=n, q_grp=q_grp):
                m, l, acc = state
                col0 = j * bk
                k_blk = jax.lax.dynamic_slice_in_dim(k, col0, bk, axis=2).astype(q.dtype)
                v_blk = jax.lax.dynamic_slice_in_dim(v, col0, bk, axis=2).astype(q.dtype)
                s = jnp.einsum("ukrd,uksd->ukrs", q_grp, k_blk, preferred_element_type=jnp.float32) * scale
                s = _mask_scores(s, _visible(mask, u, n, row0, bq, col0, bk, num_keys), n, g, -jnp.inf)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that have seen nothing yet
                p = jnp.exp(s - m_ref[..., None])
                rescale = jnp.exp(m - m_ref)
                l = l * rescale + jnp.sum(p, axis=-1)
                acc = acc * rescale[..., None] + jnp.einsum("ukrs,uksd->ukrd", p.astype(q.dtype), v_blk,
                                                            preferred_element_type=jnp.float32)
                return m_new, l, acc

            state = (_to_groups(m, u), _to_groups(l, u), _to_groups(acc, u))
            state = jax.lax.fori_loop(0, _key_blocks_end(mask, row0, bq, bk, nk), key_block, state)
            m, l, acc = (_from_groups(x, b, g) for x in state)
        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        out = jax.lax.dynamic_update_slice_in_dim(out, (acc / l_safe[..., None]).astype(out.dtype), row0, axis=3)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, jnp.where(empty, -jnp.inf, m + jnp.log(l_safe)), row0, axis=3)
        return out, lse

    init = (jnp.zeros(q.shape, q.dtype), jnp.zeros((b, kv, g, tp), jnp.float32))
    return jax.lax.fori_loop(0, nq, query_block, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiled(tiling: _Tiling, q: jax.Array, segments: tuple[Segment, ...]) -> jax.Array:
    return _tiled_forward(tiling, q, segments)[0]


def _tiled_fwd(tiling, q, segments):
    out, lse = _tiled_forward(tiling, q, segments)
    return out, (q, segments, out, lse)


def _tiled_bwd(tiling, residuals, d_out):
    """FlashAttention-2's backward pass: per key block, per query block, recompute the probabilities from q,
    k and the log-sum-exp, and accumulate dq, dk, dv (float32). No [T, S] array is stored."""
    q, segments, out, lse = residuals
    scale, bq, nq, seg_tiling = tiling
    b, kv, g, tp, hd = q.shape
    # d(loss)/d(score_ij) = p_ij * (dp_ij - delta_i), with delta_i = sum_d dO_id * O_id.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    lse = jnp.where(lse == -jnp.inf, 0.0, lse)  # rows that see nothing: all their p are masked to 0 anyway
    d_out = d_out.astype(q.dtype)
    dq = jnp.zeros(q.shape, jnp.float32)
    d_segments = []
    for (k, v, mask), (bk, nk, num_keys) in zip(segments, seg_tiling):
        u = k.shape[0]
        n = b // u

        def key_block(j, carry, k=k, v=v, mask=mask, bk=bk, num_keys=num_keys, u=u, n=n):
            dq, dk, dv = carry
            col0 = j * bk
            k_blk = jax.lax.dynamic_slice_in_dim(k, col0, bk, axis=2).astype(q.dtype)
            v_blk = jax.lax.dynamic_slice_in_dim(v, col0, bk, axis=2).astype(q.dtype)

            def query_block(i, carry):
                dq, dk_blk, dv_blk = carry
                row0 = i * bq
                rows = lambda x: _to_groups(jax.lax.dynamic_slice_in_dim(x, row0, bq, axis=3), u)  # noqa: E731
                q_grp, do_grp = rows(q), rows(d_out)               # [u, K, n*G*bq, hd]
                lse_grp, delta_grp = rows(lse)[..., None], rows(delta)[..., None]
                s = jnp.einsum("ukrd,uksd->ukrs", q_grp, k_blk, preferred_element_type=jnp.float32) * scale
                vis = _visible(mask, u, n, row0, bq, col0, bk, num_keys)
                p = _mask_scores(jnp.exp(jnp.minimum(s - lse_grp, 0.0)), vis, n, g, 0.0)
                dv_blk = dv_blk + jnp.einsum("ukrs,ukrd->uksd", p.astype(q.dtype), do_grp,
                                             preferred_element_type=jnp.float32)
                dp = jnp.einsum("ukrd,uksd->ukrs", do_grp, v_blk, preferred_element_type=jnp.float32)
                ds = (p * (dp - delta_grp) * scale).astype(q.dtype)
                dq_blk = jnp.einsum("ukrs,uksd->ukrd", ds, k_blk, preferred_element_type=jnp.float32)
                dq = jax.lax.dynamic_update_slice_in_dim(
                    dq, jax.lax.dynamic_slice_in_dim(dq, row0, bq, axis=3) + _from_groups(dq_blk, b, g), row0, axis=3)
                dk_blk = dk_blk + jnp.einsum("ukrs,ukrd->uksd", ds, q_grp, preferred_element_type=jnp.float32)
                return dq, dk_blk, dv_blk

            zeros = jnp.zeros((u, kv, bk, hd), jnp.float32)
            dq, dk_blk, dv_blk = jax.lax.fori_loop(_query_blocks_start(mask, col0, bq, nq), nq, query_block,
                                                   (dq, zeros, zeros))
            dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_blk, col0, axis=2)
            dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_blk, col0, axis=2)
            return dq, dk, dv

        zeros = jnp.zeros(k.shape, jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(0, nk, key_block, (dq, zeros, zeros))
        # Masks are not differentiable: no cotangent for them.
        d_segments.append((dk.astype(k.dtype), dv.astype(v.dtype), jax.tree.map(lambda _: None, mask)))
    return dq.astype(q.dtype), tuple(d_segments)


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def blockwise_attention(q: jax.Array, segments: Sequence[Segment], scale: float,
                        block_q: int = DEFAULT_BLOCK_SIZE, block_k: int = DEFAULT_BLOCK_SIZE) -> jax.Array:
    """Tiled attention with an online softmax, always tiled (no dense shortcut; see `dot_product_attention`).

    q [B, H, T, hd]; segments as in `dense_attention`. Blocks are min(block, length); T and each S are padded
    up to a block multiple internally (padded keys are never seen, padded queries are dropped), so any
    lengths work. Peak memory: O(B * H * (T + block_q * block_k) * hd) forward and backward.
    Returns [B, H, T, hd] in q.dtype.
    """
    b, h, t, hd = q.shape
    kv = segments[0][0].shape[1]
    bq = max(1, min(block_q, t))
    nq = -(-t // bq)
    q5 = _pad_axis(q.reshape(b, kv, h // kv, t, hd), 3, nq * bq)
    padded, seg_tiling = [], []
    for k, v, mask in segments:
        s = k.shape[2]
        bk = max(1, min(block_k, s))
        nk = -(-s // bk)
        if mask.key_valid is not None:
            mask = dataclasses.replace(mask, key_valid=_pad_axis(mask.key_valid.astype(bool), 1, nk * bk))
        if mask.dense is not None:
            dense = _pad_axis(_pad_axis(mask.dense.astype(bool), 1, nq * bq), 2, nk * bk)
            mask = dataclasses.replace(mask, dense=dense)
        padded.append((_pad_axis(k, 2, nk * bk), _pad_axis(v, 2, nk * bk), mask))
        seg_tiling.append((bk, nk, s))
    out = _tiled((float(scale), bq, nq, tuple(seg_tiling)), q5, tuple(padded))
    return out[..., :t, :].reshape(b, h, t, hd)


# ---------------------------------------------------------------------------- cuDNN

_warned_cudnn = False


def cudnn_attention(q: jax.Array, segments: Sequence[Segment], scale: float,
                    fallback: Callable[[], jax.Array]) -> jax.Array:
    """cuDNN flash attention where the mask form allows it, else `fallback()` (no error).

    Applies on GPU to one segment of causal self-attention (T == S, no offset, no dense mask) in bf16/fp16,
    with `key_valid` None or right padding: the latter is checked at run time (`lax.cond`), so left-padded
    rows, or a row with no valid key, run `fallback` instead. Same shapes/dtype as `dense_attention`.
    """
    global _warned_cudnn
    if len(segments) != 1 or jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16):
        return fallback()
    k, v, mask = segments[0]
    b, _, t, _ = q.shape
    s = k.shape[2]
    if not mask.causal or mask.offset is not None or mask.dense is not None or t != s or k.shape[0] != b:
        return fallback()
    # cuDNN takes [B, T, heads, hd].
    q_t, k_t, v_t = (x.astype(q.dtype).transpose(0, 2, 1, 3) for x in (q, k, v))

    def run(lengths=None):
        out = jax.nn.dot_product_attention(q_t, k_t, v_t, scale=scale, is_causal=True,
                                           key_value_seq_lengths=lengths, implementation="cudnn")
        return out.transpose(0, 2, 1, 3)

    try:
        if mask.key_valid is None:
            return run()
        valid = mask.key_valid.astype(bool)
        lengths = jnp.sum(valid, axis=-1, dtype=jnp.int32)
        right_padded = jnp.all(valid == (jnp.arange(s)[None, :] < lengths[:, None])) & jnp.all(lengths > 0)
        return jax.lax.cond(right_padded, lambda: run(lengths), fallback)
    except (NotImplementedError, ValueError, TypeError, RuntimeError) as err:  # shape/version not supported
        if not _warned_cudnn:
            warnings.warn(f"cuDNN attention unavailable ({err}); using blockwise attention", stacklevel=2)
            _warned_cudnn = True
        return fallback()


# ---------------------------------------------------------------------------- entry point

def resolve_implementation(name: str) -> str:
    """'auto' -> 'cudnn' on GPU, else 'blockwise'; other names pass through (checked)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; expected one of {IMPLEMENTATIONS}")
    if name == "auto":
        return "cudnn" if jax.default_backend() == "gpu" else "blockwise"
    return name


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: AttentionMask | jax.Array | None = None, *,
                          prefix: tuple[jax.Array, jax.Array, AttentionMask | jax.Array] | None = None,
                          impl: str = "auto", block_q: int = DEFAULT_BLOCK_SIZE, block_k: int = DEFAULT_BLOCK_SIZE,
                          scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale, masked) v over the keys of `prefix` (if any) and `k`/`v`, all in one softmax.

    q:      [B, H, T, hd], compute dtype (scores and softmax are float32; the weighted sum of values is taken
            in q's dtype with float32 accumulation).
    k, v:   [B, K, S, hd], H a multiple of K; cast to q's dtype.
    mask:   `AttentionMask`, bool [B, T, S] (taken as `AttentionMask(dense=...)`) or None (all visible).
    prefix: (k, v, mask) with k/v [U, K, P, hd], B a multiple of U (rows n = B/U per prefix row, consecutive)
            and mask an `AttentionMask` over [U, P] keys or a bool [U, P] key validity.
    impl:   one of `IMPLEMENTATIONS`. "blockwise" computes densely when T x (P + S) <= block_q x block_k.
    scale:  defaults to 1/sqrt(hd).
    Returns [B, H, T, hd] in q.dtype. Differentiable in q, k, v (and the prefix's k, v).
    """
    b, h, t, hd = q.shape
    if k.shape[1] == 0 or h % k.shape[1]:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({k.shape[1]})")
    scale = 1.0 / math.sqrt(hd) if scale is None else float(scale)
    segments: list[Segment] = []
    if prefix is not None:
        p_k, p_v, p_mask = prefix
        if b % p_k.shape[0]:
            raise ValueError(f"batch ({b}) must be a multiple of the prefix batch ({p_k.shape[0]})")
        if not isinstance(p_mask, AttentionMask):
            p_mask = AttentionMask.padding(p_mask)
        segments.append((p_k, p_v, p_mask))
    segments.append((k, v, as_mask(mask)))

    impl = resolve_implementation(impl)
    if impl == "dense":
        return dense_attention(q, segments, scale)

    def blockwise() -> jax.Array:
        if t * sum(seg[0].shape[2] for seg in segments) <= block_q * block_k:
            return dense_attention(q, segments, scale)
        return blockwise_attention(q, segments, scale, block_q, block_k)

    if impl == "cudnn":
        return cudnn_attention(q, segments, scale, blockwise)
    return blockwise()
