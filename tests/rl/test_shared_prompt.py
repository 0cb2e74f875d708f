"""Shared-prompt RL batches: the same log-probs and the same update as the flat layout, at a fraction of the tokens."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftrl_jax import models
from ftrl_jax.rl.batch import pad_rows
from ftrl_jax.rl.losses import LossConfig
from ftrl_jax.rl.shared_prompt import RESPONSE_LOSS_MASK, response_logprobs, step_batch, trajectory_batch
from ftrl_jax.rl.update import make_logprob_fn, make_rl_step, make_shared_prompt_logprob_fn
from ftrl_jax.rollout.episodes import GeneratedTurn
from ftrl_jax.training.train_state import create_train_state, shard_state
from tests.cached_models import init_params, one_device_mesh

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
CONFIG = models.preset("tiny", vocab_size=256, num_layers=2, num_kv_heads=2)
LOSS = LossConfig(kl_coef=0.05, entropy_coef=0.01, aggregation="seq-mean-token-mean")
N = 3  # samples per prompt


def _turns(seed=0):
    """Two prompts of different lengths, N sampled turns of different lengths each (group-major)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 256, size=n).tolist() for n in (9, 5)]
    return [GeneratedTurn("", prompt, rng.integers(1, 256, size=int(rng.integers(1, 7))).tolist(), [], False)
            for prompt in prompts for _ in range(N)]


def _flat(turns):
    """The same turns in the flat layout: prompt + response per row, right-padded; loss on the response."""
    length = max(len(t.prompt_ids) + len(t.token_ids) for t in turns)
    tokens = np.zeros((len(turns), length), np.int32)
    attention, loss = np.zeros_like(tokens), np.zeros_like(tokens)
    for i, t in enumerate(turns):
        ids = list(t.prompt_ids) + list(t.token_ids)
        tokens[i, :len(ids)], attention[i, :len(ids)] = ids, 1
        loss[i, len(t.prompt_ids):len(ids)] = 1
    return jnp.asarray(tokens), jnp.asarray(attention), jnp.asarray(loss)


