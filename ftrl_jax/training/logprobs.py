"""Per-token log-probabilities and entropies of the policy, without materialising all logits.

A `[B, T, V]` logits array for a 150k vocabulary is the largest tensor of an RL step (and its
gradient doubles it). `token_logprobs_and_entropy` scans over time chunks instead: each step
projects `[B, C, D]` hidden states to `[B, C, V]` logits, reduces them to `[B, C]` log-probs and
entropies, and drops them. The chunk body is rematerialised (`jax.checkpoint`), so the
backward pass recomputes one chunk's logits at a time as well.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _logprobs_and_entropy_from_logits(logits: jax.Array, targets: jax.Array):
    """float32 logits `[..., V]` and ids `[...]` -> (log p(target) `[...]`, entropy `[...]`)."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target_logprobs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return target_logprobs, entropy


def token_logprobs_from_logits(logits: jax.Array, targets: jax.Array, temperature: float = 1.0):
    """Plain version: logits `[B, T, V]`, targets `[B, T]` -> (logprobs `[B, T]`, entropy `[B, T]`), in float32."""
    logits = logits.astype(jnp.float32) / temperature
    return _logprobs_and_entropy_from_logits(logits, targets)


def token_logprobs_and_entropy(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int = 128,
    temperature: float = 1.0,
):
    """Log-probs of `targets` and entropies under `softmax(hidden @ head / temperature)`, chunked over time.

    hidden: `[B, T, D]` final hidden states (after the final norm); head: `[D, V]` output
    projection (pass `embedding.T` for tied embeddings); targets: `[B, T]` token ids.
    Returns `(logprobs [B, T], entropy [B, T])` in float32. The matmul accumulates in float32
    whatever the input dtype. `chunk_size` and `temperature` must be static under `jax.jit`;
    T is padded up to a multiple of `chunk_size` and the padding is cut off again.
    """
    if hidden.ndim != 3 or head.ndim != 2 or hidden.shape[-1] != head.shape[0]:
        raise ValueError(f"expected hidden [B, T, D] and head [D, V]; got hidden {hidden.shape} and head {head.shape}")
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets {targets.shape} must match hidden's [B, T] = {hidden.shape[:2]}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")

    batch, time, width = hidden.shape
    chunk = min(chunk_size, time)
    num_chunks = -(-time // chunk)
    padding = num_chunks * chunk - time
    hidden = jnp.pad(hidden, ((0, 0), (0, padding), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, padding)))
    # Time-major chunks so that scan walks over the leading axis.
    hidden_chunks = hidden.reshape(batch, num_chunks, chunk, width).swapaxes(0, 1)  # [N, B, C, D]
    target_chunks = targets.reshape(batch, num_chunks, chunk).swapaxes(0, 1)  # [N, B, C]
    compute_dtype = jnp.result_type(hidden.dtype, head.dtype)

    @jax.checkpoint
    def chunk_stats(head, hidden_bcd, targets_bc):
        logits_bcv = jnp.einsum(
            "bcd,dv->bcv",
            hidden_bcd.astype(compute_dtype),
            head.astype(compute_dtype),
            preferred_element_type=jnp.float32,
        )
        return _logprobs_and_entropy_from_logits(logits_bcv / temperature, targets_bc)

    def step(carry, inputs):
        return carry, chunk_stats(head, *inputs)

    _, (logprobs_nbc, entropy_nbc) = jax.lax.scan(step, None, (hidden_chunks, target_chunks))

    def unchunk(values_nbc):
        return values_nbc.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :time]

    return unchunk(logprobs_nbc), unchunk(entropy_nbc)
