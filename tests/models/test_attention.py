"""Blockwise (online-softmax) attention against the dense computation: masks, GQA, caches, gradients, the model.

Tolerance: float32 throughout. The two forms sum the same products in a different order (per block, then
rescaled by exp(m_old - m_new)), which moves results by a few float32 ulps (6e-8 relative) of the largest
terms in each sum. Outputs are O(1), so 1e-5 absolute is ~100 ulps of headroom. A gradient entry is a sum
of ~T x S terms with cancellation, so its rounding error scales with the largest entries of that gradient,
not with the entry itself: gradients must agree within 1e-5 of the gradient's largest magnitude (~20 here).
Small blocks (16) make every case run over several query and key blocks; `_assert_tiled` checks that the
tiled code really ran.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftrl_jax import models
from ftrl_jax.models import transformer
from ftrl_jax.models.attention import AttentionMask, blockwise_attention, dot_product_attention, resolve_implementation

try:  # the sampler's home while the package is being reorganised
    from ftrl_jax.generate import sampling
except ImportError:  # pragma: no cover
    from ftrl_jax import sampling

ATOL = 1e-5
GRAD_TOL = 1e-5
BLOCK = 16


def _assert_grad_close(actual, desired, tol=GRAD_TOL):
    """|actual - desired| <= tol * max|desired| elementwise (see the module docstring)."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert np.all(np.isfinite(actual))
    np.testing.assert_allclose(actual, desired, atol=tol * max(1.0, float(np.abs(desired).max())), rtol=0)


def _qkv(b=2, h=8, kv=2, t=53, s=None, hd=16, seed=0):
    rng = np.random.default_rng(seed)
    s = t if s is None else s
    q = jnp.asarray(rng.normal(size=(b, h, t, hd)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, kv, s, hd)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, kv, s, hd)), jnp.float32)
    return q, k, v


def _left_padded(b, t, pads):
    valid = np.ones((b, t), bool)
    for row, pad in enumerate(pads):
        valid[row, :pad] = False
    return jnp.asarray(valid)


def _both(q, k, v, mask, **kw):
    """(dense, blockwise) outputs, each jitted."""
    dense = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask, impl="dense", **kw))
    tiled = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask, impl="blockwise", block_q=BLOCK,
                                                          block_k=BLOCK, **kw))
    return np.asarray(dense(q, k, v)), np.asarray(tiled(q, k, v))


def _assert_tiled(q, k, v, mask, **kw):
    """The blockwise call lowers to loops over blocks (not to the dense shortcut)."""
    fn = lambda q, k, v: dot_product_attention(q, k, v, mask, impl="blockwise", block_q=BLOCK, block_k=BLOCK, **kw)
    jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
    assert "while" in jaxpr or "scan" in jaxpr


def _grads(impl, q, k, v, mask, **kw):
    blocks = dict(block_q=BLOCK, block_k=BLOCK) if impl == "blockwise" else {}

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, mask, impl=impl, **blocks, **kw)
        weights = jnp.asarray(np.random.default_rng(7).normal(size=(out.shape[2], 1)), jnp.float32)
        return jnp.sum(jnp.sin(out) * weights)  # every position weighted differently

    return [np.asarray(g) for g in jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)]


@pytest.mark.parametrize("t", [50, 64, 67])
def test_causal_left_padded_gqa_matches_dense(t):
    q, k, v = _qkv(t=t)  # 8 query heads over 2 key/value heads
    mask = AttentionMask.causal_padding(_left_padded(2, t, [0, 23]))  # row 1: more than a block of padding
    _assert_tiled(q, k, v, mask)
    dense, tiled = _both(q, k, v, mask)
    np.testing.assert_allclose(tiled, dense, atol=ATOL, rtol=0)
    # Padding queries see nothing: zero output, in both.
    assert np.all(tiled[1, :, :23] == 0) and np.all(dense[1, :, :23] == 0)
    for g_dense, g_tiled in zip(_grads("dense", q, k, v, mask), _grads("blockwise", q, k, v, mask)):
        _assert_grad_close(g_tiled, g_dense)


def test_unequal_blocks_and_no_padding():
    q, k, v = _qkv(b=1, h=4, kv=4, t=61)
    mask = AttentionMask.causal_padding()
    dense = dot_product_attention(q, k, v, mask, impl="dense")
    tiled = dot_product_attention(q, k, v, mask, impl="blockwise", block_q=8, block_k=24)
    np.testing.assert_allclose(np.asarray(tiled), np.asarray(dense), atol=ATOL, rtol=0)


