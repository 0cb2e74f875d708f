"""Peak memory and wall time of a long prefill, dense vs blockwise attention.

For each preset (default `smol-135m`, random init), sequence length and attention implementation, one child
process builds the model, compiles `models.prefill` for a batch of `--batch` prompts of `--seq_len` tokens
(the second row left-padded by a quarter, as the sampler pads), runs it `--repeats` times and reports its
peak resident memory (VmHWM from /proc/self/status: the whole process, parameters and compiler included)
and its resident memory before compiling (parameters and inputs only). Each implementation runs in its own
process so the peaks are its own. The parent watches each child's RSS and stops it at `--max_rss_gb`
(reported as "failed: out of memory"), so a dense run that would not fit does not take the machine down.

    python -m benchmarks.bench_attention [--presets=smol-135m] [--seq_len=8192] [--batch=2]
        [--impls=dense,blockwise] [--block=512] [--dtype=float32] [--repeats=1] [--max_rss_gb=16] [--dense_mask]

`--seq_len` takes several lengths (e.g. `2048,4096,8192`) to show how each grows. `--dense_mask` passes
the [B, T, T] bool mask the sampler builds instead of the [B, T] validity (adds B x T^2 bytes).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from absl import flags

from experiments import cli

GB = 1024 ** 3


def _status_kb(field: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def run_child(preset: str, seq_len: int, batch: int, impl: str, block: int, dtype: str, repeats: int,
              dense_mask: bool) -> dict:
    """One prefill measurement in this process; returns the numbers as a dict."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ftrl_jax import models
    from ftrl_jax.models import transformer

    config = models.preset(preset, attention_impl=impl, attention_block_size=block, param_dtype=dtype, dtype=dtype)
    params = models.init_params(config, jax.random.PRNGKey(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, size=(batch, seq_len)), jnp.int32)
    valid = np.ones((batch, seq_len), bool)
    valid[1:, : seq_len // 4] = False  # left padding, as the sampler's
    valid = jnp.asarray(valid)
    positions = transformer.positions_from_mask(valid)
    mask = transformer.causal_mask(valid) if dense_mask else valid
    jax.block_until_ready((params, ids, positions, mask))
    rss_before = _status_kb("VmRSS") * 1024

    start = time.perf_counter()
    compiled = jax.jit(models.prefill, static_argnums=0).lower(config, params, ids, positions, mask).compile()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        hidden, cache = compiled(params, ids, positions, mask)
        jax.block_until_ready((hidden, cache))
        times.append(time.perf_counter() - start)
        finite = bool(jnp.all(jnp.isfinite(hidden[:, -1])))
        del hidden, cache
    return {"rss_before": rss_before, "peak_rss": _status_kb("VmHWM") * 1024, "compile_s": compile_s,
            "prefill_s": min(times), "finite": finite}


def measure(args: flags.FlagValues, preset: str, seq_len: int, impl: str) -> dict:
    """Runs one measurement in a child process, stopping it if its RSS passes --max_rss_gb."""
    cmd = [sys.executable, "-m", "benchmarks.bench_attention", "--child", f"--presets={preset}", f"--seq_len={seq_len}",
           f"--batch={args.batch}", f"--impls={impl}", f"--block={args.block}", f"--dtype={args.dtype}",
           f"--repeats={args.repeats}", f"--{'' if args.dense_mask else 'no'}dense_mask"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_seen, killed = 0, False
    while proc.poll() is None:
        try:
            rss = _status_kb("VmRSS", proc.pid) * 1024
        except (FileNotFoundError, ProcessLookupError):
            break
        peak_seen = max(peak_seen, rss)
        if rss > args.max_rss_gb * GB:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    if killed or proc.returncode == -signal.SIGKILL:
        return {"status": f"failed: out of memory (RSS passed {peak_seen / GB:.1f} GB; stopped)", "peak_rss": peak_seen}
    if proc.returncode != 0:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        reason = "out of memory" if any("RESOURCE_EXHAUSTED" in line or "MemoryError" in line for line in lines) \
            else (lines[-1][:120] if lines else f"exit {proc.returncode}")
        return {"status": f"failed: {reason}", "peak_rss": peak_seen}
    result = json.loads(out.strip().splitlines()[-1])
    result["status"] = "ok" if result.pop("finite") else "ok (non-finite output!)"
    return result


def define_flags(fv: flags.FlagValues) -> None:
    from ftrl_jax.models.attention import IMPLEMENTATIONS
    from ftrl_jax.models.config import PRESETS

    flags.DEFINE_list("presets", ["smol-135m"], "Model presets (random init), comma-separated.", flag_values=fv)
    cli.allow_only(fv, "presets", tuple(PRESETS))
    flags.DEFINE_list("seq_len", ["8192"], "Prompt lengths in tokens, comma-separated.", flag_values=fv)
    flags.register_validator("seq_len", lambda values: all(v.isdigit() and int(v) > 0 for v in values),
                             "--seq_len takes positive integers, e.g. --seq_len=2048,4096,8192", flag_values=fv)
    flags.DEFINE_integer("batch", 2, "Prompts per prefill.", lower_bound=1, flag_values=fv)
    flags.DEFINE_list("impls", ["dense", "blockwise"], "Attention implementations, comma-separated.", flag_values=fv)
    cli.allow_only(fv, "impls", tuple(IMPLEMENTATIONS))
    flags.DEFINE_integer("block", 512, "attention_block_size (queries and keys).", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("dtype", "float32", "Parameter and compute dtype.", flag_values=fv)
    flags.DEFINE_integer("repeats", 1, "Timed prefills after compiling (the best is shown).", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_float("max_rss_gb", 16.0, "Stop a child whose RSS passes this many GB.", lower_bound=0.01,
                       flag_values=fv)
    flags.DEFINE_bool("dense_mask", False, "Pass prefill a [B, T, T] mask, as the sampler does.", flag_values=fv)
    flags.DEFINE_bool("child", False, "Internal: run one measurement (the first preset, length and impl) in this "
                      "process and print it as JSON.", flag_values=fv)


def main(argv: Sequence[str]) -> int:
    try:
        args = cli.parse(argv, define_flags, __doc__)
    except cli.UsageError as exc:
        return cli.fail(exc)
    seq_lens = [int(v) for v in args.seq_len]

    if args.child:
        result = run_child(args.presets[0], seq_lens[0], args.batch, args.impls[0], args.block, args.dtype,
                           args.repeats, args.dense_mask)
        print(json.dumps(result))
        return 0

    print(f"prefill, batch {args.batch}, {args.dtype}, block {args.block}, "
          f"mask {'[B, T, T]' if args.dense_mask else '[B, T] validity'}, one process per row")
    header = (f"{'preset':<11} {'T':>6} {'impl':<10} {'peak RSS':>9} {'before':>8} {'prefill':>9} {'compile':>8}  "
              "status")
    print(header)
    print("-" * len(header))
    for preset in args.presets:
        for seq_len in seq_lens:
            results = {}
            for impl in args.impls:
                r = results[impl] = measure(args, preset, seq_len, impl)
                if r["status"].startswith("ok"):
                    print(f"{preset:<11} {seq_len:>6} {impl:<10} {r['peak_rss'] / GB:>7.2f}GB "
                          f"{r['rss_before'] / GB:>6.2f}GB {r['prefill_s']:>8.1f}s {r['compile_s']:>7.1f}s  "
                          f"{r['status']}",
                          flush=True)
                else:
                    print(f"{preset:<11} {seq_len:>6} {impl:<10} {'-':>9} {'-':>8} {'-':>9} {'-':>8}  {r['status']}",
                          flush=True)
            ok = {impl: r for impl, r in results.items() if r["status"].startswith("ok")}
            if "dense" in ok and "blockwise" in ok:
                d, b = ok["dense"], ok["blockwise"]
                print(f"{'':<11} {'':>6} {'ratio':<10} {d['peak_rss'] / b['peak_rss']:>8.2f}x {'':>8} "
                      f"{d['prefill_s'] / b['prefill_s']:>8.2f}x {'':>8}  dense / blockwise "
                      f"(above the pre-compile RSS: {(d['peak_rss'] - d['rss_before']) / GB:.2f} vs "
                      f"{(b['peak_rss'] - b['rss_before']) / GB:.2f} GB)", flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
