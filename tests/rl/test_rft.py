"""Rejection-sampling fine-tuning (`rl.algorithm="rft"`): the `rft` weights with the `nll` policy loss train
by cross-entropy on the successful samples only, through the same `make_rl_step` as the RL algorithms."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ftrl_jax import models
from ftrl_jax.rl.advantages import compute_advantages
from ftrl_jax.rl.losses import LossConfig
from ftrl_jax.rl.update import make_logprob_fn, make_rl_step, response_mask
from ftrl_jax.training.optim import make_optimizer
from ftrl_jax.training.train_state import create_train_state, shard_state
from tests.cached_models import init_params, one_device_mesh

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
CONFIG = models.preset("tiny", vocab_size=256, num_layers=2)
RFT_LOSS = LossConfig(policy_loss="nll", kl_coef=0.0, entropy_coef=0.0)
OPTIMIZER = make_optimizer(1e-2)  # AdamW with clipping, as in training
BATCH, TIME, PROMPT = 4, 24, 6


@functools.lru_cache(maxsize=None)
def _step():
    return make_rl_step(CONFIG, OPTIMIZER, one_device_mesh(), RFT_LOSS, chunk_size=8, compiler_options=FAST_COMPILE)


@functools.lru_cache(maxsize=None)
def _logprob_fn():
    return make_logprob_fn(CONFIG, one_device_mesh(), chunk_size=8, compiler_options=FAST_COMPILE)


def _fresh_state():
    return shard_state(create_train_state(jax.tree.map(jnp.copy, init_params(CONFIG)), OPTIMIZER), one_device_mesh())


def _batch(rewards, loss_rows=None):
    """Two groups of two sampled turns: a prompt (mask 0) and a response of varying length."""
    rng = np.random.default_rng(0)
    lengths = np.array([TIME, 20, 15, 11])
    attention = (np.arange(TIME)[None] < lengths[:, None]).astype(np.int32)
    loss = attention.copy()
    loss[:, :PROMPT] = 0
    if loss_rows is not None:
        loss *= np.asarray(loss_rows, np.int32)[:, None]
    tokens = jnp.asarray(np.where(attention > 0, rng.integers(0, CONFIG.vocab_size, (BATCH, TIME)), 0), jnp.int32)
    batch = {"tokens": tokens, "attention_mask": jnp.asarray(attention), "loss_mask": jnp.asarray(loss)}
    batch["old_logprobs"] = _logprob_fn()(init_params(CONFIG), tokens, batch["attention_mask"])
    batch["advantages"] = compute_advantages("rft", jnp.asarray(rewards, jnp.float32), response_mask(batch),
                                             group_size=2)
    return batch


def _response_logprob(params, batch, row):
    logprobs = np.asarray(_logprob_fn()(params, batch["tokens"], batch["attention_mask"]))
    mask = np.asarray(response_mask(batch)) > 0
    return float(logprobs[row][mask[row]].sum())


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_batch_without_successes_leaves_params_unchanged():
    state, metrics = _step()(_fresh_state(), _batch([0.5, 0.0, -0.3, 0.99]))
    _assert_same_params(state.params, init_params(CONFIG))
    assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0
    assert float(metrics["response_tokens"]) == 0.0


def test_trains_only_on_successes_and_raises_their_log_prob():
    rewards = [1.0, 0.0, -0.3, 0.5]  # only row 0 is a success
    batch = _batch(rewards)
    state, metrics = _step()(_fresh_state(), batch)
    assert float(metrics["response_tokens"]) == TIME - PROMPT
    assert float(metrics["loss"]) > 0  # the mean negative log-likelihood of the success
    # The update is the one on the success alone: the failed rows add nothing.
    alone, _ = _step()(_fresh_state(), _batch(rewards, loss_rows=[1, 0, 0, 0]))
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(alone.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-7, rtol=0)
    before = _response_logprob(init_params(CONFIG), batch, 0)
    after = _response_logprob(state.params, batch, 0)
    assert after > before + 1.0, (before, after)
