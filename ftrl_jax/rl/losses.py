"""The RL objective: PPO-clipped policy loss, KL to a reference policy, entropy bonus, aggregation.

All inputs are `[B, T]` over response-token positions with a float `mask [B, T]` (1 for tokens
that count). Every function is pure and jittable; the `LossConfig` is a frozen (hashable)
dataclass, so it can be a static argument of `jax.jit`.

Aggregation and gradient accumulation
-------------------------------------
Aggregators return `(weighted_sum, denominator)` rather than a mean, so that a batch split
into micro-batches averages exactly as the full batch would:

    loss = sum_over_micro_batches(weighted_sum) / sum_over_micro_batches(denominator)

(`finalize_loss` does this division). The modes:

- `token-mean`: weighted_sum = sum of per-token losses, denominator = number of response tokens.
  Every token weighs the same, wherever its sequence ends.
- `seq-mean-token-mean` (default): weighted_sum = sum over sequences of that sequence's mean
  token loss, denominator = number of sequences with at least one response token.
- `seq-mean-token-sum`: weighted_sum = sum over sequences of the summed token losses,
  denominator = number of sequences with at least one response token.
- `seq-mean-token-sum-norm` (Dr. GRPO, Liu et al. 2025, sec. 3.2): weighted_sum = sum of the token
  losses, denominator = number of sequences with at least one response token x `norm_length`, a
  constant (the generation budget), so no response's tokens are down-weighted for its length. Dr. GRPO's
  reference code divides each sequence's token sum by the maximum generation length and averages over
  sequences; verl's mode of the same name sums over sequences and divides by the padded length
  (`loss_mask.shape[-1]`). Here `norm_length=None` falls back to that padded length, which changes with
  the batch's padding: pass the budget (`LossConfig.norm_length`) for a constant scale.

Sequences without any response token contribute neither to the sum nor to the denominator
(verl divides seq-mean modes by the full batch size instead).

For gradient accumulation, differentiate `weighted_sum / total_denominator` per micro-batch,
where `total_denominator` is the sum over all micro-batches (known before the first backward
pass from the masks alone), and add up the gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from ftrl_jax.rl.advantages import masked_mean

LOG_RATIO_CLAMP = 20.0  # as verl: keeps exp(log_ratio) finite when policies drift far apart
LOW_VAR_KL_CLAMP = 10.0

# ---------------------------------------------------------------- KL estimators

KlFn = Callable[[jax.Array, jax.Array], jax.Array]
_KL_ESTIMATORS: dict[str, KlFn] = {}


def register_kl_estimator(*names: str):
    """Decorator adding `fn(logprobs [B, T], ref_logprobs [B, T]) -> per-token KL [B, T]` under `names`."""

    def decorate(fn: KlFn) -> KlFn:
        for name in names:
            if name in _KL_ESTIMATORS:
                raise ValueError(f"KL estimator {name!r} is already registered; pick another name")
            _KL_ESTIMATORS[name] = fn
        return fn

    return decorate


def registered_kl_estimators() -> tuple[str, ...]:
    """Names accepted by `kl_penalty` and `LossConfig.kl_estimator`, sorted."""
    return tuple(sorted(_KL_ESTIMATORS))


@register_kl_estimator("kl", "k1")
def kl_k1(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    """k1: `logp - ref`; unbiased for KL(policy || ref) but high variance and can be negative."""
    return logprobs - ref_logprobs


@register_kl_estimator("abs")
def kl_abs(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    """`|logp - ref|`."""
    return jnp.abs(logprobs - ref_logprobs)


@register_kl_estimator("mse", "k2")
def kl_k2(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    """k2: `0.5 * (logp - ref)^2`."""
    return 0.5 * jnp.square(logprobs - ref_logprobs)


@register_kl_estimator("low_var_kl", "k3")
def kl_k3(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    """k3: `exp(ref - logp) - (ref - logp) - 1`, non-negative, clamped to [-10, 10] as verl does."""
    log_ratio = jnp.clip(ref_logprobs - logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    kl = jnp.exp(log_ratio) - log_ratio - 1.0
    return jnp.clip(kl, -LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)


def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "low_var_kl") -> jax.Array:
    """Per-token KL estimate `[B, T]` between the policy and the reference, by registered name."""
    fn = _KL_ESTIMATORS.get(estimator)
    if fn is None:
        raise ValueError(f"unknown KL estimator {estimator!r}; registered: {', '.join(registered_kl_estimators())}")
    return fn(logprobs, ref_logprobs)


# ---------------------------------------------------------------- aggregation

AggregateFn = Callable[[jax.Array, jax.Array, "int | None"], tuple[jax.Array, jax.Array]]


def _token_mean(per_token: jax.Array, mask: jax.Array, norm_length: int | None = None):
    return jnp.sum(per_token * mask), jnp.sum(mask)


def _sequences_with_tokens(mask: jax.Array):
    tokens_per_sequence = jnp.sum(mask, axis=-1)  # [B]
    return tokens_per_sequence, jnp.sum((tokens_per_sequence > 0).astype(jnp.float32))


def _seq_mean_token_mean(per_token: jax.Array, mask: jax.Array, norm_length: int | None = None):
    tokens_per_sequence, sequences = _sequences_with_tokens(mask)
    sequence_means = jnp.sum(per_token * mask, axis=-1) / jnp.maximum(tokens_per_sequence, 1.0)
    return jnp.sum(sequence_means), sequences


def _seq_mean_token_sum(per_token: jax.Array, mask: jax.Array, norm_length: int | None = None):
    _, sequences = _sequences_with_tokens(mask)
    return jnp.sum(per_token * mask), sequences


def _seq_mean_token_sum_norm(per_token: jax.Array, mask: jax.Array, norm_length: int | None = None):
    _, sequences = _sequences_with_tokens(mask)
    length = mask.shape[-1] if norm_length is None else norm_length
    return jnp.sum(per_token * mask), sequences * length


_AGGREGATIONS: dict[str, AggregateFn] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def registered_aggregations() -> tuple[str, ...]:
    """Names accepted by `aggregate_loss` and `LossConfig.aggregation`, sorted."""
    return tuple(sorted(_AGGREGATIONS))


def aggregate_loss(per_token: jax.Array, mask: jax.Array, mode: str = "seq-mean-token-mean", *,
                   norm_length: int | None = None):
    """`(weighted_sum, denominator)` scalars for `per_token [B, T]` under `mode` (see the module docstring).

    `norm_length` (tokens) is only read by `seq-mean-token-sum-norm`.
    """
    fn = _AGGREGATIONS.get(mode)
    if fn is None:
        raise ValueError(f"unknown loss aggregation {mode!r}; registered: {', '.join(registered_aggregations())}")
    return fn(per_token, jnp.asarray(mask).astype(jnp.float32), norm_length)


def finalize_loss(weighted_sums, denominators) -> jax.Array:
    """The loss from one or many micro-batches: `sum(weighted_sums) / sum(denominators)`; 0 if nothing counted."""
    return jnp.sum(jnp.asarray(weighted_sums)) / jnp.maximum(jnp.sum(jnp.asarray(denominators)), 1.0)


# ---------------------------------------------------------------- policy loss


def policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
):
    """PPO clipped surrogate with dual clip; returns `(per_token_loss [B, T], metrics)`.

    `ratio = exp(logprobs - old_logprobs)`; loss = `max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))`,
    and for A < 0 additionally capped at `-A * dual_clip` (dual-clip PPO, arXiv 1912.09729), so a
    huge ratio on a bad token cannot produce an unbounded loss. `dual_clip=None` turns that off.
    Metrics (masked means): `clip_fraction` (the clipped term was the larger), `dual_clip_fraction`,
    `approx_kl` (k1 estimate of KL(old || new): mean of `old - new`). The per-token loss is 0 off-mask.
    """
    mask = jnp.asarray(mask).astype(jnp.float32)
    counted = mask > 0
    old_logprobs = jax.lax.stop_gradient(old_logprobs)
    advantages = jax.lax.stop_gradient(advantages)
    # Off-mask positions may hold anything (even -inf); zero them before exp so neither the
    # loss nor its gradient can turn NaN.
    log_ratio = jnp.where(counted, logprobs - old_logprobs, 0.0)
    log_ratio = jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    advantages = jnp.where(counted, advantages, 0.0)

    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    # max(unclipped, clipped), taking the unclipped branch on a tie: jnp.maximum would split the gradient there,
    # so at ratio 1 with a clip bound of 0 (a bound on which the clip's own gradient is split too) the on-policy
    # gradient would be 0.75 A instead of A.
    ppo_loss = jnp.where(clipped > unclipped, clipped, unclipped)
    if dual_clip is None:
        loss = ppo_loss
        dual_clipped = jnp.zeros_like(ppo_loss, dtype=bool)
    else:
        dual_bound = -advantages * dual_clip
        dual_clipped = (advantages < 0) & (ppo_loss > dual_bound)
        loss = jnp.where(advantages < 0, jnp.minimum(ppo_loss, dual_bound), ppo_loss)

    metrics = {
        "clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "dual_clip_fraction": masked_mean(dual_clipped.astype(jnp.float32), mask),
        "approx_kl": masked_mean(-log_ratio, mask),
    }
    return loss * mask, metrics


def nll_policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    weights: jax.Array,
    mask: jax.Array,
):
    """Weighted negative log-likelihood `-weight * logprobs`, the supervised (cross-entropy) loss of rejection-
    sampling fine-tuning; returns `(per_token_loss [B, T], metrics)` like `policy_loss`.

    `weights [B, T]` are constants (`rft_weights`: 1 on the tokens of a successful response). No ratio and no
    clipping: the sampling policy's `old_logprobs` only feed the `approx_kl` metric; the clip fractions are 0.
    """
    mask = jnp.asarray(mask).astype(jnp.float32)
    counted = mask > 0
    weights = jnp.where(counted, jax.lax.stop_gradient(weights), 0.0)
    safe_logprobs = jnp.where(counted, logprobs, 0.0)
    log_ratio = jnp.where(counted, logprobs - jax.lax.stop_gradient(old_logprobs), 0.0)
    zero = jnp.zeros((), jnp.float32)
    metrics = {"clip_fraction": zero, "dual_clip_fraction": zero, "approx_kl": masked_mean(-log_ratio, mask)}
    return -weights * safe_logprobs * mask, metrics


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
    """A policy loss by name. `selects_tokens`: the loss trains only on tokens with a positive weight (the
    `advantages` array), so the aggregation counts only those (`loss_token_mask`)."""

    name: str
    selects_tokens: bool


# ppo_clip: `policy_loss` (verl's `compute_policy_loss`, PPO with dual clip); nll: `nll_policy_loss` (RFT).
POLICY_LOSSES: dict[str, PolicyLoss] = {
    "ppo_clip": PolicyLoss("ppo_clip", selects_tokens=False),
    "nll": PolicyLoss("nll", selects_tokens=True),
}


# ---------------------------------------------------------------- combined objective


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Coefficients and modes of `rl_objective`. Defaults follow verl's GRPO recipe."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    kl_coef: float = 0.001
    kl_estimator: str = "low_var_kl"
    entropy_coef: float = 0.001
    aggregation: str = "seq-mean-token-mean"
    # "ppo_clip" | "nll" (POLICY_LOSSES); nll ignores the clip settings.
    policy_loss: str = "ppo_clip"
    # Tokens; the constant of `seq-mean-token-sum-norm` (None: the padded length of the batch).
    norm_length: int | None = None

    def __post_init__(self):
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(
                f"LossConfig.clip_low={self.clip_low!r} must be in [0, 1) (the ratio's lower bound is 1 - clip_low)"
            )
        if self.clip_high < 0.0:
            raise ValueError(f"LossConfig.clip_high={self.clip_high!r} must be >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"LossConfig.dual_clip={self.dual_clip!r} must be > 1 (or None to disable dual clip)")
        if self.kl_estimator not in _KL_ESTIMATORS:
            raise ValueError(
                f"LossConfig.kl_estimator={self.kl_estimator!r} is unknown; "
                f"registered: {', '.join(registered_kl_estimators())}"
            )
        if self.aggregation not in _AGGREGATIONS:
            raise ValueError(
                f"LossConfig.aggregation={self.aggregation!r} is unknown; "
                f"registered: {', '.join(registered_aggregations())}"
            )
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"LossConfig.policy_loss={self.policy_loss!r} is unknown; use one of "
                             f"{', '.join(sorted(POLICY_LOSSES))}")
        if self.norm_length is not None and self.norm_length < 1:
            raise ValueError(f"LossConfig.norm_length={self.norm_length!r} must be a positive number of tokens "
                             "(or None for the padded length)")


def loss_token_mask(cfg: LossConfig, mask: jax.Array, advantages: jax.Array) -> jax.Array:
    """Float `[B, T]` mask of the tokens the objective aggregates over: `mask`, and for a policy loss that
    selects tokens (`nll`) only those with a positive weight, so the loss is a mean over the trained tokens."""
    mask = jnp.asarray(mask).astype(jnp.float32)
    if POLICY_LOSSES[cfg.policy_loss].selects_tokens:
        return mask * (jax.lax.stop_gradient(advantages) > 0)
    return mask


def rl_objective(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    ref_logprobs: jax.Array | None,
    entropy: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    cfg: LossConfig = LossConfig(),
):
    """Per-token `pg + kl_coef * kl - entropy_coef * entropy`, aggregated: `(weighted_sum, denominator, metrics)`.

    `pg` is `cfg.policy_loss`: the PPO clipped surrogate (`policy_loss`) or, for `nll`, the supervised
    `nll_policy_loss` over the tokens `loss_token_mask` keeps (every term is then over those tokens only).

    `logprobs` (and `entropy`) come from the policy being trained and carry the gradient;
    `old_logprobs` (sampler), `ref_logprobs` (frozen reference) and `advantages` are constants.
    The KL term is skipped when `ref_logprobs` is None or `cfg.kl_coef == 0` (the `kl` metric is
    still reported whenever `ref_logprobs` is given); the entropy term when `entropy` is None or
    `cfg.entropy_coef == 0`. Metrics are masked token means: `pg_loss`, `kl`, `entropy`,
    `clip_fraction`, `dual_clip_fraction`, `approx_kl`; plus `response_tokens` (the mask sum,
    to weight metrics across micro-batches) and `loss` (this batch's weighted_sum / denominator).
    """
    mask = loss_token_mask(cfg, mask, advantages)
    counted = mask > 0
    if cfg.policy_loss == "nll":
        pg_per_token, metrics = nll_policy_loss(logprobs, old_logprobs, advantages, mask)
    else:
        pg_per_token, metrics = policy_loss(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip,
        )
    metrics["pg_loss"] = masked_mean(pg_per_token, mask)
    per_token = pg_per_token

    if ref_logprobs is not None:
        ref_logprobs = jnp.where(counted, jax.lax.stop_gradient(ref_logprobs), 0.0)
        safe_logprobs = jnp.where(counted, logprobs, 0.0)
        kl_per_token = kl_penalty(safe_logprobs, ref_logprobs, cfg.kl_estimator) * mask
        metrics["kl"] = masked_mean(kl_per_token, mask)
        if cfg.kl_coef != 0.0:
            per_token = per_token + cfg.kl_coef * kl_per_token

    if entropy is not None:
        entropy = jnp.where(counted, entropy, 0.0)
        metrics["entropy"] = masked_mean(entropy, mask)
        if cfg.entropy_coef != 0.0:
            per_token = per_token - cfg.entropy_coef * entropy * mask

    weighted_sum, denominator = aggregate_loss(per_token, mask, cfg.aggregation, norm_length=cfg.norm_length)
    metrics["response_tokens"] = jnp.sum(mask)
    metrics["loss"] = finalize_loss(weighted_sum, denominator)
    return weighted_sum, denominator, metrics
