"""The LLM author through the `openai` SDK: a mock transport answers with scripted replies (no network)."""

import functools
import importlib
import json
import random
import socket

import openai
import pytest

from experiments import build_envs
from ftrl_jax.envs import build, samples
from ftrl_jax.envs.llm_author import ChatClient, ChatError, LLMAuthor, extract_json
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.envs.stages import Complexity, StageError, construct

# The HTTP library the installed SDK is built on (httpx for openai 1.x, httpx2 for later releases).
httpx = importlib.import_module(openai.DefaultHttpxClient.__mro__[1].__module__.split(".")[0])
BASE_URL = "http://author.test/v1"


class _ScriptedEndpoint:
    """`POST /v1/chat/completions` answering with the next scripted reply, through a mock transport.

    A reply is a string (the assistant's content), an int (an HTTP error status, answered at once
    when it is retried), bytes (a raw body) or an exception class to raise (httpx.ConnectError,
    httpx.ReadTimeout); `replies` is a list consumed in order, or a function of the request's
    messages. Every request is recorded.
    """

    def __init__(self, replies):
        self.replies = replies if callable(replies) else list(replies)
        self.requests = []
        self.paths = []

    def handle(self, request):
        body = json.loads(request.content)
        self.requests.append(body)
        self.paths.append((request.url.path, request.headers.get("Authorization")))
        if callable(self.replies):
            reply = self.replies(body["messages"])
        else:
            reply = self.replies.pop(0) if self.replies else 500
        if isinstance(reply, type) and issubclass(reply, Exception):
            raise reply("scripted network failure", request=request)
        if isinstance(reply, int):
            return httpx.Response(reply, json={"error": "scripted failure"}, headers={"retry-after-ms": "1"})
        if isinstance(reply, bytes):
            return httpx.Response(200, content=reply, headers={"content-type": "application/json"})
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": reply}}]})

    def client(self, **kwargs):
        transport = httpx.MockTransport(self.handle)
        return ChatClient(BASE_URL, http_client=httpx.Client(transport=transport), **kwargs)


QUESTION = "In which country was the author of The Glass Orchard born?"
SCENARIO = {"question": QUESTION, "sub_questions": [
    {"id": "q1", "question": "Who wrote The Glass Orchard?", "answer": "Mira Tolvane",
     "subject": "The Glass Orchard", "depends_on": [], "topic": "author"},
    {"id": "q2", "question": "In which country was Mira Tolvane born?", "answer": "Estravia",
     "subject": "Mira Tolvane", "depends_on": ["q1"], "topic": "birth country"}]}


def _schema(param):
    return {"type": "object", "properties": {param: {"type": "string", "description": "Name."}},
            "required": [param]}


DOCUMENTS = {"documents": [
    {"sub_question": "q1", "name": "book_author_finder", "description": "Finds the author of a book.",
     "parameters": _schema("title"), "arguments": {"title": "The Glass Orchard"}},
    {"sub_question": "q2", "name": "birth_country_finder", "description": "Finds where a person was born.",
     "parameters": _schema("person"), "arguments": {"person": "Mira Tolvane"}}]}
TOOLS = [
    {"name": "book_author_finder", "description": "Finds the author of a book.",
     "parameters": _schema("title"), "calls": {"q1": {"title": "The Glass Orchard"}}},
    {"name": "birth_country_finder", "description": "Finds where a person was born.",
     "parameters": _schema("person"), "calls": {"q2": {"person": "Mira Tolvane"}}}]
DISTRACTORS = [
    {"name": "weather_lookup", "description": "Current weather of a city.", "parameters": _schema("city"),
     "calls": {}},
    {"name": "stock_price_checker", "description": "Price of a stock.", "parameters": _schema("ticker"),
     "calls": {}}]
CODE = {
    "book_author_finder": "def book_author_finder(title=None):\n"
                          "    if title != 'The Glass Orchard':\n"
                          "        return {'error': 'Unknown title; pass the exact book title.'}\n"
                          "    return {'author': 'Mira Tolvane'}\n",
    "birth_country_finder": "def birth_country_finder(person=None):\n"
                            "    return {'country': 'Estravia'} if person == 'Mira Tolvane' "
                            "else {'error': 'Unknown person.'}\n",
    "weather_lookup": "def weather_lookup(city=None):\n    return {'weather': 'sunny'}\n",
    "stock_price_checker": "def stock_price_checker(ticker=None):\n    return {'price': 12.5}\n",
}
WRONG_CODE = dict(CODE, birth_country_finder="def birth_country_finder(person=None):\n    return 'Narnia'\n")
# Echoes its argument: weather_lookup(city='Estravia') would "solve" the final answer with a wrong call.
LEAKY_CODE = dict(CODE, weather_lookup="def weather_lookup(city=None):\n    return {'city': city, 'weather': 'sunny'}\n")


