"""RL algorithm core as pure, jittable JAX functions: advantages and losses (the chunked token log-probs they
use live in `training.logprobs` and are re-exported here)."""

from ftrl_jax.rl.advantages import (
    compute_advantages,
    discounted_returns,
    grpo_advantages,
    group_signal,
    masked_mean,
    masked_whiten,
    place_on_last_token,
    register_advantage_estimator,
    registered_advantage_estimators,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
)
from ftrl_jax.training.logprobs import token_logprobs_and_entropy, token_logprobs_from_logits
from ftrl_jax.rl.losses import (
    LossConfig,
    aggregate_loss,
    finalize_loss,
    kl_penalty,
    policy_loss,
    register_kl_estimator,
    registered_aggregations,
    registered_kl_estimators,
    rl_objective,
)

__all__ = [
    "LossConfig",
    "aggregate_loss",
    "compute_advantages",
    "discounted_returns",
    "finalize_loss",
    "grpo_advantages",
    "group_signal",
    "kl_penalty",
    "masked_mean",
    "masked_whiten",
    "place_on_last_token",
    "policy_loss",
    "register_advantage_estimator",
    "register_kl_estimator",
    "registered_advantage_estimators",
    "registered_aggregations",
    "registered_kl_estimators",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "rl_objective",
    "token_logprobs_and_entropy",
    "token_logprobs_from_logits",
]
