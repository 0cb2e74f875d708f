"""The evaluation harness for data files (`ftrl_jax.rollout.harness`): final-answer checks, summaries, resumable
episode files, ToolHop scenarios."""

import json
import os

import pytest

from ftrl_jax.envs.samples import user_prompt
from ftrl_jax.rollout import harness
from ftrl_jax.text.tool_calls import format_qwen_tool_call

TOOLHOP = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "benchdata", "toolhop_100.jsonl")


# --- scoring and summaries (pure) ---------------------------------------------------------------


@pytest.mark.parametrize("messages,expected", [
    ([{"role": "assistant", "content": "It is Mary Lee."}], "final_answer"),
    ([{"role": "assistant", "content": format_qwen_tool_call("mother_of", {"person": "Ann"})},
      {"role": "tool", "content": "{\"mother\": \"Mary Lee\"}"}, {"role": "tool", "content": "nothing"},
      {"role": "assistant", "content": "Done."}], "tool_output"),
    # An earlier tool output does not count: only those right before the final turn.
    ([{"role": "tool", "content": "Mary Lee"}, {"role": "assistant", "content": "Hmm."},
      {"role": "assistant", "content": "Done."}], None),
    # An answer only thought of, or only passed as a call argument, is not given.
    ([{"role": "assistant", "content": "<think>Mary Lee?</think>I do not know."}], None),
    ([{"role": "assistant", "content": format_qwen_tool_call("check", {"name": "Mary Lee"})}], None),
    ([], None),
])
def test_final_answer_check(messages, expected):
    assert harness.final_answer_check(messages, "Mary Lee") == expected


def record(key, source, status="ok", end_reason="no_tool_call", **metrics):
    return {"key": key, "data_source": source, "scenario": key.split("/")[1], "status": status,
            "end_reason": end_reason, "metrics": metrics}


def test_failed_episodes_stay_out_of_the_means_and_too_long_ones_are_counted():
    records = [
        record("0/solve", "self/single_hop", solve_precision=1.0, solve_rate=1.0, solve_f1=1.0),
        record("1/solve", "self/single_hop", end_reason="prompt_too_long", solve_precision=1.0, solve_rate=0.0,
               solve_f1=0.0),
        record("2/solve", "self/single_hop", status="failed"),
        record("3/solve", "self/multi_hop", status="failed"),
    ]
    results = harness.summarize_solve(records)
    single = results["per_source"]["self/single_hop"]
    assert single == {"solve_precision": 1.0, "solve_rate": 0.5, "solve_f1": 0.5, "count": 2.0,
                      "prompt_too_long": 1, "failed": 1}
    assert results["scenario_average"] == {"solve_precision": 1.0, "solve_rate": 0.5, "solve_f1": 0.5}
    assert results["scenario_average_fitting"] == {"solve_precision": 1.0, "solve_rate": 1.0, "solve_f1": 1.0}
    assert results["failed_by_source"] == {"self/single_hop": 1, "self/multi_hop": 1}
    table = "\n".join(harness.solve_table(results))
    assert "| self/single_hop | 2 | 100.00 | 50.00 | 50.00 | 1 | 1 |" in table
    assert "| self/multi_hop | 0 |  |  |  | 0 | 1 |" in table and "episodes whose prompt fitted" in table

    toolhop = harness.summarize_toolhop([
        record("0/direct", "toolhop/film", answer_correctness=1.0),
        record("1/direct", "toolhop/film", answer_correctness=0.0),
        record("0/mandatory", "toolhop/film", answer_correctness=1.0),
        record("1/mandatory", "toolhop/film", status="failed"),
    ])
    assert toolhop["per_scenario"] == {
        "direct": {"answer_correctness": 0.5, "count": 2, "prompt_too_long": 0, "failed": 0},
        "mandatory": {"answer_correctness": 1.0, "count": 1, "prompt_too_long": 0, "failed": 1}}
    assert toolhop["average"] == 0.75


def test_read_records_skips_cut_lines_and_later_lines_win(tmp_path):
    path = tmp_path / "episodes.jsonl"
    path.write_text(json.dumps({"key": "0/solve", "status": "failed"}) + "\n" + "{\"key\": \"1/so"  # cut mid-line
                    + "\n" + json.dumps({"key": "0/solve", "status": "ok"}) + "\n" + "[1]\n")
    records, problems = harness.read_records(str(path))
    assert records == {"0/solve": {"key": "0/solve", "status": "ok"}}
    assert len(problems) == 2 and ":2: unreadable line" in problems[0] and ":4: " in problems[1]


def test_toolhop_rows_become_three_scenarios():
    if not os.path.exists(TOOLHOP):
        pytest.skip(f"{TOOLHOP} is absent (outside data, see shared/benchdata/README.md)")
    kind, tasks, errors = harness.load_tasks(TOOLHOP, limit=2)
    assert kind == "toolhop" and not errors
    assert [t.key for t in tasks] == ["0/direct", "0/mandatory", "0/free", "1/direct", "1/mandatory", "1/free"]
    direct, mandatory, free = tasks[:3]
    question = harness.question_of(mandatory.sample)
    assert question.startswith("What is the sum of all the digits") and direct.sample.answer == "15"
    assert direct.sample.tools == [] and direct.sample.codes == {} and direct.sample.unsolved_set == {}
    assert mandatory.sample.messages[0]["content"] == user_prompt(question) and mandatory.sample.tools
    assert free.sample.messages[0]["content"] == harness.FREE_INSTRUCTION + "Question: " + question
    assert free.sample.codes == mandatory.sample.codes
    _, only_free, _ = harness.load_tasks(TOOLHOP, scenarios=["free"], limit_per_source=1)
    assert all(t.scenario == "free" for t in only_free)
    assert len({t.sample.data_source for t in only_free}) == len(only_free) > 1
