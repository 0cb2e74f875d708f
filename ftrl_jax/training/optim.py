"""The optimizer: global-norm gradient clipping, then AdamW on a learning-rate schedule.

Weight decay skips norm scales and biases (a decay on a norm's scale pulls it towards 0, i.e. it
changes what the norm computes, which is not the regulariser anyone asks for).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import optax

# Parameter paths that get no weight decay (RMSNorm scales, all biases).
NO_DECAY_PATTERNS: tuple[str, ...] = (r"(^|/)scale$", r"(^|/)bias$")


def _constant_schedule(learning_rate: float, warmup_steps: int, total_steps: int | None) -> optax.Schedule:
    if warmup_steps <= 0:
        return optax.constant_schedule(learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)],
        [warmup_steps],
    )


def _cosine_schedule(learning_rate: float, warmup_steps: int, total_steps: int | None) -> optax.Schedule:
    if total_steps is None or total_steps <= warmup_steps:
        raise ValueError(
            f"schedule='cosine' needs total_steps greater than warmup_steps={warmup_steps}; "
            f"got total_steps={total_steps}"
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup_steps > 0 else learning_rate,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=0.0,
    )


SCHEDULES: dict[str, Callable[[float, int, int | None], optax.Schedule]] = {
    "constant": _constant_schedule,
    "cosine": _cosine_schedule,
}


def make_schedule(learning_rate: float, *, warmup_steps: int = 0, schedule: str = "constant",
                  total_steps: int | None = None) -> optax.Schedule:
    """Learning rate as a function of the optimizer step: linear warmup from 0, then `schedule`."""
    builder = SCHEDULES.get(schedule)
    if builder is None:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; available: {', '.join(SCHEDULES)}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
    return builder(learning_rate, warmup_steps, total_steps)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params: Any) -> Any:
    """A pytree of bools like `params`: True where weight decay applies (not norm scales, not biases)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(re.search(p, _path_str(path)) for p in NO_DECAY_PATTERNS), params
    )


def make_optimizer(
    learning_rate: float,
    *,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    warmup_steps: int = 0,
    b1: float = 0.9,
    b2: float = 0.999,
    schedule: str = "constant",
    total_steps: int | None = None,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Clip gradients to `max_grad_norm` (global L2 norm; None turns clipping off), then AdamW.

    The schedule counts optimizer updates, so with several mini-batches per RL step it advances
    once per mini-batch.
    """
    if learning_rate < 0:
        raise ValueError(f"learning_rate={learning_rate} must be >= 0")
    if max_grad_norm is not None and max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm={max_grad_norm} must be > 0 (or None to disable clipping)")
    lr = make_schedule(learning_rate, warmup_steps=warmup_steps, schedule=schedule, total_steps=total_steps)
    adamw = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)
