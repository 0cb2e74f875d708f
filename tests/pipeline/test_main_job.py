"""The main job end to end on a micro configuration: outputs, config errors, and exact resume."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from configs import qwen
from ftrl_jax.models.checkpoint_io import SafetensorsFile
from ftrl_jax.envs.samples import environment_key, read_samples
from ftrl_jax.envs import build
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.envs.samples import write_samples
from ftrl_jax.envs.world import TINY_WORLD
from ftrl_jax.pipeline import main_job
from ftrl_jax.pipeline.main_job import (TrainingError, build_split, check_config, check_oracle_plans,
                                        collect_prompt_pool, parse_overrides, policy_training_prompts,
                                        prepare_validation, sample_rl_prompts, split_train_environments,
                                        train_and_evaluate)
from ftrl_jax.pipeline.selection import ValidationSelection


def micro_config(workdir, **rl):
    c = qwen.get_config(qwen.TINY_INSTRUCT)
    c.workdir = str(workdir)
    c.model.overrides = "num_layers=1,hidden_size=64,intermediate_size=128,num_heads=2,head_dim=32,num_kv_heads=1"
    c.tokenizer.vocab_size = 600
    c.envs.num_train = 12
    c.envs.num_eval = 4
    c.envs.scenarios = "single_hop,multi_hop"
    c.warmup.num_steps = 3
    c.warmup.batch_size = 4
    c.rollout.max_new_tokens = 24
    c.rollout.max_turns = 2
    c.eval.max_new_tokens = 16
    c.eval.max_turns = 2
    c.eval.num_samples = 2
    c.eval.num_train_envs = 2
    c.eval.curve_every = 2
    c.eval.curve_envs = 2
    c.eval.bootstrap_resamples = 500
    c.rl.num_steps = rl.get("num_steps", 4)
    c.rl.prompts_per_step = 2
    c.rl.num_rollouts = 2
    c.rl.refresh_every = 2
    c.checkpoint.every = 1
    c.resume = rl.get("resume", False)
    return c


def _export_tensors(workdir):
    st = SafetensorsFile(os.path.join(workdir, "export", "model.safetensors"))
    return {k: np.array(st.get(k)) for k in st.keys()}


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
    # The three runs below compile the same shapes; a persistent cache makes the later ones cheap.
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", old)


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path):
    straight = train_and_evaluate(micro_config(tmp_path / "straight", num_steps=4))
    train_and_evaluate(micro_config(tmp_path / "resumed", num_steps=2))
    resumed = train_and_evaluate(micro_config(tmp_path / "resumed", num_steps=4, resume=True))

    a, b = _export_tensors(tmp_path / "straight"), _export_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for key in ("solve_precision", "solve_rate", "solve_f1", "by_scenario", "end_reasons", "episodes"):
        assert straight["eval_after"][key] == resumed["eval_after"][key]
    for key in ("solve_f1", "by_scenario", "end_reasons"):
        assert straight["eval_after"]["train_subset"][key] == resumed["eval_after"]["train_subset"][key]
    for key in ("solve_f1", "best_solve_f1", "environments"):  # sampled with a fixed seed
        assert straight["eval_after"]["sampled"][key] == resumed["eval_after"]["sampled"][key]
    assert straight["paired_delta"] == resumed["paired_delta"]

    # What the run leaves behind.
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    for phase in ("eval_before", "eval_after"):
        assert {"solve_precision", "solve_rate", "solve_f1"} <= summary[phase].keys()
    _assert_evaluation_extras(tmp_path / "straight", summary)
    lines = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    rl = [l for l in lines if l["phase"] == "rl"]
    # The held-out curve: before RL and after the last step from the full evaluations, step 2 measured.
    curve = [l for l in lines if l["phase"] == "eval_curve"]
    assert [l["step"] for l in curve] == [0, 2, 4] and [l["num_envs"] for l in curve] == [2, 2, 2]
    assert "seconds" in curve[1] and "seconds" not in curve[0]
    assert curve[0]["solve_f1"] == _first_envs_f1(summary["eval_before"], 2)
    assert curve[2]["solve_f1"] == _first_envs_f1(summary["eval_after"], 2)
    assert [l["step"] for l in rl] == [1, 2, 3, 4]
    assert {"reward_mean", "reward_std", "groups_mixed", "reward_positive", "positive_advantage_on_failures", "kl",
            "entropy", "clip_fraction", "grad_norm", "response_length", "tokens_per_sec", "padded_tokens",
            "step_time"} <= rl[0].keys()
    assert os.listdir(tmp_path / "straight" / "tb")
    assert (tmp_path / "straight" / "export" / "tokenizer.json").is_file()
    # Starting again without resume=True refuses to overwrite the run.
    with pytest.raises(TrainingError, match="resume=True"):
        train_and_evaluate(micro_config(tmp_path / "straight", num_steps=4))

    # experiments.sample's stage: the trained policy plays training environments; FTRL's RL prompts go to a file.
    out = tmp_path / "prompts.jsonl"
    stats = sample_rl_prompts(micro_config(tmp_path / "straight"), str(out), num_envs=3)
    assert stats["policy"].endswith("export") and stats["episodes"] == 3
    prompts, errors = read_samples(out)
    assert not errors and len(prompts) == stats["prompts"] == 3 + stats["after_tool_calls"]
    train, _ = read_samples(tmp_path / "straight" / "envs" / "train.jsonl")
    fresh = [p for p in prompts if p.messages == train[0].messages or p.messages == train[1].messages
             or p.messages == train[2].messages]
    assert len(fresh) == 3  # each played environment's fresh question is one prompt
    for p in prompts:
        assert 0.0 <= p.solve_rate <= 1.0 and p.messages[-1]["role"] in ("user", "tool")


def _first_envs_f1(evaluation, n):
    """Solve-F1 averaged over scenario types of the first n held-out episodes."""
    by_type = {}
    for row in evaluation["episodes"][:n]:
        by_type.setdefault(row["data_source"], []).append(row["solve_f1"])
    return float(np.mean([np.mean(v) for v in by_type.values()]))


def _assert_evaluation_extras(workdir, summary):
    """The summary's sampled, training-subset and paired figures, and the report and PNGs next to it."""
    for phase in ("eval_before", "eval_after"):
        evaluation = summary[phase]
        assert len(evaluation["episodes"]) == summary["num_eval_envs"] == 4
        held_out, _ = read_samples(workdir / "envs" / "eval.jsonl")
        assert [row["env_key"] for row in evaluation["episodes"]] == [environment_key(s) for s in held_out]
        sampled = evaluation["sampled"]
        assert sampled["num_samples"] == 2 and sampled["num_episodes"] == 8 and len(sampled["environments"]) == 4
        assert [row["env_key"] for row in sampled["environments"]] == [environment_key(s) for s in held_out]
        assert 0.0 <= sampled["solve_f1"] <= sampled["best_solve_f1"] <= 1.0
        assert {"self/single_hop", "self/multi_hop"} == sampled["by_scenario"].keys()
        assert evaluation["train_subset"]["num_episodes"] == 2 and evaluation["seconds"] > 0
    delta = summary["paired_delta"]["greedy_solve_f1"]
    assert delta["num_pairs"] == 4 and delta["pairs_by_stratum"] == {"self/multi_hop": 2, "self/single_hop": 2}
    assert delta["low"] <= delta["delta"] <= delta["high"] and delta["num_resamples"] == 500
    assert delta["delta"] == pytest.approx(summary["eval_after"]["solve_f1"] - summary["eval_before"]["solve_f1"])
    assert summary["paired_delta"]["sampled_solve_f1"]["num_pairs"] == 4
    assert {"greedy", "sampled", "train_subset", "curve"} == summary["eval_seconds"].keys()
    assert summary["files"] == {"learning_curves": "learning_curves.png", "scenario_bars": "scenario_bars.png",
                                "report": "report.md"}
    for name in ("learning_curves.png", "scenario_bars.png"):
        assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (workdir / "report.md").read_text()
    assert "](learning_curves.png)" in text and "](scenario_bars.png)" in text
    assert "sampled Solve-F1, best of 2" in text and "500 resamples" in text


