"""Supervised warm-start step on one device: loss value, learning, gradient accumulation, masking;
and the optimizer's schedules and weight-decay mask.

Parity on an 8-device mesh is checked with the RL step in tests/rl/test_update.py (one subprocess).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftrl_jax import models
from ftrl_jax.training.optim import decay_mask, make_optimizer, make_schedule
from ftrl_jax.training.sft import make_sft_step
from ftrl_jax.training.train_state import create_train_state, shard_state
from tests.cached_models import init_params, one_device_mesh

# Less LLVM optimisation: compiles several times faster on CPU, same arithmetic.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
CONFIG = models.preset("tiny", vocab_size=256, num_layers=2)
BATCH, TIME = 4, 24


# Plain SGD: the update is the gradient itself, so equal updates mean equal gradients (Adam's first
# step is ~lr * sign(g), which would magnify rounding noise). AdamW runs in the 8-device check.
OPTIMIZER = optax.sgd(0.1)


@functools.lru_cache(maxsize=None)
def _step(num_microbatches: int):
    return make_sft_step(CONFIG, OPTIMIZER, one_device_mesh(), num_microbatches=num_microbatches, chunk_size=8,
                         compiler_options=FAST_COMPILE)


def _fresh_state():
    # A copy: the step donates its input state, and sharding onto the same device shares buffers.
    params = jax.tree.map(jnp.copy, init_params(CONFIG))
    return shard_state(create_train_state(params, OPTIMIZER), one_device_mesh())


def _batch(seed=0):
    """Right-padded rows of different lengths; a prompt of 5 tokens that is not predicted."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, size=(BATCH, TIME))
    lengths = np.array([TIME, 20, 13, 9])
    attention = (np.arange(TIME)[None] < lengths[:, None]).astype(np.int32)
    loss = attention.copy()
    loss[:, :5] = 0
    tokens = np.where(attention > 0, tokens, 0)
    return {"tokens": jnp.asarray(tokens, jnp.int32), "attention_mask": jnp.asarray(attention),
            "loss_mask": jnp.asarray(loss)}


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_trees_close(a, b, atol):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def _reference_nll(params, batch):
    """Mean NLL from the full logits, shifted by hand."""
    logits = models.forward(CONFIG, params, batch["tokens"], batch["attention_mask"])
    logprobs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    target = jnp.take_along_axis(logprobs, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
    mask = (batch["loss_mask"] * batch["attention_mask"])[:, 1:].astype(jnp.float32)
    return -jnp.sum(target * mask) / jnp.sum(mask)


def test_loss_is_the_token_mean_nll_of_the_shifted_tokens():
    batch = _batch()
    state, metrics = _step(1)(_fresh_state(), batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(_reference_nll(init_params(CONFIG), batch)), rtol=1e-5)
    expected_tokens = int(np.sum((np.asarray(batch["loss_mask"]) * np.asarray(batch["attention_mask"]))[:, 1:]))
    assert float(metrics["tokens"]) == expected_tokens
    assert int(state.step) == 1


def test_loss_decreases_over_a_few_steps():
    step, state, batch = _step(1), _fresh_state(), _batch()
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert int(state.step) == 4


def test_two_microbatches_give_the_same_update_as_one():
    batch = _batch(1)  # rows of different lengths, so the micro-batches count different numbers of tokens
    full_state, full_metrics = _step(1)(_fresh_state(), batch)
    accumulated_state, accumulated_metrics = _step(2)(_fresh_state(), batch)
    _assert_trees_close(accumulated_state.params, full_state.params, atol=1e-5)
    for name in ("loss", "grad_norm", "tokens"):
        np.testing.assert_allclose(float(accumulated_metrics[name]), float(full_metrics[name]), rtol=1e-5)
    # And the update is not trivially zero.
    moved = max(np.max(np.abs(a - b)) for a, b in zip(_leaves(full_state.params), _leaves(init_params(CONFIG))))
    assert moved > 1e-3


def test_padding_tokens_and_unmasked_positions_do_not_change_the_update():
    batch = _batch(2)
    changed = dict(batch)
    attention = np.asarray(batch["attention_mask"])
    # Other ids in the padding: invisible to attention and not predicted.
    changed["tokens"] = jnp.where(attention > 0, batch["tokens"], 7)
    base_state, _ = _step(1)(_fresh_state(), batch)
    changed_state, _ = _step(1)(_fresh_state(), changed)
    _assert_trees_close(changed_state.params, base_state.params, atol=1e-6)

    # Nothing to predict: zero loss, zero gradient, parameters unchanged.
    nothing = dict(batch, loss_mask=jnp.zeros_like(batch["loss_mask"]))
    state, metrics = _step(1)(_fresh_state(), nothing)
    assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0 and float(metrics["tokens"]) == 0
    _assert_trees_close(state.params, init_params(CONFIG), atol=0)


def test_bad_batches_are_reported_clearly():
    batch = _batch()
    with pytest.raises(ValueError, match="missing \\['loss_mask'\\]"):
        _step(1)(_fresh_state(), {k: v for k, v in batch.items() if k != "loss_mask"})
    with pytest.raises(ValueError, match="not divisible into 3"):
        make_sft_step(CONFIG, OPTIMIZER, one_device_mesh(), num_microbatches=3)(_fresh_state(), batch)



# ---------------------------------------------------------------- the optimizer used for warm start and RL


def test_schedules_warm_up_linearly_then_follow_their_shape():
    cosine = make_schedule(1.0, warmup_steps=4, schedule="cosine", total_steps=12)
    np.testing.assert_allclose([float(cosine(s)) for s in (0, 2, 4, 8, 12)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
    constant = make_schedule(2.0, warmup_steps=2)
    np.testing.assert_allclose([float(constant(s)) for s in (0, 1, 2, 50)], [0.0, 1.0, 2.0, 2.0], atol=1e-6)
    with pytest.raises(ValueError, match="total_steps"):
        make_schedule(1.0, schedule="cosine")
    with pytest.raises(ValueError, match="available: constant, cosine"):
        make_schedule(1.0, schedule="linear")


def test_weight_decay_skips_norm_scales_and_biases():
    params = {"layers": {"mlp": {"up_proj": {"kernel": jnp.ones((2, 3))}}, "input_layernorm": {"scale": jnp.ones(3)},
                         "self_attn": {"q_proj": {"bias": jnp.ones(3)}}}, "norm": {"scale": jnp.ones(3)}}
    assert decay_mask(params) == {"layers": {"mlp": {"up_proj": {"kernel": True}}, "input_layernorm": {"scale": False},
                                             "self_attn": {"q_proj": {"bias": False}}}, "norm": {"scale": False}}
    optimizer = make_optimizer(0.1, weight_decay=0.5)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(new["layers"]["mlp"]["up_proj"]["kernel"]), 1.0 - 0.1 * 0.5)
    for unchanged in (new["norm"]["scale"], new["layers"]["input_layernorm"]["scale"],
                      new["layers"]["self_attn"]["q_proj"]["bias"]):
        np.testing.assert_array_equal(np.asarray(unchanged), 1.0)
