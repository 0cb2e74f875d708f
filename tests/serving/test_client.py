"""The OpenAI-compatible turn generator: wire format both ways, retries, timeouts, failures, concurrency.

The endpoint is a scripted mock transport under the `openai` SDK's HTTP client: every request goes through
the SDK (its retries, timeouts and errors) and nothing touches the network.
"""

import importlib
import json
import threading
import time

import openai
import pytest

from ftrl_jax.serving.client import EndpointError, OpenAIChatGenerator, turn_text, wire_messages
from ftrl_jax.text.chat import render_conversation
from ftrl_jax.text.tool_calls import format_qwen_tool_call, parse_assistant_turn

# The HTTP library the installed SDK is built on (httpx for openai 1.x, httpx2 for later releases).
httpx = importlib.import_module(openai.DefaultHttpxClient.__mro__[1].__module__.split(".")[0])

TOOLS = [{"type": "function", "function": {"name": "double", "description": "Doubles x.",
                                           "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]
CALLS_TURN = ("Let me look.\n" + format_qwen_tool_call("double", {"x": 7}) + "\n"
              + format_qwen_tool_call("greet", {"name": "Ada"}))
ROLLOUT = [
    {"role": "user", "content": "Double 7, then greet Ada."},
    {"role": "assistant", "content": CALLS_TURN},
    {"role": "tool", "name": "double", "content": "{\"value\": 14}"},
    {"role": "tool", "name": "greet", "content": "Hello, Ada"},
    {"role": "assistant", "content": "14, and Hello, Ada. <tool_call>broken"},
]


def reply(message, finish_reason="stop", usage=(3, 2)):
    return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": message,
                                                                  "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}}


# --- the wire format ------------------------------------------------------------------------


def test_rollout_messages_go_out_with_structured_calls_answered_by_id():
    wired = wire_messages(ROLLOUT)
    assert wired[0] == {"role": "user", "content": "Double 7, then greet Ada."}
    assert wired[1] == {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": "call_1_0", "type": "function", "function": {"name": "double", "arguments": "{\"x\": 7}"}},
        {"id": "call_1_1", "type": "function", "function": {"name": "greet", "arguments": "{\"name\": \"Ada\"}"}}]}
    assert [m["tool_call_id"] for m in wired[2:4]] == ["call_1_0", "call_1_1"]
    assert all("name" not in m for m in wired[2:4])
    # Broken markup is no call: the text goes out verbatim.
    assert wired[4] == {"role": "assistant", "content": ROLLOUT[4]["content"]}


def test_a_reply_comes_back_as_the_text_the_template_renders_for_it():
    wired_turn = wire_messages(ROLLOUT)[1]
    assert turn_text(wired_turn) == CALLS_TURN
    assert turn_text({"role": "assistant", "content": None, "tool_calls": wired_turn["tool_calls"]}) == \
        CALLS_TURN[len("Let me look.\n"):]
    assert turn_text({"content": "Done.", "reasoning_content": "\nthink hard\n"}) == \
        "<think>\nthink hard\n</think>\n\nDone."
    # Arguments that are not a JSON object stay visible, so the rollout scores the call as broken.
    broken = turn_text({"content": None, "tool_calls": [{"function": {"name": "double", "arguments": "{x: 7"}}]})
    assert "{x: 7" in broken and parse_assistant_turn(broken).malformed


def test_the_server_renders_the_wired_history_as_the_rollout_would():
    """Wire format -> our server's request parsing -> chat template == the rollout's own rendering."""
    from ftrl_jax.serving.server import ServerLimits, parse_chat_request  # deferred: loads the model stack

    limits = ServerLimits("m", 1 << 20)
    for template in ("qwen2.5", "qwen3"):
        request = parse_chat_request({"model": "m", "messages": wire_messages(ROLLOUT), "tools": TOOLS},
                                     ServerLimits("m", 1 << 20, template=template))
        assert render_conversation(request.messages, TOOLS, template=template, enable_thinking=False) == \
            render_conversation(ROLLOUT, TOOLS, template=template, enable_thinking=False)
    assert parse_chat_request({"model": "m", "messages": wire_messages(ROLLOUT)}, limits).tools == []


# --- a scripted endpoint --------------------------------------------------------------------

BASE_URL = "http://endpoint.test/v1"
FAST_RETRY = {"retry-after-ms": "1"}  # the SDK waits what the server asks: keeps retried tests quick


class Endpoint:
    """Answers `script(request_number, body) -> (status, body, headers, delay)` through a mock transport.

    A body that is bytes goes out as it is, anything else as JSON; a status that is an exception class
    (httpx.ReadTimeout, httpx.ConnectError) is raised instead of answering. Bodies, headers and the
    timeout each request carried are recorded.
    """

    def __init__(self, script):
        self.script = script
        self.requests, self.headers, self.paths, self.timeouts = [], [], [], []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    def handle(self, request):
        body = json.loads(request.content) if request.content else None
        with self.lock:
            number = len(self.requests)
            self.requests.append(body)
            self.headers.append({k.lower(): v for k, v in request.headers.items()})
            self.paths.append((request.method, request.url.path))
            self.timeouts.append(request.extensions.get("timeout"))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            status, payload, headers, delay = self.script(number, body)
            time.sleep(delay)
        finally:
            with self.lock:
                self.in_flight -= 1
        if isinstance(status, type) and issubclass(status, Exception):
            raise status("scripted network failure", request=request)
        if isinstance(payload, bytes):
            return httpx.Response(status, content=payload, headers=headers)
        return httpx.Response(status, json=payload, headers=headers)

    def http_client(self):
        return httpx.Client(transport=httpx.MockTransport(self.handle))


def generator_for(script, **kwargs):
    endpoint = Endpoint(script)
    options = dict(max_retries=2, timeout_s=5.0)
    options.update(kwargs)
    return OpenAIChatGenerator(BASE_URL, "m", http_client=endpoint.http_client(), **options), endpoint


def answer(text, **kwargs):
    return lambda n, body: (200, reply({"role": "assistant", "content": text}, **kwargs), {}, 0)


CONVERSATION = ([{"role": "user", "content": "hi"}], TOOLS)


def test_request_body_headers_and_timeout():
    generator, e = generator_for(answer("hello"), api_key="sk-test", max_new_tokens=33, enable_thinking=False,
                                 extra_body={"top_k": 1}, timeout_s=7.5)
    turn = generator([CONVERSATION])[0]
    assert turn.text == "hello" and not turn.truncated and not turn.prompt_too_long
    assert e.paths == [("POST", "/v1/chat/completions")]
    assert e.requests[0] == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 33,
                             "temperature": 0.0, "top_p": 1.0, "tools": TOOLS,
                             "chat_template_kwargs": {"enable_thinking": False}, "top_k": 1}
    assert e.headers[0]["authorization"] == "Bearer sk-test"
    assert e.timeouts[0] == {"connect": 7.5, "read": 7.5, "write": 7.5, "pool": 7.5}
    assert generator.stats == {"requests": 1, "retries": 0, "prompt_tokens": 3, "completion_tokens": 2}

    plain, e = generator_for(answer("hello"))
    plain([([{"role": "user", "content": "hi"}], [])])
    assert "tools" not in e.requests[0] and "chat_template_kwargs" not in e.requests[0]
    assert "authorization" not in e.headers[0]  # no key, no header (servers without auth)