def test_sampling_without_a_policy_says_where_one_comes_from(tmp_path):
    with pytest.raises(TrainingError, match="run the main job first"):
        sample_rl_prompts(micro_config(tmp_path / "empty"), str(tmp_path / "out.jsonl"))


def test_config_errors_are_clear_before_anything_heavy(tmp_path):
    with pytest.raises(ValueError, match="available: tiny"):
        qwen.get_config("qwen9-1b")
    c = qwen.get_config("qwen3-8b")
    with pytest.raises(TrainingError, match="--config.model.path"):
        check_config(c)
    c = micro_config(tmp_path)
    c.mesh.data = 2
    with pytest.raises(TrainingError, match="devices"):
        check_config(c)
    c = micro_config(tmp_path)
    c.rl.algorithm = "ppo2"
    with pytest.raises(TrainingError, match="grpo"):
        check_config(c)
    c = micro_config(tmp_path)
    c.rl.num_rollouts = 1  # a group of one: every group-baseline estimator gives advantage 0 to every sequence
    for algorithm in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"):
        c.rl.algorithm = algorithm
        with pytest.raises(TrainingError, match=f"algorithm='{algorithm}' takes its baseline.*num_rollouts=N.*"
                                                r"without groups \(.*reinforce_pp.*rft.*\)"):
            check_config(c)
    c.rl.algorithm = "reinforce_pp"
    check_config(c)
    prompts_per_step = c.rl.prompts_per_step
    c.rl.prompts_per_step = 1
    with pytest.raises(TrainingError, match="reinforce_pp' whitens .* batch of one sequence.* raise either"):
        check_config(c)
    c.rl.num_rollouts = 2  # one prompt, two sequences: whitening has a spread to work with
    check_config(c)
    c.rl.prompts_per_step, c.rl.num_rollouts = prompts_per_step, 1
    c.rl.num_rollouts = 0
    with pytest.raises(TrainingError, match="num_rollouts=0 .* must both be at least 1"):
        check_config(c)
    c.rl.num_rollouts, c.rl.prompts_per_step = 8, 0
    with pytest.raises(TrainingError, match="prompts_per_step=0 must both be at least 1"):
        check_config(c)
    c = micro_config(tmp_path)
    c.tokenizer.pretokenizer = "gpt2"
    with pytest.raises(TrainingError, match="pretokenizer='gpt2'; use one of.*stable_names"):
        check_config(c)
    c = micro_config(tmp_path)
    c.eval.curve_envs = -1
    with pytest.raises(TrainingError, match="eval.curve_envs=-1"):
        check_config(c)
    c = micro_config(tmp_path)
    c.eval.select = "best"
    with pytest.raises(TrainingError, match="eval.select='best'; use one of.*validation"):
        check_config(c)
    c.eval.select = "validation"
    with pytest.raises(TrainingError, match="but eval.validation_envs=0: set it above 0"):
        check_config(c)
    c.eval.validation_envs = 4
    check_config(c)
    c.envs.validation_file = str(tmp_path / "missing.jsonl")
    with pytest.raises(TrainingError, match="missing.jsonl' does not exist"):
        check_config(c)
    c.eval.select, c.eval.validation_every = "last", 0
    with pytest.raises(TrainingError, match="never be scored with eval.validation_every=0"):
        check_config(c)
    c.eval.validation_envs = 0
    with pytest.raises(TrainingError, match="validation_file=.* is read only with eval.validation_envs > 0"):
        check_config(c)
    c = micro_config(tmp_path)
    c.rollout.temperature = 0.0
    with pytest.raises(TrainingError, match="eval.num_samples=0"):
        check_config(c)
    c.eval.num_samples = 0
    check_config(c)


