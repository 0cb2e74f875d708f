"""A bounded load test on 127.0.0.1: 64 concurrent openai clients, streaming and not, plain and forced tool calls,
short max_tokens; every request gets a complete, valid answer and the server still answers /health after."""

import concurrent.futures
import http.client
import json
import threading
import time

import openai
import pytest

from ftrl_jax import serving
from tests.serving.test_server import tiny_policy_dir
from tests.serving.test_server_openai import GREET, TOOLS, collect

CLIENTS = 64
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    service = serving.build_service(tiny_policy_dir(tmp_path_factory.mktemp("policy")), served_model_name="tiny",
                                    max_batch_size=CLIENTS, batch_window_s=0.05, max_wait_s=1.0)
    with serving.start_server(service) as running:
        yield running


def one_client(client, number, barrier):
    """Request `number`: streamed when odd, a forced call when number % 4 >= 2; returns what came back."""
    stream, forced = number % 2 == 1, number % 4 >= 2
    fields = {"model": "tiny", "max_tokens": MAX_TOKENS, "temperature": 0,
              "messages": [{"role": "user", "content": f"Request {number}: greet Ada."}]}
    if forced:
        fields.update(tools=TOOLS, tool_choice=GREET)
    barrier.wait(timeout=60)
    started = time.perf_counter()
    if stream:
        choices, usage = collect(client.chat.completions.create(**fields, stream=True,
                                                                stream_options={"include_usage": True}))
        (choice,) = choices.values()
        calls = [(c["name"], c["arguments"]) for c in choice["calls"].values()]
        result = (choice["content"], calls, choice["finish_reason"], usage.completion_tokens)
    else:
        reply = client.chat.completions.create(**fields)
        (choice,) = reply.choices
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or ()]
        result = (choice.message.content or "", calls, choice.finish_reason, reply.usage.completion_tokens)
    return number, forced, result, time.perf_counter() - started


def test_64_concurrent_mixed_clients_all_get_complete_answers(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)
    barrier = threading.Barrier(CLIENTS)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(lambda number: one_client(client, number, barrier), range(CLIENTS)))
    seconds = time.perf_counter() - started
    assert len(results) == CLIENTS
    for number, forced, (content, calls, finish_reason, completion_tokens), _ in results:
        assert 1 <= completion_tokens <= MAX_TOKENS, number
        assert finish_reason in ("stop", "length", "tool_calls"), number
        if forced:
            assert [name for name, _ in calls] == ["greet"] and content == "", number
        else:
            assert calls == [] and isinstance(content, str), number
    print(f"{CLIENTS} clients in {seconds:.1f} s; slowest request {max(r[3] for r in results):.1f} s")

    connection = http.client.HTTPConnection(server.host, server.port, timeout=10)
    connection.request("GET", "/health")
    response = connection.getresponse()
    assert response.status == 200 and json.loads(response.read()) == {"status": "ok"}
    connection.close()
    stats = server.service.engine.stats
    assert stats["requests"] == CLIENTS and stats.get("failed_calls", 0) == 0
