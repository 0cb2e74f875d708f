"""Measures procedural environment building: construction alone, and validated end to end.

    python -m benchmarks.bench_build_envs --num=2000 --levels=low,medium,high

Prints, per complexity preset: environments/min for the five stages alone (one process),
validated environments/min with the sandbox (construction overlapped with execution), and the
sizes that drive the cost (tools, oracle calls and code per environment).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

from absl import flags

from experiments import cli

from ftrl_jax.envs.build import build_environments, distinct_tool_names
from ftrl_jax.envs.procedural import ProceduralAuthor
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.envs.stages import SCENARIO_KINDS, Complexity, construct, environment_rng


def _construct_rate(num: int, seed: int, complexity: Complexity) -> float:
    author = ProceduralAuthor(world_seed=seed)
    kinds = list(SCENARIO_KINDS)
    started = time.perf_counter()
    for index in range(num):
        construct(author, kinds[index % len(kinds)], complexity, environment_rng(seed, index))
    return 60.0 * num / (time.perf_counter() - started)


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("num", 2000, "Environments built per complexity level.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the world and of every environment.", flag_values=fv)
    flags.DEFINE_list("levels", ["low", "medium", "high"], "Complexity presets or levels, comma-separated.",
                      flag_values=fv)
    flags.DEFINE_integer("workers", 0, "Sandbox workers (0: one per CPU).", lower_bound=0, flag_values=fv)


def main(argv: Sequence[str]) -> int:
    try:
        args = cli.parse(argv, define_flags, __doc__)
        complexities = {}
        for level in args.levels:
            try:
                complexities[level] = Complexity.parse(level)
            except ValueError as exc:
                raise cli.UsageError(f"--levels: {exc}") from None
    except cli.UsageError as exc:
        return cli.fail(exc)

    print(f"{'level':>8} {'stages/min':>11} {'validated/min':>14} {'tools/env':>10} {'calls/env':>10} "
          f"{'code kB/env':>12} {'names':>7} {'dropped':>8}")
    for level, complexity in complexities.items():
        stages_rate = _construct_rate(min(args.num, 500), args.seed, complexity)
        with Sandbox(num_workers=args.workers or None) as sandbox:
            envs, report = build_environments(args.num, args.seed, complexity=complexity, sandbox=sandbox)
        tools = statistics.mean(len(e.tools) for e in envs)
        calls = statistics.mean(sum(len(t) for t in e.oracle_calls()) for e in envs)
        code_kb = statistics.mean(sum(map(len, e.codes.values())) for e in envs) / 1000
        print(f"{level:>8} {stages_rate:>11,.0f} {report.envs_per_minute:>14,.0f} {tools:>10.2f} {calls:>10.2f} "
              f"{code_kb:>12.1f} {len(distinct_tool_names(envs)):>7} {sum(report.dropped.values()):>8}")
    return 0


if __name__ == "__main__":
    cli.run(main)
