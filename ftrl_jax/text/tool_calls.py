"""Parsing generated assistant turns into reasoning, content and tool calls.

Two wire formats are understood (`parse_assistant_turn(text, fmt=...)`):
- "qwen" (Qwen / Hermes): zero or more `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks
  around free text;
- "llama3" (Llama 3.1 JSON): the whole turn is one JSON call `{"name": ..., "parameters": {...}}`, a list of
  them, or several separated by `;`, optionally after `<|python_tag|>`.

Before either format is parsed, a leading `<think>...</think>` block (Qwen3 thinking mode) is split off as
reasoning, so a call the model only drafted while thinking is not executed.

A block that is not valid JSON, has no name, or whose arguments are not an object is not a call; it is
reported in `ParsedTurn.errors` and `ParsedTurn.malformed` is set, so rewards can penalise broken markup.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
PYTHON_TAG = "<|python_tag|>"
_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>")
# Keys some models use instead of "arguments"; looked up in this order.
_ARGUMENT_KEYS = ("arguments", "parameters")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One well-formed call: a function name and its keyword arguments."""

    name: str
    arguments: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The call as the JSON object the Qwen format carries inside `<tool_call>`."""
        return {"name": self.name, "arguments": self.arguments}

    def to_openai(self) -> dict[str, Any]:
        """The call as an OpenAI-style `tool_calls` entry (arguments kept as a dict)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass(frozen=True)
class ParsedTurn:
    """One assistant turn: free text, the well-formed calls, and whether broken markup was seen.

    `errors` says, one line per problem, what was wrong with the tool-call markup; `malformed` is true
    exactly when there is at least one. `reasoning` is the text of a `<think>` block ("" when none).
    """

    content: str
    tool_calls: list[ToolCall]
    malformed: bool
    reasoning: str = ""
    errors: tuple[str, ...] = ()


def strip_end_markers(text: str) -> str:
    """Drops trailing end-of-turn special tokens (`<|im_end|>`, `<|endoftext|>`, ...)."""
    text = text.rstrip()
    changed = True
    while changed:
        changed = False
        for marker in _END_MARKERS:
            if text.endswith(marker):
                text = text[: -len(marker)].rstrip()
                changed = True
    return text


def split_reasoning(text: str) -> tuple[str, str]:
    """Splits `<think>reasoning</think>rest` into `(reasoning, rest)`.

    The opening tag may be missing (some templates put it in the prompt). A `<think>` that is never closed
    (generation cut off while thinking) makes the whole text reasoning.
    """
    if THINK_CLOSE in text:
        reasoning, rest = text.split(THINK_CLOSE, 1)
        # Same rule as the Qwen3 chat template: the reasoning starts after the last `<think>`.
        return reasoning.split(THINK_OPEN)[-1].strip(), rest
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        return stripped[len(THINK_OPEN) :].strip(), ""
    return "", text


def _as_call(obj: Any) -> tuple[ToolCall | None, str]:
    """A JSON value becomes a call only if it has a non-empty string name and object arguments.

    Returns the call, or None and the reason it is not one.
    """
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None, f"missing or empty string 'name' (got {name!r})"
    args: Any = {}
    for key in _ARGUMENT_KEYS:
        if key in obj:
            args = obj[key]
            break
    if args is None:
        args = {}
    if isinstance(args, str):
        # Some models emit the arguments as a JSON-encoded string.
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as err:
            return None, f"call {name!r}: arguments string is not valid JSON ({err})"
    if not isinstance(args, dict):
        return None, f"call {name!r}: arguments must be a JSON object, got {type(args).__name__}"
    return ToolCall(name=name.strip(), arguments=args), ""


