"""The jit KV-cache sampler: greedy parity with transformers, stopping, sampling controls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftrl_jax import models
from ftrl_jax.generate.sampling import bucket, generate, pad_prompts
from tests.hf_reference import save_hf_model, torch


@pytest.mark.parametrize("name", ["qwen2_tied", "qwen3_untied", "llama3_untied"])
def test_greedy_matches_transformers_generate(name, tmp_path):
    hf_model = save_hf_model(name, tmp_path)
    config, params = models.load_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, size=n).tolist() for n in (5, 12, 1, 20)]
    ours = generate(config, params, prompts, max_new_tokens=24)
    for prompt, tokens in zip(prompts, ours.tokens):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=24, do_sample=False,
                                    min_new_tokens=24, pad_token_id=0, eos_token_id=None)
        assert tokens == ref[0, len(prompt):].tolist()


def test_logprobs_match_forward(tmp_path):
    """Each returned log-prob equals log_softmax of a full forward pass over prompt + generated tokens."""
    config = models.preset("tiny", vocab_size=211, num_layers=2)
    params = models.init_params(config, jax.random.PRNGKey(0))
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11, 12, 13]]
    res = generate(config, params, prompts, max_new_tokens=9, temperature=0.7, rng=jax.random.PRNGKey(1))
    for prompt, toks, lps in zip(prompts, res.tokens, res.logprobs):
        seq = jnp.asarray([prompt + toks])
        logits = models.forward(config, params, seq)[0] / 0.7
        logp = jax.nn.log_softmax(logits, axis=-1)
        expect = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(toks)]
        np.testing.assert_allclose(lps, expect, atol=2e-4)


def test_repeated_prompts_share_one_prefill_and_still_sample_independently():
    """n copies of a prompt (group RL) decode from one shared prompt cache: each row's log-probs equal a full
    forward pass over its own sequence, rows differ, and greedy copies equal the prompt decoded alone."""
    config = models.preset("tiny", vocab_size=211, num_layers=2)
    params = models.init_params(config, jax.random.PRNGKey(0))
    a, b = [3, 4, 5, 6, 7], [9, 10, 11]
    prompts = [a, b, a, a, b, [12]]  # groups of 3, 2 and 1, interleaved
    res = generate(config, params, prompts, max_new_tokens=10, temperature=1.0, rng=jax.random.PRNGKey(3))
    for prompt, toks, lps in zip(prompts, res.tokens, res.logprobs):
        logp = jax.nn.log_softmax(models.forward(config, params, jnp.asarray([prompt + toks]))[0], axis=-1)
        np.testing.assert_allclose(lps, [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(toks)], atol=2e-4)
    assert len({tuple(res.tokens[i]) for i in (0, 2, 3)}) > 1  # samples of one prompt are not copies
    greedy = generate(config, params, prompts, max_new_tokens=10)
    alone = generate(config, params, [a, b, [12]], max_new_tokens=10)
    assert greedy.tokens == [alone.tokens[i] for i in (0, 1, 0, 0, 1, 2)]


def test_bfloat16_decoding_tracks_a_bfloat16_forward():
    """In bfloat16 the cached decode (per-layer buffers, f32 accumulation) stays close to a full forward pass."""
    config = models.preset("tiny", vocab_size=211, num_layers=3, dtype="bfloat16", param_dtype="bfloat16")
    params = models.init_params(config, jax.random.PRNGKey(0))
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11, 12, 13]]
    res = generate(config, params, prompts, max_new_tokens=12)
    for prompt, toks, lps in zip(prompts, res.tokens, res.logprobs):
        logp = jax.nn.log_softmax(models.forward(config, params, jnp.asarray([prompt + toks]))[0], axis=-1)
        expect = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(toks)]
        np.testing.assert_allclose(lps, expect, atol=0.05)
        assert all(np.isfinite(lps)) and max(abs(x) for x in lps) > 0.1  # real log-probs, not zeros


def test_stop_tokens_end_each_row_independently():
    config = models.preset("tiny", vocab_size=64, num_layers=1)
    params = models.init_params(config, jax.random.PRNGKey(2))
    prompts = [[1, 2, 3], [4, 5], [6]]
    free = generate(config, params, prompts, max_new_tokens=12)
    stop = free.tokens[0][3]  # a token the first row emits at step 3
    res = generate(config, params, prompts, max_new_tokens=12, stop_token_ids=[stop])
    for full, cut, stopped in zip(free.tokens, res.tokens, res.stopped):
        if stop in full:
            k = full.index(stop)
            assert cut == full[: k + 1] and stopped
        else:
            assert cut == full and not stopped
    assert res.tokens[0][-1] == stop and len(res.tokens[0]) == free.tokens[0].index(stop) + 1
    assert all(len(t) == len(lp) for t, lp in zip(res.tokens, res.logprobs))


def test_sampling_controls():
    config = models.preset("tiny", vocab_size=50, num_layers=1)
    params = models.init_params(config, jax.random.PRNGKey(3))
    prompts = [[1, 2]] * 8
    greedy = generate(config, params, prompts[:1], max_new_tokens=1).tokens[0][0]
    # top_k=1 is greedy whatever the temperature.
    k1 = generate(config, params, prompts, max_new_tokens=1, temperature=2.0, top_k=1, rng=jax.random.PRNGKey(4))
    assert all(t == [greedy] for t in k1.tokens)
    # A tiny top_p keeps only the most likely token too.
    p0 = generate(config, params, prompts, max_new_tokens=1, temperature=2.0, top_p=1e-6, rng=jax.random.PRNGKey(4))
    assert all(t == [greedy] for t in p0.tokens)
    # Plain sampling is reproducible from the key and varies across rows.
    a = generate(config, params, prompts, max_new_tokens=6, temperature=1.5, rng=jax.random.PRNGKey(5))
    b = generate(config, params, prompts, max_new_tokens=6, temperature=1.5, rng=jax.random.PRNGKey(5))
    assert a.tokens == b.tokens
    assert len({tuple(t) for t in a.tokens}) > 1
    with pytest.raises(ValueError, match="rng"):
        generate(config, params, prompts, max_new_tokens=2, temperature=1.0)


def test_buckets_and_padding():
    assert [bucket(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
    tokens, mask, active = pad_prompts([[1, 2, 3], [4]])
    assert tokens.shape == (2, 16) and tokens[0, -3:].tolist() == [1, 2, 3] and mask.sum() == 4
    tokens, mask, active = pad_prompts([[1]] * 3)
    assert tokens.shape[0] == 4 and active.tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pad_prompts([[1], []])
    config = models.preset("tiny", vocab_size=32, num_layers=1)
    params = models.init_params(config, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="prompt 2 is empty"):  # named by its place in the caller's list
        generate(config, params, [[1], [1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(config, params, [], max_new_tokens=2)
