"""FTRL's verifiable reward: hand-computed cases for matching, every step-reward branch and kind,
and the trajectory metrics."""

import json
import math

import pytest

from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.envs.samples import decode_sample, user_prompt
from ftrl_jax.envs.rewards import (
    FORMAT_PENALTY_SCALE,
    REWARD_KINDS,
    answer_matches,
    match_outputs,
    score_turn,
    step_reward,
    step_rewards,
    trajectory_metrics,
)
from ftrl_jax.text.tool_calls import format_qwen_tool_call, parse_assistant_turn

CODES = {
    "lake_finder": "def lake_finder(shape):\n    return 'Lake Crescent' if shape == 'crescent' else {'error': 'no lake'}\n",
    "mountain_height": (
        "def mountain_height(name):\n"
        "    heights = {'Olympic Mountains': '2,432'}\n"
        "    return {'name': name, 'height_m': heights.get(name, 'unknown')}\n"
    ),
    "year_of": "def year_of(event):\n    return {'birth of Dürer': 1471, 'opening': 1902}.get(event, 'unknown')\n",
    "echo": "def echo(text):\n    return text\n",
    "fails": "def fails():\n    raise RuntimeError('down')\n",
}
TOOLS = [
    {"type": "function", "function": {"name": name, "description": name, "parameters": {"type": "object", "properties": {}}}}
    for name in CODES
]
UNSOLVED = {"lake_finder": ["Lake Crescent"], "mountain_height": ["2,432"], "year_of": ["1471", "1902"]}
QUESTION = "What is the sum of the mountain's height and Dürer's birth year?"


def make_sample(unsolved=None, solve_rate=0.0, as_json=True):
    row = {
        "messages": [{"role": "user", "content": user_prompt(QUESTION)}],
        "tools": TOOLS,
        "codes": CODES,
        "unsolved_set": UNSOLVED if unsolved is None else unsolved,
        "answer": "3,903",
        "solve_rate": solve_rate,
        "data_source": "self/multi_hop",
        "split": "test",
    }
    if as_json:
        for field in ("tools", "codes", "unsolved_set"):
            row[field] = json.dumps(row[field], ensure_ascii=False)
    return row


def calls(*pairs, end="<|im_end|>"):
    return "\n".join(format_qwen_tool_call(name, arguments) for name, arguments in pairs) + end


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(num_workers=2, timeout=5.0) as box:
        yield box


# ---------------------------------------------------------------------------------------------
# answer_matches


@pytest.mark.parametrize(
    "output, expected, matches",
    [
        ("The capital of France is Paris", "Paris, France", True),  # parts in any order
        ("Paris", "Paris, France", False),  # every part is needed
        ("height: 2432 m", "2,432", True),  # commas ignored on both sides
        ("1,000,000 people", "1000000", True),
        ("LAKE crescent", "Lake Crescent", True),  # case ignored
        ("a b", "a,b", False),  # split on ", " only: "a,b" is one part, "ab"
        ("ab", "a,b", True),
        ({"height": "2,432 m"}, "2,432", True),  # dicts compared as JSON
        (["Lake Crescent", "Lake Quinault"], "Lake Quinault", True),
        ({"name": "Albrecht Dürer"}, "Dürer", True),  # non-ASCII JSON stays readable
        (1471, "1471", True),  # other values through str()
        ("anything at all", "", False),  # an empty expected answer matches nothing
        ("anything at all", "  ", False),
    ],
)
def test_answer_matches(output, expected, matches):
    assert answer_matches(output, expected) is matches


def test_match_outputs_consumes_each_answer_once_and_only_under_its_tool():
    pairs = [
        ("year_of", "1471"),
        ("year_of", "1471"),  # already consumed
        ("echo", "Lake Crescent"),  # right text, wrong tool
        ("year_of", "{\"year\": 1902}"),
        ("mountain_height", "unknown"),
    ]
    solved, remaining = match_outputs(pairs, UNSOLVED)
    assert solved == 2
    assert remaining == {"lake_finder": ["Lake Crescent"], "mountain_height": ["2,432"]}
    assert UNSOLVED["year_of"] == ["1471", "1902"]  # the input is not changed


# ---------------------------------------------------------------------------------------------
# step_reward with tool calls: tmp = calls that solved an answer, n = calls.

