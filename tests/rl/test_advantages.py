"""Advantage estimators: hand-computed GRPO cases and Reinforce++ against a NumPy re-implementation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftrl_jax.rl import advantages as adv
from ftrl_jax.rl.advantages import (
    discounted_returns,
    estimator_needs_groups,
    group_signal,
    place_on_last_token,
    register_advantage_estimator,
    registered_advantage_estimators,
)

# Jitted as the trainer will use it; one compile is cheaper than dispatching every op eagerly.
compute_advantages = jax.jit(adv.compute_advantages, static_argnames=("name", "group_size", "gamma", "scale_by_std"))


def lengths_mask(lengths, time):
    """Right-padded float mask with the given number of response tokens per row."""
    return (np.arange(time)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


# ---------------------------------------------------------------- GRPO


def test_grpo_hand_computed_uses_unbiased_std():
    rewards = jnp.array([1.0, 0.0, 1.0, 0.0, 2.0, 1.0])
    mask = jnp.ones((6, 3))
    out = np.asarray(compute_advantages("grpo", rewards, mask, group_size=3))
    # Group 1: [1, 0, 1], mean 2/3, unbiased std sqrt(((1/3)^2 * 2 + (2/3)^2) / 2) = sqrt(1/3).
    std1 = math.sqrt(1.0 / 3.0)
    # Group 2: [0, 2, 1], mean 1, unbiased std sqrt((1 + 1 + 0) / 2) = 1 (the biased one would be 0.816).
    expected = np.array([1 / 3, -2 / 3, 1 / 3]) / (std1 + 1e-6)
    expected = np.concatenate([expected, np.array([-1.0, 1.0, 0.0]) / (1 + 1e-6)])
    np.testing.assert_allclose(out, np.repeat(expected[:, None], 3, axis=1), rtol=1e-6, atol=1e-7)


def test_grpo_group_of_two_matches_unbiased_not_biased_std():
    out = compute_advantages("grpo", jnp.array([0.0, 2.0]), jnp.ones((2, 1)), group_size=2)
    # Unbiased std of [0, 2] is sqrt(2): advantages are +-1/sqrt(2), not +-1.
    np.testing.assert_allclose(np.asarray(out)[:, 0], [-1 / math.sqrt(2), 1 / math.sqrt(2)], rtol=1e-5)


def test_grpo_group_of_one_gives_zero_without_nan():
    rewards = jnp.array([3.0, -1.0, 0.5])
    for kwargs in ({"group_size": 1}, {"group_ids": jnp.array([0, 1, 1])}):
        out = np.asarray(compute_advantages("grpo", rewards, jnp.ones((3, 2)), **kwargs))
        assert np.all(np.isfinite(out))
        np.testing.assert_array_equal(out[0], [0.0, 0.0])
    out = np.asarray(compute_advantages("grpo", rewards, jnp.ones((3, 2)), group_ids=jnp.array([0, 1, 1])))
    np.testing.assert_allclose(out[1:, 0], [-1 / math.sqrt(2), 1 / math.sqrt(2)], rtol=1e-5)


def test_grpo_equal_rewards_give_zero():
    out = compute_advantages("grpo", jnp.full((4,), 0.7), jnp.ones((4, 5)), group_size=4)
    np.testing.assert_array_equal(np.asarray(out), np.zeros((4, 5)))


def test_grpo_is_masked_and_broadcast_over_tokens():
    rewards = jnp.array([1.0, 0.0])
    mask = jnp.array([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0]])
    out = np.asarray(compute_advantages("grpo", rewards, mask, group_size=2))
    value = 0.5 / (math.sqrt(0.5) + 1e-6)
    np.testing.assert_allclose(out, np.array([[0, value, value, 0], [-value, 0, -value, -value]]), rtol=1e-6)


def test_grpo_group_ids_in_any_order_match_group_major_layout():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=12).astype(np.float32)
    mask = lengths_mask(rng.integers(1, 6, size=12), 6)
    group_major = np.asarray(compute_advantages("grpo", rewards, mask, group_size=4))
    permutation = rng.permutation(12)
    prompt_ids = np.array([70, 3, 12])[np.arange(12) // 4]  # arbitrary integer ids
    shuffled = np.asarray(
        compute_advantages("grpo", rewards[permutation], mask[permutation], group_ids=prompt_ids[permutation])
    )
    np.testing.assert_allclose(shuffled, group_major[permutation], rtol=1e-5, atol=1e-6)


def test_grpo_without_std_scaling_only_centres():
    rewards = jnp.array([1.0, 0.0, 0.0, 3.0])
    out = compute_advantages("grpo", rewards, jnp.ones((4, 1)), group_size=2, scale_by_std=False)
    np.testing.assert_allclose(np.asarray(out)[:, 0], [0.5, -0.5, -1.5, 1.5], rtol=1e-6)


def test_compute_advantages_inside_a_jitted_step():
    rewards = jnp.array([1.0, 0.0, 0.0, 0.0])
    mask = jnp.ones((4, 3))

    @jax.jit
    def step(rewards, mask, group_ids):  # the trainer's use: estimators inside a larger jitted function
        return (
            adv.compute_advantages("grpo", rewards, mask, group_ids=group_ids),
            adv.compute_advantages("reinforce_pp", rewards, mask, gamma=0.9),
        )

    grpo_out, reinforce_out = step(rewards, mask, jnp.array([0, 0, 1, 1]))
    value = 0.5 / (math.sqrt(0.5) + 1e-6)  # group [1, 0]; group [0, 0] has no spread
    np.testing.assert_allclose(np.asarray(grpo_out), np.repeat([[value], [-value], [0.0], [0.0]], 3, axis=1), rtol=1e-6)
    expected = numpy_reinforce_pp(np.asarray(rewards), np.asarray(mask), 0.9)
    np.testing.assert_allclose(np.asarray(reinforce_out), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- errors and registry


def test_unknown_estimator_lists_registered_names():
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo_gae'.*grpo.*reinforce_pp"):
        adv.compute_advantages("ppo_gae", jnp.zeros(2), jnp.ones((2, 2)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "pass group_size"),
        ({"group_size": 3}, "group_size=3 must be a positive int dividing the batch size 4"),
        ({"group_size": 2, "group_ids": jnp.zeros(4, jnp.int32)}, "either group_size or group_ids"),
        ({"group_ids": jnp.zeros(3, jnp.int32)}, r"group_ids must be an integer array of shape \(4,\)"),
        ({"group_ids": jnp.zeros(4)}, "integer array"),
    ],
)
def test_bad_group_arguments_are_reported(kwargs, message):
    with pytest.raises(ValueError, match=message):
        adv.compute_advantages("grpo", jnp.zeros(4), jnp.ones((4, 2)), **kwargs)


def test_bad_shapes_are_reported():
    with pytest.raises(ValueError, match=r"rewards \[B\] and mask \[B, T\]"):
        adv.compute_advantages("reinforce_pp", jnp.zeros(3), jnp.ones((4, 2)))


def test_registering_a_new_estimator_makes_it_callable_by_name():
    name = "test_constant_baseline"

    @register_advantage_estimator(name)
    def constant_baseline(rewards, mask, *, group_ids=None, baseline=0.5):
        return (rewards - baseline)[:, None] * mask

    try:
        assert name in registered_advantage_estimators()
        out = adv.compute_advantages(name, jnp.array([1.0, 0.0]), jnp.ones((2, 2)), baseline=0.25)
        np.testing.assert_allclose(np.asarray(out), [[0.75, 0.75], [-0.25, -0.25]])
        with pytest.raises(ValueError, match="already registered"):
            register_advantage_estimator(name)(constant_baseline)
    finally:
        adv._ESTIMATORS.pop(name, None)


# ---------------------------------------------------------------- Reinforce++


def numpy_reinforce_pp(rewards, mask, gamma):
    """From the definition: reward on the last response token, discounted sums backwards over the
    response tokens of each row, whitened with the mean and Bessel-corrected variance of all
    response tokens in the batch, zero off-mask."""
    rewards = np.asarray(rewards, np.float64)
    mask = np.asarray(mask, np.float64)
    returns = np.zeros_like(mask)
    for row in range(mask.shape[0]):
        positions = np.flatnonzero(mask[row] > 0)
        for rank, position in enumerate(positions):
            steps_to_end = len(positions) - 1 - rank
            returns[row, position] = rewards[row] * gamma**steps_to_end
    values = returns[mask > 0]
    mean = values.mean()
    variance = values.var(ddof=1)
    return (returns - mean) / np.sqrt(variance + 1e-8) * mask


def verl_loop_reinforce_pp(rewards, mask, gamma):
    """verl's loop for single-turn right-padded masks: running return reset at masked positions."""
    rewards = np.asarray(rewards, np.float64)
    mask = np.asarray(mask, np.float64)
    token_rewards = np.zeros_like(mask)
    lengths = mask.sum(1).astype(int)
    token_rewards[np.arange(len(rewards)), lengths - 1] = rewards
    returns = np.zeros_like(mask)
    running = np.zeros(len(rewards))
    for t in reversed(range(mask.shape[1])):
        running = token_rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * mask[:, t]
    mean = (returns * mask).sum() / mask.sum()
    variance = (((returns - mean) ** 2) * mask).sum() / mask.sum() * mask.sum() / (mask.sum() - 1)
    return (returns - mean) / np.sqrt(variance + 1e-8) * mask