def _flat_response_values(flat_values, turns, shape):
    """Picks each row's response positions of a flat [B, T] array into the [U, n, R] layout."""
    out = np.zeros(shape, np.float32)
    for i, t in enumerate(turns):
        start = len(t.prompt_ids)
        out[i // N, i % N, :len(t.token_ids)] = np.asarray(flat_values)[i, start:start + len(t.token_ids)]
    return out


def test_step_batch_layout_and_errors():
    turns = _turns()
    batch = step_batch(turns, N, pad_id=0, multiple=8)
    assert batch["prompt_tokens"].shape == (2, 16) and batch["response_tokens"].shape == (2, N, 8)
    assert batch["prompt_tokens"][0, -9:].tolist() == turns[0].prompt_ids  # left-padded
    assert batch["prompt_mask"][1].tolist() == [0] * 11 + [1] * 5
    assert batch["response_tokens"][1, 2, :len(turns[5].token_ids)].tolist() == turns[5].token_ids  # right-padded
    assert batch["response_mask"].sum() == sum(len(t.token_ids) for t in turns)
    with pytest.raises(ValueError, match="groups of 4"):
        step_batch(turns, 4, pad_id=0)
    mixed = [turns[0], turns[3], turns[1], turns[4], turns[2], turns[5]]  # not group-major
    with pytest.raises(ValueError, match="different prompts"):
        step_batch(mixed, N, pad_id=0)


def test_response_logprobs_equal_the_flat_layout():
    turns = _turns()
    batch = step_batch(turns, N, pad_id=0, multiple=8)
    shared = make_shared_prompt_logprob_fn(CONFIG, one_device_mesh(), chunk_size=4, temperature=0.7,
                                           compiler_options=FAST_COMPILE)
    got = np.asarray(shared(init_params(CONFIG), *(jnp.asarray(batch[k]) for k in
                                          ("prompt_tokens", "prompt_mask", "response_tokens", "response_mask"))))
    tokens, attention, _ = _flat(turns)
    flat = make_logprob_fn(CONFIG, one_device_mesh(), chunk_size=4, temperature=0.7, compiler_options=FAST_COMPILE)
    want = _flat_response_values(flat(init_params(CONFIG), tokens, attention), turns, got.shape)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.all(got[batch["response_mask"] == 0] == 0.0) and np.all(got[batch["response_mask"] > 0] < 0.0)
    _, entropy = response_logprobs(CONFIG, init_params(CONFIG), *(jnp.asarray(batch[k]) for k in
                                   ("prompt_tokens", "prompt_mask", "response_tokens", "response_mask")))
    assert np.all(np.asarray(entropy)[batch["response_mask"] > 0] > 0.0)


@pytest.mark.parametrize("num_minibatches", [1, 2])
def test_rl_step_on_a_shared_prompt_batch_equals_the_flat_update(num_minibatches):
    turns = _turns(1)
    shared = {k: jnp.asarray(v) for k, v in step_batch(turns, N, pad_id=0, multiple=8).items()}
    tokens, attention, loss = _flat(turns)
    rng = np.random.default_rng(2)
    shape = shared["response_tokens"].shape
    mask = np.asarray(shared["response_mask"], np.float32)
    old = rng.normal(-3.0, 0.3, size=shape) * mask
    ref = old + rng.normal(0, 0.1, size=shape) * mask
    adv = np.repeat(rng.normal(size=(shape[0] * N, 1)), shape[2], axis=1).reshape(shape) * mask
    shared.update(old_logprobs=jnp.asarray(old, jnp.float32), ref_logprobs=jnp.asarray(ref, jnp.float32),
                  advantages=jnp.asarray(adv, jnp.float32))

    def to_flat(values):  # [U, n, R] -> [B, T] at the response positions
        out = np.zeros(tokens.shape, np.float32)
        for i, t in enumerate(turns):
            start = len(t.prompt_ids)
            out[i, start:start + len(t.token_ids)] = values[i // N, i % N, :len(t.token_ids)]
        return jnp.asarray(out)

    flat = {"tokens": tokens, "attention_mask": attention, "loss_mask": loss, "old_logprobs": to_flat(old),
            "ref_logprobs": to_flat(ref), "advantages": to_flat(adv)}
    optimizer = optax.sgd(0.5)

    def run(batch, minibatches):
        params = jax.tree.map(jnp.copy, init_params(CONFIG))
        state = shard_state(create_train_state(params, optimizer), one_device_mesh())
        step = make_rl_step(CONFIG, optimizer, one_device_mesh(), LOSS, num_minibatches=minibatches, chunk_size=4,
                            compiler_options=FAST_COMPILE)
        return step(state, batch)

    got_state, got = run(shared, num_minibatches)
    if num_minibatches == 2:
        # Each shared-prompt mini-batch is one whole group: the flat equivalent is one update per group, in order.
        params = jax.tree.map(jnp.copy, init_params(CONFIG))
        state = shard_state(create_train_state(params, optimizer), one_device_mesh())
        step = make_rl_step(CONFIG, optimizer, one_device_mesh(), LOSS, chunk_size=4, compiler_options=FAST_COMPILE)
        for g in range(2):
            rows = jnp.arange(g * N, (g + 1) * N)
            state, _ = step(state, {k: v[rows] for k, v in flat.items()})
        want_state = state
    else:
        want_state, want = run(flat, 1)
        for name in ("loss", "pg_loss", "kl", "entropy", "clip_fraction"):
            np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=1e-4, atol=1e-6, err_msg=name)
        assert float(got["response_tokens"]) == float(want["response_tokens"]) == mask.sum()
    changes = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(init_params(CONFIG)))]
    assert max(changes) > 1e-3  # a real update
    for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=0)


