"""The FTRL sample format: decoding, encoding, reading and writing .jsonl / .parquet."""

import json
import logging
import os

import pytest

from ftrl_jax.envs.samples import (
    FTRL_COLUMNS,
    FTRL_INSTRUCTION,
    Sample,
    SampleError,
    decode_sample,
    encode_sample,
    environment_key,
    example_arguments,
    read_samples,
    user_prompt,
    write_samples,
)

FTRL_TEST = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "benchdata", "ftrl_test.parquet")

TOOLS = [
    {"type": "function", "function": {"name": "lake_finder", "description": "Finds lakes.",
     "parameters": {"type": "object", "properties": {"shape": {"type": "string"}}, "required": ["shape"]}}},
    {"type": "function", "function": {"name": "mountain_height", "description": "Heights.",
     "parameters": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}},
]
CODES = {
    "lake_finder": "def lake_finder(shape):\n    return 'Lake Crescent'\n",
    "mountain_height": "def mountain_height(name):\n    return {'height_m': '2,432'}\n",
}


def make_row(**overrides):
    row = {
        "messages": [{"content": user_prompt("How high is the mountain by the crescent lake?"), "role": "user"}],
        "tools": json.dumps(TOOLS),
        "codes": json.dumps(CODES),
        "unsolved_set": json.dumps({"lake_finder": ["Lake Crescent"], "mountain_height": ["2,432"]}),
        "solve_rate": 0.0,
        "data_source": "self/multi_hop",
        "split": "test",
        "answer": "2,432",
    }
    row.update(overrides)
    return row


def test_decode_accepts_json_strings_and_decoded_fields_alike():
    from_strings = decode_sample(make_row())
    from_objects = decode_sample(make_row(tools=TOOLS, codes=CODES,
                                          unsolved_set={"lake_finder": ["Lake Crescent"], "mountain_height": ["2,432"]}))
    assert from_strings == from_objects
    assert from_strings.tool_names == ["lake_finder", "mountain_height"]
    assert from_strings.codes == CODES
    assert from_strings.num_expected == 2
    assert from_strings.tool_schema("mountain_height")["description"] == "Heights."
    assert from_strings.tool_schema("missing") is None
    assert decode_sample(from_strings) is from_strings


def test_encode_gives_back_the_ftrl_row():
    row = make_row()
    encoded = encode_sample(decode_sample(row))
    assert list(encoded) == list(FTRL_COLUMNS)
    assert encoded == row  # same JSON strings, byte for byte, since FTRL uses json's defaults
    oracle = [[{"name": "lake_finder", "arguments": {"shape": "crescent"}}]]
    with_oracle = encode_sample(decode_sample(make_row(oracle_calls=oracle)))
    assert json.loads(with_oracle["oracle_calls"]) == oracle


def test_environment_key_is_the_same_for_the_same_environment_only():
    row = make_row()
    key = environment_key(row)
    assert len(key) == 16 and key == environment_key(decode_sample(row)) == environment_key(dict(reversed(row.items())))
    assert environment_key(make_row(answer="another answer")) != key
    # Annotations of the same environment leave its key alone.
    assert environment_key(make_row(solve_rate=0.5, split="train", note="kept")) == key


def test_optional_fields_have_defaults_and_unknown_columns_are_kept():
    row = make_row(extra_note="kept")
    for field in ("solve_rate", "data_source", "split"):
        del row[field]
    sample = decode_sample(row)
    assert (sample.solve_rate, sample.data_source, sample.split, sample.oracle_calls) == (0.0, "", "", None)
    assert sample.extra == {"extra_note": "kept"}
    assert encode_sample(sample)["extra_note"] == "kept"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"codes": "{not json"}, "'codes' is not valid JSON"),
        ({"tools": json.dumps([{"type": "function", "function": {}}])}, "no string 'name'"),
        ({"tools": json.dumps(TOOLS + TOOLS[:1])}, "appears twice"),
        ({"unsolved_set": json.dumps({"lake_finder": "Lake Crescent"})}, "list of answer strings"),
        ({"unsolved_set": json.dumps({"ghost_tool": ["x"]})}, "ghost_tool"),
        ({"codes": json.dumps({"lake_finder": CODES["lake_finder"]})}, "no source in 'codes'"),
        ({"answer": 2432}, "'answer' must be a string"),
        ({"solve_rate": "high"}, "'solve_rate' must be a number"),
        ({"messages": [{"content": "hi"}]}, "no string 'role'"),
        ({"oracle_calls": [[{"name": "lake_finder"}]]}, "oracle_calls[0][0]"),
    ],
)
def test_decode_names_the_field_at_fault(overrides, message):
    with pytest.raises(SampleError) as info:
        decode_sample(make_row(**overrides))
    assert message in str(info.value)


def test_missing_required_fields_are_listed():
    row = make_row()
    del row["codes"], row["answer"]
    with pytest.raises(SampleError, match=r"missing required fields \['codes', 'answer'\]"):
        decode_sample(row)


