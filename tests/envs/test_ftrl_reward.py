"""FTRL's step reward, rule by rule (ids from ftrl_jax/envs/ftrl_reward.py's table), the strict semantics and
the truncated-turn rule. Every expected value was worked out by hand from FTRL's source
(Code/verl/utils/reward_score/tool.py, Code/utils/parse_output.py, Code/utils/utils.py)."""

import json

import pytest

from ftrl_jax.envs import ftrl_reward
from ftrl_jax.envs.ftrl_reward import Call, answer_verify, clean_response, parse_turn, run_calls
from ftrl_jax.envs.rewards import REWARD_SEMANTICS, strict_answer_in, step_reward, step_rewards
from ftrl_jax.envs.sandbox import Sandbox

CODES = {
    "capital_of": "def capital_of(country):\n    return {'Japan': 'Tokyo', 'France': 'Paris'}[country]\n",
    "population_of": (
        "def population_of(city):\n"
        "    return {'city': city, 'population': {'Tokyo': '13,960,000'}.get(city, 'unknown')}\n"
    ),
    "with_import": "import re\n\ndef with_import(text):\n    return re.sub('a', 'b', text)\n",
    "uses_json": "def uses_json(x):\n    return json.dumps({'x': x})\n",
    "example": (
        "def example(q):\n    return 'answer ' + q\n\n"
        "if __name__ == '__main__':\n    raise SystemExit('the main guard ran')\n"
        "print(example('demo'))\n"
    ),
    "ordered": "def ordered(k):\n    from collections import OrderedDict\n    return OrderedDict([(k, 'Tokyo')])\n",
    "as_tuple": "def as_tuple():\n    return ('Tokyo', 'Japan')\n",
    "painter": "def painter():\n    return {'name': 'Albrecht Dürer'}\n",
    "dates": "def dates():\n    import datetime\n    return {'d': datetime.date(2020, 1, 2)}\n",
    "nothing": "def nothing():\n    pass\n",
    "bare_error": "def bare_error():\n    raise ValueError()\n",
    "exits": "def exits():\n    raise SystemExit(3)\n",
    "predict": "def predict():\n    return 'Tokyo'\n",
    "slow": "def slow():\n    while True:\n        pass\n",
    "echo": "def echo(text):\n    return text\n",
}
UNSOLVED = {"capital_of": ["Tokyo", "Paris"], "population_of": ["13,960,000"]}  # k = 3


def sample(unsolved=None, answer="Tokyo, Japan", solve_rate=0.0, **extra):
    row = {"codes": json.dumps(CODES), "unsolved_set": json.dumps(UNSOLVED if unsolved is None else unsolved),
           "solve_rate": solve_rate, **extra}
    if answer is not None:
        row["answer"] = answer
    return row


def block(name="capital_of", arguments=None, key="arguments", open_tag="<tool_call>\n", close_tag="\n</tool_call>"):
    body = {"name": name} if name is not None else {}
    if key:
        body[key] = {"country": "Japan"} if arguments is None else arguments
    return open_tag + json.dumps(body, ensure_ascii=False) + close_tag


JAPAN, FRANCE = block(), block(arguments={"country": "France"})


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(num_workers=2, timeout=5.0) as box:
        yield box


def reward(sandbox, response, kind="f1", semantics="ftrl", **fields):
    return step_reward(response, sample(**fields), kind, sandbox=sandbox, semantics=semantics)


# --- R1 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, cleaned", [
    ("  Tokyo <|im_end|>\n", "Tokyo"),
    ("Tokyo<|im_end|><|endoftext|>", "Tokyo"),
    ("Tokyo<|endoftext|><|im_end|>", "Tokyo<|endoftext|>"),  # <|endoftext|> goes first, so here it stays
    ("Tokyo<|im_end|><|im_end|>", "Tokyo<|im_end|>"),  # one of each, at most
])
def test_r1_end_tokens(text, cleaned):
    assert clean_response(text) == cleaned


