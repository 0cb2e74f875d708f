"""Policies shipped with the package, as Hugging Face directories, and the names that resolve to them.

`tiny-instruct` (`tiny_instruct/`): the `tiny` model trained by `python -m experiments.pretrain
--config=configs/tiny.py` on oracle conversations of the tiny world (`envs.world.TINY_WORLD`): bfloat16
safetensors, config, its own tokenizer with the Qwen2.5 chat template, `recipe.json` and a model card with the
command, data, steps, wall time and held-out scores. It is the `tiny-instruct` config preset's starting policy
(`configs/qwen.py:tiny-instruct`, the earlier default).

`tiny-pool8` (`tiny_pool8/`): the `tiny` model warm-started by the main job for 600 steps on oracle conversations
in a world of 8 names per type (`pool=8,relations=12,fixed_names=1`), float32 as it was trained, with its own
tokenizer, `recipe.json` and a model card. The embedded default (`configs/qwen.py`: `model.path="tiny-pool8"`)
and the `tiny-pool8` preset start from it, as FTRL starts RL from instruction-tuned models; shipping the policy
keeps the start of their runs the same on every machine and seed.
"""

from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))

# name -> folder of this package
SHIPPED = {"tiny-instruct": "tiny_instruct", "tiny-pool8": "tiny_pool8"}
TINY_INSTRUCT = "tiny-instruct"
TINY_POOL8 = "tiny-pool8"
# The embedded default's `model.path` (configs/qwen.py).
TINY_DEFAULT = TINY_POOL8


def path(name: str) -> str:
    """The directory of the shipped policy `name`; an unknown name is a ValueError listing the shipped ones."""
    if name not in SHIPPED:
        raise ValueError(f"no shipped policy {name!r}; shipped: {', '.join(sorted(SHIPPED))}")
    return os.path.join(_HERE, SHIPPED[name])


def resolve(name_or_dir: str | os.PathLike) -> str:
    """A shipped policy's name -> its directory; anything else (a checkpoint directory, a GGUF file, "") is
    returned unchanged. A checkpoint directory of that name (holding config.json) in the working directory wins
    over the shipped policy."""
    name_or_dir = os.fspath(name_or_dir)
    if name_or_dir in SHIPPED and not os.path.isfile(os.path.join(name_or_dir, "config.json")):
        return path(name_or_dir)
    return name_or_dir

