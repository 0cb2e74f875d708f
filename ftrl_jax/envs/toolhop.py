"""ToolHop (bytedance-research/ToolHop) rows converted into FTRL samples.

A ToolHop row has a multi-hop `question`, its `answer`, `sub_task` (sub-question -> sub-answer),
`tools` (sub-question -> function schema of the tool answering it), `functions` (Python sources)
and sometimes `gold_calls` (Python call expressions). The sample gets:
- `codes`: tool name (from each source's `def`) -> source, with module-level "example usage"
  statements removed (they would run, print and sometimes raise on every call);
- `tools`: the schemas as FTRL tool entries; `unsolved_set`: each sub-answer under the tool that
  answers its sub-question; `messages`: FTRL's instruction and the question;
- `data_source = "toolhop/<category or domain>"`, `split = "test"`, `solve_rate = 0`;
- `oracle_calls` from `gold_calls` when they can be read (one call per turn, in order).

A few rows hold two different functions with the same name; each schema is paired with the
source whose parameters it names, and later ones are renamed `<name>_2`, `<name>_3`, ...
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ftrl_jax.envs.samples import RowError, Sample, SampleError, decode_sample, example_arguments, user_prompt
from ftrl_jax.envs.sandbox import Sandbox, ToolRequest, is_error_output, shared_sandbox

logger = logging.getLogger(__name__)

_REQUIRED_KEYS = ("question", "answer", "sub_task", "tools", "functions")


# ---------------------------------------------------------------------------------------------
# Sources.


_DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Pass)


def _is_definition(statement: ast.stmt) -> bool:
    """Statements that only define things: safe and needed at module level."""
    if isinstance(statement, _DEFINITIONS):
        return True
    if isinstance(statement, (ast.Assign, ast.AnnAssign)):
        value = statement.value
        return value is None or not any(isinstance(node, ast.Call) for node in ast.walk(value))
    if isinstance(statement, ast.Expr):  # a bare string: a docstring
        return isinstance(statement.value, ast.Constant) and isinstance(statement.value.value, str)
    if isinstance(statement, ast.Try):  # e.g. try: import dateutil / except ImportError: ...
        blocks = [statement.body, statement.orelse, statement.finalbody] + [h.body for h in statement.handlers]
        return all(_is_definition(inner) for block in blocks for inner in block)
    return False


def _first_line(statement: ast.stmt) -> int:
    decorators = getattr(statement, "decorator_list", [])
    return min([statement.lineno] + [d.lineno for d in decorators])


def strip_example_usage(source: str) -> str:
    """The source without module-level statements that do things (calls, prints, loops, main guards).

    Returns the source unchanged if it does not parse or nothing needs removing.
    """
    try:
        module = ast.parse(source)
    except SyntaxError:
        return source
    drop: set[int] = set()
    keep: set[int] = set()
    for statement in module.body:
        lines = set(range(_first_line(statement), (statement.end_lineno or statement.lineno) + 1))
        (keep if _is_definition(statement) else drop).update(lines)
    drop -= keep  # a line shared with a kept statement stays
    if not drop:
        return source
    kept = [line for number, line in enumerate(source.splitlines(keepends=True), start=1) if number not in drop]
    return "".join(kept).rstrip() + "\n"


def _function_def(source: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    """The first module-level function definition of a source (the tool it provides)."""
    try:
        module = ast.parse(source)
    except SyntaxError as exc:
        raise SampleError(f"a function source does not parse ({exc.msg}, line {exc.lineno})") from None
    for statement in module.body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return statement
    raise SampleError(f"a function source defines no function: {source[:60]!r}")


def _parameter_names(definition: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    arguments = definition.args
    return [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]


def _rename_function(source: str, definition: ast.FunctionDef | ast.AsyncFunctionDef, new_name: str) -> str:
    lines = source.splitlines(keepends=True)
    index = definition.lineno - 1
    pattern = r"^(\s*(?:async\s+)?def\s+)" + re.escape(definition.name) + r"\b"
    lines[index] = re.sub(pattern, lambda m: m.group(1) + new_name, lines[index], count=1)
    return "".join(lines)


def _overlap(schema: Mapping[str, Any], parameters: Sequence[str]) -> float:
    properties = set((schema.get("parameters") or {}).get("properties") or {})
    union = properties | set(parameters)
    return len(properties & set(parameters)) / len(union) if union else 1.0


def _pair_tools(
    schemas: list[dict[str, Any]], sources: list[str]
) -> list[tuple[dict[str, Any], str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Pairs every schema with its source (by name; same-named ones by the parameters they name)."""
    by_name: dict[str, list[tuple[str, Any]]] = {}
    for source in sources:
        definition = _function_def(source)
        by_name.setdefault(definition.name, []).append((source, definition))
    pairs = []
    for schema in schemas:
        name = schema.get("name")
        candidates = by_name.get(name) if isinstance(name, str) else None
        if not candidates:
            raise SampleError(f"tool schema {name!r} has no function of that name in 'functions'")
        scores = [_overlap(schema, _parameter_names(definition)) for _, definition in candidates]
        best = max(scores)
        if scores.count(best) > 1:
            raise SampleError(
                f"cannot tell which of the {len(candidates)} functions named {name!r} this schema describes"
            )
        source, definition = candidates.pop(scores.index(best))
        pairs.append((schema, source, definition))
    return pairs


