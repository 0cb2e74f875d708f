"""The FTRL sample format: one tool-use environment per row, stored as .jsonl, .parquet or a
`datasets` save_to_disk directory.

A row holds FTRL's fields, exactly:
- `messages`: the chat so far (a user message with the question and FTRL's instruction);
- `tools`: JSON string, list of `{"type": "function", "function": {name, description, parameters}}`;
- `codes`: JSON string, tool name -> Python source defining a function of that name;
- `unsolved_set`: JSON string, tool name -> list of expected answer strings;
- `solve_rate` (float), `data_source` (e.g. `self/multi_hop`), `split`, `answer`.
Generated samples add `oracle_calls`: a list of turns, each a list of `{"name", "arguments"}`
(stored as a JSON string, like the other nested fields).

`decode_sample` turns a row into a `Sample` with the JSON fields decoded and checked;
`encode_sample` turns it back into a row. `read_samples` / `write_samples` do files, through
Hugging Face `datasets`; a .parquet file has FTRL's column names, order and Arrow types.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable

logger = logging.getLogger(__name__)

# FTRL's user-message instruction, word for word (every row of its test set starts with it).
FTRL_INSTRUCTION = (
    "Please call given tools to answer the question. Please note that all your information must be "
    "obtained by calling tools and not by answering the question directly.\n"
    "If the call fails, you need to try to correct it and continue until you arrive at an answer.\n"
)

# Column order of FTRL's own parquet files; encoded rows keep it.
FTRL_COLUMNS = ("messages", "tools", "codes", "unsolved_set", "solve_rate", "data_source", "split", "answer")
ORACLE_COLUMN = "oracle_calls"


def user_prompt(question: str) -> str:
    """FTRL's user message for a question: the instruction, then `Question: ...`."""
    return FTRL_INSTRUCTION + "Question: " + question


class SampleError(ValueError):
    """A row that does not follow the sample format; the message names the field and the problem."""


@dataclasses.dataclass(frozen=True)
class RowError:
    """One row that could not be used: where it was and why."""

    source: str  # file path, or another name for where the rows came from
    index: int  # 0-based row index (for .jsonl: the line index)
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: row {self.index}: {self.reason}"


@dataclasses.dataclass
class Sample:
    """A decoded environment: nested fields are Python objects, not JSON strings."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    codes: dict[str, str]
    unsolved_set: dict[str, list[str]]
    answer: str
    solve_rate: float = 0.0
    data_source: str = ""
    split: str = ""
    oracle_calls: list[list[dict[str, Any]]] | None = None
    # Columns outside the format, kept so a read-then-write round trip loses nothing.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def tool_names(self) -> list[str]:
        return [tool["function"]["name"] for tool in self.tools]

    def tool_schema(self, name: str) -> dict[str, Any] | None:
        """The `function` part of the named tool's schema, or None if the sample has no such tool."""
        for tool in self.tools:
            if tool["function"]["name"] == name:
                return tool["function"]
        return None

    @property
    def num_expected(self) -> int:
        """How many expected answers are still unsolved (sum of the unsolved_set list lengths)."""
        return sum(len(answers) for answers in self.unsolved_set.values())


# ---------------------------------------------------------------------------------------------
# Field decoders: each takes the raw value (JSON string or already decoded) and returns the
# checked Python value, or raises SampleError naming what is wrong.


def _load_json(value: Any, field: str) -> Any:
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise SampleError(f"field {field!r} is not valid JSON ({exc})") from None
    return value


def _type_name(value: Any) -> str:
    return type(value).__name__


def _decode_messages(value: Any) -> list[dict[str, Any]]:
    messages = _load_json(value, "messages")
    if not isinstance(messages, (list, tuple)):
        raise SampleError(f"field 'messages' must be a list of chat messages, got {_type_name(messages)}")
    decoded = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise SampleError(f"messages[{i}] must be an object with 'role' and 'content', got {_type_name(message)}")
        # Parquet struct columns fill keys a message lacks with None; those keys were never there.
        message = {k: v for k, v in message.items() if v is not None}
        if not isinstance(message.get("role"), str):
            raise SampleError(f"messages[{i}] has no string 'role'")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise SampleError(f"messages[{i}]['content'] must be a string, got {_type_name(content)}")
        decoded.append(message)
    return decoded