class _MiddleStepWins(ValidationSelection):
    """Scores as the main job does, then reports step 1 as the best (the micro model's own scores tie at 0)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        real = self._score
        self._score = lambda step, params: {**real(step, params), "solve_f1": {0: 0.1, 1: 0.5, 2: 0.2}[step]}


def test_validation_selects_the_policy_that_is_evaluated_and_exported(tmp_path, monkeypatch):
    monkeypatch.setattr(main_job, "ValidationSelection", _MiddleStepWins)
    c = micro_config(tmp_path / "sel", num_steps=2)
    c.eval.num_samples, c.eval.num_train_envs, c.eval.curve_every = 0, 0, 0
    c.eval.validation_envs, c.eval.validation_every, c.eval.select = 4, 1, "validation"
    summary = train_and_evaluate(c)
    workdir = tmp_path / "sel"
    # Validation: training-side questions of neither the training nor the held-out environments, balanced.
    validation, _ = read_samples(workdir / "envs" / "validation.jsonl")
    train, _ = read_samples(workdir / "envs" / "train.jsonl")
    held_out, _ = read_samples(workdir / "envs" / "eval.jsonl")
    prompts = {s.messages[0]["content"] for s in train + held_out}
    assert len(validation) == 4 and not prompts & {s.messages[0]["content"] for s in validation}
    assert sorted(s.data_source for s in validation) == ["self/multi_hop"] * 2 + ["self/single_hop"] * 2
    points = summary["validation"]["points"]
    assert [p["step"] for p in points] == [0, 1, 2] and summary["validation"]["num_envs"] == 4
    assert [p["solve_f1"] for p in points] == [0.1, 0.5, 0.2] and all(p["seconds"] > 0 for p in points)
    assert summary["selected_step"] == summary["validation"]["best_step"] == 1
    assert summary["select"] == "validation" and summary["eval_seconds"]["validation"] > 0
    # The exported policy is step 1's: what validation_best holds, neither the start nor the last step.
    best = SafetensorsFile(os.path.join(workdir, "validation_best", "step_1", "model.safetensors"))
    start = SafetensorsFile(os.path.join(workdir, "warmstart", "model.safetensors"))
    exported = _export_tensors(workdir)
    for name in exported:
        np.testing.assert_array_equal(exported[name], np.array(best.get(name)), err_msg=name)
    assert any(not np.array_equal(exported[n], np.array(start.get(n))) for n in exported)
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if l["phase"] == "validation"] == [0, 1, 2]
    assert [l["selected_step"] for l in lines if l["phase"] == "eval_after"] == [1]
    assert "After RL is the policy of step 1 of 2" in (workdir / "report.md").read_text()
    # Resuming the finished run scores nothing again and selects the same step.
    c.resume = True
    again = train_and_evaluate(c)
    assert again["validation"]["points"] == points and again["selected_step"] == 1
    assert again["eval_after"]["episodes"] == summary["eval_after"]["episodes"]
    # Asking for more validation environments on resume is refused (the file holds 4), before any evaluation.
    c.eval.validation_envs = 8
    with pytest.raises(TrainingError, match="num_envs=4 and validation fingerprint"):
        train_and_evaluate(c)
    # The last step's policy differs from the exported one: a run without selection exports another policy.
    c_last = micro_config(tmp_path / "last", num_steps=2)
    c_last.eval.num_samples, c_last.eval.num_train_envs, c_last.eval.curve_every = 0, 0, 0
    c_last.eval.validation_envs, c_last.eval.validation_every = 4, 1
    last = train_and_evaluate(c_last)
    assert last["selected_step"] == 2 and last["validation"]["best_step"] == 1
    assert not (tmp_path / "last" / "validation_best").exists()  # select=last keeps no copy
    last_export = _export_tensors(tmp_path / "last")
    assert any(not np.array_equal(exported[n], last_export[n]) for n in exported)


def test_a_given_validation_file_is_balanced_and_loses_held_out_and_training_questions(tmp_path, caplog):
    common = dict(kinds=["single_hop", "multi_hop"], complexity="low", world=TINY_WORLD)
    with Sandbox() as sandbox:
        train = build_split("train", 6, 1, sandbox=sandbox, **common)
        held_out = build_split("eval", 4, 2, sandbox=sandbox, **common)
        exclude = [s.messages[0]["content"] for s in train + held_out]
        fresh = build_split("validation", 4, 3, exclude=exclude, sandbox=sandbox, **common)
        path = tmp_path / "validation.jsonl"
        by_type = sorted(fresh, key=lambda s: s.data_source)  # single-hop ones last
        write_samples(path, held_out[:2] + train[:2] + by_type)
        c = micro_config(tmp_path)
        c.envs.validation_file, c.eval.validation_envs = str(path), 2
        with caplog.at_level("WARNING"):
            got = prepare_validation(c, str(tmp_path), train, held_out, sandbox)
    assert "skipping 4 of the 8 validation environments" in caplog.text
    assert [s.data_source for s in got] == ["self/multi_hop", "self/single_hop"]
    assert {s.messages[0]["content"] for s in got} <= {s.messages[0]["content"] for s in fresh}
    # A held-out question under another instruction: dropped from a procedural source, kept from another one
    # (the partition is defined for procedural questions only).
    question = held_out[0].messages[0]["content"].rsplit("Question: ", 1)[-1]
    reworded = dataclasses.replace(held_out[0], messages=[{"role": "user", "content": "Answer. Question: " + question}])
    external = dataclasses.replace(reworded, data_source="ext/single_hop")
    write_samples(path, [reworded, external])
    c.eval.validation_envs = 4
    assert [s.data_source for s in prepare_validation(c, str(tmp_path), train, held_out, None)] == ["ext/single_hop"]
    write_samples(path, held_out)
    with pytest.raises(TrainingError, match="no validation environment in .* is training-side"):
        prepare_validation(c, str(tmp_path), train, held_out, None)


def test_validation_never_asks_what_the_starting_policy_was_trained_on(tmp_path):
    """A policy made by experiments.pretrain names its data in recipe.json; those prompts are rebuilt and kept
    out of validation, with those of the policy it continued (its `init_recipe`)."""
    kinds = "single_hop,multi_hop"
    parent = {"world": TINY_WORLD, "config": {"envs": {"num": 5, "seed": 11, "scenarios": kinds, "complexity": "low"}}}
    child = {"world": TINY_WORLD, "config": {"envs": {"num": 5, "seed": 12, "scenarios": kinds, "complexity": "low"}},
             "init": "/gone/parent", "init_recipe": parent}  # the parent's directory need not exist
    (tmp_path / "child").mkdir()
    (tmp_path / "child" / "recipe.json").write_text(json.dumps(child))
    c = micro_config(tmp_path)
    c.model.path, c.warmup.num_steps = str(tmp_path / "child"), 0
    with Sandbox() as sandbox:
        prompts = policy_training_prompts(c, sandbox)
        common = dict(kinds=kinds.split(","), complexity="low", world=TINY_WORLD, sandbox=sandbox)
        expected = build_split("train", 5, 11, **common) + build_split("train", 5, 12, **common)
    assert prompts == {s.messages[0]["content"] for s in expected} and len(prompts) > 5
    c.warmup.num_steps = 3  # trains from scratch: nothing to rebuild (the default path is then unused)
    c.model.path = qwen.get_config(qwen.TINY_INSTRUCT).model.path
    assert policy_training_prompts(c) == set()
    (tmp_path / "child" / "recipe.json").write_text(json.dumps({"world": TINY_WORLD, "config": {}}))
    c.model.path, c.warmup.num_steps = str(tmp_path / "child"), 0
    with pytest.raises(TrainingError, match="does not say how its environments were built"):
        policy_training_prompts(c)


def test_rl_starts_on_the_environments_the_warm_start_did_not_imitate(tmp_path):
    config = micro_config(tmp_path)
    train = [f"env{i}" for i in range(10)]
    config.warmup.fraction_of_envs = 0.3
    seen, rl_order = split_train_environments(config, train)
    assert seen == train[:3]
    assert rl_order == train[3:] + train[:3]  # every environment, the unseen ones first
    config.warmup.num_steps = 0  # no warm start (a real checkpoint): RL plays them in order
    assert split_train_environments(config, train) == ([], train)


def test_parse_overrides():
    assert parse_overrides("num_layers=2, hidden_size=128,dtype=bfloat16") == {
        "num_layers": 2, "hidden_size": 128, "dtype": "bfloat16"}
    with pytest.raises(TrainingError, match="key=value"):
        parse_overrides("num_layers")


def test_non_finite_loss_stops_the_run_with_what_to_do():
    from ftrl_jax.pipeline.main_job import _finite_loss
    assert _finite_loss({"loss": np.float32(1.5)}, "RL", 3, "/w/ck", "rl.learning_rate") == 1.5
    with pytest.raises(TrainingError, match="RL loss is nan at step 3.*/w/ck.*lower rl.learning_rate"):
        _finite_loss({"loss": np.float32("nan")}, "RL", 3, "/w/ck", "rl.learning_rate")


def test_initial_prompt_source_collects_each_fresh_question_once(tmp_path):
    c = micro_config(tmp_path)
    c.rl.prompt_source = "initial"
    c.rl.prompts_per_step, c.rl.refresh_every = 2, 2  # 4 environments per collection: each step's prompts once
    with Sandbox(num_workers=1) as sandbox:
        environments, _ = build.build_environments(5, seed=3, sandbox=sandbox, batch_size=5)
        train = [env.to_sample() for env in environments]
        # No model is needed: nothing is played.
        pool, cursor, episodes = collect_prompt_pool(c, None, None, None, None, train, 3, sandbox, seed=0)
    assert cursor == 2 and episodes == []
    visited = [train[3], train[4], train[0], train[1]]
    by_question = {env.messages[-1]["content"]: env for env in visited}
    assert len(by_question) == 4 and sorted(p.messages[-1]["content"] for p in pool) == sorted(by_question)
    for prompt in pool:  # the environment's own first state: its messages, unsolved set and solve rate
        env = by_question[prompt.messages[-1]["content"]]
        assert (prompt.messages, prompt.unsolved_set, prompt.solve_rate) == (env.messages, env.unsolved_set,
                                                                              env.solve_rate)
    # With dynamic sampling's rounds, a collection covers every round of its steps: 8 questions, more than the 5
    # environments hold (an error), then from a training list long enough (here the 5 and 3 of them again).
    c.rl.dynamic_sampling, c.rl.max_sampling_rounds = True, 2
    with pytest.raises(TrainingError, match="draws 8 distinct fresh questions.*there are 5 training environments"):
        collect_prompt_pool(c, None, None, None, None, train, 0, None, seed=0)
    pool, cursor, _ = collect_prompt_pool(c, None, None, None, None, train + train[:3], 0, None, seed=0)
    assert len(pool) == 8 and cursor == 0
    check_config(c)
    c.rl.mode = "trajectory"
    with pytest.raises(TrainingError, match="use --config.rl.prompt_source=policy"):
        check_config(c)


def test_oracle_prompt_source_collects_the_states_along_each_oracle_plan(tmp_path):
    c = micro_config(tmp_path)
    c.rl.prompt_source = "oracle"
    c.rl.prompts_per_step, c.rl.refresh_every = 3, 2  # 3 environments per collection
    with Sandbox(num_workers=1) as sandbox:
        environments, _ = build.build_environments(5, seed=3, sandbox=sandbox, batch_size=5)
        train = [env.to_sample() for env in environments]
        # No model is needed: the oracle plays.
        pool, cursor, episodes = collect_prompt_pool(c, None, None, None, None, train, 4, sandbox, seed=0)
        assert cursor == 2 and episodes == []
        visited = [train[4], train[0], train[1]]
        assert len(pool) == sum(len(env.oracle_calls) + 1 for env in visited)
        assert [p.solve_rate for p in pool].count(1.0) == 3  # one finished state per environment
        assert {p.messages[0]["content"] for p in pool} == {env.messages[0]["content"] for env in visited}
        no_plan = [dataclasses.replace(env, oracle_calls=None) for env in train]
        with pytest.raises(TrainingError, match="needs environments with an oracle plan, and 3 of 3 have none"):
            collect_prompt_pool(c, None, None, None, None, no_plan, 0, sandbox, seed=0)
        with pytest.raises(TrainingError, match="1 of 5 have none"):
            check_oracle_plans(train[:2] + no_plan[2:3] + train[3:])
    check_config(c)
    c.rl.mode = "trajectory"
    with pytest.raises(TrainingError, match="use --config.rl.prompt_source=policy"):
        check_config(c)
    c.rl.prompt_source = "teacher"
    with pytest.raises(TrainingError, match="prompt_source='teacher'; use one of"):
        check_config(c)


def test_trajectory_mode_runs_and_its_shared_prefix_batch_gives_the_flat_update(tmp_path, monkeypatch):
    """Whole-trajectory RL end to end; each environment's first prompt stored once (rl.shared_prompt, the
    default) gives the flat layout's losses for fewer tokens."""
    real = main_job._sample_trajectory_groups

    def contrasting(config, policy, envs, sandbox):
        # Real episodes; rewards that differ within each group (a micro model solves nothing), so the policy
        # gradient, not only the entropy and KL terms, is compared.
        episodes, scores = real(config, policy, envs, sandbox)
        return episodes, np.arange(len(scores), dtype=np.float32) % 3 / 2

    monkeypatch.setattr(main_job, "_sample_trajectory_groups", contrasting)
    runs = {}
    for shared in (True, False):
        c = micro_config(tmp_path / str(shared), num_steps=1)
        c.rl.mode, c.rl.shared_prompt = "trajectory", shared
        c.rl.entropy_coef = 0.0  # the gradient is then the policy gradient's alone (KL's is 0 at the first update)
        c.eval.num_samples = c.eval.num_train_envs = c.eval.curve_every = 0
        train_and_evaluate(c)
        with open(os.path.join(c.workdir, "metrics.jsonl")) as f:
            runs[shared] = [row for row in map(json.loads, f) if row["phase"] == "rl"]
    (got,), (want,) = runs[True], runs[False]
    for name in ("reward_mean", "reward_std", "response_length", "response_tokens"):
        assert got[name] == want[name], name
    assert got["response_tokens"] > 0 and got["groups_mixed"] == 1.0 and got["grad_norm"] > 1e-3
    for name in ("loss", "pg_loss", "kl", "entropy", "grad_norm"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-7, err_msg=name)
    # The model ran each environment's first prompt once instead of once per episode.
    assert got["tokens_per_sec"] * got["step_time"] < want["tokens_per_sec"] * want["step_time"]
    assert got["padded_tokens"] < want["padded_tokens"]


