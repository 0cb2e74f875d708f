"""An OpenAI-compatible chat-completions service for a policy on the jit sampler (the web app: `app.py`).

Four parts, each testable alone:
- `parse_chat_request` (pure): a request body -> `ChatRequest`, or `RequestError` with the OpenAI error
  body and status (400 invalid request, 404 unknown model, 413 body too large, ...);
- `BatchingEngine`: a worker thread that takes the requests arriving within a short window and
  generates each group of requests with the same sampling settings in ONE turn-generator call (for a
  `LocalPolicy`, one `sampling.generate`), so concurrent clients share the accelerator;
- `assistant_choice` (pure): a generated turn -> the OpenAI assistant message and `finish_reason`
  (`tool_calls` when calls parsed, `stop`, or `length`). Calls come from
  `ftrl_jax.text.tool_calls.parse_assistant_turn`, the parser rollouts use: JSON-aware, so a tag inside a
  string argument never splits a call, and a complete final call whose `</tool_call>` is missing is still a
  call (as vLLM's hermes parser gives it). `completion_body` and `completion_chunks` build the
  `chat.completion` object and the `chat.completion.chunk` stream from those messages;
- `PolicyService`: the routes' work (key check, parse, submit, reply), which
  `ftrl_jax.serving.app.create_app` puts behind FastAPI and uvicorn.

Prompts are rendered and encoded by `LocalPolicy`, exactly as in-process rollouts do: an earlier
assistant turn sent back unchanged (its content and calls re-rendered by the chat template) reuses the
token ids it was sampled as, so greedy evaluation over HTTP sees the prompts in-process evaluation sees.

Reply text conventions: without tools (or with `tool_choice="none"`) and whenever no call parses, the
content is the generated text verbatim. A turn cut by `max_tokens` keeps its text and makes no calls
(`finish_reason` `length`), as a truncated rollout turn runs none. With the qwen3 template a leading
`<think>` block comes back as `reasoning_content`. `stop` strings cut the text after generation (the row
still decodes to `max_tokens` or its end-of-turn token). `seed` makes a sampled request reproducible: it
is generated alone with a fresh key from that seed.

`tool_choice`: `"auto"` (the default) parses whatever calls the turn makes; `"none"` renders the prompt
without the tools and returns the text as content; `"required"` and a named function
(`{"type": "function", "function": {"name": ...}}`) force a call by construction: the assistant turn starts
with the call's opening markup and the function's name (`call_opening`: `<tool_call>\n{"name": "NAME",
"arguments":`; in the Llama 3 format `{"name": "NAME", "parameters":`) and the model generates only the
arguments. For `"required"` with several tools the name is
the declared tool whose opening has the highest log-probability after the prompt (`ServedPolicy.choose_tool`),
so it can only be a declared tool. A forced turn always comes back as a call to that function, whose
`arguments` are what the model generated (valid JSON or not, as OpenAI documents), with `finish_reason`
`tool_calls`, or `length` when `max_tokens` cut it. Its `usage.prompt_tokens` counts the forced opening.

Streaming (`stream=true`): the batched sampler returns whole turns, so a streamed reply is sent when its
turns are complete (time to first token = the turn's latency): per choice a first chunk with the role,
the content (and `reasoning_content`) as one delta, each tool call as a header delta (index, id, type,
name, empty arguments) and an arguments delta, a chunk with `finish_reason`; then a `usage` chunk with no
choices when `stream_options.include_usage` is true, and `data: [DONE]`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftrl_jax import policies
from ftrl_jax.generate.sampling import bucket
from ftrl_jax.models.transformer import logits_from_hidden, shared_prompt_hidden_states
from ftrl_jax.rollout.episodes import GeneratedTurn, TurnGenerator
from ftrl_jax.rollout.policy import LocalPolicy
from ftrl_jax.text.templates import ChatFormat, as_chat_format, resolve_chat_format
from ftrl_jax.text.tool_calls import parse_assistant_turn, split_reasoning

logger = logging.getLogger(__name__)

# model_type in config.json -> chat template: TEMPLATE_BY_MODEL_TYPE, from ftrl_jax.text.templates.
MAX_CHOICES = 16
MAX_STOP_STRINGS = 4


# ---------------------------------------------------------------------------------------------
# Policy directories.


@dataclasses.dataclass
class LoadedPolicy:
    """A policy directory in memory: model config and parameters, tokenizer, chat template."""

    directory: str
    config: Any
    params: Any
    tokenizer: Any
    template: ChatFormat


def resolve_policy_dir(path: str | os.PathLike) -> str:
    """The Hugging Face directory of a policy: `path` itself, `path/export` for a training WORKDIR, or a shipped
    policy's directory for its name (`ftrl_jax.policies`, e.g. "tiny-instruct")."""
    path = policies.resolve(path)
    for candidate in (path, os.path.join(path, "export")):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise FileNotFoundError(
        f"{path!r} is not a policy directory: neither {os.path.join(path, 'config.json')!r} nor "
        f"{os.path.join(path, 'export', 'config.json')!r} exists; pass a Hugging Face model directory "
        "(config.json, safetensors, tokenizer) or a training WORKDIR with an export/ directory"
    )