def _decode_tools(value: Any) -> list[dict[str, Any]]:
    tools = _load_json(value, "tools")
    if not isinstance(tools, (list, tuple)):
        raise SampleError(f"field 'tools' must be a list of tool schemas, got {_type_name(tools)}")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(function, Mapping):
            raise SampleError(f"tools[{i}] must look like {{'type': 'function', 'function': {{...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise SampleError(f"tools[{i}]['function'] has no string 'name'")
        if name in seen:
            raise SampleError(f"tools[{i}]: tool name {name!r} appears twice; tool names must be unique")
        seen.add(name)
    return [dict(tool) for tool in tools]


def _decode_codes(value: Any) -> dict[str, str]:
    codes = _load_json(value, "codes")
    if not isinstance(codes, Mapping):
        raise SampleError(f"field 'codes' must map tool names to Python source, got {_type_name(codes)}")
    for name, source in codes.items():
        if not isinstance(source, str):
            raise SampleError(f"codes[{name!r}] must be a Python source string, got {_type_name(source)}")
    return dict(codes)


def _decode_unsolved_set(value: Any) -> dict[str, list[str]]:
    unsolved = _load_json(value, "unsolved_set")
    if not isinstance(unsolved, Mapping):
        raise SampleError(f"field 'unsolved_set' must map tool names to answer lists, got {_type_name(unsolved)}")
    decoded = {}
    for name, answers in unsolved.items():
        if not isinstance(answers, (list, tuple)) or not all(isinstance(a, str) for a in answers):
            raise SampleError(f"unsolved_set[{name!r}] must be a list of answer strings, got {answers!r:.80}")
        decoded[name] = list(answers)
    return decoded


def _decode_oracle_calls(value: Any) -> list[list[dict[str, Any]]] | None:
    turns = _load_json(value, ORACLE_COLUMN)
    if turns is None:
        return None
    if not isinstance(turns, (list, tuple)):
        raise SampleError(f"field 'oracle_calls' must be a list of turns, got {_type_name(turns)}")
    decoded = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, (list, tuple)):
            raise SampleError(f"oracle_calls[{t}] must be a list of calls, got {_type_name(turn)}")
        for c, call in enumerate(turn):
            if not (isinstance(call, Mapping) and isinstance(call.get("name"), str)
                    and isinstance(call.get("arguments"), Mapping)):
                raise SampleError(f"oracle_calls[{t}][{c}] must be {{'name': str, 'arguments': object}}")
        decoded.append([{"name": call["name"], "arguments": dict(call["arguments"])} for call in turn])
    return decoded


def _decode_string(field: str) -> Callable[[Any], str]:
    def decode(value: Any) -> str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise SampleError(f"field {field!r} must be a string, got {_type_name(value)}")
        return value

    return decode


def _decode_answer(value: Any) -> str:
    if not isinstance(value, str):
        raise SampleError(f"field 'answer' must be a string, got {_type_name(value)}")
    return value


