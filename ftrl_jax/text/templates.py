"""Chat formats of policies: the native Qwen renderers, or the chat template a checkpoint ships.

A `ChatFormat` says how a policy's prompts are rendered and how its turns are parsed for tool calls. Three
kinds:
- "native": `ftrl_jax.text.chat` renders Qwen2.5 or Qwen3 byte for byte, in pieces that say which text the
  model generated (`render_segments`). Used for Qwen checkpoints and wherever "qwen2.5"/"qwen3" is asked for.
- "checkpoint": the tokenizer's own `chat_template`, through
  `tokenizer.apply_chat_template(messages, tools=..., add_generation_prompt=True, tokenize=False)`. History is
  handed over in the shape Hugging Face templates expect: assistant calls as
  `{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name", "arguments": dict}}]}`
  (call markup left in an assistant's text is parsed into that shape first), results as
  `{"role": "tool", "content": str}`. Calls are parsed in the family's wire format: "qwen" (`<tool_call>`
  JSON) when the template writes calls that way, else the family's (`TOOL_FORMAT_BY_MODEL_TYPE`: Llama 3's
  bare JSON `{"name": ..., "parameters": ...}`).
- "checkpoint+qwen-tools": the checkpoint's template cannot render tools (SmolLM2-135M-Instruct's ignores
  `tools`) or fails on tool messages, so its template renders the turns and the tools are written in the
  Qwen2.5 tool format inside them: the `# Tools` block in the system message (after the caller's system text,
  as Qwen3 does; alone when there is none), calls as `<tool_call>` markup in assistant text, results as
  `<tool_response>` blocks in one user turn per run of tool messages. With a ChatML template and a system
  message this is byte for byte what Qwen2.5 renders; without one, the checkpoint's default system prompt is
  replaced by the tools block. A warning names the checkpoint.

A checkpoint of a non-Qwen family without any chat template is rendered natively as Qwen2.5, with a warning.

Whether a template renders tools is found by rendering a probe conversation (one probe tool, one call, one
result): the tool's name and description and the result must all appear, and nothing may raise.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from ftrl_jax.text.chat import (TEMPLATES, _normalize_tools, _tools_block, get_template, render_conversation)
from ftrl_jax.text.tool_calls import TOOL_CALL_FORMATS, format_qwen_tool_call, parse_assistant_turn

AUTO = "auto"
CHECKPOINT = "checkpoint"
# What `template=` accepts wherever a policy is loaded (command lines offer these).
TEMPLATE_CHOICES = (AUTO, CHECKPOINT, *TEMPLATES)
# model_type in config.json -> the template "auto" picks: a native renderer, or the checkpoint's own.
TEMPLATE_BY_MODEL_TYPE = {"qwen3": "qwen3", "qwen2": "qwen2.5", "llama": CHECKPOINT}
# model_type -> the tool-call wire format its checkpoint templates use when they do not write `<tool_call>`.
TOOL_FORMAT_BY_MODEL_TYPE = {"llama": "llama3"}

NATIVE, CHECKPOINT_KIND, QWEN_TOOLS_KIND = "native", "checkpoint", "checkpoint+qwen-tools"

_PROBE_TOOL = {"type": "function", "function": {
    "name": "probe_lookup_q7", "description": "Probe tool description zx41.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "what to look up"}},
                   "required": ["query"]}}}
_PROBE_RESULT = "probe result kb93"
_PROBE_MESSAGES = [
    {"role": "user", "content": "Probe question?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "probe_lookup_q7", "arguments": {"query": "probe"}}}]},
    {"role": "tool", "name": "probe_lookup_q7", "content": _PROBE_RESULT},
]


class TemplateError(ValueError):
    """A conversation the chosen chat template cannot render; the message names the template and the cause."""


@dataclasses.dataclass(frozen=True, eq=False)
class ChatFormat:
    """How one policy's prompts are rendered and its generated turns parsed (see the module notes).

    `name` is "qwen2.5" or "qwen3" for native formats, "checkpoint" or "checkpoint+qwen-tools" for the
    tokenizer's template; `tool_format` the `parse_assistant_turn` format of its calls ("qwen", "llama3");
    `generation_prompt` the text the template appends for the model's turn ("" when it could not be found, for
    checkpoint kinds: generated ids are then not reused across turns); `source` the checkpoint it came from.
    A ChatFormat equals its name as a string (`fmt == "qwen2.5"`), so code holding template names keeps working.
    """

    name: str
    kind: str
    tool_format: str
    generation_prompt: str = ""
    source: str = ""
    tokenizer: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return self.name

    def _key(self) -> tuple[str, str, str, str, str]:
        return self.name, self.kind, self.tool_format, self.generation_prompt, self.source

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return self.name == other
        return isinstance(other, ChatFormat) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self.name)  # equal objects (a format and its name) must hash alike

    @property
    def is_native(self) -> bool:
        return self.kind == NATIVE

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Any = None, *, add_generation_prompt: bool = True,
               enable_thinking: bool = False) -> str:
        """The prompt text for `messages` (OpenAI-style dicts) and `tools` (JSON schemas, a list or JSON string).

        Raises TemplateError (a ValueError) naming the template when the conversation cannot be rendered.
        """
        if self.is_native:
            try:
                return render_conversation(messages, tools, template=self.name,
                                           add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
            except ValueError as exc:
                raise TemplateError(f"the {self.name} chat template cannot render the messages: {exc}") from None
        if not messages:
            raise TemplateError("messages is empty; a conversation needs at least one message")
        try:
            schemas = list(_normalize_tools(tools))
        except ValueError as exc:
            raise TemplateError(str(exc)) from None
        if self.kind == CHECKPOINT_KIND:
            hf_messages = hf_chat_messages(messages, self.tool_format)
            return _apply(self.tokenizer, hf_messages, schemas or None, add_generation_prompt, enable_thinking,
                          self.source)
        return _apply(self.tokenizer, qwen_tool_messages(messages, schemas), None, add_generation_prompt,
                      enable_thinking, self.source)


def _apply(tokenizer: Any, messages: list[dict[str, Any]], tools: list[Any] | None, add_generation_prompt: bool,
           enable_thinking: bool, source: str) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                             tokenize=False, enable_thinking=enable_thinking)
    except Exception as exc:  # noqa: BLE001 - jinja raises many kinds (TemplateError, TypeError, ...)
        raise TemplateError(f"the chat template of {source or 'the checkpoint'} cannot render the messages "
                            f"({type(exc).__name__}: {exc})") from None
    if not isinstance(text, str):
        raise TemplateError(f"the chat template of {source or 'the checkpoint'} rendered {type(text).__name__}, "
                            "not text")
    return text


# ---------------------------------------------------------------------------------------------
# History in the shapes the templates expect.


def _call_entry(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise TemplateError(f"{where} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}, "
                            f"got {call!r}")
    arguments = function.get("arguments")
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise TemplateError(f"{where}: arguments of {function['name']!r} are not valid JSON ({exc})") from None
    if not isinstance(arguments, Mapping):
        raise TemplateError(f"{where}: arguments of {function['name']!r} must be a JSON object, "
                            f"got {type(arguments).__name__}")
    return {"type": "function", "function": {"name": function["name"], "arguments": dict(arguments)}}


def _assistant_parts(message: Mapping[str, Any], index: int, tool_format: str
                     ) -> tuple[str, list[dict[str, Any]], str]:
    """(text, calls in the Hugging Face shape, reasoning) of an assistant message; call markup left in the text
    (in `tool_format`) becomes calls when the message has no `tool_calls`."""
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise TemplateError(f"messages[{index}]: content must be a string, got {type(content).__name__}")
    text = content or ""
    raw_calls = message.get("tool_calls") or []
    if not isinstance(raw_calls, list):
        raise TemplateError(f"messages[{index}]: tool_calls must be a list, got {type(raw_calls).__name__}")
    reasoning = message.get("reasoning_content") or ""
    if raw_calls:
        calls = [_call_entry(call, f"messages[{index}].tool_calls[{k}]") for k, call in enumerate(raw_calls)]
        return text, calls, reasoning
    parsed = parse_assistant_turn(text, tool_format)
    if not parsed.tool_calls:
        return text, [], reasoning
    return parsed.content, [call.to_openai() for call in parsed.tool_calls], reasoning or parsed.reasoning


def _plain(message: Mapping[str, Any], index: int) -> dict[str, Any]:
    role, content = message.get("role"), message.get("content")
    if role not in ("system", "user", "assistant", "tool"):
        raise TemplateError(f"messages[{index}]: unknown role {role!r}; expected system, user, assistant or tool")
    if not isinstance(content, str):
        raise TemplateError(f"messages[{index}]: a {role} message needs string 'content', "
                            f"got {type(content).__name__}")
    return {"role": role, "content": content}


def hf_chat_messages(messages: Sequence[Mapping[str, Any]], tool_format: str) -> list[dict[str, Any]]:
    """Messages in the shape Hugging Face chat templates expect (see the module notes).

    Assistant content None becomes "" (templates concatenate it); tool messages keep `name` and `tool_call_id`.
    """
    converted: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TemplateError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        if message.get("role") != "assistant":
            entry = _plain(message, index)
            if entry["role"] == "tool":
                entry.update({key: message[key] for key in ("name", "tool_call_id") if message.get(key)})
            converted.append(entry)
            continue
        text, calls, reasoning = _assistant_parts(message, index, tool_format)
        entry = {"role": "assistant", "content": text}
        if calls:
            entry["tool_calls"] = calls
        if reasoning:
            entry["reasoning_content"] = reasoning
        converted.append(entry)
    return converted


def qwen_tool_messages(messages: Sequence[Mapping[str, Any]], tools: Sequence[Any]) -> list[dict[str, Any]]:
    """Messages with the tools written in the Qwen2.5 tool format as plain text, for templates without tools.

    The tools block joins the first system message (or is one); assistant calls become `<tool_call>` blocks
    after the text; each run of tool messages becomes one user message of `<tool_response>` blocks.
    """
    converted: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TemplateError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role == "assistant":
            # Markup already in the text stays as written; structured calls are written as Qwen2.5 writes them.
            text, calls, _ = _assistant_parts(message, index, "qwen")
            if message.get("tool_calls"):
                blocks = [format_qwen_tool_call(c["function"]["name"], c["function"]["arguments"]) for c in calls]
                text = "\n".join(([text] if text else []) + blocks)
            else:
                text = message.get("content") or ""
            converted.append({"role": "assistant", "content": text})
            continue
        entry = _plain(message, index)
        if role == "tool":
            response = "<tool_response>\n" + entry["content"] + "\n</tool_response>"
            if index > 0 and messages[index - 1].get("role") == "tool":
                converted[-1]["content"] += "\n" + response
            else:
                converted.append({"role": "user", "content": response})
            continue
        converted.append(entry)
    if tools:
        block = _tools_block(tools)
        if converted and converted[0]["role"] == "system":
            converted[0] = {"role": "system", "content": converted[0]["content"] + "\n\n" + block}
        else:
            converted.insert(0, {"role": "system", "content": block})
    return converted


# ---------------------------------------------------------------------------------------------
# Choosing the format of a checkpoint.


def _generation_prompt(tokenizer: Any) -> str:
    """The text the template appends for the assistant's turn, or "" when it is not a plain suffix."""
    probe = [{"role": "user", "content": "Probe question?"}]
    try:
        without = tokenizer.apply_chat_template(probe, add_generation_prompt=False, tokenize=False)
        with_prompt = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render a user turn fails later with a clear error
        return ""
    return with_prompt[len(without):] if with_prompt.startswith(without) else ""


