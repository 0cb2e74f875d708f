"""A `TurnGenerator` over any OpenAI-compatible chat-completions server (vLLM, SGLang, hosted APIs, ours).

Rollouts keep an assistant turn as the text the model generated, calls included as `<tool_call>` markup
(see `ftrl_jax.rollout`). On the wire, conversations travel the OpenAI way: an assistant message carries
its calls in `tool_calls` (with ids) and each tool message answers one of them by `tool_call_id`
(`wire_messages`); the reply's `content`, `tool_calls` and `reasoning_content` are written back as text
the way the Qwen chat templates render a turn (`turn_text`). So when the policy writes its calls in its
template's own layout (trained Qwen models do), the text coming back is the text it generated and the
next prompt the server renders is the prompt an in-process policy would have seen.

Requests go through the official `openai` SDK, which owns the timeouts and the retries: connection
errors, timeouts, HTTP 408/409/429 and 5xx are retried with exponential backoff and jitter (0.5 s doubling
up to 8 s, or the server's `Retry-After` when it asks for at most two minutes). A prompt the server refuses
as longer than its context becomes a `prompt_too_long` turn, a real outcome of the episode. Anything else
that keeps failing raises `EndpointError`; `fatal` marks the answers no retry can fix (401, 403, 404: a
wrong key, URL or model name).
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from typing import Any

import openai

from ftrl_jax.rollout.episodes import Conversation, GeneratedTurn, TurnGenerationError
from ftrl_jax.text.tool_calls import format_qwen_tool_call, parse_assistant_turn

# Statuses the SDK retries (the server was busy, restarting or briefly unreachable); any 5xx is one too.
TRANSIENT_STATUSES = frozenset({408, 409, 429})
# Statuses that say the evaluation itself is set up wrongly -> what to check.
FATAL_STATUSES: dict[int, str] = {
    401: "the server refused the API key; check --api_key (or $OPENAI_API_KEY)",
    403: "the server refused access with this API key; check --api_key and the key's permissions",
    404: "the server has no such route or model; check --base_url (it should end in /v1) and --model_name",
}
# How servers say a prompt does not fit the context (OpenAI's error code, vLLM's and others' wording).
CONTEXT_LENGTH_MARKERS = (
    "context_length_exceeded",
    "maximum context length",
    "context length",
    "prompt is too long",
    "'max_tokens' or 'max_completion_tokens' is too large",
)
# Body fields that `chat.completions.create` takes by name; every other field travels in `extra_body`.
_CREATE_FIELDS = ("model", "messages", "max_tokens", "temperature", "top_p", "tools")
# The SDK refuses to start without a key; servers without auth get this one and no Authorization header.
_NO_KEY = "no-key"


class EndpointError(TurnGenerationError):
    """A chat-completions request failed for good: after its retries, or at once when retrying cannot help.

    `status` is the last HTTP status (None for network errors and unreadable replies), `attempts` how many
    requests were sent, `fatal` whether the setup is wrong (bad key, URL or model name) rather than this one
    request.
    """

    def __init__(self, message: str, *, status: int | None = None, attempts: int = 1, fatal: bool = False):
        super().__init__(message)
        self.status = status
        self.attempts = attempts
        self.fatal = fatal


def is_transient(status: int) -> bool:
    """Whether the SDK retries an answer with this HTTP status."""
    return status in TRANSIENT_STATUSES or status >= 500


def no_key_headers(api_key: str) -> dict[str, Any]:
    """Per-request headers that drop `Authorization` when there is no key (servers without auth)."""
    return {} if api_key else {"Authorization": openai.Omit()}


# ---------------------------------------------------------------------------------------------
# Messages: rollout text <-> OpenAI wire format (pure).


def _text_of(content: Any) -> str:
    """Message content as text: strings as they are, OpenAI content parts joined, None as ""."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    return str(content)