def load_policy(path: str | os.PathLike, *, dtype: str = "float32", template: str | None = None,
                tokenizer_dir: str | os.PathLike | None = None, tensor_parallel: int = 1) -> LoadedPolicy:
    """Loads a policy directory (or WORKDIR/export) with its tokenizer and chat format.

    `template` ("auto", "checkpoint", "qwen2.5", "qwen3"; None: "auto", the model type's by
    `TEMPLATE_BY_MODEL_TYPE`) is resolved by `templates.resolve_chat_format`; `tokenizer_dir` defaults to the policy
    directory; `tensor_parallel` > 1 shards the weights over that many devices (heads and MLP width).
    """
    from ftrl_jax import models, parallel
    from ftrl_jax.text.tokenizer import load_tokenizer

    directory = resolve_policy_dir(path)
    shardings = None
    if tensor_parallel > 1:
        mesh = parallel.make_mesh(tensor=tensor_parallel, devices=jax.devices()[:tensor_parallel])
        shardings = parallel.checkpoint_sharding_fn(mesh)
    config, params = models.load_pretrained(directory, dtype=dtype, shardings=shardings)
    tokenizer = load_tokenizer(tokenizer_dir or directory)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer in {os.fspath(tokenizer_dir or directory)!r} has {len(tokenizer)} tokens "
                         f"but the model's vocab_size is {config.vocab_size}; pass the tokenizer the model was "
                         "trained with")
    chosen = resolve_chat_format(template, tokenizer, model_type=config.model_type, checkpoint=directory)
    return LoadedPolicy(directory, config, params, tokenizer, chosen)


def save_random_policy(directory: str | os.PathLike, preset: str = "tiny", *, seed: int = 0, **overrides: Any) -> str:
    """Writes a randomly initialised `preset` model with the embedded tokenizer as a policy directory.

    `overrides` replace ModelConfig fields (e.g. `num_layers=1`); the vocabulary is the tokenizer's unless
    given. For benchmarks and tests that need a servable policy without training one. Returns the directory.
    """
    from ftrl_jax import models
    from ftrl_jax.text.tokenizer import default_tokenizer

    tokenizer = default_tokenizer()
    config = models.preset(preset, **{"vocab_size": len(tokenizer), **overrides})
    models.save_pretrained(config, models.init_params(config, jax.random.PRNGKey(seed)), directory)
    tokenizer.save_pretrained(os.fspath(directory))
    return os.fspath(directory)


# ---------------------------------------------------------------------------------------------
# Requests.


class RequestError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients read: `{"error": {"message", "type", "param", "code"}}`."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class SamplingKey:
    """The settings a batch must share (one generator per distinct key)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    enable_thinking: bool = False
    seed: int | None = None  # set only for sampled requests: they run alone, from a fresh key


@dataclasses.dataclass
class ChatRequest:
    """A checked chat-completions request: messages ready for `ftrl_jax.text.chat`, tools, sampling settings.

    `tools` are the tools the prompt is rendered with (none under `tool_choice="none"`). `forced_tools` are
    the names a forced call may take: empty unless `tool_choice` is `"required"` (every declared tool) or a
    named function (that one). `stream` and `include_usage` say how the reply is sent.
    """

    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    parse_tool_calls: bool
    key: SamplingKey
    n: int = 1
    stop: tuple[str, ...] = ()
    tool_choice: str = "auto"
    forced_tools: tuple[str, ...] = ()
    tool_format: str = "qwen"  # the served chat format's call format: how a forced call opens
    stream: bool = False
    include_usage: bool = False


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What the served model allows and the defaults of a request that leaves them out."""

    model_name: str
    context_length: int
    template: str | ChatFormat = "qwen2.5"  # a native name, or a resolved ChatFormat
    default_max_tokens: int = 512
    enable_thinking: bool = False


def _invalid(message: str, param: str | None = None, code: str | None = None) -> RequestError:
    return RequestError(400, message, param=param, code=code)