def _decode_solve_rate(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SampleError(f"field 'solve_rate' must be a number, got {_type_name(value)}")
    return float(value)


# field -> (decoder, required). Optional fields missing from a row get the decoder's None value.
_FIELD_DECODERS: dict[str, tuple[Callable[[Any], Any], bool]] = {
    "messages": (_decode_messages, True),
    "tools": (_decode_tools, True),
    "codes": (_decode_codes, True),
    "unsolved_set": (_decode_unsolved_set, True),
    "answer": (_decode_answer, True),
    "solve_rate": (_decode_solve_rate, False),
    "data_source": (_decode_string("data_source"), False),
    "split": (_decode_string("split"), False),
    ORACLE_COLUMN: (_decode_oracle_calls, False),
}


def _check_consistency(sample: Sample) -> None:
    """Every tool the model sees, and every tool with an expected answer, must have code."""
    missing = [name for name in sample.tool_names if name not in sample.codes]
    if missing:
        raise SampleError(f"tools {missing} have a schema in 'tools' but no source in 'codes'")
    missing = [name for name in sample.unsolved_set if name not in sample.codes]
    if missing:
        raise SampleError(f"unsolved_set names tools {missing} that have no source in 'codes'")


def decode_sample(row: Mapping[str, Any] | Sample) -> Sample:
    """Checks a row and returns it decoded; nested fields may be JSON strings or already decoded.

    Raises SampleError naming the field at fault.
    """
    if isinstance(row, Sample):
        return row
    if not isinstance(row, Mapping):
        raise SampleError(f"a sample must be a JSON object (mapping), got {_type_name(row)}")
    missing = [field for field, (_, required) in _FIELD_DECODERS.items() if required and field not in row]
    if missing:
        raise SampleError(f"missing required fields {missing}")
    values = {field: decode(row.get(field)) for field, (decode, _) in _FIELD_DECODERS.items()}
    extra = {key: value for key, value in row.items() if key not in _FIELD_DECODERS}
    sample = Sample(**values, extra=extra)
    _check_consistency(sample)
    return sample


def _dumps(value: Any) -> str:
    # FTRL's JSON strings use json's default separators and keep non-ASCII text as is.
    return json.dumps(value, ensure_ascii=False)


def encode_sample(sample: Sample | Mapping[str, Any]) -> dict[str, Any]:
    """The FTRL row for a sample: nested fields as JSON strings, FTRL's column order, extras last."""
    sample = decode_sample(sample)
    row: dict[str, Any] = {
        "messages": [dict(message) for message in sample.messages],
        "tools": _dumps(sample.tools),
        "codes": _dumps(sample.codes),
        "unsolved_set": _dumps(sample.unsolved_set),
        "solve_rate": float(sample.solve_rate),
        "data_source": sample.data_source,
        "split": sample.split,
        "answer": sample.answer,
    }
    if sample.oracle_calls is not None:
        row[ORACLE_COLUMN] = _dumps(sample.oracle_calls)
    for key, value in sample.extra.items():
        row.setdefault(key, value)
    return row


def environment_key(sample: Sample | Mapping[str, Any]) -> str:
    """A fingerprint of one environment: the first 16 hex digits of the SHA-256 of what makes it (question
    messages, tools, codes, unsolved set, answer, data_source) as sorted-key JSON; not `solve_rate`, `split`,
    oracle plans or columns outside the format, which annotate it. The same environment gets the same key in
    any file, order or run; evaluations record it per episode so that two of them can be checked to be of
    the same environments before they are paired. Raises SampleError on a row that is not a valid sample."""
    sample = decode_sample(sample)
    identity = {"messages": sample.messages, "tools": sample.tools, "codes": sample.codes,
                "unsolved_set": sample.unsolved_set, "answer": sample.answer, "data_source": sample.data_source}
    content = json.dumps(identity, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Files, through Hugging Face `datasets`. A sample file is one of three forms:
#   .jsonl         one JSON object a line;
#   .parquet       FTRL's own layout (what verl's RLHFDataset reads with load_dataset("parquet"));
#   a directory    written by `datasets.Dataset.save_to_disk` (any path without a file extension).
# Readers yield (index, row or the reason the row could not be read).

JSONL, PARQUET, SAVED_DATASET = "jsonl", "parquet", "save_to_disk"
SAMPLE_FILE_FORMS = "a .jsonl file, a .parquet file, or a datasets save_to_disk directory"


def sample_file_form(path: str | os.PathLike) -> str:
    """Which form a sample-file path names: JSONL, PARQUET or SAVED_DATASET.

    An existing directory, or a path with no file extension, is a save_to_disk directory.
    Raises ValueError for any other extension.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return SAVED_DATASET
    ext = os.path.splitext(path.rstrip("/"))[1].lower()
    forms = {".jsonl": JSONL, ".parquet": PARQUET, "": SAVED_DATASET}
    if ext not in forms:
        raise ValueError(f"{path}: unsupported file type {ext!r}; use {SAMPLE_FILE_FORMS}")
    return forms[ext]


def check_output_path(path: str | os.PathLike) -> str:
    """The form `write_samples` would write at `path`; raises ValueError, before any work, for a path it
    would refuse: empty, an unsupported extension, or an existing directory that is not a save_to_disk one."""
    path = os.fspath(path)
    if not path.strip():
        raise ValueError(f"the output path is empty; pass {SAMPLE_FILE_FORMS}")
    form = sample_file_form(path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "state.json")):
        raise ValueError(f"{path} is a directory but not a datasets save_to_disk directory; remove it or choose "
                         "another path (only a directory this writer made is replaced)")
    return form


@contextlib.contextmanager
def _datasets_lib() -> Iterator[Any]:
    """`datasets`, imported on first use (it takes a second), with its progress bars off meanwhile."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _load_file(builder: str, path: str, form: str) -> Any:
    """The file as an in-memory `datasets.Dataset`, read by the named packaged builder.

    load_dataset prepares an Arrow copy in a cache directory before it hands rows out; a throwaway
    directory keeps that copy out of ~/.cache (and away from stale entries there), and
    keep_in_memory lets the directory go as soon as the rows are loaded.
    """
    with _datasets_lib() as datasets, tempfile.TemporaryDirectory(prefix="ftrl_samples_") as cache_dir:
        try:
            return datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir,
                                         keep_in_memory=True)
        except Exception as exc:  # datasets wraps reader failures in several exception types
            while exc.__cause__ is not None:  # the innermost error names the actual problem
                exc = exc.__cause__
            raise ValueError(f"{path}: cannot be read as {form} ({type(exc).__name__}: {exc}); check that the "
                             f"file is complete and really {form}") from None


def _dataset_rows(dataset: Any) -> Iterator[dict[str, Any]]:
    for batch in dataset.iter(batch_size=256):
        names = list(batch)
        for values in zip(*batch.values()):
            yield dict(zip(names, values))


def _jsonl_rows(path: str) -> Iterator[tuple[int, Any]]:
    # The "text" builder, not "json": the json builder unifies all rows into one Arrow schema, so a
    # key one row lacks comes back as null in that row (tool-call arguments, extra columns), integers
    # turn into floats next to floats, and one broken line fails the whole file. Reading lines and
    # parsing each keeps every row exactly as written and names the bad line. Blank lines stay rows
    # of the text dataset, so an index is the line index.
    if os.path.getsize(path) == 0:
        return  # datasets cannot build a split from an empty file; it has no rows
    for index, line in enumerate(_load_file("text", path, ".jsonl")["text"]):
        if index == 0:
            line = line.removeprefix("\ufeff")  # a byte-order mark some editors write at the start
        if not line.strip():
            continue  # blank lines carry no row
        try:
            yield index, json.loads(line)
        except json.JSONDecodeError as exc:
            yield index, SampleError(f"line is not valid JSON ({exc})")


def _parquet_rows(path: str) -> Iterator[tuple[int, Any]]:
    yield from enumerate(_dataset_rows(_load_file("parquet", path, ".parquet")))


def _saved_dataset_rows(path: str) -> Iterator[tuple[int, Any]]:
    with _datasets_lib() as datasets:
        if not os.path.isfile(os.path.join(path, "state.json")) and not os.path.isfile(
                os.path.join(path, "dataset_dict.json")):
            raise ValueError(f"{path}: not a datasets save_to_disk directory (no state.json); pass "
                             f"{SAMPLE_FILE_FORMS}")
        dataset = datasets.load_from_disk(path)  # memory-maps the directory's Arrow files; nothing is copied
        if isinstance(dataset, datasets.DatasetDict):
            splits = sorted(dataset)
            raise ValueError(f"{path} holds a DatasetDict with splits {splits}; pass one split's directory, "
                             f"e.g. {os.path.join(path, splits[0]) if splits else path + '/train'}")
        yield from enumerate(_dataset_rows(dataset))


def _is_plain_chat(messages: list[dict[str, Any]]) -> bool:
    return all(set(m) <= {"role", "content"} and isinstance(m.get("content", ""), str) for m in messages)


def _arrow_table(rows: list[dict[str, Any]]) -> Any:
    """The rows as an Arrow table with FTRL's column types; extra columns get pyarrow's inferred types."""
    import pyarrow as pa

    columns: dict[str, Any] = {}
    if all(_is_plain_chat(row["messages"]) for row in rows):
        # FTRL's own layout: list<struct<content, role>>.
        message_type = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
        columns["messages"] = pa.array([row["messages"] for row in rows], type=message_type)
    else:
        # Tool calls and other keys vary per message; a JSON string keeps them all.
        columns["messages"] = pa.array([_dumps(row["messages"]) for row in rows], type=pa.string())
    for name in FTRL_COLUMNS[1:]:
        kind = pa.float64() if name == "solve_rate" else pa.string()
        columns[name] = pa.array([row[name] for row in rows], type=kind)
    other = [key for row in rows for key in row if key not in columns]
    for name in dict.fromkeys(other):  # first-seen order, no duplicates
        try:
            columns[name] = pa.array([row.get(name) for row in rows])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(
                f"column {name!r} cannot be stored in Arrow columns (.parquet, save_to_disk) ({exc}); store it as "
                "a JSON string or use .jsonl"
            ) from None
    return pa.table(columns)


def _dataset(rows: list[dict[str, Any]]) -> Any:
    """The rows as a `datasets.Dataset`, fingerprinted by content so a save_to_disk is reproducible."""
    # Dataset.from_list would take the columns of the first row only and infer messages' type anew;
    # the explicit table keeps FTRL's types and every column.
    from datasets.table import InMemoryTable

    with _datasets_lib() as datasets:
        # default=repr: extra columns read from parquet may hold values JSON has no type for (timestamps).
        content = "\n".join(json.dumps(row, ensure_ascii=False, sort_keys=True, default=repr) for row in rows)
        fingerprint = hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]
        return datasets.Dataset(InMemoryTable(_arrow_table(rows)), fingerprint=fingerprint)


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    # Not Dataset.to_json: it writes through pandas, which rounds floats to 10 significant digits,
    # escapes "/" as "\/", and writes every struct key of the column into every message (null where a
    # message had none), so a write -> read -> write would neither keep the values nor give the same
    # bytes. json.dumps per row writes what FTRL's own JSON strings use: json's default separators,
    # non-ASCII text as is, floats that read back exactly.
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_parquet(path: str, rows: list[dict[str, Any]]) -> None:
    with _datasets_lib():
        _dataset(rows).to_parquet(path)


