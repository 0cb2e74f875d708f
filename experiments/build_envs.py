"""Builds validated tool-use environments and writes them in FTRL's sample format.

    python -m experiments.build_envs --num=2000 --seed=0 --out=runs/envs/train.jsonl
    python -m experiments.build_envs --num=2000 --seed=0 --out=small.jsonl --complexity=low \\
        --world=pool=32,relations=12,fixed_names=1
    python -m experiments.build_envs --num=50 --seed=0 --out=envs.parquet --author=llm \\
        --base_url=http://127.0.0.1:8000/v1 --model=Qwen2.5-72B-Instruct

The same arguments give the same file, byte for byte, with the procedural author (an LLM
endpoint is deterministic only if the server honours the request `seed`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

from tqdm import tqdm

from ftrl_jax.envs import samples
from ftrl_jax.envs.build import BuiltEnvironment, build_environments, distinct_tool_names
from ftrl_jax.envs.llm_author import ChatClient, ChatError, LLMAuthor
from ftrl_jax.envs.procedural import ProceduralAuthor
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.envs.stages import COMPLEXITY_PRESETS, SCENARIO_KINDS, Complexity
from ftrl_jax.envs.world import WorldSpec


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, required=True, help="validated environments to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and of every environment")
    parser.add_argument("--out", required=True, help="output file, .jsonl or .parquet")
    parser.add_argument("--author", choices=("procedural", "llm"), default="procedural")
    parser.add_argument("--scenarios", default=",".join(SCENARIO_KINDS),
                        help=f"comma-separated scenario kinds, cycled by index; from {','.join(SCENARIO_KINDS)}")
    parser.add_argument("--complexity", default="medium",
                        help=f"preset {sorted(COMPLEXITY_PRESETS)}, level 0-3, or 'fg=1,pe=2,pt=1,te=3,hops=3,"
                             "parallel=2' (presets and levels take overrides: 'low,te=2')")
    parser.add_argument("--world", default="full",
                        help="procedural author: world size, 'full' or e.g. 'pool=32,relations=12,fixed_names=1' "
                             "(names per entity type, relation count or keys joined by '+', canonical tool names; "
                             "seed=N picks another pool and subset)")
    parser.add_argument("--split", default="train", help="value of the `split` column")
    parser.add_argument("--workers", type=int, default=None, help="sandbox worker processes (default: CPUs)")
    parser.add_argument("--batch_size", type=int, default=64, help="environments per sandbox batch")
    parser.add_argument("--base_url", default="", help="LLM author: API root, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--api_key", default=os.environ.get("OPENAI_API_KEY", ""),
                        help="LLM author: bearer token (default: $OPENAI_API_KEY)")
    parser.add_argument("--model", default="", help="LLM author: model name sent to the endpoint")
    parser.add_argument("--max_retries", type=int, default=3, help="LLM author: repair attempts per stage")
    parser.add_argument("--request_retries", type=int, default=3,
                        help="LLM author: retries of a request after a connection error, HTTP 429 or 5xx")
    parser.add_argument("--author_threads", type=int, default=None,
                        help="environments constructed concurrently (default: 1 procedural, 8 llm)")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser


def _author(args: argparse.Namespace, sandbox: Sandbox):
    authors = {
        "procedural": lambda: ProceduralAuthor(world_seed=args.seed, spec=args.world_spec),
        "llm": lambda: LLMAuthor(ChatClient(args.base_url, args.api_key, args.model,
                                            transient_retries=args.request_retries),
                                 max_retries=args.max_retries, sandbox=sandbox),
    }
    return authors[args.author]()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.author == "llm" and not args.base_url:
        print("--author=llm needs --base_url (and usually --model)", file=sys.stderr)
        return 2
    try:
        complexity = Complexity.parse(args.complexity)
    except ValueError as exc:
        print(f"--complexity: {exc}", file=sys.stderr)
        return 2
    kinds = [k.strip() for k in args.scenarios.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in SCENARIO_KINDS]
    if unknown or not kinds:
        print(f"--scenarios: unknown kinds {unknown or kinds}; use some of {','.join(SCENARIO_KINDS)}",
              file=sys.stderr)
        return 2
    try:
        args.world_spec = WorldSpec.parse(args.world)
    except ValueError as exc:
        print(f"--world: {exc}", file=sys.stderr)
        return 2
    if args.author == "llm" and args.world_spec != WorldSpec():
        print("--world sizes the procedural author's world; drop it with --author=llm", file=sys.stderr)
        return 2
    if args.author == "procedural":
        problems = ProceduralAuthor(world_seed=args.seed, spec=args.world_spec).check(kinds, complexity)
        if problems:
            print("--world: " + "\n  ".join(problems), file=sys.stderr)
            return 2
    threads = args.author_threads or (8 if args.author == "llm" else 1)

    started = time.perf_counter()
    with Sandbox(num_workers=args.workers) as sandbox:
        progress = tqdm(total=args.num, unit="env", disable=args.no_progress, file=sys.stderr)

        def advance(_: BuiltEnvironment) -> None:
            progress.update(1)

        try:
            environments, report = build_environments(
                args.num, args.seed, author=_author(args, sandbox), kinds=kinds, complexity=complexity,
                sandbox=sandbox, batch_size=args.batch_size, author_threads=threads, on_kept=advance)
        except ChatError as exc:
            print(f"the LLM endpoint failed, nothing written: {exc}", file=sys.stderr)
            return 1
        finally:
            progress.close()
    samples.write_samples(args.out, [env.to_sample(args.split) for env in environments])
    print(report.summary())
    world = f", world {args.world_spec}" if args.author == "procedural" else ""
    print(f"wrote {len(environments)} environments ({len(distinct_tool_names(environments))} distinct tool "
          f"names{world}) to {args.out}")
    total_s = time.perf_counter() - started
    print(f"throughput: {report.envs_per_minute:,.0f} validated envs/min while building; "
          f"{60.0 * len(environments) / total_s:,.0f} envs/min end to end ({total_s:.1f} s with sandbox "
          "start-up and writing)")
    if len(environments) < args.num:
        print(f"only {len(environments)} of {args.num} environments passed validation; see the drop "
              "reasons above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
