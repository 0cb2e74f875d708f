"""Oracle-trajectory warm start: gold conversations, masks, and deterministic length-grouped batches."""

import numpy as np

from ftrl_jax.training import warmstart
from ftrl_jax.envs import build
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.envs.rewards import trajectory_metrics
from ftrl_jax.text.tokenizer import default_tokenizer


def test_oracle_conversations_solve_and_mask_only_assistant_text():
    envs, _ = build.build_environments(6, seed=3, complexity="low")
    samples = [e.to_sample() for e in envs]
    with Sandbox(num_workers=1) as sandbox:
        conversations = warmstart.oracle_conversations(samples, sandbox)
    for sample, messages in zip(samples, conversations):
        assert messages[-1] == {"role": "assistant", "content": sample.answer}
        assert trajectory_metrics(messages, sample)["solve_f1"] == 1.0
    tokenizer = default_tokenizer()
    ex = warmstart.encode_conversations(conversations, samples, tokenizer, template="qwen2.5", enable_thinking=False,
                                        max_len=4096)
    assert len(ex) == 6 and ex.dropped_too_long == 0
    for ids, mask, sample in zip(ex.ids, ex.loss_masks, samples):
        trained = tokenizer.decode(ids[mask == 1])
        assert "<tool_call>" in trained and sample.answer in trained
        assert "Question:" not in trained and "<tool_response>" not in trained
    short = warmstart.encode_conversations(conversations, samples, tokenizer, template="qwen2.5",
                                           enable_thinking=False, max_len=min(len(i) for i in ex.ids) - 1)
    assert len(short) == 0 and short.dropped_too_long == 6


def test_batches_are_grouped_deterministic_and_resumable():
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 700, size=37)
    ex = warmstart.SupervisedExamples([np.arange(n, dtype=np.int32) for n in lengths],
                                      [np.ones(n, np.int32) for n in lengths])
    first = warmstart.batches(ex, 4, seed=1, start_step=0, pad_id=0)
    run = [next(first) for _ in range(25)]  # crosses an epoch boundary (9 batches per epoch)
    resumed = warmstart.batches(ex, 4, seed=1, start_step=11, pad_id=0)
    for k in range(11, 25):
        got = next(resumed)
        for key in run[k]:
            np.testing.assert_array_equal(got[key], run[k][key])
    for batch in run:
        assert batch["tokens"].shape[1] % 128 == 0
        assert batch["tokens"].shape[0] == 4
    # Grouping by length pads less than random batches would.
    padding = np.mean([1 - b["attention_mask"].mean() for b in run])
    assert padding < 0.35
