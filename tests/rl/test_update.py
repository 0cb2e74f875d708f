"""RL update: log-prob scoring, the step against a direct gradient of the objective, micro- and
mini-batching, masking; and (one subprocess, tests/train_mesh_check.py) parity of the sharded SFT
and RL steps and sharded checkpoint restore on a simulated 8-device mesh."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftrl_jax import models
from ftrl_jax.training.optim import make_optimizer
from ftrl_jax.training.logprobs import token_logprobs_from_logits
from ftrl_jax.rl.losses import LossConfig, rl_objective
from ftrl_jax.rl.update import make_logprob_fn, make_rl_step
from ftrl_jax.training.train_state import create_train_state, shard_state
from tests.cached_models import init_params, one_device_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Less LLVM optimisation: compiles several times faster on CPU, same arithmetic.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
CONFIG = models.preset("tiny", vocab_size=256, num_layers=2)
BATCH, TIME = 4, 24
LEARNING_RATE = 0.5
# SGD: the update is -lr * gradient, so it can be compared with a gradient computed here directly.
SGD = optax.sgd(LEARNING_RATE)
LOSS = LossConfig(kl_coef=0.05, entropy_coef=0.01, aggregation="seq-mean-token-mean")


@functools.lru_cache(maxsize=None)
def _step(num_minibatches=1, num_microbatches=1):
    return make_rl_step(CONFIG, SGD, one_device_mesh(), LOSS, num_minibatches=num_minibatches,
                        num_microbatches=num_microbatches, chunk_size=8, compiler_options=FAST_COMPILE)


@functools.lru_cache(maxsize=None)
def _logprob_fn():
    return make_logprob_fn(CONFIG, one_device_mesh(), chunk_size=8, compiler_options=FAST_COMPILE)


def _fresh_state(optimizer=SGD):
    # A copy: the step donates its input state, and sharding onto the same device shares buffers.
    return shard_state(create_train_state(jax.tree.map(jnp.copy, init_params(CONFIG)), optimizer), one_device_mesh())


def _sequences(seed=0):
    """Prompt, a policy turn, a tool response (not trained on), another policy turn, right padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, size=(BATCH, TIME))
    lengths = np.array([TIME, 21, 16, 12])
    attention = (np.arange(TIME)[None] < lengths[:, None]).astype(np.int32)
    loss = attention.copy()
    loss[:, :4] = 0  # prompt
    loss[:, 8:11] = 0  # tool response
    tokens = np.where(attention > 0, tokens, 0)
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(attention), jnp.asarray(loss)


@functools.lru_cache(maxsize=None)
def _batch():
    tokens, attention, loss = _sequences()
    rng = np.random.default_rng(1)
    old = _logprob_fn()(init_params(CONFIG), tokens, attention)
    noise = functools.partial(rng.normal, size=old.shape)
    return {
        "tokens": tokens, "attention_mask": attention, "loss_mask": loss,
        # Off-policy by a little, so ratio clipping happens and the KL term is not zero.
        "old_logprobs": old + jnp.asarray(noise(scale=0.3), jnp.float32),
        "ref_logprobs": old + jnp.asarray(noise(scale=0.1), jnp.float32),
        "advantages": jnp.asarray(noise(), jnp.float32),
    }