def _fenced(obj):
    return "Here you go:\n```json\n" + json.dumps(obj) + "\n```"


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(num_workers=2, timeout=5.0) as box:
        yield box


def test_five_stages_over_http_with_repairs_then_the_environment_validates(sandbox):
    replies = [
        "Sure! {\"question\": oops}",                                       # decompose: not JSON
        json.dumps(SCENARIO),                                                # decompose
        json.dumps(DOCUMENTS),                                               # write_documents
        _fenced({"tools": TOOLS}),                                           # integrate
        json.dumps({"tools": TOOLS}),                                        # scale: no distractors yet
        json.dumps({"tools": TOOLS + DISTRACTORS}),                          # scale
        json.dumps({"codes": WRONG_CODE}),                                   # deploy: wrong answer
        json.dumps({"codes": LEAKY_CODE}),                                   # deploy: echoes an argument
        json.dumps({"codes": CODE}),                                         # deploy
    ]
    server = _ScriptedEndpoint(replies)
    author = LLMAuthor(server.client(api_key="k-test", model="tiny"), max_retries=3, sandbox=sandbox)
    env = construct(author, "multi_hop", Complexity(toolset_extension=1), random.Random(0))
    assert len(server.requests) == len(replies)
    assert all(path == ("/v1/chat/completions", "Bearer k-test") for path in server.paths)
    assert server.requests[0]["model"] == "tiny" and server.requests[0]["messages"][0]["role"] == "system"
    assert server.requests[0]["temperature"] == 0.7 and server.requests[0]["max_tokens"] == 4096
    assert len({r["seed"] for r in server.requests}) == len(replies)  # a fresh seed per request
    # Each repair request carries the bad reply and the problem found in it.
    repair = server.requests[1]["messages"]
    assert repair[-2] == {"role": "assistant", "content": replies[0]}
    assert "not valid JSON" in repair[-1]["content"]
    assert "at least 2 distractor tools" in server.requests[5]["messages"][-1]["content"]
    assert "'Narnia'" in server.requests[7]["messages"][-1]["content"]
    assert "expected answer 'Estravia'" in server.requests[7]["messages"][-1]["content"]
    leak = server.requests[8]["messages"][-1]["content"]
    assert "weather_lookup(**{'city': 'Estravia'}) is a wrong call" in leak and "must not repeat" in leak

    assert env.answer == "Estravia" and env.scenario.kind == "multi_hop"
    assert env.unsolved_set() == {"book_author_finder": ["Mira Tolvane"], "birth_country_finder": ["Estravia"]}
    assert env.oracle_calls() == [[{"name": "book_author_finder", "arguments": {"title": "The Glass Orchard"}}],
                                  [{"name": "birth_country_finder", "arguments": {"person": "Mira Tolvane"}}]]
    (outputs,) = build.run_oracle([env], sandbox)
    assert build.validate(env, outputs) is None


def test_stage_fails_with_the_last_problem_after_bounded_retries():
    bad = dict(SCENARIO, question="Where was the author of some book born?")  # subject not in question
    server = _ScriptedEndpoint([json.dumps(bad)] * 5)
    author = LLMAuthor(server.client(), max_retries=1)
    with pytest.raises(StageError, match="no usable answer after 2 attempts; last problem: .*does not "
                                         "appear in the question") as info:
        author.decompose("multi_hop", Complexity(), random.Random(0))
    assert info.value.stage == "decompose" and len(server.requests) == 2


def test_structure_checks_catch_a_scenario_of_the_wrong_kind():
    author = LLMAuthor(_ScriptedEndpoint([json.dumps(SCENARIO)]).client(), max_retries=0)
    with pytest.raises(StageError, match="parallel_single_hop needs 2\\+ independent sub-questions"):
        author.decompose("parallel_single_hop", Complexity(), random.Random(0))


