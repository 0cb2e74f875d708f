"""Evaluation and serving throughput of a policy on the jit sampler.

1. In-process evaluation (what `python -m experiments.evaluate --model=...` does): episodes per minute on
   a slice of FTRL's test set and of ToolHop (three scenarios per question), greedy, played in batches.
   Each slice is played twice; the first pass includes compiling the sampler's shapes, the second is the
   steady state.
2. The OpenAI-compatible server (`python -m experiments.serve`): chat-completion requests per second with
   1, 8 and 32 concurrent clients, each sending requests one after another over HTTP on localhost (our
   stdlib client, one connection per request). Every client asks the same greedy question, with a
   tool list, so batches differ only in size; the sampler's batch shapes are compiled before timing.

Without --model the policy is the `tiny` preset, randomly initialised, with the embedded tokenizer (a
random policy rarely calls tools and writes until max_new_tokens, so turns are as long as allowed).

    python -m benchmarks.bench_eval_serve [--model=DIR] [--ftrl_per_type=5] [--toolhop_rows=4]
        [--max_new_tokens=64] [--clients=1,8,32] [--requests_per_client=8]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import tempfile
import time

DEFAULT_FTRL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "benchdata", "ftrl_test.parquet")
DEFAULT_TOOLHOP = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "benchdata", "toolhop_100.jsonl")


def _random_policy_dir(directory: str, num_layers: int | None) -> str:
    import jax

    from ftrl_jax import models
    from ftrl_jax.tokenizer import default_tokenizer

    tokenizer = default_tokenizer()
    overrides = {"vocab_size": len(tokenizer)}
    if num_layers:
        overrides["num_layers"] = num_layers
    config = models.preset("tiny", **overrides)
    models.save_pretrained(config, models.init_params(config, jax.random.PRNGKey(0)), directory)
    tokenizer.save_pretrained(directory)
    return directory


def bench_evaluation(policy, path: str, label: str, *, per_source: int | None, rows: int | None, batch_size: int,
                     max_new_tokens: int, max_turns: int, workdir: str) -> None:
    from experiments import evaluate
    from ftrl_jax.envs.sandbox import Sandbox
    from ftrl_jax.rollout import LocalPolicy

    if not os.path.exists(path):
        print(f"{label}: {path} is absent, skipped")
        return
    kind, tasks, _ = evaluate.load_tasks(path, limit=rows, limit_per_source=per_source)
    generator = LocalPolicy(policy.config, policy.params, policy.tokenizer, template=policy.template,
                            max_new_tokens=max_new_tokens, temperature=0.0)
    with Sandbox(timeout=10.0) as sandbox:
        play = evaluate.play_in_batches(generator, batch_size=batch_size, max_turns=max_turns, sandbox=sandbox)
        for attempt in ("first pass (compiles)", "second pass"):
            records: dict = {}
            output = os.path.join(workdir, f"{label}-{len(attempt)}.jsonl")
            run = evaluate.evaluate_tasks(tasks, play, output=output, kind=kind, run_id="bench", records=records,
                                          progress=False)
            too_long = sum(r.get("end_reason") == "prompt_too_long" for r in records.values())
            print(f"{label:<8} {attempt:<22} {run['episodes']:>4} episodes ({too_long} prompt_too_long, "
                  f"{run['turns']} turns) in {run['seconds']:7.1f} s = {run['episodes_per_minute']:8.1f} episodes/min")


def bench_server(policy, *, clients: list[int], requests_per_client: int, max_tokens: int, batch_window_ms: float
                 ) -> None:
    from ftrl_jax import serving
    from ftrl_jax.openai_backend import OpenAIChatGenerator
    from ftrl_jax.serving import SamplingKey

    tools = [{"type": "function", "function": {
        "name": name, "description": f"Looks up the {name.replace('_', ' ')} of a person.",
        "parameters": {"type": "object", "properties": {"person": {"type": "string"}}, "required": ["person"]}}}
        for name in ("birth_place", "employer", "spouse")]
    messages = [{"role": "user", "content": "Where was the spouse of Ada Lovelace born? Use the tools."}]

    factory = serving.local_policy_factory(policy.config, policy.params, policy.tokenizer, template=policy.template)
    engine = serving.BatchingEngine(factory, max_batch_size=max(clients), batch_window_s=batch_window_ms / 1000.0)
    limits = serving.ServerLimits("bench", policy.config.max_position_embeddings, template=policy.template)
    server = serving.make_server(serving.PolicyService(engine, limits), "127.0.0.1", 0)
    serving.start_in_thread(server)
    try:
        # Compile every batch shape the clients can produce (powers of two up to the largest client count).
        warm = factory(SamplingKey(max_tokens=max_tokens))
        size = 1
        while size <= max(clients):
            warm([(messages, tools)] * size)
            size *= 2
        for count in clients:
            before = engine.stats
            client = OpenAIChatGenerator(server.base_url, "bench", max_new_tokens=max_tokens, concurrency=count,
                                         max_retries=0)

            def one_client(_: int) -> int:
                for _ in range(requests_per_client):
                    client.complete(messages, tools)
                return requests_per_client

            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(count) as pool:
                total = sum(pool.map(one_client, range(count)))
            seconds = time.perf_counter() - started
            after = engine.stats
            calls = after.get("generator_calls", 0) - before.get("generator_calls", 0)
            print(f"server   {count:>2} concurrent clients: {total:>4} requests in {seconds:6.1f} s = "
                  f"{total / seconds:7.2f} requests/s ({total / max(calls, 1):.1f} requests per generate call, "
                  f"max_tokens={max_tokens})")
    finally:
        server.shutdown()
        server.server_close()
        engine.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="policy directory or WORKDIR (default: a random tiny policy)")
    parser.add_argument("--num_layers", type=int, default=None, help="random policy: layers (default: the preset's)")
    parser.add_argument("--ftrl", default=DEFAULT_FTRL)
    parser.add_argument("--toolhop", default=DEFAULT_TOOLHOP)
    parser.add_argument("--ftrl_per_type", type=int, default=5, help="FTRL test rows per scenario type")
    parser.add_argument("--toolhop_rows", type=int, default=4, help="ToolHop questions (x3 scenarios)")
    parser.add_argument("--batch_size", type=int, default=4, help="episodes per in-process batch")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--max_turns", type=int, default=20)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests_per_client", type=int, default=8)
    parser.add_argument("--batch_window_ms", type=float, default=5.0)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: ftrl, toolhop, server")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    import jax

    from ftrl_jax import serving

    with tempfile.TemporaryDirectory(prefix="bench_eval_serve_") as workdir:
        model = args.model or _random_policy_dir(os.path.join(workdir, "policy"), args.num_layers)
        policy = serving.load_policy(model)
        c = policy.config
        print(f"policy: {'random tiny preset' if not args.model else model} ({c.num_layers} layers, hidden "
              f"{c.hidden_size}, vocab {c.vocab_size}, context {c.max_position_embeddings}, {policy.template} "
              f"template) on {jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} CPUs")
        print(f"greedy, max_new_tokens={args.max_new_tokens}, in-process batch_size={args.batch_size}")
        if "ftrl" not in skip:
            bench_evaluation(policy, args.ftrl, "FTRL", per_source=args.ftrl_per_type, rows=None,
                             batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                             max_turns=args.max_turns, workdir=workdir)
        if "toolhop" not in skip:
            bench_evaluation(policy, args.toolhop, "ToolHop", per_source=None, rows=args.toolhop_rows,
                             batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                             max_turns=args.max_turns, workdir=workdir)
        if "server" not in skip:
            bench_server(policy, clients=[int(c) for c in args.clients.split(",")],
                         requests_per_client=args.requests_per_client, max_tokens=args.max_new_tokens,
                         batch_window_ms=args.batch_window_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
