"""Evaluates a policy on FTRL's test set (or any sample-format file) and on ToolHop, as in the paper's tables.

    python -m experiments.evaluate --data=../shared/benchdata/ftrl_test.parquet --model=runs/tiny \\
        --output=runs/eval/ftrl_after.jsonl
    python -m experiments.evaluate --data=../shared/benchdata/toolhop_100.jsonl --backend=openai \\
        --base_url=http://127.0.0.1:8000/v1 --model_name=Qwen2.5-7B-Instruct --output=runs/eval/toolhop.jsonl

The policy is a Hugging Face directory or a training WORKDIR (its export/ is used) run in-process on the
jit sampler (`--model`), or any OpenAI-compatible chat-completions server (`--backend=openai`: vLLM, a
hosted model, or `python -m experiments.serve`). Episodes are greedy and multi-turn (`--max_turns`).
Scoring, resume and summaries: `ftrl_jax.rollout.harness`. Run the same command again to resume. Next to
`--output`: `<stem>.summary.json`, `<stem>.summary.md` and `<stem>.scenarios.png` (per-scenario bar chart).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags

from experiments import cli
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.reporting.plots import plot_evaluate_summary
from ftrl_jax.rollout.episodes import TurnGenerator
from ftrl_jax.rollout.harness import (DATA_KINDS, TOOLHOP_SCENARIOS, Player, UsageError, load_tasks, open_run,
                                      play_concurrently, play_in_batches, run_evaluation, run_settings, summary_paths)
from ftrl_jax.serving.client import OpenAIChatGenerator
from ftrl_jax.text.templates import TEMPLATE_CHOICES


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("data", None, "Sample-format .jsonl/.parquet, or a ToolHop .jsonl (required).", required=True,
                        flag_values=fv)
    flags.DEFINE_enum("data_format", "auto", ("auto", *DATA_KINDS),
                      "How to read --data (auto: ToolHop rows are recognised by their fields).", flag_values=fv)
    flags.DEFINE_string("scenarios", ",".join(TOOLHOP_SCENARIOS), "ToolHop scenarios to play, comma-separated.",
                        flag_values=fv)
    flags.DEFINE_string("output", None, "Episode lines (.jsonl); summaries are written next to it (required).",
                        required=True, flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Start again instead of resuming --output.", flag_values=fv)
    flags.DEFINE_integer("limit", 0, "Evaluate only the first N rows of --data (0: all).", lower_bound=0,
                         flag_values=fv)
    flags.DEFINE_integer("limit_per_source", 0,
                         "Evaluate only the first N rows of each data_source, before --limit (0: all).", lower_bound=0,
                         flag_values=fv)
    flags.DEFINE_enum("backend", "local", ("local", "openai"),
                      "local: --model in-process on the jit sampler; openai: a chat-completions server.",
                      flag_values=fv)
    flags.DEFINE_string("model", "", "local: Hugging Face policy directory, a training WORKDIR (its export/), or a "
                        "shipped policy's name (tiny-instruct).",
                        flag_values=fv)
    flags.DEFINE_string("tokenizer", "", "local: tokenizer directory (empty: the policy's).", flag_values=fv)
    flags.DEFINE_string("dtype", "float32", "local: parameter dtype (float32, bfloat16).", flag_values=fv)
    flags.DEFINE_integer("tensor_parallel", 1, "local: devices to shard the weights over.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_enum("template", "auto", TEMPLATE_CHOICES,
                      "local: chat template (auto: from the model type; checkpoint: the tokenizer's own).",
                      flag_values=fv)
    flags.DEFINE_integer("batch_size", 8,
                         "local: episodes played as one batch (prefill memory grows with batch x prompt^2).",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("max_prompt_tokens", 0, "local: prompt budget (0: the context minus --max_new_tokens).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_string("base_url", "", "openai: API root, e.g. http://127.0.0.1:8000/v1.", flag_values=fv)
    flags.DEFINE_string("model_name", "", "openai: the served model's name.", flag_values=fv)
    flags.DEFINE_string("api_key", "", "openai: bearer token (empty: $OPENAI_API_KEY).", flag_values=fv)
    flags.DEFINE_integer("concurrency", 16, "openai: episodes in flight at once.", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("timeout", 300.0, "openai: seconds per request.", lower_bound=0.0, flag_values=fv)
    flags.DEFINE_integer("max_retries", 4, "openai: retries of a failing request.", lower_bound=0, flag_values=fv)
    flags.DEFINE_string("extra_body", "", "openai: JSON object merged into every request.", flag_values=fv)
    flags.DEFINE_integer("max_turns", 20, "Assistant turns per episode.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 512, "New tokens per assistant turn.", lower_bound=1, flag_values=fv)
    flags.DEFINE_bool("enable_thinking", False,
                      "Qwen3 reasoning mode, --enable_thinking or --noenable_thinking (openai: sent as "
                      "chat_template_kwargs only when one of them is given).", flag_values=fv)
    flags.DEFINE_integer("sandbox_workers", 0, "Tool worker processes (0: one per CPU).", lower_bound=0,
                         flag_values=fv)
    flags.DEFINE_float("tool_timeout", 10.0, "Seconds per tool call.", lower_bound=0.0, flag_values=fv)
    flags.DEFINE_bool("progress", True, "Show the progress bar (--noprogress hides it).", flag_values=fv)


def _enable_thinking(args: flags.FlagValues) -> bool | None:
    """--enable_thinking / --noenable_thinking when given; None (the policy's or server's default) when not."""
    return args.enable_thinking if args["enable_thinking"].present else None


def _settings(args: flags.FlagValues, kind: str) -> dict[str, Any]:
    policy = args.model if args.backend == "local" else f"{args.base_url.rstrip('/')} {args.model_name}"
    return run_settings(kind, args.data, backend=args.backend, policy=policy,
                        template=args.template if args.backend == "local" else None,
                        enable_thinking=_enable_thinking(args), max_turns=args.max_turns,
                        max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens or None)


def _check_args(args: flags.FlagValues) -> None:
    if args.backend == "local" and not args.model:
        raise UsageError("--backend=local needs --model=DIR (a policy directory or a training WORKDIR)")
    if args.backend == "openai" and (not args.base_url or not args.model_name):
        raise UsageError("--backend=openai needs --base_url=URL and --model_name=NAME")
    if not args.output.endswith(".jsonl") or not os.path.basename(args.output)[:-len(".jsonl")]:
        raise UsageError(f"--output={args.output!r}: episodes are written as JSON lines; name a .jsonl file "
                         "(the summaries go next to it)")
    if args.backend == "openai":
        _extra_body(args)


def _extra_body(args: flags.FlagValues) -> dict:
    try:
        extra_body = json.loads(args.extra_body) if args.extra_body else {}
    except json.JSONDecodeError as exc:
        raise UsageError(f"--extra_body is not valid JSON ({exc})") from None
    if not isinstance(extra_body, dict):
        raise UsageError("--extra_body must be a JSON object")
    return extra_body


def _local_generator(args: flags.FlagValues) -> TurnGenerator:
    from ftrl_jax import serving  # deferred: loads JAX
    from ftrl_jax.rollout.policy import LocalPolicy

    policy = serving.load_policy(args.model, dtype=args.dtype, template=args.template,
                                 tokenizer_dir=args.tokenizer or None, tensor_parallel=args.tensor_parallel)
    return LocalPolicy(policy.config, policy.params, policy.tokenizer, template=policy.template,
                       enable_thinking=bool(_enable_thinking(args)), max_new_tokens=args.max_new_tokens,
                       max_prompt_tokens=args.max_prompt_tokens or None, temperature=0.0)


def _openai_generator(args: flags.FlagValues) -> TurnGenerator:
    extra_body = _extra_body(args)
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY", "")
    return OpenAIChatGenerator(args.base_url, args.model_name, api_key=api_key, max_new_tokens=args.max_new_tokens,
                               temperature=0.0, enable_thinking=_enable_thinking(args), extra_body=extra_body,
                               concurrency=args.concurrency, timeout_s=args.timeout, max_retries=args.max_retries)


# backend -> (build its turn generator from the flags, how its episodes are played)
BACKENDS: dict[str, tuple[Callable[[flags.FlagValues], TurnGenerator],
                          Callable[[TurnGenerator, flags.FlagValues, Sandbox], Player]]] = {
    "local": (_local_generator, lambda generator, args, sandbox: play_in_batches(
        generator, batch_size=args.batch_size, max_turns=args.max_turns, sandbox=sandbox)),
    "openai": (_openai_generator, lambda generator, args, sandbox: play_concurrently(
        generator, concurrency=args.concurrency, max_turns=args.max_turns, sandbox=sandbox)),
}


def main(argv: Sequence[str]) -> int:
    try:
        args = cli.parse(argv, define_flags, __doc__)
        _check_args(args)
        scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
        kind, tasks, row_errors = load_tasks(args.data, args.data_format, scenarios, args.limit or None,
                                             args.limit_per_source or None)
        for error in row_errors:
            print(f"skipped: {error}", file=sys.stderr)
        if not tasks:
            raise UsageError(f"--data={args.data!r} holds no episodes to play"
                             + (f" ({len(row_errors)} rows skipped, see above)" if row_errors else ""))
        settings = _settings(args, kind)
        records, run_id = open_run(args.output, settings, overwrite=args.overwrite)
    except (cli.UsageError, UsageError) as exc:
        return cli.fail(exc)
    build_generator, player = BACKENDS[args.backend]
    code = run_evaluation(tasks, kind, output=args.output, settings=settings, run_id=run_id, records=records,
                          row_errors=row_errors, build_generator=lambda: build_generator(args),
                          make_player=lambda generator, sandbox: player(generator, args, sandbox),
                          sandbox_workers=args.sandbox_workers or None, tool_timeout=args.tool_timeout,
                          progress=args.progress)
    json_path, _ = summary_paths(args.output)
    if code in (0, 1) and os.path.isfile(json_path):  # 1: some episodes failed; the summary holds the rest
        with open(json_path, encoding="utf-8") as f:
            summary = json.load(f)
        chart = plot_evaluate_summary(summary, json_path[: -len(".summary.json")] + ".scenarios.png")
        print(f"per-scenario chart: {chart}")
    return code


if __name__ == "__main__":
    cli.run(main)