def test_shared_prompt_step_without_old_logprobs_is_the_on_policy_update():
    """One mini-batch without old log-probs (the main job's default): the same update as with the current
    policy's own log-probs passed in, through the shared-prompt branch."""
    shared = {k: jnp.asarray(v) for k, v in step_batch(_turns(3), N, pad_id=0, multiple=8).items()}
    shape, mask = shared["response_tokens"].shape, np.asarray(shared["response_mask"], np.float32)
    rng = np.random.default_rng(4)
    shared["advantages"] = jnp.asarray(np.repeat(rng.normal(size=(shape[0] * N, 1)), shape[2], axis=1)
                                       .reshape(shape) * mask, jnp.float32)
    own = make_shared_prompt_logprob_fn(CONFIG, one_device_mesh(), chunk_size=4, compiler_options=FAST_COMPILE)(
        init_params(CONFIG), *(shared[k] for k in ("prompt_tokens", "prompt_mask", "response_tokens",
                                                    "response_mask")))
    shared["ref_logprobs"] = own + jnp.asarray(rng.normal(0, 0.1, size=shape) * mask, jnp.float32)
    optimizer = optax.sgd(0.5)
    step = make_rl_step(CONFIG, optimizer, one_device_mesh(), LOSS, chunk_size=4, compiler_options=FAST_COMPILE)

    def run(batch):
        state = shard_state(create_train_state(jax.tree.map(jnp.copy, init_params(CONFIG)), optimizer),
                            one_device_mesh())
        return step(state, batch)

    given_state, given = run(dict(shared, old_logprobs=own))
    got_state, got = run(shared)
    for name in ("loss", "pg_loss", "kl", "entropy"):
        np.testing.assert_allclose(float(got[name]), float(given[name]), rtol=1e-5, atol=1e-7, err_msg=name)
    assert float(got["clip_fraction"]) == 0.0
    for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(given_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
               zip(jax.tree.leaves(got_state.params), jax.tree.leaves(init_params(CONFIG)))) > 1e-3


def _trajectories(seed=0):
    """Two environments, N episodes each (group-major): a shared first prompt, then policy turns (loss 1)
    alternating with tool responses (loss 0), of different lengths and numbers of turns."""
    rng = np.random.default_rng(seed)
    rows = []
    for prompt_length in (7, 4):
        prompt = rng.integers(1, 256, size=prompt_length).tolist()
        for _ in range(N):
            ids, mask = list(prompt), [0] * prompt_length
            for _ in range(int(rng.integers(1, 4))):
                turn = rng.integers(1, 256, size=int(rng.integers(1, 5))).tolist()
                tool = rng.integers(1, 256, size=int(rng.integers(1, 4))).tolist()
                ids, mask = ids + turn + tool, mask + [1] * len(turn) + [0] * len(tool)
            rows.append((np.asarray(ids, np.int32), np.asarray(mask, np.int32)))
    return rows


def test_trajectory_batch_layout_and_errors():
    rows = _trajectories()
    batch = trajectory_batch(rows, N, pad_id=0, multiple=8)
    assert batch["prompt_mask"].sum(axis=1).tolist() == [7, 4]  # the first prompt, stored once per group
    assert batch["prompt_tokens"][0, -7:].tolist() == rows[0][0][:7].tolist()
    for i, (ids, mask) in enumerate(rows):
        g, k, start = i // N, i % N, (7, 4)[i // N]
        rest = len(ids) - start
        assert batch["response_tokens"][g, k, :rest].tolist() == ids[start:].tolist()
        assert batch["response_mask"][g, k].tolist() == [1] * rest + [0] * (batch["response_mask"].shape[2] - rest)
        assert batch[RESPONSE_LOSS_MASK][g, k, :rest].tolist() == mask[start:].tolist()
    assert batch[RESPONSE_LOSS_MASK].sum() == sum(int(m.sum()) for _, m in rows)
    # A group whose episodes agree past the first prompt shares only up to the first policy token.
    same = [rows[0]] * N + rows[N:]
    assert trajectory_batch(same, N, pad_id=0, multiple=8)["prompt_mask"].sum(axis=1).tolist() == [7, 4]
    with pytest.raises(ValueError, match="groups of 4"):
        trajectory_batch(rows, 4, pad_id=0)
    with pytest.raises(ValueError, match="share no first prompt"):
        trajectory_batch([rows[0], (rows[1][0] + 1, rows[1][1]), rows[2]] + rows[N:], N, pad_id=0)
    with pytest.raises(ValueError, match="no policy token"):
        trajectory_batch([(rows[0][0], np.zeros_like(rows[0][1]))] + rows[1:], N, pad_id=0)


