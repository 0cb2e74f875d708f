"""The OpenAI-compatible server: request checks, replies, the batching engine, HTTP with the openai client,
and the jit policy served over HTTP giving what it gives in-process."""

import concurrent.futures
import http.client
import json
import time

import openai
import pytest

from ftrl_jax import serving
from ftrl_jax.serving.client import turn_text
from ftrl_jax.rollout.episodes import GeneratedTurn
from ftrl_jax.rollout.policy import LocalPolicy
from ftrl_jax.serving.server import (BatchingEngine, PolicyService, RequestError, SamplingKey, ServerLimits,
                                     assistant_choice, parse_chat_request)
from ftrl_jax.text.tool_calls import format_qwen_tool_call

LIMITS = ServerLimits("m", 4096, default_max_tokens=64)
TOOLS = [{"type": "function", "function": {"name": "double", "description": "Doubles x.",
                                           "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]
USER = [{"role": "user", "content": "Double 7."}]


def body(**fields):
    return {"model": "m", "messages": USER, **fields}


def tiny_policy_dir(path):
    """A random one-layer policy saved as a Hugging Face directory with the default tokenizer."""
    return serving.save_random_policy(path, num_layers=1, tie_word_embeddings=False)


# --- request checks -------------------------------------------------------------------------


@pytest.mark.parametrize("request_body,status,param,code", [
    ([1, 2], 400, None, None),
    (body(foo=1), 400, "foo", None),
    (body(stream="yes"), 400, "stream", None),
    (body(stream_options={"include_usage": True}), 400, "stream_options", None),
    (body(stream=True, stream_options={"include_usage": 1}), 400, "stream_options", None),
    (body(presence_penalty=0.5), 400, "presence_penalty", "unsupported_value"),
    ({"messages": USER}, 400, "model", None),
    (body(model="other"), 404, "model", "model_not_found"),
    (body(messages=[]), 400, "messages", None),
    ({"model": "m"}, 400, "messages", None),
    (body(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role", None),
    (body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400,
     "messages[0].content", None),
    (body(messages=USER + [{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "double", "arguments": "{x: 7"}}]}]), 400,
     "messages[1].tool_calls[0].function.arguments", None),
    (body(messages=[{"role": "user", "content": None}]), 400, "messages[0].content", None),
    (body(tools=[{"type": "function"}]), 400, "tools[0]", None),
    (body(tool_choice="required"), 400, "tool_choice", None),
    (body(tools=TOOLS, tool_choice="any"), 400, "tool_choice", None),
    (body(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "triple"}}), 400, "tool_choice", None),
    (body(tool_choice={"type": "function", "function": {"name": "double"}}), 400, "tool_choice", None),
    (body(tools=TOOLS, tool_choice={"type": "allowed_tools", "allowed_tools": {}}), 400, "tool_choice", None),
    (body(max_tokens=0), 400, "max_tokens", None),
    (body(max_tokens=4096), 400, "max_tokens", None),
    (body(temperature=3), 400, "temperature", None),
    (body(n=17), 400, "n", None),
    (body(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    (body(chat_template_kwargs={"add_generation_prompt": False}), 400, "chat_template_kwargs", None),
])
def test_bad_requests_are_refused_naming_the_field(request_body, status, param, code):
    with pytest.raises(RequestError) as info:
        parse_chat_request(request_body, LIMITS)
    error = info.value
    assert (error.status, error.param, error.code) == (status, param, code)
    assert set(error.body()["error"]) == {"message", "type", "param", "code"} and error.message


def test_accepted_requests_become_sampling_keys():
    greedy = parse_chat_request(body(temperature=0, top_p=0.5, top_k=5, seed=3, tools=TOOLS, stop="END"), LIMITS)
    # Greedy decoding ignores top-p/top-k/seed, so such requests share one batch key.
    assert greedy.key == SamplingKey(max_tokens=64) and greedy.parse_tool_calls and greedy.stop == ("END",)
    sampled = parse_chat_request(body(temperature=0.7, top_p=0.9, top_k=-1, seed=3, max_completion_tokens=8, n=2,
                                      tool_choice="none", tools=TOOLS,
                                      chat_template_kwargs={"enable_thinking": True}), LIMITS)
    assert sampled.key == SamplingKey(max_tokens=8, temperature=0.7, top_p=0.9, top_k=0, enable_thinking=True, seed=3)
    assert sampled.n == 2 and not sampled.parse_tool_calls
    assert parse_chat_request(body(), LIMITS).key.temperature == 1.0  # OpenAI's default
    mixed = parse_chat_request(body(messages=[{"role": "developer", "content": "Be brief."},
                                              {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                           {"type": "text", "text": "b"}]}],
                                    user="u1", stream=False, logprobs=False), LIMITS)
    assert mixed.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ab"}]
    call = {"type": "function", "function": {"name": "double", "arguments": "{\"x\": 7}"}}
    with_call = parse_chat_request(body(messages=USER + [{"role": "assistant", "content": None, "tool_calls": [call]},
                                                         {"role": "tool", "tool_call_id": "c", "content": "14"}]),
                                   LIMITS)
    assert with_call.messages[1]["tool_calls"][0]["function"]["arguments"] == {"x": 7}


# --- replies ----------------------------------------------------------------------------------


def turn(text, truncated=False):
    return GeneratedTurn(text, [1, 2, 3], [4, 5], [-0.1, -0.2], truncated=truncated)


CALLS = "Checking.\n" + format_qwen_tool_call("double", {"x": 7}) + "\n" + format_qwen_tool_call("double", {"x": 8})


def test_tool_calls_are_returned_the_openai_way():
    message, finish = assistant_choice(turn(CALLS), template="qwen2.5", parse_tool_calls=True)
    assert finish == "tool_calls" and message["content"] == "Checking."
    assert [c["function"] for c in message["tool_calls"]] == [{"name": "double", "arguments": "{\"x\": 7}"},
                                                              {"name": "double", "arguments": "{\"x\": 8}"}]
    assert len({c["id"] for c in message["tool_calls"]}) == 2
    assert all(c["type"] == "function" for c in message["tool_calls"])
    assert turn_text(message) == CALLS  # the client rebuilds exactly the generated text
    only_calls, _ = assistant_choice(turn(CALLS[len("Checking.\n"):]), template="qwen2.5", parse_tool_calls=True)
    assert only_calls["content"] is None


@pytest.mark.parametrize("text,kwargs,expected_message,expected_finish", [
    # Without tools, or with tool_choice none, the text comes back verbatim.
    (CALLS, dict(parse_tool_calls=False), {"role": "assistant", "content": CALLS}, "stop"),
    # A turn cut by max_tokens makes no calls, as a truncated rollout turn runs none.
    (CALLS, dict(truncated=True), {"role": "assistant", "content": CALLS}, "length"),
    # Text that only looks like a call is content.
    (" x <tool_call>{oops}</tool_call> ", {}, {"role": "assistant", "content": " x <tool_call>{oops}</tool_call> "},
     "stop"),
    # Stop strings cut the text, whatever ended generation.
    ("The answer is 14. END more", dict(stop=("END", "more"), truncated=True),
     {"role": "assistant", "content": "The answer is 14. "}, "stop"),
    ("<think>\nhm\n</think>\n\nIt is 14.", dict(template="qwen3"),
     {"role": "assistant", "content": "It is 14.", "reasoning_content": "hm"}, "stop"),
    ("<think>\nhm\n</think>\n\nIt is 14.", {}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nIt is 14."},
     "stop"),
])
def test_reply_conventions(text, kwargs, expected_message, expected_finish):
    options = dict(template="qwen2.5", parse_tool_calls=True, stop=())
    truncated = kwargs.pop("truncated", False)
    options.update(kwargs)
    message, finish = assistant_choice(turn(text, truncated), **options)
    assert (message, finish) == (expected_message, expected_finish)
    if finish != "length" and not options["stop"]:
        assert turn_text(message) == text


CITY_CALL = '<tool_call>\n{"name": "city_of_zip", "arguments": {"zip": "10115"}}'
CALLS_OF_CITY = format_qwen_tool_call("city_of_zip", {"zip": "10115"})


@pytest.mark.parametrize("text", [CITY_CALL + "\n<|im_end|>", CITY_CALL, CITY_CALL + "\n</tool_call>"])
def test_a_final_call_without_its_closing_tag_is_a_tool_call(text):
    message, finish = assistant_choice(turn(text), template="qwen2.5", parse_tool_calls=True)
    assert finish == "tool_calls" and message["content"] is None
    assert [c["function"] for c in message["tool_calls"]] == [{"name": "city_of_zip", "arguments": '{"zip": "10115"}'}]
    assert turn_text(message) == CALLS_OF_CITY  # the client writes the canonical block back
    thinking, finish = assistant_choice(turn("<think>\nzip first\n</think>\n\n" + text), template="qwen3",
                                        parse_tool_calls=True)
    assert finish == "tool_calls" and thinking["reasoning_content"] == "zip first"
    assert thinking["tool_calls"][0]["function"]["name"] == "city_of_zip"


@pytest.mark.parametrize("delimiter",
                         ["</tool_call>", "<tool_call>", "<think>", "</think>", "<|im_end|>", "<|eot_id|>"])
def test_delimiters_inside_string_arguments_do_not_split_served_calls(delimiter):
    note = f"the reply must end with {delimiter} on its own line"
    text = format_qwen_tool_call("save_note", {"text": note})
    for template in ("qwen2.5", "qwen3"):
        message, finish = assistant_choice(turn(text), template=template, parse_tool_calls=True)
        assert finish == "tool_calls" and message["content"] is None
        assert [c["function"]["name"] for c in message["tool_calls"]] == ["save_note"]
        assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"text": note}
        assert turn_text(message) == text