def _full_logits_logprobs(params, tokens, attention):
    """Aligned (logprobs, entropy) from the whole `[B, T, V]` logits, shifted by hand."""
    logits = models.forward(CONFIG, params, tokens, attention)
    logprobs, entropy = token_logprobs_from_logits(logits[:, :-1], tokens[:, 1:])
    return tuple(jnp.pad(x, ((0, 0), (1, 0))) * attention for x in (logprobs, entropy))


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def _direct_update(params, batch):
    """One SGD step on `rl_objective` with full-logits log-probs: (new params, loss, metrics, logprobs)."""
    mask = (batch["loss_mask"] * batch["attention_mask"]).astype(jnp.float32).at[:, 0].set(0.0)

    def loss_fn(params):
        logprobs, entropy = _full_logits_logprobs(params, batch["tokens"], batch["attention_mask"])
        weighted_sum, denominator, metrics = rl_objective(logprobs, batch["old_logprobs"], batch["ref_logprobs"],
                                                          entropy, batch["advantages"], mask, LOSS)
        return weighted_sum / jnp.maximum(denominator, 1.0), (metrics, logprobs)

    (loss, (metrics, logprobs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads), loss, metrics, logprobs


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_trees_close(a, b, atol):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def _max_change(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(_leaves(a), _leaves(b)))


def test_logprob_fn_matches_full_logits_and_zeroes_position_0_and_padding():
    batch = _batch()
    got = np.asarray(_logprob_fn()(init_params(CONFIG), batch["tokens"], batch["attention_mask"]))
    _, _, _, want = _direct_update(init_params(CONFIG), batch)
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)
    assert np.all(got[:, 0] == 0.0)
    assert np.all(got[np.asarray(batch["attention_mask"]) == 0] == 0.0)
    assert np.all(got[:, 1:][np.asarray(batch["attention_mask"])[:, 1:] > 0] < 0.0)