def test_r1_a_left_over_end_token_is_content(sandbox):
    assert reward(sandbox, "<|endoftext|><|im_end|>") == 0.0  # content "<|endoftext|>": not empty (S2), no answer
    assert reward(sandbox, "<|im_end|><|endoftext|>") == -0.5
    assert reward(sandbox, "<|endoftext|><|im_end|>", semantics="strict") == -0.5


# --- P1-P9: parsing ----------------------------------------------------------------------------


def test_p1_no_tag_means_no_call_and_the_whole_text_is_content():
    assert parse_turn("  It is Tokyo.<|im_end|>") == ftrl_reward.Turn([], "It is Tokyo.")


def test_p2_text_before_the_first_call_is_ignored(sandbox):
    turn = parse_turn("Let me look that up. " + JAPAN)
    assert turn.calls == [Call("capital_of", {"country": "Japan"})]
    assert reward(sandbox, "Let me look that up. " + JAPAN) == 1.0  # 2*1/(1+1)


def test_p3_a_call_after_text_between_calls_is_dropped(sandbox):
    between = JAPAN + " and now France: " + FRANCE
    assert parse_turn(between).calls == [Call("capital_of", {"country": "Japan"})]
    assert reward(sandbox, between, "rate") == 1.0  # only Tokyo
    assert reward(sandbox, JAPAN + "\n" + FRANCE, "rate") == 2.0  # whitespace between calls is fine
    assert parse_turn(JAPAN + " trailing words").calls == [Call("capital_of", {"country": "Japan"})]
    # strict counts both calls: t = 2, n = 2.
    assert reward(sandbox, between, "rate", semantics="strict") == 2.0
    assert reward(sandbox, between, "f1", semantics="strict") == pytest.approx(4 / 3)


def test_p4_an_unclosed_final_call_counts(sandbox):
    unclosed = block(close_tag="")
    assert parse_turn(unclosed).calls == [Call("capital_of", {"country": "Japan"})]
    assert reward(sandbox, unclosed) == 1.0
    assert reward(sandbox, JAPAN + "\n" + block(arguments={"country": "France"}, close_tag=""), "rate") == 2.0
    assert reward(sandbox, unclosed, semantics="strict") == -0.3  # strict: broken markup


def test_p5_the_open_tag_is_stripped_as_a_character_set(sandbox):
    doubled = block(open_tag="<tool_call><tool_call>")
    assert parse_turn(doubled).calls == [Call("capital_of", {"country": "Japan"})]
    assert reward(sandbox, doubled) == 1.0
    # A newline stops lstrip, the second tag stays in front of the JSON: not a call.
    assert parse_turn(block(open_tag="<tool_call>\n<tool_call>")).calls == []
    assert reward(sandbox, doubled, semantics="strict") == -0.3


@pytest.mark.parametrize("body", [
    '[{"name": "capital_of", "arguments": {"country": "Japan"}}]',  # a list, not an object
    '{"name": "capital_of", "arguments": {"country": "Japan"}} then',  # text after the JSON
    "{'name': 'capital_of', 'arguments': {'country': 'Japan'}}",  # not JSON
    '{"name": "capital_of", "arguments": {"country": "Japan"}',  # unbalanced
    '"capital_of"',
])
def test_p6_only_one_json_object_is_a_call(sandbox, body):
    text = f"<tool_call>\n{body}\n</tool_call>"
    assert parse_turn(text).calls == []
    assert reward(sandbox, text) == -0.3  # P9 + S3


@pytest.mark.parametrize("name, parsed", [
    ("", False), (None, False), (0, False), (False, False), ([], False),
    (1, True), (" capital_of", True), (["capital_of"], True),
])
def test_p7_any_truthy_name(name, parsed):
    text = "<tool_call>" + json.dumps({"name": name, "arguments": {}} if name is not None else {"arguments": {}}) \
        + "</tool_call>"
    assert parse_turn(text).calls == ([Call(name, {})] if parsed else [])


def test_p7_odd_names_run_and_solve_nothing(sandbox):
    assert reward(sandbox, block(name=1), "precision") == 0.0  # n = 1, t = 0 (E1: unknown tool)
    assert reward(sandbox, block(name=" capital_of"), "precision") == 0.0  # not stripped
    assert reward(sandbox, block(name=["capital_of"]), "precision") == 0.0  # FTRL itself raises here