def test_extra_body_is_sent_last_and_may_override_a_field():
    generator, e = generator_for(answer("x"), extra_body={"temperature": 0.6, "repetition_penalty": 1.1})
    generator.complete(*CONVERSATION)
    assert e.requests[0]["temperature"] == 0.6 and e.requests[0]["repetition_penalty"] == 1.1


def test_the_wired_history_goes_out_as_wire_messages():
    generator, e = generator_for(answer("fine"))
    generator.complete(ROLLOUT[:4], TOOLS)
    assert e.requests[0]["messages"] == wire_messages(ROLLOUT[:4])


def test_tool_calls_and_reasoning_in_a_reply_come_back_as_the_turn_text():
    calls = wire_messages(ROLLOUT)[1]["tool_calls"]
    message = {"role": "assistant", "content": "Let me look.", "tool_calls": calls, "reasoning_content": "plan"}
    generator, _ = generator_for(lambda n, body: (200, reply(message, finish_reason="tool_calls"), {}, 0))
    turn = generator.complete(*CONVERSATION)
    assert turn.text == "<think>\nplan\n</think>\n\n" + CALLS_TURN and not turn.truncated
    assert [c.name for c in parse_assistant_turn(turn.text).tool_calls] == ["double", "greet"]


def test_transient_failures_are_retried_and_retry_after_is_honoured():
    def script(n, body):
        if n == 0:
            return 503, {"error": {"message": "loading"}}, FAST_RETRY, 0
        if n == 1:
            return 429, {"error": {"message": "slow down"}}, {"retry-after": "0.2"}, 0
        return 200, reply({"role": "assistant", "content": "ok"}, finish_reason="length"), {}, 0

    generator, e = generator_for(script)
    started = time.perf_counter()
    turn = generator.complete(*CONVERSATION)
    assert turn.text == "ok" and turn.truncated
    assert time.perf_counter() - started >= 0.2  # waited what the 429 asked for
    assert len(e.requests) == 3 and generator.stats["retries"] == 2 and generator.stats["requests"] == 3


