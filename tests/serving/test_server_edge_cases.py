"""Server edge cases: fields a client sends as null, seeds out of range, bodies nested too deeply, and a client
that hangs up while its request waits for the engine."""

import http.client
import json
import socket
import threading
import time

import pytest

from ftrl_jax import serving
from ftrl_jax.rollout.episodes import GeneratedTurn
from ftrl_jax.serving.server import BatchingEngine, PolicyService, RequestError, ServerLimits, parse_chat_request

LIMITS = ServerLimits("m", 4096, default_max_tokens=64)
USER = [{"role": "user", "content": "Hello."}]


def body(**fields):
    return {"model": "m", "messages": USER, **fields}


def test_max_tokens_is_read_when_max_completion_tokens_is_null():
    assert parse_chat_request(body(max_tokens=5, max_completion_tokens=None), LIMITS).key.max_tokens == 5
    assert parse_chat_request(body(max_tokens=None, max_completion_tokens=7), LIMITS).key.max_tokens == 7
    assert parse_chat_request(body(max_tokens=5, max_completion_tokens=7), LIMITS).key.max_tokens == 7
    assert parse_chat_request(body(max_tokens=None, max_completion_tokens=None), LIMITS).key.max_tokens == 64


@pytest.mark.parametrize("seed", [1 << 63, (1 << 64) - 1, -(1 << 63) - 1])
def test_seeds_outside_signed_64_bits_are_refused(seed):
    with pytest.raises(RequestError) as info:
        parse_chat_request(body(temperature=1.0, seed=seed), LIMITS)
    assert (info.value.status, info.value.param) == (400, "seed")


def test_seeds_at_the_signed_64_bit_limits_are_accepted():
    for seed in ((1 << 63) - 1, -(1 << 63)):
        assert parse_chat_request(body(temperature=1.0, seed=seed), LIMITS).key.seed == seed


def test_a_body_nested_too_deeply_is_a_bad_request():
    service = PolicyService(BatchingEngine(lambda key: None), LIMITS)
    try:
        with pytest.raises(RequestError) as info:
            service.parse(b"[" * 200_000 + b"]" * 200_000)
        assert info.value.status == 400 and "too deeply" in info.value.message
    finally:
        service.close()


class BlockingGenerator:
    """Echoes the last message; a conversation saying 'block' waits until `release` is set."""

    def __init__(self, seen, release):
        self.seen = seen
        self.release = release

    def __call__(self, conversations):
        texts = [messages[-1]["content"] for messages, _ in conversations]
        self.seen.extend(texts)
        if "block" in texts:
            self.release.wait(30)
        return [GeneratedTurn("echo " + text, [0], [1], [0.0], truncated=False) for text in texts]


def wait_until(condition, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def raw_post(server, payload):
    """Sends a chat request on a plain socket and returns the socket without reading the answer."""
    data = json.dumps(payload).encode()
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_whose_client_hung_up_is_not_generated(stream):
    seen, release = [], threading.Event()
    engine = BatchingEngine(lambda key: BlockingGenerator(seen, release), batch_window_s=0.0, max_wait_s=0.0)
    service = PolicyService(engine, LIMITS)
    futures = []
    submit = service.submit
    service.submit = lambda request: futures.append(submit(request)) or futures[-1]
    try:
        with serving.start_server(service) as server:
            busy = raw_post(server, body(messages=[{"role": "user", "content": "block"}], temperature=0))
            wait_until(lambda: seen == ["block"])  # the engine is generating it and waits
            queued = raw_post(server, body(messages=[{"role": "user", "content": "abandoned"}], temperature=0,
                                           stream=stream))
            wait_until(lambda: len(futures) == 2)
            queued.close()  # the client gives up while its request is still queued
            wait_until(futures[1].cancelled)
            release.set()
            reply = busy.recv(65536)
            busy.close()
            assert reply.startswith(b"HTTP/1.1 200") and b"echo block" in reply
            connection = http.client.HTTPConnection(server.host, server.port, timeout=10)
            connection.request("POST", "/v1/chat/completions", body=json.dumps(
                body(messages=[{"role": "user", "content": "after"}], temperature=0)))
            answer = json.loads(connection.getresponse().read())
            connection.close()
            assert answer["choices"][0]["message"]["content"] == "echo after"
        assert seen == ["block", "after"]  # the abandoned request was never generated
    finally:
        release.set()


def test_a_request_still_waiting_at_shutdown_gets_a_503_error_body():
    seen, release = [], threading.Event()
    engine = BatchingEngine(lambda key: BlockingGenerator(seen, release), batch_window_s=0.0, max_wait_s=0.0)
    server = serving.ServerThread(PolicyService(engine, LIMITS), graceful_shutdown_s=1).start()
    try:
        waiting = raw_post(server, body(messages=[{"role": "user", "content": "block"}], temperature=0))
        wait_until(lambda: seen == ["block"])
        stopper = threading.Thread(target=server.stop, kwargs={"close_service": False})
        stopper.start()
        reply = waiting.recv(65536)
        waiting.close()
        stopper.join(10)
        head, _, payload = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), reply
        assert json.loads(payload)["error"]["code"] == "shutting_down"
    finally:
        release.set()
        engine.close()