@pytest.mark.parametrize("arguments_json, call", [
    ('{"country": "Japan"}', Call("capital_of", {"country": "Japan"})),
    ('"{\\"country\\": \\"Japan\\"}"', Call("capital_of", {"country": "Japan"})),  # a JSON string of an object
    ('"[1, 2]"', Call("capital_of", [1, 2])),  # a JSON string of anything else is still a call
    ('""', None), ('"not json"', None), ("null", None), ("[1, 2]", None), ("5", None),
])
def test_p8_arguments(arguments_json, call):
    text = '<tool_call>{"name": "capital_of", "arguments": ' + arguments_json + "}</tool_call>"
    assert parse_turn(text).calls == ([call] if call else [])


def test_p8_the_arguments_key_is_required(sandbox):
    assert reward(sandbox, block(key="parameters")) == -0.3
    assert reward(sandbox, block(key=None)) == -0.3
    for semantics in ("strict", "lenient"):
        assert reward(sandbox, block(key=None), semantics=semantics) != 1.0
    assert reward(sandbox, block(key="parameters"), semantics="strict") == -0.3


def test_p9_broken_blocks_beside_a_good_call_are_ignored(sandbox):
    mixed = JAPAN + "\n<tool_call>\n{\"name\": \"capital_of\", \"arguments\": {\"country\"\n</tool_call>"
    assert parse_turn(mixed).calls == [Call("capital_of", {"country": "Japan"})]
    assert reward(sandbox, mixed, "precision") == 1.0  # n = 1
    assert reward(sandbox, mixed, "precision", semantics="strict") == 0.5  # strict: the broken block is a call
    assert parse_turn("<tool_call>{bad}</tool_call>").content == "<tool_call>{bad}</tool_call>"


# --- E1-E7: tool outputs -----------------------------------------------------------------------


def outputs(sandbox, *calls, timeout=5.0):
    return run_calls([([Call(name, arguments) for name, arguments in calls], CODES)], sandbox, timeout)[0]


def test_e1_unknown_and_unhashable_names(sandbox):
    assert outputs(sandbox, ("nope", {}), (1, {}), (["x"], {})) == [
        "an error occured when call nope: 'nope'",
        "an error occured when call 1: 1",
        "an error occured when call ['x']: unhashable type: 'list'",
    ]


def test_e2_the_tool_runs_in_call_functions_scope(sandbox):
    assert outputs(sandbox, ("with_import", {"text": "aa"}), ("uses_json", {"x": 1}), ("example", {"q": "Tokyo"})) == [
        "an error occured when call with_import: name 're' is not defined",  # top-level import: invisible
        '{"x": 1}',  # json is one of utils.utils's globals
        "answer Tokyo",  # main guard skipped; the example call at the top level ran without harm
    ]


def test_e2_only_ftrl_semantics_has_that_scope(sandbox):
    text = block("with_import", {"text": "aa"})
    unsolved = {"with_import": ["bb"]}
    assert reward(sandbox, text, unsolved=unsolved) == 0.0
    assert reward(sandbox, text, unsolved=unsolved, semantics="strict") == 1.0


def test_e3_lookup_and_call(sandbox):
    assert outputs(sandbox, ("predict", {}), ("capital_of", [1]), ("capital_of", {"city": "Tokyo"})) == [
        "an error occured when call predict: name 'predict' is not defined",
        "an error occured when call capital_of: utils.utils.capital_of() argument after ** must be a mapping, not list",
        "an error occured when call capital_of: capital_of() got an unexpected keyword argument 'city'",
    ]


def test_e4_result_formatting(sandbox):
    assert outputs(sandbox, ("ordered", {"k": "a"}), ("as_tuple", {}), ("painter", {}), ("dates", {}),
                   ("nothing", {}), ("population_of", {"city": "Tokyo"})) == [
        "OrderedDict([('a', 'Tokyo')])",  # a dict subclass goes through str(), not json
        "('Tokyo', 'Japan')",
        '{"name": "Albrecht Dürer"}',  # ensure_ascii=False
        "an error occured when call dates: Object of type date is not JSON serializable",
        "None",
        '{"city": "Tokyo", "population": "13,960,000"}',
    ]