def test_rl_step_equals_a_direct_gradient_step_on_the_objective():
    batch = _batch()
    state, metrics = _step()(_fresh_state(), batch)
    want_params, want_loss, want_metrics, _ = _direct_update(init_params(CONFIG), batch)
    assert _max_change(want_params, init_params(CONFIG)) > 1e-3  # the update is not trivially small
    _assert_trees_close(state.params, want_params, atol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=1e-5, atol=1e-6)
    for name in ("pg_loss", "kl", "entropy", "clip_fraction", "approx_kl"):
        np.testing.assert_allclose(float(metrics[name]), float(want_metrics[name]), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    assert 0.0 < float(metrics["clip_fraction"]) < 1.0
    assert float(metrics["response_tokens"]) == float(want_metrics["response_tokens"])
    assert float(metrics["grad_norm"]) > 0 and int(state.step) == 1


def test_minibatches_are_sequential_updates_on_strided_row_groups():
    """Two mini-batches of two micro-batches each = a full-batch update on rows 0, 2, then one on rows 1, 3.

    A full-batch update with some rows' loss_mask zeroed is the update on the other rows alone
    (sequences without response tokens count neither in the sum nor in the denominator). The
    micro-batches hold one row each with different token counts, so this also checks that
    accumulation and the token-weighted metrics equal the whole mini-batch's.
    """
    batch = _batch()
    state, metrics = _step(num_minibatches=2, num_microbatches=2)(_fresh_state(), batch)
    assert int(state.step) == 2

    rows = np.arange(BATCH)
    manual, manual_metrics = _fresh_state(), []
    for group in (rows % 2 == 0, rows % 2 == 1):
        only_group = dict(batch, loss_mask=batch["loss_mask"] * jnp.asarray(group[:, None], jnp.int32))
        manual, group_metrics = _step()(manual, only_group)
        manual_metrics.append(group_metrics)
    _assert_trees_close(state.params, manual.params, atol=1e-5)
    # Metrics: the mean over mini-batches (token-weighted within each), tokens summed.
    for name, value in metrics.items():
        values = [float(m[name]) for m in manual_metrics]
        want = sum(values) if name == "response_tokens" else np.mean(values)
        np.testing.assert_allclose(float(value), want, rtol=1e-5, atol=1e-6, err_msg=name)
    # The second update saw the first one's parameters: one update on the whole batch differs.
    single, _ = _step()(_fresh_state(), batch)
    assert _max_change(single.params, state.params) > 1e-4


def test_masked_positions_do_not_change_the_update():
    batch = _batch()
    masked = np.asarray(batch["loss_mask"]) == 0
    garbage = dict(batch)
    garbage["old_logprobs"] = jnp.where(masked, -jnp.inf, batch["old_logprobs"])
    garbage["ref_logprobs"] = jnp.where(masked, 50.0, batch["ref_logprobs"])
    garbage["advantages"] = jnp.where(masked, 1e6, batch["advantages"])
    base, base_metrics = _step()(_fresh_state(), batch)
    changed, changed_metrics = _step()(_fresh_state(), garbage)
    _assert_trees_close(changed.params, base.params, atol=0)
    for name, value in base_metrics.items():
        assert float(changed_metrics[name]) == float(value), name


def test_zero_advantages_without_kl_or_entropy_leave_params_unchanged():
    optimizer = make_optimizer(1e-2, weight_decay=0.0)
    step = make_rl_step(CONFIG, optimizer, one_device_mesh(), LossConfig(kl_coef=0.0, entropy_coef=0.0), chunk_size=8,
                        compiler_options=FAST_COMPILE)
    batch = {k: v for k, v in _batch().items() if k != "ref_logprobs"}  # not needed when kl_coef == 0
    batch["advantages"] = jnp.zeros_like(batch["advantages"])
    state, metrics = step(_fresh_state(optimizer), batch)
    _assert_trees_close(state.params, init_params(CONFIG), atol=0)
    assert float(metrics["grad_norm"]) == 0.0 and float(metrics["loss"]) == 0.0
    assert "kl" not in metrics and float(metrics["entropy"]) > 0
    assert int(state.step) == 1


def test_one_minibatch_without_old_logprobs_is_the_on_policy_update():
    """Left out with one mini-batch, the old log-probs are the update's own (verl's `on_policy`): the same
    update as with the sampling policy's log-probs passed in, ratio 1, nothing clipped."""
    on_policy = dict(_batch(), old_logprobs=_logprob_fn()(init_params(CONFIG), _batch()["tokens"],
                                                           _batch()["attention_mask"]))
    given, given_metrics = _step()(_fresh_state(), on_policy)
    own, own_metrics = _step()(_fresh_state(), {k: v for k, v in on_policy.items() if k != "old_logprobs"})
    assert _max_change(given.params, init_params(CONFIG)) > 1e-3
    _assert_trees_close(own.params, given.params, atol=1e-6)
    for name in ("loss", "pg_loss", "kl", "entropy", "grad_norm"):
        np.testing.assert_allclose(float(own_metrics[name]), float(given_metrics[name]), rtol=1e-5, atol=1e-7,
                                   err_msg=name)
    assert float(own_metrics["clip_fraction"]) == 0.0 and float(own_metrics["approx_kl"]) == 0.0


def test_minibatches_without_old_logprobs_are_a_clear_error():
    batch = {k: v for k, v in _batch().items() if k != "old_logprobs"}
    with pytest.raises(ValueError, match="num_minibatches=2 batch is missing \\['old_logprobs'\\]: pass the "
                                         "sampling policy's log-probs"):
        _step(num_minibatches=2)(_fresh_state(), batch)


def test_missing_reference_logprobs_with_kl_is_a_clear_error():
    batch = {k: v for k, v in _batch().items() if k != "ref_logprobs"}
    with pytest.raises(ValueError, match="kl_coef=0.05 batch is missing \\['ref_logprobs'\\]"):
        _step()(_fresh_state(), batch)


def test_steps_and_checkpoints_on_8_device_mesh_match_single_device():
    """SFT and RL steps on a (2, 2, 2) mesh equal one device; a sharded checkpoint restores onto both layouts.

    One subprocess for all four checks (the shared-prompt RL layout included): the 8 simulated devices must be
    set before JAX starts.
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "train_mesh_check.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    for check in ("sft", "rl", "rl_shared_prompt", "checkpoint"):
        assert f"TRAIN_MESH_OK {check}" in proc.stdout, output
