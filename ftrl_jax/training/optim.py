"""The optimizer: global-norm gradient clipping, then AdamW on a learning-rate schedule.

Weight decay is AdamW's decoupled decay (Loshchilov & Hutter 2019; `optax.adamw`): `lr * weight_decay * w`
is subtracted from each weight next to the Adam step, not added to the gradient, so the moments never
see it. It skips norm scales and biases (a decay on a norm's scale pulls it towards 0, i.e. it changes
what the norm computes, which is not the regulariser anyone asks for).

Trainable parameters (`trainable=`): `"all"` (default), a preset of `TRAINABLE_PRESETS` (`"mlp"`,
`"lower_mlp"`, `"attention"`) or a regular expression searched in each parameter's path. Paths name one
layer at a time: the stacked `layers` subtree (leading `[num_layers]` axis) reads as `layers/<i>/...`,
e.g. `layers/0/mlp/down_proj/kernel`, `layers/3/self_attn/q_proj/bias`, `embed_tokens/embedding`,
`norm/scale`. Frozen entries get an update of exactly -0.0 (the one value whose addition leaves every
float, -0.0 included, bit-for-bit unchanged), both before clipping (so they neither count in the global
norm nor move the Adam moments) and after AdamW (so weight decay does not touch them either). Their
optimizer moments are still allocated (a layer's slice of a stacked array cannot have none).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
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


STACKED_KEY = "layers"  # the top-level subtree whose leaves carry a leading [num_layers] axis
TRAINABLE_ALL = "all"


def _lower_third_mlp(num_layers: int) -> str:
    # Layers i with 3i < L: the lower third, rounded up so that a model of 1 or 2 layers trains its first.
    lower = [str(i) for i in range(num_layers) if 3 * i < num_layers]
    return rf"^{STACKED_KEY}/({'|'.join(lower)})/mlp/"


# name -> (num_layers -> regex over per-layer parameter paths).
TRAINABLE_PRESETS: dict[str, Callable[[int], str]] = {
    "mlp": lambda num_layers: rf"^{STACKED_KEY}/\d+/mlp/",
    # FTRL's analysis: the gain of tool-use RL sits mostly in the MLPs of the lower layers.
    "lower_mlp": _lower_third_mlp,
    "attention": lambda num_layers: rf"^{STACKED_KEY}/\d+/self_attn/",
}


def _num_layers(params: Any) -> int:
    stacked = params.get(STACKED_KEY) if hasattr(params, "get") else None
    leaves = jax.tree.leaves(stacked) if stacked is not None else []
    return int(leaves[0].shape[0]) if leaves else 0


def _is_stacked(path) -> bool:
    return bool(path) and str(getattr(path[0], "key", getattr(path[0], "name", path[0]))) == STACKED_KEY


def parameter_paths(params: Any) -> list[str]:
    """Every parameter path the `trainable` regex is matched against, one per layer for stacked leaves."""
    num_layers = _num_layers(params)
    paths = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = _path_str(path)
        if _is_stacked(path):
            rest = name[len(STACKED_KEY) + 1:]
            paths.extend(f"{STACKED_KEY}/{i}/{rest}" for i in range(num_layers))
        else:
            paths.append(name)
    return paths


def _path_patterns(params: Any) -> str:
    num_layers = _num_layers(params)
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = _path_str(path)
        if _is_stacked(path):
            name = f"{STACKED_KEY}/<i>/{name[len(STACKED_KEY) + 1:]}"
        names.append(name)
    return f"{', '.join(names)} (<i> = 0..{num_layers - 1})" if num_layers else ", ".join(names)


def _trainable_regex(params: Any, spec: str) -> str | None:
    """The regex of `spec` (None for "all"); raises ValueError for an invalid regex."""
    if spec == TRAINABLE_ALL:
        return None
    if spec in TRAINABLE_PRESETS:
        return TRAINABLE_PRESETS[spec](_num_layers(params))
    try:
        re.compile(spec)
    except re.error as err:
        raise ValueError(f"trainable={spec!r} is neither a preset ({TRAINABLE_ALL}, {', '.join(TRAINABLE_PRESETS)}) "
                         f"nor a valid regular expression ({err})") from None
    return spec


def trainable_mask(params: Any, spec: str = TRAINABLE_ALL) -> Any:
    """A pytree like `params` of NumPy bool arrays, True where the parameter trains.

    Each mask broadcasts against its leaf: shape `()` for an unstacked leaf, `[num_layers, 1, ...]` for a
    stacked one. `params` may be abstract (shapes only). Raises ValueError, listing the parameter path
    patterns, when `spec` is neither a preset nor a regex, or matches no parameter.
    """
    regex = _trainable_regex(params, spec)
    num_layers = _num_layers(params)

    def leaf_mask(path, leaf):
        if regex is None:
            return np.ones((), bool)
        name = _path_str(path)
        if not _is_stacked(path):
            return np.asarray(re.search(regex, name) is not None)
        rest = name[len(STACKED_KEY) + 1:]
        per_layer = np.array([re.search(regex, f"{STACKED_KEY}/{i}/{rest}") is not None for i in range(num_layers)])
        return per_layer.reshape((num_layers,) + (1,) * (len(leaf.shape) - 1))

    mask = jax.tree_util.tree_map_with_path(leaf_mask, params)
    if not any(m.any() for m in jax.tree.leaves(mask)):
        raise ValueError(f"trainable={spec!r} matches no parameter; use one of {TRAINABLE_ALL}, "
                         f"{', '.join(TRAINABLE_PRESETS)}, or a regular expression over the parameter paths "
                         f"{_path_patterns(params)}")
    return mask


def num_trainable(params: Any, spec: str = TRAINABLE_ALL) -> int:
    """How many scalar weights train under `spec` (see `trainable_mask`)."""
    mask = trainable_mask(params, spec)
    return int(sum(np.broadcast_to(m, leaf.shape).sum() for m, leaf in zip(jax.tree.leaves(mask),
                                                                            jax.tree.leaves(params))))


def freeze_parameters(spec: str) -> optax.GradientTransformation:
    """Replaces the updates of the parameters `spec` does not train with -0.0 (adding it changes no bit)."""

    def init_fn(params):
        trainable_mask(params, spec)  # fails on a bad spec before any step
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        mask = trainable_mask(updates, spec)

        def freeze(update, keep):
            if keep.all():
                return update
            return jnp.where(keep, update, jnp.asarray(-0.0, update.dtype))

        return jax.tree.map(freeze, updates, mask), state

    return optax.GradientTransformation(init_fn, update_fn)


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
    trainable: str = TRAINABLE_ALL,
) -> optax.GradientTransformation:
    """Clip gradients to `max_grad_norm` (global L2 norm; None turns clipping off), then AdamW.

    The schedule counts optimizer updates, so with several mini-batches per RL step it advances
    once per mini-batch. `trainable` selects the parameters that train (module docstring); the others
    stay bit-for-bit unchanged, weight decay included.
    """
    if learning_rate < 0:
        raise ValueError(f"learning_rate={learning_rate} must be >= 0")
    if max_grad_norm is not None and max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm={max_grad_norm} must be > 0 (or None to disable clipping)")
    lr = make_schedule(learning_rate, warmup_steps=warmup_steps, schedule=schedule, total_steps=total_steps)
    adamw = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    parts = [adamw] if max_grad_norm is None else [optax.clip_by_global_norm(max_grad_norm), adamw]
    if trainable != TRAINABLE_ALL:
        parts = [freeze_parameters(trainable), *parts, freeze_parameters(trainable)]
    return parts[0] if len(parts) == 1 else optax.chain(*parts)
