"""Training-step throughput and model-FLOP utilisation of the SFT and RL steps.

For each preset (default: `tiny` and `smol-135m`) and each step (`sft`, `rl`), one jitted step
on a batch of 8 x 256 tokens is compiled, run `--warmup` times, then timed over `--steps` runs.

Model FLOPs per step = tokens x (6 x N + 12 x L x T x D): N = `ModelConfig.num_params` (embedding
included: with tied embeddings the output head is the same matrix, and its matmul is real work),
6 = forward + backward matmul FLOPs per parameter and token, 12 L T D = attention scores and
values (forward + backward; the full T x T square, which is what the dense attention computes).
Layer remat recomputes the forward pass, so the hardware does ~8 N per token; MFU counts model
FLOPs only, as is usual. The peak is measured here: the best rate of a jitted `--peak_size`^3 matmul
in each compute dtype. `--dtypes=float32,bfloat16` runs each step with float32 parameters and optimizer
state and that compute dtype (bfloat16 = mixed precision: matmuls in bf16 with f32 accumulation).

    python -m benchmarks.bench_train_step [--presets=tiny,smol-135m] [--dtypes=float32,bfloat16] [--steps=3]
        [--batch=8] [--seq=256] [--noremat]
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import cli

from ftrl_jax import models, parallel
from ftrl_jax.training.optim import make_optimizer
from ftrl_jax.rl.losses import LossConfig
from ftrl_jax.rl.update import make_rl_step
from ftrl_jax.training.sft import make_sft_step
from ftrl_jax.training.train_state import create_train_state, shard_state


def measure_matmul_peak(size: int, repeats: int = 5, dtype: str = "float32") -> float:
    """Best FLOP/s of a jitted [size, size] @ [size, size] in `dtype` (accumulating in float32)."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(size, size)), dtype)
    b = jnp.asarray(rng.normal(size=(size, size)), dtype)
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def model_flops_per_step(config: models.ModelConfig, batch: int, seq: int) -> float:
    per_token = 6 * config.num_params + 12 * config.num_layers * seq * config.hidden_size
    return float(batch * seq * per_token)


def make_batch(config: models.ModelConfig, batch: int, seq: int, kind: str) -> dict[str, jax.Array]:
    """Full-length rows; the first quarter is prompt (not trained on)."""
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, size=(batch, seq)), jnp.int32)
    attention = jnp.ones((batch, seq), jnp.int32)
    loss = attention.at[:, : seq // 4].set(0)
    data = {"tokens": tokens, "attention_mask": attention, "loss_mask": loss}
    if kind == "rl":
        noise = lambda scale: jnp.asarray(rng.normal(scale=scale, size=(batch, seq)), jnp.float32)  # noqa: E731
        data.update(old_logprobs=noise(0.1) - 5.0, ref_logprobs=noise(0.1) - 5.0, advantages=noise(1.0))
    return data


STEP_FACTORIES = {
    "sft": lambda config, optimizer, mesh, args: make_sft_step(
        config, optimizer, mesh, num_microbatches=args.microbatches, chunk_size=args.chunk_size, remat=args.remat),
    "rl": lambda config, optimizer, mesh, args: make_rl_step(
        config, optimizer, mesh, LossConfig(), num_microbatches=args.microbatches, chunk_size=args.chunk_size,
        remat=args.remat),
}


def bench_one(preset: str, kind: str, dtype: str, args: flags.FlagValues, peak: float) -> dict:
    config = models.preset(preset, dtype=dtype)
    devices = jax.devices()
    mesh = parallel.make_mesh(data=len(devices))
    optimizer = make_optimizer(1e-5, weight_decay=0.01)
    params = jax.jit(models.init_params, static_argnums=0)(config, jax.random.PRNGKey(0))
    state = shard_state(create_train_state(params, optimizer), mesh)
    del params
    batch = jax.device_put(make_batch(config, args.batch, args.seq, kind), parallel.batch_sharding(mesh))
    step = STEP_FACTORIES[kind](config, optimizer, mesh, args)

    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_and_first = time.perf_counter() - start
    for _ in range(args.warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_time = float(np.median(times))
    flops = model_flops_per_step(config, args.batch, args.seq)
    return {
        "preset": preset, "step": kind, "dtype": dtype, "params_m": config.num_params / 1e6, "compile_s": compile_and_first,
        "step_s": step_time, "tokens_per_s": args.batch * args.seq / step_time, "model_gflop": flops / 1e9,
        "gflops": flops / step_time / 1e9, "mfu": flops / step_time / peak, "loss": float(metrics["loss"]),
    }


def define_flags(fv: flags.FlagValues) -> None:
    from ftrl_jax.models.config import PRESETS

    flags.DEFINE_list("presets", ["tiny", "smol-135m"], "Model presets, comma-separated.", flag_values=fv)
    cli.allow_only(fv, "presets", tuple(PRESETS))
    flags.DEFINE_list("kinds", list(STEP_FACTORIES), f"Steps to time, from {','.join(STEP_FACTORIES)}.",
                      flag_values=fv)
    cli.allow_only(fv, "kinds", list(STEP_FACTORIES))
    flags.DEFINE_list("dtypes", ["float32"], "Compute dtypes, from float32,bfloat16 (parameters and optimizer state "
                      "stay float32).", flag_values=fv)
    cli.allow_only(fv, "dtypes", ["float32", "bfloat16"])
    flags.DEFINE_integer("batch", 8, "Rows per batch.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("seq", 256, "Tokens per row.", lower_bound=4, flag_values=fv)
    flags.DEFINE_integer("steps", 3, "Timed steps (the median is reported).", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("warmup", 1, "Untimed steps after the compiling one.", lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("microbatches", 1, "Micro-batches per step (gradient accumulation).", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("chunk_size", 128, "Sequence chunk of the log-prob computation.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_alias("chunk-size", "chunk_size", flag_values=fv)
    flags.DEFINE_bool("remat", True, "Rematerialise each layer in the backward pass (--noremat: keep activations).",
                      flag_values=fv)
    flags.DEFINE_integer("peak_size", 2048, "Matrix size of the matmul whose best rate is the peak.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_alias("peak-size", "peak_size", flag_values=fv)


def main(argv: Sequence[str]) -> int:
    try:
        args = cli.parse(argv, define_flags, __doc__)
    except cli.UsageError as exc:
        return cli.fail(exc)
    devices = jax.devices()
    peaks = {dtype: measure_matmul_peak(args.peak_size, dtype=dtype) for dtype in args.dtypes}
    print(f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}); measured matmul peak "
          f"({args.peak_size}^3): " + ", ".join(f"{d} {p / 1e9:.1f} GFLOP/s" for d, p in peaks.items()))
    print(f"batch {args.batch} x {args.seq} tokens, micro-batches {args.microbatches}, chunk {args.chunk_size}, "
          f"remat {args.remat}; median of {args.steps} timed steps after {args.warmup} warm-up\n")
    print("| preset | step | compute dtype | params (M) | compile + 1st step (s) | step (s) | tokens/s "
          "| model GFLOP/step | achieved GFLOP/s | MFU |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    runs = [(preset, kind, dtype) for preset in args.presets for kind in args.kinds for dtype in args.dtypes]
    for preset, kind, dtype in runs:
        r = bench_one(preset, kind, dtype, args, peaks[dtype])
        print(f"| {r['preset']} | {r['step']} | {r['dtype']} | {r['params_m']:.1f} | {r['compile_s']:.1f} "
              f"| {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['model_gflop']:.0f} | {r['gflops']:.1f} "
              f"| {r['mfu']:.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
