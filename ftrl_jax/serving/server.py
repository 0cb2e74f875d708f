"""An OpenAI-compatible chat-completions server for a policy on the jit sampler (stdlib HTTP only).

Three parts, each testable alone:
- `parse_chat_request` (pure): a request body -> `ChatRequest`, or `RequestError` with the OpenAI error
  body and status (400 invalid request, 404 unknown model, 413 body too large, ...);
- `BatchingEngine`: a worker thread that takes the requests arriving within a short window and
  generates each group of requests with the same sampling settings in ONE turn-generator call (for a
  `LocalPolicy`, one `sampling.generate`), so concurrent clients share the accelerator;
- `assistant_choice` (pure): a generated turn -> the OpenAI assistant message and `finish_reason`
  (`tool_calls` when calls parsed, `stop`, or `length`). Calls come from
  `ftrl_jax.text.tool_calls.parse_assistant_turn`, the parser rollouts use: JSON-aware, so a tag inside a
  string argument never splits a call, and a complete final call whose `</tool_call>` is missing is still a
  call (as vLLM's hermes parser gives it).
`PolicyService.handle` routes a request (`GET /v1/models`, `POST /v1/chat/completions`, `GET /health`)
and `make_server` puts it behind a `ThreadingHTTPServer`.

Prompts are rendered and encoded by `LocalPolicy`, exactly as in-process rollouts do: an earlier
assistant turn sent back unchanged (its content and calls re-rendered by the chat template) reuses the
token ids it was sampled as, so greedy evaluation over HTTP sees the prompts in-process evaluation sees.

Reply text conventions: without tools (or with `tool_choice="none"`) and whenever no call parses, the
content is the generated text verbatim. A turn cut by `max_tokens` keeps its text and makes no calls
(`finish_reason` `length`), as a truncated rollout turn runs none. With the qwen3 template a leading
`<think>` block comes back as `reasoning_content`. `stop` strings cut the text after generation (the row
still decodes to `max_tokens` or its end-of-turn token). `seed` makes a sampled request reproducible: it
is generated alone with a fresh key from that seed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import http.server
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

from ftrl_jax.text.chat import render_segments
from ftrl_jax.rollout.episodes import GeneratedTurn, TurnGenerator
from ftrl_jax.rollout.policy import LocalPolicy
from ftrl_jax.text.tool_calls import parse_assistant_turn, split_reasoning

logger = logging.getLogger(__name__)

# model_type in config.json -> chat template (the only two formats ftrl_jax.text.chat renders).
TEMPLATE_BY_MODEL_TYPE = {"qwen3": "qwen3", "qwen2": "qwen2.5", "llama": "qwen2.5"}
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
    template: str


def resolve_policy_dir(path: str | os.PathLike) -> str:
    """The Hugging Face directory of a policy: `path` itself, or `path/export` for a training WORKDIR."""
    path = os.fspath(path)
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
    """Loads a policy directory (or WORKDIR/export) with its tokenizer.

    `template` defaults to the model type's (`TEMPLATE_BY_MODEL_TYPE`); `tokenizer_dir` to the policy
    directory; `tensor_parallel` > 1 shards the weights over that many devices (heads and MLP width).
    """
    from ftrl_jax import models, parallel  # deferred: JAX start-up is not needed to parse requests
    from ftrl_jax.text.tokenizer import load_tokenizer

    directory = resolve_policy_dir(path)
    shardings = None
    if tensor_parallel > 1:
        import jax

        mesh = parallel.make_mesh(tensor=tensor_parallel, devices=jax.devices()[:tensor_parallel])
        shardings = parallel.checkpoint_sharding_fn(mesh)
    config, params = models.load_pretrained(directory, dtype=dtype, shardings=shardings)
    tokenizer = load_tokenizer(tokenizer_dir or directory)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer in {os.fspath(tokenizer_dir or directory)!r} has {len(tokenizer)} tokens "
                         f"but the model's vocab_size is {config.vocab_size}; pass the tokenizer the model was "
                         "trained with")
    chosen = template or TEMPLATE_BY_MODEL_TYPE.get(config.model_type, "qwen2.5")
    return LoadedPolicy(directory, config, params, tokenizer, chosen)


def save_random_policy(directory: str | os.PathLike, preset: str = "tiny", *, seed: int = 0, **overrides: Any) -> str:
    """Writes a randomly initialised `preset` model with the embedded tokenizer as a policy directory.

    `overrides` replace ModelConfig fields (e.g. `num_layers=1`); the vocabulary is the tokenizer's unless
    given. For benchmarks and tests that need a servable policy without training one. Returns the directory.
    """
    import jax

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
    """A checked chat-completions request: messages ready for `ftrl_jax.text.chat`, tools, sampling settings."""

    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    parse_tool_calls: bool
    key: SamplingKey
    n: int = 1
    stop: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What the served model allows and the defaults of a request that leaves them out."""

    model_name: str
    context_length: int
    template: str = "qwen2.5"
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
    "stream": _must_be(lambda v: v in (None, False), "streaming is not supported; send stream=false"),
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
    "stream_options": _must_be(lambda v: True, ""),
    "parallel_tool_calls": _must_be(lambda v: True, ""),  # several calls per turn are always allowed
}
_HANDLED_FIELDS = frozenset({"model", "messages", "tools", "tool_choice", "temperature", "top_p", "top_k", "max_tokens",
                             "max_completion_tokens", "seed", "stop", "n", "chat_template_kwargs"})


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
    tool_choice = body.get("tool_choice", "auto")
    if tool_choice not in (None, "auto", "none"):
        raise _invalid(f"tool_choice {tool_choice!r} is not supported; use 'auto' or 'none'", "tool_choice",
                       "unsupported_value")
    template_kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, Mapping) or set(template_kwargs) - {"enable_thinking"}:
        raise _invalid("chat_template_kwargs may only hold enable_thinking", "chat_template_kwargs")
    enable_thinking = bool(template_kwargs.get("enable_thinking", limits.enable_thinking))
    try:
        render_segments(messages, tools, template=limits.template, enable_thinking=enable_thinking)
    except ValueError as exc:
        raise _invalid(f"the messages cannot be rendered with the {limits.template} chat template: {exc}",
                       "messages") from None

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = limits.default_max_tokens if max_tokens is None else max_tokens
    max_tokens = _integer(max_tokens, "max_tokens", 1, limits.context_length - 1)
    # OpenAI's default temperature is 1; evaluation clients send 0 for greedy decoding.
    temperature = _number(1.0 if body.get("temperature") is None else body["temperature"], "temperature", 0.0, 2.0)
    top_p = _number(1.0 if body.get("top_p") is None else body["top_p"], "top_p", 1e-6, 1.0)
    top_k = _integer(0 if body.get("top_k") is None else body["top_k"], "top_k", -1, 1 << 30)
    seed = body.get("seed")
    if seed is not None:
        seed = _integer(seed, "seed", -(1 << 63), (1 << 64) - 1)
    n = _integer(1 if body.get("n") is None else body["n"], "n", 1, MAX_CHOICES)
    key = SamplingKey(max_tokens=max_tokens, temperature=temperature,
                      top_p=top_p if temperature > 0 else 1.0, top_k=max(top_k, 0) if temperature > 0 else 0,
                      enable_thinking=enable_thinking, seed=seed if temperature > 0 else None)
    return ChatRequest(model=model, messages=messages, tools=tools,
                       parse_tool_calls=bool(tools) and tool_choice != "none", key=key, n=n,
                       stop=_stop(body.get("stop")))


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