def test_a_request_that_keeps_failing_raises_after_its_retries():
    generator, e = generator_for(lambda n, body: (500, {"error": {"message": "boom"}}, FAST_RETRY, 0),
                                 max_retries=2)
    with pytest.raises(EndpointError, match="failed 3 times.*HTTP 500.*boom") as info:
        generator.complete(*CONVERSATION)
    assert not info.value.fatal and info.value.attempts == 3 and info.value.status == 500
    assert BASE_URL in str(info.value)
    assert len(e.requests) == 3 and generator.stats["failures"] == 1 and generator.stats["retries"] == 2


def test_timeouts_are_retried_then_reported():
    def script(n, body):
        if n == 0:
            return httpx.ReadTimeout, None, {}, 0
        return 200, reply({"role": "assistant", "content": "in time"}), {}, 0

    generator, e = generator_for(script, max_retries=1, timeout_s=0.3)
    assert generator.complete(*CONVERSATION).text == "in time"
    assert len(e.requests) == 2 and e.timeouts[1]["read"] == 0.3

    generator, e = generator_for(lambda n, body: (httpx.ReadTimeout, None, {}, 0), max_retries=0, timeout_s=0.3)
    with pytest.raises(EndpointError, match="failed 1 times \\(timeout 0.3 s each\\).*APITimeoutError") as info:
        generator.complete(*CONVERSATION)
    assert info.value.status is None and not info.value.fatal and len(e.requests) == 1


def test_connection_errors_name_the_cause():
    generator, e = generator_for(lambda n, body: (httpx.ConnectError, None, {}, 0), max_retries=0)
    with pytest.raises(EndpointError, match="APIConnectionError.*ConnectError: scripted network failure") as info:
        generator.complete(*CONVERSATION)
    assert info.value.status is None and info.value.attempts == 1


@pytest.mark.parametrize("payload,headers", [
    (b"<html>proxy error</html>", {"content-type": "text/html"}),
    (b"<html>proxy error</html>", {"content-type": "application/json"}),
])
def test_a_body_that_is_not_json_fails_the_request(payload, headers):
    generator, e = generator_for(lambda n, body: (200, payload, headers, 0))
    with pytest.raises(EndpointError, match="not a JSON object.*end in /v1") as info:
        generator.complete(*CONVERSATION)
    assert not info.value.fatal and len(e.requests) == 1 and generator.stats["failures"] == 1