def _write_saved_dataset(path: str, rows: list[dict[str, Any]]) -> None:
    with _datasets_lib():
        _dataset(rows).save_to_disk(path)


_READERS: dict[str, Callable[[str], Iterator[tuple[int, Any]]]] = {
    JSONL: _jsonl_rows, PARQUET: _parquet_rows, SAVED_DATASET: _saved_dataset_rows,
}
_WRITERS: dict[str, Callable[[str, list[dict[str, Any]]], None]] = {
    JSONL: _write_jsonl, PARQUET: _write_parquet, SAVED_DATASET: _write_saved_dataset,
}


def read_samples(path: str | os.PathLike) -> tuple[list[Sample], list[RowError]]:
    """Reads samples from a .jsonl file, a .parquet file or a datasets save_to_disk directory.

    Returns (samples, errors): a malformed row is skipped, listed in `errors` with its 0-based index
    (for .jsonl: the line index) and the reason, and logged as a warning. Raises FileNotFoundError
    for a missing path and ValueError for an unsupported form or a file that cannot be read at all.
    """
    path = os.fspath(path)
    reader = _READERS[sample_file_form(path)]
    if not os.path.exists(path):
        raise FileNotFoundError(f"sample file {path!r} does not exist; pass {SAMPLE_FILE_FORMS}")
    samples: list[Sample] = []
    errors: list[RowError] = []
    for index, row in reader(path):
        try:
            if isinstance(row, SampleError):
                raise row
            samples.append(decode_sample(row))
        except SampleError as exc:
            error = RowError(source=path, index=index, reason=str(exc))
            logger.warning("skipping malformed sample: %s", error)
            errors.append(error)
    return samples, errors