def test_reinforce_pp_hand_computed_gamma_one():
    # Tokens carry [1] and [0, 0, 0]: mean 0.25, unbiased var (0.75^2 + 3 * 0.25^2) / 3 = 0.25.
    out = np.asarray(compute_advantages("reinforce_pp", jnp.array([1.0, 0.0]), lengths_mask([1, 3], 4)))
    np.testing.assert_allclose(out, [[1.5, 0, 0, 0], [-0.5, -0.5, -0.5, 0]], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_numpy_definition_and_verl_loop(gamma):
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=6).astype(np.float32)
    mask = lengths_mask([1, 4, 7, 7, 2, 5], 7)
    out = np.asarray(compute_advantages("reinforce_pp", rewards, mask, gamma=gamma))
    np.testing.assert_allclose(out, numpy_reinforce_pp(rewards, mask, gamma), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, verl_loop_reinforce_pp(rewards, mask, gamma), rtol=1e-5, atol=1e-5)


def test_reinforce_pp_multi_turn_mask_credits_every_assistant_turn():
    # Assistant tokens, then a masked-out tool response, then the final assistant turn.
    mask = np.array(
        [
            [0, 1, 1, 0, 0, 1, 1, 0],
            [1, 1, 0, 0, 0, 1, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
        ],
        np.float32,
    )
    rewards = np.array([1.0, -0.5, 2.0], np.float32)
    for gamma in (1.0, 0.8):
        out = np.asarray(compute_advantages("reinforce_pp", rewards, mask, gamma=gamma))
        np.testing.assert_allclose(out, numpy_reinforce_pp(rewards, mask, gamma), rtol=1e-5, atol=1e-5)
    returns = np.asarray(jax.jit(lambda r, m: discounted_returns(place_on_last_token(r, m), m, 1.0))(rewards, mask))
    np.testing.assert_allclose(returns[0], [0, 1, 1, 0, 0, 1, 1, 0])


def test_place_on_last_token_and_empty_rows():
    mask = jnp.array([[1.0, 1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    placed = np.asarray(jax.jit(place_on_last_token)(jnp.array([2.0, 5.0, -1.0]), mask))
    np.testing.assert_array_equal(placed, [[0, 0, 0, 2, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, -1]])
    out = np.asarray(compute_advantages("reinforce_pp", jnp.array([2.0, 5.0, -1.0]), mask))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[1], np.zeros(5))


def test_reinforce_pp_baseline_matches_numpy():
    rng = np.random.default_rng(2)
    rewards = rng.normal(size=6).astype(np.float32)
    mask = lengths_mask([2, 5, 3, 1, 4, 4], 5)
    out = np.asarray(compute_advantages("reinforce_pp_baseline", rewards, mask, group_size=3))
    centred = rewards - np.repeat(rewards.reshape(2, 3).mean(1), 3)
    per_token = centred[:, None] * mask
    values = per_token[mask > 0]
    expected = (per_token - values.mean()) / np.sqrt(values.var(ddof=1) + 1e-8) * mask
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_group_signal_counts_groups_that_carry_advantage():
    # Groups of 3: all equal (no signal), mixed, all equal but positive, mixed with a negative.
    rewards = [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, -0.3, 0.0, 0.0]
    stats = group_signal(rewards, 3)
    assert stats["groups_mixed"] == pytest.approx(0.5)
    assert stats["reward_positive"] == pytest.approx(4 / 12)
    # The statistic agrees with GRPO: exactly the mixed groups get nonzero advantages.
    adv = compute_advantages("grpo", jnp.asarray(rewards), jnp.ones((12, 2)), group_size=3)
    nonzero_groups = np.abs(np.asarray(adv)).reshape(4, -1).max(axis=1) > 0
    assert nonzero_groups.mean() == pytest.approx(stats["groups_mixed"])
    with pytest.raises(ValueError, match="group-major"):
        group_signal(rewards, 5)


def test_group_signal_measures_positive_advantage_on_failing_samples():
    # Group 1: a success among failures, all its positive advantage on the success. Group 2: two failures
    # (0.0) above a format penalty (-0.3): positive advantage 0.1 each, on failures. Group 3: all equal.
    rewards = [0.0, 1.0, 0.0, 0.0, 0.0, -0.3, 0.5, 0.5, 0.5]
    stats = group_signal(rewards, 3)
    assert stats["positive_advantage_on_failures"] == pytest.approx(0.2 / (2 / 3 + 0.2))
    assert group_signal([0.0, 1.0, 0.5, 0.5], 2)["positive_advantage_on_failures"] == 0.0
    assert group_signal([-0.5, -0.3, 0.0, 0.0], 2)["positive_advantage_on_failures"] == 1.0
    assert group_signal([0.2] * 4, 2)["positive_advantage_on_failures"] == 0.0
    # An all-equal group whose float mean rounds below its members holds no signal.
    assert group_signal([-0.1] * 3, 3)["positive_advantage_on_failures"] == 0.0
    # GRPO divides each group by its std: the small-spread penalty group (std 0.1414) outweighs the success
    # group (std 0.4714), as the advantages GRPO trains on do.
    scaled = group_signal(rewards, 3, scale_by_std=True)["positive_advantage_on_failures"]
    penalty_group, success_group = 0.2 / np.std([0, 0, -0.3]), (2 / 3) / np.std([0, 1, 0])
    assert scaled == pytest.approx(penalty_group / (penalty_group + success_group))
    adv = np.asarray(compute_advantages("grpo", jnp.asarray(rewards), jnp.ones((9, 1)), group_size=3))[:, 0]
    positive = np.maximum(adv, 0.0)
    assert scaled == pytest.approx(positive[np.asarray(rewards) <= 0].sum() / positive.sum(), rel=1e-4)


# ---------------------------------------------------------------- Dr. GRPO, RLOO, RFT weights


def test_dr_grpo_hand_computed_centres_without_std():
    # Groups of 3: [1, 0, 0] (mean 1/3) and [2, 2, 5] (mean 3); GRPO would divide by std 0.577 and 1.732.
    rewards = jnp.array([1.0, 0.0, 0.0, 2.0, 2.0, 5.0])
    mask = jnp.asarray(lengths_mask([3, 1, 2, 3, 0, 2], 3))
    out = np.asarray(compute_advantages("dr_grpo", rewards, mask, group_size=3))
    expected = np.array([2 / 3, -1 / 3, -1 / 3, -1.0, -1.0, 2.0])
    np.testing.assert_allclose(out, expected[:, None] * np.asarray(mask), rtol=1e-6, atol=1e-7)


def test_rloo_hand_computed_leave_one_out_baseline():
    rewards = jnp.array([1.0, 0.0, 0.0, 2.0, 2.0, 5.0])
    out = np.asarray(compute_advantages("rloo", rewards, jnp.ones((6, 2)), group_size=3))
    # r_i - mean of the other two: 1 - 0, 0 - 0.5, 0 - 0.5; 2 - 3.5, 2 - 3.5, 5 - 2.
    expected = np.array([1.0, -0.5, -0.5, -1.5, -1.5, 3.0])
    np.testing.assert_allclose(out, np.repeat(expected[:, None], 2, axis=1), rtol=1e-6)
    # verl's form: (r - mean) * n / (n - 1).
    centred = np.asarray(rewards) - np.repeat(np.asarray(rewards).reshape(2, 3).mean(1), 3)
    np.testing.assert_allclose(out[:, 0], centred * 3 / 2, rtol=1e-6)


@pytest.mark.parametrize("name", ["dr_grpo", "rloo"])
def test_dr_grpo_and_rloo_give_a_group_of_one_zero(name):
    rewards = jnp.array([3.0, -1.0, 0.5])
    out = np.asarray(compute_advantages(name, rewards, jnp.ones((3, 2)), group_ids=jnp.array([0, 1, 1])))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0], [0.0, 0.0])
    assert out[1, 0] < 0 < out[2, 0]
    np.testing.assert_array_equal(np.asarray(compute_advantages(name, rewards, jnp.ones((3, 2)), group_size=1)), 0.0)


def test_rft_weights_select_the_successes():
    rewards = jnp.array([1.0, 0.5, -0.3, 2.0])
    mask = jnp.asarray(lengths_mask([2, 3, 3, 1], 3))
    out = np.asarray(adv.compute_advantages("rft", rewards, mask, group_size=2))
    np.testing.assert_array_equal(out, np.array([1.0, 0.0, 0.0, 1.0])[:, None] * np.asarray(mask))
    lower = np.asarray(adv.compute_advantages("rft", rewards, mask, group_size=2, success_threshold=0.5))
    np.testing.assert_array_equal(lower, np.array([1.0, 1.0, 0.0, 1.0])[:, None] * np.asarray(mask))


def test_new_estimators_are_registered():
    assert {"dr_grpo", "rloo", "rft", "grpo", "reinforce_pp"} <= set(registered_advantage_estimators())


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_group_statistics_use_no_matmul(name):
    # A float32 matmul may run at reduced precision on accelerators (TF32, bfloat16 passes); a group of
    # equal rewards would then get nonzero advantages. The group sums are elementwise reductions instead.
    rewards, mask = jnp.full((8,), 0.7), jnp.ones((8, 3))
    jaxpr = jax.make_jaxpr(lambda r, m: compute_advantages(name, r, m, group_size=4))(rewards, mask)
    assert "dot_general" not in str(jaxpr)
    np.testing.assert_array_equal(np.asarray(compute_advantages(name, rewards, mask, group_size=4)), 0.0)


def test_estimator_needs_groups_names_the_group_baselines():
    needs = {n: estimator_needs_groups(n) for n in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline",
                                                    "reinforce_pp", "rft")}
    assert needs == {"grpo": True, "dr_grpo": True, "rloo": True, "reinforce_pp_baseline": True,
                     "reinforce_pp": False, "rft": False}
    with pytest.raises(KeyError, match="'ppo2' is not registered; registered: .*grpo"):
        estimator_needs_groups("ppo2")
