"""Policy loss clipping, KL estimators, aggregation modes and the combined objective."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftrl_jax.rl import losses
from ftrl_jax.rl.losses import LossConfig, finalize_loss, registered_aggregations, registered_kl_estimators

# Jitted once per static configuration: the functions are meant to run under jit, and one
# compile is much cheaper than dispatching every small op eagerly.
policy_loss = jax.jit(losses.policy_loss, static_argnames=("clip_low", "clip_high", "dual_clip"))
kl_penalty = jax.jit(losses.kl_penalty, static_argnames=("estimator",))
aggregate_loss = jax.jit(losses.aggregate_loss, static_argnames=("mode",))
rl_objective = jax.jit(losses.rl_objective, static_argnames=("cfg",))

# ---------------------------------------------------------------- policy loss

# (advantage, ratio, expected loss with clip 0.2/0.2 and dual clip 3, clipped?, dual clipped?)
POLICY_CASES = [
    (1.0, 1.0, -1.0, False, False),  # on-policy: -A
    (1.0, 1.1, -1.1, False, False),  # inside the range
    (1.0, 1.5, -1.2, True, False),  # A > 0, ratio above 1 + 0.2: capped gain
    (1.0, 0.5, -0.5, False, False),  # A > 0, ratio below 1 - 0.2: the unclipped term is the larger loss
    (-1.0, 0.5, 0.8, True, False),  # A < 0, ratio below 1 - 0.2: clipped
    (-1.0, 1.5, 1.5, False, False),  # A < 0, ratio above 1 + 0.2 but below 3: unclipped
    (-2.0, 5.0, 6.0, False, True),  # A < 0, ratio above the dual clip: loss capped at -A * 3
    (2.0, 5.0, -2.4, True, False),  # dual clip does not apply to positive advantages
]


def _policy_inputs(cases):
    advantages = jnp.array([[case[0] for case in cases]])
    ratios = jnp.array([[case[1] for case in cases]])
    old_logprobs = jnp.full_like(ratios, -2.0)
    return old_logprobs + jnp.log(ratios), old_logprobs, advantages


def test_policy_loss_hand_computed_cases():
    logprobs, old_logprobs, advantages = _policy_inputs(POLICY_CASES)
    mask = jnp.ones_like(logprobs)
    loss, metrics = policy_loss(logprobs, old_logprobs, advantages, mask)
    np.testing.assert_allclose(np.asarray(loss)[0], [case[2] for case in POLICY_CASES], rtol=1e-5)
    clipped = np.mean([case[3] for case in POLICY_CASES])
    dual = np.mean([case[4] for case in POLICY_CASES])
    np.testing.assert_allclose(float(metrics["clip_fraction"]), clipped, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["dual_clip_fraction"]), dual, rtol=1e-6)
    expected_kl = np.mean([-math.log(case[1]) for case in POLICY_CASES])
    np.testing.assert_allclose(float(metrics["approx_kl"]), expected_kl, rtol=1e-5)


def test_policy_loss_asymmetric_clip_and_no_dual_clip():
    logprobs, old_logprobs, advantages = _policy_inputs([(1.0, 1.5), (-1.0, 0.5), (-2.0, 5.0)])
    mask = jnp.ones_like(logprobs)
    loss, _ = policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=0.1, clip_high=0.28, dual_clip=None)
    np.testing.assert_allclose(np.asarray(loss)[0], [-1.28, 0.9, 10.0], rtol=1e-5)


def test_policy_loss_gradient_is_zero_where_clipped():
    logprobs, old_logprobs, advantages = _policy_inputs(POLICY_CASES)
    mask = jnp.ones_like(logprobs)
    grads = jax.jit(jax.grad(lambda lp: jnp.sum(policy_loss(lp, old_logprobs, advantages, mask)[0])))(logprobs)
    for (advantage, ratio, _, clipped, dual), grad in zip(POLICY_CASES, np.asarray(grads)[0]):
        # d(-A * exp(logp - old)) / dlogp = -A * ratio where the unclipped term is active.
        expected = 0.0 if clipped or dual else -advantage * ratio
        np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_policy_loss_ignores_garbage_off_mask():
    logprobs = jnp.array([[-1.0, -jnp.inf, jnp.nan]])
    old_logprobs = jnp.array([[-1.1, 0.0, -3.0]])
    advantages = jnp.array([[1.0, 5.0, jnp.inf]])
    mask = jnp.array([[1.0, 0.0, 0.0]])
    loss, metrics = policy_loss(logprobs, old_logprobs, advantages, mask)
    grads = jax.jit(jax.grad(lambda lp: jnp.sum(policy_loss(lp, old_logprobs, advantages, mask)[0])))(logprobs)
    np.testing.assert_allclose(np.asarray(loss)[0], [-math.exp(0.1), 0.0, 0.0], rtol=1e-5)
    assert all(np.isfinite(float(value)) for value in metrics.values())
    np.testing.assert_allclose(np.asarray(grads)[0], [-math.exp(0.1), 0.0, 0.0], rtol=1e-5)


# ---------------------------------------------------------------- KL estimators


def test_kl_estimators_hand_computed():
    logprobs = jnp.array([math.log(0.5)])
    ref_logprobs = jnp.array([math.log(0.25)])
    log2 = math.log(2.0)
    expected = {
        "kl": log2,
        "k1": log2,
        "abs": log2,
        "mse": 0.5 * log2**2,
        "k2": 0.5 * log2**2,
        "low_var_kl": 0.5 + log2 - 1.0,  # exp(ref - logp) - (ref - logp) - 1 with ref - logp = -log 2
        "k3": 0.5 + log2 - 1.0,
    }
    assert set(expected) == set(registered_kl_estimators())
    for name, value in expected.items():
        np.testing.assert_allclose(float(kl_penalty(logprobs, ref_logprobs, name)[0]), value, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(float(kl_penalty(ref_logprobs, logprobs, "abs")[0]), log2, rtol=1e-6)


def test_low_var_kl_is_nonnegative_zero_on_policy_and_clamped():
    rng = np.random.default_rng(0)
    logprobs = jnp.asarray(rng.normal(size=50) - 2.0)
    ref_logprobs = jnp.asarray(rng.normal(size=50) - 2.0)
    assert np.all(np.asarray(kl_penalty(logprobs, ref_logprobs)) >= 0.0)
    np.testing.assert_array_equal(np.asarray(kl_penalty(logprobs, logprobs)), np.zeros(50))
    far = kl_penalty(jnp.array([-30.0]), jnp.array([0.0]))
    assert float(far[0]) == 10.0


def test_unknown_kl_estimator_lists_registered():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'.*low_var_kl"):
        losses.kl_penalty(jnp.zeros(2), jnp.zeros(2), "k4")


# ---------------------------------------------------------------- aggregation

PER_TOKEN = jnp.array([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0], [100.0, 100.0, 100.0, 100.0]])
MASK = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "mode, weighted_sum, denominator",
    [
        ("token-mean", 1 + 2 + 3 + 4, 4),  # every response token weighs the same
        ("seq-mean-token-mean", 2 + 4, 2),  # row means 2 and 4; the empty row does not count
        ("seq-mean-token-sum", 6 + 4, 2),
        ("seq-mean-token-sum-norm", 6 + 4, 2 * 4),  # token sums over sequences x the padded length 4
    ],
)
def test_aggregation_modes_hand_computed(mode, weighted_sum, denominator):
    total, count = aggregate_loss(PER_TOKEN, MASK, mode)
    assert float(total) == weighted_sum and float(count) == denominator


def test_seq_mean_token_sum_norm_divides_by_a_constant_length():
    total, count = losses.aggregate_loss(PER_TOKEN, MASK, "seq-mean-token-sum-norm", norm_length=16)
    assert float(total) == 10 and float(count) == 2 * 16
    # Dr. GRPO: a sequence's weight does not depend on its own length (unlike seq-mean-token-mean), and the
    # scale does not depend on how far the batch is padded.
    padded_per_token = jnp.pad(PER_TOKEN, ((0, 0), (0, 60)))
    padded_mask = jnp.pad(MASK, ((0, 0), (0, 60)))
    assert losses.aggregate_loss(padded_per_token, padded_mask, "seq-mean-token-sum-norm", norm_length=16) == \
        (total, count)


def test_unknown_aggregation_lists_registered():
    with pytest.raises(ValueError, match="unknown loss aggregation 'seq-sum'.*token-mean"):
        losses.aggregate_loss(PER_TOKEN, MASK, "seq-sum")


def test_finalize_loss_of_empty_batch_is_zero():
    assert float(finalize_loss(0.0, 0.0)) == 0.0


def _random_batch(seed, batch=6, time=7):
    rng = np.random.default_rng(seed)
    lengths = np.array([3, 7, 0, 1, 5, 2])[:batch]
    mask = (np.arange(time)[None, :] < lengths[:, None]).astype(np.float32)
    per_token = rng.normal(size=(batch, time)).astype(np.float32)
    return jnp.asarray(per_token), jnp.asarray(mask)


@pytest.mark.parametrize("mode", sorted(registered_aggregations()))
def test_two_micro_batches_equal_one_full_batch(mode):
    per_token, mask = _random_batch(0)
    full = finalize_loss(*aggregate_loss(per_token, mask, mode))
    first = aggregate_loss(per_token[:2], mask[:2], mode)
    second = aggregate_loss(per_token[2:], mask[2:], mode)
    accumulated = finalize_loss(jnp.stack([first[0], second[0]]), jnp.stack([first[1], second[1]]))
    np.testing.assert_allclose(float(accumulated), float(full), rtol=1e-6)
    # Averaging the two micro-batch means instead would be wrong for these unequal splits.
    naive = 0.5 * (finalize_loss(*first) + finalize_loss(*second))
    assert abs(float(naive) - float(full)) > 1e-3


def test_micro_batch_gradients_accumulate_to_full_batch_gradient():
    _, mask = _random_batch(1)
    rng = np.random.default_rng(1)
    logprobs = jnp.asarray(rng.normal(size=mask.shape).astype(np.float32) - 1.0)
    old_logprobs = logprobs + jnp.asarray(0.3 * rng.normal(size=mask.shape).astype(np.float32))
    ref_logprobs = logprobs + jnp.asarray(0.3 * rng.normal(size=mask.shape).astype(np.float32))
    entropy = jnp.asarray(rng.uniform(0.5, 2.0, size=mask.shape).astype(np.float32))
    advantages = jnp.asarray(rng.normal(size=mask.shape[:1]).astype(np.float32))[:, None] * mask
    cfg = LossConfig(kl_coef=0.1, entropy_coef=0.01)

    def weighted_sum(lp, rows):
        batch = (old_logprobs, ref_logprobs, entropy, advantages, mask)
        return rl_objective(lp[rows], *(array[rows] for array in batch), cfg)

    everything = slice(None)
    _, total_denominator, _ = weighted_sum(logprobs, everything)
    full_grad = jax.jit(jax.grad(lambda lp: weighted_sum(lp, everything)[0] / total_denominator))(logprobs)
    accumulated = sum(
        jax.jit(jax.grad(lambda lp, rows=rows: weighted_sum(lp, rows)[0] / total_denominator))(logprobs)
        for rows in (slice(0, 3), slice(3, None))
    )
    np.testing.assert_allclose(np.asarray(accumulated), np.asarray(full_grad), rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(full_grad)).sum() > 0


# ---------------------------------------------------------------- combined objective


def _objective_inputs():
    logprobs = jnp.array([[-1.0, -0.5, -2.0], [-0.2, -3.0, -1.0]])
    old_logprobs = jnp.array([[-1.1, -0.5, -1.0], [-0.2, -3.0, -1.0]])
    ref_logprobs = jnp.array([[-1.0, -1.5, -2.0], [0.0, -3.0, -1.0]])
    entropy = jnp.array([[1.0, 2.0, 3.0], [0.5, 0.5, 9.0]])
    advantages = jnp.array([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logprobs, old_logprobs, ref_logprobs, entropy, advantages, mask


def test_rl_objective_composes_terms():
    logprobs, old_logprobs, ref_logprobs, entropy, advantages, mask = _objective_inputs()
    cfg = LossConfig(kl_coef=0.5, entropy_coef=0.1, aggregation="token-mean")
    weighted_sum, denominator, metrics = rl_objective(
        logprobs, old_logprobs, ref_logprobs, entropy, advantages, mask, cfg
    )
    pg = np.asarray(policy_loss(logprobs, old_logprobs, advantages, mask)[0])
    kl = np.asarray(kl_penalty(logprobs, ref_logprobs, "low_var_kl"))
    mask, entropy = np.asarray(mask), np.asarray(entropy)
    expected_per_token = (pg + 0.5 * kl - 0.1 * entropy) * mask
    np.testing.assert_allclose(float(weighted_sum), expected_per_token.sum(), rtol=1e-6)
    assert float(denominator) == 5.0
    np.testing.assert_allclose(float(metrics["kl"]), (kl * mask).sum() / 5, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["entropy"]), (1 + 2 + 3 + 0.5 + 0.5) / 5, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["pg_loss"]), pg.sum() / 5, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]), float(weighted_sum) / 5, rtol=1e-6)
    assert float(metrics["response_tokens"]) == 5.0
    # Token (0, 2) has ratio e^-1 < 0.8 with A = 1: not clipped (min objective takes the unclipped term);
    # token (0, 0) has ratio e^0.1 in range. Nothing is clipped here.
    assert float(metrics["clip_fraction"]) == 0.0


def test_rl_objective_skips_kl_without_reference_or_coefficient():
    logprobs, old_logprobs, ref_logprobs, entropy, advantages, mask = _objective_inputs()
    no_kl = rl_objective(logprobs, old_logprobs, ref_logprobs, entropy, advantages, mask, LossConfig(kl_coef=0.0))
    no_ref = rl_objective(logprobs, old_logprobs, None, entropy, advantages, mask, LossConfig(kl_coef=0.5))
    with_kl = rl_objective(logprobs, old_logprobs, ref_logprobs, entropy, advantages, mask, LossConfig(kl_coef=0.5))
    assert float(no_kl[0]) == pytest.approx(float(no_ref[0]), rel=1e-6)
    assert float(with_kl[0]) > float(no_kl[0]) + 1e-3
    assert "kl" in no_kl[2] and float(no_kl[2]["kl"]) > 0
    assert "kl" not in no_ref[2]
    plain_cfg = LossConfig(kl_coef=0.0, entropy_coef=0.0)
    plain = rl_objective(logprobs, old_logprobs, None, None, advantages, mask, plain_cfg)
    pg, _ = policy_loss(logprobs, old_logprobs, advantages, mask)
    expected = aggregate_loss(pg, mask, "seq-mean-token-mean")
    np.testing.assert_allclose([float(plain[0]), float(plain[1])], [float(expected[0]), float(expected[1])], rtol=1e-6)


def test_rl_objective_under_jit_with_static_config_and_finite_gradients():
    logprobs, old_logprobs, ref_logprobs, entropy, advantages, mask = _objective_inputs()
    # Off-mask positions carry values that would poison the loss if they leaked in.
    logprobs = logprobs.at[1, 2].set(-jnp.inf)
    ref_logprobs = ref_logprobs.at[1, 2].set(jnp.nan)
    cfg = LossConfig()

    @jax.jit
    def loss_fn(lp, ent):  # the trainer's use: the objective inside a larger jitted function
        weighted_sum, denominator, metrics = rl_objective(lp, old_logprobs, ref_logprobs, ent, advantages, mask, cfg)
        return weighted_sum / denominator, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(logprobs, entropy)
    assert np.isfinite(float(loss))
    assert all(np.isfinite(float(value)) for value in metrics.values())
    for grad in grads:
        assert np.all(np.isfinite(np.asarray(grad)))
        assert float(grad[1, 2]) == 0.0
    # Entropy bonus: d loss / d entropy = -entropy_coef / (tokens in the row * sequences) under seq-mean-token-mean.
    np.testing.assert_allclose(float(grads[1][0, 0]), -0.001 / (3 * 2), rtol=1e-5)
    result = rl_objective(logprobs, old_logprobs, ref_logprobs, entropy, advantages, mask, cfg=cfg)
    np.testing.assert_allclose(float(result[0] / result[1]), float(loss), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"clip_low": 1.0}, r"LossConfig.clip_low=1.0 must be in \[0, 1\)"),
        ({"clip_high": -0.1}, "LossConfig.clip_high=-0.1"),
        ({"dual_clip": 1.0}, "LossConfig.dual_clip=1.0 must be > 1"),
        ({"kl_estimator": "k4"}, "LossConfig.kl_estimator='k4' is unknown; registered: .*low_var_kl"),
        ({"aggregation": "mean"}, "LossConfig.aggregation='mean' is unknown; registered: .*token-mean"),
    ],
)
def test_loss_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**kwargs)


def test_nll_policy_loss_trains_only_on_selected_tokens_without_ratio():
    logprobs = jnp.log(jnp.array([[0.5, 0.25, 0.1], [0.2, 0.2, 0.2], [0.9, 0.8, 0.7]]))
    old_logprobs = logprobs - 1.0  # far off-policy: PPO would clip, nll does not look at the ratio
    weights = jnp.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # row 1 failed
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    cfg = LossConfig(policy_loss="nll", kl_coef=0.0, entropy_coef=0.0, aggregation="token-mean")
    weighted_sum, denominator, metrics = losses.rl_objective(logprobs, old_logprobs, None, None, weights, mask, cfg)
    expected_sum = -(math.log(0.5) + math.log(0.25) + math.log(0.9) + math.log(0.8) + math.log(0.7))
    assert float(weighted_sum) == pytest.approx(expected_sum, rel=1e-6)
    assert float(denominator) == 5  # the failed row's 3 tokens do not count
    assert float(metrics["clip_fraction"]) == 0.0
    np.testing.assert_array_equal(np.asarray(losses.loss_token_mask(cfg, mask, weights)), np.asarray(mask * weights))

    def loss(lp):
        total, count, _ = losses.rl_objective(lp, old_logprobs, None, None, weights, mask, cfg)
        return total / count

    grad = np.asarray(jax.grad(loss)(logprobs))  # cross-entropy: -1/5 on each selected token, 0 elsewhere
    np.testing.assert_allclose(grad, -np.asarray(mask * weights) / 5, rtol=1e-6)
    # Nothing selected: zero loss and zero gradient.
    none = jnp.zeros_like(weights)
    total, count, _ = losses.rl_objective(logprobs, old_logprobs, None, None, none, mask, cfg)
    assert float(total) == 0.0 and float(count) == 0.0


def test_loss_config_rejects_unknown_policy_loss_and_bad_norm_length():
    with pytest.raises(ValueError, match="policy_loss='sft' is unknown; use one of nll, ppo_clip"):
        LossConfig(policy_loss="sft")
    with pytest.raises(ValueError, match="norm_length=0 must be a positive number of tokens"):
        LossConfig(norm_length=0)


def test_loss_config_defaults():
    cfg = LossConfig()
    assert (cfg.clip_low, cfg.clip_high, cfg.dual_clip) == (0.2, 0.2, 3.0)
    assert (cfg.kl_coef, cfg.kl_estimator, cfg.entropy_coef) == (0.001, "low_var_kl", 0.001)
    assert cfg.aggregation == "seq-mean-token-mean"
    assert (cfg.policy_loss, cfg.norm_length) == ("ppo_clip", None)
    assert LossConfig(dual_clip=None).dual_clip is None


@pytest.mark.parametrize("clip_low,clip_high", [(0.0, 0.2), (0.2, 0.0), (0.2, 0.2)])
def test_on_policy_gradient_is_minus_the_advantage_even_with_a_zero_clip_bound(clip_low, clip_high):
    """At ratio 1 the PPO loss's gradient with respect to the log-prob is -A per token, whatever the clip bounds."""
    advantages = jnp.asarray([[1.5, -0.5, 2.0]], jnp.float32)
    old = jnp.asarray([[-1.0, -2.0, -0.5]], jnp.float32)
    mask = jnp.ones_like(old)

    def total(logprobs):
        per_token, _ = losses.policy_loss(logprobs, old, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                                          dual_clip=None)
        return jnp.sum(per_token)

    np.testing.assert_allclose(np.asarray(jax.grad(total)(old)), -np.asarray(advantages), rtol=1e-6)
