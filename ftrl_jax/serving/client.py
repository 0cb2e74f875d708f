"""A `TurnGenerator` over any OpenAI-compatible chat-completions server (vLLM, SGLang, hosted APIs, ours).

Rollouts keep an assistant turn as the text the model generated, calls included as `<tool_call>` markup
(see `ftrl_jax.rollout`). On the wire, conversations travel the OpenAI way: an assistant message carries
its calls in `tool_calls` (with ids) and each tool message answers one of them by `tool_call_id`
(`wire_messages`); the reply's `content`, `tool_calls` and `reasoning_content` are written back as text
the way the Qwen chat templates render a turn (`turn_text`). So when the policy writes its calls in its
template's own layout (trained Qwen models do), the text coming back is the text it generated and the
next prompt the server renders is the prompt an in-process policy would have seen.

Only the standard library is used (`urllib.request`). Each request has a timeout; connection errors,
timeouts, HTTP 408/409/425/429/5xx and unreadable replies are retried with exponential backoff and jitter
(honouring `Retry-After`). A prompt the server refuses as longer than its context becomes a
`prompt_too_long` turn, a real outcome of the episode. Anything else that keeps failing raises
`EndpointError`; `fatal` marks the answers no retry can fix (401, 403, 404: a wrong key, URL or model name).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from ftrl_jax.rollout.episodes import Conversation, GeneratedTurn, TurnGenerationError
from ftrl_jax.text.tool_calls import format_qwen_tool_call, parse_assistant_turn

# Statuses worth another try: the server was busy, restarting or briefly unreachable.
TRANSIENT_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
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
_NETWORK_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, socket.timeout, http.client.HTTPException)


class EndpointError(TurnGenerationError):
    """A chat-completions request failed for good: after its retries, or at once when retrying cannot help.

    `status` is the last HTTP status (None for network errors), `attempts` how many requests were sent,
    `fatal` whether the setup is wrong (bad key, URL or model name) rather than this one request.
    """

    def __init__(self, message: str, *, status: int | None = None, attempts: int = 1, fatal: bool = False):
        super().__init__(message)
        self.status = status
        self.attempts = attempts
        self.fatal = fatal


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
    """Samples assistant turns from an OpenAI-compatible `/chat/completions` endpoint.

    `base_url` is the API root (e.g. `http://127.0.0.1:8000/v1`), `model` the served model name. One
    call of the generator sends its conversations concurrently, up to `concurrency` at a time. Every
    request waits at most `timeout_s` and is retried `max_retries` times on transient failures, the
    k-th retry after about `backoff_s * 2**k` seconds (at most `max_backoff_s`). `enable_thinking`,
    when not None, is sent as `chat_template_kwargs` (the vLLM convention for Qwen3's reasoning mode);
    `extra_body` is merged into every request. Returned turns carry text only: the server's token ids
    are not known here (`stats` counts the usage the server reports).
    """

    def __init__(self, base_url: str, model: str, *, api_key: str = "", max_new_tokens: int = 512,
                 temperature: float = 0.0, top_p: float = 1.0, enable_thinking: bool | None = None,
                 extra_body: Mapping[str, Any] | None = None, concurrency: int = 8, timeout_s: float = 300.0,
                 max_retries: int = 4, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
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
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self._sleep = sleep
        self._stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @property
    def stats(self) -> dict[str, int]:
        """Counters: requests, retries, failures, prompt_too_long, prompt_tokens, completion_tokens."""
        with self._stats_lock:
            return dict(self._stats)

    def _count(self, **amounts: int) -> None:
        with self._stats_lock:
            self._stats.update(amounts)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def payload(self, messages: Sequence[Mapping[str, Any]], tools: Any) -> dict[str, Any]:
        """The request body for one conversation (greedy when temperature is 0)."""
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

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.max_backoff_s, max(0.0, float(retry_after)))
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        return min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)

    def _post(self, body: bytes) -> Any:
        request = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read().decode("utf-8"))

    def request(self, payload: Mapping[str, Any]) -> dict[str, Any] | None:
        """Sends one request with retries; the reply's JSON, or None when the prompt is over the context."""
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        last = ""
        status: int | None = None
        for attempt in range(self.max_retries + 1):
            self._count(requests=1, retries=int(attempt > 0))
            retry_after = None
            try:
                return self._post(body)
            except urllib.error.HTTPError as exc:
                status = exc.code
                detail = exc.read().decode("utf-8", "replace")
                last = f"HTTP {status}: {detail[:500]}"
                if status in (400, 413) and is_context_length_error(detail):
                    return None
                if status in FATAL_STATUSES:
                    self._count(failures=1)
                    raise EndpointError(f"{self.url} answered {last}; {FATAL_STATUSES[status]}",
                                        status=status, attempts=attempt + 1, fatal=True) from None
                if status not in TRANSIENT_STATUSES:
                    self._count(failures=1)
                    raise EndpointError(f"{self.url} refused the request with {last}", status=status,
                                        attempts=attempt + 1) from None
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
            except _NETWORK_ERRORS as exc:
                status, last = None, f"{type(exc).__name__}: {exc}"
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                status, last = None, f"the reply is not JSON ({exc})"
            if attempt < self.max_retries:
                self._sleep(self._delay(attempt, retry_after))
        self._count(failures=1)
        raise EndpointError(f"{self.url} failed {self.max_retries + 1} times (timeout {self.timeout_s:g} s each); "
                            f"last error: {last}", status=status, attempts=self.max_retries + 1)

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
        """The model ids the server lists at `<base_url>/models` (one request, no retries)."""
        request = urllib.request.Request(self.base_url + "/models", headers=self._headers(), method="GET")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            body = json.loads(response.read().decode("utf-8"))
        return [entry.get("id") for entry in body.get("data", []) if isinstance(entry, Mapping)]

    def close(self) -> None:
        """Stops the request threads (requests in flight finish first)."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __enter__(self) -> OpenAIChatGenerator:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
