"""Builds validated tool-use environments and writes them in FTRL's sample format.

    python -m experiments.build_envs --num=2000 --seed=0 --output=runs/envs/train.jsonl
    python -m experiments.build_envs --num=2000 --seed=0 --output=small.jsonl --complexity=low \\
        --world=pool=256,relations=12,fixed_names=1
    python -m experiments.build_envs --num=50 --seed=0 --output=envs.parquet --author=llm \\
        --base_url=http://127.0.0.1:8000/v1 --model_name=Qwen2.5-72B-Instruct

The same arguments give the same file, byte for byte, with the procedural author (an LLM
endpoint is deterministic only if the server honours the request `seed`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

from absl import flags
from tqdm import tqdm

from experiments import cli
from ftrl_jax.envs import samples
from ftrl_jax.envs.build import BuiltEnvironment, build_environments, distinct_tool_names
from ftrl_jax.envs.llm_author import ChatClient, ChatError, LLMAuthor
from ftrl_jax.envs.procedural import ProceduralAuthor
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.envs.stages import COMPLEXITY_PRESETS, SCENARIO_KINDS, Complexity
from ftrl_jax.envs.world import WorldSpec


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("num", None, "Validated environments to write (required).", required=True, lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the world and of every environment.", flag_values=fv)
    flags.DEFINE_string("output", None, "Output: a .jsonl or .parquet file, or a path without extension for a datasets "
                        "save_to_disk directory (required).", required=True, flag_values=fv)
    flags.DEFINE_alias("out", "output", flag_values=fv)
    flags.DEFINE_enum("author", "procedural", ("procedural", "llm"), "Who writes the environments.", flag_values=fv)
    flags.DEFINE_string("scenarios", ",".join(SCENARIO_KINDS),
                        f"Comma-separated scenario kinds, cycled by index; from {','.join(SCENARIO_KINDS)}.",
                        flag_values=fv)
    flags.DEFINE_string("complexity", "medium",
                        f"Preset {sorted(COMPLEXITY_PRESETS)}, level 0-3, or 'fg=1,pe=2,pt=1,te=3,hops=3,parallel=2' "
                        "(presets and levels take overrides: 'low,te=2').", flag_values=fv)
    flags.DEFINE_string("world", "full",
                        "Procedural author: world size, 'full' or e.g. 'pool=256,relations=12,fixed_names=1' (names "
                        "per entity type, relation count or keys joined by '+', canonical tool names; seed=N picks "
                        "another pool and subset).", flag_values=fv)
    flags.DEFINE_string("split", "train", "Value of the `split` column.", flag_values=fv)
    flags.DEFINE_integer("workers", 0, "Sandbox worker processes (0: one per CPU).", lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "Environments per sandbox batch.", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("base_url", "", "LLM author: API root, e.g. http://127.0.0.1:8000/v1.", flag_values=fv)
    flags.DEFINE_string("api_key", "", "LLM author: bearer token (empty: $OPENAI_API_KEY).", flag_values=fv)
    flags.DEFINE_string("model_name", "", "LLM author: model name sent to the endpoint.", flag_values=fv)
    flags.DEFINE_integer("max_retries", 3, "LLM author: repair attempts per stage.", lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("request_retries", 3,
                         "LLM author: retries of a request after a connection error, HTTP 429 or 5xx.", lower_bound=0,
                         flag_values=fv)
    flags.DEFINE_integer("author_threads", 0,
                         "Environments constructed concurrently (0: 1 with the procedural author, 8 with llm).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_bool("progress", True, "Show the progress bar (--noprogress hides it).", flag_values=fv)


def _author(args: flags.FlagValues, world: WorldSpec, sandbox: Sandbox):
    authors = {
        "procedural": lambda: ProceduralAuthor(world_seed=args.seed, spec=world),
        "llm": lambda: LLMAuthor(ChatClient(args.base_url, args.api_key or os.environ.get("OPENAI_API_KEY", ""),
                                            args.model_name, transient_retries=args.request_retries),
                                 max_retries=args.max_retries, sandbox=sandbox),
    }
    return authors[args.author]()


def _checked(args: flags.FlagValues) -> tuple[Complexity, list[str], WorldSpec]:
    """The parsed --complexity, --scenarios and --world; raises UsageError naming the flag at fault."""
    try:
        samples.check_output_path(args.output)
    except ValueError as exc:
        raise cli.UsageError(f"--output: {exc}") from None
    if args.author == "llm" and not args.base_url:
        raise cli.UsageError("--author=llm needs --base_url (and usually --model_name)")
    try:
        complexity = Complexity.parse(args.complexity)
    except ValueError as exc:
        raise cli.UsageError(f"--complexity: {exc}") from None
    kinds = [k.strip() for k in args.scenarios.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in SCENARIO_KINDS]
    if unknown or not kinds:
        raise cli.UsageError(f"--scenarios: unknown kinds {unknown or kinds}; use some of {','.join(SCENARIO_KINDS)}")
    try:
        world = WorldSpec.parse(args.world)
    except ValueError as exc:
        raise cli.UsageError(f"--world: {exc}") from None
    if args.author == "llm" and world != WorldSpec():
        raise cli.UsageError("--world sizes the procedural author's world; drop it with --author=llm")
    if args.author == "procedural":
        problems = ProceduralAuthor(world_seed=args.seed, spec=world).check(kinds, complexity)
        if problems:
            raise cli.UsageError("--world: " + "\n  ".join(problems))
    return complexity, kinds, world


def main(argv: Sequence[str]) -> int:
    try:
        args = cli.parse(argv, define_flags, __doc__)
        complexity, kinds, world = _checked(args)
    except cli.UsageError as exc:
        return cli.fail(exc)
    threads = args.author_threads or (8 if args.author == "llm" else 1)

    started = time.perf_counter()
    with Sandbox(num_workers=args.workers or None) as sandbox:
        progress = tqdm(total=args.num, unit="env", disable=not args.progress, file=sys.stderr)

        def advance(_: BuiltEnvironment) -> None:
            progress.update(1)

        try:
            environments, report = build_environments(
                args.num, args.seed, author=_author(args, world, sandbox), kinds=kinds, complexity=complexity,
                sandbox=sandbox, batch_size=args.batch_size, author_threads=threads, on_kept=advance)
        except ChatError as exc:
            print(f"error: the LLM endpoint failed, nothing written: {exc}", file=sys.stderr)
            return 1
        finally:
            progress.close()
    samples.write_samples(args.output, [env.to_sample(args.split) for env in environments])
    print(report.summary())
    world_note = f", world {world}" if args.author == "procedural" else ""
    print(f"wrote {len(environments)} environments ({len(distinct_tool_names(environments))} distinct tool "
          f"names{world_note}) to {args.output}")
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
    cli.run(main)
