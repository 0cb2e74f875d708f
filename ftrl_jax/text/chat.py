"""Chat conversations with tools, rendered byte for byte as the Qwen2.5 and Qwen3 chat templates do.

The Jinja templates shipped with Qwen2.5-7B-Instruct and Qwen3-8B are re-expressed here as plain Python so
that a conversation can also be cut into pieces that say which text the assistant generated
(`render_segments`): supervised warm start trains on those pieces only, and multi-turn RL masks everything
else (system prompt, user turns, tool responses).

Messages are OpenAI-style dicts: `{"role": "system" | "user" | "assistant" | "tool", "content": str}`.
Assistant calls go in `tool_calls` as `{"type": "function", "function": {"name", "arguments"}}` (or the bare
`{"name", "arguments"}`), with arguments as a dict or a JSON string, or they are already written as
`<tool_call>` markup in the content. Qwen3 assistant turns may carry `reasoning_content` (`reasoning` and
`thinking` are accepted as other names for it, as transformers does).

Quirks of the real templates that are kept on purpose, since the models were trained on them:
- Qwen2.5 writes arguments with `tojson` even when they are already a JSON string, so string arguments
  appear as a quoted JSON string; pass dicts to avoid it.
- Qwen3 shows a `<think>` block only for assistant turns after the last real user query.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Sequence

from ftrl_jax.text.tool_calls import ToolCall, parse_assistant_turn

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
QWEN2_5_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
EMPTY_THINK_BLOCK = "<think>\n\n</think>\n\n"
_TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)
_ROLES = ("system", "user", "assistant", "tool")
# Other names transformers accepts for `reasoning_content`, in its order of preference.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")

Segment = tuple[str, bool]


def _tojson(value: Any) -> str:
    """The `tojson` filter as transformers defines it for chat templates."""
    return json.dumps(value, ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class _Message:
    """A validated message; `content_is_string` remembers whether the input content was a str."""

    role: str
    content: str
    content_is_string: bool
    tool_calls: tuple[tuple[str, Any], ...]
    reasoning: str | None


@dataclasses.dataclass(frozen=True)
class _Conversation:
    messages: tuple[_Message, ...]
    tools: tuple[Any, ...]
    enable_thinking: bool
    # Qwen3: index of the last user message that is a real query, not wrapped tool responses.
    last_query_index: int


def _normalize_tool_call(call: Any, where: str) -> tuple[str, Any]:
    if isinstance(call, ToolCall):
        return call.name, call.arguments
    if not isinstance(call, Mapping):
        raise ValueError(f"{where}: a tool call must be a dict or ToolCall, got {type(call).__name__}")
    function = call.get("function") or call
    if not isinstance(function, Mapping):
        raise ValueError(f"{where}: 'function' must be a dict with 'name' and 'arguments', got {function!r}")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: tool call needs a non-empty string 'name', got {name!r}")
    if "arguments" not in function:
        raise ValueError(f"{where}: tool call {name!r} has no 'arguments'; pass {{}} for a call without any")
    arguments = function["arguments"]
    if not isinstance(arguments, (str, Mapping)):
        raise ValueError(
            f"{where}: arguments of {name!r} must be a dict or a JSON string, got {type(arguments).__name__}"
        )
    return name, arguments


def _normalize_message(message: Any, index: int) -> _Message:
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise ValueError(f"{where}: a message must be a dict, got {type(message).__name__}")
    role = message.get("role")
    if role not in _ROLES:
        raise ValueError(f"{where}: unknown role {role!r}; expected one of {list(_ROLES)}")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise ValueError(
            f"{where}: content must be a string (multimodal content lists are not supported), "
            f"got {type(content).__name__}"
        )
    if content is None and role != "assistant":
        raise ValueError(f"{where}: a {role} message needs string 'content'")
    raw_calls = message.get("tool_calls") or ()
    if raw_calls and role != "assistant":
        raise ValueError(f"{where}: only assistant messages may carry tool_calls (role is {role!r})")
    if isinstance(raw_calls, (str, Mapping)) or not isinstance(raw_calls, Iterable):
        raise ValueError(f"{where}: tool_calls must be a list, got {type(raw_calls).__name__}")
    calls = tuple(_normalize_tool_call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(raw_calls))
    reasoning = next((message[key] for key in _REASONING_KEYS if message.get(key) is not None), None)
    return _Message(
        role=role,
        content=content if isinstance(content, str) else "",
        content_is_string=isinstance(content, str),
        tool_calls=calls,
        reasoning=reasoning,
    )


def _normalize_tools(tools: Any) -> tuple[Any, ...]:
    if tools is None:
        return ()
    if isinstance(tools, str):
        # Datasets (the FTRL samples among them) store the tool list as a JSON string.
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise ValueError(f"tools given as a string must be a JSON list of tool schemas: {err}") from None
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools must be a list of tool schemas (dicts), got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ValueError(f"tools[{i}] must be a dict (a JSON schema), got {type(tool).__name__}")
    return tuple(tools)


def _last_query_index(messages: Sequence[_Message]) -> int:
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        wrapped_responses = message.content.startswith("<tool_response>") and message.content.endswith(
            "</tool_response>"
        )
        if message.role == "user" and message.content_is_string and not wrapped_responses:
            return index
    return len(messages) - 1


def _tools_block(tools: Sequence[Any]) -> str:
    return _TOOLS_INTRO + "".join("\n" + _tojson(tool) for tool in tools) + _TOOLS_OUTRO


# ---- the system block at the top of the conversation -------------------------------------------------


def _qwen2_5_system(conv: _Conversation) -> str:
    first = conv.messages[0]
    system = first.content if first.role == "system" else QWEN2_5_DEFAULT_SYSTEM
    if conv.tools:
        return IM_START + "system\n" + system + "\n\n" + _tools_block(conv.tools) + IM_END + "\n"
    return IM_START + "system\n" + system + IM_END + "\n"


def _qwen3_system(conv: _Conversation) -> str:
    first = conv.messages[0]
    has_system = first.role == "system"
    if conv.tools:
        prefix = first.content + "\n\n" if has_system else ""
        return IM_START + "system\n" + prefix + _tools_block(conv.tools) + IM_END + "\n"
    return IM_START + "system\n" + first.content + IM_END + "\n" if has_system else ""


# ---- one assistant turn: (header, generated pieces...) ----------------------------------------------


def _call_json(name: str, arguments_text: str) -> str:
    return '<tool_call>\n{"name": "' + name + '", "arguments": ' + arguments_text + "}\n</tool_call>"


def _qwen2_5_assistant(conv: _Conversation, index: int) -> list[Segment]:
    message = conv.messages[index]
    header = IM_START + "assistant\n"
    if not message.tool_calls:
        return [(header, False), (message.content + IM_END, True), ("\n", False)]
    # The template writes "\n" + content (when any) and then "\n<tool_call>..." for every call.
    body = ("\n" + message.content if message.content else "") + "".join(
        "\n" + _call_json(name, _tojson(arguments)) for name, arguments in message.tool_calls
    )
    return [(header, False), (body[1:] + IM_END, True), ("\n", False)]


def _qwen3_assistant(conv: _Conversation, index: int) -> list[Segment]:
    message = conv.messages[index]
    content = message.content
    reasoning = ""
    if isinstance(message.reasoning, str):
        reasoning = message.reasoning
    elif "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        content = content.split("</think>")[-1].lstrip("\n")
    is_last = index == len(conv.messages) - 1
    think = ""
    text = content
    if index > conv.last_query_index and (is_last or reasoning):
        think = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n"
        text = content.lstrip("\n")
    calls = ""
    for number, (name, arguments) in enumerate(message.tool_calls):
        if number > 0 or content:
            calls += "\n"
        calls += _call_json(name, arguments if isinstance(arguments, str) else _tojson(arguments))
    # With thinking disabled the empty think block comes from the generation prompt, not the model.
    think_generated = conv.enable_thinking or think != EMPTY_THINK_BLOCK
    return [
        (IM_START + "assistant\n", False),
        (think, think_generated),
        (text + calls + IM_END, True),
        ("\n", False),
    ]


# ---- user, system (not first) and tool messages -------------------------------------------------------


def _plain_turn(conv: _Conversation, index: int) -> list[Segment]:
    message = conv.messages[index]
    if message.role == "system" and index == 0:
        return []  # Already written by the system block.
    return [(IM_START + message.role + "\n" + message.content + IM_END + "\n", False)]


def _tool_turn(conv: _Conversation, index: int) -> list[Segment]:
    # Consecutive tool messages share one user turn.
    messages = conv.messages
    opens = index == 0 or messages[index - 1].role != "tool"
    closes = index == len(messages) - 1 or messages[index + 1].role != "tool"
    text = (IM_START + "user" if opens else "") + "\n<tool_response>\n" + messages[index].content
    text += "\n</tool_response>" + (IM_END + "\n" if closes else "")
    return [(text, False)]


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat format: the system block, one renderer per role, and the generation prompt."""

    name: str
    system_block: Callable[[_Conversation], str]
    turns: Mapping[str, Callable[[_Conversation, int], list[Segment]]]
    generation_prompt: Callable[[bool], str]


