"""Recipe of a tiny instruct policy: `python -m experiments.pretrain --config=configs/tiny.py`.

Supervised training from random initialisation (or, with `--config.init=DIR`, from a policy directory) on oracle
trajectories of procedural environments in the tiny world (the `tiny-instruct` preset's world), on training-side
questions only (`ftrl_jax/envs/splits.py`), then a greedy held-out evaluation on that preset's seed-0 held-out
environments, and a bfloat16 Hugging Face directory with a model card. The shipped `tiny-instruct` policy
(ftrl_jax/policies/tiny_instruct), which the `tiny-instruct` preset starts RL from, was made with these defaults;
`python -m experiments.train --config=configs/qwen.py:tiny-instruct --config.model.path=DIR` runs RL from another
one.
"""

from __future__ import annotations

import ml_collections

from ftrl_jax.envs.world import TINY_WORLD


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/pretrain-tiny"
    c.output = ""                  # the policy directory; empty: WORKDIR/policy
    c.seed = 0                     # model initialisation and batch order
    c.resume = False
    c.init = ""                    # a policy directory (or shipped name) to continue from; empty: random init

    c.envs = ml_collections.ConfigDict()
    c.envs.world = TINY_WORLD
    c.envs.num = 8192              # supervised environments (one oracle trajectory each)
    c.envs.seed = 424_242          # their build seed (the main job builds with seed * 1000 + 1 or 2)
    c.envs.scenarios = "single_hop,parallel_single_hop,multi_hop,parallel_multi_hop"
    c.envs.complexity = "low"

    c.tokenizer = ml_collections.ConfigDict()
    # One token per word of a name (6,167 learned of 8,192 in the tiny world); stable_names: a name is the same
    # tokens wherever it appears (qwen2: Qwen2's split, where " Name" in prose and "Name" in JSON differ).
    c.tokenizer.vocab_size = 8192
    c.tokenizer.pretokenizer = "stable_names"

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"
    c.model.overrides = "num_kv_heads=4"
    c.model.template = "qwen2.5"

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1440       # about 2.8 epochs; held-out greedy F1 leaves zero only after ~700
    c.train.batch_size = 16
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 50
    c.train.weight_decay = 0.01
    c.train.max_grad_norm = 1.0
    c.train.max_len = 768
    c.train.chunk_size = 128

    c.eval = ml_collections.ConfigDict()
    c.eval.num_envs = 256          # the main job's seed-0 held-out set (build seed 2, 256 environments)
    c.eval.seed = 2
    c.eval.max_turns = 6
    c.eval.max_new_tokens = 96
    c.eval.every = 240             # greedy Solve-F1 on the first eval.curve_envs held-out environments
    c.eval.curve_envs = 64

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 50
    return c
