"""A projection's forward and backward pass, rows as [B, T, D] against rows flattened to [N, D].

The model's projections (`models.transformer._dot_accumulate_f32`, every q/k/v/o and MLP kernel) flatten their
rows into one [N, D] x [D, F] matmul. Left as [B, T, D], the kernel's gradient contracts over two axes, which
XLA:CPU runs through transposing copies of the [B, T, F] gradient. This times both forms side by side in one
process on the shapes of the default RL step (the `tiny` model's MLP and attention widths; 16 prompts of 512
tokens, or 16 x 8 responses of 64 or 96), each the loss `sum(y ** 2)` through one projection, its value and gradient
with respect to rows and kernel, in each compute dtype of `--dtypes` (float32 by default; bfloat16: inputs and
kernel in bf16, float32 accumulation), and checks that they agree. The two forms' calls alternate, so a change
in load hits both.

    python -m benchmarks.bench_projection_grad [--repeats=7] [--dtypes=float32,bfloat16]
        [--shapes=16x512x256x640,128x96x256x640,...]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import cli
from ftrl_jax.models.transformer import _dot_accumulate_f32

DEFAULT_SHAPES = "16x512x256x640,16x512x640x256,128x64x256x640,128x96x256x640,16x512x256x256"
DTYPES = ("float32", "bfloat16")
CONTRACT_LAST = (((2,), (0,)), ((), ()))


def rows_3d(x: jax.Array, w: jax.Array) -> jax.Array:
    """The baseline: one dot_general over [B, T, D] rows, float32 accumulation, the input dtype returned."""
    return jax.lax.dot_general(x, w, CONTRACT_LAST, preferred_element_type=jnp.float32).astype(jnp.result_type(x, w))


def rows_flat(x: jax.Array, w: jax.Array) -> jax.Array:
    """The model's projection (flattens [B, T, D] to [N, D] inside)."""
    return _dot_accumulate_f32(x, w, CONTRACT_LAST)


def value_and_grads(projection):
    return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(projection(x, w) ** 2), argnums=(0, 1)))


def seconds(fn, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def median_seconds_interleaved(fns, args, repeats: int) -> list[float]:
    """The median time of each of `fns` over `repeats` rounds, after a compiling call each; each round calls
    them all, in alternating order."""
    for fn in fns:
        jax.block_until_ready(fn(*args))
    times = [[] for _ in fns]
    for r in range(repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            times[i].append(seconds(fns[i], args))
    return [statistics.median(t) for t in times]


def define_flags(flag_values: flags.FlagValues) -> None:
    flags.DEFINE_integer("repeats", 7, "Timed calls per form (the median is reported).", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_string("shapes", DEFAULT_SHAPES, "Comma-separated BxTxDxF: rows B x T of width D projected to F.",
                        flag_values=flag_values)
    flags.DEFINE_list("dtypes", ["float32"], f"Compute dtypes, of {', '.join(DTYPES)}.", flag_values=flag_values)


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    """"BxTxDxF,..." -> [(B, T, D, F), ...]; anything else is a UsageError naming the bad entry."""
    shapes = []
    for spec in text.split(","):
        parts = spec.strip().lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise cli.UsageError(f"--shapes entry {spec!r}: expected BxTxDxF, four positive integers "
                                 "(e.g. 16x512x256x640)")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def main(argv: Sequence[str]) -> int:
    try:
        args = cli.parse(argv, define_flags, __doc__)
        shapes = parse_shapes(args.shapes)
        unknown = [d for d in args.dtypes if d not in DTYPES]
        if unknown or not args.dtypes:
            raise cli.UsageError(f"--dtypes={','.join(args.dtypes)}: expected some of {', '.join(DTYPES)}")
    except cli.UsageError as exc:
        return cli.fail(exc)
    rng = np.random.default_rng(0)
    baseline, flat = value_and_grads(rows_3d), value_and_grads(rows_flat)
    print(f"{jax.device_count()} {jax.devices()[0].platform} device(s); median of {args.repeats} calls, value and "
          "gradient (rows and kernel) of sum(y ** 2), the forms alternating")
    print("| dtype | B x T x D -> F | [B, T, D] rows (ms) | [N, D] rows (ms) | speed-up |")
    print("|---|---|---:|---:|---:|")
    for dtype in args.dtypes:
        tol = 1e-3 if dtype == "float32" else 5e-2
        for b, t, d, f in shapes:
            x = jnp.asarray(rng.normal(size=(b, t, d)), dtype)
            w = jnp.asarray(rng.normal(size=(d, f)) / np.sqrt(d), dtype)
            (v0, grads0), (v1, grads1) = baseline(x, w), flat(x, w)
            np.testing.assert_allclose(float(v1), float(v0), rtol=tol)
            for got, want in zip(grads1, grads0):
                want = np.asarray(want, np.float32)
                np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol,
                                           atol=tol * float(np.max(np.abs(want))))
            slow, fast = median_seconds_interleaved((baseline, flat), (x, w), args.repeats)
            print(f"| {dtype} | {b} x {t} x {d} -> {f} | {1e3 * slow:.1f} | {1e3 * fast:.1f} | {slow / fast:.2f}x |",
                  flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