def _qwen3_generation_prompt(enable_thinking: bool) -> str:
    return IM_START + "assistant\n" + ("" if enable_thinking else EMPTY_THINK_BLOCK)


TEMPLATES: dict[str, ChatTemplate] = {
    "qwen2.5": ChatTemplate(
        name="qwen2.5",
        system_block=_qwen2_5_system,
        turns={"system": _plain_turn, "user": _plain_turn, "assistant": _qwen2_5_assistant, "tool": _tool_turn},
        generation_prompt=lambda enable_thinking: IM_START + "assistant\n",
    ),
    "qwen3": ChatTemplate(
        name="qwen3",
        system_block=_qwen3_system,
        turns={"system": _plain_turn, "user": _plain_turn, "assistant": _qwen3_assistant, "tool": _tool_turn},
        generation_prompt=_qwen3_generation_prompt,
    ),
}


def get_template(template: str) -> ChatTemplate:
    """The registered chat template called `template`; unknown names raise ValueError listing the known ones."""
    try:
        return TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown chat template {template!r}; expected one of {sorted(TEMPLATES)}") from None


def _merge(segments: Iterable[Segment]) -> list[Segment]:
    """Drops empty pieces and joins neighbours with the same flag."""
    merged: list[Segment] = []
    for text, generated in segments:
        if not text:
            continue
        if merged and merged[-1][1] == generated:
            merged[-1] = (merged[-1][0] + text, generated)
        else:
            merged.append((text, generated))
    return merged