ONE_OF_TWO = calls(("lake_finder", {"shape": "crescent"}), ("mountain_height", {"name": "Everest"}))  # tmp 1, n 2


@pytest.mark.parametrize("kind, expected", [("f1", 2 / 3), ("precision", 0.5), ("rate", 1.0), ("pr", 0.5)])
def test_step_reward_kinds(sandbox, kind, expected):
    assert step_reward(ONE_OF_TWO, make_sample(), kind, sandbox=sandbox) == pytest.approx(expected)


def test_default_kind_is_f1(sandbox):
    assert step_reward(ONE_OF_TWO, make_sample(), sandbox=sandbox) == pytest.approx(2 / 3)
    assert set(REWARD_KINDS) == {"f1", "precision", "rate", "pr", "f1_no_format_penalty", "f1_half_format_penalty"}
    assert set(FORMAT_PENALTY_SCALE) <= set(REWARD_KINDS)  # a misspelt key would silently keep the penalties


@pytest.mark.parametrize("kind, scale", [("f1", 1.0), ("f1_no_format_penalty", 0.0), ("f1_half_format_penalty", 0.5)])
def test_score_turn_scales_the_format_penalties(kind, scale):
    empty = parse_assistant_turn("")
    broken = parse_assistant_turn('<tool_call>{"name": "lake_finder", "arguments": </tool_call>')
    assert broken.malformed and not broken.tool_calls
    unsolved = {"lake_finder": ["Lake Ora"]}
    assert score_turn(empty, [], unsolved, "3903", 0.0, kind) == pytest.approx(-0.5 * scale)
    assert score_turn(broken, [], unsolved, "3903", 0.0, kind) == pytest.approx(-0.3 * scale)


def test_step_reward_counts_each_expected_answer_once(sandbox):
    twice = calls(("lake_finder", {"shape": "crescent"}), ("lake_finder", {"shape": "crescent"}))
    assert step_reward(twice, make_sample(), "rate", sandbox=sandbox) == 1.0
    both_years = calls(("year_of", {"event": "birth of Dürer"}), ("year_of", {"event": "opening"}))
    assert step_reward(both_years, make_sample(), "f1", sandbox=sandbox) == pytest.approx(4 / 3)
    assert step_reward(both_years, make_sample(), "pr", sandbox=sandbox) == pytest.approx(2.0)


def test_step_reward_uses_the_current_unsolved_set(sandbox):
    solved_already = make_sample(unsolved={"mountain_height": ["2,432"], "year_of": ["1902"]})
    assert step_reward(calls(("lake_finder", {"shape": "crescent"})), solved_already, "rate", sandbox=sandbox) == 0.0


def test_failed_and_misattributed_calls_count_but_solve_nothing(sandbox):
    response = calls(("fails", {}), ("echo", {"text": "Lake Crescent"}), ("no_such_tool", {}),
                     ("lake_finder", {"shape": "crescent"}))
    assert step_reward(response, make_sample(), "precision", sandbox=sandbox) == pytest.approx(1 / 4)
    assert step_reward(response, make_sample(), "f1", sandbox=sandbox) == pytest.approx(2 / 5)


# ---------------------------------------------------------------------------------------------
# step_reward without tool calls.


@pytest.mark.parametrize(
    "response, reward",
    [
        ("", -0.5),
        ("  <|im_end|>", -0.5),
        ("<|endoftext|>", -0.5),
        ('<tool_call>{"name": "lake_finder", "arguments": </tool_call><|im_end|>', -0.3),  # not JSON
        ('<tool_call>{"name": "lake_finder"', -0.3),  # never closed
        ("I will call </tool_call> now", -0.3),
        ("The answer is 3903.<|im_end|>", 1 / (1 + 4)),  # 4 expected answers still unsolved
        ("I do not know.", 0.0),
    ],
)
@pytest.mark.parametrize("semantics", ["ftrl", "strict", "lenient"])
def test_turns_without_calls(sandbox, response, reward, semantics):
    assert step_reward(response, make_sample(), sandbox=sandbox, semantics=semantics) == pytest.approx(reward)