@pytest.mark.parametrize("text", [
    CITY_CALL[:-4],  # cut mid-object: no call
    CITY_CALL + "\nthen I answer",  # never closed, prose after the JSON
    '<tool_call>\n{"name": "f", "arguments": {"a": "\\ud800"}}\n</tool_call>',  # lone surrogate escape
    '{"name": "Ada Lovelace", "born": 1815}',
])
def test_markup_that_is_not_a_call_comes_back_verbatim_and_encodes(text):
    message, finish = assistant_choice(turn(text), template="qwen2.5", parse_tool_calls=True)
    assert (message, finish) == ({"role": "assistant", "content": text}, "stop")
    json.dumps(message, ensure_ascii=False).encode("utf-8")  # as the server writes a reply


def test_unicode_escapes_in_served_arguments():
    text = '<tool_call>\n{"name": "f", "arguments": {"city": "Z\\u00fcrich", "e": "\\ud83d\\ude00"}}\n</tool_call>'
    message, finish = assistant_choice(turn(text), template="qwen2.5", parse_tool_calls=True)
    assert finish == "tool_calls"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Zürich", "e": "😀"}
    json.dumps(message, ensure_ascii=False).encode("utf-8")


# --- the batching engine --------------------------------------------------------------------


class EchoGenerator:
    """Answers each conversation with its last message's content; records batch sizes; 'fail' raises."""

    def __init__(self, key, calls):
        self.key = key
        self.calls = calls

    def __call__(self, conversations):
        self.calls.append((self.key, len(conversations)))
        if any(messages[-1]["content"] == "fail" for messages, _ in conversations):
            raise RuntimeError("generator exploded")
        return [GeneratedTurn("echo " + messages[-1]["content"], [0] * len(messages[-1]["content"]), [1], [0.0],
                              truncated=False) for messages, _ in conversations]