def _replace(partial: str, path: str) -> None:
    """Moves the finished `partial` onto `path`; an old save_to_disk directory there is swapped out whole."""
    if not os.path.isdir(path):
        os.replace(partial, path)
        return
    if not os.path.isfile(os.path.join(path, "state.json")):
        raise ValueError(f"{path} is a directory but not a datasets save_to_disk directory; remove it or "
                         "choose another path (only a directory this writer made is replaced)")
    old = path + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    os.replace(partial, path)
    shutil.rmtree(old, ignore_errors=True)


def write_samples(path: str | os.PathLike, samples: Sequence[Sample | Mapping[str, Any]]) -> int:
    """Writes samples as FTRL rows and returns how many were written.

    The form follows the path (see `sample_file_form`): .jsonl, .parquet, or a save_to_disk directory
    for a path without extension. Every sample is checked first (SampleError names the first bad one,
    and nothing is written). Output is deterministic: the same samples give the same bytes, so a file
    read and written again is unchanged. The file (or directory) is replaced atomically, so readers
    never see half of it.
    """
    path = os.fspath(path).rstrip("/") or os.fspath(path)
    writer = _WRITERS[check_output_path(path)]
    rows = []
    for index, sample in enumerate(samples):
        try:
            rows.append(encode_sample(sample))
        except SampleError as exc:
            raise SampleError(f"{path}: sample {index}: {exc}") from None
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    partial = path + ".partial"
    _remove(partial)
    try:
        writer(partial, rows)
        _replace(partial, path)
    finally:
        _remove(partial)
    return len(rows)


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