@pytest.mark.parametrize("semantics", ["ftrl", "strict", "lenient"])
def test_format_penalty_kinds_scale_only_the_format_penalties(sandbox, semantics):
    cases = [  # response, f1, f1_no_format_penalty, f1_half_format_penalty
        ("", -0.5, 0.0, -0.25),  # empty content
        ('<tool_call>{"name": "lake_finder", "arguments": </tool_call><|im_end|>', -0.3, 0.0, -0.15),  # broken markup
        ("The answer is 3903.<|im_end|>", 1 / (1 + 4), 1 / (1 + 4), 1 / (1 + 4)),  # the final-answer rule is unchanged
        ("I do not know.", 0.0, 0.0, 0.0),
        (ONE_OF_TWO, 2 / 3, 2 / 3, 2 / 3),  # turns with calls score as f1
    ]
    responses = [case[0] for case in cases]
    samples = [make_sample()] * len(cases)
    for column, kind in enumerate(("f1", "f1_no_format_penalty", "f1_half_format_penalty"), start=1):
        got = step_rewards(responses, samples, kind, sandbox=sandbox, semantics=semantics)
        assert got == pytest.approx([case[column] for case in cases]), kind
        assert step_reward("I do not know.", make_sample(solve_rate=1.0), kind, sandbox=sandbox,
                           semantics=semantics) == 0.5
    # A zeroed penalty is 0.0, not -0.0 (which would print as a negative reward).
    assert math.copysign(1.0, step_reward("", make_sample(), "f1_no_format_penalty", sandbox=sandbox,
                                          semantics=semantics)) == 1.0


@pytest.mark.parametrize("semantics", ["ftrl", "strict", "lenient"])
def test_a_truncated_turn_with_a_solving_call_gets_the_no_call_reward(sandbox, semantics):
    # Cut at max_new_tokens, its (complete) call is not run, as evaluation does not run it either.
    solving = calls(("lake_finder", {"shape": "crescent"}), end="")
    whole = step_rewards([solving], [make_sample()], sandbox=sandbox, semantics=semantics)
    assert whole == pytest.approx([1.0])
    for kind, reward in (("f1", -0.3), ("f1_no_format_penalty", 0.0), ("f1_half_format_penalty", -0.15)):
        got = step_rewards([solving], [make_sample()], kind, sandbox=sandbox, semantics=semantics, truncated=[True])
        assert got == pytest.approx([reward])


@pytest.mark.parametrize(
    "response, ftrl, outside_think",
    [
        # FTRL knows no <think> (ftrl_reward S7): the answer thought of counts there, not in strict / lenient.
        ("<think>It is 3903.</think>I do not know.", 1 / (1 + 4), 0.0),
        ("<think>Sum them: 3903.</think>\nThe answer is 3903.", 1 / (1 + 4), 1 / (1 + 4)),
        ("<think>Still thinking", 0.0, -0.5),  # cut off while thinking: no content outside the think block
        # A call only drafted while thinking is run by FTRL (lake_finder() lacks `shape`: 0 of 1 solved).
        ('<think><tool_call>{"name": "lake_finder", "arguments": {}}</tool_call></think>', 0.0, -0.5),
    ],
)
def test_think_blocks(sandbox, response, ftrl, outside_think):
    assert step_reward(response, make_sample(), sandbox=sandbox) == pytest.approx(ftrl)
    for semantics in ("strict", "lenient"):
        got = step_reward(response, make_sample(), sandbox=sandbox, semantics=semantics)
        assert got == pytest.approx(outside_think)


def test_final_answer_reward_shrinks_with_what_is_left_unsolved(sandbox):
    assert step_reward("3,903", make_sample(unsolved={"year_of": ["1902"]}), sandbox=sandbox) == pytest.approx(0.5)
    assert step_reward("3,903", make_sample(unsolved={}), sandbox=sandbox) == pytest.approx(1.0)


def test_no_answer_on_an_environment_solved_before_gets_half(sandbox):
    assert step_reward("I do not know.", make_sample(solve_rate=1.0), sandbox=sandbox) == 0.5
    assert step_reward("I do not know.", make_sample(solve_rate=0.5), sandbox=sandbox) == 0.0


def test_unknown_kind_lists_the_kinds(sandbox):
    with pytest.raises(ValueError, match=r"unknown reward kind 'recall'.*'f1'.*'pr'.*'precision'.*'rate'"):
        step_reward("", make_sample(), "recall", sandbox=sandbox)


