"""Greedy tokens do not depend on which prompts share a `generate` call (what micro-batching relies on)."""

import jax
import numpy as np

from ftrl_jax import models
from ftrl_jax.generate.sampling import bucket, generate


def test_greedy_tokens_do_not_depend_on_batch_padding_or_prompt_bucket():
    """Prompts of 3 to 200 tokens (buckets 16, 64 and 256) and a group of three copies, generated all
    together (padded to 256 tokens) and split by length with a copy apart from its group: the
    same greedy tokens, and log-probs equal up to float32 rounding (reductions over differently padded rows)."""
    config = models.preset("tiny", vocab_size=211, num_layers=1)
    params = models.init_params(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, config.vocab_size, size=n).tolist() for n in (3, 9, 40, 60, 200)]
    prompts += [prompts[2]] * 3  # rows 5, 6, 7
    assert {bucket(len(p)) for p in prompts} == {16, 64, 256}
    together = generate(config, params, prompts, max_new_tokens=10)
    assert len({tuple(t) for t in together.tokens}) == 5  # the distinct prompts' rows really differ
    # Rows 0-1 in bucket 16 instead of 256, rows 2-3 in 64, row 6 apart from the other copies of prompt 2.
    parts = [[0, 1], [4, 6], [7, 3, 2, 5]]
    for part in parts:
        result = generate(config, params, [prompts[i] for i in part], max_new_tokens=10)
        for j, i in enumerate(part):
            assert result.tokens[j] == together.tokens[i], (part, i)
            np.testing.assert_allclose(result.logprobs[j], together.logprobs[i], atol=1e-5)
