"""Advantage estimators for outcome-reward RL, as pure jittable functions.

Every estimator turns one scalar reward per sequence into per-token advantages `[B, T]`
over the response-token positions, zero wherever `mask` is 0 (prompt, padding and
tool-response tokens). Estimators live in a registry keyed by name; add one with

    @register_advantage_estimator("my_estimator", needs_groups=True)
    def my_estimator(rewards, mask, *, group_ids, **kw): ...

and call any of them through `compute_advantages(name, rewards, mask, ...)`.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

GRPO_EPS = 1e-6
WHITEN_EPS = 1e-8  # as verl's masked_whiten: (x - mean) * rsqrt(var + 1e-8)

AdvantageFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class AdvantageEstimator:
    """A registered estimator and whether it needs to know which sequences share a prompt."""

    name: str
    fn: AdvantageFn
    needs_groups: bool


_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str, *, needs_groups: bool = False):
    """Decorator adding `fn(rewards [B], mask [B, T], *, group_ids [B] | None, **kw) -> [B, T]`.

    `needs_groups=True` declares that the estimator's baseline comes from the other sequences of a prompt's group;
    the main job then refuses it with one rollout per prompt (`estimator_needs_groups`)."""

    def decorate(fn: AdvantageFn) -> AdvantageFn:
        if name in _ESTIMATORS:
            raise ValueError(
                f"advantage estimator {name!r} is already registered (by {_ESTIMATORS[name].fn.__qualname__}); "
                "pick another name"
            )
        _ESTIMATORS[name] = AdvantageEstimator(name=name, fn=fn, needs_groups=needs_groups)
        return fn

    return decorate


def registered_advantage_estimators() -> tuple[str, ...]:
    """Names accepted by `compute_advantages`, sorted."""
    return tuple(sorted(_ESTIMATORS))


def estimator_needs_groups(name: str) -> bool:
    """Whether the registered estimator `name` forms its baseline from the other samples of a prompt's group
    (GRPO, Dr.GRPO, RLOO, Reinforce++ with a group baseline): such an estimator gives every sequence of a group of
    one advantage 0, so it learns nothing with one rollout per prompt. Raises KeyError for an unregistered name."""
    if name not in _ESTIMATORS:
        raise KeyError(f"advantage estimator {name!r} is not registered; registered: "
                       f"{', '.join(registered_advantage_estimators())}")
    return _ESTIMATORS[name].needs_groups


def compute_advantages(
    name: str,
    rewards: jax.Array,
    mask: jax.Array,
    *,
    group_size: int | None = None,
    group_ids: jax.Array | None = None,
    **kw,
) -> jax.Array:
    """Per-token advantages `[B, T]` from outcome rewards `[B]` with the estimator `name`.

    Groups (sequences sampled from the same prompt) are given either as `group_size=n`,
    meaning the batch is laid out group-major (`B = num_groups * n`, rows `g*n .. g*n+n-1`
    share a prompt), or as integer `group_ids [B]` (any integers; map string prompt ids to
    integers first, e.g. with `np.unique(keys, return_inverse=True)`). Extra keyword
    arguments go to the estimator (`gamma=` for `reinforce_pp`, `scale_by_std=` for `grpo`).
    `name` and `group_size` must be static under `jax.jit`.
    """
    estimator = _ESTIMATORS.get(name)
    if estimator is None:
        raise ValueError(
            f"unknown advantage estimator {name!r}; registered: {', '.join(registered_advantage_estimators())}"
        )
    rewards = jnp.asarray(rewards, jnp.float32)
    mask = jnp.asarray(mask).astype(jnp.float32)
    if rewards.ndim != 1 or mask.ndim != 2 or mask.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"expected rewards [B] and mask [B, T]; got rewards {rewards.shape} and mask {mask.shape}"
        )
    resolved_ids = _resolve_group_ids(rewards.shape[0], group_size, group_ids)
    if estimator.needs_groups and resolved_ids is None:
        raise ValueError(
            f"advantage estimator {name!r} compares sequences within a prompt group: "
            "pass group_size=n (group-major layout) or group_ids=[B] integers"
        )
    return estimator.fn(rewards, mask, group_ids=resolved_ids, **kw)


def _resolve_group_ids(batch: int, group_size: int | None, group_ids) -> jax.Array | None:
    if group_size is not None and group_ids is not None:
        raise ValueError("pass either group_size or group_ids, not both")
    if group_size is not None:
        if not isinstance(group_size, numbers.Integral) or group_size < 1 or batch % group_size:
            raise ValueError(
                f"group_size={group_size!r} must be a positive int dividing the batch size {batch} "
                "(rewards are laid out group-major: num_groups * group_size)"
            )
        return jnp.arange(batch, dtype=jnp.int32) // int(group_size)
    if group_ids is not None:
        group_ids = jnp.asarray(group_ids)
        if group_ids.shape != (batch,) or not jnp.issubdtype(group_ids.dtype, jnp.integer):
            raise ValueError(
                f"group_ids must be an integer array of shape ({batch},); got {group_ids.dtype} {group_ids.shape}"
            )
        return group_ids
    return None


def group_signal(rewards, group_size: int, *, scale_by_std: bool = False) -> dict[str, float]:
    """How much learning signal a group-major batch of outcome rewards `[num_groups * group_size]` holds.

    `groups_mixed`: share of groups whose rewards are not all equal; a group whose n samples all score
    the same gets zero GRPO advantage, so this is the share of prompts the step learns from.
    `reward_positive`: share of samples with a reward above zero.
    `positive_advantage_on_failures`: of the positive advantages, the share on samples with a reward of at most
    zero (no call and no answer, or a format penalty): a turn that earned nothing, pushed up only because a
    group-mate scored below it. The advantage is the reward minus its group's mean (Dr. GRPO's; RLOO's is n/(n-1)
    times it), divided by the group's std with `scale_by_std=True` (GRPO's; a group with a small spread, such as
    seven 0s and one -0.3, then weighs as much as one holding a success). 0 when no sample is above its group's
    mean, and always 0 for rewards that are never negative. Host-side (numpy) logging statistics.
    """
    scores = np.asarray(rewards, np.float64)
    if group_size < 1 or scores.ndim != 1 or scores.size % group_size:
        raise ValueError(f"expected rewards [num_groups * {group_size}] in group-major order, got shape {scores.shape}")
    groups = scores.reshape(-1, group_size)
    mixed = groups.max(axis=1) > groups.min(axis=1)
    above_mean = np.maximum(groups - groups.mean(axis=1, keepdims=True), 0.0)
    above_mean[~mixed] = 0.0  # rounding in an all-equal group's mean is not signal
    if scale_by_std and mixed.any():
        # Groups have one size, so the std's ddof and GRPO's eps change every group alike; the share is unaffected.
        above_mean[mixed] /= groups[mixed].std(axis=1, keepdims=True)
    total = float(above_mean.sum())
    on_failures = float(above_mean[groups <= 0].sum()) / total if total > 0 else 0.0
    return {"groups_mixed": float(mixed.mean()) if mixed.size else 0.0,
            "reward_positive": float((scores > 0).mean()) if scores.size else 0.0,
            "positive_advantage_on_failures": on_failures}


# ---------------------------------------------------------------- masked statistics


def masked_mean(values: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of `values` where `mask` is 1; 0 where no position counts (instead of NaN)."""
    total = jnp.sum(values * mask, axis=axis)
    count = jnp.sum(mask, axis=axis)
    return total / jnp.maximum(count, 1.0)


