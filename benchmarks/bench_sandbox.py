"""Tool calls per second: the process sandbox against FTRL's in-process method, side by side.

One call per tool of the FTRL test set (required parameters filled with plausible values; an
output may be an error string, what matters is that the tool's code runs). Three ways:
- in-process, FTRL's own method: per call, a new thread that `exec`s the tool's source and calls
  the function, joined with the timeout;
- `Sandbox.call`, one call at a time (isolated workers, no concurrency);
- `Sandbox.call_many`, the whole pass as one batch over the worker pool.
Each is run for --passes passes over the calls (an RL run calls the same environments many
times); the sandbox's first pass also compiles every tool, later passes hit its cache.

    python -m benchmarks.bench_sandbox [--data=../shared/benchdata/ftrl_test.parquet] [--passes=3]
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from absl import flags

from experiments import cli
from ftrl_jax.envs.samples import example_arguments, read_samples
from ftrl_jax.envs.sandbox import Sandbox, ToolRequest, error_message, format_result, is_error_output

DEFAULT_DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "benchdata",
                                             "ftrl_test.parquet"))


def build_requests(path: str) -> list[ToolRequest]:
    samples, errors = read_samples(path)
    if errors:
        print(f"warning: {len(errors)} rows of {path} skipped", file=sys.stderr)
    return [
        ToolRequest(sample.codes, tool["function"]["name"], example_arguments(tool["function"].get("parameters") or {}))
        for sample in samples
        for tool in sample.tools
    ]


def call_in_process(request: ToolRequest, timeout: float) -> str:
    """FTRL's method: exec the source and call the function in a fresh thread joined with a timeout."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            namespace: dict[str, Any] = {}
            exec(request.codes[request.name], namespace)
            box["output"] = format_result(namespace[request.name](**request.arguments))
        except BaseException as exc:  # the tool's failure is an output, as in FTRL
            box["output"] = error_message(request.name, f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    return box.get("output", error_message(request.name, "timed out"))


def rate(num_calls: int, seconds: float) -> float:
    return num_calls / seconds if seconds > 0 else float("inf")


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("data", DEFAULT_DATA, "FTRL samples whose tools are called (.parquet or .jsonl).",
                        flag_values=fv)
    flags.DEFINE_integer("passes", 3, "Passes over all calls for each method.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("workers", 0, "Sandbox workers (0: one per CPU).", lower_bound=0, flag_values=fv)
    flags.DEFINE_float("timeout", 10.0, "Per-call timeout, seconds.", lower_bound=0.0, flag_values=fv)


def measure(args: flags.FlagValues) -> dict[str, float]:
    """Runs the three methods over the calls of --data and prints the table; returns the rates."""
    requests = build_requests(args.data)
    total = len(requests) * args.passes
    print(f"{len(requests)} tool calls from {args.data}, {args.passes} passes, {os.cpu_count()} CPUs")

    # Tool code may print; keep the benchmark's own output readable.
    with contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        baseline_outputs = [call_in_process(r, args.timeout) for _ in range(args.passes) for r in requests]
        in_process_s = time.perf_counter() - start

    start = time.perf_counter()
    sandbox = Sandbox(num_workers=args.workers or None, timeout=args.timeout)
    sandbox.call_many(requests[: sandbox.num_workers])  # every worker up and ready
    startup_s = time.perf_counter() - start
    with sandbox:
        pass_seconds = []
        for _ in range(args.passes):
            start = time.perf_counter()
            batch_outputs = sandbox.call_many(requests)
            pass_seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(args.passes):
            single_outputs = [sandbox.call(r.codes, r.name, r.arguments) for r in requests]
        single_s = time.perf_counter() - start
        stats = sandbox.stats
        workers = sandbox.num_workers

    warm_s = sum(pass_seconds[1:])
    agree = sum(a == b for a, b in zip(batch_outputs, single_outputs))
    same_as_baseline = sum(a == b for a, b in zip(batch_outputs, baseline_outputs[: len(requests)]))
    in_process = rate(total, in_process_s)
    results = {
        "in_process_calls_per_s": in_process,
        "sandbox_batch_calls_per_s": rate(total, sum(pass_seconds)),
        "sandbox_batch_cold_calls_per_s": rate(len(requests), pass_seconds[0]),
        "sandbox_batch_warm_calls_per_s": rate(len(requests) * (args.passes - 1), warm_s) if warm_s else float("nan"),
        "sandbox_single_calls_per_s": rate(total, single_s),
        "sandbox_startup_s": startup_s,
    }

    def line(label: str, key: str) -> None:
        value = results[key]
        print(f"{label:<46s}: {value:8.1f} calls/s  ({value / in_process:5.2f}x in-process)")

    print(f"{'in-process, FTRL: exec + new thread per call':<46s}: {in_process:8.1f} calls/s")
    line(f"sandbox call_many, {workers} workers, all passes", "sandbox_batch_calls_per_s")
    line("  first pass (each worker compiles the tools)", "sandbox_batch_cold_calls_per_s")
    line("  later passes (compiled code cached)", "sandbox_batch_warm_calls_per_s")
    line("sandbox call, one at a time (warm)", "sandbox_single_calls_per_s")
    print(f"pool start-up (spawn, first call on each worker): {startup_s * 1000:.0f} ms")
    print(f"outputs that are sandbox error messages: {sum(map(is_error_output, batch_outputs))} of {len(requests)}; "
          f"equal to the in-process outputs: {same_as_baseline}; call_many == one-at-a-time: {agree}")
    print("sandbox stats:", json.dumps(stats, sort_keys=True))
    return results


def main(argv: Sequence[str]) -> int:
    try:
        args = cli.parse(argv, define_flags, __doc__)
        if not os.path.exists(args.data):
            raise cli.UsageError(f"--data={args.data!r} does not exist; pass FTRL samples (.parquet or .jsonl)")
    except cli.UsageError as exc:
        return cli.fail(exc)
    measure(args)
    return 0


if __name__ == "__main__":
    cli.run(main)