# ---------------------------------------------------------------------------------------------
# Example arguments from a tool's JSON schema, for smoke-running environments and benchmarks.

_EXAMPLE_STRING_BY_FORMAT = {
    "date": "2024-01-01",
    "date-time": "2024-01-01T12:00:00",
    "time": "12:00:00",
    "email": "user@example.com",
    "uri": "https://example.com",
}

_EXAMPLE_BY_TYPE: dict[str, Callable[[Mapping[str, Any], int], Any]] = {
    "string": lambda schema, depth: _EXAMPLE_STRING_BY_FORMAT.get(schema.get("format"), "example"),
    "integer": lambda schema, depth: int(schema.get("minimum", 1)),
    "number": lambda schema, depth: float(schema.get("minimum", 1.0)),
    "boolean": lambda schema, depth: True,
    "null": lambda schema, depth: None,
    # Two items: list tools often refuse fewer (sums, concatenations, comparisons).
    "array": lambda schema, depth: [_example_value(schema.get("items"), depth + 1)] * max(2, schema.get("minItems", 0)),
    "object": lambda schema, depth: _example_object(schema, depth + 1),
}
_MAX_SCHEMA_DEPTH = 8


def _example_value(schema: Any, depth: int) -> Any:
    if not isinstance(schema, Mapping) or depth > _MAX_SCHEMA_DEPTH:
        return "example"
    if schema.get("default") is not None:
        return schema["default"]
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type", "string")
    if isinstance(kind, list):  # e.g. ["string", "null"]: the first non-null type
        kind = next((k for k in kind if k != "null"), "null")
    return _EXAMPLE_BY_TYPE.get(kind, _EXAMPLE_BY_TYPE["string"])(schema, depth)


def _example_object(schema: Mapping[str, Any], depth: int, include_optional: bool = False) -> dict[str, Any]:
    properties = schema.get("properties") or {}
    required = schema.get("required") or []
    names = list(properties) if include_optional else required
    return {name: _example_value(properties.get(name), depth) for name in names if isinstance(name, str)}


def example_arguments(parameters: Mapping[str, Any], include_optional: bool = False) -> dict[str, Any]:
    """Plausible arguments for a tool from its JSON schema: every required parameter, or every one.

    A value is the parameter's default, else its first enum value, else a value of its type.
    """
    return _example_object(parameters, 0, include_optional)