def echo_engine(**kwargs):
    calls, built = [], []

    def factory(key):
        built.append(key)
        return EchoGenerator(key, calls)

    return BatchingEngine(factory, **kwargs), calls, built


def request_for(content, **fields):
    return parse_chat_request(body(messages=[{"role": "user", "content": content}], temperature=0, **fields), LIMITS)


def test_requests_arriving_together_are_generated_in_one_call_per_sampling_key():
    engine, calls, built = echo_engine(batch_window_s=0.3)
    requests = [request_for(str(i)) for i in range(5)] + [request_for("n", n=3), request_for("short", max_tokens=8)]
    futures = [engine.submit(r) for r in requests]
    results = [f.result(10) for f in futures]
    engine.close()
    assert [[t.text for t in turns] for turns in results] == \
        [[f"echo {i}"] for i in range(5)] + [["echo n"] * 3, ["echo short"]]
    assert sorted(size for _, size in calls) == [1, 8] and len(built) == 2
    assert engine.stats["batches"] == 1 and engine.stats["largest_batch"] == 8


def test_batches_respect_max_batch_size_and_a_failing_call_fails_only_its_requests():
    engine, calls, built = echo_engine(batch_window_s=0.3, max_batch_size=4)
    results = [engine.submit(request_for(str(i))) for i in range(6)]
    assert [f.result(10)[0].text for f in results] == [f"echo {i}" for i in range(6)]
    assert [size for _, size in calls] == [4, 2] and len(built) == 1  # one cached generator for the key

    bad, other_key = engine.submit(request_for("fail")), engine.submit(request_for("fine", max_tokens=9))
    with pytest.raises(RuntimeError, match="exploded"):
        bad.result(10)
    assert other_key.result(10)[0].text == "echo fine"
    assert engine.submit(request_for("after")).result(10)[0].text == "echo after"  # still serving
    assert engine.stats["failed_calls"] == 1
    engine.close()


