"""The shipped policy's recipe on a micro configuration: deterministic steps, the files it writes, errors."""

import json
import os

import pytest

from configs import tiny
from ftrl_jax import models
from ftrl_jax.envs import splits
from ftrl_jax.envs.samples import read_samples
from ftrl_jax.models.checkpoint_io import SafetensorsFile
from ftrl_jax.pipeline.main_job import read_recipe
from ftrl_jax.pipeline.pretrain import PretrainError, _check_data_settings, check_config, pretrain


def micro_config(workdir, **train):
    c = tiny.get_config()
    c.workdir = str(workdir)
    c.model.overrides = "num_layers=1,hidden_size=64,intermediate_size=128,num_heads=2,head_dim=32,num_kv_heads=1"
    c.tokenizer.vocab_size = 600
    c.envs.num = 16
    c.train.num_steps = train.get("num_steps", 3)
    c.train.warmup_steps = 1
    c.train.batch_size = 4
    c.eval.num_envs = 4
    c.eval.max_new_tokens = 16
    c.eval.max_turns = 2
    c.eval.every = 2
    c.eval.curve_envs = 2
    c.checkpoint.every = 2
    return c


def _tensors(path):
    st = SafetensorsFile(os.path.join(path, "model.safetensors"))
    return {k: st.get(k).tobytes() for k in st.keys()}


def test_recipe_steps_are_deterministic_and_write_a_loadable_policy(tmp_path):
    first = pretrain(micro_config(tmp_path / "a"))
    second = pretrain(micro_config(tmp_path / "b"))
    out_a, out_b = tmp_path / "a" / "policy", tmp_path / "b" / "policy"
    assert _tensors(out_a) == _tensors(out_b)  # same config, same bytes
    assert first["curve"] == second["curve"] and [r["step"] for r in first["curve"]] == [2, 3]
    assert first["held_out"] == {**second["held_out"], "seconds": first["held_out"]["seconds"],
                                 "episodes_per_minute": first["held_out"]["episodes_per_minute"]}
    # What ships: bf16 safetensors, config, tokenizer with its chat template, recipe.json, a model card.
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "recipe.json"):
        assert (out_a / name).is_file(), name
    st = SafetensorsFile(str(out_a / "model.safetensors"))
    assert {str(st.get(k).dtype) for k in st.keys()} == {"bfloat16"}
    model_config, _ = models.load_pretrained(str(out_a))
    assert (model_config.num_layers, model_config.hidden_size) == (1, 64)
    recipe = read_recipe(str(out_a))
    assert recipe["world"] == tiny.get_config().envs.world and recipe["num_envs"] == 16
    assert recipe["held_out"]["num_episodes"] == 4 and recipe["model_params"] == model_config.num_params
    card = (out_a / "README.md").read_text()
    assert "python -m experiments.pretrain" in card and f"{100 * recipe['held_out']['solve_f1']:.2f}" in card
    # Supervised data only from the training side of the partition; held-out from the other side.
    train, _ = read_samples(str(tmp_path / "a" / "envs" / "pretrain.jsonl"))
    held, _ = read_samples(str(tmp_path / "a" / "envs" / "held_out.jsonl"))
    question = lambda s: s.messages[0]["content"].rsplit("Question: ", 1)[-1]  # noqa: E731
    assert all(splits.is_training(question(s)) for s in train)
    assert all(splits.is_held_out(question(s)) for s in held)
    # A run resumed after its last step trains no more and writes the same policy and a complete record; a curve
    # point logged twice (a step replayed after a kill) counts once, the later record winning.
    metrics = tmp_path / "a" / "metrics.jsonl"
    replayed = [json.loads(line) for line in metrics.read_text().splitlines() if '"pretrain_eval"' in line][-1]
    with open(metrics, "a") as f:
        f.write(json.dumps(replayed) + "\n")
    config = micro_config(tmp_path / "a")
    config.resume = True
    again = pretrain(config)
    assert _tensors(out_a) == _tensors(out_b) and again["num_examples"] == first["num_examples"]
    assert first["num_examples"] + first["dropped_too_long"] == 16 and again["dropped_too_long"] == first["dropped_too_long"]
    assert json.loads((out_a / "recipe.json").read_text())["curve"] == first["curve"]


def test_recipe_refuses_bad_settings_and_an_existing_run(tmp_path):
    config = micro_config(tmp_path)
    config.train.warmup_steps = 3
    with pytest.raises(PretrainError, match=r"warmup_steps=3 must be in \[0, train.num_steps=3\)"):
        check_config(config)
    config = micro_config(tmp_path)
    config.tokenizer.pretokenizer = "Stable_Names"
    with pytest.raises(PretrainError, match="pretokenizer='Stable_Names'; use one of.*stable_names"):
        check_config(config)
    config = micro_config(tmp_path)
    config.envs.num = 0
    with pytest.raises(PretrainError, match="config.envs.num=0"):
        check_config(config)
    os.makedirs(tmp_path / "checkpoints" / "pretrain" / "3")  # a saved step
    with pytest.raises(PretrainError, match="--config.resume=True"):
        pretrain(micro_config(tmp_path))


