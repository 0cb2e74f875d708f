"""LocalPolicy's micro-batches: planned within the memory budget, repeated prompts together, results unchanged."""

import jax
import numpy as np
import pytest

from ftrl_jax import models
from ftrl_jax.envs.samples import Sample, user_prompt
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.generate import sampling
from ftrl_jax.rollout import policy as policy_lib
from ftrl_jax.rollout.episodes import play_episodes
from ftrl_jax.rollout.policy import LocalPolicy, generate_bytes, plan_micro_batches
from ftrl_jax.text.tokenizer import default_tokenizer
from tests.cached_models import init_params

CODES = {"double": "def double(x):\n    return {'value': 2 * x}\n",
         "greet": "def greet(name):\n    return 'Hello, ' + name\n"}


def sample(number: int, long: bool) -> Sample:
    """A toy environment: short ones have one tool and a short question (prompts under 256 tokens), long ones
    two tools and a longer question (256-512 tokens), so the batch spans two prompt buckets."""
    names = ["double", "greet"] if long else ["double"]
    tools = [{"type": "function", "function": {"name": name, "description": f"The {name} tool.",
                                               "parameters": {"type": "object", "properties": {}}}}
             for name in names]
    question = f"Double {number}, then greet Ada." + " Thanks." * (number % 7) if long else f"Double {number}."
    return Sample(messages=[{"role": "user", "content": user_prompt(question)}], tools=tools,
                  codes={name: CODES[name] for name in names}, unsolved_set={"double": [str(2 * number)]},
                  answer=str(2 * number), solve_rate=0.0, data_source="toy")


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(num_workers=1, timeout=5.0) as box:
        yield box


@pytest.fixture(scope="module")
def tiny():
    tokenizer = default_tokenizer()
    config = models.preset("tiny", num_layers=1, vocab_size=len(tokenizer))
    return config, init_params(config), tokenizer


def padded_shape(prompts):
    """What one `generate` call over `prompts` holds: distinct prompts, the largest group, the longest prompt."""
    groups = {}
    for prompt in prompts:
        groups[tuple(prompt)] = groups.get(tuple(prompt), 0) + 1
    return len(groups), max(groups.values()), max(map(len, prompts))


# --- planning (no model run) -------------------------------------------------------------------


def test_plans_fit_the_budget_keep_groups_together_and_sort_by_length():
    config = models.preset("tiny")
    rng = np.random.default_rng(0)
    # 40 distinct prompts, short (17-31 tokens) and long (300-500) interleaved, 4 samples each, then 30 singletons.
    distinct = [rng.integers(0, 100, size=int(rng.integers(300, 500) if i % 2 else rng.integers(17, 32))).tolist()
                for i in range(70)]
    prompts = [p for p in distinct[:40] for _ in range(4)] + distinct[40:]
    rng.shuffle(prompts)
    budget = generate_bytes(config, 4, 4, 512, 32)  # four long groups of four
    plan = plan_micro_batches(config, prompts, max_new_tokens=32, max_batch_bytes=budget)

    assert len(plan) > 4
    assert sorted(i for batch in plan for i in batch.rows) == list(range(len(prompts)))  # each row once
    for batch in plan:
        assert list(batch.rows) == sorted(batch.rows)  # the caller's order within a micro-batch
        members = [prompts[i] for i in batch.rows]
        # The estimate of the call the micro-batch makes fits the budget.
        assert batch.estimated_bytes == generate_bytes(config, *padded_shape(members), 32) <= budget
        # Similar lengths together: one prompt bucket per micro-batch (short and long were interleaved).
        assert len({sampling.bucket(len(p)) for p in members}) == 1
        # One group size per micro-batch here: singletons are not padded to the groups' four rows.
        assert len({members.count(p) for p in members}) == 1
    where = {}
    for number, batch in enumerate(plan):
        for i in batch.rows:
            where.setdefault(tuple(prompts[i]), set()).add(number)
    assert all(len(batches) == 1 for batches in where.values())  # repeated prompts stay together

    # A row cap: groups of four still stay whole.
    capped = plan_micro_batches(config, prompts, max_new_tokens=32, max_batch_bytes=1 << 40, max_batch_rows=6)
    assert max(len(b.rows) for b in capped) <= 6
    where = {}
    for number, batch in enumerate(capped):
        for i in batch.rows:
            where.setdefault(tuple(prompts[i]), set()).add(number)
    assert all(len(batches) == 1 for batches in where.values())
    # Unbounded: one call, exactly as before micro-batching.
    (whole,) = plan_micro_batches(config, prompts, max_new_tokens=32, max_batch_bytes=1 << 40)
    assert whole.rows == tuple(range(len(prompts)))


def test_a_group_larger_than_the_budget_is_cut_and_a_row_larger_than_it_runs_alone_with_a_warning():
    config = models.preset("tiny")
    prompt = list(range(1, 301))
    # Sixteen samples of one prompt where eight fit: two micro-batches of eight, each prefilling the prompt.
    budget = generate_bytes(config, 1, 8, 300, 64)
    assert generate_bytes(config, 1, 16, 300, 64) > budget
    plan = plan_micro_batches(config, [prompt] * 16 + [[7, 8, 9]], max_new_tokens=64, max_batch_bytes=budget)
    assert sorted(len(b.rows) for b in plan) == [1, 8, 8] and all(b.estimated_bytes <= budget for b in plan)

    # A single row over the budget: it still runs, alone, and the warning says what to change.
    small = generate_bytes(config, 1, 1, 300, 64) - 1
    with pytest.warns(RuntimeWarning, match=rf"over the policy's max_batch_bytes={small} .*raise max_batch_bytes"):
        plan = plan_micro_batches(config, [prompt, [1, 2], prompt], max_new_tokens=64, max_batch_bytes=small)
    assert sorted(b.rows for b in plan) == [(0,), (1,), (2,)]
    with pytest.raises(ValueError, match="max_batch_bytes must be >= 1"):
        plan_micro_batches(config, [prompt], max_new_tokens=64, max_batch_bytes=0)