def test_comparison_is_not_vacuous():
    """The mask reaches the tiled code: dropping causality changes the answer a lot."""
    q, k, v = _qkv()
    causal = dot_product_attention(q, k, v, AttentionMask.causal_padding(), impl="blockwise", block_q=16, block_k=16)
    full = dot_product_attention(q, k, v, None, impl="blockwise", block_q=16, block_k=16)
    assert np.abs(np.asarray(causal) - np.asarray(full)).max() > 0.1


def test_queries_at_an_offset_into_a_longer_cache():
    """A prefill continuing a cache (5 queries at slots 40..44 of 70, traced offset) and a decode step
    (1 query at slot 44), with the cache partly filled and left-padded."""
    q, k, v = _qkv(t=5, s=70, seed=1)
    valid = np.zeros((2, 70), bool)
    valid[0, :45] = True
    valid[1, 9:45] = True
    offset = jnp.int32(40)
    mask = AttentionMask.causal_padding(jnp.asarray(valid), offset=offset)
    _assert_tiled(q, k, v, mask)
    run = jax.jit(lambda q, k, v, off, impl: dot_product_attention(
        q, k, v, AttentionMask.causal_padding(jnp.asarray(valid), offset=off), impl=impl, block_q=BLOCK,
        block_k=BLOCK), static_argnums=4)
    np.testing.assert_allclose(np.asarray(run(q, k, v, offset, "blockwise")), np.asarray(run(q, k, v, offset, "dense")),
                               atol=ATOL, rtol=0)
    for g_dense, g_tiled in zip(_grads("dense", q, k, v, mask), _grads("blockwise", q, k, v, mask)):
        _assert_grad_close(g_tiled, g_dense)
    # One query (decode), forced through the tiles (the dispatcher would compute it densely).
    q1 = q[:, :, 4:5]
    decode_mask = AttentionMask.causal_padding(jnp.asarray(valid), offset=jnp.int32(44))
    tiled = blockwise_attention(q1, [(k, v, decode_mask)], 0.25, block_q=BLOCK, block_k=BLOCK)
    dense = dot_product_attention(q1, k, v, decode_mask, impl="dense")
    np.testing.assert_allclose(np.asarray(tiled), np.asarray(dense), atol=ATOL, rtol=0)


def test_dense_mask_with_a_fully_masked_row():
    """The bool [B, T, S] mask convention; a row that sees nothing is zero and has finite zero gradients."""
    q, k, v = _qkv(t=40, s=58, seed=2)
    rng = np.random.default_rng(3)
    mask = rng.random((2, 40, 58)) < 0.5
    mask[0, 7] = False   # fully masked row
    mask[1, 30:] = False  # several
    mask = jnp.asarray(mask)
    _assert_tiled(q, k, v, mask)
    dense, tiled = _both(q, k, v, mask)
    np.testing.assert_allclose(tiled, dense, atol=ATOL, rtol=0)
    assert np.all(tiled[0, :, 7] == 0) and np.all(tiled[1, :, 30:] == 0)
    g_dense, g_tiled = _grads("dense", q, k, v, mask), _grads("blockwise", q, k, v, mask)
    for a, b in zip(g_dense, g_tiled):
        _assert_grad_close(b, a)
    assert np.all(g_tiled[0][0, :, 7] == 0)  # dq of the masked row


def test_shared_prefix_matches_dense():
    """Rows n = 2 per prompt attend to their prompt's left-padded cache, then causally to themselves."""
    q, k, v = _qkv(b=4, t=21, seed=4)
    pk, pv = _qkv(b=2, t=37, seed=5)[1:]
    prefix_valid = _left_padded(2, 37, [0, 18])
    own = AttentionMask.causal_padding(jnp.asarray(np.arange(21)[None, :] < np.array([[21], [15], [4], [21]])))
    prefix = (pk, pv, prefix_valid)
    _assert_tiled(q, k, v, own, prefix=prefix)
    dense, tiled = _both(q, k, v, own, prefix=prefix)
    np.testing.assert_allclose(tiled, dense, atol=ATOL, rtol=0)

    def grads(impl):
        blocks = dict(block_q=BLOCK, block_k=BLOCK) if impl == "blockwise" else {}
        loss = lambda q, k, v, pk, pv: jnp.sum(jnp.sin(dot_product_attention(
            q, k, v, own, prefix=(pk, pv, prefix_valid), impl=impl, **blocks)))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, pk, pv)

    for a, b in zip(grads("dense"), grads("blockwise")):
        _assert_grad_close(b, a)


