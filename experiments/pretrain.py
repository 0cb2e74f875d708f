"""A tiny instruct policy's recipe: `python -m experiments.pretrain --config=configs/tiny.py [--output=DIR]`.

Builds training-side procedural environments, learns the embedded tokenizer on them, trains the `tiny` model
from random initialisation on their oracle trajectories (or, with `--config.init=DIR`, continues that policy
directory with its own tokenizer), evaluates it greedily on the main job's seed-0 held-out environments and writes
a bfloat16 Hugging Face directory with recipe.json and a model card. See
ftrl_jax/pipeline/pretrain.py for the stages and files. The main job starts RL from it, in its world, with
`--config=configs/qwen.py:tiny-instruct --config.model.path=DIR`; the shipped `tiny-instruct` (that preset's start)
was made with these defaults.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from experiments import cli
from ftrl_jax.pipeline.pretrain import pretrain
from ftrl_jax.pipeline.main_job import TrainingError

CONFIG = "configs/tiny.py"


def define_flags(flag_values: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", "", "Run directory: environments, tokenizer, checkpoints, metrics "
                        "(empty: --config.workdir).", flag_values=flag_values)
    flags.DEFINE_string("output", "", "Policy directory to write (empty: --config.output, else WORKDIR/policy).",
                        flag_values=flag_values)


def main(argv: Sequence[str]) -> int:
    try:
        args = cli.parse(argv, define_flags, __doc__, config=CONFIG)
        config = args.config
        if args.workdir:
            config.workdir = args.workdir
        if args.output:
            config.output = args.output
        command = " ".join(["python -m experiments.pretrain", *argv[1:]])
        recipe = pretrain(config, command=command)
    except (cli.UsageError, TrainingError) as err:
        return cli.fail(err)
    held = recipe["held_out"]
    print(f"held-out greedy Solve-P/R/F1 {100 * held['solve_precision']:.2f} / {100 * held['solve_rate']:.2f} / "
          f"{100 * held['solve_f1']:.2f} on {held['num_episodes']} environments; "
          f"{recipe['wall_seconds'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