def test_e5_errors_carry_the_exception_text_only(sandbox):
    assert outputs(sandbox, ("capital_of", {"country": "Tokyo"}), ("bare_error", {})) == [
        "an error occured when call capital_of: 'Tokyo'",
        "an error occured when call bare_error: ",
    ]


def test_e5_error_text_earns_credit_in_ftrl_only(sandbox):
    # capital_of("Tokyo") raises KeyError('Tokyo'); its error text holds the expected "Tokyo".
    wrong = block(arguments={"country": "Tokyo"})
    assert reward(sandbox, wrong) == 1.0
    assert reward(sandbox, wrong, semantics="strict") == 0.0
    assert reward(sandbox, wrong, semantics="lenient") == 1.0
    # A tool's own error report is an error too, in strict.
    report = block("echo", {"text": {"error": "no record for Tokyo"}})
    got = [reward(sandbox, report, unsolved={"echo": ["Tokyo"]}, semantics=s) for s in ("ftrl", "strict")]
    assert got == [1.0, 0.0]
    fine = block("echo", {"text": {"error": None, "city": "Tokyo"}})
    assert reward(sandbox, fine, unsolved={"echo": ["Tokyo"]}, semantics="strict") == 1.0


def test_e6_timeout_message(sandbox):
    (output,) = outputs(sandbox, ("slow", {}), timeout=1.0)
    source = repr(CODES["slow"])
    assert output == ("an error occured when call slow: Function call_function (args=('slow', {}, " + source
                      + ")) (kwargs={}) timed out after 1.000000 seconds.\n")
    assert ftrl_reward.timeout_text("f", {"a": 1}, "src").endswith(
        "(args=('f', {'a': 1}, 'src')) (kwargs={}) timed out after 10.000000 seconds.\n")


def test_e7_system_exit_gives_none(sandbox):
    assert outputs(sandbox, ("exits", {})) == [None]
    assert reward(sandbox, block("exits", {}), unsolved={"exits": ["None"]}) == 1.0  # str(None) == "None"


# --- M1, M2: matching --------------------------------------------------------------------------


def test_m1_each_answer_once_and_only_under_its_tool(sandbox):
    assert reward(sandbox, JAPAN + "\n" + JAPAN, "rate") == 1.0
    assert reward(sandbox, JAPAN + "\n" + FRANCE, "rate") == 2.0
    assert reward(sandbox, block("echo", {"text": "Tokyo"}), "rate") == 0.0  # right text, tool without answers
    three = JAPAN + "\n" + FRANCE + "\n" + block("population_of", {"city": "Osaka"})
    assert [reward(sandbox, three, kind) for kind in ("f1", "precision", "rate", "pr")] == pytest.approx(
        [2 * 2 / 4, 2 / 3, 2.0, 4 / 3])  # S1 with n = 3, t = 2


@pytest.mark.parametrize("output, expected, verified", [
    ("The capital of France is Paris", "Paris, France", True),
    ("Paris", "Paris, France", False),
    ("height: 2432 m", "2,432", True),
    ("ab", "a,  b", True),  # parts are stripped: "a" and "b"
    ("  TOKYO ", " tokyo ", True),
    ("anything", "", True),  # an empty part is in every text
    ("anything", "x, ", False),
    ("x", "x, ", True),
    (None, "None", True),
    ({"name": "Albrecht Dürer"}, "dürer", True),
    (["Tokyo", "Osaka"], "osaka, tokyo", True),
])
def test_m2_answer_verify(output, expected, verified):
    assert answer_verify(output, expected) is verified


def test_m2_an_empty_expected_answer_is_solved_by_anything(sandbox):
    echo = block("echo", {"text": "whatever"})
    assert reward(sandbox, echo, unsolved={"echo": [""]}) == 1.0
    assert reward(sandbox, echo, unsolved={"echo": [""]}, semantics="strict") == 0.0


# --- S2-S6: turns without calls ----------------------------------------------------------------


