"""Float32 master weights under bfloat16 parameters (mixed precision, Micikevicius et al. 2018).

With bfloat16 params the train state keeps a float32 master copy that the optimizer updates; the
model runs with the master cast to bfloat16. Checked here: small updates (lr 1e-6, the paper's RL
rate) reach the master copy where they would round away on bfloat16 weights; the bfloat16 view is
the master's cast; a checkpoint round-trips the master exactly and training resumes identically;
and float32 params have no master copy and follow a plain optax AdamW chain bit for bit.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftrl_jax import models
from ftrl_jax.training.checkpointing import Checkpointer
from ftrl_jax.training.optim import decay_mask, make_optimizer
from ftrl_jax.training.sft import make_sft_step
from ftrl_jax.training.train_state import (TrainState, apply_gradients, create_train_state, shard_state,
                                           state_shardings)
from tests.cached_models import init_params, one_device_mesh

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
BF16 = models.preset("tiny", vocab_size=256, num_layers=2, param_dtype="bfloat16", dtype="bfloat16")
F32 = models.preset("tiny", vocab_size=256, num_layers=2)
SMALL_LR = make_optimizer(1e-6)  # the paper's RL learning rate; clipping on, as in training
SFT_OPTIMIZER = make_optimizer(1e-3, weight_decay=0.1)
BATCH, TIME = 4, 16


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _leaves(tree):
    return [np.asarray(x.astype(jnp.float32)) for x in jax.tree.leaves(tree)]


def _fraction_changed(new, old) -> float:
    changed = sum(int(np.sum(a != b)) for a, b in zip(_leaves(new), _leaves(old), strict=True))
    return changed / sum(a.size for a in _leaves(old))


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _constant_gradient(params):
    """The same gradient every step: +-0.01 with random signs, in the params' dtype (as a backward pass gives)."""
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda p: jnp.asarray(rng.choice([0.01, -0.01], size=p.shape), p.dtype), params)


@functools.lru_cache(maxsize=None)
def _apply_step(optimizer):
    return jax.jit(functools.partial(apply_gradients, optimizer=optimizer), compiler_options=FAST_COMPILE)


def _run(state, grads, optimizer, steps):
    step = _apply_step(optimizer)
    for _ in range(steps):
        state = step(state, grads)
    return state


def test_small_updates_reach_the_float32_master_copy():
    params = init_params(BF16)
    state = create_train_state(_copy(params), SMALL_LR)
    assert state.master_params is not None
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.master_params))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert moments and all(x.dtype == jnp.float32 for x in moments)  # Adam's mu and nu are float32 too
    _assert_trees_equal(state.params, params)  # the master starts as the exact bfloat16 values
    grads = _constant_gradient(params)

    state = _run(state, grads, SMALL_LR, 20)
    assert int(state.step) == 20
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.master_params))
    master_changed = _fraction_changed(state.master_params, params)
    assert master_changed >= 0.99, master_changed

    # As the float32 run does ...
    f32_params = init_params(F32)
    f32 = _run(create_train_state(_copy(f32_params), SMALL_LR), _constant_gradient(f32_params), SMALL_LR, 20)
    assert f32.master_params is None
    assert _fraction_changed(f32.params, f32_params) >= 0.99
    # ... and unlike the same steps applied to the bfloat16 weights themselves (no master copy; what
    # the state did before it had one): most of those updates round away.
    bare = TrainState(step=jnp.zeros((), jnp.int32), params=_copy(params), opt_state=SMALL_LR.init(params))
    bare_changed = _fraction_changed(_run(bare, grads, SMALL_LR, 20).params, params)
    assert bare_changed < 0.2, bare_changed


@functools.lru_cache(maxsize=None)
def _sft_step():
    return make_sft_step(BF16, SFT_OPTIMIZER, one_device_mesh(), chunk_size=8, compiler_options=FAST_COMPILE)


def _sft_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, BF16.vocab_size, size=(BATCH, TIME))
    attention = (np.arange(TIME)[None] < np.array([TIME, 12, 9, 14])[:, None]).astype(np.int32)
    loss = attention * (np.arange(TIME)[None] >= 3)
    return {"tokens": jnp.asarray(np.where(attention > 0, tokens, 0), jnp.int32),
            "attention_mask": jnp.asarray(attention), "loss_mask": jnp.asarray(loss)}


def _bf16_state():
    return shard_state(create_train_state(_copy(init_params(BF16)), SFT_OPTIMIZER), one_device_mesh())


def test_the_bfloat16_view_is_the_master_cast_and_is_sharded_alike():
    step, batch, state = _sft_step(), _sft_batch(), _bf16_state()
    shardings = state_shardings(state, one_device_mesh())
    assert jax.tree.structure(shardings.master_params) == jax.tree.structure(shardings.params)
    assert jax.tree.leaves(shardings.master_params) == jax.tree.leaves(shardings.params)
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.params))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.master_params))
        _assert_trees_equal(state.params, jax.tree.map(lambda m: m.astype(jnp.bfloat16), state.master_params))
    assert losses[-1] < losses[0], losses
    # The master holds more than the bfloat16 values: most of its weights are not representable in bfloat16.
    assert _fraction_changed(state.master_params, state.params) > 0.5
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)


def test_checkpoint_round_trips_the_master_and_training_resumes_identically(tmp_path):
    step, batch, state = _sft_step(), _sft_batch(), _bf16_state()
    for _ in range(2):
        state, _ = step(state, batch)
    saved = jax.tree.map(np.asarray, state)
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(2, state)
        checkpointer.wait()
        restored, _ = checkpointer.restore(target_state=_bf16_state())
    assert restored.master_params is not None
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(restored.master_params))
    _assert_trees_equal(jax.tree.map(np.asarray, restored), saved)

    for _ in range(2):
        state, live_metrics = step(state, batch)
        restored, resumed_metrics = step(restored, batch)
        assert float(live_metrics["loss"]) == float(resumed_metrics["loss"])
    assert int(restored.step) == 4
    _assert_trees_equal(jax.tree.map(np.asarray, restored), jax.tree.map(np.asarray, state))


def test_float32_params_have_no_master_and_follow_plain_adamw():
    params = init_params(F32)
    optimizer = make_optimizer(1e-3, weight_decay=0.1, max_grad_norm=1.0)
    state = create_train_state(_copy(params), optimizer)
    assert state.master_params is None
    n_params, n_opt = len(jax.tree.leaves(params)), len(jax.tree.leaves(optimizer.init(params)))
    assert len(jax.tree.leaves(state)) == 1 + n_params + n_opt  # the same state as before master weights

    # The same chain, applied by hand.
    plain = optax.chain(optax.clip_by_global_norm(1.0),
                        optax.adamw(optax.constant_schedule(1e-3), weight_decay=0.1, mask=decay_mask))

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def by_hand(params, opt_state, grads):
        updates, opt_state = plain.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    want_params, want_opt = _copy(params), plain.init(params)
    step = _apply_step(optimizer)
    rng = np.random.default_rng(10)
    for _ in range(4):  # a different gradient each step
        grads = jax.tree.map(lambda p: jnp.asarray(0.01 * rng.normal(size=p.shape), p.dtype), params)
        state = step(state, grads)
        want_params, want_opt = by_hand(want_params, want_opt, grads)
    assert int(state.step) == 4 and state.master_params is None
    _assert_trees_equal(state.params, want_params)
    _assert_trees_equal(state.opt_state, want_opt)
    assert _fraction_changed(state.params, params) > 0.99