def test_decoded_and_json_samples_score_the_same(sandbox):
    for response in (ONE_OF_TWO, "3903", ""):
        assert step_reward(response, make_sample(as_json=False), sandbox=sandbox) == step_reward(
            response, make_sample(as_json=True), sandbox=sandbox
        )
    assert step_reward(ONE_OF_TWO, decode_sample(make_sample()), sandbox=sandbox) == pytest.approx(2 / 3)


def test_step_rewards_batch_matches_one_at_a_time(sandbox):
    responses = [ONE_OF_TWO, "", "The answer is 3903", calls(("year_of", {"event": "opening"})), "no idea"]
    samples = [make_sample(), make_sample(), make_sample(unsolved={}), make_sample(), make_sample(solve_rate=1.0)]
    batch = step_rewards(responses, samples, "f1", sandbox=sandbox)
    assert batch == pytest.approx([2 / 3, -0.5, 1.0, 1.0, 0.5])
    assert batch == [step_reward(r, s, sandbox=sandbox) for r, s in zip(responses, samples)]
    with pytest.raises(ValueError, match="one sample per response"):
        step_rewards(responses, samples[:2], sandbox=sandbox)


# ---------------------------------------------------------------------------------------------
# trajectory_metrics


def episode():
    """Two assistant turns (OpenAI tool_calls, then markup), three calls, two answers solved."""
    return [
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "lake_finder", "arguments": '{"shape": "crescent"}'}},
            {"type": "function", "function": {"name": "year_of", "arguments": {"event": "unknown"}}},
        ]},
        {"role": "tool", "content": "Lake Crescent"},
        {"role": "tool", "content": "unknown"},
        {"role": "assistant", "content": format_qwen_tool_call("year_of", {"event": "birth of Dürer"})},
        {"role": "tool", "content": "1471"},
        {"role": "assistant", "content": "The sum is 3903."},
    ]


def test_trajectory_metrics_hand_computed():
    metrics = trajectory_metrics(episode(), make_sample())
    # c = 3 calls, s = 2 solved, u = 4 expected.
    assert metrics["solve_precision"] == pytest.approx(2 / 3)
    assert metrics["solve_rate"] == pytest.approx(2 / 4)
    assert metrics["solve_f1"] == pytest.approx(2 * 2 / (3 + 4))
    assert (metrics["num_calls"], metrics["num_solved"], metrics["num_expected"]) == (3, 2, 4)


def test_trajectory_metrics_accepts_the_whole_conversation():
    sample = make_sample()
    whole = [{"role": "user", "content": user_prompt(QUESTION)}] + episode()
    assert trajectory_metrics(whole, sample) == trajectory_metrics(episode(), sample)


def test_tool_responses_are_credited_to_their_own_call():
    # The year comes back for the lake_finder call: no credit, it was not lake_finder's answer.
    messages = [
        {"role": "assistant", "content": format_qwen_tool_call("lake_finder", {"shape": "round"})
         + format_qwen_tool_call("year_of", {"event": "opening"})},
        {"role": "tool", "content": "1902"},
        {"role": "tool", "content": "Lake Crescent"},
    ]
    assert trajectory_metrics(messages, make_sample())["num_solved"] == 0


