"""FTRL's RL data to a file: `python -m experiments.sample --config=configs/qwen.py[:PRESET] --output=FILE`.

The policy (`--model=DIR` or a shipped policy's name, else a `--config.model.path` directory (a shipped name
there is the preset's start, tried last), else WORKDIR/export, else WORKDIR/warmstart, else the preset's shipped
start, `tiny-instruct` or `tiny-pool8`) plays
the config's training environments multi-turn (built into WORKDIR/envs if not there yet). Every state right
after a tool-calling turn becomes an RL prompt: the messages so far, the unsolved set reduced by the answers
already found, and its solve rate; each fresh question is one too. They are written in the sample format
(`.jsonl` or `.parquet`), which `--config.envs.train_file` and `experiments.evaluate` read.

    python -m experiments.sample --config=configs/qwen.py --workdir=runs/tiny --output=prompts.jsonl
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from experiments import cli
from ftrl_jax.envs import samples
from ftrl_jax.pipeline.main_job import TrainingError, sample_rl_prompts

CONFIG = "configs/qwen.py"


def define_flags(flag_values: flags.FlagValues) -> None:
    flags.DEFINE_string("output", None, "Output: a .jsonl or .parquet file, or a path without extension for a datasets "
                        "save_to_disk directory (required).", required=True,
                        flag_values=flag_values)
    flags.DEFINE_alias("out", "output", flag_values=flag_values)
    flags.DEFINE_string("model", "", "Hugging Face checkpoint directory or shipped policy's name to sample from "
                        "(empty: see above).",
                        flag_values=flag_values)
    flags.DEFINE_alias("policy", "model", flag_values=flag_values)
    flags.DEFINE_string("workdir", "", "Run directory whose environments and policy are used "
                        "(empty: --config.workdir).", flag_values=flag_values)
    flags.DEFINE_integer("num_envs", 0, "Play only the first N training environments (0: all).", lower_bound=0,
                         flag_values=flag_values)
    flags.DEFINE_bool("greedy", False, "Greedy turns instead of sampling at config.rollout.temperature.",
                      flag_values=flag_values)


def main(argv: Sequence[str]) -> int:
    try:
        args = cli.parse(argv, define_flags, __doc__, config=CONFIG)
        try:
            samples.check_output_path(args.output)
        except ValueError as exc:
            raise cli.UsageError(f"--output: {exc}") from None
        config = args.config
        if args.workdir:
            config.workdir = args.workdir
        stats = sample_rl_prompts(config, args.output, policy_dir=args.model or None,
                                  num_envs=args.num_envs or None, greedy=args.greedy)
    except (cli.UsageError, TrainingError) as err:
        return cli.fail(err)
    print(f"{stats['prompts']} RL prompts ({stats['after_tool_calls']} after tool-calling turns) from "
          f"{stats['episodes']} episodes of {stats['policy']} (mean Solve-F1 {stats['episode_solve_f1']:.3f}) "
          f"written to {args.output}")
    return 0


if __name__ == "__main__":
    cli.run(main)
