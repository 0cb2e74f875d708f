"""The OpenAI-compatible turn generator: wire format both ways, retries, timeouts, failures, concurrency.

The endpoint is a scripted stdlib HTTP server on 127.0.0.1 (an ephemeral port), so every request really
goes over a socket.
"""

import http.server
import json
import threading
import time

import pytest

from ftrl_jax.text.chat import render_conversation
from ftrl_jax.serving.client import EndpointError, OpenAIChatGenerator, turn_text, wire_messages
from ftrl_jax.serving.server import ServerLimits, parse_chat_request
from ftrl_jax.text.tool_calls import format_qwen_tool_call, parse_assistant_turn

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
    limits = ServerLimits("m", 1 << 20)
    for template in ("qwen2.5", "qwen3"):
        request = parse_chat_request({"model": "m", "messages": wire_messages(ROLLOUT), "tools": TOOLS},
                                     ServerLimits("m", 1 << 20, template=template))
        assert render_conversation(request.messages, TOOLS, template=template, enable_thinking=False) == \
            render_conversation(ROLLOUT, TOOLS, template=template, enable_thinking=False)
    assert parse_chat_request({"model": "m", "messages": wire_messages(ROLLOUT)}, limits).tools == []


# --- a scripted endpoint --------------------------------------------------------------------


class Endpoint:
    """Answers POST /v1/chat/completions with `script(request_number, body) -> (status, body, headers, delay)`."""

    def __init__(self, script):
        self.script = script
        self.requests = []
        self.headers = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint.lock:
                    number = len(endpoint.requests)
                    endpoint.requests.append(body)
                    endpoint.headers.append(dict(self.headers))
                    endpoint.in_flight += 1
                    endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
                status, payload, headers, delay = endpoint.script(number, body)
                time.sleep(delay)
                with endpoint.lock:
                    endpoint.in_flight -= 1
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    endpoints = []

    def start(script):
        endpoints.append(Endpoint(script))
        return endpoints[-1]

    yield start
    for e in endpoints:
        e.close()


def generator_for(endpoint, **kwargs):
    sleeps = []
    options = dict(max_retries=2, backoff_s=0.001, timeout_s=5.0, sleep=sleeps.append)
    options.update(kwargs)
    return OpenAIChatGenerator(endpoint.base_url, "m", **options), sleeps


CONVERSATION = ([{"role": "user", "content": "hi"}], TOOLS)


def test_request_body_and_headers(endpoint):
    e = endpoint(lambda n, body: (200, reply({"role": "assistant", "content": "hello"}), {}, 0))
    generator, _ = generator_for(e, api_key="sk-test", max_new_tokens=33, enable_thinking=False,
                                 extra_body={"top_k": 1})
    turn = generator([CONVERSATION])[0]
    assert turn.text == "hello" and not turn.truncated and not turn.prompt_too_long
    body = e.requests[0]
    assert body == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 33, "temperature": 0.0,
                    "top_p": 1.0, "tools": TOOLS, "chat_template_kwargs": {"enable_thinking": False}, "top_k": 1}
    assert e.headers[0]["Authorization"] == "Bearer sk-test"
    generator_plain, _ = generator_for(e)
    generator_plain([([{"role": "user", "content": "hi"}], [])])
    assert "tools" not in e.requests[1] and "chat_template_kwargs" not in e.requests[1]
    assert "Authorization" not in e.headers[1]
    assert generator.stats["prompt_tokens"] == 3 and generator.stats["completion_tokens"] == 2


def test_transient_failures_are_retried_with_backoff_and_retry_after(endpoint):
    def script(n, body):
        if n == 0:
            return 503, {"error": {"message": "loading"}}, {}, 0
        if n == 1:
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": "0.25"}, 0
        return 200, reply({"role": "assistant", "content": "ok"}, finish_reason="length"), {}, 0

    e = endpoint(script)
    generator, sleeps = generator_for(e, backoff_s=0.01)
    turn = generator.complete(*CONVERSATION)
    assert turn.text == "ok" and turn.truncated
    assert len(e.requests) == 3 and generator.stats["retries"] == 2
    assert 0.005 <= sleeps[0] <= 0.01 and sleeps[1] == 0.25  # jittered backoff, then the server's Retry-After