def render_segments(
    messages: Sequence[Mapping[str, Any]],
    tools: Any = None,
    *,
    template: str = "qwen2.5",
    enable_thinking: bool = True,
) -> list[Segment]:
    """The conversation as `render_conversation(..., add_generation_prompt=False)` renders it, in pieces.

    Each piece is `(text, generated)`; `generated` is True exactly for text the assistant produced: its
    content, `<think>` block and `<tool_call>` blocks and the closing `<|im_end|>`, but not the
    `<|im_start|>assistant\\n` header or the newline after `<|im_end|>`. Neighbouring pieces always differ
    in the flag. For Qwen3 with `enable_thinking=False`, an empty think block counts as prompt text,
    since the generation prompt supplies it.
    """
    chat_template = get_template(template)
    if not messages:
        raise ValueError("messages is empty; a conversation needs at least one message")
    normalized = tuple(_normalize_message(message, i) for i, message in enumerate(messages))
    conv = _Conversation(
        messages=normalized,
        tools=_normalize_tools(tools),
        enable_thinking=enable_thinking,
        last_query_index=_last_query_index(normalized),
    )
    segments: list[Segment] = [(chat_template.system_block(conv), False)]
    for index, message in enumerate(normalized):
        segments.extend(chat_template.turns[message.role](conv, index))
    return _merge(segments)


def render_conversation(
    messages: Sequence[Mapping[str, Any]],
    tools: Any = None,
    *,
    template: str = "qwen2.5",
    add_generation_prompt: bool = True,
    enable_thinking: bool = True,
) -> str:
    """The text the model's chat template renders for `messages` and `tools` (a list of JSON schemas)."""
    text = "".join(piece for piece, _ in render_segments(messages, tools, template=template))
    if add_generation_prompt:
        text += get_template(template).generation_prompt(enable_thinking)
    return text


def encode_segments(tokenizer: Any, segments: Sequence[Segment]) -> tuple[list[int], list[int]]:
    """Tokenizes each piece on its own; returns the ids and a loss mask (1 on generated pieces).

    Pieces are cut where generation starts and stops, so the ids match what a model generating the
    assistant text after the prompt would have produced.
    """
    ids: list[int] = []
    loss_mask: list[int] = []
    for text, generated in segments:
        piece_ids = list(tokenizer.encode(text, add_special_tokens=False))
        ids.extend(piece_ids)
        loss_mask.extend([int(generated)] * len(piece_ids))
    return ids, loss_mask


def assistant_message_from_turn(text: str, *, fmt: str = "qwen") -> dict[str, Any]:
    """A generated assistant turn as an OpenAI-style assistant message.

    Gives `content`, `tool_calls` (dict arguments, only when there are calls) and `reasoning_content`
    (only when the turn had a `<think>` block). Broken tool-call markup stays out of `tool_calls`; see
    `ftrl_jax.text.tool_calls.parse_assistant_turn` to inspect it.
    """
    parsed = parse_assistant_turn(text, fmt)
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.tool_calls:
        message["tool_calls"] = [call.to_openai() for call in parsed.tool_calls]
    if parsed.reasoning:
        message["reasoning_content"] = parsed.reasoning
    return message


def tool_message(name: str, content: Any) -> dict[str, Any]:
    """An OpenAI-style tool message; non-string results are written as JSON."""
    if not isinstance(content, str):
        try:
            content = json.dumps(content, ensure_ascii=False)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"result of tool {name!r} is neither a string nor JSON-serialisable ({err}); convert it to str first"
            ) from None
    return {"role": "tool", "name": name, "content": content}