def test_a_reply_without_a_message_fails_the_request():
    generator, _ = generator_for(lambda n, body: (200, {"id": "x", "choices": []}, {}, 0))
    with pytest.raises(EndpointError, match="without choices\\[0\\].message"):
        generator.complete(*CONVERSATION)


@pytest.mark.parametrize("status,error,fatal,hint", [
    (404, {"message": "The model 'm' does not exist", "code": "model_not_found"}, True, "--model_name"),
    (401, {"message": "bad key", "code": "invalid_api_key"}, True, "--api_key"),
    (403, {"message": "not allowed"}, True, "permissions"),
    (400, {"message": "messages[0].role is invalid"}, False, "refused the request"),
    (422, {"message": "unprocessable"}, False, "refused the request"),
])
def test_errors_retrying_cannot_fix_are_raised_at_once(status, error, fatal, hint):
    generator, e = generator_for(lambda n, body: (status, {"error": error}, {}, 0))
    with pytest.raises(EndpointError, match=f"HTTP {status}") as info:
        generator.complete(*CONVERSATION)
    assert info.value.fatal == fatal and info.value.status == status and info.value.attempts == 1
    assert hint in str(info.value) and error["message"] in str(info.value)
    assert len(e.requests) == 1 and generator.stats["retries"] == 0


@pytest.mark.parametrize("status,error", [
    (400, {"message": "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens",
           "type": "BadRequestError"}),
    (400, {"message": "too long", "code": "context_length_exceeded"}),
    (413, {"message": "Prompt is too long"}),
])
def test_a_prompt_over_the_context_is_a_prompt_too_long_turn(status, error):
    generator, e = generator_for(lambda n, body: (status, {"error": error}, {}, 0))
    turn = generator.complete(*CONVERSATION)
    assert turn.prompt_too_long and turn.text == "" and len(e.requests) == 1
    assert generator.stats["prompt_too_long"] == 1 and "failures" not in generator.stats


def test_conversations_are_sent_concurrently_and_answered_in_order():
    def script(n, body):
        return 200, reply({"role": "assistant", "content": "echo " + body["messages"][0]["content"]}), {}, 0.15

    generator, e = generator_for(script, concurrency=3)
    conversations = [([{"role": "user", "content": str(i)}], []) for i in range(6)]
    started = time.perf_counter()
    turns = generator(conversations)
    elapsed = time.perf_counter() - started
    generator.close()
    assert [t.text for t in turns] == [f"echo {i}" for i in range(6)]
    assert e.max_in_flight == 3
    assert elapsed < 6 * 0.15  # overlapped, not one after another
    assert generator(conversations[:2])[1].text == "echo 1"  # usable again after close


def test_one_failing_conversation_fails_the_call_after_the_others_finish():
    def script(n, body):
        if body["messages"][0]["content"] == "bad":
            return 400, {"error": {"message": "nope"}}, {}, 0
        return 200, reply({"role": "assistant", "content": "fine"}), {}, 0.1

    generator, e = generator_for(script, concurrency=4)
    conversations = [([{"role": "user", "content": c}], []) for c in ("a", "bad", "b")]
    with pytest.raises(EndpointError, match="nope"):
        generator(conversations)
    assert len(e.requests) == 3 and e.in_flight == 0


def test_list_models():
    generator, e = generator_for(lambda n, body: (200, {"object": "list", "data": [
        {"id": "m", "object": "model", "created": 0, "owned_by": "x"}]}, {}, 0))
    assert generator.list_models() == ["m"] and e.paths == [("GET", "/v1/models")]


def test_construction_checks():
    with pytest.raises(ValueError, match="http:// or https://"):
        OpenAIChatGenerator("localhost:8000/v1", "m")
    with pytest.raises(ValueError, match="model is empty"):
        OpenAIChatGenerator("http://localhost:8000/v1", "")
    with pytest.raises(ValueError, match="timeout_s > 0"):
        OpenAIChatGenerator("http://localhost:8000/v1", "m", timeout_s=0)
