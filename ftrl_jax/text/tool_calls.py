"""Parsing generated assistant turns into reasoning, content and tool calls.

One parser serves rollouts, evaluation and the server. Two wire formats are understood
(`parse_assistant_turn(text, fmt=...)`):
- "qwen" (Qwen / Hermes): zero or more `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks
  around free text;
- "llama3" (Llama 3.1 JSON): the whole turn is one JSON call `{"name": ..., "parameters": {...}}`, a list of
  them, or several separated by `;`, optionally after `<|python_tag|>`.

Algorithm (JSON-aware, as vLLM's and sglang's fixed parsers are): the text is never searched for a closing
delimiter inside a call. After each `<tool_call>` ONE JSON value is decoded (`json.JSONDecoder.raw_decode`,
which knows strings and escapes), and only then is `</tool_call>` expected. So a delimiter the parser looks
for (`<tool_call>`, `</tool_call>`, `<think>`, `</think>`, `<|im_end|>`, `<|eot_id|>`, ...) inside a JSON
string never splits a call. The same rule finds the reasoning: a leading `<think>...</think>` block (Qwen3
thinking mode) is split off first, at the first `</think>` that is not inside a call's JSON, so a call the
model only drafted while thinking is not executed. Trailing end-of-turn tokens are dropped before parsing.

A block that is not valid JSON, has no name, or whose arguments are not an object is not a call; it is
reported in `ParsedTurn.errors` (and left out of `content`) and `ParsedTurn.malformed` is set, so rewards
can penalise broken markup. A broken block ends at its `</tool_call>`, else at the next `<tool_call>`, else
at the end of the text.

Malformed but recovered: a complete call whose `</tool_call>` is missing (the JSON value is followed by the
end of the turn, an end-of-turn token or the next `<tool_call>`) IS returned as a call, as vLLM's hermes
parser returns it, and the missing tag is ALSO reported in `errors` (so `malformed` is true). The call
is unambiguous, so rollouts run it and the server answers `finish_reason: "tool_calls"`; the flag keeps the
format slip visible to metrics and to rewards that want to penalise it (`malformed` together with
`tool_calls` already meant "some markup was broken, these calls were fine"). A JSON value cut off mid-object
is no call, and malformed.

Where this parser deliberately differs from vLLM:
- inside explicit `<tool_call>` tags a call without an `arguments`/`parameters` key is a call with no
  arguments (vLLM's hermes parser drops the whole turn's calls): the tags make the intent unambiguous;
- a call whose name or arguments hold a lone UTF-16 surrogate (`"\\ud800"` not followed by a low surrogate)
  is malformed: such a string is not valid Unicode, cannot be encoded as UTF-8 (an HTTP reply with it
  fails) and names no tool;
- a missing `</tool_call>` is flagged in `errors` (vLLM is silent), see above;
- in the Llama format, JSON followed by other text is no call and is flagged (vLLM gives no call silently),
  while JSON that is not call-shaped (no `name`, or neither `parameters` nor `arguments`) is plain content,
  as in vLLM.
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
_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>")
# Keys some models use instead of "arguments"; looked up in this order.
_ARGUMENT_KEYS = ("arguments", "parameters")
_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"\s*")
_SURROGATE = re.compile("[\ud800-\udfff]")  # json combines valid pairs, so any left is a lone one


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
    exactly when there is at least one. A call recovered from imperfect markup (a missing `</tool_call>`)
    is in `tool_calls` AND reported in `errors`. `reasoning` is the text of a `<think>` block ("" when none).
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


# ---- JSON-aware scanning ------------------------------------------------------------------------


def _skip_whitespace(text: str, position: int) -> int:
    return _WHITESPACE.match(text, position).end()


def _decode_value(text: str, position: int) -> tuple[Any, int]:
    """Decodes the one JSON value starting at `position` (after whitespace): (value, end index).

    Raises ValueError (json.JSONDecodeError, or for nesting too deep to decode) when there is none.
    """
    try:
        return _DECODER.raw_decode(text, _skip_whitespace(text, position))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _value_end(text: str, position: int) -> int | None:
    """End index of the JSON value starting at `position` (after whitespace), or None if there is none."""
    try:
        return _decode_value(text, position)[1]
    except ValueError:
        return None


def _leading_json_end(text: str) -> int:
    """In the Llama format, where the JSON values that open the turn (after `<|python_tag|>`) end; 0 if none."""
    position = _skip_whitespace(text, 0)
    if text.startswith(PYTHON_TAG, position):
        position += len(PYTHON_TAG)
    end = 0
    while True:
        while position < len(text) and (text[position].isspace() or text[position] == ";"):
            position += 1
        if not text.startswith(("{", "["), position):
            return end
        value_end = _value_end(text, position)
        if value_end is None:
            return end
        position = end = value_end


def _find_outside_calls(text: str, needle: str, start: int = 0) -> int:
    """Index of the first `needle` at or after `start` that is not inside the JSON of a `<tool_call>`; -1 if none.

    A `<tool_call>` followed by a decodable JSON value hides that value; one followed by anything else
    hides nothing (broken markup is text).
    """
    position = start
    while True:
        hit = text.find(needle, position)
        opener = text.find(TOOL_CALL_OPEN, position)
        if hit < 0 or opener < 0 or hit < opener:
            return hit
        body = opener + len(TOOL_CALL_OPEN)
        end = _value_end(text, body)
        position = body if end is None else end


def split_reasoning(text: str, fmt: str = "qwen") -> tuple[str, str]:
    """Splits `<think>reasoning</think>rest` into `(reasoning, rest)`.

    The opening tag may be missing (some templates put it in the prompt). A `<think>` that is never closed
    (generation cut off while thinking) makes the whole text reasoning. Tags inside the JSON of a call
    (a `<tool_call>` value, or in the "llama3" format the JSON that opens the turn) are not tags.
    """
    start = _leading_json_end(text) if fmt == "llama3" else 0
    close = _find_outside_calls(text, THINK_CLOSE, start)
    if close >= 0:
        # Same rule as the Qwen3 chat template: the reasoning starts after the last `<think>` before the close.
        begin = 0
        opener = _find_outside_calls(text, THINK_OPEN, start)
        while 0 <= opener < close:
            begin = opener + len(THINK_OPEN)
            opener = _find_outside_calls(text, THINK_OPEN, begin)
        return text[begin:close].strip(), text[close + len(THINK_CLOSE) :]
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        return stripped[len(THINK_OPEN) :].strip(), ""
    return "", text


# ---- calls -------------------------------------------------------------------------------------------


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string (or key) in a decoded JSON value holds a lone UTF-16 surrogate."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _as_call(obj: Any) -> tuple[ToolCall | None, str]:
    """A JSON value becomes a call only if it has a non-empty string name and object arguments.

    Arguments may be missing or null (no arguments) or a JSON-encoded string holding an object (OpenAI
    style). Returns the call, or None and the reason it is not one.
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
        except (ValueError, RecursionError) as err:
            return None, f"call {name!r}: arguments string is not valid JSON ({err})"
    if not isinstance(args, dict):
        return None, f"call {name!r}: arguments must be a JSON object, got {type(args).__name__}"
    if _has_lone_surrogate(name) or _has_lone_surrogate(args):
        return None, f"call {name!r}: a lone UTF-16 surrogate escape is not valid Unicode"
    return ToolCall(name=name.strip(), arguments=args), ""