def wire_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rollout messages in the OpenAI wire format.

    Assistant text with `<tool_call>` markup becomes `content` (the text outside the calls, None when
    empty), `tool_calls` (arguments as JSON strings, ids `call_<message index>_<k>`) and, for a turn
    that reasoned in a `<think>` block, `reasoning_content`. A turn without well-formed calls keeps its
    text verbatim. Tool messages answer the earliest unanswered call by `tool_call_id`. Messages already
    in the wire format pass through with string arguments.
    """
    wired: list[dict[str, Any]] = []
    unanswered: deque[str] = deque()
    for index, message in enumerate(messages):
        role = message.get("role")
        if role == "assistant":
            entry = _wire_assistant(message, index)
            unanswered.extend(call["id"] for call in entry.get("tool_calls", ()))
        elif role == "tool":
            call_id = message.get("tool_call_id") or (unanswered.popleft() if unanswered else f"call_{index}_0")
            if message.get("tool_call_id") in unanswered:
                unanswered.remove(message["tool_call_id"])
            entry = {"role": "tool", "tool_call_id": call_id, "content": _text_of(message.get("content"))}
        else:
            entry = {"role": role, "content": _text_of(message.get("content"))}
        wired.append(entry)
    return wired


def _wire_assistant(message: Mapping[str, Any], index: int) -> dict[str, Any]:
    if message.get("tool_calls"):  # already structured
        calls = []
        for k, call in enumerate(message["tool_calls"]):
            function = call.get("function", call)
            arguments = function.get("arguments", {})
            calls.append({"id": call.get("id") or f"call_{index}_{k}", "type": "function",
                          "function": {"name": function.get("name"),
                                       "arguments": arguments if isinstance(arguments, str)
                                       else json.dumps(arguments, ensure_ascii=False)}})
        entry = {"role": "assistant", "content": message.get("content") or None, "tool_calls": calls}
    else:
        text = _text_of(message.get("content"))
        parsed = parse_assistant_turn(text)
        if not parsed.tool_calls:
            return {"role": "assistant", "content": text}
        entry = {
            "role": "assistant",
            "content": parsed.content or None,
            "tool_calls": [{"id": f"call_{index}_{k}", "type": "function",
                            "function": {"name": call.name,
                                         "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
                           for k, call in enumerate(parsed.tool_calls)],
        }
        if parsed.reasoning:
            entry["reasoning_content"] = parsed.reasoning
    return entry


def _call_block(function: Mapping[str, Any]) -> str:
    """One reply call as the `<tool_call>` block a Qwen template writes; arguments that are not a JSON
    object are kept as sent, so the rollout sees (and scores) the broken call."""
    name = function.get("name")
    arguments = function.get("arguments")
    decoded = arguments
    if isinstance(arguments, str):
        try:
            decoded = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            decoded = None
    if isinstance(name, str) and isinstance(decoded, dict):
        return format_qwen_tool_call(name, decoded)
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return '<tool_call>\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": ' + raw + "}\n</tool_call>"


def turn_text(message: Mapping[str, Any]) -> str:
    """A reply's assistant message as rollout text: content, then one `<tool_call>` block per call on
    its own line, after a `<think>` block when the reply carries `reasoning_content` (or `reasoning`)."""
    content = _text_of(message.get("content"))
    blocks = [_call_block(call.get("function") or {}) for call in message.get("tool_calls") or ()
              if isinstance(call, Mapping)]
    text = "\n".join(([content] if content else []) + blocks) if blocks else content
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning.strip():
        text = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + text
    return text


def is_context_length_error(body: str) -> bool:
    """Whether an HTTP 400/413 body says the prompt does not fit the model's context."""
    lowered = body.lower()
    return any(marker.lower() in lowered for marker in CONTEXT_LENGTH_MARKERS)


# ---------------------------------------------------------------------------------------------
# The generator.