def test_user_prompt_is_ftrls_instruction_then_the_question():
    assert user_prompt("Why?") == FTRL_INSTRUCTION + "Question: Why?"


def test_jsonl_round_trip_is_deterministic(tmp_path):
    samples = [decode_sample(make_row()), decode_sample(make_row(answer="Lake Crescent", data_source="self/single_hop"))]
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert write_samples(first, samples) == 2
    write_samples(second, [encode_sample(s) for s in samples])  # rows are accepted too
    assert first.read_bytes() == second.read_bytes()
    read, errors = read_samples(first)
    assert errors == [] and read == samples
    assert not list(tmp_path.glob("*.partial"))


def test_parquet_round_trip_keeps_ftrl_layout(tmp_path):
    pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
    samples = [decode_sample(make_row()), decode_sample(make_row(oracle_calls=[[{"name": "lake_finder", "arguments": {}}]]))]
    path = tmp_path / "s.parquet"
    write_samples(path, samples)
    schema = pyarrow_parquet.read_schema(path)
    assert schema.names[: len(FTRL_COLUMNS)] == list(FTRL_COLUMNS)
    assert str(schema.field("messages").type) == "list<element: struct<content: string, role: string>>"
    read, errors = read_samples(path)
    assert errors == [] and read == samples


def test_parquet_keeps_tool_call_messages_as_json(tmp_path):
    pytest.importorskip("pyarrow")
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "lake_finder", "arguments": {"shape": "crescent"}}},
        ]},
        {"role": "tool", "content": "Lake Crescent"},
    ]
    sample = decode_sample(make_row(messages=messages))
    path = tmp_path / "chat.parquet"
    write_samples(path, [sample])
    read, errors = read_samples(path)
    assert errors == [] and read[0].messages == messages


def test_malformed_rows_are_reported_by_index_logged_and_skipped(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(make_row()), "{broken json", json.dumps(make_row(answer=None)), "", json.dumps(make_row())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="ftrl_jax.envs.samples"):
        samples, errors = read_samples(path)
    assert len(samples) == 2
    assert [e.index for e in errors] == [1, 2]
    assert "not valid JSON" in errors[0].reason and "'answer' must be a string" in errors[1].reason
    assert str(path) in str(errors[0]) and "row 1" in str(errors[0])
    assert sum("skipping malformed sample" in r.message for r in caplog.records) == 2


def test_writing_refuses_bad_samples_and_unknown_file_types(tmp_path):
    with pytest.raises(SampleError, match="sample 1"):
        write_samples(tmp_path / "x.jsonl", [make_row(), make_row(codes="{")])
    assert not (tmp_path / "x.jsonl").exists()
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        write_samples(tmp_path / "x.csv", [make_row()])
    with pytest.raises(ValueError, match="unsupported file type"):
        read_samples(tmp_path / "x.txt")


def test_example_arguments_fill_required_parameters_plausibly():
    parameters = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "day": {"type": "string", "format": "date"},
            "unit": {"type": "string", "enum": ["metric", "imperial"]},
            "days": {"type": "integer", "minimum": 3},
            "ratio": {"type": "number"},
            "detailed": {"type": "boolean", "default": False},
            "tags": {"type": "array", "items": {"type": "string"}},
            "where": {"type": "object", "properties": {"lat": {"type": "number"}}, "required": ["lat"]},
            "note": {"type": ["string", "null"]},
        },
        "required": ["city", "day", "unit", "days", "ratio", "detailed", "tags", "where"],
    }
    assert example_arguments(parameters) == {
        "city": "example", "day": "2024-01-01", "unit": "metric", "days": 3, "ratio": 1.0,
        "detailed": False, "tags": ["example", "example"], "where": {"lat": 1.0},
    }
    assert example_arguments(parameters, include_optional=True)["note"] == "example"
    assert example_arguments({}) == {}


@pytest.mark.skipif(not os.path.exists(FTRL_TEST), reason="benchdata ftrl_test.parquet is absent")
def test_reads_all_of_the_ftrl_test_set_and_writes_it_back(tmp_path):
    samples, errors = read_samples(FTRL_TEST)
    assert errors == [] and len(samples) == 200
    assert all(isinstance(s, Sample) and s.split == "test" for s in samples)
    assert {s.data_source for s in samples} == {
        "self/single_hop", "self/multi_hop", "self/parallel_single_hop", "self/parallel_multi_hop"
    }
    assert all(s.messages[0]["content"].startswith(FTRL_INSTRUCTION) for s in samples)
    assert all(1 <= len(s.tools) <= 15 and 1 <= s.num_expected <= 11 for s in samples)
    rows = pytest.importorskip("pyarrow.parquet").read_table(FTRL_TEST).to_pylist()
    assert [encode_sample(s) for s in samples] == rows  # the JSON strings come back byte for byte
    path = tmp_path / "copy.jsonl"
    write_samples(path, samples)
    again, errors = read_samples(path)
    assert errors == [] and again == samples


