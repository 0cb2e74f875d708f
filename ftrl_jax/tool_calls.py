"""Parsing generated assistant turns into content and tool calls.

Two wire formats are understood:
- Qwen / Hermes: zero or more `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks;
- Llama 3.1 JSON: the whole turn is one JSON object `{"name": ..., "parameters": {...}}`
  (or a list of them), optionally after `<|python_tag|>`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": self.arguments}


@dataclasses.dataclass(frozen=True)
class ParsedTurn:
    """One assistant turn: free text, the well-formed calls, and whether broken markup was seen."""

    content: str
    tool_calls: list[ToolCall]
    malformed: bool


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


def _as_call(obj: Any, args_key: str = "arguments") -> ToolCall | None:
    """A JSON object becomes a call only if it has a string name and object-like arguments."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if args is None:
        args = {}
    if isinstance(args, str):
        # Some models emit the arguments as a JSON-encoded string.
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(name=name.strip(), arguments=args)


def parse_qwen_turn(text: str) -> ParsedTurn:
    """Parses `<tool_call>` blocks; content is the text outside them."""
    text = strip_end_markers(text)
    calls: list[ToolCall] = []
    malformed = False
    for match in _TOOL_CALL_BLOCK.finditer(text):
        body = match.group(1).strip()
        try:
            call = _as_call(json.loads(body))
        except json.JSONDecodeError:
            call = None
        if call is None:
            malformed = True
        else:
            calls.append(call)
    content = _TOOL_CALL_BLOCK.sub("", text)
    # Unbalanced tags left after removing complete blocks are broken markup too.
    if TOOL_CALL_OPEN in content or TOOL_CALL_CLOSE in content:
        malformed = True
    return ParsedTurn(content=content.strip(), tool_calls=calls, malformed=malformed)


def parse_llama_turn(text: str) -> ParsedTurn:
    """Parses the Llama 3.1 JSON tool-call format (the turn is a JSON call or a list of them)."""
    text = strip_end_markers(text)
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>") :].strip()
    if not body.startswith(("{", "[")):
        return ParsedTurn(content=text.strip(), tool_calls=[], malformed=False)
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        # Llama 3.1 may separate several calls with ';'.
        parts = [p.strip() for p in body.split(";") if p.strip()]
        try:
            obj = [json.loads(p) for p in parts]
        except json.JSONDecodeError:
            return ParsedTurn(content=text.strip(), tool_calls=[], malformed=True)
    objs = obj if isinstance(obj, list) else [obj]
    calls = [_as_call(o, args_key="parameters") for o in objs]
    good = [c for c in calls if c is not None]
    if not good:
        return ParsedTurn(content=text.strip(), tool_calls=[], malformed=True)
    return ParsedTurn(content="", tool_calls=good, malformed=len(good) != len(calls))


_PARSERS = {"qwen": parse_qwen_turn, "llama3": parse_llama_turn}


def parse_assistant_turn(text: str, fmt: str = "qwen") -> ParsedTurn:
    """Splits a generated assistant turn into `{content, tool_calls}` for the given format."""
    try:
        parser = _PARSERS[fmt]
    except KeyError:
        raise ValueError(f"unknown tool-call format {fmt!r}; expected one of {sorted(_PARSERS)}") from None
    return parser(text)


def format_qwen_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """The `<tool_call>` block Qwen chat templates write for one call."""
    return TOOL_CALL_OPEN + "\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n" + TOOL_CALL_CLOSE