def test_greedy_fails_filter_runs_and_logs_what_it_rejected(tmp_path, monkeypatch):
    from ftrl_jax.pipeline import main_job

    c = micro_config(tmp_path, num_steps=2)
    c.rl.dynamic_sampling, c.rl.prompt_filter, c.rl.max_sampling_rounds = True, "greedy_fails", 2
    c.eval.num_samples = c.eval.num_train_envs = c.eval.curve_every = 0
    calls = []
    real = main_job.greedy_solved

    def first_prompt_solved(config, greedy_policy, prompts, sandbox):
        # The real greedy check runs (a random micro model solves nothing); the first prompt asked about is then
        # declared solved, so the filter has something to reject.
        solved = real(config, greedy_policy, prompts, sandbox)
        assert greedy_policy.temperature == 0.0 and not solved.any()
        solved[0] = True
        weights = sum(float(np.abs(np.asarray(x)).sum()) for x in jax.tree.leaves(greedy_policy.params))
        calls.append((len(prompts), weights))
        return solved

    monkeypatch.setattr(main_job, "greedy_solved", first_prompt_solved)
    train_and_evaluate(c)
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        rl = [row for row in map(json.loads, f) if row["phase"] == "rl"]
    assert len(rl) == 2
    # Asked only about groups the rewards would keep, at most a round's prompts at a time; one rejection per call.
    assert calls and all(1 <= n <= c.rl.prompts_per_step for n, _ in calls)
    assert sum(row["groups_ineligible"] for row in rl) == len(calls)
    assert all(row["groups_ineligible"] >= 1 for row in rl)
    # The greedy turns come from the current policy: its weights differ between the two steps.
    assert len({checksum for _, checksum in calls}) >= 2