def test_default_budget_reads_device_memory_else_a_fixed_host_budget(monkeypatch, tiny):
    config, params, tokenizer = tiny

    class Device:
        def __init__(self, stats):
            self.stats, self.id = stats, 0

        def memory_stats(self):
            return self.stats

    monkeypatch.setattr(jax, "devices", lambda: [Device({"bytes_limit": 10 << 30, "bytes_in_use": 2 << 30})])
    assert policy_lib.default_batch_bytes() == int(policy_lib.DEFAULT_MEMORY_FRACTION * (8 << 30))
    monkeypatch.setattr(jax, "devices", lambda: [Device(None)])  # CPU: no statistics
    assert policy_lib.default_batch_bytes() == policy_lib.DEFAULT_HOST_BATCH_BYTES == 4 << 30
    assert LocalPolicy(config, params, tokenizer, max_new_tokens=8).max_batch_bytes == 4 << 30
    assert LocalPolicy(config, params, tokenizer, max_new_tokens=8, max_batch_bytes=123).max_batch_bytes == 123
    with pytest.raises(ValueError, match="max_batch_rows must be >= 1"):
        LocalPolicy(config, params, tokenizer, max_new_tokens=8, max_batch_rows=0)


# --- running (tiny one-layer model) -------------------------------------------------------------


def test_greedy_episodes_do_not_depend_on_the_split(monkeypatch, tiny, sandbox):
    """48 conversations (12 environments x 4 samples, prompts in two length buckets) played greedily in one
    call, 16 rows at a time, and under a budget of four groups: the same episodes."""
    config, params, tokenizer = tiny
    envs = [sample(number, long=number % 3 != 0) for number in range(12)]
    samples = [env for env in envs for _ in range(4)]
    calls = []
    real_generate = sampling.generate

    def recording_generate(config, params, prompts, **kwargs):
        calls[-1].append([tuple(p) for p in prompts])
        return real_generate(config, params, prompts, **kwargs)

    monkeypatch.setattr(sampling, "generate", recording_generate)

    def play(**limits):
        calls.append([])
        policy = LocalPolicy(config, params, tokenizer, max_new_tokens=8, max_prompt_tokens=1024, **limits)
        return play_episodes(policy, samples, max_turns=1, sandbox=sandbox)

    whole = play(max_batch_bytes=1 << 40)
    assert len(calls[-1]) == 1  # every conversation in one call
    lengths = [len(p) for p in calls[-1][0]]
    assert {sampling.bucket(n) for n in lengths} == {256, 512}
    budget = generate_bytes(config, 4, 4, max(lengths), 8)
    assert generate_bytes(config, *padded_shape(calls[-1][0]), 8) > 3 * budget
    by_rows = play(max_batch_bytes=1 << 40, max_batch_rows=16)
    bounded = play(max_batch_bytes=budget)

    assert [len(c) for c in calls[1]] == [16, 16, 16]
    assert len(calls[2]) == 3  # 8 long environments, four at a time, then the 4 short ones
    for prompts in calls[2]:
        assert generate_bytes(config, *padded_shape(prompts), 8) <= budget
        assert {prompts.count(p) for p in prompts} == {4}  # an environment's four samples are generated together
        assert len({sampling.bucket(len(p)) for p in prompts}) == 1

    for reference in (by_rows, bounded):
        for a, b in zip(whole, reference, strict=True):
            assert a.messages == b.messages and a.end_reason == b.end_reason
            assert [t.token_ids for t in a.turns] == [t.token_ids for t in b.turns]
            for ta, tb in zip(a.turns, b.turns):
                np.testing.assert_allclose(ta.logprobs, tb.logprobs, atol=1e-5)


def test_sampled_turns_are_reproducible_for_a_seed_and_split(tiny):
    config, params, tokenizer = tiny
    conversations = [(s.messages, s.tools) for s in (sample(n, long=False) for n in range(6)) for _ in range(2)]
    budget = generate_bytes(config, 2, 2, 256, 8)

    def turns(seed, max_batch_bytes):
        policy = LocalPolicy(config, params, tokenizer, max_new_tokens=8, temperature=1.0, seed=seed,
                             max_batch_bytes=max_batch_bytes)
        assert len(policy.plan([policy.encode(*c) for c in conversations])) == (3 if max_batch_bytes == budget else 1)
        return [t.token_ids for t in policy(conversations)]

    split = turns(0, budget)
    assert split == turns(0, budget)  # same seed, same split: the same samples
    assert split != turns(1, budget)
    # Micro-batch k samples with fold_in(the call's key, k): the second holds environments 2 and 3.
    policy = LocalPolicy(config, params, tokenizer, max_new_tokens=8, temperature=1.0, seed=0)
    _, key = jax.random.split(jax.random.PRNGKey(0))
    second = sampling.generate(config, params, [policy.encode(*c) for c in conversations[4:8]], max_new_tokens=8,
                               temperature=1.0, stop_token_ids=policy.stop_ids, rng=jax.random.fold_in(key, 1),
                               pad_id=policy.pad_id)
    assert split[4:8] == second.tokens
    # One micro-batch samples with the call's key as an unsplit call always did.
    expected = sampling.generate(config, params, [policy.encode(*c) for c in conversations], max_new_tokens=8,
                                 temperature=1.0, stop_token_ids=policy.stop_ids, rng=key, pad_id=policy.pad_id)
    assert turns(0, 1 << 40) == expected.tokens