def test_recipe_guards_its_output_its_data_and_its_lengths(tmp_path):
    from ftrl_jax.pipeline.main_job import TrainingError
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("not a policy")
    config = micro_config(tmp_path / "run")
    config.output = str(keep)
    with pytest.raises(PretrainError, match="non-empty directory that holds no recipe.json"):
        pretrain(config)
    assert (keep / "notes.txt").read_text() == "not a policy"
    config.output = str(tmp_path)
    with pytest.raises(PretrainError, match="contains the run directory"):
        pretrain(config)
    # Too short a max_len names the recipe's own setting.
    config = micro_config(tmp_path / "run")
    config.train.max_len = 8
    with pytest.raises(TrainingError, match="raise train.max_len"):
        pretrain(config)
    config.train.max_len = 4  # nothing was trained, so a corrected rerun needs no resume (this one fails again)
    with pytest.raises(TrainingError, match="raise train.max_len"):
        pretrain(config)
    # The run directory's environments and tokenizer were made with envs.num=16: another value is refused.
    config = micro_config(tmp_path / "run")
    config.envs.num = 32
    config.resume = True
    with pytest.raises(PretrainError, match=r"made with other settings \(envs\)"):
        pretrain(config)
    # A run directory from before `tokenizer.pretokenizer` existed was made with Qwen2's split.
    settings_file = tmp_path / "run" / "data_settings.json"
    made_with = json.loads(settings_file.read_text())
    del made_with["pretokenizer"]
    settings_file.write_text(json.dumps(made_with))
    config = micro_config(tmp_path / "run")
    config.tokenizer.pretokenizer = "qwen2"
    _check_data_settings(config, str(tmp_path / "run"))
    config.tokenizer.pretokenizer = "stable_names"
    with pytest.raises(PretrainError, match=r"other settings \(pretokenizer\)"):
        _check_data_settings(config, str(tmp_path / "run"))


@pytest.fixture(scope="module")
def start_run(tmp_path_factory):
    """The run directory of a 2-step micro recipe; its policy is WORKDIR/policy."""
    workdir = tmp_path_factory.mktemp("start")
    config = micro_config(workdir, num_steps=2)
    config.eval.every = 0
    pretrain(config)
    return workdir


def test_recipe_continues_from_a_policy_directory(tmp_path, start_run):
    init = start_run / "policy"
    config = micro_config(tmp_path / "b", num_steps=2)
    config.init = str(init)
    config.model.overrides = "num_layers=3"  # not used: the architecture is the starting policy's
    config.envs.seed = 7  # other supervised environments than the starting policy's
    recipe = pretrain(config)
    out = tmp_path / "b" / "policy"
    assert (out / "tokenizer.json").read_text() == (init / "tokenizer.json").read_text()
    model_config, _ = models.load_pretrained(str(out))
    assert (model_config.num_layers, model_config.hidden_size) == (1, 64)
    before, after = _tensors(init), _tensors(out)
    assert before.keys() == after.keys() and before != after  # trained further
    assert recipe["init_recipe"] == read_recipe(str(init)) and recipe["init"] == str(init)
    assert f"continued from `{init}`" in (out / "README.md").read_text()
    # A resumed run continues from its own checkpoint and writes the same bytes.
    config.resume = True
    pretrain(config)
    assert _tensors(out) == after
    # The weights trained are the starting policy's: at learning rate 0 the export is its bytes.
    frozen = micro_config(tmp_path / "c", num_steps=2)
    frozen.init, frozen.train.learning_rate, frozen.eval.every = str(init), 0.0, 0
    pretrain(frozen)
    assert _tensors(tmp_path / "c" / "policy") == before
    # The run directory remembers what it continued from.
    config.init = ""
    with pytest.raises(PretrainError, match=r"other settings \(init\)"):
        _check_data_settings(config, str(tmp_path / "b"))


def test_recipe_refuses_a_start_it_cannot_continue(tmp_path, start_run):
    config = micro_config(tmp_path / "b")
    for init, message in ((tmp_path / "none", "is not a directory"),
                          (start_run, r"run directory of this recipe, not a policy; use .*/policy")):
        config.init = str(init)
        with pytest.raises(PretrainError, match=message):
            check_config(config)
    partial = tmp_path / "weights_only"
    partial.mkdir()
    for name in ("config.json", "model.safetensors"):
        (partial / name).write_bytes((start_run / "policy" / name).read_bytes())
    config.init = str(partial)
    with pytest.raises(PretrainError, match=r"has no tokenizer \(tokenizer.json\)"):
        check_config(config)
    config.init = str(start_run / "policy")
    config.model.template = "qwen3"
    with pytest.raises(PretrainError, match="trained with the 'qwen2.5' chat format.*--config.model.template=qwen2.5"):
        check_config(config)
    config.model.template = "qwen2.5"
    config.output = config.init
    with pytest.raises(PretrainError, match="is the starting policy"):
        pretrain(config)
    assert not (tmp_path / "b").exists()  # the run refused before writing anything