def _ends_turn(text: str, position: int) -> bool:
    """Whether only the end of the text, an end-of-turn token or the next `<tool_call>` follows `position`."""
    return position == len(text) or text.startswith((TOOL_CALL_OPEN,) + _END_MARKERS, position)


def _parse_qwen_calls(text: str) -> tuple[str, list[ToolCall], list[str]]:
    """Finds `<tool_call>` blocks (JSON-aware); content is the text outside them, one stripped piece a line."""
    calls: list[ToolCall] = []
    errors: list[str] = []
    outside: list[str] = []  # the text between blocks
    position = 0
    number = 0
    while True:
        opener = text.find(TOOL_CALL_OPEN, position)
        if opener < 0:
            break
        number += 1
        outside.append(text[position:opener])
        body = opener + len(TOOL_CALL_OPEN)
        try:
            value, value_end = _decode_value(text, body)
        except ValueError as err:
            reason, search_from = f"not valid JSON ({err})", body
        else:
            after = _skip_whitespace(text, value_end)
            call, reason = _as_call(value)
            if text.startswith(TOOL_CALL_CLOSE, after):  # the well-formed block
                position = after + len(TOOL_CALL_CLOSE)
                if call is None:
                    errors.append(f"<tool_call> block {number}: {reason}: {text[body:after].strip()[:80]!r}")
                else:
                    calls.append(call)
                continue
            if _ends_turn(text, after):  # complete JSON, closing tag missing: recovered (see module notes)
                position = after
                if call is None:
                    errors.append(f"<tool_call> block {number}: {reason} (and no closing {TOOL_CALL_CLOSE})")
                else:
                    calls.append(call)
                    errors.append(f"<tool_call> block {number}: no closing {TOOL_CALL_CLOSE} after the JSON "
                                  f"(call {call.name!r} kept)")
                continue
            # Text after the JSON value: the block is broken; look for its end after the value only, so
            # delimiters inside the value's strings are not taken for the block's end.
            reason, search_from = f"not valid JSON (extra text after the JSON value: {text[after:after + 20]!r})", \
                value_end
        close = text.find(TOOL_CALL_CLOSE, search_from)
        next_open = text.find(TOOL_CALL_OPEN, search_from)
        if close >= 0 and (next_open < 0 or close < next_open):
            block_end, position = close, close + len(TOOL_CALL_CLOSE)
        elif next_open >= 0:
            block_end = position = next_open
            reason += f" and no closing {TOOL_CALL_CLOSE} before the next {TOOL_CALL_OPEN}"
        else:
            block_end = position = len(text)
            reason = f"unterminated (no closing {TOOL_CALL_CLOSE}) and {reason}"
        errors.append(f"<tool_call> block {number}: {reason}: {text[body:block_end].strip()[:80]!r}")
    outside.append(text[position:])
    content = "\n".join(piece.strip() for piece in outside if piece.strip())
    if TOOL_CALL_CLOSE in content:
        errors.append(f"{TOOL_CALL_CLOSE} without a matching {TOOL_CALL_OPEN}")
    return content, calls, errors