def test_client_retries_transient_http_errors_and_reports_permanent_ones():
    server = _ScriptedEndpoint([503, 429, "hello"])
    assert server.client().complete([{"role": "user", "content": "hi"}]) == "hello"
    assert len(server.requests) == 3
    assert server.paths[0] == ("/v1/chat/completions", None)  # no key, no Authorization header
    assert "seed" not in server.requests[0]
    server = _ScriptedEndpoint([400])
    with pytest.raises(ChatError, match="author.test/v1/chat/completions answered HTTP 400: .*scripted failure"):
        server.client().complete([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 1
    server = _ScriptedEndpoint([500, 500])
    with pytest.raises(ChatError, match="answered HTTP 500"):
        server.client(transient_retries=1).complete([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 2


@pytest.mark.parametrize("status", [401, 403, 404])
def test_auth_and_route_errors_are_reported_at_once(status):
    server = _ScriptedEndpoint([status, "never"])
    with pytest.raises(ChatError, match=f"answered HTTP {status}"):
        server.client(api_key="wrong").complete([{"role": "user", "content": "hi"}])
    assert server.paths == [("/v1/chat/completions", "Bearer wrong")]


def test_timeouts_are_retried_then_reported():
    server = _ScriptedEndpoint([httpx.ReadTimeout, "late but fine"])
    assert server.client(transient_retries=1).complete([{"role": "user", "content": "hi"}]) == "late but fine"
    server = _ScriptedEndpoint([httpx.ReadTimeout])
    with pytest.raises(ChatError, match="did not answer within 2 s \\(1 tries\\); check that the server is running"):
        server.client(transient_retries=0, timeout=2.0).complete([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("body", [b"<html>proxy error</html>", b'{"choices": []}', b'{"choices": [{"message": '
                                                                                    b'{"content": null}}]}'])
def test_replies_without_text_are_chat_errors(body):
    with pytest.raises(ChatError, match="JSON|choices\\[0\\].message.content|non-text content"):
        _ScriptedEndpoint([body]).client().complete([{"role": "user", "content": "hi"}])


def test_construction_checks():
    with pytest.raises(ValueError, match="http:// or https://"):
        ChatClient("localhost:8000/v1")
    with pytest.raises(ValueError, match="transient_retries >= 0"):
        ChatClient(BASE_URL, transient_retries=-1)


def _closed_port_url():
    with socket.socket() as probe:  # bound then released: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/v1"


def test_unreachable_endpoint_stops_the_build_naming_the_url(tmp_path, capsys):
    author = LLMAuthor(_ScriptedEndpoint([httpx.ConnectError]).client(transient_retries=0))
    with pytest.raises(ChatError, match="cannot reach http://author.test/v1/chat/completions .*ConnectError.*"
                                        "check --base_url"):
        author.decompose("single_hop", Complexity(), random.Random(0))
    url = _closed_port_url()
    code = build_envs.main(["build_envs", "--num=2", f"--output={tmp_path / 'x.jsonl'}", "--author=llm",
                            f"--base_url={url}", "--workers=1", "--noprogress", "--author_threads=1",
                            "--request_retries=0"])
    assert code == 1 and "cannot reach" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_extract_json_reads_fences_and_surrounding_text():
    assert extract_json('```json\n{"a": 1}\n```') == {"a": 1}
    assert extract_json('Answer: {"a": {"b": [1, 2]}} done') == {"a": {"b": [1, 2]}}
    with pytest.raises(ValueError, match="no JSON object"):
        extract_json("no braces here")
    with pytest.raises(ValueError, match="not valid JSON"):
        extract_json("{'single': 'quotes'}")


def _reply_by_stage(messages):
    """Answers every stage correctly, whatever order concurrent environments ask in."""
    prompt = messages[1]["content"]
    stages = {
        "Write one ": SCENARIO,
        "For each sub-question write": DOCUMENTS,
        "Merge documents": {"tools": TOOLS},
        "Make the toolset more realistic": {"tools": TOOLS + DISTRACTORS},
        "Write Python code": {"codes": CODE},
    }
    return json.dumps(next(obj for marker, obj in stages.items() if marker in prompt))


def test_cli_builds_with_the_llm_author(tmp_path, capsys, monkeypatch):
    out = tmp_path / "llm.jsonl"
    server = _ScriptedEndpoint(_reply_by_stage)
    transport = httpx.MockTransport(server.handle)
    monkeypatch.setattr(build_envs, "ChatClient",
                        functools.partial(ChatClient, http_client=httpx.Client(transport=transport)))
    code = build_envs.main(["build_envs", "--num=3", "--seed=0", f"--output={out}", "--author=llm",
                            f"--base_url={BASE_URL}", "--model_name=tiny", "--scenarios=multi_hop",
                            "--complexity=low,te=1", "--author_threads=3", "--workers=2", "--noprogress"])
    assert code == 0, capsys.readouterr().err
    rows, errors = samples.read_samples(out)
    assert errors == [] and len(rows) == 3
    assert {r.answer for r in rows} == {"Estravia"} and all(r.data_source == "self/multi_hop" for r in rows)
    assert len(rows[0].tools) == 4
    assert {r["model"] for r in server.requests} == {"tiny"}