class OpenAIChatGenerator:
    """Samples assistant turns from an OpenAI-compatible `/chat/completions` endpoint through the `openai` SDK.

    `base_url` is the API root (e.g. `http://127.0.0.1:8000/v1`), `model` the served model name; an empty
    `api_key` sends no `Authorization` header. One call of the generator sends its conversations
    concurrently, up to `concurrency` at a time. Every request waits at most `timeout_s` seconds and is
    retried `max_retries` times on transient failures (the SDK's backoff, see the module docstring).
    `enable_thinking`, when not None, is sent as `chat_template_kwargs` (the vLLM convention for Qwen3's
    reasoning mode); `extra_body` is merged into every request body last, so it may also override a
    field. `http_client` replaces the SDK's own connection pool (an `httpx.Client`, e.g. with a mock
    transport in tests); it stays open on `close`. Returned turns carry text only: the server's token ids
    are not known here (`stats` counts the usage the server reports).

    Raises ValueError for a base_url without http(s)://, an empty model or a non-positive setting.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str = "", max_new_tokens: int = 512,
                 temperature: float = 0.0, top_p: float = 1.0, enable_thinking: bool | None = None,
                 extra_body: Mapping[str, Any] | None = None, concurrency: int = 8, timeout_s: float = 300.0,
                 max_retries: int = 4, http_client: Any = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not model:
            raise ValueError("model is empty; pass the name the server serves (GET <base_url>/models lists them)")
        if max_new_tokens < 1 or concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError(f"need max_new_tokens >= 1, concurrency >= 1, max_retries >= 0 and timeout_s > 0; got "
                             f"{max_new_tokens}, {concurrency}, {max_retries}, {timeout_s}")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.enable_thinking = enable_thinking
        self.extra_body = dict(extra_body or {})
        self.concurrency = int(concurrency)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self._stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        # Requests sent by this thread's current call: the SDK retries inside one call and reports no count.
        self._attempts = threading.local()
        self._own_http_client = http_client is None
        if http_client is not None:
            http_client.event_hooks["request"].append(self._on_request)
        self._http_client = http_client
        self._sdk: openai.OpenAI | None = None
        self._sdk_lock = threading.Lock()

    @property
    def stats(self) -> dict[str, int]:
        """Counters: requests, retries, failures, prompt_too_long, prompt_tokens, completion_tokens."""
        with self._stats_lock:
            return dict(self._stats)

    def _count(self, **amounts: int) -> None:
        with self._stats_lock:
            self._stats.update(amounts)

    def _on_request(self, request: Any) -> None:
        self._attempts.count = getattr(self._attempts, "count", 0) + 1
        self._count(requests=1)

    def _attempts_taken(self) -> int:
        """Requests this thread sent for its last call (retries counted in the stats)."""
        attempts = max(1, getattr(self._attempts, "count", 0))
        self._count(retries=attempts - 1)
        return attempts

    def client(self) -> openai.OpenAI:
        """The SDK client every request goes through (built on first use, again after `close`)."""
        with self._sdk_lock:
            if self._sdk is None:
                http_client = self._http_client
                if http_client is None:
                    http_client = openai.DefaultHttpxClient(event_hooks={"request": [self._on_request]})
                self._sdk = openai.OpenAI(base_url=self.base_url, api_key=self.api_key or _NO_KEY,
                                          timeout=self.timeout_s, max_retries=self.max_retries,
                                          http_client=http_client)
            return self._sdk

    def payload(self, messages: Sequence[Mapping[str, Any]], tools: Any) -> dict[str, Any]:
        """The request body for one conversation (greedy when temperature is 0); `tools` may be a JSON string."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": wire_messages(messages),
            "max_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        if isinstance(tools, str):
            tools = json.loads(tools)
        if tools:
            body["tools"] = list(tools)
        if self.enable_thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": bool(self.enable_thinking)}
        body.update(self.extra_body)
        return body

    def _failure(self, exc: openai.APIError, attempts: int) -> EndpointError | None:
        """The EndpointError for an SDK error, or None when the server says the prompt is over the context."""
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            detail = exc.response.text
            last = f"HTTP {status}: {detail[:500]}"
            if status in (400, 413) and is_context_length_error(detail):
                return None
            if status in FATAL_STATUSES:
                return EndpointError(f"{self.url} answered {last}; {FATAL_STATUSES[status]}", status=status,
                                     attempts=attempts, fatal=True)
            if not is_transient(status):
                return EndpointError(f"{self.url} refused the request with {last}", status=status,
                                     attempts=attempts)
        else:  # APIConnectionError, APITimeoutError: no answer at all
            status = None
            cause = exc.__cause__
            last = f"{type(exc).__name__}: {exc}" + (f" ({type(cause).__name__}: {cause})" if cause else "")
        return EndpointError(f"{self.url} failed {attempts} times (timeout {self.timeout_s:g} s each); "
                             f"last error: {last}", status=status, attempts=attempts)

    def request(self, payload: Mapping[str, Any]) -> dict[str, Any] | None:
        """Sends one request body with the SDK's retries.

        Returns the reply as a dict (the fields the server sent, extra ones included), or None when the
        server refused the prompt as longer than its context. Raises EndpointError otherwise.
        """
        named = {field: payload[field] for field in _CREATE_FIELDS if field in payload}
        extra = {field: value for field, value in payload.items() if field not in named}
        self._attempts.count = 0
        try:
            completion = self.client().chat.completions.create(
                **named, extra_body=extra or None, extra_headers=no_key_headers(self.api_key))
        except openai.APIError as exc:
            error = self._failure(exc, self._attempts_taken())
            if error is None:
                return None
            self._count(failures=1)
            raise error from None
        except ValueError as exc:  # a body labelled JSON that is not
            completion = exc
        attempts = self._attempts_taken()
        if not isinstance(completion, openai.BaseModel):  # the SDK hands back other bodies as text
            self._count(failures=1)
            raise EndpointError(f"{self.url} answered with a body that is not a JSON object "
                                f"({str(completion)[:200]!r}); check that --base_url is the API root of an "
                                "OpenAI-compatible server (it should end in /v1)", attempts=attempts)
        return completion.to_dict()

    def complete(self, messages: Sequence[Mapping[str, Any]], tools: Any) -> GeneratedTurn:
        """The next assistant turn of one conversation; raises EndpointError when the request keeps failing."""
        reply = self.request(self.payload(messages, tools))
        if reply is None:
            self._count(prompt_too_long=1)
            return GeneratedTurn("", [], [], [], truncated=False, prompt_too_long=True)
        try:
            choice = reply["choices"][0]
            message = choice["message"]
            if not isinstance(message, Mapping):
                raise TypeError("message is not an object")
        except (KeyError, IndexError, TypeError) as exc:
            self._count(failures=1)
            raise EndpointError(f"{self.url} answered without choices[0].message ({exc}): {str(reply)[:300]}") from None
        usage = reply.get("usage") or {}
        self._count(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0))
        return GeneratedTurn(turn_text(message), [], [], [], truncated=choice.get("finish_reason") == "length")

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="openai")
            return self._pool

    def __call__(self, conversations: Sequence[Conversation]) -> list[GeneratedTurn]:
        """The next turn of every conversation, requested concurrently; the first EndpointError is raised
        once every request has finished."""
        if len(conversations) == 1:  # no thread hop for the one-episode-per-thread evaluation
            return [self.complete(*conversations[0])]
        futures = [self._executor().submit(self.complete, messages, tools) for messages, tools in conversations]
        concurrent.futures.wait(futures)
        return [future.result() for future in futures]

    def list_models(self) -> list[str]:
        """The model ids the server lists at `<base_url>/models` (one request, no retries); raises the SDK's
        `openai.APIError` subclasses."""
        listed = self.client().with_options(max_retries=0).models.list(extra_headers=no_key_headers(self.api_key))
        return [entry.id for entry in listed.data]

    def close(self) -> None:
        """Stops the request threads (requests in flight finish first) and closes the connections this
        generator opened; a later call opens new ones."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        with self._sdk_lock:
            if self._sdk is not None and self._own_http_client:
                self._sdk.close()
            self._sdk = None

    def __enter__(self) -> OpenAIChatGenerator:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
