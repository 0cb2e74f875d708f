"""The shipped tiny instruct policy: files, loading, its tokenizer and chat template, its recipe, and that it
plays held-out environments of its world as its model card says it can."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from configs import qwen, tiny
from ftrl_jax import models, policies
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.envs.world import TINY_WORLD
from ftrl_jax.models.checkpoint_io import SafetensorsFile
from ftrl_jax.pipeline import main_job
from ftrl_jax.text.tokenizer import build_default_tokenizer, load_tokenizer
from tests.policies.shipped_checks import assert_round_trips_chat_template, greedy_solve_f1

PATH = policies.path("tiny-instruct")


@pytest.fixture(scope="module")
def recipe():
    return main_job.read_recipe(PATH)


@pytest.fixture(scope="module")
def held_out():
    # The `tiny-instruct` preset's seed-0 held-out environments (build seed 2), the ones the model card scores.
    with Sandbox() as sandbox:
        kinds = main_job._kinds(qwen.get_config(qwen.TINY_INSTRUCT))
        return main_job.build_split("eval", 8, 2, kinds=kinds, complexity="low", world=TINY_WORLD, sandbox=sandbox)


def test_files_size_and_dtype(recipe):
    names = sorted(os.listdir(PATH))
    for name in ("README.md", "chat_template.jinja", "config.json", "model.safetensors", "recipe.json",
                 "tokenizer.json", "tokenizer_config.json"):
        assert name in names, name
    size = sum(os.path.getsize(os.path.join(PATH, n)) for n in names)
    assert size <= 25 * 2**20, size
    st = SafetensorsFile(os.path.join(PATH, "model.safetensors"))
    assert {str(st.get(k).dtype) for k in st.keys()} == {"bfloat16"}
    model_config, params = models.load_pretrained(PATH)
    assert model_config.num_params == recipe["model_params"]
    assert (model_config.num_layers, model_config.hidden_size, model_config.vocab_size) == (
        recipe["model"]["num_layers"], recipe["model"]["hidden_size"], recipe["model"]["vocab_size"])
    leaves = [np.asarray(x, np.float32) for x in jax.tree_util.tree_leaves(params)]
    assert all(np.isfinite(x).all() for x in leaves)


def test_recipe_is_the_config_defaults_and_the_tiny_instruct_preset_world(recipe):
    # `python -m experiments.pretrain --config=configs/tiny.py` reproduces it: the recorded settings are today's
    # defaults (the run directory, output and resume flag aside), and its world is the `tiny-instruct` preset's.
    defaults = json.loads(tiny.get_config().to_json_best_effort())
    recorded = dict(recipe["config"])
    for key in ("workdir", "output", "resume"):
        recorded.pop(key), defaults.pop(key)
    recorded.setdefault("init", "")  # made before `init` existed: from random initialisation, today's default
    assert recorded == defaults
    # The command it was made with set, as flags, exactly what are defaults now.
    config = tiny.get_config()
    for flag in recipe["made_with"].split()[3:]:
        key, _, value = flag.removeprefix("--config.").partition("=")
        if key.startswith("--") or key == "resume":
            continue
        section, name = key.split(".")
        assert str(config[section][name]) == value, flag
    assert recipe["world"] == TINY_WORLD == qwen.get_config(qwen.TINY_INSTRUCT).envs.world
    card = open(os.path.join(PATH, "README.md")).read()
    assert f"{100 * recipe['held_out']['solve_f1']:.2f}" in card and recipe["command"] in card
    assert 0.20 <= recipe["held_out"]["solve_f1"] <= 0.50  # a starting point with room for RL


def test_tokenizer_round_trips_the_chat_template(held_out):
    # The chat template it ships renders exactly what the native Qwen2.5 renderer does.
    assert_round_trips_chat_template(PATH, held_out)
    tokenizer = load_tokenizer(PATH)
    for special in ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<|endoftext|>"):
        assert len(tokenizer.encode(special, add_special_tokens=False)) == 1, special


def test_tiny_instruct_preset_starts_from_it_and_warmup_trains_from_scratch(tmp_path, recipe):
    config = qwen.get_config(qwen.TINY_INSTRUCT)
    assert config.model.path == "tiny-instruct" and config.warmup.num_steps == 0
    assert main_job.model_path(config) == PATH
    main_job.check_config(config)
    # The job's tokenizer and model are the shipped ones.
    tokenizer = main_job.prepare_tokenizer(config, str(tmp_path / "run"), [])
    assert tokenizer.get_vocab() == load_tokenizer(PATH).get_vocab()
    model_config, _ = main_job.prepare_model(config, tokenizer, main_job.parallel.make_mesh(1, 1, 1))
    assert model_config.num_params == recipe["model_params"]
    # A run directory holding another model's tokenizer is refused, not mixed with the shipped model.
    other = tmp_path / "other"
    (other / "tokenizer").mkdir(parents=True)
    build_default_tokenizer(["Alpha Beta", "Gamma"], vocab_size=300).save_pretrained(str(other / "tokenizer"))
    with pytest.raises(main_job.TrainingError, match="another model's tokenizer"):
        main_job.prepare_tokenizer(config, str(other), [])
    # experiments.sample's policy: the run's trained one first, the shipped start when there is none.
    config.workdir = str(tmp_path / "run")
    assert main_job._policy_dir(config, None) == PATH
    assert main_job._policy_dir(config, "tiny-instruct") == PATH
    config.warmup.num_steps = 5
    assert main_job.model_path(config) == ""
    config.model.path = PATH  # the directory itself: warm-start the shipped policy
    assert main_job.model_path(config) == PATH
    config.model.path, config.warmup.num_steps = "", 0  # neither a policy nor a warm start: refused
    with pytest.raises(main_job.TrainingError, match="random model"):
        main_job.check_config(config)
    with pytest.raises(ValueError, match="tiny-instruct"):
        policies.path("tiny")
    assert policies.resolve("/some/dir") == "/some/dir" and policies.resolve("tiny-instruct") == PATH
    # Analysis and serving take the name too.
    from analysis.checkpoints import open_checkpoint
    from ftrl_jax.serving.server import resolve_policy_dir
    assert resolve_policy_dir("tiny-instruct") == PATH and open_checkpoint("tiny-instruct") is not None


def test_it_plays_held_out_environments_greedily(held_out):
    # The card's held-out scores come from these environments (its 256 begin with these 8): the first ones of
    # each scenario type played greedily, as the main job's evaluation does, must score.
    f1 = greedy_solve_f1(PATH, held_out)
    assert len(f1) == 8 and np.mean(f1) >= 0.25, f1  # 0.46 when shipped