@pytest.mark.parametrize("num_minibatches", [1, 2])
def test_rl_step_on_shared_prefix_trajectories_equals_the_flat_update(num_minibatches):
    rows = _trajectories(1)
    shared = trajectory_batch(rows, N, pad_id=0, multiple=8)
    flat = pad_rows(rows, pad_id=0, multiple=1)  # the flat layout, unbucketed
    mesh = one_device_mesh()
    params0 = init_params(CONFIG)
    # Log-probs: the shared pass equals the flat one at every response position.
    shared_lp = np.asarray(make_shared_prompt_logprob_fn(CONFIG, mesh, chunk_size=4, compiler_options=FAST_COMPILE)(
        params0, *(jnp.asarray(shared[k]) for k in ("prompt_tokens", "prompt_mask", "response_tokens",
                                                      "response_mask"))))
    flat_lp = np.asarray(make_logprob_fn(CONFIG, mesh, chunk_size=4, compiler_options=FAST_COMPILE)(
        params0, jnp.asarray(flat["tokens"]), jnp.asarray(flat["attention_mask"])))
    starts = [(7, 4)[i // N] for i in range(len(rows))]
    for i, (ids, _) in enumerate(rows):
        np.testing.assert_allclose(shared_lp[i // N, i % N, :len(ids) - starts[i]], flat_lp[i, starts[i]:len(ids)],
                                   atol=2e-5)
    rng = np.random.default_rng(3)
    loss_mask = shared[RESPONSE_LOSS_MASK].astype(np.float32)
    old = rng.normal(-3.0, 0.3, size=loss_mask.shape) * loss_mask
    ref = old + rng.normal(0, 0.1, size=loss_mask.shape) * loss_mask
    adv = np.repeat(rng.normal(size=(len(rows), 1)), loss_mask.shape[2], axis=1).reshape(loss_mask.shape) * loss_mask

    def to_flat(values):
        out = np.zeros(flat["tokens"].shape, np.float32)
        for i, (ids, _) in enumerate(rows):
            out[i, starts[i]:len(ids)] = values[i // N, i % N, :len(ids) - starts[i]]
        return out

    shared_batch = {k: jnp.asarray(v) for k, v in shared.items()}
    shared_batch.update(old_logprobs=jnp.asarray(old, jnp.float32), ref_logprobs=jnp.asarray(ref, jnp.float32),
                        advantages=jnp.asarray(adv, jnp.float32))
    flat_batch = {k: jnp.asarray(v) for k, v in flat.items()}
    flat_batch.update(old_logprobs=jnp.asarray(to_flat(old)), ref_logprobs=jnp.asarray(to_flat(ref)),
                      advantages=jnp.asarray(to_flat(adv)))
    optimizer = optax.sgd(0.5)

    def fresh_state():
        return shard_state(create_train_state(jax.tree.map(jnp.copy, params0), optimizer), mesh)

    got_state, got = make_rl_step(CONFIG, optimizer, mesh, LOSS, num_minibatches=num_minibatches, chunk_size=4,
                                  compiler_options=FAST_COMPILE)(fresh_state(), shared_batch)
    flat_step = make_rl_step(CONFIG, optimizer, mesh, LOSS, chunk_size=4, compiler_options=FAST_COMPILE)
    want_state = fresh_state()
    for rows_of_update in ([np.arange(len(rows))] if num_minibatches == 1
                           else [np.arange(g * N, (g + 1) * N) for g in range(2)]):
        want_state, want = flat_step(want_state, {k: v[rows_of_update] for k, v in flat_batch.items()})
    if num_minibatches == 1:
        for name in ("loss", "pg_loss", "kl", "entropy"):
            np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=1e-4, atol=1e-6, err_msg=name)
        # Only the policy's tokens count: tool responses inside the response are attended to, not trained on.
        assert float(got["response_tokens"]) == float(want["response_tokens"]) == loss_mask.sum()
    changes = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(params0))]
    assert max(changes) > 1e-3
    for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=0)