def _decode_json_sequence(body: str) -> list[Any] | None:
    """Decodes one or more JSON values separated by whitespace or `;`; None if any part is not JSON."""
    values: list[Any] = []
    position = 0
    while True:
        while position < len(body) and (body[position].isspace() or body[position] == ";"):
            position += 1
        if position == len(body):
            return values
        try:
            value, position = _decode_value(body, position)
        except ValueError:
            return None
        values.append(value)


def _is_call_shaped(obj: Any) -> bool:
    """Llama format: an object is meant as a call only if it has a `name` and `parameters` or `arguments`."""
    return isinstance(obj, dict) and "name" in obj and any(key in obj for key in _ARGUMENT_KEYS)


def _parse_llama_calls(text: str) -> tuple[str, list[ToolCall], list[str]]:
    """Parses the Llama 3.1 JSON tool-call format (the turn is a JSON call or a list of them).

    A turn holding no call-shaped object (see `_is_call_shaped`; e.g. a JSON answer) is plain content.
    Otherwise every value is meant as a call and each one that is not a valid call is an error.
    """
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
    if not any(_is_call_shaped(obj) for obj in objects):
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
TOOL_CALL_FORMATS = tuple(_CALL_PARSERS)  # the `fmt` names parse_assistant_turn knows


def parse_assistant_turn(text: str, fmt: str = "qwen") -> ParsedTurn:
    """Splits a generated assistant turn into reasoning, content and tool calls for the given format."""
    try:
        parse_calls = _CALL_PARSERS[fmt]
    except KeyError:
        raise ValueError(f"unknown tool-call format {fmt!r}; expected one of {sorted(_CALL_PARSERS)}") from None
    reasoning, rest = split_reasoning(strip_end_markers(text), fmt)
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