# ---------------------------------------------------------------------------------------------
# Gold calls.


def _oracle_call(expression: str, parameters: Mapping[str, list[str]]) -> dict[str, Any]:
    """`tool(a, b=1)` -> {"name": "tool", "arguments": {...}}; positional values get parameter names."""
    node = ast.parse(expression.strip(), mode="eval").body
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError("not a plain function call")
    name = node.func.id
    if name not in parameters:
        raise ValueError(f"calls unknown tool {name!r}")
    names = parameters[name]
    if len(node.args) > len(names):
        raise ValueError(f"{name} gets {len(node.args)} positional values but takes {len(names)}")
    arguments = {names[i]: ast.literal_eval(value) for i, value in enumerate(node.args)}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise ValueError("uses **kwargs")
        arguments[keyword.arg] = ast.literal_eval(keyword.value)
    return {"name": name, "arguments": arguments}


def _oracle_calls(
    gold_calls: Any, parameters: Mapping[str, list[str]], row_id: str
) -> list[list[dict[str, Any]]] | None:
    if not gold_calls:
        return None
    try:
        calls = [_oracle_call(expression, parameters) for expression in gold_calls]
        json.dumps(calls)  # the literals must survive the JSON column
    except (SyntaxError, ValueError, TypeError) as exc:
        logger.warning("ToolHop row %s: gold_calls not kept as oracle_calls (%s)", row_id, exc)
        return None
    return [[call] for call in calls]


# ---------------------------------------------------------------------------------------------
# Rows.


def _data_source(row: Mapping[str, Any]) -> str:
    topic = row.get("category") or row.get("domain") or "unknown"
    return "toolhop/" + re.sub(r"\s+", "_", str(topic).strip().lower())


