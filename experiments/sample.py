"""FTRL's RL data to a file: `python -m experiments.sample --config=configs/qwen.py[:PRESET] --out=FILE`.

The policy (`--policy=DIR`, else `--config.model.path`, else WORKDIR/export, else WORKDIR/warmstart) plays
the config's training environments multi-turn (built into WORKDIR/envs if not there yet). Every state right
after a tool-calling turn becomes an RL prompt: the messages so far, the unsolved set reduced by the answers
already found, and its solve rate; each fresh question is one too. They are written in the sample format
(`.jsonl` or `.parquet`), which `--config.envs.train_file` and `experiments.evaluate` read.

    python -m experiments.sample --config=configs/qwen.py --config.workdir=runs/tiny --out=prompts.jsonl
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from ftrl_jax.pipeline.main_job import TrainingError, sample_rl_prompts

_CONFIG = config_flags.DEFINE_config_file("config", "configs/qwen.py", "Training config file[:preset].",
                                          lock_config=True)
flags.DEFINE_string("out", None, "Output file (.jsonl or .parquet).", required=True)
flags.DEFINE_string("policy", "", "Hugging Face checkpoint directory to sample from (default: see above).")
flags.DEFINE_integer("num_envs", 0, "Play only the first N training environments (0: all).")
flags.DEFINE_bool("greedy", False, "Greedy turns instead of sampling at config.rollout.temperature.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("ftrl_jax").setLevel(logging.INFO)
    try:
        stats = sample_rl_prompts(_CONFIG.value, FLAGS.out, policy_dir=FLAGS.policy or None,
                                  num_envs=FLAGS.num_envs or None, greedy=FLAGS.greedy)
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"{stats['prompts']} RL prompts ({stats['after_tool_calls']} after tool-calling turns) from "
          f"{stats['episodes']} episodes of {stats['policy']} (mean Solve-F1 {stats['episode_solve_f1']:.3f}) "
          f"written to {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
