"""ToolHop rows become FTRL samples whose tools run in the sandbox."""

import json
import os

import pytest

from ftrl_jax.envs.samples import FTRL_INSTRUCTION, SampleError, encode_sample, read_samples, write_samples
from ftrl_jax.envs.sandbox import Sandbox, ToolRequest, is_error_output
from ftrl_jax.envs.toolhop import check_tools_run, convert_toolhop, convert_toolhop_row, strip_example_usage
from ftrl_jax.envs.rewards import match_outputs

TOOLHOP = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "benchdata", "toolhop_100.jsonl")

FATHER_SOURCE = (
    "def father_of(person, source=None):\n"
    "    return {'father': 'John II'} if person == 'Raoul I' else 'Unknown'\n"
    "\n"
    "# Example usage\n"
    "result = father_of('Raoul I')\n"
    "print(result)\n"
)
DEATH_SOURCE = (
    "import datetime\n"
    "\n"
    "def death_date(name: str, fmt: str = 'text') -> str:\n"
    "    return '11 July 1302' if name == 'John II' else 'Unknown'\n"
    "\n"
    "if __name__ == '__main__':\n"
    "    print(death_date('John II'))\n"
)


def schema(name, properties, required):
    return {"name": name, "description": f"{name} tool",
            "parameters": {"type": "object", "properties": {p: {"type": "string"} for p in properties}, "required": required}}


def make_row(**overrides):
    row = {
        "id": "toolhop-x",
        "question": "When did Raoul I's father die?",
        "answer": "11 July 1302",
        "category": "Family History",
        "domain": "History",
        "functions": [FATHER_SOURCE, DEATH_SOURCE],
        "sub_task": {"Who is Raoul I's father?": "John II", "When did John II die?": "11 July 1302"},
        "tools": {"Who is Raoul I's father?": schema("father_of", ["person", "source"], ["person"]),
                  "When did John II die?": schema("death_date", ["name", "fmt"], ["name"])},
        "gold_calls": ["father_of('Raoul I')", "death_date(name='John II')"],
    }
    row.update(overrides)
    return row


def test_a_row_becomes_an_ftrl_sample():
    sample = convert_toolhop_row(make_row())
    assert sample.messages == [{"role": "user", "content": FTRL_INSTRUCTION + "Question: When did Raoul I's father die?"}]
    assert sample.tool_names == ["father_of", "death_date"]
    assert sample.tools[0] == {"type": "function", "function": schema("father_of", ["person", "source"], ["person"])}
    assert sample.unsolved_set == {"father_of": ["John II"], "death_date": ["11 July 1302"]}
    assert (sample.answer, sample.split, sample.solve_rate) == ("11 July 1302", "test", 0.0)
    assert sample.data_source == "toolhop/family_history"
    assert sample.oracle_calls == [
        [{"name": "father_of", "arguments": {"person": "Raoul I"}}],
        [{"name": "death_date", "arguments": {"name": "John II"}}],
    ]
    assert sample.extra == {"id": "toolhop-x"}
    assert encode_sample(sample)["data_source"] == "toolhop/family_history"


def test_domain_is_used_when_there_is_no_category():
    assert convert_toolhop_row(make_row(category=None)).data_source == "toolhop/history"


def test_example_usage_is_removed_but_definitions_stay():
    sample = convert_toolhop_row(make_row())
    assert "print(result)" not in sample.codes["father_of"] and "result = father_of" not in sample.codes["father_of"]
    assert sample.codes["father_of"].startswith("def father_of(person, source=None):")
    assert "import datetime" in sample.codes["death_date"] and "__main__" not in sample.codes["death_date"]
    guarded = "try:\n    import dateutil\nexcept ImportError:\n    dateutil = None\n\nX = 3\n\ndef f():\n    return X\n"
    assert strip_example_usage(guarded) == guarded
    assert strip_example_usage("def f(:\n") == "def f(:\n"  # unparsable sources are left to fail in the sandbox


