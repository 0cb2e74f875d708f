"""Supervised warm start on oracle trajectories: token-mean NLL of the assistant-generated tokens.

Batch (all `[B, T]`, right-padded): `tokens` int32, `attention_mask` (1 on real tokens) and
`loss_mask` (1 on the tokens to predict). The loss is the mean over counted tokens t >= 1 of
`-log p(tokens[t] | tokens[:t])`; the log-probs come from the chunked head
(`training.logprobs.token_logprobs_and_entropy`), so `[B, T, V]` logits are never materialised.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from ftrl_jax import models, parallel
from ftrl_jax.training.logprobs import token_logprobs_and_entropy
from ftrl_jax.training.train_state import (Batch, TrainState, abstract_state, accumulate_gradients, apply_gradients,
                                           state_shardings)

SFT_BATCH_KEYS = ("tokens", "attention_mask", "loss_mask")


def require_keys(batch: Batch, keys: tuple[str, ...], step_name: str, hint: str = "") -> None:
    """Raises a ValueError naming the missing batch keys, and `hint` (how to supply them) when given."""
    missing = [k for k in keys if k not in batch]
    if missing:
        fix = f": {hint}" if hint else ""
        raise ValueError(f"{step_name} batch is missing {missing}{fix}; it has {sorted(batch)} and needs {list(keys)}")


def shifted_token_logprobs(
    config: models.ModelConfig,
    params: Any,
    tokens: jax.Array,
    attention_mask: jax.Array,
    *,
    chunk_size: int = 128,
    temperature: float = 1.0,
    remat: bool = False,
):
    """`(logprobs, entropy)` `[B, T]` aligned with `tokens`: position t scores `tokens[:, t]` given `tokens[:, :t]`.

    Position 0 (nothing precedes it) and padding positions hold 0. The entropy at t is that of
    the distribution `tokens[:, t]` was drawn from.
    """
    hidden_btd = models.hidden_states(config, params, tokens, attention_mask, remat=remat)
    # Hidden state t predicts token t + 1; the last one predicts nothing (its target is a dummy 0).
    next_tokens = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    next_logprobs, next_entropy = token_logprobs_and_entropy(
        hidden_btd, models.output_head(config, params), next_tokens, chunk_size=chunk_size, temperature=temperature
    )
    valid = attention_mask.astype(jnp.float32)

    def align(values_bt):
        return jnp.pad(values_bt[:, :-1], ((0, 0), (1, 0))) * valid

    return align(next_logprobs), align(next_entropy)


def predicted_token_mask(loss_mask: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Float `[B, T]`: tokens that count in the loss (in loss_mask, real, and not the first position)."""
    mask = loss_mask.astype(jnp.float32) * attention_mask.astype(jnp.float32)
    return mask.at[:, 0].set(0.0)


def sft_loss_terms(config: models.ModelConfig, params: Any, batch: Batch, *, chunk_size: int = 128,
                   remat: bool = False):
    """`(weighted_sum, denominator, metrics)`: summed NLL of the counted tokens and their number."""
    logprobs, _ = shifted_token_logprobs(config, params, batch["tokens"], batch["attention_mask"],
                                         chunk_size=chunk_size, remat=remat)
    mask = predicted_token_mask(batch["loss_mask"], batch["attention_mask"])
    return -jnp.sum(logprobs * mask), jnp.sum(mask), {}


def make_sft_step(
    config: models.ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    num_microbatches: int = 1,
    chunk_size: int = 128,
    remat: bool = True,
    compiler_options: dict[str, Any] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted `sft_step(state, batch) -> (state, metrics)`; the input state is donated.

    The state must be laid out by `train_state.shard_state(state, mesh)`; the batch's leading axis
    is split over the mesh's batch axes and must be a multiple of `num_microbatches` (and of
    data x fsdp). Metrics: `loss` (token-mean NLL before the update), `grad_norm` (before
    clipping), `tokens` (counted tokens). `compiler_options` go to `jax.jit` (XLA flags for this step).
    With low-precision params the forward and backward run on `state.params` (the model dtype) and
    the float32 gradients update the state's float32 master copy (see `train_state`).
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches={num_microbatches} must be >= 1")

    def terms(params, microbatch):
        return sft_loss_terms(config, params, microbatch, chunk_size=chunk_size, remat=remat)

    def denominator(microbatch):
        return jnp.sum(predicted_token_mask(microbatch["loss_mask"], microbatch["attention_mask"]))

    def sft_step(state: TrainState, batch: Batch):
        require_keys(batch, SFT_BATCH_KEYS, "sft_step")
        batch = {k: batch[k] for k in SFT_BATCH_KEYS}
        acc = accumulate_gradients(terms, denominator, state.params, batch, num_microbatches=num_microbatches,
                                   mesh=mesh)
        metrics = {"loss": acc.loss, "grad_norm": optax.tree.norm(acc.grads), "tokens": acc.denominator}
        return apply_gradients(state, acc.grads, optimizer), metrics

    shardings = state_shardings(abstract_state(lambda: models.init_params(config, jax.random.PRNGKey(0)), optimizer),
                                mesh)
    return jax.jit(
        sft_step,
        in_shardings=(shardings, parallel.batch_sharding(mesh)),
        out_shardings=(shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
        compiler_options=compiler_options,
    )
