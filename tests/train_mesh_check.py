"""Run as a script with 8 simulated CPU devices: sharded training steps equal the single-device ones.

    python tests/train_mesh_check.py [sft] [rl] [rl_shared_prompt] [checkpoint]

For each named step (all checks by default): the same fixed batch and starting state go through
the step on a (data=1, fsdp=1, tensor=1) mesh of one device and on a (data=2, fsdp=2, tensor=2)
mesh of eight; parameters, optimizer moments and metrics must agree to ~1e-5 (float32), and the
sharded state must come back laid out by `state_shardings` with the input donated. `checkpoint`
saves a sharded state and restores it onto the eight-device layout and onto one device. Layer remat
is off here (it changes memory, not values, and is exercised by the single-device tests) because
it roughly doubles the compile time.
"""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from ftrl_jax import models, parallel  # noqa: E402
from ftrl_jax.training.checkpointing import Checkpointer  # noqa: E402
from ftrl_jax.training.optim import make_optimizer  # noqa: E402
from ftrl_jax.rl.losses import LossConfig  # noqa: E402
from ftrl_jax.rl.update import make_logprob_fn, make_rl_step, make_shared_prompt_logprob_fn  # noqa: E402
from ftrl_jax.training.sft import make_sft_step  # noqa: E402
from ftrl_jax.training.train_state import create_train_state, shard_state, state_shardings  # noqa: E402

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
CONFIG = models.preset("tiny", vocab_size=256, num_layers=2)
BATCH, TIME = 16, 32
TOLERANCE = 1e-5
# Small learning rate: Adam divides by sqrt(v) + eps, so summation-order noise in near-zero
# gradients is magnified by lr / eps; the parity check is about the gradients, not the step size.
OPTIMIZER = make_optimizer(1e-4, weight_decay=0.1, warmup_steps=1, schedule="cosine", total_steps=10)


def _meshes():
    return {"one": parallel.make_mesh(devices=jax.devices()[:1]), "eight": parallel.make_mesh(data=2, fsdp=2, tensor=2)}