def _file_bytes(path):
    """A file's bytes, or a directory's {name: bytes}."""
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    return path.read_bytes()


@pytest.mark.parametrize("name", ["s.jsonl", "s.parquet", "s_dataset"])
def test_every_form_round_trips_byte_for_byte(tmp_path, name):
    pytest.importorskip("datasets")
    samples = [decode_sample(make_row(solve_rate=0.1 + 0.2, answer="a/b é")),
               decode_sample(make_row(oracle_calls=[[{"name": "lake_finder", "arguments": {"shape": "crescent"}}]]))]
    first, second = tmp_path / "first" / name, tmp_path / "second" / name
    assert write_samples(first, samples) == 2
    read, errors = read_samples(first)
    assert errors == [] and read == samples
    write_samples(second, read)
    assert _file_bytes(first) == _file_bytes(second)
    write_samples(first, read)  # replacing an existing file or directory in place
    assert _file_bytes(first) == _file_bytes(second)
    assert sorted(p.name for p in (tmp_path / "first").iterdir()) == [name]  # no .partial or .old left


def test_save_to_disk_directory_is_a_datasets_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "envs"
    write_samples(path, [make_row(), make_row(answer="Lake Crescent")])
    loaded = datasets.load_from_disk(str(path))
    assert loaded.column_names == list(FTRL_COLUMNS) and loaded[1]["answer"] == "Lake Crescent"
    # A DatasetDict (splits in subdirectories) names the split directories to pass instead.
    datasets.DatasetDict({"train": loaded, "test": loaded}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\]; pass one split's directory"):
        read_samples(tmp_path / "splits")
    read, errors = read_samples(tmp_path / "splits" / "train")
    assert errors == [] and len(read) == 2


def test_directories_that_are_not_datasets_are_refused(tmp_path):
    pytest.importorskip("datasets")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a datasets save_to_disk directory"):
        read_samples(plain)
    with pytest.raises(ValueError, match="not a datasets save_to_disk directory; remove it"):
        write_samples(plain, [make_row()])
    assert (plain / "notes.txt").read_text() == "keep me" and not (tmp_path / "plain.partial").exists()
    with pytest.raises(FileNotFoundError, match="does not exist; pass a .jsonl file, a .parquet file, or a datasets"):
        read_samples(tmp_path / "absent.parquet")


def test_unreadable_files_name_the_form(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "cut.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"cut.parquet: cannot be read as \.parquet"):
        read_samples(tmp_path / "cut.parquet")
    (tmp_path / "latin.jsonl").write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(ValueError, match=r"latin.jsonl: cannot be read as \.jsonl \(UnicodeDecodeError"):
        read_samples(tmp_path / "latin.jsonl")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert read_samples(tmp_path / "empty.jsonl") == ([], [])


def test_jsonl_rows_keep_their_own_keys_and_numbers(tmp_path):
    # A columnar JSON reader would give every row every key (null where absent) and make 1 into 1.0.
    pytest.importorskip("datasets")
    path = tmp_path / "mixed.jsonl"
    rows = [make_row(extra_note="only here", priority=1), make_row(priority=2.5)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    read, errors = read_samples(path)
    assert errors == []
    assert read[0].extra == {"extra_note": "only here", "priority": 1} and read[1].extra == {"priority": 2.5}
    assert type(read[0].extra["priority"]) is int


def test_reading_leaves_the_datasets_cache_alone(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    for name in ("s.jsonl", "s.parquet", "s_dataset"):
        write_samples(tmp_path / name, [make_row()])
        assert len(read_samples(tmp_path / name)[0]) == 1
    assert not cache.exists() or not any(cache.rglob("*"))


def test_check_output_path_refuses_what_write_samples_would_refuse(tmp_path):
    from ftrl_jax.envs.samples import check_output_path

    assert check_output_path(tmp_path / "a.jsonl") == "jsonl"
    assert check_output_path(tmp_path / "a.parquet") == "parquet"
    assert check_output_path(tmp_path / "saved") == "save_to_disk"
    (tmp_path / "plain").mkdir()
    for path, message in [(tmp_path / "a.csv", "unsupported file type"), ("", "empty"),
                          (tmp_path / "plain", "not a datasets save_to_disk directory")]:
        with pytest.raises(ValueError, match=message):
            check_output_path(path)
        with pytest.raises(ValueError, match=message):
            write_samples(path, [make_row()])
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_jsonl_with_a_byte_order_mark_reads_its_first_row(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_text(json.dumps(make_row()) + "\n" + json.dumps(make_row(answer="x")) + "\n", encoding="utf-8-sig")
    samples, errors = read_samples(path)
    assert errors == [] and [s.answer for s in samples] == ["2,432", "x"]