def test_a_burst_is_gathered_while_it_goes_on_within_the_longest_wait():
    def submit_spaced(engine, count, gap_s):
        futures = []
        for i in range(count):
            futures.append(engine.submit(request_for(str(i))))
            time.sleep(gap_s)
        return [f.result(10)[0].text for f in futures]

    engine, calls, _ = echo_engine(batch_window_s=0.5, max_wait_s=5.0)
    assert submit_spaced(engine, 4, 0.1) == [f"echo {i}" for i in range(4)]
    engine.close()
    assert [size for _, size in calls] == [4]  # 0.3 s in all, but never 0.5 s without a new request
    engine, calls, _ = echo_engine(batch_window_s=0.5, max_wait_s=0.15)
    submit_spaced(engine, 4, 0.1)
    engine.close()
    assert len(calls) > 1 and calls[0][1] < 4  # the first request waited 0.15 s at most


def test_seeded_sampled_requests_run_alone_with_a_fresh_generator():
    engine, calls, built = echo_engine(batch_window_s=0.3)
    seeded = [parse_chat_request(body(temperature=0.8, seed=5), LIMITS) for _ in range(2)]
    for future in [engine.submit(r) for r in seeded]:
        future.result(10)
    engine.close()
    assert [size for _, size in calls] == [1, 1] and len(built) == 2 and built[0].seed == 5


# --- HTTP -----------------------------------------------------------------------------------


class ScriptedGenerator:
    """Calls `double` once, then answers; conversations of more than 3 messages are 'too long'."""

    def __call__(self, conversations):
        turns = []
        for messages, tools in conversations:
            if len(messages) > 3:
                turns.append(GeneratedTurn("", list(range(5000)), [], [], truncated=False, prompt_too_long=True))
            elif messages[-1]["role"] == "tool":
                turns.append(GeneratedTurn("It is " + messages[-1]["content"] + ".", [0] * 10, [1, 2], [0.0, 0.0],
                                           truncated=False))
            else:
                turns.append(GeneratedTurn(format_qwen_tool_call("double", {"x": 7}), [0] * 10, [1, 2, 3],
                                           [0.0] * 3, truncated=False))
        return turns


@pytest.fixture(scope="module")
def scripted_server():
    engine = BatchingEngine(lambda key: ScriptedGenerator())
    service = PolicyService(engine, LIMITS, api_key="sk-local")
    with serving.start_server(service, max_body_bytes=4096) as server:
        yield server
    assert not engine._worker.is_alive()  # leaving the block closed the engine


def raw_request(server, method, path, payload, headers=None):
    connection = http.client.HTTPConnection(server.host, server.port, timeout=10)
    connection.request(method, path, body=payload, headers={"Authorization": "Bearer sk-local", **(headers or {})})
    response = connection.getresponse()
    data = json.loads(response.read())
    connection.close()
    return response.status, data


