"""The main job: `python -m experiments.train --config=configs/qwen.py[:PRESET] [--config.x=...] [--workdir=DIR]`.

On the embedded default (no preset) it builds procedural environments, loads the shipped `tiny-pool8`
policy (`--config.warmup.num_steps=N`: trains the `tiny` model from scratch instead), evaluates on 256 held-out
environments, runs 32 GRPO steps with the verifiable reward on first turns where greedy decoding fails, evaluates
again and writes WORKDIR/summary.json. See ftrl_jax/pipeline/main_job.py for the stages and files.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from experiments import cli
from ftrl_jax.pipeline.main_job import TrainingError, train_and_evaluate

CONFIG = "configs/qwen.py"


def define_flags(flag_values: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", "", "Run directory: environments, checkpoints, export, summary.json "
                        "(empty: --config.workdir).", flag_values=flag_values)


def main(argv: Sequence[str]) -> int:
    try:
        args = cli.parse(argv, define_flags, __doc__, config=CONFIG)
        config = args.config
        if args.workdir:
            config.workdir = args.workdir
        summary = train_and_evaluate(config)
    except (cli.UsageError, TrainingError) as err:
        return cli.fail(err)
    print(f"summary written to {config.workdir}/summary.json")
    for phase in ("eval_before", "eval_after"):
        print(phase, {k: round(summary[phase][k], 4) for k in ("solve_precision", "solve_rate", "solve_f1")})
    return 0


if __name__ == "__main__":
    cli.run(main)