def test_bfloat16_runs_and_tracks_dense():
    """bf16 inputs (scores, softmax and accumulation stay float32): forward and gradients run on CPU and stay
    within bf16 rounding of the dense computation."""
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(b=4, t=40))
    pk, pv = (x.astype(jnp.bfloat16) for x in _qkv(b=2, t=30, seed=1)[1:])
    mask = AttentionMask.causal_padding(_left_padded(4, 40, [0, 3, 0, 17]))
    prefix = (pk, pv, jnp.ones((2, 30), bool))
    dense, tiled = (np.asarray(x, np.float32) for x in _both(q, k, v, mask, prefix=prefix))
    np.testing.assert_allclose(tiled, dense, atol=3e-2, rtol=0)
    g_dense = _grads("dense", q, k, v, mask, prefix=prefix)
    g_tiled = _grads("blockwise", q, k, v, mask, prefix=prefix)
    for a, b in zip(g_dense, g_tiled):
        _assert_grad_close(b.astype(np.float32), a.astype(np.float32), tol=3e-2)


def test_training_memory_grows_linearly():
    """Forward + backward temporaries (XLA's own accounting): doubling T about doubles blockwise's at most,
    and quadruples dense's (the check would catch a quadratic blockwise)."""
    def temp_bytes(impl, t):
        spec = jax.ShapeDtypeStruct((1, 4, t, 32), jnp.float32)
        kv_spec = jax.ShapeDtypeStruct((1, 2, t, 32), jnp.float32)

        def loss(q, k, v):
            out = dot_product_attention(q, k, v, AttentionMask.causal_padding(), impl=impl, block_q=128, block_k=128)
            return jnp.sum(out ** 2)

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, kv_spec, kv_spec).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes("blockwise", 2048) < 2.2 * temp_bytes("blockwise", 1024)
    assert temp_bytes("dense", 2048) > 3.5 * temp_bytes("dense", 1024)


def test_cudnn_and_auto_fall_back_off_gpu():
    q, k, v = _qkv(t=40)
    mask = AttentionMask.causal_padding(_left_padded(2, 40, [0, 5]))
    if jax.default_backend() == "gpu":
        pytest.skip("checks the CPU/TPU fallback")
    assert resolve_implementation("auto") == "blockwise"
    ref = np.asarray(dot_product_attention(q, k, v, mask, impl="blockwise", block_q=BLOCK, block_k=BLOCK))
    for impl in ("cudnn", "auto"):
        out = dot_product_attention(q, k, v, mask, impl=impl, block_q=BLOCK, block_k=BLOCK)
        np.testing.assert_array_equal(np.asarray(out), ref)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        dot_product_attention(q, k, v, mask, impl="flash")


def test_cudnn_glue_with_a_stand_in_kernel(monkeypatch):
    """The cuDNN path's layout, scale and run-time dispatch, on CPU with XLA's kernel standing in for cuDNN
    (negated, to see which branch ran): right padding takes the kernel; left padding or a row with no
    valid key falls back to blockwise."""
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(t=40))
    xla_attention = jax.nn.dot_product_attention
    calls = []

    def stand_in(*args, implementation=None, **kw):
        calls.append(implementation)
        return -xla_attention(*args, implementation="xla", **kw)

    right = jnp.asarray(np.arange(40)[None, :] < np.array([[40], [27]]))
    cases = {"right": right, "left": _left_padded(2, 40, [0, 9]), "empty_row": right.at[1].set(False)}
    refs = {name: np.asarray(dot_product_attention(q, k, v, AttentionMask.causal_padding(valid), impl="blockwise",
                                                   block_q=BLOCK, block_k=BLOCK), np.float32)
            for name, valid in cases.items()}
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
    for name, valid in cases.items():
        out = dot_product_attention(q, k, v, AttentionMask.causal_padding(valid), impl="auto", block_q=BLOCK,
                                    block_k=BLOCK)
        sign = -1.0 if name == "right" else 1.0
        np.testing.assert_allclose(np.asarray(out, np.float32), sign * refs[name], atol=2e-2, rtol=0, err_msg=name)
    assert calls and set(calls) == {"cudnn"}


# ---------------------------------------------------------------------------- the model

def _configs(num_layers=2):
    tiny = models.preset("tiny", vocab_size=300, num_layers=num_layers, attention_block_size=BLOCK)
    qwen3 = models.preset("tiny", model_type="qwen3", vocab_size=300, num_layers=num_layers, num_heads=8,
                          num_kv_heads=2, head_dim=32, attention_bias=False, qk_norm=True, tie_word_embeddings=False,
                          attention_block_size=BLOCK)
    return {"tiny": tiny, "qwen3": qwen3}


def _padded_batch(vocab):
    ids = jnp.asarray(np.random.default_rng(0).integers(0, vocab, size=(3, 58)))
    mask = np.ones((3, 58), np.int32)
    mask[1, :20] = 0  # left padded
    mask[2, 41:] = 0  # right padded
    return ids, jnp.asarray(mask)


