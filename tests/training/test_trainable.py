"""Trainable-parameter masks and weight decay in `make_optimizer`: which weights each `trainable` spec
selects, frozen weights bit-for-bit unchanged after AdamW steps with weight decay (float32 params and
bfloat16 params with a float32 master copy), decoupled decay masked like the update, clear errors."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftrl_jax import models
from ftrl_jax.training import optim
from ftrl_jax.training.optim import make_optimizer, num_trainable, parameter_paths, trainable_mask
from ftrl_jax.training.train_state import apply_gradients, create_train_state
from tests.cached_models import init_params

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# Six layers: the lower third is layers 0 and 1.
F32 = models.preset("tiny", vocab_size=128, num_layers=6, hidden_size=32, intermediate_size=48, num_heads=2,
                    head_dim=16, num_kv_heads=1)
BF16 = models.preset("tiny", vocab_size=128, num_layers=6, hidden_size=32, intermediate_size=48, num_heads=2,
                     head_dim=16, num_kv_heads=1, param_dtype="bfloat16", dtype="bfloat16")
LR, WD = 1e-2, 0.1


def _size(shape):
    return int(np.prod(shape))


def test_presets_select_their_parameters():
    params = init_params(F32)
    layers = params["layers"]
    mlp_per_layer = sum(_size(x.shape[1:]) for x in jax.tree.leaves(layers["mlp"]))
    attention_per_layer = sum(_size(x.shape[1:]) for x in jax.tree.leaves(layers["self_attn"]))
    total = sum(x.size for x in jax.tree.leaves(params))
    assert num_trainable(params, "all") == total
    assert num_trainable(params, "mlp") == 6 * mlp_per_layer
    assert num_trainable(params, "lower_mlp") == 2 * mlp_per_layer
    assert num_trainable(params, "attention") == 6 * attention_per_layer
    assert num_trainable(params, r"^norm/scale$") == 32
    # A regex sees one layer at a time.
    assert num_trainable(params, r"^layers/5/mlp/down_proj/") == 48 * 32
    mask = trainable_mask(params, "lower_mlp")
    np.testing.assert_array_equal(mask["layers"]["mlp"]["up_proj"]["kernel"].ravel(),
                                  [True, True, False, False, False, False])
    assert mask["layers"]["mlp"]["up_proj"]["kernel"].shape == (6, 1, 1)
    assert not mask["embed_tokens"]["embedding"] and not mask["layers"]["self_attn"]["q_proj"]["kernel"].any()
    assert "layers/0/mlp/gate_proj/kernel" in parameter_paths(params)


@pytest.mark.parametrize("layers, lower", [(1, [0]), (2, [0]), (3, [0]), (4, [0, 1]), (28, list(range(10)))])
def test_lower_third_rounds_up(layers, lower):
    regex = optim.TRAINABLE_PRESETS["lower_mlp"](layers)
    chosen = [i for i in range(layers) if re.search(regex, f"layers/{i}/mlp/up_proj/kernel")]
    assert chosen == lower


@pytest.mark.parametrize("spec, message", [
    ("mpl", r"trainable='mpl' matches no parameter; .*layers/<i>/mlp/down_proj/kernel.*\(<i> = 0..5\)"),
    ("(", "neither a preset .* nor a valid regular expression"),
])
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        trainable_mask(init_params(F32), spec)
    with pytest.raises(ValueError, match=message):  # already when the optimizer state is created
        create_train_state(init_params(F32), make_optimizer(LR, trainable=spec))


def _gradient(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)


@functools.lru_cache(maxsize=None)
def _apply_step(optimizer):
    return jax.jit(functools.partial(apply_gradients, optimizer=optimizer), compiler_options=FAST_COMPILE)


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def _run(config, spec, steps=3):
    params = jax.tree.map(jnp.copy, init_params(config))
    # A frozen -0.0 must stay -0.0 (adding +0.0 would turn it into +0.0).
    params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"].at[0, 0].set(-0.0)
    optimizer = make_optimizer(LR, weight_decay=WD, trainable=spec)
    state = create_train_state(params, optimizer)
    step = _apply_step(optimizer)
    for i in range(steps):
        state = step(state, _gradient(params, seed=i))
    return params, state


@pytest.mark.parametrize("config", [F32, BF16], ids=["float32", "bfloat16_master"])
def test_frozen_parameters_stay_bit_for_bit_with_weight_decay(config):
    params, state = _run(config, "lower_mlp")
    assert (state.master_params is not None) == (config is BF16)
    mask = trainable_mask(params, "lower_mlp")
    trees = [state.params] + ([state.master_params] if state.master_params is not None else [])
    for tree in trees:
        for before, after, keep in zip(jax.tree.leaves(params), jax.tree.leaves(tree), jax.tree.leaves(mask)):
            keep = np.broadcast_to(keep, before.shape)
            before = np.asarray(before.astype(after.dtype))
            after = np.asarray(after)
            np.testing.assert_array_equal(_bits(after)[~keep], _bits(before)[~keep])
            if keep.any():  # the trained slices moved
                assert np.mean(after[keep] != before[keep]) > 0.9
    assert _bits(state.params["embed_tokens"]["embedding"])[0, 0] == _bits(np.array(-0.0, state.params[
        "embed_tokens"]["embedding"].dtype))


def test_all_is_the_unmasked_optimizer():
    a = _run(F32, "all")[1]
    b = _run(F32, r".")[1]  # a regex matching everything takes the masked path
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_weight_decay_is_decoupled_and_masked():
    # With a zero gradient Adam's step is 0, so what moves a weight is the decoupled decay alone:
    # w <- w - lr * wd * w on decayed, trainable leaves; nothing on norm scales, biases or frozen weights.
    # (An L2 term added to the gradient would instead move every weight by about lr, Adam-normalised.)
    params = jax.tree.map(jnp.copy, init_params(F32))
    optimizer = make_optimizer(LR, weight_decay=WD, trainable="mlp")
    state = create_train_state(params, optimizer)
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = _apply_step(optimizer)(state, zeros)
    mlp_kernel = np.asarray(params["layers"]["mlp"]["down_proj"]["kernel"])
    np.testing.assert_allclose(np.asarray(state.params["layers"]["mlp"]["down_proj"]["kernel"]),
                               mlp_kernel * (1 - LR * WD), rtol=1e-6)
    for path in (("layers", "self_attn", "q_proj", "kernel"), ("layers", "input_layernorm", "scale"),
                 ("embed_tokens", "embedding")):
        before, after = params, state.params
        for key in path:
            before, after = before[key], after[key]
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before), err_msg="/".join(path))
    # Norm scales that train are not decayed either.
    state = create_train_state(params, make_optimizer(LR, weight_decay=WD))
    state = _apply_step(make_optimizer(LR, weight_decay=WD))(state, zeros)
    np.testing.assert_array_equal(np.asarray(state.params["norm"]["scale"]), np.asarray(params["norm"]["scale"]))