def test_a_request_that_keeps_failing_raises_after_its_retries(endpoint):
    e = endpoint(lambda n, body: (500, {"error": {"message": "boom"}}, {}, 0))
    generator, sleeps = generator_for(e, max_retries=2)
    with pytest.raises(EndpointError, match="failed 3 times.*HTTP 500.*boom") as info:
        generator.complete(*CONVERSATION)
    assert not info.value.fatal and info.value.attempts == 3 and info.value.status == 500
    assert len(e.requests) == 3 and len(sleeps) == 2 and generator.stats["failures"] == 1


def test_unreadable_replies_and_timeouts_are_retried(endpoint):
    def script(n, body):
        if n == 0:
            return 200, b"<html>proxy error</html>", {}, 0
        if n == 1:
            return 200, reply({"role": "assistant", "content": "late"}), {}, 1.0  # past the 0.3 s timeout
        return 200, reply({"role": "assistant", "content": "in time"}), {}, 0

    e = endpoint(script)
    generator, _ = generator_for(e, timeout_s=0.3, max_retries=3)
    assert generator.complete(*CONVERSATION).text == "in time"
    assert len(e.requests) == 3


@pytest.mark.parametrize("status,error,fatal", [
    (404, {"message": "The model 'm' does not exist", "code": "model_not_found"}, True),
    (401, {"message": "bad key"}, True),
    (400, {"message": "messages[0].role is invalid"}, False),
])
def test_errors_retrying_cannot_fix_are_raised_at_once(endpoint, status, error, fatal):
    e = endpoint(lambda n, body: (status, {"error": error}, {}, 0))
    generator, sleeps = generator_for(e)
    with pytest.raises(EndpointError, match=f"HTTP {status}") as info:
        generator.complete(*CONVERSATION)
    assert info.value.fatal == fatal and len(e.requests) == 1 and sleeps == []


@pytest.mark.parametrize("error", [
    {"message": "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens",
     "type": "BadRequestError"},
    {"message": "too long", "code": "context_length_exceeded"},
])
def test_a_prompt_over_the_context_is_a_prompt_too_long_turn(endpoint, error):
    e = endpoint(lambda n, body: (400, {"error": error}, {}, 0))
    generator, _ = generator_for(e)
    turn = generator.complete(*CONVERSATION)
    assert turn.prompt_too_long and turn.text == "" and len(e.requests) == 1
    assert generator.stats["prompt_too_long"] == 1


def test_conversations_are_sent_concurrently_and_answered_in_order(endpoint):
    def script(n, body):
        return 200, reply({"role": "assistant", "content": "echo " + body["messages"][0]["content"]}), {}, 0.15

    e = endpoint(script)
    generator, _ = generator_for(e, concurrency=3)
    conversations = [([{"role": "user", "content": str(i)}], []) for i in range(6)]
    started = time.perf_counter()
    turns = generator(conversations)
    elapsed = time.perf_counter() - started
    generator.close()
    assert [t.text for t in turns] == [f"echo {i}" for i in range(6)]
    assert e.max_in_flight == 3
    assert elapsed < 6 * 0.15  # overlapped, not one after another


def test_one_failing_conversation_fails_the_call_after_the_others_finish(endpoint):
    def script(n, body):
        if body["messages"][0]["content"] == "bad":
            return 400, {"error": {"message": "nope"}}, {}, 0
        return 200, reply({"role": "assistant", "content": "fine"}), {}, 0.1

    e = endpoint(script)
    generator, _ = generator_for(e, concurrency=4)
    conversations = [([{"role": "user", "content": c}], []) for c in ("a", "bad", "b")]
    with pytest.raises(EndpointError, match="nope"):
        generator(conversations)
    assert len(e.requests) == 3


def test_construction_checks():
    with pytest.raises(ValueError, match="http:// or https://"):
        OpenAIChatGenerator("localhost:8000/v1", "m")
    with pytest.raises(ValueError, match="model is empty"):
        OpenAIChatGenerator("http://localhost:8000/v1", "")
