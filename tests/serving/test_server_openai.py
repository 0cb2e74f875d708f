"""The server as OpenAI clients see it: streaming (server-sent chunks, usage, n > 1), tool_choice (none, required,
a named function: forced calls by construction, even from a random model), the forced-call scoring, and error
bodies, all driven with the official `openai` client against a tiny random policy."""

import http.client
import json

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from ftrl_jax import models, serving
from ftrl_jax.rollout.episodes import GeneratedTurn
from ftrl_jax.serving.server import (BatchingEngine, ServedPolicy, ServerLimits, assistant_choice,
                                     call_opening, parse_chat_request)
from tests.serving.test_server import tiny_policy_dir


def tool(name, description, properties):
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {key: {"type": "string"} for key in properties}, "required": properties}}}


TOOLS = [tool("double", "Doubles a number.", ["x"]), tool("greet", "Greets a person.", ["name"]),
         tool("city_of_zip", "The city of a postal code.", ["zip"])]
USER = [{"role": "user", "content": "Greet Ada, then double 7."}]
GREET = {"type": "function", "function": {"name": "greet"}}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return tiny_policy_dir(tmp_path_factory.mktemp("policy"))


@pytest.fixture(scope="module")
def server(policy_dir):
    service = serving.build_service(policy_dir, served_model_name="tiny", default_max_tokens=12, batch_window_s=0.01)
    with serving.start_server(service) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)


def ask(client, **fields):
    return client.chat.completions.create(**{"model": "tiny", "messages": USER, "temperature": 0, "max_tokens": 12,
                                             **fields})


def collect(stream):
    """Reassembles streamed chunks the way OpenAI clients do: per choice index, content and tool calls by index."""
    choices, usage, chunks = {}, None, []
    for chunk in stream:
        chunks.append(chunk)
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            assert chunk.choices == [] and usage is None
            usage = chunk.usage
        for part in chunk.choices:
            choice = choices.setdefault(part.index, {"role": None, "content": "", "calls": {}, "finish_reason": None})
            assert choice["finish_reason"] is None, "nothing follows a choice's finish_reason"
            delta = part.delta
            choice["role"] = delta.role or choice["role"]
            choice["content"] += delta.content or ""
            for call in delta.tool_calls or ():
                entry = choice["calls"].setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = call.id or entry["id"]
                if call.function is not None:
                    entry["name"] += call.function.name or ""
                    entry["arguments"] += call.function.arguments or ""
            choice["finish_reason"] = part.finish_reason
    assert len({chunk.id for chunk in chunks}) == 1
    return choices, usage


def as_streamed(message):
    calls = {k: {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
             for k, c in enumerate(message.tool_calls or ())}
    return message.content or "", calls


# --- streaming ----------------------------------------------------------------------------------


def test_streamed_text_equals_the_non_streamed_answer_with_usage_last(client):
    plain = ask(client, n=2)
    stream = ask(client, n=2, stream=True, stream_options={"include_usage": True})
    choices, usage = collect(stream)
    assert sorted(choices) == [0, 1]
    for index, expected in enumerate(plain.choices):
        got = choices[index]
        assert got["role"] == "assistant" and got["finish_reason"] == expected.finish_reason
        assert (got["content"], got["calls"]) == (expected.message.content, {})
    assert usage.model_dump() == plain.usage.model_dump()
    without_usage, none = collect(ask(client, stream=True))
    assert none is None and without_usage[0]["content"] == plain.choices[0].message.content


def test_streamed_forced_call_deltas_reassemble_the_non_streamed_call(client):
    plain = ask(client, tools=TOOLS, tool_choice=GREET)
    choices, usage = collect(ask(client, tools=TOOLS, tool_choice=GREET, stream=True,
                                 stream_options={"include_usage": True}))
    content, calls = as_streamed(plain.choices[0].message)
    streamed = choices[0]
    assert streamed["content"] == content and streamed["finish_reason"] == plain.choices[0].finish_reason
    assert [(c["name"], c["arguments"]) for c in streamed["calls"].values()] == \
        [(c["name"], c["arguments"]) for c in calls.values()]
    assert all(c["id"].startswith("call_") for c in streamed["calls"].values())
    assert usage.completion_tokens == plain.usage.completion_tokens


def test_raw_event_stream_format(server):
    connection = http.client.HTTPConnection(server.host, server.port, timeout=120)
    body = {"model": "tiny", "messages": USER, "temperature": 0, "max_tokens": 4, "tools": TOOLS,
            "tool_choice": GREET, "stream": True, "stream_options": {"include_usage": True}}
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    events = response.read().decode().split("\n\n")
    connection.close()
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(event[len("data: "):]) for event in events[:-2]]
    assert all(event.startswith("data: ") for event in events[:-1])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    header = chunks[1]["choices"][0]["delta"]["tool_calls"][0]
    assert header["index"] == 0 and header["type"] == "function" and header["function"]["name"] == "greet"
    assert header["function"]["arguments"] == "" and header["id"].startswith("call_")
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"  # 4 tokens cannot finish the arguments
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert all(chunk["usage"] is None for chunk in chunks[:-1])


