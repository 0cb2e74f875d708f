"""Checks every shipped policy gets (tests/policies/test_shipped*.py): its tokenizer and chat template against
the native Qwen2.5 renderer, and greedy play of held-out environments as the main job's evaluation plays them."""

from __future__ import annotations

from collections.abc import Sequence

from ftrl_jax import models
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.rollout.evaluation import evaluate
from ftrl_jax.rollout.policy import LocalPolicy
from ftrl_jax.text.chat import render_conversation
from ftrl_jax.text.tokenizer import load_tokenizer


def assert_round_trips_chat_template(path: str, samples: Sequence) -> None:
    """Each sample's prompt, rendered natively, encodes and decodes to itself, and the policy's own chat template
    renders exactly that text."""
    tokenizer = load_tokenizer(path)
    for sample in samples:
        text = render_conversation(sample.messages, sample.tools, template="qwen2.5")
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
        assert tokenizer.apply_chat_template(sample.messages, tools=sample.tools, tokenize=False,
                                             add_generation_prompt=True) == text


def greedy_solve_f1(path: str, samples: Sequence) -> list[float]:
    """Per-episode Solve-F1 of the policy at `path` playing `samples` greedily in float32 (6 turns of 96 new
    tokens, the tiny presets' evaluation settings)."""
    model_config, params = models.load_pretrained(path, dtype="float32")
    policy = LocalPolicy(model_config, params, load_tokenizer(path), template="qwen2.5", max_new_tokens=96,
                         temperature=0.0, seed=0)
    with Sandbox() as sandbox:
        report = evaluate(policy, samples, max_turns=6, sandbox=sandbox)
    return [row["solve_f1"] for row in report.episodes]
