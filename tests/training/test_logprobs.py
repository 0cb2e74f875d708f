"""Chunked log-probs and entropies against the plain full-logits computation."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftrl_jax.training import logprobs as logprobs_module

# Jitted as the trainer will use them; one compile is cheaper than dispatching every op eagerly.
token_logprobs_and_entropy = jax.jit(
    logprobs_module.token_logprobs_and_entropy, static_argnames=("chunk_size", "temperature")
)
token_logprobs_from_logits = jax.jit(logprobs_module.token_logprobs_from_logits, static_argnames=("temperature",))

BATCH, TIME, WIDTH, VOCAB = 2, 10, 8, 37


def _inputs(seed=0, dtype=jnp.float32):
    # NumPy draws: eager jax.random ops would each be compiled, which costs seconds.
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(BATCH, TIME, WIDTH)), dtype)
    head = jnp.asarray(rng.normal(size=(WIDTH, VOCAB)) / math.sqrt(WIDTH), dtype)
    targets = jnp.asarray(rng.integers(0, VOCAB, size=(BATCH, TIME)), jnp.int32)
    return hidden, head, targets


@functools.partial(jax.jit, static_argnames=("temperature",))
def _plain(hidden, head, targets, temperature=1.0):
    logits = jnp.einsum("btd,dv->btv", hidden.astype(jnp.float32), head.astype(jnp.float32))
    return token_logprobs_from_logits(logits, targets, temperature)


def test_plain_version_hand_computed():
    logits = jnp.array([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # probabilities [1/4, 3/4] and [1/2, 1/2]
    logprobs, entropy = token_logprobs_from_logits(logits, jnp.array([[1, 0]]))
    np.testing.assert_allclose(np.asarray(logprobs), [[math.log(0.75), math.log(0.5)]], rtol=1e-6)
    expected_entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    np.testing.assert_allclose(np.asarray(entropy), [[expected_entropy, math.log(2.0)]], rtol=1e-6)
    # Temperature 2 halves the logits: [0, log 3 / 2] -> probabilities 1 / (1 + sqrt 3), sqrt 3 / (1 + sqrt 3).
    logprobs, _ = token_logprobs_from_logits(logits, jnp.array([[1, 0]]), temperature=2.0)
    np.testing.assert_allclose(float(logprobs[0, 0]), math.log(math.sqrt(3) / (1 + math.sqrt(3))), rtol=1e-6)


@pytest.mark.parametrize("chunk_size, temperature", [(4, 1.0), (3, 0.7), (128, 1.0)])
def test_chunked_values_match_plain(chunk_size, temperature):
    hidden, head, targets = _inputs()
    chunked = token_logprobs_and_entropy(hidden, head, targets, chunk_size=chunk_size, temperature=temperature)
    plain = _plain(hidden, head, targets, temperature)
    for got, want in zip(chunked, plain):
        assert got.shape == (BATCH, TIME) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_chunked_gradients_match_plain_for_time_not_divisible_by_chunk():
    hidden, head, targets = _inputs(1)
    weights = jnp.asarray(np.random.default_rng(7).normal(size=(2, BATCH, TIME)), jnp.float32)

    def objective(compute):
        def scalar(hidden, head):
            logprobs, entropy = compute(hidden, head)
            return jnp.sum(weights[0] * logprobs) + jnp.sum(weights[1] * entropy)

        return jax.jit(jax.value_and_grad(scalar, argnums=(0, 1)))(hidden, head)

    chunked_value, chunked_grads = objective(lambda h, w: token_logprobs_and_entropy(h, w, targets, chunk_size=4))
    plain_value, plain_grads = objective(lambda h, w: _plain(h, w, targets))
    np.testing.assert_allclose(float(chunked_value), float(plain_value), rtol=1e-5)
    for got, want in zip(chunked_grads, plain_grads):
        assert np.abs(np.asarray(want)).max() > 1e-3
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_low_precision_inputs_return_float32():
    hidden, head, targets = _inputs(2, jnp.bfloat16)
    logprobs, entropy = token_logprobs_and_entropy(hidden, head, targets, chunk_size=4)
    assert logprobs.dtype == jnp.float32 and entropy.dtype == jnp.float32
    plain_logprobs, plain_entropy = _plain(hidden, head, targets)
    np.testing.assert_allclose(np.asarray(logprobs), np.asarray(plain_logprobs), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy), np.asarray(plain_entropy), rtol=1e-5, atol=1e-5)


def _all_shapes(jaxpr):
    """Shapes of every value produced anywhere in a jaxpr, nested scan/remat bodies included."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(getattr(var.aval, "shape", ()))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_shapes(inner)


def _largest_vocab_sized_value(compute, hidden, head):
    def scalar(hidden, head):
        logprobs, entropy = compute(hidden, head)
        return jnp.sum(logprobs) + jnp.sum(entropy)

    closed = jax.make_jaxpr(jax.grad(scalar, argnums=(0, 1)))(hidden, head)
    # The head and its gradient ([D, V]) are inherent; everything else vocab-wide is logits-like.
    sizes = [
        math.prod(shape)
        for shape in _all_shapes(closed.jaxpr)
        if shape and shape[-1] == VOCAB and shape != (WIDTH, VOCAB)
    ]
    return max(sizes)


def test_forward_and_backward_never_hold_more_than_one_chunk_of_logits():
    hidden, head, targets = _inputs()
    chunk = 3
    chunked = _largest_vocab_sized_value(
        lambda h, w: logprobs_module.token_logprobs_and_entropy(h, w, targets, chunk_size=chunk), hidden, head
    )
    plain = _largest_vocab_sized_value(lambda h, w: _plain(h, w, targets), hidden, head)
    assert chunked == BATCH * chunk * VOCAB
    assert plain >= BATCH * TIME * VOCAB  # the check does see full logits when they exist


@pytest.mark.parametrize(
    "hidden_shape, head_shape, target_shape, message",
    [
        ((2, 5, 8), (7, 11), (2, 5), r"hidden \[B, T, D\] and head \[D, V\]"),
        ((2, 5, 8), (8, 11), (2, 4), r"targets \(2, 4\) must match"),
    ],
)
def test_bad_shapes_are_reported(hidden_shape, head_shape, target_shape, message):
    with pytest.raises(ValueError, match=message):
        logprobs_module.token_logprobs_and_entropy(
            jnp.zeros(hidden_shape), jnp.zeros(head_shape), jnp.zeros(target_shape, jnp.int32)
        )


def test_bad_chunk_size_is_reported():
    hidden, head, targets = _inputs()
    with pytest.raises(ValueError, match="chunk_size=0 must be a positive int"):
        logprobs_module.token_logprobs_and_entropy(hidden, head, targets, chunk_size=0)