def masked_whiten(values: jax.Array, mask: jax.Array) -> jax.Array:
    """`(values - mean) / sqrt(var + 1e-8)` with the mean and Bessel-corrected variance over `mask`.

    Statistics are taken over every masked position of the whole array (the batch), as verl's
    `masked_whiten`. With fewer than two counted positions the variance is taken as 0.
    """
    count = jnp.sum(mask)
    mean = masked_mean(values, mask)
    squared_deviation = jnp.sum(jnp.square(values - mean) * mask)
    variance = squared_deviation / jnp.maximum(count - 1.0, 1.0)
    return (values - mean) * jax.lax.rsqrt(variance + WHITEN_EPS)


def place_on_last_token(rewards: jax.Array, mask: jax.Array) -> jax.Array:
    """Token-level rewards `[B, T]`: each outcome reward sits on its sequence's last masked position.

    Rows with no response token get no reward anywhere (their advantage is 0).
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    mask = jnp.asarray(mask).astype(jnp.float32)
    time = mask.shape[1]
    has_response = jnp.any(mask > 0, axis=1)
    last_index = time - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=1)
    at_last = jnp.arange(time)[None, :] == last_index[:, None]
    return jnp.where(at_last & has_response[:, None], rewards[:, None], 0.0)


def discounted_returns(token_rewards: jax.Array, mask: jax.Array, gamma: float = 1.0) -> jax.Array:
    """Backward discounted sums over response tokens only: `G_t = r_t + gamma * G_next`.

    `G_next` is the return at the next position where `mask` is 1: tool-response and padding
    positions carry the running return through unchanged and are not discount steps, so in a
    multi-turn trajectory the tokens of every assistant turn see the final outcome. On a
    single-turn right-padded mask this equals verl's loop (which resets the running return at
    masked positions). Output is masked.
    """
    token_rewards = jnp.asarray(token_rewards, jnp.float32)
    mask = jnp.asarray(mask).astype(jnp.float32)

    def step(running, inputs):
        reward_t, mask_t = inputs  # [B], [B]
        updated = reward_t + gamma * running
        running = jnp.where(mask_t > 0, updated, running)
        return running, running * mask_t

    init = jnp.zeros(token_rewards.shape[0], jnp.float32)
    _, returns_tb = jax.lax.scan(step, init, (token_rewards.T, mask.T), reverse=True)
    return returns_tb.T


# ---------------------------------------------------------------- estimators


def _group_statistics(rewards: jax.Array, group_ids: jax.Array):
    """Per-row group mean, unbiased group std and group size, via a `[B, B]` same-group matrix.

    A dense pairwise matrix keeps this shape-static for arbitrary integer ids (no segment
    count to know in advance); B is the number of sampled sequences, so B*B stays small.
    """
    same_group = (group_ids[:, None] == group_ids[None, :]).astype(jnp.float32)  # [B, B]
    group_count = jnp.sum(same_group, axis=1)
    # An elementwise sum, not `same_group @ rewards`: a float32 matmul may run at reduced precision on an
    # accelerator (TF32 on GPUs, bfloat16 passes on TPUs), and a group of equal rewards would then get a mean
    # off by ~1e-3, a std of the same size and GRPO advantages of about +-1 instead of 0.
    group_mean = jnp.sum(same_group * rewards[None, :], axis=1) / group_count
    # Deviations from the row's own group mean: exact, unlike E[r^2] - mean^2 which can go negative.
    squared_deviation = jnp.sum(same_group * jnp.square(rewards[None, :] - group_mean[:, None]), axis=1)
    group_std = jnp.sqrt(squared_deviation / jnp.maximum(group_count - 1.0, 1.0))
    return group_mean, group_std, group_count


@register_advantage_estimator("grpo", needs_groups=True)
def grpo_advantages(
    rewards: jax.Array,
    mask: jax.Array,
    *,
    group_ids: jax.Array,
    eps: float = GRPO_EPS,
    scale_by_std: bool = True,
) -> jax.Array:
    """GRPO: `(r - group mean) / (group unbiased std + eps)`, broadcast over response tokens.

    A group of one has no peers to compare with and gets advantage 0. With
    `scale_by_std=False` only the group mean is subtracted (the Dr. GRPO variant).
    """
    group_mean, group_std, group_count = _group_statistics(rewards, group_ids)
    centred = rewards - group_mean
    scaled = centred / (group_std + eps) if scale_by_std else centred
    per_sequence = jnp.where(group_count > 1, scaled, 0.0)
    return per_sequence[:, None] * mask


@register_advantage_estimator("reinforce_pp")
def reinforce_pp_advantages(
    rewards: jax.Array,
    mask: jax.Array,
    *,
    group_ids: jax.Array | None = None,
    gamma: float = 1.0,
) -> jax.Array:
    """Reinforce++: outcome reward on the last response token, discounted returns, whitened over the batch.

    Follows verl's `compute_reinforce_plus_plus_outcome_advantage`; groups are not used
    (the baseline is the batch-wide mean of the returns over all response tokens).
    """
    del group_ids
    returns = discounted_returns(place_on_last_token(rewards, mask), mask, gamma)
    return masked_whiten(returns, mask) * mask


@register_advantage_estimator("reinforce_pp_baseline", needs_groups=True)
def reinforce_pp_baseline_advantages(
    rewards: jax.Array,
    mask: jax.Array,
    *,
    group_ids: jax.Array,
) -> jax.Array:
    """Reinforce++ with a group-mean baseline: `r - group mean` on every response token, then batch-whitened.

    Unlike verl (which uses a baseline of 0 for a lone sample), a group of one is its own
    baseline and contributes 0 before whitening, as in `grpo`.
    """
    group_mean, _, _ = _group_statistics(rewards, group_ids)
    per_token = (rewards - group_mean)[:, None] * mask
    return masked_whiten(per_token, mask) * mask


@register_advantage_estimator("dr_grpo", needs_groups=True)
def dr_grpo_advantages(
    rewards: jax.Array,
    mask: jax.Array,
    *,
    group_ids: jax.Array,
) -> jax.Array:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", sec. 3.2): `r - group mean`.

    GRPO without the division by the group's std (which up-weights prompts that are nearly always solved
    or nearly never). The paper's other half, a loss that does not divide by each response's length, is
    the `seq-mean-token-sum-norm` aggregation (`rl.losses`). A group of one gets advantage 0, as in `grpo`.
    """
    return grpo_advantages(rewards, mask, group_ids=group_ids, scale_by_std=False)