def test_rl_learning_rate_follows_its_schedule_and_bad_schedules_are_refused(tmp_path):
    c = micro_config(tmp_path, num_steps=3)
    c.rl.lr_schedule, c.rl.learning_rate, c.rl.num_minibatches = "cosine", 1e-3, 2
    c.eval.num_samples = c.eval.num_train_envs = c.eval.curve_every = 0
    train_and_evaluate(c)
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        rates = [row["learning_rate"] for row in map(json.loads, f) if row["phase"] == "rl"]
    # Cosine over 6 updates, two per step: 1e-3 * (1 + cos(pi * u / 6)) / 2 at update u; a step logs its last
    # update's (u = 1, 3, 5).
    np.testing.assert_allclose(rates, [1e-3 * (1 + np.cos(np.pi * u / 6)) / 2 for u in (1, 3, 5)], rtol=1e-5)

    c = micro_config(tmp_path)
    c.rl.lr_schedule = "linear"
    with pytest.raises(TrainingError, match="lr_schedule='linear'; use one of.*cosine"):
        check_config(c)
    c.rl.lr_schedule, c.rl.num_minibatches, c.rl.lr_warmup_steps = "cosine", 2, 8
    with pytest.raises(TrainingError, match="lr_warmup_steps=8 must be .* fewer than RL's 8 optimizer updates"):
        check_config(c)
    c.rl.lr_warmup_steps = 7
    check_config(c)
    c.rl.num_steps, c.rl.lr_warmup_steps = 0, 0  # no RL steps: still a valid schedule, nothing refused
    check_config(c)