def assistant_choice(turn: GeneratedTurn, *, template: str, parse_tool_calls: bool,
                     stop: Sequence[str] = ()) -> tuple[dict[str, Any], str]:
    """The OpenAI assistant message and finish_reason of a generated turn (see the module notes)."""
    text, stopped_by_string = _cut_at_stop(turn.text, stop)
    reasoning, rest = _split_think_block(text) if template == "qwen3" else (None, text)
    message: dict[str, Any] = {"role": "assistant", "content": rest}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if turn.truncated and not stopped_by_string:
        return message, "length"
    parsed = parse_assistant_turn(rest) if parse_tool_calls else None
    if parsed is None or not parsed.tool_calls:
        return message, "stop"
    message["content"] = parsed.content or None
    message["tool_calls"] = [
        {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
         "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
        for call in parsed.tool_calls
    ]
    return message, "tool_calls"


def completion_body(request: ChatRequest, turns: Sequence[GeneratedTurn], *, template: str,
                    completion_id: str | None = None, created: int | None = None) -> dict[str, Any]:
    """The `chat.completion` object for a request's generated turns (one per choice)."""
    choices = []
    for index, turn in enumerate(turns):
        message, finish_reason = assistant_choice(turn, template=template, parse_tool_calls=request.parse_tool_calls,
                                                  stop=request.stop)
        choices.append({"index": index, "message": message, "finish_reason": finish_reason, "logprobs": None})
    prompt_tokens = len(turns[0].prompt_ids) if turns else 0
    completion_tokens = sum(len(turn.token_ids) for turn in turns)
    return {
        "id": completion_id or "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": request.model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "system_fingerprint": None,
    }


# ---------------------------------------------------------------------------------------------
# Batching.


GeneratorFactory = Callable[[SamplingKey], TurnGenerator]


def local_policy_factory(config: Any, params: Any, tokenizer: Any, *, template: str,
                         max_prompt_tokens: int | None = None, data_sharding: Any = None) -> GeneratorFactory:
    """Builds one `LocalPolicy` per sampling key, all sharing the parameters and the compiled sampler.

    A request's prompt budget is the context minus its max_tokens, capped at `max_prompt_tokens`.
    """

    def policy_for(key: SamplingKey) -> LocalPolicy:
        budget = config.max_position_embeddings - key.max_tokens
        if max_prompt_tokens is not None:
            budget = min(budget, max_prompt_tokens)
        return LocalPolicy(config, params, tokenizer, template=template, enable_thinking=key.enable_thinking,
                           max_new_tokens=key.max_tokens, max_prompt_tokens=budget, temperature=key.temperature,
                           top_p=key.top_p, top_k=key.top_k, data_sharding=data_sharding,
                           seed=key.seed if key.seed is not None else 0)

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
            turns = self._generator(live[0].request.key)(conversations)
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
# The service: routing and errors, independent of the HTTP plumbing.


class PolicyService:
    """Answers OpenAI API requests for one served model; `handle` returns (status, JSON body)."""

    def __init__(self, engine: BatchingEngine, limits: ServerLimits, *, api_key: str = "",
                 request_timeout_s: float = 600.0) -> None:
        self.engine = engine
        self.limits = limits
        self.api_key = api_key
        self.request_timeout_s = float(request_timeout_s)
        self.created = int(time.time())
        self._ids = itertools.count()
        self._routes: dict[tuple[str, str], Callable[[bytes], tuple[int, dict[str, Any]]]] = {
            ("POST", "/v1/chat/completions"): self._chat_completions,
            ("GET", "/v1/models"): lambda body: (200, {"object": "list", "data": [self._model_card()]}),
            ("GET", "/v1/models/" + limits.model_name): lambda body: (200, self._model_card()),
            ("GET", "/health"): lambda body: (200, {"status": "ok"}),
        }

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.limits.model_name, "object": "model", "created": self.created, "owned_by": "ftrl_jax",
                "max_model_len": self.limits.context_length}

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        """Routes one request; every refusal comes back as an OpenAI error body with its status."""
        path = path.split("?", 1)[0].rstrip("/") or "/"
        authorization = next((value for name, value in headers.items() if name.lower() == "authorization"), "")
        try:
            if self.api_key and path != "/health" and authorization != f"Bearer {self.api_key}":
                raise RequestError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                                   type="authentication_error", code="invalid_api_key")
            route = self._routes.get((method, path))
            if route is None:
                known = [p for m, p in self._routes if p == path]
                if known:
                    raise RequestError(405, f"{method} is not allowed on {path}", code="method_not_allowed")
                if path.startswith("/v1/models/"):
                    raise RequestError(404, f"The model {path[len('/v1/models/'):]!r} does not exist; this server "
                                       f"serves {self.limits.model_name!r}", param="model", code="model_not_found")
                raise RequestError(404, f"no route {method} {path}; this server answers POST /v1/chat/completions "
                                   "and GET /v1/models", code="not_found")
            return route(body)
        except RequestError as exc:
            return exc.status, exc.body()

    def _chat_completions(self, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            decoded = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _invalid(f"the request body is not valid JSON: {exc}") from None
        request = parse_chat_request(decoded, self.limits)
        try:
            turns = self.engine.generate(request, timeout=self.request_timeout_s)
        except concurrent.futures.TimeoutError:
            raise RequestError(503, f"generation did not finish within {self.request_timeout_s:g} s; retry later",
                               type="server_error", code="timeout") from None
        except Exception as exc:  # noqa: BLE001 - reported to the client as a server error
            raise RequestError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error") from None
        too_long = next((turn for turn in turns if turn.prompt_too_long), None)
        if too_long is not None:
            raise _invalid(
                f"This model's maximum context length is {self.limits.context_length} tokens. The messages take "
                f"{len(too_long.prompt_ids)} tokens and max_tokens asks for {request.key.max_tokens} more, which is "
                "over the prompt budget; shorten the messages or lower max_tokens",
                "messages", "context_length_exceeded")
        completion_id = f"chatcmpl-{next(self._ids)}-{uuid.uuid4().hex[:12]}"
        return 200, completion_body(request, turns, template=self.limits.template, completion_id=completion_id)


# ---------------------------------------------------------------------------------------------
# HTTP.


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as OpenAI clients expect
    server_version = "ftrl_jax"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        server: PolicyHTTPServer = self.server  # type: ignore[assignment]
        body = b""
        if method == "POST":
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self.close_connection = True
                self._send(411, RequestError(411, "send the body with a Content-Length header").body())
                return
            if int(length) > server.max_body_bytes:
                self._discard(int(length))  # read, so closing does not reset the connection under the reply
                self.close_connection = True
                self._send(413, RequestError(413, f"the request body has {length} bytes, over this server's limit "
                                             f"of {server.max_body_bytes}; send fewer or shorter messages",
                                             code="request_too_large").body())
                return
            body = self.rfile.read(int(length))
        status, payload = server.service.handle(method, self.path, dict(self.headers.items()), body)
        self._send(status, payload)

    def _discard(self, length: int, chunk: int = 1 << 20) -> None:
        while length > 0:
            read = len(self.rfile.read(min(chunk, length)))
            if not read:
                return
            length -= read

    def _send(self, status: int, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        logger.debug("%s - %s", self.address_string(), format % args)


class PolicyHTTPServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server around a `PolicyService` (one thread per connection)."""

    daemon_threads = True
    request_queue_size = 256  # the listen backlog: socketserver's 5 resets bursts of concurrent clients

    def __init__(self, address: tuple[str, int], service: PolicyService, *, max_body_bytes: int = 32 << 20) -> None:
        super().__init__(address, _Handler)
        self.service = service
        self.max_body_bytes = int(max_body_bytes)

    @property
    def base_url(self) -> str:
        """The API root clients use, e.g. http://127.0.0.1:8000/v1."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


def build_service(model: str | os.PathLike, *, served_model_name: str = "", tokenizer_dir: str | os.PathLike | None = None,
                  template: str | None = None, enable_thinking: bool = False, dtype: str = "float32",
                  tensor_parallel: int = 1, max_batch_size: int = 64, batch_window_s: float = 0.005,
                  max_wait_s: float = 0.05, default_max_tokens: int = 512, max_prompt_tokens: int | None = None,
                  api_key: str = "") -> "PolicyService":
    """Loads a policy directory (or WORKDIR/export) and wires the batching engine and the service around it.

    Raises ValueError when a limit does not fit the model (`default_max_tokens` must be below its context,
    `max_prompt_tokens` at least 1) and what `load_policy` raises for a directory it cannot load.
    """
    policy = load_policy(model, dtype=dtype, template=template, tokenizer_dir=tokenizer_dir,
                         tensor_parallel=tensor_parallel)
    context = policy.config.max_position_embeddings
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"--max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    if not 1 <= default_max_tokens < context:
        raise ValueError(f"--default_max_tokens={default_max_tokens} must be from 1 to {context - 1} "
                         f"(the model's context is {context} tokens)")
    factory = local_policy_factory(policy.config, policy.params, policy.tokenizer, template=policy.template,
                                   max_prompt_tokens=max_prompt_tokens)
    engine = BatchingEngine(factory, max_batch_size=max_batch_size, batch_window_s=batch_window_s,
                            max_wait_s=max_wait_s)
    limits = ServerLimits(model_name=served_model_name or os.fspath(model), context_length=context,
                          template=policy.template, default_max_tokens=default_max_tokens,
                          enable_thinking=enable_thinking)
    return PolicyService(engine, limits, api_key=api_key)


def make_server(service: PolicyService, host: str = "127.0.0.1", port: int = 8000, *,
                max_body_bytes: int = 32 << 20) -> PolicyHTTPServer:
    """An HTTP server for `service` bound to host:port (port 0: any free port); call `serve_forever()`."""
    return PolicyHTTPServer((host, port), service, max_body_bytes=max_body_bytes)


def start_in_thread(server: PolicyHTTPServer, poll_interval: float = 0.05) -> threading.Thread:
    """Runs `server.serve_forever()` on a daemon thread (stop it with `server.shutdown()`)."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": poll_interval},
                              name="policy-http", daemon=True)
    thread.start()
    return thread