def _parse_qwen_calls(text: str) -> tuple[str, list[ToolCall], list[str]]:
    """Finds `<tool_call>` blocks; content is the text outside them, one stripped piece a line."""
    calls: list[ToolCall] = []
    errors: list[str] = []
    outside: list[str] = []  # the text between blocks
    position = 0
    for number, match in enumerate(_TOOL_CALL_BLOCK.finditer(text), start=1):
        outside.append(text[position : match.start()])
        position = match.end()
        body = match.group(1).strip()
        try:
            call, reason = _as_call(json.loads(body))
        except json.JSONDecodeError as err:
            call, reason = None, f"not valid JSON ({err})"
        if call is None:
            errors.append(f"<tool_call> block {number}: {reason}: {body[:80]!r}")
        else:
            calls.append(call)
    outside.append(text[position:])
    content = "\n".join(piece.strip() for piece in outside if piece.strip())
    # Tags left over after removing complete blocks are unbalanced markup (often a cut-off generation).
    if TOOL_CALL_OPEN in content:
        errors.append("unterminated <tool_call> block (no matching </tool_call>)")
    if TOOL_CALL_CLOSE in content:
        errors.append("</tool_call> without a matching <tool_call>")
    return content, calls, errors


def _decode_json_sequence(body: str) -> list[Any] | None:
    """Decodes one or more JSON values separated by whitespace or `;`; None if any part is not JSON."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    position = 0
    while True:
        while position < len(body) and (body[position].isspace() or body[position] == ";"):
            position += 1
        if position == len(body):
            return values
        try:
            value, position = decoder.raw_decode(body, position)
        except json.JSONDecodeError:
            return None
        values.append(value)


def _parse_llama_calls(text: str) -> tuple[str, list[ToolCall], list[str]]:
    """Parses the Llama 3.1 JSON tool-call format (the turn is a JSON call or a list of them)."""
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG) :].strip()
    if not body.startswith(("{", "[")):
        return text.strip(), [], []
    values = _decode_json_sequence(body)
    if values is None:
        return text.strip(), [], [f"turn starts like a JSON tool call but is not valid JSON: {body[:80]!r}"]
    objects: list[Any] = []
    for value in values:
        objects.extend(value if isinstance(value, list) else [value])
    # A JSON answer that never names a function is plain content, not a failed call.
    if not any(isinstance(obj, dict) and "name" in obj for obj in objects):
        return text.strip(), [], []
    calls: list[ToolCall] = []
    errors: list[str] = []
    for number, obj in enumerate(objects, start=1):
        call, reason = _as_call(obj)
        if call is None:
            errors.append(f"JSON call {number}: {reason}")
        else:
            calls.append(call)
    return "", calls, errors


_CALL_PARSERS: dict[str, Callable[[str], tuple[str, list[ToolCall], list[str]]]] = {
    "qwen": _parse_qwen_calls,
    "llama3": _parse_llama_calls,
}


def parse_assistant_turn(text: str, fmt: str = "qwen") -> ParsedTurn:
    """Splits a generated assistant turn into reasoning, content and tool calls for the given format."""
    try:
        parse_calls = _CALL_PARSERS[fmt]
    except KeyError:
        raise ValueError(f"unknown tool-call format {fmt!r}; expected one of {sorted(_CALL_PARSERS)}") from None
    reasoning, rest = split_reasoning(strip_end_markers(text))
    content, calls, errors = parse_calls(rest)
    return ParsedTurn(
        content=content, tool_calls=calls, malformed=bool(errors), reasoning=reasoning, errors=tuple(errors)
    )


def parse_qwen_turn(text: str) -> ParsedTurn:
    """Parses a turn in the Qwen `<tool_call>` format."""
    return parse_assistant_turn(text, "qwen")


def parse_llama_turn(text: str) -> ParsedTurn:
    """Parses a turn in the Llama 3.1 JSON tool-call format."""
    return parse_assistant_turn(text, "llama3")


def format_qwen_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """The `<tool_call>` block Qwen chat templates write for one call (dict arguments)."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return TOOL_CALL_OPEN + "\n" + body + "\n" + TOOL_CALL_CLOSE
