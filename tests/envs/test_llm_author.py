"""The LLM author over real HTTP: a local OpenAI-compatible server answers with scripted replies."""

import http.server
import json
import random
import threading

import pytest

from experiments import build_envs
from ftrl_jax.envs import build, samples
from ftrl_jax.envs.llm_author import ChatClient, ChatError, LLMAuthor, extract_json
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.envs.stages import Complexity, StageError, construct


class _ScriptedServer:
    """`POST /v1/chat/completions` answering with the next scripted reply.

    A reply is a string (the assistant's content) or an int (an HTTP error status); `replies` is
    a list consumed in order, or a function of the request's messages. Every request is recorded.
    """

    def __init__(self, replies):
        self.replies = replies if callable(replies) else list(replies)
        self.requests = []
        self.paths = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.paths.append((self.path, self.headers.get("Authorization")))
                if callable(server.replies):
                    reply = server.replies(body["messages"])
                else:
                    reply = server.replies.pop(0) if server.replies else 500
                if isinstance(reply, int):
                    self.send_response(reply)
                    self.end_headers()
                    self.wfile.write(b'{"error": "scripted failure"}')
                    return
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload.encode())

            def log_message(self, *args):  # keep test output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


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
    with _ScriptedServer(replies) as server:
        author = LLMAuthor(ChatClient(server.base_url, api_key="k-test", model="tiny"), max_retries=3,
                           sandbox=sandbox)
        env = construct(author, "multi_hop", Complexity(toolset_extension=1), random.Random(0))
    assert len(server.requests) == len(replies)
    assert all(path == ("/v1/chat/completions", "Bearer k-test") for path in server.paths)
    assert server.requests[0]["model"] == "tiny" and server.requests[0]["messages"][0]["role"] == "system"
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
    with _ScriptedServer([json.dumps(bad)] * 5) as server:
        author = LLMAuthor(ChatClient(server.base_url), max_retries=1)
        with pytest.raises(StageError, match="no usable answer after 2 attempts; last problem: .*does not "
                                             "appear in the question") as info:
            author.decompose("multi_hop", Complexity(), random.Random(0))
    assert info.value.stage == "decompose" and len(server.requests) == 2


def test_structure_checks_catch_a_scenario_of_the_wrong_kind():
    with _ScriptedServer([json.dumps(SCENARIO)]) as server:
        author = LLMAuthor(ChatClient(server.base_url), max_retries=0)
        with pytest.raises(StageError, match="parallel_single_hop needs 2\\+ independent sub-questions"):
            author.decompose("parallel_single_hop", Complexity(), random.Random(0))


def test_client_retries_transient_http_errors_and_reports_permanent_ones():
    with _ScriptedServer([503, 429, "hello"]) as server:
        assert ChatClient(server.base_url, backoff_s=0).complete([{"role": "user", "content": "hi"}]) == "hello"
        assert len(server.requests) == 3
    with _ScriptedServer([400]) as server:
        with pytest.raises(ChatError, match="answered HTTP 400: .*scripted failure"):
            ChatClient(server.base_url, backoff_s=0).complete([{"role": "user", "content": "hi"}])
        assert len(server.requests) == 1


def test_unreachable_endpoint_stops_the_build_naming_the_url(tmp_path, capsys):
    with _ScriptedServer([]) as server:
        url = server.base_url
    author = LLMAuthor(ChatClient(url, transient_retries=0, timeout=2.0))
    with pytest.raises(ChatError, match="cannot reach http://127.0.0.1:.*check --base_url"):
        author.decompose("single_hop", Complexity(), random.Random(0))
    code = build_envs.main(["--num=2", f"--out={tmp_path / 'x.jsonl'}", "--author=llm", f"--base_url={url}",
                            "--workers=1", "--no_progress", "--author_threads=1", "--request_retries=0"])
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


def test_cli_builds_with_the_llm_author(tmp_path, capsys):
    out = tmp_path / "llm.jsonl"
    with _ScriptedServer(_reply_by_stage) as server:
        code = build_envs.main(["--num=3", "--seed=0", f"--out={out}", "--author=llm", f"--base_url={server.base_url}",
                                "--model=tiny", "--scenarios=multi_hop", "--complexity=low,te=1",
                                "--author_threads=3", "--workers=2", "--no_progress"])
    assert code == 0, capsys.readouterr().err
    rows, errors = samples.read_samples(out)
    assert errors == [] and len(rows) == 3
    assert {r.answer for r in rows} == {"Estravia"} and all(r.data_source == "self/multi_hop" for r in rows)
    assert len(rows[0].tools) == 4