@register_advantage_estimator("rloo", needs_groups=True)
def rloo_advantages(
    rewards: jax.Array,
    mask: jax.Array,
    *,
    group_ids: jax.Array,
) -> jax.Array:
    """RLOO (REINFORCE leave-one-out, Ahmadian et al. 2024): `r_i - mean of the other n - 1 rewards of the group`.

    Equals `(r_i - group mean) * n / (n - 1)`, as verl's `compute_rloo_outcome_advantage` computes it.
    A group of one has no other sample to form a baseline from and gets advantage 0 (verl keeps its raw
    reward instead), as in `grpo`.
    """
    group_mean, _, group_count = _group_statistics(rewards, group_ids)
    leave_one_out = (rewards - group_mean) * group_count / jnp.maximum(group_count - 1.0, 1.0)
    per_sequence = jnp.where(group_count > 1, leave_one_out, 0.0)
    return per_sequence[:, None] * mask


RFT_ESTIMATOR = "rft"


@register_advantage_estimator(RFT_ESTIMATOR)
def rft_weights(
    rewards: jax.Array,
    mask: jax.Array,
    *,
    group_ids: jax.Array | None = None,
    success_threshold: float = 1.0,
) -> jax.Array:
    """Rejection-sampling fine-tuning's token weights: 1 on the response tokens of a success
    (`reward >= success_threshold`), 0 elsewhere.

    Not an advantage: the weights select which sampled responses the supervised (`nll`) policy loss trains
    on (Yuan et al. 2023, "Scaling Relationship on Learning Mathematical Reasoning with LLMs": RFT keeps
    the correct samples and fine-tunes on them). Groups are not used.
    """
    del group_ids
    success = (rewards >= success_threshold).astype(jnp.float32)
    return success[:, None] * mask