def _sequences(rng):
    tokens = rng.integers(0, CONFIG.vocab_size, size=(BATCH, TIME))
    lengths = rng.integers(TIME // 2, TIME + 1, size=BATCH)
    attention = (np.arange(TIME)[None] < lengths[:, None]).astype(np.int32)
    prompt = rng.integers(3, 8, size=BATCH)
    loss = attention * (np.arange(TIME)[None] >= prompt[:, None])
    return jnp.asarray(np.where(attention > 0, tokens, 0), jnp.int32), jnp.asarray(attention), jnp.asarray(loss)


def _close(name, got, want):
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        error = float(np.max(np.abs(a - b))) if a.size else 0.0
        assert error <= TOLERANCE, f"{name}{jax.tree_util.keystr(path)}: max |difference| {error:.3g} > {TOLERANCE}"


def _check_layout(state, mesh):
    gate = ("layers", "mlp", "gate_proj", "kernel")
    kernel = state.params
    for key in gate:
        kernel = kernel[key]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor"), kernel.sharding
    assert len(kernel.sharding.device_set) == 8
    # Adam's moments follow their parameter's layout; its step count is replicated.
    adam = state.opt_state[1][0]
    moment = adam.mu
    for key in gate:
        moment = moment[key]
    assert moment.sharding.spec == kernel.sharding.spec, moment.sharding
    assert adam.count.sharding.spec == P(), adam.count.sharding
    assert state.step.sharding.spec == P()


def _run_both(make_step, params, batch):
    """(single-device result, eight-device result) of one step from the same start."""
    results = {}
    for name, mesh in _meshes().items():
        state = shard_state(create_train_state(jax.tree.map(jnp.copy, params), OPTIMIZER), mesh)
        leaf = jax.tree.leaves(state.params)[0]
        new_state, metrics = make_step(mesh)(state, jax.device_put(batch, parallel.batch_sharding(mesh)))
        assert leaf.is_deleted(), f"{name}: the input state was not donated"
        results[name] = (new_state, metrics)
    _check_layout(results["eight"][0], _meshes()["eight"])
    return results["one"], results["eight"]


def check_sft(params, rng):
    tokens, attention, loss = _sequences(rng)
    batch = {"tokens": tokens, "attention_mask": attention, "loss_mask": loss}
    (one, one_metrics), (eight, eight_metrics) = _run_both(
        lambda mesh: make_sft_step(CONFIG, OPTIMIZER, mesh, num_microbatches=2, chunk_size=8, remat=False,
                                   compiler_options=FAST_COMPILE),
        params, batch)
    _close("sft params", eight.params, one.params)
    _close("sft opt_state", eight.opt_state, one.opt_state)
    _close("sft metrics", eight_metrics, one_metrics)
    assert int(eight.step) == 1


def check_rl(params, rng):
    tokens, attention, loss = _sequences(rng)
    meshes = _meshes()
    logprobs = {}
    for name, mesh in meshes.items():
        logprob_fn = make_logprob_fn(CONFIG, mesh, chunk_size=8, compiler_options=FAST_COMPILE)
        rows = parallel.batch_sharding(mesh)
        logprobs[name] = logprob_fn(parallel.shard_params(params, mesh), *jax.device_put((tokens, attention), rows))
    _close("logprobs", logprobs["eight"], logprobs["one"])
    old = logprobs["one"]
    batch = {
        "tokens": tokens, "attention_mask": attention, "loss_mask": loss,
        # Off-policy by a little, so the ratio clipping and both KL terms are exercised.
        "old_logprobs": old + jnp.asarray(rng.normal(scale=0.3, size=old.shape), jnp.float32),
        "ref_logprobs": old + jnp.asarray(rng.normal(scale=0.1, size=old.shape), jnp.float32),
        "advantages": jnp.asarray(rng.normal(size=old.shape), jnp.float32),
    }
    loss_cfg = LossConfig(kl_coef=0.05, entropy_coef=0.01, aggregation="seq-mean-token-mean")
    (one, one_metrics), (eight, eight_metrics) = _run_both(
        lambda mesh: make_rl_step(CONFIG, OPTIMIZER, mesh, loss_cfg, num_minibatches=2, num_microbatches=2,
                                  chunk_size=8, remat=False, compiler_options=FAST_COMPILE),
        params, batch)
    assert float(one_metrics["clip_fraction"]) > 0, one_metrics
    _close("rl params", eight.params, one.params)
    _close("rl opt_state", eight.opt_state, one.opt_state)
    _close("rl metrics", eight_metrics, one_metrics)
    assert int(eight.step) == 2


def check_rl_shared_prompt(params, rng):
    """The shared-prompt layout: 8 prompts x 2 responses, groups split over the batch axes."""
    groups, n, prompt_len, response_len = 8, 2, 16, 8
    prompt_lengths = rng.integers(4, prompt_len + 1, size=groups)
    prompt_mask = (np.arange(prompt_len)[None] >= prompt_len - prompt_lengths[:, None]).astype(np.int32)
    response_mask = (np.arange(response_len)[None, None] < rng.integers(1, response_len + 1, size=(groups, n, 1)))
    batch = {
        "prompt_tokens": jnp.asarray(rng.integers(0, CONFIG.vocab_size, size=(groups, prompt_len)) * prompt_mask),
        "prompt_mask": jnp.asarray(prompt_mask),
        "response_tokens": jnp.asarray(rng.integers(0, CONFIG.vocab_size, size=(groups, n, response_len))
                                       * response_mask, jnp.int32),
        "response_mask": jnp.asarray(response_mask.astype(np.int32)),
    }
    keys = ("prompt_tokens", "prompt_mask", "response_tokens", "response_mask")
    logprobs = {}
    for name, mesh in _meshes().items():
        logprob_fn = make_shared_prompt_logprob_fn(CONFIG, mesh, chunk_size=8, compiler_options=FAST_COMPILE)
        logprobs[name] = logprob_fn(parallel.shard_params(params, mesh),
                                    *jax.device_put(tuple(batch[k] for k in keys), parallel.batch_sharding(mesh)))
    _close("shared-prompt logprobs", logprobs["eight"], logprobs["one"])
    old = logprobs["one"]
    mask = batch["response_mask"].astype(jnp.float32)
    batch.update(old_logprobs=old + jnp.asarray(rng.normal(scale=0.3, size=old.shape), jnp.float32) * mask,
                 ref_logprobs=old + jnp.asarray(rng.normal(scale=0.1, size=old.shape), jnp.float32) * mask,
                 advantages=jnp.asarray(rng.normal(size=old.shape), jnp.float32) * mask)
    loss_cfg = LossConfig(kl_coef=0.05, entropy_coef=0.01, aggregation="seq-mean-token-mean")
    (one, one_metrics), (eight, eight_metrics) = _run_both(
        lambda mesh: make_rl_step(CONFIG, OPTIMIZER, mesh, loss_cfg, num_minibatches=2, chunk_size=8, remat=False,
                                  compiler_options=FAST_COMPILE),
        params, batch)
    assert float(one_metrics["clip_fraction"]) > 0, one_metrics
    _close("shared-prompt rl params", eight.params, one.params)
    _close("shared-prompt rl metrics", eight_metrics, one_metrics)


def check_checkpoint(params, rng):
    meshes = _meshes()
    start = create_train_state(params, OPTIMIZER)
    # Distinct values in every leaf, moments included.
    state = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape), x.dtype), start)
    saved = shard_state(state, meshes["eight"])
    with tempfile.TemporaryDirectory() as directory, Checkpointer(directory) as checkpointer:
        checkpointer.save(7, saved, {"data_position": 96})
        checkpointer.wait()
        for name, mesh in meshes.items():
            target = jax.eval_shape(lambda: start)
            shardings = state_shardings(target, mesh)
            target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings)
            restored, extra = checkpointer.restore(target_state=target)
            assert extra == {"data_position": 96}, extra
            for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True):
                assert leaf.sharding == sharding, (name, leaf.sharding, sharding)
            _close(f"checkpoint restored onto {name}", restored, state)
            if name == "eight":
                _check_layout(restored, mesh)


CHECKS = {"sft": check_sft, "rl": check_rl, "rl_shared_prompt": check_rl_shared_prompt,
          "checkpoint": check_checkpoint}


def main(names) -> int:
    assert jax.device_count() == 8, jax.devices()
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        print(f"unknown check(s) {unknown}; available: {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    params = models.init_params(CONFIG, jax.random.PRNGKey(0))
    for name in names:
        CHECKS[name](params, np.random.default_rng(0))
        print(f"TRAIN_MESH_OK {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(CHECKS)))
