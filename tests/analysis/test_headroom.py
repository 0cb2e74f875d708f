"""analysis.headroom: greedy against sampled step rewards per state, and the command on the shipped policy."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from analysis import headroom
from configs import qwen
from ftrl_jax import policies
from ftrl_jax.envs.samples import write_samples
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.envs.world import TINY_WORLD
from ftrl_jax.pipeline import main_job


def test_figures_by_hand():
    # State 0: greedy succeeds, 1 of 4 samples does. State 1: greedy fails, 2 samples succeed (flippable).
    # State 2: greedy fails (a partial 0.5), no sample succeeds.
    greedy = np.array([1.0, 0.0, 0.5])
    sampled = np.array([[1.0, 0.0, 0.0, -0.3], [1.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    f = headroom.figures(greedy, sampled)
    assert f["states"] == 3 and f["num_samples"] == 4
    assert f["greedy_success"] == pytest.approx(1 / 3)
    assert f["best_of_k"] == pytest.approx(2 / 3)
    assert f["flippable"] == pytest.approx(1 / 3)
    assert f["sampled_success_greedy_succeeds"] == pytest.approx(1 / 4)
    assert f["sampled_success_greedy_fails"] == pytest.approx(2 / 8)
    assert f["successes_where_greedy_fails"] == pytest.approx(2 / 3)
    assert f["greedy_reward"] == pytest.approx(0.5)
    assert f["sampled_reward"] == pytest.approx(sampled.mean())
    # Every state's samples differ; all the above-mean reward is on samples scoring above zero.
    assert f["groups_mixed"] == 1.0 and f["positive_advantage_on_failures"] == 0.0
    # State 0: three samples scoring 0.0 sit 0.075 above a group mean lowered by a format penalty (-0.3); state 1's
    # two successes sit 0.5 above theirs. GRPO divides by each group's std (headroom: scale_by_std=True).
    g = headroom.figures(np.zeros(2), np.array([[0.0, 0.0, -0.3, 0.0], [1.0, 0.0, 0.0, 1.0]]))
    assert g["groups_mixed"] == 1.0
    penalty_group, success_group = 3 * 0.075 / np.std([0, 0, -0.3, 0]), 1.0 / np.std([1, 0, 0, 1])
    assert g["positive_advantage_on_failures"] == pytest.approx(penalty_group / (penalty_group + success_group))
    # A lower threshold counts the partial 0.5 turns as successes.
    assert headroom.figures(greedy, sampled, threshold=0.5)["greedy_success"] == pytest.approx(2 / 3)


def test_figures_without_successes_or_failures_say_none():
    f = headroom.figures(np.zeros(2), np.zeros((2, 3)))
    assert f["sampled_success_greedy_succeeds"] is None and f["successes_where_greedy_fails"] is None
    assert f["sampled_success_greedy_fails"] == 0.0 and f["flippable"] == 0.0


def test_figures_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        headroom.figures(np.zeros(2), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="shapes"):
        headroom.figures(np.zeros(0), np.zeros((0, 4)))
    with pytest.raises(ValueError, match="one source per state"):
        headroom.figures_by_source(np.zeros(2), np.zeros((2, 1)), ["a"])


def test_values_not_in_prompt_counts_every_string_value_and_returns_those_from_elsewhere():
    messages = [{"role": "user", "content": "Question: which river flows through Pretei?"},
                {"role": "tool", "content": None}]
    tools = [{"type": "function", "function": {"name": "city_info", "parameters": {"properties": {
        "field": {"type": "string", "enum": ["main_river", "mayor"]}}}}}]
    text = ('<tool_call>\n{"name": "city_info", "arguments": {"city_name": "Pretei", "field": "main_river"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "city_info", "arguments": {"city_name": "Zeirkville", '
            '"field": "main_river", "days": 3, "aliases": ["Pretei", "Old Pretei"]}}\n</tool_call>')
    count, elsewhere = headroom.values_not_in_prompt(text, messages, tools)
    assert count == 6  # numbers are not string values; strings in lists count
    assert elsewhere == ["Zeirkville", "Old Pretei"]
    assert headroom.values_not_in_prompt("The river is unknown.", messages, tools) == (0, [])


def test_values_not_in_prompt_reads_decoded_text_tool_results_and_earlier_calls():
    # Schemas, tool results and earlier calls are searched as decoded strings: a value with quotes or accents
    # that the prompt holds only in JSON-escaped form still counts as found.
    messages = [{"role": "user", "content": "Who runs the museum?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "lookup", "arguments": {"city": "Köln"}}}]},
                {"role": "tool", "content": json.dumps({"museum": 'Old "Royal" Hall'})}]
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"properties": {
        "field": {"type": "string", "enum": ["Café Müller"]}}}}}]
    call = {"name": "lookup", "arguments": {"museum": 'Old "Royal" Hall', "city": "Köln", "field": "Café Müller",
                                            "mayor": "Zed"}}
    text = f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>"
    assert headroom.values_not_in_prompt(text, messages, tools) == (4, ["Zed"])


def test_figures_by_source_groups_and_adds_all():
    table = headroom.figures_by_source(np.array([1.0, 0.0, 0.0]), np.array([[1.0], [1.0], [0.0]]), ["b", "a", "b"])
    assert list(table) == ["a", "b", "all"]
    assert table["a"]["flippable"] == 1.0 and table["b"]["states"] == 2 and table["all"]["states"] == 3


@pytest.fixture(scope="module")
def held_out_file(tmp_path_factory):
    with Sandbox() as sandbox:
        envs = main_job.build_split("eval", 4, 2, kinds=main_job._kinds(qwen.get_config()), complexity="low",
                                    world=TINY_WORLD, sandbox=sandbox)
    path = tmp_path_factory.mktemp("headroom") / "eval.jsonl"
    write_samples(path, envs)
    return str(path), envs


def test_command_at_temperature_zero_samples_the_greedy_turn(held_out_file, tmp_path, capsys):
    # Sampling at temperature 0 is greedy decoding: every sample is the greedy turn, so nothing is flippable
    # and the samples succeed exactly where greedy does.
    path, envs = held_out_file
    out = tmp_path / "h.json"
    rc = headroom.main(["prog", f"--model={policies.path('tiny-instruct')}", f"--data={path}", "--states=oracle",
                        "--temperature=0", "--num_samples=2", f"--output={out}"])
    assert rc == 0
    result = json.loads(out.read_text())
    greedy, sampled = np.array(result["greedy_rewards"]), np.array(result["sampled_rewards"])
    assert sampled.shape == (len(greedy), 2) and len(greedy) > len(envs)  # oracle plans have several states
    np.testing.assert_array_equal(sampled, np.stack([greedy, greedy], axis=1))
    everything = result["figures"]["all"]
    assert everything["best_of_k"] == everything["greedy_success"]
    assert set(result["figures"]) == {e.data_source for e in envs} | {"all"}
    # Each state names its environment and scenario type; every environment's question is a state.
    assert len(result["env_index"]) == len(result["data_source"]) == len(greedy) and result["states_too_long"] == 0
    assert sorted(set(result["env_index"])) == list(range(len(envs)))
    assert [result["data_source"][result["env_index"].index(i)] for i in range(len(envs))] == \
        [e.data_source for e in envs]
    assert result["reward_kind"] == "f1" and result["max_prompt_tokens"] == 1024
    # The greedy turns come back with the count of their string argument values from outside the prompt.
    assert len(result["greedy_texts"]) == len(greedy) and result["greedy_values"] > 0
    assert len(result["greedy_values_not_in_prompt"]) <= result["greedy_values"]
    writes = result["greedy_writes_value_not_in_prompt"]
    assert len(writes) == len(greedy) and (sum(writes) > 0) == bool(result["greedy_values_not_in_prompt"])
    fails = greedy < 1.0
    split = (f"in {sum(w for w, f in zip(writes, fails) if f)} of {int(fails.sum())} failing and "
             f"{sum(w for w, f in zip(writes, fails) if not f)} of {int((~fails).sum())} successful greedy turns")
    assert split in capsys.readouterr().out


def test_command_reports_bad_input(held_out_file, tmp_path, capsys):
    path, _ = held_out_file
    model = f"--model={policies.path('tiny-instruct')}"
    assert headroom.main(["prog", model, f"--data={tmp_path / 'missing.jsonl'}"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert headroom.main(["prog", model, f"--data={path}", f"--output={tmp_path / 'no' / 'x.json'}"]) == 2
    assert "not a writable directory" in capsys.readouterr().err
    assert headroom.main(["prog", model, f"--data={path}", "--states=later"]) == 2
    assert "initial" in capsys.readouterr().err
    assert headroom.main(["prog", model, f"--data={path}", f"--output={tmp_path}"]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert headroom.main(["prog", model, f"--data={path}", "--reward_kind=f2"]) == 2
    assert "f1_no_format_penalty" in capsys.readouterr().err
    assert headroom.main(["prog", model, f"--data={path}", "--max_prompt_tokens=8", "--num_samples=1"]) == 2
    assert "longer than --max_prompt_tokens=8" in capsys.readouterr().err


def test_oracle_states_need_oracle_plans(held_out_file, tmp_path, capsys):
    _, envs = held_out_file
    path = tmp_path / "no_plans.jsonl"
    write_samples(path, [dataclasses.replace(e, oracle_calls=None) for e in envs])
    assert headroom.main(["prog", f"--model={policies.path('tiny-instruct')}", f"--data={path}",
                          "--states=oracle"]) == 2
    assert "--states=initial" in capsys.readouterr().err