def _renders_probe(chat_format: ChatFormat) -> tuple[bool, str]:
    """Whether `chat_format` renders the probe conversation with its tool, call and result, and why not."""
    try:
        text = chat_format.render(_PROBE_MESSAGES, [_PROBE_TOOL])
    except TemplateError as exc:
        return False, str(exc)
    function = _PROBE_TOOL["function"]
    missing = [what for what, needle in (("the tool's name", function["name"]),
                                        ("the tool's description", function["description"]),
                                        ("the tool result", _PROBE_RESULT)) if needle not in text]
    return not missing, "it leaves out " + " and ".join(missing) if missing else ""


def resolve_chat_format(template: str | ChatFormat | None, tokenizer: Any = None, *, model_type: str | None = None,
                        checkpoint: str | None = None) -> ChatFormat:
    """The chat format for `template`: "qwen2.5" / "qwen3" (native), "checkpoint" (the tokenizer's own
    template), or "auto"/None (by `model_type`, `TEMPLATE_BY_MODEL_TYPE`; unknown types use the checkpoint's).

    `checkpoint` names the checkpoint in warnings (default: the tokenizer's `name_or_path`). Warns (UserWarning)
    when the checkpoint's template cannot render tools (the Qwen2.5 tool format is written inside its turns)
    or when there is none (native Qwen2.5). A ChatFormat passes through. Raises ValueError for an unknown name
    or when the checkpoint's template is asked for without a tokenizer.
    """
    if isinstance(template, ChatFormat):
        return template
    name = AUTO if template is None else template
    if name not in TEMPLATE_CHOICES:
        raise ValueError(f"unknown chat template {name!r}; expected one of {list(TEMPLATE_CHOICES)}")
    if name == AUTO:
        name = TEMPLATE_BY_MODEL_TYPE.get(model_type or "", CHECKPOINT)
    if name in TEMPLATES:
        return native_format(name)
    if tokenizer is None:
        raise ValueError("the checkpoint's chat template needs its tokenizer; pass tokenizer=, or pick "
                         "template='qwen2.5' or 'qwen3'")
    source = checkpoint or getattr(tokenizer, "name_or_path", "") or "the checkpoint"
    if not getattr(tokenizer, "chat_template", None):
        warnings.warn(f"{source} ships no chat template; rendering its prompts and parsing its tool calls in the "
                      "Qwen2.5 format", UserWarning, stacklevel=2)
        return native_format("qwen2.5")
    generation_prompt = _generation_prompt(tokenizer)
    family_format = TOOL_FORMAT_BY_MODEL_TYPE.get(model_type or "", "qwen")
    own = ChatFormat(CHECKPOINT, CHECKPOINT_KIND, family_format, generation_prompt, source, tokenizer)
    works, why = _renders_probe(own)
    if works:
        calls_in_tags = "<tool_call>" in own.render(_PROBE_MESSAGES, [_PROBE_TOOL])
        return dataclasses.replace(own, tool_format="qwen" if calls_in_tags else family_format)
    hybrid = ChatFormat(QWEN_TOOLS_KIND, QWEN_TOOLS_KIND, "qwen", generation_prompt, source, tokenizer)
    hybrid_works, hybrid_why = _renders_probe(hybrid)
    if hybrid_works:
        warnings.warn(f"the chat template of {source} cannot render tools ({why}); its turns are rendered by it "
                      "with the tools, calls and results written in the Qwen2.5 tool format", UserWarning,
                      stacklevel=2)
        return hybrid
    warnings.warn(f"the chat template of {source} cannot render tools ({why}) nor plain turns carrying them "
                  f"({hybrid_why}); rendering its prompts and parsing its tool calls in the Qwen2.5 format",
                  UserWarning, stacklevel=2)
    return native_format("qwen2.5")


def native_format(name: str) -> ChatFormat:
    """The native ChatFormat "qwen2.5" or "qwen3" (ValueError for other names)."""
    get_template(name)
    return ChatFormat(name, NATIVE, "qwen", get_template(name).generation_prompt(True), name)


def as_chat_format(template: str | ChatFormat) -> ChatFormat:
    """A ChatFormat as it is, or the native one of that name (the checkpoint's needs `resolve_chat_format`)."""
    if isinstance(template, ChatFormat):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"chat template {template!r} is not native ({sorted(TEMPLATES)}); resolve the checkpoint's "
                         "with resolve_chat_format(template, tokenizer, model_type=...)")
    return native_format(template)


def check_tool_format(tool_format: str) -> str:
    """`tool_format` if `parse_assistant_turn` knows it, else ValueError listing the known ones."""
    if tool_format not in TOOL_CALL_FORMATS:
        raise ValueError(f"unknown tool-call format {tool_format!r}; expected one of {list(TOOL_CALL_FORMATS)}")
    return tool_format