def convert_toolhop_row(row: Mapping[str, Any]) -> Sample:
    """One ToolHop row as an FTRL sample; raises SampleError saying what in the row is wrong."""
    missing = [key for key in _REQUIRED_KEYS if key not in row]
    if missing:
        raise SampleError(f"missing ToolHop fields {missing}")
    if not isinstance(row["question"], str) or not row["question"].strip():
        raise SampleError("'question' must be a non-empty string")
    if not isinstance(row["answer"], (str, int, float)):
        raise SampleError(f"'answer' must be a string, got {type(row['answer']).__name__}")
    sub_task, tool_by_question = row["sub_task"], row["tools"]
    if not isinstance(sub_task, Mapping) or not isinstance(tool_by_question, Mapping):
        raise SampleError("'sub_task' and 'tools' must map sub-questions to answers and schemas")
    if set(sub_task) != set(tool_by_question):
        raise SampleError("'sub_task' and 'tools' do not list the same sub-questions")
    questions = list(tool_by_question)
    schemas = [dict(tool_by_question[q]) if isinstance(tool_by_question[q], Mapping) else {} for q in questions]
    sources = row["functions"]
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise SampleError("'functions' must be a list of Python sources")

    codes: dict[str, str] = {}
    tools: list[dict[str, Any]] = []
    parameters: dict[str, list[str]] = {}
    renamed = False
    unsolved: dict[str, list[str]] = {}
    seen_names: dict[str, int] = {}
    for question, (schema, source, definition) in zip(questions, _pair_tools(schemas, sources)):
        name = definition.name
        seen_names[name] = seen_names.get(name, 0) + 1
        if seen_names[name] > 1:  # a second, different function of the same name
            name = f"{name}_{seen_names[name]}"
            source = _rename_function(source, definition, name)
            schema = {**schema, "name": name}
            renamed = True
        codes[name] = strip_example_usage(source)
        parameters[name] = [a.arg for a in definition.args.posonlyargs + definition.args.args]
        tools.append({"type": "function", "function": schema})
        unsolved.setdefault(name, []).append(str(sub_task[question]))

    row_id = str(row.get("id", "?"))
    # Gold calls name the original functions; with renamed duplicates they are ambiguous.
    oracle = None if renamed else _oracle_calls(row.get("gold_calls"), parameters, row_id)
    sample_row = {
        "messages": [{"role": "user", "content": user_prompt(row["question"])}],
        "tools": tools,
        "codes": codes,
        "unsolved_set": unsolved,
        "solve_rate": 0.0,
        "data_source": _data_source(row),
        "split": "test",
        "answer": str(row["answer"]),
        "oracle_calls": oracle,
        "id": row_id,
    }
    return decode_sample(sample_row)


def convert_toolhop(path: str | os.PathLike) -> tuple[list[Sample], list[RowError]]:
    """Converts a ToolHop .jsonl file; a row that cannot be converted is reported, logged and skipped."""
    path = os.fspath(path)
    samples: list[Sample] = []
    errors: list[RowError] = []
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, Mapping):
                    raise SampleError(f"a row must be a JSON object, got {type(row).__name__}")
                samples.append(convert_toolhop_row(row))
            except (json.JSONDecodeError, SampleError) as exc:
                error = RowError(source=path, index=index, reason=str(exc))
                logger.warning("skipping ToolHop row: %s", error)
                errors.append(error)
    return samples, errors


# ---------------------------------------------------------------------------------------------
# Validation: do the converted tools run?


def smoke_requests(sample: Sample, include_optional: bool = False) -> list[ToolRequest]:
    """One call per tool of a sample, with the required (or all) parameters filled plausibly."""
    return [
        ToolRequest(
            sample.codes,
            tool["function"]["name"],
            example_arguments(tool["function"].get("parameters") or {}, include_optional),
        )
        for tool in sample.tools
    ]


def check_tools_run(
    samples: Sequence[Sample], *, sandbox: Sandbox | None = None, source: str = "samples"
) -> tuple[int, list[RowError]]:
    """How many samples have every tool run without crashing on a plausible call.

    A tool "runs" when the sandbox returns the tool's own output (its own error dicts included)
    rather than the sandbox's error message. Each tool gets a call with its required parameters;
    if that fails, a second call with every parameter of its schema (functions often lack
    defaults for parameters the schema calls optional). Returns (number of samples that run, one
    RowError per sample that does not, naming a failing tool and its message).
    """
    sandbox = sandbox or shared_sandbox()
    # (sample index, tool position) of every call, then the calls themselves, in one flat batch.
    labels = [(index, position) for index, sample in enumerate(samples) for position in range(len(sample.tools))]
    outputs = sandbox.call_many([smoke_requests(samples[i])[p] for i, p in labels])
    retry = [label for label, output in zip(labels, outputs) if is_error_output(output)]
    retried = sandbox.call_many([smoke_requests(samples[i], include_optional=True)[p] for i, p in retry])
    failures: dict[int, list[str]] = {}
    for (index, _), output in zip(retry, retried):
        if is_error_output(output):
            failures.setdefault(index, []).append(output)
    problems = [
        RowError(source, i, f"{len(failures[i])} of {len(samples[i].tools)} tools fail, e.g. {failures[i][0][:300]}")
        for i in sorted(failures)
    ]
    return len(samples) - len(failures), problems
