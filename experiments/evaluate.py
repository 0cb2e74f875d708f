"""Evaluates a policy on FTRL's test set (or any sample-format file) and on ToolHop, as in the paper's tables.

    python -m experiments.evaluate --data=../shared/benchdata/ftrl_test.parquet --model=runs/tiny \\
        --output=runs/eval/ftrl_after.jsonl
    python -m experiments.evaluate --data=../shared/benchdata/toolhop_100.jsonl --backend=openai \\
        --base_url=http://127.0.0.1:8000/v1 --model_name=Qwen2.5-7B-Instruct --output=runs/eval/toolhop.jsonl

The policy is a Hugging Face directory or a training WORKDIR (its export/ is used) run in-process on the
jit sampler (`--model`), or any OpenAI-compatible chat-completions server (`--backend=openai`: vLLM, a
hosted model, or `python -m experiments.serve`). Episodes are greedy and multi-turn (`--max_turns`).
Scoring, resume and summaries: `ftrl_jax.rollout.harness`. Run the same command again to resume.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.rollout.episodes import TurnGenerator
from ftrl_jax.rollout.harness import (DATA_KINDS, TOOLHOP_SCENARIOS, Player, UsageError, load_tasks, open_run,
                                      play_concurrently, play_in_batches, run_evaluation, run_settings)
from ftrl_jax.serving.client import OpenAIChatGenerator


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="sample-format .jsonl/.parquet, or a ToolHop .jsonl")
    parser.add_argument("--data_format", default="auto", choices=("auto", *DATA_KINDS),
                        help="how to read --data (auto: ToolHop rows are recognised by their fields)")
    parser.add_argument("--scenarios", default=",".join(TOOLHOP_SCENARIOS),
                        help="ToolHop scenarios to play, comma-separated")
    parser.add_argument("--output", required=True, help="episode lines (.jsonl); summaries are written next to it")
    parser.add_argument("--overwrite", action="store_true", help="start again instead of resuming --output")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows of --data")
    parser.add_argument("--limit_per_source", type=int, default=None,
                        help="evaluate only the first N rows of each data_source (before --limit)")
    parser.add_argument("--backend", default="local", choices=("local", "openai"),
                        help="local: --model in-process on the jit sampler; openai: a chat-completions server")
    parser.add_argument("--model", default="", help="local: Hugging Face policy directory, or a training WORKDIR")
    parser.add_argument("--tokenizer", default="", help="local: tokenizer directory (default: the policy's)")
    parser.add_argument("--dtype", default="float32", help="local: parameter dtype (float32, bfloat16)")
    parser.add_argument("--tensor_parallel", type=int, default=1, help="local: devices to shard the weights over")
    parser.add_argument("--template", default=None, choices=("qwen2.5", "qwen3"),
                        help="local: chat template (default: from the model type)")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="local: episodes played as one batch (prefill memory grows with batch x prompt^2)")
    parser.add_argument("--max_prompt_tokens", type=int, default=None,
                        help="local: prompt budget (default: the context minus --max_new_tokens)")
    parser.add_argument("--base_url", default="", help="openai: API root, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model_name", default="", help="openai: the served model's name")
    parser.add_argument("--api_key", default=os.environ.get("OPENAI_API_KEY", ""),
                        help="openai: bearer token (default: $OPENAI_API_KEY)")
    parser.add_argument("--concurrency", type=int, default=16, help="openai: episodes in flight at once")
    parser.add_argument("--timeout", type=float, default=300.0, help="openai: seconds per request")
    parser.add_argument("--max_retries", type=int, default=4, help="openai: retries of a failing request")
    parser.add_argument("--extra_body", default="", help="openai: JSON object merged into every request")
    parser.add_argument("--max_turns", type=int, default=20, help="assistant turns per episode")
    parser.add_argument("--max_new_tokens", type=int, default=512, help="new tokens per assistant turn")
    parser.add_argument("--enable_thinking", action=argparse.BooleanOptionalAction, default=None,
                        help="Qwen3 reasoning mode (openai: sent as chat_template_kwargs only when given)")
    parser.add_argument("--sandbox_workers", type=int, default=None, help="tool worker processes (default: CPUs)")
    parser.add_argument("--tool_timeout", type=float, default=10.0, help="seconds per tool call")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser


def _settings(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    policy = args.model if args.backend == "local" else f"{args.base_url.rstrip('/')} {args.model_name}"
    return run_settings(kind, args.data, backend=args.backend, policy=policy,
                        template=args.template if args.backend == "local" else None,
                        enable_thinking=args.enable_thinking, max_turns=args.max_turns,
                        max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens)


def _check_args(args: argparse.Namespace) -> None:
    if args.backend == "local" and not args.model:
        raise UsageError("--backend=local needs --model=DIR (a policy directory or a training WORKDIR)")
    if args.backend == "openai" and (not args.base_url or not args.model_name):
        raise UsageError("--backend=openai needs --base_url=URL and --model_name=NAME")
    for name in ("max_turns", "max_new_tokens", "batch_size", "concurrency"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("limit", "limit_per_source"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(args, name)}")


def _local_generator(args: argparse.Namespace) -> TurnGenerator:
    from ftrl_jax import serving  # deferred: loads JAX
    from ftrl_jax.rollout.policy import LocalPolicy

    policy = serving.load_policy(args.model, dtype=args.dtype, template=args.template,
                                 tokenizer_dir=args.tokenizer or None, tensor_parallel=args.tensor_parallel)
    return LocalPolicy(policy.config, policy.params, policy.tokenizer, template=policy.template,
                       enable_thinking=bool(args.enable_thinking), max_new_tokens=args.max_new_tokens,
                       max_prompt_tokens=args.max_prompt_tokens, temperature=0.0)


def _openai_generator(args: argparse.Namespace) -> TurnGenerator:
    try:
        extra_body = json.loads(args.extra_body) if args.extra_body else {}
    except json.JSONDecodeError as exc:
        raise UsageError(f"--extra_body is not valid JSON ({exc})") from None
    if not isinstance(extra_body, dict):
        raise UsageError("--extra_body must be a JSON object")
    return OpenAIChatGenerator(args.base_url, args.model_name, api_key=args.api_key, max_new_tokens=args.max_new_tokens,
                               temperature=0.0, enable_thinking=args.enable_thinking, extra_body=extra_body,
                               concurrency=args.concurrency, timeout_s=args.timeout, max_retries=args.max_retries)


# backend -> (build its turn generator from the flags, how its episodes are played)
BACKENDS: dict[str, tuple[Callable[[argparse.Namespace], TurnGenerator],
                          Callable[[TurnGenerator, argparse.Namespace, Sandbox], Player]]] = {
    "local": (_local_generator, lambda generator, args, sandbox: play_in_batches(
        generator, batch_size=args.batch_size, max_turns=args.max_turns, sandbox=sandbox)),
    "openai": (_openai_generator, lambda generator, args, sandbox: play_concurrently(
        generator, concurrency=args.concurrency, max_turns=args.max_turns, sandbox=sandbox)),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_args(args)
        scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
        kind, tasks, row_errors = load_tasks(args.data, args.data_format, scenarios, args.limit,
                                             args.limit_per_source)
        for error in row_errors:
            print(f"skipped: {error}", file=sys.stderr)
        settings = _settings(args, kind)
        records, run_id = open_run(args.output, settings, overwrite=args.overwrite)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    build_generator, player = BACKENDS[args.backend]
    return run_evaluation(tasks, kind, output=args.output, settings=settings, run_id=run_id, records=records,
                          row_errors=row_errors, build_generator=lambda: build_generator(args),
                          make_player=lambda generator, sandbox: player(generator, args, sandbox),
                          sandbox_workers=args.sandbox_workers, tool_timeout=args.tool_timeout,
                          progress=not args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
