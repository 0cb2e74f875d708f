"""Peak memory and wall time of a long prefill, dense vs blockwise attention.

For each preset (default `smol-135m`, random init), sequence length and attention implementation, one child
process builds the model, compiles `models.prefill` for a batch of `--batch` prompts of `--seq_len` tokens
(the second row left-padded by a quarter, as the sampler pads), runs it `--repeats` times and reports its
peak resident memory (VmHWM from /proc/self/status: the whole process, parameters and compiler included)
and its resident memory before compiling (parameters and inputs only). Each implementation runs in its own
process so the peaks are its own. The parent watches each child's RSS and stops it at `--max_rss_gb`
(reported as "failed: out of memory"), so a dense run that would not fit does not take the machine down.

    python -m benchmarks.bench_attention [--presets smol-135m] [--seq_len 8192] [--batch 2]
        [--impls dense blockwise] [--block 512] [--dtype float32] [--repeats 1] [--max_rss_gb 16] [--dense_mask]

`--seq_len` takes several lengths (e.g. `2048 4096 8192`) to show how each grows. `--dense_mask` passes
the [B, T, T] bool mask the sampler builds instead of the [B, T] validity (adds B x T^2 bytes).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time

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


def measure(args: argparse.Namespace, preset: str, seq_len: int, impl: str) -> dict:
    """Runs one measurement in a child process, stopping it if its RSS passes --max_rss_gb."""
    cmd = [sys.executable, "-m", "benchmarks.bench_attention", "--child", "--presets", preset, "--seq_len",
           str(seq_len), "--batch", str(args.batch), "--impls", impl, "--block", str(args.block), "--dtype", args.dtype,
           "--repeats", str(args.repeats)] + (["--dense_mask"] if args.dense_mask else [])
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["smol-135m"])
    parser.add_argument("--seq_len", nargs="+", type=int, default=[8192])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--impls", nargs="+", default=["dense", "blockwise"])
    parser.add_argument("--block", type=int, default=512, help="attention_block_size (queries and keys)")
    parser.add_argument("--dtype", default="float32", help="parameter and compute dtype")
    parser.add_argument("--repeats", type=int, default=1, help="timed prefills after compiling (best is shown)")
    parser.add_argument("--max_rss_gb", type=float, default=16.0, help="stop a child whose RSS passes this")
    parser.add_argument("--dense_mask", action="store_true", help="pass prefill a [B, T, T] mask, as the sampler does")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = run_child(args.presets[0], args.seq_len[0], args.batch, args.impls[0], args.block, args.dtype,
                           args.repeats, args.dense_mask)
        print(json.dumps(result))
        return

    print(f"prefill, batch {args.batch}, {args.dtype}, block {args.block}, "
          f"mask {'[B, T, T]' if args.dense_mask else '[B, T] validity'}, one process per row")
    header = (f"{'preset':<11} {'T':>6} {'impl':<10} {'peak RSS':>9} {'before':>8} {'prefill':>9} {'compile':>8}  "
              "status")
    print(header)
    print("-" * len(header))
    for preset in args.presets:
        for seq_len in args.seq_len:
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


if __name__ == "__main__":
    main()