def _number(value: Any, param: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _invalid(f"{param} must be a number from {low:g} to {high:g}, got {value!r}", param)
    return float(value)


def _integer(value: Any, param: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _invalid(f"{param} must be an integer from {low} to {high}, got {value!r}", param)
    return value


def _content_text(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _invalid(f"{where}.content[{k}] is not a text part; this server reads text only",
                               f"{where}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise _invalid(f"{where}.content must be a string or a list of text parts, got {type(content).__name__}",
                   f"{where}.content")


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise _invalid(f"{where} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}", where)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise _invalid(f"{where}.function.arguments is not valid JSON ({exc})",
                           f"{where}.function.arguments") from None
    if not isinstance(arguments, Mapping):
        raise _invalid(f"{where}.function.arguments must be a JSON object", f"{where}.function.arguments")
    # Dict arguments: the Qwen templates would write a JSON string argument as a quoted string.
    return {"type": "function", "function": {"name": function["name"], "arguments": dict(arguments)}}


# Roles OpenAI clients send -> the role the chat templates know.
_ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def _message(message: Any, index: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise _invalid(f"{where} must be an object with 'role' and 'content'", where)
    role = _ROLE_ALIASES.get(message.get("role"))
    if role is None:
        raise _invalid(f"{where}.role {message.get('role')!r} is not one of {sorted(_ROLE_ALIASES)}", f"{where}.role")
    content = _content_text(message.get("content"), where)
    if content is None and role != "assistant":
        raise _invalid(f"{where} ({role}) needs string content", f"{where}.content")
    checked: dict[str, Any] = {"role": role, "content": content}
    if role == "assistant":
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise _invalid(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
        if calls:
            checked["tool_calls"] = [_tool_call(call, f"{where}.tool_calls[{k}]") for k, call in enumerate(calls)]
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            checked["reasoning_content"] = reasoning
    return checked


def _tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _invalid(f"tools must be a list of function tools, got {type(tools).__name__}", "tools")
    for k, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(function, Mapping) \
                or not isinstance(function.get("name"), str):
            raise _invalid(f"tools[{k}] must be {{'type': 'function', 'function': {{'name', 'description', "
                           "'parameters'}}", f"tools[{k}]")
    return [dict(tool) for tool in tools]


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if value is None:
        return ()
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stops):
        raise _invalid(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them", "stop")
    return tuple(stops)


def _must_be(allowed: Callable[[Any], bool], why: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not allowed(value):
            raise ValueError(why)

    return check


# Accepted fields that change nothing here, with the values that keep them that way (others are refused,
# since a client relying on them would silently get something else).
_NO_OP_FIELDS: dict[str, Callable[[Any], None]] = {
    "logprobs": _must_be(lambda v: v in (None, False), "log-probs are not returned by this server"),
    "top_logprobs": _must_be(lambda v: v in (None, 0), "log-probs are not returned by this server"),
    "frequency_penalty": _must_be(lambda v: v in (None, 0, 0.0), "penalties are not supported; send 0"),
    "presence_penalty": _must_be(lambda v: v in (None, 0, 0.0), "penalties are not supported; send 0"),
    "repetition_penalty": _must_be(lambda v: v in (None, 1, 1.0), "penalties are not supported; send 1"),
    "logit_bias": _must_be(lambda v: not v, "logit_bias is not supported"),
    "response_format": _must_be(lambda v: v in (None, {"type": "text"}), "only the text response format is supported"),
    "user": _must_be(lambda v: True, ""),
    "metadata": _must_be(lambda v: True, ""),
    "store": _must_be(lambda v: True, ""),
    "service_tier": _must_be(lambda v: True, ""),
    "parallel_tool_calls": _must_be(lambda v: True, ""),  # several calls per turn are always allowed
}
_HANDLED_FIELDS = frozenset({"model", "messages", "tools", "tool_choice", "temperature", "top_p", "top_k", "max_tokens",
                             "max_completion_tokens", "seed", "stop", "n", "chat_template_kwargs", "stream",
                             "stream_options"})


def _tool_choice(value: Any, tools: Sequence[Mapping[str, Any]]) -> tuple[str, tuple[str, ...]]:
    """(mode, names a forced call may take) for a request's `tool_choice`; RequestError names the fault."""
    declared = list(dict.fromkeys(tool["function"]["name"] for tool in tools))
    if value is None or value == "auto" or value == "none":
        return value or "auto", ()
    if value == "required":
        if not declared:
            raise _invalid("tool_choice 'required' needs at least one tool in tools", "tool_choice")
        return "required", tuple(declared)
    function = value.get("function") if isinstance(value, Mapping) else None
    if not isinstance(value, Mapping) or value.get("type") != "function" or not isinstance(function, Mapping) \
            or not isinstance(function.get("name"), str):
        raise _invalid(f"tool_choice must be 'auto', 'none', 'required' or {{'type': 'function', 'function': "
                       f"{{'name': NAME}}}}, got {value!r}", "tool_choice")
    name = function["name"]
    if name not in declared:
        raise _invalid(f"tool_choice names the function {name!r}, which is not among the declared tools "
                       f"{declared}; name one of them or declare it in tools", "tool_choice")
    return "function", (name,)


def _stream_options(stream: Any, options: Any) -> tuple[bool, bool]:
    """(stream, include_usage) for the request's `stream` and `stream_options`."""
    if stream not in (None, True, False):
        raise _invalid(f"stream must be true or false, got {stream!r}", "stream")
    if options is None:
        return bool(stream), False
    if not stream:
        raise _invalid("stream_options is only allowed with stream=true", "stream_options")
    if not isinstance(options, Mapping) or set(options) - {"include_usage", "include_obfuscation"} \
            or not isinstance(options.get("include_usage", False), bool):
        raise _invalid(f"stream_options must be an object like {{'include_usage': true}}, got {options!r}",
                       "stream_options")
    return True, bool(options.get("include_usage", False))


def parse_chat_request(body: Any, limits: ServerLimits) -> ChatRequest:
    """Checks a `/v1/chat/completions` body; raises RequestError naming the field at fault."""
    if not isinstance(body, Mapping):
        raise _invalid(f"the request body must be a JSON object, got {type(body).__name__}")
    for field, value in body.items():
        if field in _HANDLED_FIELDS:
            continue
        check = _NO_OP_FIELDS.get(field)
        if check is None:
            raise _invalid(f"unrecognized request argument supplied: {field}", field)
        try:
            check(value)
        except ValueError as exc:
            raise _invalid(f"{field}={value!r}: {exc}", field, "unsupported_value") from None
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("you must provide a model parameter (GET /v1/models lists the served model)", "model")
    if model != limits.model_name:
        raise RequestError(404, f"The model {model!r} does not exist; this server serves {limits.model_name!r}",
                           param="model", code="model_not_found")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise _invalid("messages must be a non-empty list of chat messages", "messages")
    messages = [_message(message, i) for i, message in enumerate(raw_messages)]
    tools = _tools(body.get("tools"))
    tool_choice, forced_tools = _tool_choice(body.get("tool_choice"), tools)
    if tool_choice == "none":
        tools = []  # the model is given no tools to call
    stream, include_usage = _stream_options(body.get("stream"), body.get("stream_options"))
    template_kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, Mapping) or set(template_kwargs) - {"enable_thinking"}:
        raise _invalid("chat_template_kwargs may only hold enable_thinking", "chat_template_kwargs")
    enable_thinking = bool(template_kwargs.get("enable_thinking", limits.enable_thinking))
    try:
        as_chat_format(limits.template).render(messages, tools, enable_thinking=enable_thinking)
    except ValueError as exc:
        raise _invalid(f"the messages cannot be rendered with the {limits.template} chat template: {exc}",
                       "messages") from None

    # Either name, whichever is not null (clients built on both fields send the one they do not use as null).
    max_tokens = body.get("max_completion_tokens")
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    max_tokens = limits.default_max_tokens if max_tokens is None else max_tokens
    max_tokens = _integer(max_tokens, "max_tokens", 1, limits.context_length - 1)
    # OpenAI's default temperature is 1; evaluation clients send 0 for greedy decoding.
    temperature = _number(1.0 if body.get("temperature") is None else body["temperature"], "temperature", 0.0, 2.0)
    top_p = _number(1.0 if body.get("top_p") is None else body["top_p"], "top_p", 1e-6, 1.0)
    top_k = _integer(0 if body.get("top_k") is None else body["top_k"], "top_k", -1, 1 << 30)
    seed = body.get("seed")
    if seed is not None:
        seed = _integer(seed, "seed", -(1 << 63), (1 << 63) - 1)  # a signed 64-bit integer, as PRNGKey takes
    n = _integer(1 if body.get("n") is None else body["n"], "n", 1, MAX_CHOICES)
    key = SamplingKey(max_tokens=max_tokens, temperature=temperature,
                      top_p=top_p if temperature > 0 else 1.0, top_k=max(top_k, 0) if temperature > 0 else 0,
                      enable_thinking=enable_thinking, seed=seed if temperature > 0 else None)
    return ChatRequest(model=model, messages=messages, tools=tools, parse_tool_calls=bool(tools), key=key, n=n,
                       stop=_stop(body.get("stop")), tool_choice=tool_choice, forced_tools=forced_tools,
                       tool_format=as_chat_format(limits.template).tool_format, stream=stream,
                       include_usage=include_usage)


# ---------------------------------------------------------------------------------------------
# Replies.


def _split_think_block(text: str) -> tuple[str | None, str]:
    """(reasoning, rest) for a turn that opens with a `<think>` block, split as the Qwen3 template does, at the
    first `</think>` outside a call's JSON (the tool-call parser's rule); a block never closed is no split."""
    if not text.lstrip().startswith("<think>"):
        return None, text
    reasoning, rest = split_reasoning(text)
    if not rest and not text.rstrip().endswith("</think>"):
        return None, text
    return reasoning, rest.lstrip("\n")


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    positions = [text.find(stop) for stop in stops if stop in text]
    return (text[: min(positions)], True) if positions else (text, False)


# Tool-call format -> how a call starts, up to its arguments ({name}: the JSON-quoted function name).
CALL_OPENINGS = {
    "qwen": '<tool_call>\n{{"name": {name}, "arguments":',  # <tool_call>\n{"name": ..., "arguments": {...}}
    "llama3": '{{"name": {name}, "parameters":',  # Llama 3.1 JSON: {"name": ..., "parameters": {...}}
}


def call_opening(name: str, tool_format: str = "qwen") -> str:
    """The start of a forced assistant turn: the call markup of `tool_format` up to the arguments of `name`.

    Both Qwen templates write a call as `<tool_call>\\n{"name": "NAME", "arguments": {...}}\\n</tool_call>`.
    The opening stops after `"arguments":` without the space: tokenizers glue that space to the `{` that
    follows (` {"`), so leaving it to the model keeps the arguments' first token the one it was trained on.
    Raises ValueError for a format without an entry in `CALL_OPENINGS`.
    """
    if tool_format not in CALL_OPENINGS:
        raise ValueError(f"no forced-call opening for the tool-call format {tool_format!r}; known: "
                         f"{sorted(CALL_OPENINGS)}")
    return CALL_OPENINGS[tool_format].format(name=json.dumps(name, ensure_ascii=False))


def _new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _raw_arguments(generated: str) -> str:
    """The arguments of a forced call that did not parse as a complete call: the JSON object the model
    generated when there is one, else its text up to `</tool_call>` without the outer object's `}`."""
    text = generated.split("</tool_call>", 1)[0].strip()
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    if text.endswith("}") and text.count("}") > text.count("{"):
        text = text[:-1].rstrip()
    return text


def _forced_choice(turn: GeneratedTurn, forced_tools: Sequence[str], stop: Sequence[str],
                   tool_format: str) -> tuple[dict[str, Any], str]:
    name = max((n for n in forced_tools if turn.text.startswith(call_opening(n, tool_format))), key=len, default=None)
    if name is None:
        raise ValueError(f"a forced turn must start with the call opening of one of {list(forced_tools)}, "
                         f"got {turn.text[:80]!r}")
    opening = call_opening(name, tool_format)
    generated, stopped_by_string = _cut_at_stop(turn.text[len(opening):], stop)
    parsed = parse_assistant_turn(opening + generated, tool_format)
    calls = list(parsed.tool_calls)
    if len(forced_tools) == 1:  # a named function: only calls to it
        calls = [call for call in calls if call.name == name]
    content = None
    if calls and calls[0].name == name:
        entries = [(call.name, json.dumps(call.arguments, ensure_ascii=False)) for call in calls]
        content = parsed.content or None
    else:
        entries = [(name, _raw_arguments(generated))]
    message = {"role": "assistant", "content": content, "tool_calls": [
        {"id": _new_call_id(), "type": "function", "function": {"name": call_name, "arguments": arguments}}
        for call_name, arguments in entries]}
    return message, "length" if turn.truncated and not stopped_by_string else "tool_calls"


def assistant_choice(turn: GeneratedTurn, *, template: str, parse_tool_calls: bool, stop: Sequence[str] = (),
                     forced_tools: Sequence[str] = ()) -> tuple[dict[str, Any], str]:
    """The OpenAI assistant message and finish_reason of a generated turn (see the module notes).

    With `forced_tools` the turn's text starts with `call_opening` of one of them (the engine puts it there)
    and the message is a call to that function whatever the model generated; raises ValueError otherwise.
    """
    chat_format = as_chat_format(template)
    if forced_tools:
        return _forced_choice(turn, forced_tools, stop, chat_format.tool_format)
    text, stopped_by_string = _cut_at_stop(turn.text, stop)
    reasoning, rest = _split_think_block(text) if chat_format.name == "qwen3" else (None, text)
    message: dict[str, Any] = {"role": "assistant", "content": rest}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if turn.truncated and not stopped_by_string:
        return message, "length"
    parsed = parse_assistant_turn(rest, chat_format.tool_format) if parse_tool_calls else None
    if parsed is None or not parsed.tool_calls:
        return message, "stop"
    message["content"] = parsed.content or None
    message["tool_calls"] = [
        {"id": _new_call_id(), "type": "function",
         "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
        for call in parsed.tool_calls
    ]
    return message, "tool_calls"


def _usage(turns: Sequence[GeneratedTurn]) -> dict[str, int]:
    prompt_tokens = len(turns[0].prompt_ids) if turns else 0
    completion_tokens = sum(len(turn.token_ids) for turn in turns)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _choices(request: ChatRequest, turns: Sequence[GeneratedTurn], template: str) -> list[tuple[dict[str, Any], str]]:
    return [assistant_choice(turn, template=template, parse_tool_calls=request.parse_tool_calls, stop=request.stop,
                             forced_tools=request.forced_tools) for turn in turns]


def completion_body(request: ChatRequest, turns: Sequence[GeneratedTurn], *, template: str,
                    completion_id: str | None = None, created: int | None = None) -> dict[str, Any]:
    """The `chat.completion` object for a request's generated turns (one per choice)."""
    choices = [{"index": index, "message": message, "finish_reason": finish_reason, "logprobs": None}
               for index, (message, finish_reason) in enumerate(_choices(request, turns, template))]
    return {
        "id": completion_id or "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": request.model,
        "choices": choices,
        "usage": _usage(turns),
        "system_fingerprint": None,
    }


def _message_deltas(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The deltas that rebuild `message` when concatenated the way OpenAI clients do."""
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    if message.get("reasoning_content"):
        deltas.append({"reasoning_content": message["reasoning_content"]})
    if message.get("content"):
        deltas.append({"content": message["content"]})
    for index, call in enumerate(message.get("tool_calls") or ()):
        function = call["function"]
        deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                       "function": {"name": function["name"], "arguments": ""}}]})
        if function["arguments"]:
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": function["arguments"]}}]})
    return deltas


def completion_chunks(request: ChatRequest, turns: Sequence[GeneratedTurn], *, template: str,
                      completion_id: str | None = None, created: int | None = None) -> list[dict[str, Any]]:
    """The `chat.completion.chunk` objects of a streamed reply, in order (see the module notes).

    Each choice's chunks carry its `index`: the role, content and tool-call deltas, then an empty delta with
    the `finish_reason`. With `request.include_usage` every chunk has `"usage": null` and a last chunk with
    no choices carries the usage.
    """
    base: dict[str, Any] = {"id": completion_id or "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion.chunk",
                            "created": int(time.time()) if created is None else created, "model": request.model,
                            "system_fingerprint": None}
    if request.include_usage:
        base["usage"] = None
    chunks = []
    for index, (message, finish_reason) in enumerate(_choices(request, turns, template)):
        for delta in _message_deltas(message):
            chunks.append({**base, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                                "finish_reason": None}]})
        chunks.append({**base, "choices": [{"index": index, "delta": {}, "logprobs": None,
                                            "finish_reason": finish_reason}]})
    if request.include_usage:
        chunks.append({**base, "choices": [], "usage": _usage(turns)})
    return chunks


SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: Mapping[str, Any]) -> str:
    """One server-sent event carrying `payload` as JSON (`data: {...}` and a blank line)."""
    return "data: " + json.dumps(payload, ensure_ascii=False) + "\n\n"


# ---------------------------------------------------------------------------------------------
# Batching.


GeneratorFactory = Callable[[SamplingKey], TurnGenerator]


class _OpenedMessages(list):
    """A conversation's messages carrying the text its assistant turn must start with."""

    def __init__(self, messages: Sequence[Mapping[str, Any]], opening: str) -> None:
        super().__init__(messages)
        self.opening = opening


@functools.partial(jax.jit, static_argnames=("config",))
def continuation_logprobs(config: Any, params: Any, prompt_ids: jax.Array, prompt_mask: jax.Array,
                          continuation_ids: jax.Array, continuation_mask: jax.Array) -> jax.Array:
    """Summed log-probs [K] (float32) of K continuations [K, R] (right-padded, `continuation_mask` True on
    real tokens) of one prompt [1, P] (left-padded, `prompt_mask`), the prompt run once for all of them."""
    prompt_h, continuation_h = shared_prompt_hidden_states(config, params, prompt_ids, prompt_mask,
                                                           continuation_ids, continuation_mask)
    k, d = continuation_ids.shape[0], prompt_h.shape[-1]
    # The last prompt position predicts the first continuation token, continuation position j the token j + 1.
    hidden = jnp.concatenate([jnp.broadcast_to(prompt_h[:, -1:], (k, 1, d)), continuation_h[:, :-1]], axis=1)
    logprobs = jax.nn.log_softmax(logits_from_hidden(config, params, hidden), axis=-1)  # [K, R, V]
    picked = jnp.take_along_axis(logprobs, continuation_ids[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(continuation_mask, picked, 0.0), axis=-1)


class ServedPolicy(LocalPolicy):
    """A `LocalPolicy` whose turns may start with given text, and which picks a forced call's function.

    `policy(conversations, openings=[...])` appends each non-empty opening's ids to that prompt, so the
    model continues it (the returned `GeneratedTurn.text` is what it generated after the opening).
    `choose_tool` scores the declared tools' call openings. Without openings it is a `LocalPolicy`.
    """

    def _encode(self, messages: Sequence[Mapping[str, Any]], tools: Any) -> tuple[list[int], str | None]:
        # LocalPolicy encodes every prompt (`encode` and each call's conversations) through `_encode`:
        # (prompt ids, rendered text or None). An opened turn's prompt continues with the opening.
        ids, text = super()._encode(messages, tools)
        opening = getattr(messages, "opening", "")
        if not opening:
            return ids, text
        return ids + list(self.tokenizer.encode(opening, add_special_tokens=False)), \
            None if text is None else text + opening

    def __call__(self, conversations: Sequence[Any], openings: Sequence[str] | None = None) -> list[GeneratedTurn]:
        """The next assistant turn of every conversation; `openings[i]` (if given) starts conversation i's turn."""
        if openings is not None:
            if len(openings) != len(conversations):
                raise ValueError(f"got {len(openings)} openings for {len(conversations)} conversations; pass one "
                                 "per conversation ('' for none)")
            conversations = [(_OpenedMessages(messages, opening), tools) if opening else (messages, tools)
                             for (messages, tools), opening in zip(conversations, openings)]
        return super().__call__(conversations)

    def score_openings(self, messages: Sequence[Mapping[str, Any]], tools: Any,
                       openings: Sequence[str]) -> list[float]:
        """The log-probability (natural log, summed over its tokens) of each opening as the start of the
        assistant turn, computed in one forward pass over the prompt and the openings (prompt run once).

        Raises ValueError when there are no openings or the prompt is over `max_prompt_tokens`."""
        if not openings:
            raise ValueError("score_openings needs at least one opening")
        prompt = self.encode(messages, tools)
        if len(prompt) > self.max_prompt_tokens:
            raise ValueError(f"the prompt has {len(prompt)} tokens, over max_prompt_tokens={self.max_prompt_tokens}")
        pieces = [list(self.tokenizer.encode(opening, add_special_tokens=False)) for opening in openings]
        width, rows = bucket(len(prompt)), bucket(len(pieces), minimum=1)
        prompt_ids = np.full((1, width), self.pad_id, np.int32)
        prompt_ids[0, width - len(prompt):] = prompt
        prompt_mask = np.arange(width)[None] >= width - len(prompt)
        length = bucket(max(map(len, pieces)), minimum=1)
        continuation_ids = np.full((rows, length), self.pad_id, np.int32)
        continuation_mask = np.zeros((rows, length), bool)
        for row, piece in enumerate(pieces):
            continuation_ids[row, :len(piece)] = piece
            continuation_mask[row, :len(piece)] = True
        scores = continuation_logprobs(self.config, self.params, prompt_ids, prompt_mask, continuation_ids,
                                       continuation_mask)
        return [float(x) for x in np.asarray(scores)[:len(pieces)]]

    def choose_tool(self, messages: Sequence[Mapping[str, Any]], tools: Any, names: Sequence[str],
                    tool_format: str = "qwen") -> str:
        """The name in `names` whose `call_opening(name, tool_format)` is the most likely start of the turn (the
        first on ties); with one name, that name. A prompt over budget gets the first name (it is refused anyway)."""
        if len(names) == 1:
            return names[0]
        try:
            scores = self.score_openings(messages, tools, [call_opening(name, tool_format) for name in names])
        except ValueError:
            return names[0]
        return names[max(range(len(names)), key=lambda i: (scores[i], -i))]


def local_policy_factory(config: Any, params: Any, tokenizer: Any, *, template: str,
                         max_prompt_tokens: int | None = None, data_sharding: Any = None,
                         seed: int = 0) -> GeneratorFactory:
    """Builds one `ServedPolicy` per sampling key, all sharing the parameters and the compiled sampler.

    A request's prompt budget is the context minus its max_tokens, capped at `max_prompt_tokens`. Sampled
    requests without a seed of their own draw from `seed`.
    """

    def policy_for(key: SamplingKey) -> ServedPolicy:
        budget = config.max_position_embeddings - key.max_tokens
        if max_prompt_tokens is not None:
            budget = min(budget, max_prompt_tokens)
        return ServedPolicy(config, params, tokenizer, template=template, enable_thinking=key.enable_thinking,
                           max_new_tokens=key.max_tokens, max_prompt_tokens=budget, temperature=key.temperature,
                           top_p=key.top_p, top_k=key.top_k, data_sharding=data_sharding,
                           seed=key.seed if key.seed is not None else seed)

    return policy_for


@dataclasses.dataclass
class _Pending:
    request: ChatRequest
    future: concurrent.futures.Future


class BatchingEngine:
    """Generates requests in batches on one worker thread.

    The worker waits for a request, then keeps collecting while requests keep coming: until none has
    arrived for `batch_window_s`, `max_wait_s` after the first, or `max_batch_size` conversations wait, groups what it has by sampling key and makes one
    generator call per group (a request asking for n choices contributes n conversations). Generators
    come from `generator_for(key)` and are kept for the `cached_generators` most recent keys, so a
    conversation's turns meet the same generator (and its memory of sampled ids); a seeded sampled
    request always gets a fresh one. A failing call fails only its group's requests.

    A request with `forced_tools` has its turns started with `call_opening(name)`: the one name, or for
    several the generator's `choose_tool(messages, tools, names, tool_format)`. The generator is then called as
    `generator(conversations, openings=[...])` (`ServedPolicy` takes that) and the opening is put back in
    front of each returned turn's text. Requests without forced tools call `generator(conversations)`.
    """

    def __init__(self, generator_for: GeneratorFactory, *, max_batch_size: int = 64, batch_window_s: float = 0.005,
                 max_wait_s: float | None = None, cached_generators: int = 8) -> None:
        max_wait_s = 10 * batch_window_s if max_wait_s is None else max_wait_s
        if max_batch_size < 1 or batch_window_s < 0 or max_wait_s < 0:
            raise ValueError(f"need max_batch_size >= 1, batch_window_s >= 0 and max_wait_s >= 0, got "
                             f"{max_batch_size}, {batch_window_s}, {max_wait_s}")
        self.generator_for = generator_for
        self.max_batch_size = int(max_batch_size)
        self.batch_window_s = float(batch_window_s)
        self.max_wait_s = float(max_wait_s)
        self._cached = int(cached_generators)
        self._generators: collections.OrderedDict[SamplingKey, TurnGenerator] = collections.OrderedDict()
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._stats: collections.Counter[str] = collections.Counter()
        self._batch_sizes: list[int] = []
        self._stats_lock = threading.Lock()
        self._worker = threading.Thread(target=self._run, name="batching-engine", daemon=True)
        self._worker.start()

    @property
    def stats(self) -> dict[str, Any]:
        """Counters (requests, batches, generator_calls, failed_calls) and the largest batch seen."""
        with self._stats_lock:
            return {**self._stats, "largest_batch": max(self._batch_sizes, default=0)}

    def submit(self, request: ChatRequest) -> concurrent.futures.Future:
        """Queues a request; the future resolves to its `n` generated turns."""
        if not self._worker.is_alive():
            raise RuntimeError("the batching engine is closed; start a new one")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Pending(request, future))
        return future

    def generate(self, request: ChatRequest, timeout: float | None = None) -> list[GeneratedTurn]:
        """Submits a request and waits for its turns."""
        return self.submit(request).result(timeout)

    def _generator(self, key: SamplingKey) -> TurnGenerator:
        if key.seed is not None:
            return self.generator_for(key)
        generator = self._generators.get(key)
        if generator is None:
            generator = self._generators[key] = self.generator_for(key)
        self._generators.move_to_end(key)
        while len(self._generators) > self._cached:
            self._generators.popitem(last=False)
        return generator

    def _collect(self, first: _Pending) -> tuple[list[_Pending], bool]:
        """The requests of one round; the flag says the engine was closed meanwhile."""
        batch = [first]
        size = first.request.n
        # Clients released together arrive spread over the time their requests take to parse: a burst
        # is gathered as long as it goes on, within a bound on the first request's wait.
        latest = time.monotonic() + self.max_wait_s
        while size < self.max_batch_size:
            timeout = min(self.batch_window_s, latest - time.monotonic())
            try:
                item = self._queue.get(timeout=max(0.0, timeout))
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
            size += item.request.n
        return batch, False

    @staticmethod
    def _groups(batch: Sequence[_Pending], max_size: int) -> list[list[_Pending]]:
        """Requests grouped by sampling key (seeded ones alone), each group at most max_size conversations."""
        by_key: dict[Any, list[list[_Pending]]] = collections.defaultdict(lambda: [[]])
        for number, item in enumerate(batch):
            key = item.request.key
            chunks = by_key[(key, number) if key.seed is not None else key]
            if chunks[-1] and sum(p.request.n for p in chunks[-1]) + item.request.n > max_size:
                chunks.append([])
            chunks[-1].append(item)
        return [chunk for chunks in by_key.values() for chunk in chunks]

    def _run_group(self, group: Sequence[_Pending]) -> None:
        live = [item for item in group if item.future.set_running_or_notify_cancel()]
        if not live:
            return
        conversations = [(item.request.messages, item.request.tools) for item in live for _ in range(item.request.n)]
        try:
            generator = self._generator(live[0].request.key)
            openings = [opening for item in live
                        for opening in [self._opening(generator, item.request)] * item.request.n]
            if any(openings):
                turns = generator(conversations, openings=openings)
                turns = [dataclasses.replace(turn, text=opening + turn.text) if opening and not turn.prompt_too_long
                         else turn for turn, opening in zip(turns, openings)]
            else:
                turns = generator(conversations)
            if len(turns) != len(conversations):
                raise RuntimeError(f"the generator returned {len(turns)} turns for {len(conversations)} conversations")
        except Exception as exc:  # noqa: BLE001 - the group's requests get the error; the server goes on
            logger.exception("generation failed for a batch of %d conversations", len(conversations))
            with self._stats_lock:
                self._stats["failed_calls"] += 1
            for item in live:
                item.future.set_exception(exc)
            return
        with self._stats_lock:
            self._stats.update(generator_calls=1, requests=len(live))
            self._batch_sizes.append(len(conversations))
        position = 0
        for item in live:
            item.future.set_result(list(turns[position: position + item.request.n]))
            position += item.request.n

    @staticmethod
    def _opening(generator: TurnGenerator, request: ChatRequest) -> str:
        names = request.forced_tools
        if not names:
            return ""
        if len(names) == 1:
            return call_opening(names[0], request.tool_format)
        choose = getattr(generator, "choose_tool", None)
        if choose is None:
            raise TypeError(f"{type(generator).__name__} has no choose_tool(messages, tools, names, tool_format), "
                            "which tool_choice='required' with several tools needs; serve a ServedPolicy")
        name = choose(request.messages, request.tools, names, request.tool_format)
        if name not in names:
            raise ValueError(f"choose_tool returned {name!r}, which is not among the declared tools {list(names)}")
        return call_opening(name, request.tool_format)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, closed = self._collect(first)
            with self._stats_lock:
                self._stats["batches"] += 1
            for group in self._groups(batch, self.max_batch_size):
                self._run_group(group)
            if closed:
                return

    def close(self, timeout: float | None = 10.0) -> None:
        """Stops the worker once the queued requests are done."""
        self._queue.put(None)
        self._worker.join(timeout)


# ---------------------------------------------------------------------------------------------
# The service: what a route does, independent of the web framework (`ftrl_jax.serving.app` routes to it).


class PolicyService:
    """Answers OpenAI API requests for one served model: request checks, the batching engine, reply bodies.

    The web app (`ftrl_jax.serving.app.create_app`) calls `check_api_key`, `parse`, `submit` and then
    `completion` or `stream_events`; `chat_completion` does all of it in one blocking call.
    """

    def __init__(self, engine: BatchingEngine, limits: ServerLimits, *, api_key: str = "",
                 request_timeout_s: float = 600.0) -> None:
        self.engine = engine
        self.limits = limits
        self.api_key = api_key
        self.request_timeout_s = float(request_timeout_s)
        self.created = int(time.time())
        self._ids = itertools.count()

    def model_card(self) -> dict[str, Any]:
        """The `model` object of the served model (`GET /v1/models/{id}`)."""
        return {"id": self.limits.model_name, "object": "model", "created": self.created, "owned_by": "ftrl_jax",
                "max_model_len": self.limits.context_length}

    def models(self) -> dict[str, Any]:
        """The `GET /v1/models` list: the one served model."""
        return {"object": "list", "data": [self.model_card()]}

    def model(self, name: str) -> dict[str, Any]:
        """The model card for `GET /v1/models/{name}`; RequestError 404 for any other name."""
        if name != self.limits.model_name:
            raise RequestError(404, f"The model {name!r} does not exist; this server serves {self.limits.model_name!r}",
                               param="model", code="model_not_found")
        return self.model_card()

    def check_api_key(self, authorization: str | None) -> None:
        """Raises RequestError 401 unless the `Authorization` header carries the key (no key set: open)."""
        if self.api_key and authorization != f"Bearer {self.api_key}":
            raise RequestError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                               type="authentication_error", code="invalid_api_key")

    def parse(self, body: bytes) -> ChatRequest:
        """A raw `/v1/chat/completions` body (UTF-8 JSON) -> ChatRequest; RequestError 400/404 names the fault."""
        try:
            decoded = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _invalid(f"the request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise _invalid("the request body nests arrays or objects too deeply to be a chat request") from None
        return parse_chat_request(decoded, self.limits)

    def submit(self, request: ChatRequest) -> concurrent.futures.Future:
        """Queues the request on the batching engine; the future resolves to its n turns."""
        return self.engine.submit(request)

    def _checked(self, request: ChatRequest, turns: Sequence[GeneratedTurn]) -> str:
        too_long = next((turn for turn in turns if turn.prompt_too_long), None)
        if too_long is not None:
            raise _invalid(
                f"This model's maximum context length is {self.limits.context_length} tokens. The messages take "
                f"{len(too_long.prompt_ids)} tokens and max_tokens asks for {request.key.max_tokens} more, which is "
                "over the prompt budget; shorten the messages or lower max_tokens",
                "messages", "context_length_exceeded")
        return f"chatcmpl-{next(self._ids)}-{uuid.uuid4().hex[:12]}"

    def completion(self, request: ChatRequest, turns: Sequence[GeneratedTurn]) -> dict[str, Any]:
        """The `chat.completion` body of generated turns; RequestError 400 when the prompt did not fit."""
        return completion_body(request, turns, template=self.limits.template,
                               completion_id=self._checked(request, turns))

    def stream_events(self, request: ChatRequest, turns: Sequence[GeneratedTurn]) -> list[str]:
        """The server-sent events of a streamed reply (`completion_chunks`, then `data: [DONE]`)."""
        chunks = completion_chunks(request, turns, template=self.limits.template,
                                   completion_id=self._checked(request, turns))
        return [sse_event(chunk) for chunk in chunks] + [SSE_DONE]

    def generation_error(self, exc: BaseException) -> RequestError:
        """What a client is told when its turns could not be generated (503 on time-out, else 500)."""
        if isinstance(exc, RequestError):
            return exc
        if isinstance(exc, (concurrent.futures.TimeoutError, TimeoutError)):
            return RequestError(503, f"generation did not finish within {self.request_timeout_s:g} s; retry later",
                                type="server_error", code="timeout")
        return RequestError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")

    def chat_completion(self, body: bytes) -> dict[str, Any] | list[str]:
        """Parses, generates (blocking) and answers one request: the completion body, or the SSE events of a
        `stream=true` request. Raises RequestError with the status and OpenAI error body to send."""
        request = self.parse(body)
        try:
            turns = self.submit(request).result(self.request_timeout_s)
        except Exception as exc:  # noqa: BLE001 - reported to the client as a server error
            raise self.generation_error(exc) from None
        return self.stream_events(request, turns) if request.stream else self.completion(request, turns)

    def close(self, timeout: float | None = 10.0) -> None:
        """Stops the batching engine once its queued requests are done."""
        self.engine.close(timeout)


def build_service(model: str | os.PathLike, *, served_model_name: str = "", tokenizer_dir: str | os.PathLike | None = None,
                  template: str | None = None, enable_thinking: bool = False, dtype: str = "float32",
                  tensor_parallel: int = 1, max_batch_size: int = 64, batch_window_s: float = 0.005,
                  max_wait_s: float = 0.05, default_max_tokens: int = 512, max_prompt_tokens: int | None = None,
                  api_key: str = "", request_timeout_s: float = 600.0, seed: int = 0) -> PolicyService:
    """Loads a policy directory (or WORKDIR/export) and wires the batching engine and the service around it.

    Raises ValueError when a limit does not fit the model (`default_max_tokens` must be below its context,
    `max_prompt_tokens` at least 1) and what `load_policy` raises for a directory it cannot load.
    """
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"--max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    if request_timeout_s <= 0:
        raise ValueError(f"--request_timeout_s must be > 0, got {request_timeout_s}")
    policy = load_policy(model, dtype=dtype, template=template, tokenizer_dir=tokenizer_dir,
                         tensor_parallel=tensor_parallel)
    context = policy.config.max_position_embeddings
    if not 1 <= default_max_tokens < context:
        raise ValueError(f"--default_max_tokens={default_max_tokens} must be from 1 to {context - 1} "
                         f"(the model's context is {context} tokens)")
    factory = local_policy_factory(policy.config, policy.params, policy.tokenizer, template=policy.template,
                                   max_prompt_tokens=max_prompt_tokens, seed=seed)
    engine = BatchingEngine(factory, max_batch_size=max_batch_size, batch_window_s=batch_window_s,
                            max_wait_s=max_wait_s)
    limits = ServerLimits(model_name=served_model_name or os.fspath(model), context_length=context,
                          template=policy.template, default_max_tokens=default_max_tokens,
                          enable_thinking=enable_thinking)
    return PolicyService(engine, limits, api_key=api_key, request_timeout_s=request_timeout_s)
