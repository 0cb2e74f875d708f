"""The training state (step, params, optimizer state, float32 master weights), its sharding, and one
accumulated optimizer update.

Mixed precision (Micikevicius et al. 2018, "Mixed Precision Training"): when the parameters are in a
low-precision floating dtype (bfloat16 in every paper preset), the state also keeps a float32 master
copy of them (`master_params`), and the optimizer (its moments included) works on that copy. An AdamW
step at the paper's RL learning rate (1e-6) moves a weight by about 1e-6, far below half a bfloat16
ulp of a typical weight (~1e-4 at 0.02), so applied to bfloat16 weights most updates round away
(measured: 20 steps changed 1.6% of a tiny bfloat16 model's weights, 100% with the master copy).
`params` stays in the model's dtype and always equals the master cast to it (`compute_params`): the
forward and backward passes, the sampler, log-prob scoring and export use it; each jitted update
applies float32 gradients to the master copy and casts it back. With float32 parameters there is no
master copy (`master_params` is None) and everything is as without mixed precision.

Optimizer moments mirror the parameters, so they are laid out like them: each optimizer-state leaf
takes the sharding of the parameter whose path is the longest suffix of its own path and whose
shape is the same (`.../mu/layers/mlp/gate_proj/kernel` -> `layers/mlp/gate_proj/kernel`).
Scalars (step counts) and leaves that mirror no parameter are replicated.

Gradient accumulation (`accumulate_gradients`) splits a batch into micro-batches and scans over
them, differentiating `weighted_sum / total_denominator` per micro-batch, where the total is known
from the masks before any backward pass; the summed gradients then equal the full batch's.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ftrl_jax import parallel

Batch = dict[str, jax.Array]


MASTER_DTYPE = jnp.float32


@flax.struct.dataclass
class TrainState:
    """Everything a training run updates.

    `step`: int32 scalar, optimizer updates so far. `params`: the weights in the model's dtype, what
    the model runs with. `opt_state`: the optimizer's state, for the master copy when there is one.
    `master_params`: None, or (when `params` has low-precision floating leaves) the float32 master
    weights the optimizer updates, laid out like `params`; then `params == compute_params(master_params,
    params)` always holds. Checkpoints hold both, so a resume continues from the exact master copy.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    master_params: Any = None

    @property
    def optimized_params(self) -> Any:
        """The weights the optimizer updates: the float32 master copy if there is one, else `params`."""
        return self.params if self.master_params is None else self.master_params


def _is_low_precision(x) -> bool:
    dtype = jnp.dtype(getattr(x, "dtype", jnp.float32))
    return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < jnp.dtype(MASTER_DTYPE).itemsize


def needs_master_copy(params: Any) -> bool:
    """True when some parameter is in a floating dtype narrower than float32 (bfloat16, float16, ...)."""
    return any(_is_low_precision(x) for x in jax.tree.leaves(params))


def master_copy(params: Any) -> Any:
    """A new float32 copy of `params` (floating leaves in float32; other leaves copied as they are)."""
    def copy(x):
        dtype = MASTER_DTYPE if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        return jnp.array(x, dtype=dtype, copy=True)  # never aliases `params` (both may be donated)

    return jax.tree.map(copy, params)


def compute_params(master_params: Any, like: Any) -> Any:
    """`master_params` cast leaf by leaf to the dtypes of `like` (the model-dtype params)."""
    return jax.tree.map(lambda m, p: m.astype(p.dtype), master_params, like)