@pytest.mark.parametrize("response, fields, ftrl, strict, lenient", [
    # The no-call turn of the report: answer "Tokyo, Japan", nothing unsolved, solve_rate 0.
    ("Japan's capital city is Tokyo.<|im_end|>", {"unsolved": {}}, 0.0, 0.0, 1.0),
    ("The answer is Tokyo, Japan.", {"unsolved": {}}, 1.0, 1.0, 1.0),
    ("The answer is tokyo japan", {}, 1 / 4, 1 / 4, 1 / 4),  # k = 3
    ("Japan, Tokyo", {}, 0.0, 0.0, 1 / 4),  # parts reordered
    ("Tokyo,  Japan", {}, 0.0, 1 / 4, 1 / 4),  # extra space: strict collapses blanks
    # A refusal that holds the letters of "a, b, c" but not "a b c".
    ("I cannot answer, but maybe later.", {"answer": "a, b, c"}, 0.0, 0.0, 1 / 4),
    ("It happened in 2012.", {"answer": "12"}, 1 / 4, 0.0, 1 / 4),  # strict: whole words only
    ("I do not know.", {"answer": ""}, 1 / 4, 0.0, 0.0),  # "" is in every content
    ("I do not know.", {"answer": None}, 0.0, 0.0, 0.0),  # no answer field: S4 skipped
    ("I do not know.", {"answer": None, "solve_rate": 1.0}, 0.5, 0.5, 0.5),  # S5
    ("I do not know.", {"solve_rate": 0.5}, 0.0, 0.0, 0.0),  # S6
    ("", {}, -0.5, -0.5, -0.5),  # S2
    ("The answer is Tokyo, Japan <tool_parsed_response>", {}, -0.3, -0.3, 1 / 4),  # S3
    ("Tokyo, Japan </tool_call>", {}, -0.3, -0.3, -0.3),
])
def test_s2_to_s6(sandbox, response, fields, ftrl, strict, lenient):
    got = [reward(sandbox, response, semantics=s, **fields) for s in ("ftrl", "strict", "lenient")]
    assert got == pytest.approx([ftrl, strict, lenient])


def test_strict_answer_in():
    assert strict_answer_in("It is Tokyo.", "tokyo")
    assert strict_answer_in("Launch price: $3589 million.", "$3,589 million")
    assert not strict_answer_in("Tokyoites", "Tokyo")
    assert not strict_answer_in("anything", "") and not strict_answer_in("anything", None)


# --- truncated turns -----------------------------------------------------------------------------


class NoSandbox:
    def call_many(self, requests, **kwargs):
        raise AssertionError("a truncated turn's calls must not run")


@pytest.mark.parametrize("semantics", sorted(REWARD_SEMANTICS))
def test_a_truncated_turn_runs_no_call(sandbox, semantics):
    rambling = JAPAN + "\nAnd furthermore, as I was saying, the"
    assert step_reward(rambling, sample(), sandbox=sandbox, semantics=semantics) == 1.0  # complete: run, 1 of 1
    assert step_reward(rambling, sample(), sandbox=NoSandbox(), semantics=semantics, truncated=True) == -0.3
    # Without markup the other no-call rules apply: here the final answer (k = 3).
    assert step_reward("The answer is Tokyo, Japan and", sample(), sandbox=NoSandbox(), semantics=semantics,
                       truncated=True) == pytest.approx(1 / 4)


def test_truncated_flags_are_per_turn(sandbox):
    got = step_rewards([JAPAN, JAPAN], [sample(), sample()], sandbox=sandbox, truncated=[False, True])
    assert got == [1.0, -0.3]
    with pytest.raises(ValueError, match="1 truncated flags for 2 responses"):
        step_rewards([JAPAN, JAPAN], [sample(), sample()], sandbox=sandbox, truncated=[True])


def test_unknown_semantics_lists_the_choices(sandbox):
    with pytest.raises(ValueError, match=r"unknown reward semantics 'loose'.*'ftrl'.*'lenient'.*'strict'"):
        step_reward("x", sample(), sandbox=sandbox, semantics="loose")