def test_openai_client_round_trip_with_tool_calls(scripted_server):
    client = openai.OpenAI(base_url=scripted_server.base_url, api_key="sk-local", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["m"]
    first = client.chat.completions.create(model="m", messages=USER, tools=TOOLS, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "double" and json.loads(call.function.arguments) == {"x": 7}
    assert first.usage.prompt_tokens == 10 and first.usage.completion_tokens == 3 and first.usage.total_tokens == 13
    history = USER + [choice.message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": "14"}]
    second = client.chat.completions.create(model="m", messages=history, tools=TOOLS, temperature=0, n=2)
    assert [c.message.content for c in second.choices] == ["It is 14.", "It is 14."]
    assert [c.finish_reason for c in second.choices] == ["stop", "stop"] and second.usage.completion_tokens == 4


def test_bad_requests_get_openai_error_bodies_and_the_server_keeps_serving(scripted_server):
    client = openai.OpenAI(base_url=scripted_server.base_url, api_key="sk-local", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=USER)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=USER * 4, temperature=0)
    assert info.value.body["code"] == "context_length_exceeded" and "5000 tokens" in info.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=scripted_server.base_url, api_key="wrong", max_retries=0).models.list()

    cases = [
        ("POST", "/v1/chat/completions", b"{not json", 400),
        ("POST", "/v1/chat/completions", json.dumps({"model": "m"}).encode(), 400),
        ("POST", "/v1/chat/completions", json.dumps(body(messages=[{"role": "user", "content": "x" * 5000}])).encode(),
         413),
        ("GET", "/v1/chat/completions", None, 405),
        ("GET", "/v1/nothing", None, 404),
        ("GET", "/v1/models/nope", None, 404),
    ]
    for method, path, payload, status in cases:
        got, data = raw_request(scripted_server, method, path, payload)
        assert got == status, (path, data)
        assert set(data["error"]) == {"message", "type", "param", "code"}
    # Still serving, and fine after all that.
    assert client.chat.completions.create(model="m", messages=USER, temperature=0).choices[0].message.content
    assert raw_request(scripted_server, "GET", "/health", None, {"Authorization": ""}) == (200, {"status": "ok"})


# --- the jit policy over HTTP -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    return serving.load_policy(tiny_policy_dir(tmp_path_factory.mktemp("policy")))


def test_load_policy_reads_a_workdir_export_and_checks_the_tokenizer(tiny_policy, tmp_path):
    assert tiny_policy.template == "qwen2.5" and len(tiny_policy.tokenizer) == tiny_policy.config.vocab_size
    assert serving.resolve_policy_dir(tiny_policy.directory) == tiny_policy.directory
    (tmp_path / "export").symlink_to(tiny_policy.directory)
    assert serving.resolve_policy_dir(tmp_path) == str(tmp_path / "export")
    with pytest.raises(FileNotFoundError, match="is not a policy directory"):
        serving.resolve_policy_dir(tmp_path / "export" / "nothing")


def test_served_greedy_turns_equal_the_in_process_policy(tiny_policy):
    config, params, tokenizer = tiny_policy.config, tiny_policy.params, tiny_policy.tokenizer
    conversations = [([{"role": "user", "content": f"Question {i}: what is {i} doubled?" + " Think." * i}], TOOLS)
                     for i in range(3)]
    in_process = LocalPolicy(config, params, tokenizer, max_new_tokens=12, temperature=0.0)(conversations)

    # A long window and a batch of exactly three: the three requests meet in one generate call, as above.
    factory = serving.local_policy_factory(config, params, tokenizer, template="qwen2.5")
    engine = BatchingEngine(factory, batch_window_s=2.0, max_batch_size=3)
    service = PolicyService(engine, ServerLimits("tiny", config.max_position_embeddings))
    server = serving.start_server(service)
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)

        def ask(conversation):
            messages, tools = conversation
            return client.chat.completions.create(model="tiny", messages=messages, tools=tools, temperature=0,
                                                  max_tokens=12)

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(ask, conversations))
    finally:
        server.stop()
    assert engine.stats["largest_batch"] == 3
    for reply, expected in zip(replies, in_process):
        choice = reply.choices[0]
        assert turn_text(choice.message.model_dump()) == expected.text
        assert choice.finish_reason == ("length" if expected.truncated else "stop")
        assert reply.usage.prompt_tokens == len(expected.prompt_ids)
        assert reply.usage.completion_tokens == len(expected.token_ids)


def test_reasoning_is_split_at_a_think_close_outside_call_json():
    text = ('<think>I could call <tool_call>{"name": "a", "arguments": {"t": "</think>"}}</tool_call> but no.'
            '</think>The answer is Paris.')
    message, finish = assistant_choice(turn(text), template="qwen3", parse_tool_calls=True)
    assert finish == "stop" and message["content"] == "The answer is Paris."
    assert message["reasoning_content"].startswith("I could call <tool_call>") and "but no." in message["reasoning_content"]
    unclosed, _ = assistant_choice(turn("<think>still thinking"), template="qwen3", parse_tool_calls=True)
    assert unclosed == {"role": "assistant", "content": "<think>still thinking"}