@pytest.mark.parametrize("name", ["tiny", "qwen3"])
def test_model_forward_matches_dense(name):
    config = _configs()[name]
    params = models.init_params(config, jax.random.PRNGKey(0))
    ids, mask = _padded_batch(config.vocab_size)
    forward = jax.jit(models.forward, static_argnums=0)
    logits = {impl: np.asarray(forward(config.replace(attention_impl=impl), params, ids, mask))
              for impl in ("dense", "blockwise")}
    assert np.all(np.isfinite(logits["blockwise"]))
    np.testing.assert_allclose(logits["blockwise"], logits["dense"], atol=ATOL, rtol=0)


def test_model_gradients_match_dense():
    """Parameter gradients of a masked log-likelihood (one Qwen3-style layer, remat as in training)."""
    config = _configs(num_layers=1)["qwen3"]
    params = models.init_params(config, jax.random.PRNGKey(0))
    ids, mask = _padded_batch(config.vocab_size)

    def loss(params, impl):
        hidden = models.hidden_states(config.replace(attention_impl=impl), params, ids, mask, remat=True)
        logp = jax.nn.log_softmax(models.logits_from_hidden(config, params, hidden))
        return jnp.sum(jnp.where(mask[..., None] > 0, logp[..., :8], 0.0))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    for a, b in zip(jax.tree.leaves(grad(params, "dense")), jax.tree.leaves(grad(params, "blockwise"))):
        _assert_grad_close(b, a)


def test_shared_prompt_hidden_states_match_dense():
    config = _configs(num_layers=1)["qwen3"]
    params = models.init_params(config, jax.random.PRNGKey(1))
    rng = np.random.default_rng(1)
    prompts = jnp.asarray(rng.integers(0, 300, size=(2, 40)))
    prompt_mask = jnp.asarray(np.arange(40)[None, :] >= np.array([[0], [13]]))
    responses = jnp.asarray(rng.integers(0, 300, size=(4, 24)))
    response_mask = jnp.asarray(np.arange(24)[None, :] < np.array([[24], [9], [17], [1]]))
    out = {impl: models.shared_prompt_hidden_states(config.replace(attention_impl=impl), params, prompts, prompt_mask,
                                                    responses, response_mask)
           for impl in ("dense", "blockwise")}
    for a, b in zip(out["dense"], out["blockwise"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=ATOL, rtol=0)


def test_prefill_mask_forms_agree():
    """prefill's bool [B, T, T] mask (the sampler's) and its [B, T] validity (linear memory) agree."""
    config = _configs(num_layers=1)["tiny"].replace(attention_impl="blockwise")
    params = models.init_params(config, jax.random.PRNGKey(2))
    valid = _left_padded(2, 48, [0, 17])
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 300, size=(2, 48)))
    positions = transformer.positions_from_mask(valid)
    h_dense_mask, cache_a = models.prefill(config, params, ids, positions, transformer.causal_mask(valid))
    h_valid, cache_b = models.prefill(config, params, ids, positions, valid)
    np.testing.assert_allclose(np.asarray(h_valid), np.asarray(h_dense_mask), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(cache_b.k[0]), np.asarray(cache_a.k[0]), atol=ATOL, rtol=0)


def test_greedy_generation_is_identical():
    """Prompts long enough that the prefill (256 slots) and every decode step (1 x 272 keys) run tiled."""
    config = _configs()["tiny"]
    params = models.init_params(config, jax.random.PRNGKey(3))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, 300, size=n).tolist() for n in (150, 131, 150)]
    out = {impl: sampling.generate(config.replace(attention_impl=impl), params, prompts, max_new_tokens=12)
           for impl in ("dense", "blockwise")}
    assert out["blockwise"].tokens == out["dense"].tokens
    np.testing.assert_allclose(np.concatenate(out["blockwise"].logprobs), np.concatenate(out["dense"].logprobs),
                               atol=1e-4)


def test_config_field_stays_out_of_config_json():
    config = models.preset("tiny", attention_impl="dense", attention_block_size=64)
    hf = models.config_to_hf(config)
    assert not any("attention_impl" in key or "block" in key for key in hf)
    back = models.config_from_hf(hf)
    assert back.attention_impl == "auto" and back.attention_block_size == 512
    assert dataclasses.replace(back, attention_impl="dense", attention_block_size=64, eos_token_id=None,
                               pad_token_id=None) == config.replace(eos_token_id=None, pad_token_id=None)
    with pytest.raises(ValueError, match="attention_impl"):
        models.preset("tiny", attention_impl="flash")