def test_same_named_functions_are_paired_by_parameters_and_renamed():
    first = "def extract_name(full_name):\n    return full_name.split()[0]\n"
    second = "def extract_name(text, position='last'):\n    return text.split()[-1]\n"
    row = make_row(
        functions=[second, first],
        sub_task={"First name of Ada Lovelace?": "Ada", "Last name of Ada Lovelace?": "Lovelace"},
        tools={"First name of Ada Lovelace?": schema("extract_name", ["full_name"], ["full_name"]),
               "Last name of Ada Lovelace?": schema("extract_name", ["text", "position"], ["text"])},
        gold_calls=["extract_name('Ada Lovelace')"],
    )
    sample = convert_toolhop_row(row)
    assert sample.tool_names == ["extract_name", "extract_name_2"]
    assert sample.codes["extract_name"] == first
    assert sample.codes["extract_name_2"].startswith("def extract_name_2(text, position='last'):")
    assert sample.unsolved_set == {"extract_name": ["Ada"], "extract_name_2": ["Lovelace"]}
    assert sample.oracle_calls is None  # gold calls name the ambiguous original


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"functions": [FATHER_SOURCE]}, "'death_date' has no function of that name"),
        ({"sub_task": {"Who is Raoul I's father?": "John II"}}, "same sub-questions"),
        ({"functions": ["x = 1\n", DEATH_SOURCE]}, "defines no function"),
        ({"functions": "not a list"}, "'functions' must be a list"),
        ({"question": None}, "'question' must be a non-empty string"),
    ],
)
def test_bad_rows_raise_saying_why(overrides, message):
    with pytest.raises(SampleError, match=message):
        convert_toolhop_row(make_row(**overrides))
    row = make_row()
    del row["sub_task"]
    with pytest.raises(SampleError, match="missing ToolHop fields"):
        convert_toolhop_row(row)


def test_unreadable_gold_calls_only_drop_the_oracle(caplog):
    sample = convert_toolhop_row(make_row(gold_calls=["father_of(person=lookup())"]))
    assert sample.oracle_calls is None
    assert "gold_calls not kept" in caplog.text


def test_bad_rows_in_a_file_are_reported_and_skipped(tmp_path):
    path = tmp_path / "toolhop.jsonl"
    path.write_text("\n".join([json.dumps(make_row()), "[1, 2]", json.dumps(make_row(functions=[]))]) + "\n")
    samples, errors = convert_toolhop(path)
    assert len(samples) == 1
    assert [(e.index, "JSON object" in e.reason or "no function" in e.reason) for e in errors] == [(1, True), (2, True)]


def test_converted_tools_run_and_the_oracle_solves_the_row():
    sample = convert_toolhop_row(make_row())
    with Sandbox(num_workers=1, timeout=5.0) as sandbox:
        assert check_tools_run([sample], sandbox=sandbox) == (1, [])
        oracle = [call for turn in sample.oracle_calls for call in turn]
        outputs = sandbox.call_many([ToolRequest(sample.codes, c["name"], c["arguments"]) for c in oracle])
        assert match_outputs([(c["name"], o) for c, o in zip(oracle, outputs)], sample.unsolved_set) == (2, {})
        failing_father = FATHER_SOURCE.replace("return", "raise ValueError('x')\n    return")
        broken = convert_toolhop_row(make_row(functions=[failing_father, DEATH_SOURCE]))
        running, problems = check_tools_run([broken], sandbox=sandbox, source="toolhop")
        assert running == 0 and "1 of 2 tools fail" in problems[0].reason and "father_of" in problems[0].reason


@pytest.mark.skipif(not os.path.exists(TOOLHOP), reason="benchdata toolhop_100.jsonl is absent")
def test_the_real_toolhop_subset_converts_and_runs(tmp_path):
    samples, errors = convert_toolhop(TOOLHOP)
    assert errors == [] and len(samples) == 100
    assert all(s.data_source.startswith("toolhop/") and s.split == "test" for s in samples)
    assert all(set(s.unsolved_set) <= set(s.codes) == set(s.tool_names) for s in samples)
    assert sum(s.num_expected for s in samples) == sum(len(json.loads(line)["sub_task"]) for line in open(TOOLHOP))
    # The format round-trips through a file.
    path = tmp_path / "toolhop.parquet"
    write_samples(path, samples)
    again, errors = read_samples(path)
    assert errors == [] and again == samples
    # Tools run in the sandbox: nearly all rows run on plausible calls, and gold calls solve answers.
    with Sandbox(num_workers=2, timeout=5.0) as sandbox:
        running, problems = check_tools_run(samples[:30], sandbox=sandbox, source=TOOLHOP)
        assert running + len(problems) == 30 and running >= 25
        with_oracle = [s for s in samples if s.oracle_calls][:5]
        solved = 0
        for sample in with_oracle:
            oracle = [call for turn in sample.oracle_calls for call in turn]
            outputs = sandbox.call_many([ToolRequest(sample.codes, c["name"], c["arguments"]) for c in oracle])
            assert not any(map(is_error_output, outputs))
            solved += match_outputs([(c["name"], o) for c, o in zip(oracle, outputs)], sample.unsolved_set)[0]
        assert solved >= sum(s.num_expected for s in with_oracle) - 2
