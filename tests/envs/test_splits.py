"""The fixed question partition: held-out questions never reach training builds, whatever the seeds."""

import collections

import pytest

from ftrl_jax.envs import build, splits
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.pipeline.main_job import build_split
from ftrl_jax.envs.world import TINY_WORLD

KINDS = ["single_hop", "parallel_single_hop", "multi_hop", "parallel_multi_hop"]


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(num_workers=2, timeout=5.0) as box:
        yield box


def test_partition_is_a_fixed_function_of_the_text_holding_out_about_a_quarter():
    questions = [f"What is the capital of country number {i}?" for i in range(4000)]
    held = [q for q in questions if splits.is_held_out(q)]
    assert 0.22 < len(held) / len(questions) < 0.28
    assert all(splits.is_training(q) != splits.is_held_out(q) for q in questions[:200])
    assert splits.is_held_out("  " + held[0] + "\n")  # surrounding whitespace does not move a question
    # Pinned: moving questions across the partition breaks every shipped policy's "never seen" guarantee.
    assert [int(splits.is_held_out(q)) for q in questions[:16]] == [1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 1, 0]
    assert sum(splits.is_held_out(q) for q in questions[:400]) == 96
    with pytest.raises(TypeError, match="question must be a str"):
        splits.is_held_out(None)


def test_build_keep_filter_counts_filtered_environments(sandbox):
    envs, report = build.build_environments(24, seed=3, complexity="low", sandbox=sandbox, world=TINY_WORLD,
                                            keep=lambda env: splits.is_held_out(env.question))
    assert len(envs) == 24 and all(splits.is_held_out(e.question) for e in envs)
    assert report.kept == 24 and report.dropped["filtered"] > 24  # about three in four are training questions
    assert "filtered" in report.summary()


def test_training_and_held_out_splits_never_share_a_question_across_seeds(sandbox):
    common = dict(kinds=KINDS, complexity="low", world=TINY_WORLD, sandbox=sandbox)
    train = build_split("train", 200, 1, **common) + build_split("train", 200, 424_242, **common)
    held_out = build_split("eval", 48, 2, **common)
    questions = {s.messages[0]["content"] for s in train}
    assert not questions & {s.messages[0]["content"] for s in held_out}
    assert all(splits.is_training(s.messages[0]["content"].rsplit("Question: ", 1)[-1]) for s in train)
    # Held-out environments are balanced over the scenario types, in turn.
    assert collections.Counter(s.data_source for s in held_out) == {f"self/{k}": 12 for k in KINDS}
    assert [s.data_source for s in held_out[:4]] == sorted(f"self/{k}" for k in KINDS)
    # Validation: training-side questions, none of the excluded prompts, balanced over the types.
    excluded = [s.messages[0]["content"] for s in train]
    validation = build_split("validation", 24, 3, exclude=excluded, **common)
    assert not set(excluded) & {s.messages[0]["content"] for s in validation}
    assert all(splits.is_training(s.messages[0]["content"].rsplit("Question: ", 1)[-1]) for s in validation)
    assert collections.Counter(s.data_source for s in validation) == {f"self/{k}": 6 for k in KINDS}
    with pytest.raises(ValueError, match="split must be one of train, eval, validation"):
        build_split("test", 4, 0, **common)
