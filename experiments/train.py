"""The main job: `python -m experiments.train --config=configs/qwen.py[:PRESET] [--config.x=...]`.

On the embedded default (no preset) it builds procedural environments, the project's tokenizer and the
`tiny` model, warm-starts it on oracle trajectories, evaluates, runs GRPO with the verifiable reward,
evaluates again and writes WORKDIR/summary.json. See ftrl_jax/pipeline/main_job.py for the stages and files.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from ftrl_jax.pipeline.main_job import TrainingError, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", "configs/qwen.py", "Training config file[:preset].",
                                          lock_config=True)


def main(argv):
    del argv
    # Our progress messages at INFO; libraries (orbax, jax) only from WARNING up.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("ftrl_jax").setLevel(logging.INFO)
    try:
        summary = train_and_evaluate(_CONFIG.value)
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"summary written to {_CONFIG.value.workdir}/summary.json")
    for phase in ("eval_before", "eval_after"):
        print(phase, {k: round(summary[phase][k], 4) for k in ("solve_precision", "solve_rate", "solve_f1")})


if __name__ == "__main__":
    app.run(main)