def create_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh state at step 0 with `params`; with low-precision params, a float32 master copy of them.

    The optimizer is initialised on the weights it will update (`optimized_params`), so with a master
    copy its moments are float32 too.
    """
    master = master_copy(params) if needs_master_copy(params) else None
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None, master_params=master)
    return state.replace(opt_state=optimizer.init(state.optimized_params))


def _key_str(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_parts(path) -> list[str]:
    return [_key_str(k) for k in path]


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
    """A `TrainState` of NamedShardings for `state` (real or abstract arrays), laid out as the module says."""
    params_sharding = parallel.param_shardings(state.params, mesh)
    by_path = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        by_path["/".join(_path_parts(path))] = leaf.shape
    sharding_by_path = {
        "/".join(_path_parts(path)): s for path, s in jax.tree_util.tree_flatten_with_path(params_sharding)[0]
    }
    replicated = NamedSharding(mesh, P())

    def opt_leaf_sharding(path, leaf):
        shape = getattr(leaf, "shape", ())
        if len(shape) == 0:
            return replicated
        parts = _path_parts(path)
        for start in range(len(parts)):  # longest suffix first
            suffix = "/".join(parts[start:])
            if by_path.get(suffix) == tuple(shape):
                return sharding_by_path[suffix]
        return replicated

    return TrainState(
        step=replicated,
        params=params_sharding,
        opt_state=jax.tree_util.tree_map_with_path(opt_leaf_sharding, state.opt_state),
        master_params=None if state.master_params is None else params_sharding,  # laid out like the params
    )


def shard_state(state: TrainState, mesh: Mesh) -> TrainState:
    """`state` placed on `mesh` with `state_shardings`.

    Arrays already laid out that way are not copied, so the result may share buffers with `state`:
    after a step that donates it, `state` is no longer usable.
    """
    return jax.device_put(state, state_shardings(state, mesh))


def abstract_state(init_params_fn: Callable[[], Any], optimizer: optax.GradientTransformation) -> TrainState:
    """Shapes and dtypes of the state built from `init_params_fn()`, without allocating it."""
    return jax.eval_shape(lambda: create_train_state(init_params_fn(), optimizer))


# ---------------------------------------------------------------- micro-batches and updates


def split_batch(batch: Batch, num_splits: int, mesh: Mesh | None = None) -> Batch:
    """`[B, ...]` leaves -> `[num_splits, B // num_splits, ...]`, split i taking rows i, i + n, i + 2n, ...

    Strided rows keep every split spread over all batch shards (the batch's leading axis is
    sharded in contiguous blocks), so no split lands on a subset of the devices. When `mesh` is
    given and each split's rows divide evenly over the batch axes, the result is constrained to
    keep the split axis whole and the rows sharded, so that no device holds a whole split.
    """
    sizes = {name: x.shape[0] for name, x in batch.items()}
    batch_size = next(iter(sizes.values()))
    if any(size != batch_size for size in sizes.values()):
        raise ValueError(f"batch arrays disagree on the batch size: {sizes}")
    if batch_size % num_splits:
        raise ValueError(f"batch size {batch_size} is not divisible into {num_splits} equal splits; "
                         f"pick a batch size that is a multiple of {num_splits}")
    rows = batch_size // num_splits

    def split(x):
        x = x.reshape(rows, num_splits, *x.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
            batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
            if rows % batch_devices == 0:
                x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, parallel.BATCH_AXES)))
        return x

    return {name: split(x) for name, x in batch.items()}


class Accumulated(NamedTuple):
    """What `accumulate_gradients` returns."""

    grads: Any  # like params, in float32 (or wider): what the optimizer (and a master copy) take
    loss: jax.Array  # sum(weighted_sum) / sum(denominator), scalar
    denominator: jax.Array  # sum(denominator) over the micro-batches, scalar
    metrics: dict[str, jax.Array]  # terms_fn's metrics stacked [num_microbatches, ...]


TermsFn = Callable[[Any, Batch], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


def accumulate_gradients(
    terms_fn: TermsFn,
    denominator_fn: Callable[[Batch], jax.Array],
    params: Any,
    batch: Batch,
    *,
    num_microbatches: int = 1,
    mesh: Mesh | None = None,
) -> Accumulated:
    """Gradient of `sum(weighted_sum) / sum(denominator)` over the batch, one micro-batch at a time.

    `terms_fn(params, microbatch) -> (weighted_sum, denominator, metrics)`; `denominator_fn(microbatch)`
    gives the same denominator from the masks alone (it is needed before the backward pass).
    Gradients are summed, and returned, in float32 (or the parameter's dtype if wider) whatever the
    parameter dtype: with low-precision params they go unrounded to the float32 master copy.
    """
    microbatches = split_batch(batch, num_microbatches, mesh)
    denominator = jnp.sum(jax.vmap(denominator_fn)(microbatches))
    total_denominator = jnp.maximum(denominator, 1.0)  # nothing counted -> zero loss and zero gradient

    def scaled_loss(params, microbatch):
        weighted_sum, _, metrics = terms_fn(params, microbatch)
        return weighted_sum / total_denominator, metrics

    def like_params(tree):
        # Accumulators sharded as the parameters (FSDP shards, not a replica per device).
        if mesh is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, parallel.param_shardings(params, mesh))

    def grad_dtype(p):
        return jnp.promote_types(p.dtype, jnp.float32)

    zeros = like_params(jax.tree.map(lambda p: jnp.zeros(p.shape, grad_dtype(p)), params))

    def step(carry, microbatch):
        grad_sum, loss_sum = carry
        (scaled, metrics), grads = jax.value_and_grad(scaled_loss, has_aux=True)(params, microbatch)
        grad_sum = like_params(jax.tree.map(lambda acc, g: acc + g.astype(acc.dtype), grad_sum, grads))
        return (grad_sum, loss_sum + scaled), metrics

    (grads, loss), metrics = jax.lax.scan(step, (zeros, jnp.zeros((), jnp.float32)), microbatches)
    return Accumulated(grads, loss, denominator, metrics)


def apply_gradients(state: TrainState, grads: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """One optimizer update; `step` counts updates.

    `grads` are cast to the dtype of the weights the optimizer updates. With a master copy that is
    float32: the update is applied to the master, and `params` become the new master cast to their
    dtype. Without one, `params` are updated directly.
    """
    grads = jax.tree.map(lambda g, w: g.astype(w.dtype), grads, state.optimized_params)
    if state.master_params is None:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.master_params)
    master = optax.apply_updates(state.master_params, updates)
    return state.replace(step=state.step + 1, params=compute_params(master, state.params), opt_state=opt_state,
                         master_params=master)
