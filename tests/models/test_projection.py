"""The model's projection matmul: rows flattened to [N, D] give what one dot_general over the rows gives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftrl_jax.models.transformer import _dot_accumulate_f32

CONTRACT_LAST = (((2,), (0,)), ((), ()))


def _reference(x, w, numbers):
    return jax.lax.dot_general(x, w, numbers, preferred_element_type=jnp.float32).astype(jnp.result_type(x, w))


@pytest.mark.parametrize("shape", [(2, 3, 8), (4, 1, 8), (2, 3, 5, 8), (6, 8)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_projection_equals_one_dot_general_with_its_gradients(shape, dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), dtype)
    w = jnp.asarray(rng.normal(size=(8, 5)), dtype)
    numbers = (((x.ndim - 1,), (0,)), ((), ()))  # what flax's nn.Dense passes
    got, want = _dot_accumulate_f32(x, w, numbers), _reference(x, w, numbers)
    assert got.shape == shape[:-1] + (5,) and got.dtype == want.dtype == jnp.dtype(dtype)
    tol = 1e-6 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
    loss = lambda f: lambda x, w: jnp.sum(f(x, w, numbers).astype(jnp.float32) ** 2)  # noqa: E731
    for g, h in zip(jax.grad(loss(_dot_accumulate_f32), argnums=(0, 1))(x, w),
                    jax.grad(loss(_reference), argnums=(0, 1))(x, w), strict=True):
        assert g.shape == h.shape and g.dtype == h.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(h, np.float32), rtol=tol * 10, atol=tol * 10)


def test_other_dimension_numbers_go_to_dot_general_unchanged():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
    batched = jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32)
    numbers = (((2,), (1,)), ((0,), (0,)))  # a batch dimension: not a projection
    np.testing.assert_array_equal(np.asarray(_dot_accumulate_f32(x, batched, numbers)),
                                  np.asarray(_reference(x, batched, numbers)))
    w = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    np.testing.assert_allclose(np.asarray(_dot_accumulate_f32(x, w, CONTRACT_LAST)),
                               np.asarray(_reference(x, w, CONTRACT_LAST)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("numbers", [(((1,), (0,)), ((), ())), (((2,), (1,)), ((), ())), (((1,), (1,)), ((), ()))],
                         ids=["rows-contract-middle-axis", "kernel-contract-its-last-axis", "both"])
def test_contractions_other_than_last_axis_by_first_are_not_flattened(numbers):
    """Square operands, so a wrongly flattened contraction gives wrong values, not a shape error."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 8, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(_dot_accumulate_f32(x, w, numbers)),
                                  np.asarray(_reference(x, w, numbers)))


def _dot_general_operand_ranks(fn, *args) -> list[tuple[int, int]]:
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return [(len(e.invars[0].aval.shape), len(e.invars[1].aval.shape)) for e in jaxpr.eqns
            if e.primitive.name == "dot_general"]


def test_a_projection_of_3d_rows_and_its_kernel_gradient_are_2d_matmuls():
    x = jnp.ones((2, 3, 8), jnp.float32)
    w = jnp.ones((8, 5), jnp.float32)
    assert _dot_general_operand_ranks(lambda x, w: _dot_accumulate_f32(x, w, CONTRACT_LAST), x, w) == [(2, 2)]
    grads = jax.grad(lambda x, w: jnp.sum(_dot_accumulate_f32(x, w, CONTRACT_LAST) ** 2), argnums=(0, 1))
    ranks = _dot_general_operand_ranks(grads, x, w)
    assert ranks and all(r == (2, 2) for r in ranks), ranks
    # The baseline form keeps [B, T, D] rows: the check can tell them apart.
    assert (3, 2) in _dot_general_operand_ranks(lambda x, w: _reference(x, w, CONTRACT_LAST), x, w)
