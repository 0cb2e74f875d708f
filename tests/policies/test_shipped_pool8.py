"""The shipped `tiny-pool8` policy and the config presets that start from it (the default and `tiny-pool8`): files,
loading, the recipe's training data (training side only, as the main job built it), its tokenizer and chat template,
and that it plays held-out environments of its world as its model card says."""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
import pytest

from configs import qwen
from ftrl_jax import models, policies
from ftrl_jax.envs import splits
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.models.checkpoint_io import SafetensorsFile
from ftrl_jax.pipeline import main_job
from ftrl_jax.text.tokenizer import load_tokenizer
from tests.policies.shipped_checks import assert_round_trips_chat_template, greedy_solve_f1

PATH = policies.path("tiny-pool8")


@pytest.fixture(scope="module")
def recipe():
    return main_job.read_recipe(PATH)


@pytest.fixture(scope="module")
def held_out():
    # The first 8 of the main job's seed-0 held-out environments in the pool-8 world (build seed 2).
    config = qwen.get_config(qwen.TINY_POOL8)
    with Sandbox() as sandbox:
        return main_job.build_split("eval", 8, 2, kinds=main_job._kinds(config), complexity="low",
                                    world=config.envs.world, sandbox=sandbox)


def test_files_size_and_dtype(recipe):
    names = sorted(os.listdir(PATH))
    for name in ("README.md", "chat_template.jinja", "config.json", "model.safetensors", "recipe.json",
                 "tokenizer.json", "tokenizer_config.json"):
        assert name in names, name
    assert sum(os.path.getsize(os.path.join(PATH, n)) for n in names) <= 25 * 2**20
    st = SafetensorsFile(os.path.join(PATH, "model.safetensors"))
    assert {str(st.get(k).dtype) for k in st.keys()} == {"float32"} == {recipe["dtype"]}
    model_config, params = models.load_pretrained(PATH)
    assert model_config.num_params == recipe["model_params"]
    assert (model_config.num_layers, model_config.hidden_size, model_config.vocab_size) == (
        recipe["model"]["num_layers"], recipe["model"]["hidden_size"], recipe["model"]["vocab_size"])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))


def test_recipe_names_its_world_and_training_side_data(recipe):
    config = qwen.get_config(qwen.TINY_POOL8)
    assert recipe["world"] == qwen.POOL8_WORLD == config.envs.world
    assert f"--config.envs.world={qwen.POOL8_WORLD}" in recipe["command"]
    # The recipe rebuilds the environments of the run that made it (512, 498 distinct prompts in a world this
    # small; the hash is of that run's envs/train.jsonl prompts); the main job's validation set then leaves them
    # out. None of them is a held-out question of the seeds the card scores.
    prompts = main_job.policy_training_prompts(config)
    assert recipe["config"]["envs"]["num"] == 512 and recipe["imitated_envs"] == 256 and len(prompts) == 498
    assert hashlib.sha256("\n".join(sorted(prompts)).encode()).hexdigest()[:16] == "1c958931905f5a15"
    with Sandbox() as sandbox:
        for build_seed in (2, 1002, 2002):
            held = main_job.build_split("eval", 64, build_seed, kinds=main_job._kinds(config), complexity="low",
                                        world=config.envs.world, sandbox=sandbox)
            questions = {s.messages[0]["content"] for s in held}
            assert len(questions) > 50 and not questions & prompts
            assert all(splits.is_held_out(q.rsplit("Question: ", 1)[-1]) for q in questions)
    card = " ".join(open(os.path.join(PATH, "README.md")).read().split())  # the card wraps the command
    seed0 = next(h for h in recipe["held_out"] if h["main_job_seed"] == 0)
    assert f"{100 * seed0['solve_f1']:.2f}" in card and recipe["command"] in card


def test_tokenizer_round_trips_the_chat_template(held_out):
    assert_round_trips_chat_template(PATH, held_out)


def test_preset_starts_from_it_and_warmup_trains_from_scratch(tmp_path):
    config = qwen.get_config(qwen.TINY_POOL8)
    assert config.warmup.num_steps == 0
    main_job.check_config(config)
    assert main_job.model_path(config) == PATH
    tokenizer = main_job.prepare_tokenizer(config, str(tmp_path / "run"), [])
    assert tokenizer.get_vocab() == load_tokenizer(PATH).get_vocab()
    # The settings the README's three seeds ran with (given there as flags over the then default, today's
    # tiny-instruct preset).
    ran_with = {"envs.world": "pool=8,relations=12,fixed_names=1", "rollout.temperature": 0.7,
                "rl.learning_rate": 2e-4, "rl.trainable": "lower_mlp", "rl.prompt_source": "initial",
                "rl.dynamic_sampling": True, "rl.dynamic_sampling_require_success": True,
                "rl.prompt_filter": "greedy_fails", "rl.max_sampling_rounds": 4, "rl.num_steps": 64,
                "rl.prompts_per_step": 16, "rl.num_rollouts": 8, "rl.algorithm": "grpo", "rl.reward_kind": "f1",
                "eval.num_samples": 0, "eval.num_train_envs": 0, "eval.curve_every": 32, "eval.curve_envs": 256,
                "envs.num_train": 512, "envs.num_eval": 256}
    assert {k: config[k.split(".")[0]][k.split(".")[1]] for k in ran_with} == ran_with
    # experiments.sample plays the run's trained policy first, the shipped start when there is none.
    config.workdir = str(tmp_path / "run")
    assert main_job._policy_dir(config, None) == PATH
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    assert main_job._policy_dir(config, None) == str(export)
    # As with tiny-instruct: a shipped name with a warm start means from scratch, its directory
    # means warm-starting the shipped weights.
    config.warmup.num_steps = 600
    assert main_job.model_path(config) == ""
    config.model.path = PATH
    assert main_job.model_path(config) == PATH
    with pytest.raises(ValueError, match="unknown config preset 'tiny-pool9'"):
        qwen.get_config("tiny-pool9")


def test_default_is_the_recipe_for_32_steps_with_every_evaluation():
    """The embedded default differs from the preset in its length and evaluations only (the README's status
    table ran it as `python -m experiments.train --config=configs/qwen.py --config.seed=S`)."""
    default = json.loads(qwen.get_config().to_json_best_effort())
    preset = json.loads(qwen.get_config(qwen.TINY_POOL8).to_json_best_effort())
    differ = {(section, name): (value, preset[section][name])
              for section, fields in default.items() if isinstance(fields, dict)
              for name, value in fields.items() if value != preset[section][name]}
    assert differ == {("rl", "num_steps"): (32, 64), ("eval", "num_samples"): (2, 0),
                      ("eval", "sampled_envs"): (16, 32), ("eval", "num_train_envs"): (4, 0),
                      ("eval", "curve_every"): (16, 32), ("eval", "curve_envs"): (32, 256)}
    assert default["workdir"] == "runs/tiny" and default["preset"] == preset["preset"] == "tiny"
    assert default["model"]["path"] == qwen.TINY_POOL8
    main_job.check_config(qwen.get_config())


def test_it_plays_held_out_environments_greedily(held_out):
    # The first 8 of the environments the card's seed-0 figures come from, played as the main job evaluates.
    f1 = greedy_solve_f1(PATH, held_out)
    assert len(f1) == 8 and np.mean(f1) >= 0.1, f1  # 0.19 when shipped (a random model: 0)