def test_tool_responses_are_paired_with_their_call_by_id():
    # Two calls, answered in the other order; each response names its call: FTRL's evaluation pairs by id.
    sample = make_sample(unsolved={"capital_of": ["Tokyo"], "population_of": ["13,960,000"]})
    messages = [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_cap", "type": "function",
             "function": {"name": "capital_of", "arguments": '{"country": "Japan"}'}},
            {"id": "call_pop", "type": "function",
             "function": {"name": "population_of", "arguments": '{"city": "Tokyo"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_pop", "content": '{"population": "13,960,000"}'},
        {"role": "tool", "tool_call_id": "call_cap", "content": "Tokyo"},
    ]
    metrics = trajectory_metrics(messages, sample)
    assert (metrics["num_calls"], metrics["num_solved"], metrics["num_expected"]) == (2, 2, 2)
    assert metrics["solve_precision"] == metrics["solve_rate"] == metrics["solve_f1"] == 1.0
    # Without ids (or with an id no call has) the responses answer the calls in order: nothing is solved.
    for drop in ({"tool_call_id"}, set()):
        anonymous = [{k: v for k, v in m.items() if k not in drop} for m in messages]
        if not drop:
            anonymous[1]["tool_call_id"], anonymous[2]["tool_call_id"] = "call_x", "call_y"
        assert trajectory_metrics(anonymous, sample)["num_solved"] == 0


def test_calls_without_a_response_are_not_counted():
    # A truncated turn's calls are not run (rollout.episodes), so they are not calls made.
    cut = {"role": "assistant", "content": format_qwen_tool_call("lake_finder", {"shape": "crescent"})
           + "\n<tool_call>\n{\"name\": \"ye"}
    metrics = trajectory_metrics([cut], make_sample())
    assert (metrics["num_calls"], metrics["solve_precision"], metrics["solve_f1"]) == (0, 1.0, 0.0)
    # Unanswered calls of an earlier turn do not take the responses of a later one.
    later = {"role": "assistant", "content": format_qwen_tool_call("year_of", {"event": "opening"})}
    metrics = trajectory_metrics([cut, later, {"role": "tool", "content": "1902"}], make_sample())
    assert (metrics["num_calls"], metrics["num_solved"]) == (1, 1)


def test_trajectory_without_calls():
    metrics = trajectory_metrics([{"role": "assistant", "content": "3903"}], make_sample())
    assert metrics["solve_precision"] == 1.0 and metrics["solve_rate"] == 0.0 and metrics["solve_f1"] == 0.0
    nothing_expected = trajectory_metrics([], make_sample(unsolved={}))
    assert nothing_expected["solve_precision"] == nothing_expected["solve_rate"] == nothing_expected["solve_f1"] == 1.0


def test_a_tool_message_that_answers_no_call_solves_nothing():
    # Crediting an orphan response (by its name) would let solved exceed calls made (precision above 1).
    sample = make_sample(unsolved={"capital_of": ["Tokyo"], "population_of": ["37400068"]})
    messages = [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "capital_of", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Tokyo"},
        {"role": "tool", "tool_call_id": "c2", "name": "population_of", "content": "37,400,068"},
    ]
    metrics = trajectory_metrics(messages, sample)
    assert (metrics["num_calls"], metrics["num_solved"]) == (1, 1)
    assert metrics["solve_precision"] == 1.0 and metrics["solve_f1"] == pytest.approx(2 / 3)
    alone = trajectory_metrics([{"role": "tool", "name": "capital_of", "content": "Tokyo"}], sample)
    assert (alone["num_calls"], alone["num_solved"], alone["solve_f1"]) == (0, 0, 0.0)


@pytest.mark.parametrize("semantics", ["ftrl", "strict", "lenient"])
def test_json_nested_too_deeply_is_a_dropped_call_not_a_crash(sandbox, semantics):
    # FTRL's parse_qwen catches every exception while decoding a call: the turn is broken markup (-0.3).
    deep = "<tool_call>" + "[" * 5000 + "]" * 5000 + "</tool_call>"
    assert step_reward(deep, make_sample(), sandbox=sandbox, semantics=semantics) == pytest.approx(-0.3)
    arguments = '{"a": ' + "[" * 5000 + "]" * 5000 + "}"
    deep_arguments = '<tool_call>{"name": "lake_finder", "arguments": ' + arguments + "}</tool_call>"
    assert step_reward(deep_arguments, make_sample(), sandbox=sandbox, semantics=semantics) == pytest.approx(-0.3)


def test_strict_ignores_think_tags_inside_call_json_and_every_think_block(sandbox):
    # The call runs (and fails on the unknown argument: 1 call, 0 solved) in every semantics; split at the
    # `</think>` inside its JSON, strict would see broken markup instead (-0.3).
    with_tag = calls(("lake_finder", {"shape": "crescent", "note": "</think>"}))
    for semantics in ("ftrl", "strict", "lenient"):
        assert step_reward(with_tag, make_sample(), sandbox=sandbox, semantics=semantics) == pytest.approx(0.0)
    drafted_later = "<think>a</think>x<think>" + calls(("lake_finder", {"shape": "crescent"}), end="") + "</think>"
    assert step_reward(drafted_later, make_sample(), sandbox=sandbox, semantics="strict") == pytest.approx(-0.5)
