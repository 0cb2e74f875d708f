"""Load on the OpenAI-compatible server: requests/s and latency percentiles for N concurrent clients.

The server (FastAPI + uvicorn, batching engine, jit sampler) and the clients (the official `openai` SDK, one
thread each, one shared connection pool) run in this one process on 127.0.0.1. Each client sends
--requests_per_client greedy requests back to back; every other request is streamed (`stream=true`,
`stream_options.include_usage`), so a run mixes both. Before timing, the sampler is compiled for every batch
size a round can produce (powers of two up to the largest client count), and one untimed round at each
concurrency warms the server. Latency is from sending a request to its last byte (for
a stream, `data: [DONE]`); the streamed replies' time to first chunk is reported beside it (the sampler
returns whole turns, so it is close to the full latency). Without --model the policy is a random `tiny`.

    python -m benchmarks.bench_serve_load [--model=DIR] [--clients=1,16,64] [--requests_per_client=4]
        [--max_tokens=16]
"""

from __future__ import annotations

import concurrent.futures
import os
import tempfile
import threading
import time
from collections.abc import Sequence

from absl import flags

from experiments import cli


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("model", "", "Policy directory or training WORKDIR (empty: a random tiny policy).",
                        flag_values=fv)
    flags.DEFINE_integer("num_layers", 0, "Random policy: decoder layers (0: the tiny preset's).", lower_bound=0,
                         flag_values=fv)
    flags.DEFINE_list("clients", ["1", "16", "64"], "Concurrent client counts to measure, comma-separated.",
                      flag_values=fv)
    flags.DEFINE_integer("requests_per_client", 4, "Requests each client sends, one after another.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("max_tokens", 16, "max_tokens of every request.", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("batch_window_ms", 5.0, "Server: a batch closes when no request arrived for this long ...",
                       lower_bound=0.0, flag_values=fv)
    flags.DEFINE_float("max_wait_ms", 50.0, "Server: ... or this long after its first request.", lower_bound=0.0,
                       flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the random policy.", flag_values=fv)


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[position]


MESSAGES = [{"role": "user", "content": "Where was the spouse of Ada Lovelace born? Answer briefly."}]


def _round(client, count: int, requests_per_client: int, max_tokens: int) -> tuple[float, list, list]:
    """One timed round of `count` clients: (seconds, latencies, streamed times to first chunk)."""
    barrier = threading.Barrier(count)
    messages = MESSAGES

    def one_client(number: int) -> tuple[list[float], list[float]]:
        latencies, first_chunks = [], []
        barrier.wait()
        for k in range(requests_per_client):
            started = time.perf_counter()
            fields = dict(model="bench", messages=messages, max_tokens=max_tokens, temperature=0)
            if (number + k) % 2:
                first = None
                for _ in client.chat.completions.create(**fields, stream=True, stream_options={"include_usage": True}):
                    first = first if first is not None else time.perf_counter() - started
                first_chunks.append(first)
            else:
                reply = client.chat.completions.create(**fields)
                if not reply.choices:
                    raise RuntimeError(f"a reply without choices: {reply}")
            latencies.append(time.perf_counter() - started)
        return latencies, first_chunks

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        results = list(pool.map(one_client, range(count)))
    seconds = time.perf_counter() - started
    return seconds, [x for r in results for x in r[0]], [x for r in results for x in r[1]]


def measure(args: flags.FlagValues, counts: list[int]) -> None:
    import jax
    import openai

    from ftrl_jax import serving

    with tempfile.TemporaryDirectory(prefix="bench_serve_load_") as workdir:
        layers = {"num_layers": args.num_layers} if args.num_layers else {}
        model = args.model or serving.save_random_policy(os.path.join(workdir, "policy"), seed=args.seed, **layers)
        service = serving.build_service(model, served_model_name="bench", max_batch_size=max(counts),
                                        batch_window_s=args.batch_window_ms / 1000.0,
                                        max_wait_s=args.max_wait_ms / 1000.0)
        c = service.engine.generator_for(serving.SamplingKey(max_tokens=args.max_tokens)).config  # a ServedPolicy
        print(f"policy: {model if args.model else 'random tiny preset'} ({c.num_layers} layers, hidden "
              f"{c.hidden_size}, vocab {c.vocab_size}) on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; "
              f"greedy, max_tokens={args.max_tokens}, half the requests streamed")
        warm = service.engine.generator_for(serving.SamplingKey(max_tokens=args.max_tokens))
        size = 1
        while size <= max(counts):  # every batch bucket a round can produce, compiled before any timing
            warm([(MESSAGES, [])] * size)
            size *= 2
        with serving.start_server(service) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=600)
            for count in counts:
                _round(client, count, 1, args.max_tokens)  # connections opened, the engine's generator made
                before = service.engine.stats
                seconds, latencies, first_chunks = _round(client, count, args.requests_per_client, args.max_tokens)
                after = service.engine.stats
                calls = after.get("generator_calls", 0) - before.get("generator_calls", 0)
                total = len(latencies)
                print(f"{count:>3} clients: {total:>4} requests in {seconds:6.1f} s = {total / seconds:7.2f} "
                      f"requests/s; "
                      f"latency p50 {_percentile(latencies, 50):6.2f} s, p99 {_percentile(latencies, 99):6.2f} s; "
                      f"streamed first chunk p50 {_percentile(first_chunks, 50):6.2f} s; "
                      f"{total / max(calls, 1):.1f} requests per generate call")


def main(argv: Sequence[str]) -> int:
    try:
        args = cli.parse(argv, define_flags, __doc__)
        try:
            counts = [int(value) for value in args.clients]
        except ValueError:
            raise cli.UsageError(f"--clients must be comma-separated integers, got "
                                 f"{','.join(args.clients)!r}") from None
        if not counts or min(counts) < 1:
            raise cli.UsageError(f"--clients must be counts >= 1, got {counts}")
        if args.model and not os.path.exists(args.model):
            raise cli.UsageError(f"--model={args.model!r} does not exist; pass a policy directory or leave it empty")
    except cli.UsageError as exc:
        return cli.fail(exc)
    measure(args, counts)
    return 0


if __name__ == "__main__":
    cli.run(main)