# --- tool_choice --------------------------------------------------------------------------------


def opening_tokens(policy_dir, name):
    tokenizer = serving.load_policy(policy_dir).tokenizer
    return len(tokenizer.encode(call_opening(name), add_special_tokens=False))


def test_a_named_function_is_called_even_by_a_random_model(client, policy_dir):
    auto = ask(client, tools=TOOLS)
    for max_tokens in (2, 40):
        reply = ask(client, tools=TOOLS, tool_choice=GREET, max_tokens=max_tokens)
        (call,) = reply.choices[0].message.tool_calls
        assert call.type == "function" and call.function.name == "greet" and isinstance(call.function.arguments, str)
        assert reply.choices[0].message.content is None
        assert reply.choices[0].finish_reason in ("tool_calls", "length")
        # The opening is part of the prompt the model continued, not pasted onto its answer afterwards.
        assert reply.usage.prompt_tokens == auto.usage.prompt_tokens + opening_tokens(policy_dir, "greet")
    assert reply.usage.completion_tokens <= 40


def test_required_calls_the_declared_tool_the_model_scores_highest(client, server, policy_dir):
    reply = ask(client, tools=TOOLS, tool_choice="required")
    (call, *_) = reply.choices[0].message.tool_calls
    policy = serving.load_policy(policy_dir)
    scorer = ServedPolicy(policy.config, policy.params, policy.tokenizer, max_new_tokens=12)
    names = [t["function"]["name"] for t in TOOLS]
    scores = scorer.score_openings(USER, TOOLS, [call_opening(name) for name in names])
    assert call.function.name == names[int(np.argmax(scores))] == scorer.choose_tool(USER, TOOLS, names)
    single = ask(client, tools=TOOLS[2:], tool_choice="required")
    assert single.choices[0].message.tool_calls[0].function.name == "city_of_zip"


def test_tool_choice_none_renders_no_tools_and_parses_no_calls(client):
    bare = ask(client)
    none = ask(client, tools=TOOLS, tool_choice="none")
    assert none.usage.prompt_tokens == bare.usage.prompt_tokens  # the tools were not in the prompt
    assert none.choices[0].message.tool_calls is None and isinstance(none.choices[0].message.content, str)
    assert none.choices[0].message.content == bare.choices[0].message.content
    assert ask(client, tools=TOOLS).usage.prompt_tokens > bare.usage.prompt_tokens


def test_tool_choice_errors_are_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "triple"}})
    error = info.value.body
    assert error["param"] == "tool_choice" and "'triple'" in error["message"]
    assert all(name in error["message"] for name in ("double", "greet", "city_of_zip"))
    with pytest.raises(openai.BadRequestError, match="needs at least one tool"):
        ask(client, tool_choice="required")
    with pytest.raises(openai.NotFoundError):  # refused before any event is sent
        ask(client, model="other", stream=True)
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, stream_options={"include_usage": True})
    assert info.value.body["param"] == "stream_options"
    assert ask(client, max_tokens=2).choices[0].finish_reason == "length"  # still serving


# --- forced calls without HTTP ------------------------------------------------------------------


def forced(text, truncated=False, names=("double",), stop=()):
    turn = GeneratedTurn(call_opening(names[0]) + text, [1], [2], [0.0], truncated=truncated)
    return assistant_choice(turn, template="qwen2.5", parse_tool_calls=True, forced_tools=names, stop=stop)


@pytest.mark.parametrize("text,truncated,arguments,finish", [
    (' {"x": "7"}}\n</tool_call>', False, '{"x": "7"}', "tool_calls"),
    (' {"x": "7"}}', False, '{"x": "7"}', "tool_calls"),  # closing tag never written
    (' {"x": "7"} trailing}\n</tool_call>', False, '{"x": "7"}', "tool_calls"),
    (' {"x": "7', True, '{"x": "7', "length"),  # cut by max_tokens: what was generated
    (" seven please}\n</tool_call>", False, "seven please", "tool_calls"),  # not JSON: returned as generated
    ("", True, "", "length"),
])
def test_forced_call_arguments_are_what_the_model_generated(text, truncated, arguments, finish):
    message, finish_reason = forced(text, truncated)
    assert finish_reason == finish and message["content"] is None
    (call,) = message["tool_calls"]
    assert call["function"] == {"name": "double", "arguments": arguments}


def test_forced_required_turns_keep_parallel_calls_and_a_named_turn_only_its_function():
    second = '\n<tool_call>\n{"name": "greet", "arguments": {"name": "Ada"}}\n</tool_call>'
    message, finish = forced(' {"x": "7"}}\n</tool_call>' + second, names=("double", "greet"))
    assert finish == "tool_calls" and [c["function"]["name"] for c in message["tool_calls"]] == ["double", "greet"]
    message, _ = forced(' {"x": "7"}}\n</tool_call>' + second, names=("double",))
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["double"]
    with pytest.raises(ValueError, match="must start with the call opening"):
        assistant_choice(GeneratedTurn("plain", [1], [2], [0.0], truncated=False), template="qwen2.5",
                         parse_tool_calls=True, forced_tools=("double",))
    assert call_opening("greet", "llama3") == '{"name": "greet", "parameters":'
    with pytest.raises(ValueError, match="no forced-call opening"):
        call_opening("greet", "xml")


def test_engine_starts_forced_turns_with_the_opening_and_needs_a_chooser_for_required():
    seen = []

    class Recorder:
        def __call__(self, conversations, openings=None):
            seen.append(openings)
            return [GeneratedTurn(' {"x": "1"}}', [0], [1], [0.0], truncated=False) for _ in conversations]

    limits = ServerLimits("m", 4096, default_max_tokens=8)
    engine = BatchingEngine(lambda key: Recorder(), batch_window_s=0.2)
    named = parse_chat_request({"model": "m", "messages": USER, "tools": TOOLS, "tool_choice": GREET, "n": 2,
                                "temperature": 0}, limits)
    plain = parse_chat_request({"model": "m", "messages": USER, "tools": TOOLS, "temperature": 0}, limits)
    futures = [engine.submit(named), engine.submit(plain)]
    named_turns, plain_turns = [f.result(10) for f in futures]
    assert seen == [[call_opening("greet")] * 2 + [""]]
    assert [t.text for t in named_turns] == [call_opening("greet") + ' {"x": "1"}}'] * 2
    assert plain_turns[0].text == ' {"x": "1"}}'
    required = parse_chat_request({"model": "m", "messages": USER, "tools": TOOLS, "tool_choice": "required"}, limits)
    with pytest.raises(TypeError, match="choose_tool"):
        engine.submit(required).result(10)
    engine.close()


def test_scores_are_the_models_log_probabilities_of_each_opening(policy_dir):
    policy = serving.load_policy(policy_dir)
    scorer = ServedPolicy(policy.config, policy.params, policy.tokenizer, max_new_tokens=12)
    openings = [call_opening(t["function"]["name"]) for t in TOOLS]
    scores = scorer.score_openings(USER, TOOLS, openings)
    prompt = scorer.encode(USER, TOOLS)
    pieces = [policy.tokenizer.encode(opening, add_special_tokens=False) for opening in openings]
    width = len(prompt) + max(map(len, pieces))
    # Right padding: causal attention keeps every real position's logits as they are unpadded.
    rows = jnp.asarray([prompt + piece + [0] * (width - len(prompt) - len(piece)) for piece in pieces], jnp.int32)
    logprobs = jax.nn.log_softmax(jax.jit(models.forward, static_argnums=0)(policy.config, policy.params, rows), -1)
    for row, (piece, score) in enumerate(zip(pieces, scores)):
        expected = sum(float(logprobs[row, len(prompt) - 1 + j, token]) for j, token in enumerate(piece))
        assert score == pytest.approx(expected, abs=1e-3)
    assert len(set(np.round(scores, 3))) == len(scores)  # distinct names, distinct scores: argmax is meaningful
    # The prompt of a forced turn is the plain prompt followed by the opening's ids.
    (turn,) = scorer([(USER, TOOLS)], openings=[openings[1]])
    piece = policy.tokenizer.encode(openings[1], add_special_tokens=False)
    assert turn.prompt_ids == prompt + piece
    with pytest.raises(ValueError, match="one per conversation"):
        scorer([(USER, TOOLS)], openings=[])
