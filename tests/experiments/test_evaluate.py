"""`python -m experiments.evaluate`: scoring, summaries, resume, failures, ToolHop scenarios, and greedy
evaluation over HTTP (our server, the openai wire format) equal to in-process evaluation."""

import json
import os

import pytest

from experiments import cli, evaluate, serve
from ftrl_jax.rollout import harness
from ftrl_jax import serving
from ftrl_jax.envs.samples import user_prompt, write_samples
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.serving.client import OpenAIChatGenerator
from ftrl_jax.serving.server import BatchingEngine, PolicyService, ServerLimits
from tests.rollout.test_episodes import OracleGenerator, ScriptedGenerator, calls_text, toy_sample
from tests.serving.test_server import tiny_policy_dir

TOOLHOP = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "benchdata", "toolhop_100.jsonl")


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(num_workers=2, timeout=5.0) as box:
        yield box


def serve_generator(generator_for, *, context_length=1 << 20):
    """Our HTTP server around any turn-generator factory; returns (server, engine)."""
    engine = BatchingEngine(generator_for, batch_window_s=0.002)
    server = serving.start_server(PolicyService(engine, ServerLimits("scripted", context_length)))
    return server, engine


def stop(server, engine):
    server.stop()  # closes the engine too
    assert not engine._worker.is_alive()


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# --- the command line, on a tiny jit policy, in-process and served ---------------------------------


def solve_samples():
    greet_only = toy_sample(unsolved={"greet": ["Hello, Ada"]})
    greet_only.messages[0]["content"] = user_prompt("Greet Ada.")
    too_long = toy_sample()
    too_long.messages[0]["content"] = user_prompt("Double 7. " + "Really. " * 3000)  # far over 4096 tokens
    return [toy_sample(), greet_only, too_long]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return tiny_policy_dir(tmp_path_factory.mktemp("policy"))


@pytest.fixture(scope="module")
def served_policy(policy_dir):
    """`experiments.serve`'s service for the policy, on an ephemeral port."""
    args = cli.parse(["serve", "--model", policy_dir, "--port", "0", "--served_model_name", "tiny"],
                     serve.define_flags, serve.__doc__)
    service = serve.build_service(args)
    server = serving.start_server(service, port=args.port)
    yield server
    stop(server, service.engine)


def test_greedy_evaluation_over_http_equals_in_process(tmp_path, policy_dir, served_policy, capsys):
    data = str(tmp_path / "envs.jsonl")
    write_samples(data, solve_samples())
    common = ["evaluate", "--data", data, "--max_new_tokens", "16", "--noprogress", "--sandbox_workers", "1"]
    local_out, served_out = str(tmp_path / "local.jsonl"), str(tmp_path / "served.jsonl")
    assert evaluate.main(common + ["--model", policy_dir, "--output", local_out, "--batch_size", "1"]) == 0
    table = capsys.readouterr().out
    assert evaluate.main(common + ["--backend", "openai", "--base_url", served_policy.base_url, "--model_name", "tiny",
                                   "--output", served_out, "--concurrency", "1"]) == 0

    # In-process episodes are played longest prompt first; the file holds each task once, in that order.
    written = read_lines(local_out)
    assert [r["key"] for r in written] == ["2/solve", "0/solve", "1/solve"]
    local, served = sorted(written, key=lambda r: r["key"]), {r["key"]: r for r in read_lines(served_out)}
    assert set(served) == {r["key"] for r in local}
    for episode in local:
        twin = served[episode["key"]]
        assert episode["status"] == twin["status"] == "ok"
        assert (episode["messages"], episode["metrics"], episode["end_reason"]) == \
            (twin["messages"], twin["metrics"], twin["end_reason"])
    assert local[0]["messages"][-1]["role"] == "assistant" and local[2]["end_reason"] == "prompt_too_long"

    summary = json.load(open(str(tmp_path / "local.summary.json")))
    assert summary["episodes"] == {"planned": 3, "finished": 3, "failed": 0, "prompt_too_long": 1, "not_run": 0}
    assert summary["results"]["per_source"]["toy"]["count"] == 3.0 and summary["this_run"]["episodes"] == 3
    assert summary["results"]["missing_types"] == list(harness.evaluation.SCENARIO_TYPES)
    assert "| toy | 3 |" in table and open(str(tmp_path / "local.summary.md")).read() in table
    with open(str(tmp_path / "local.scenarios.png"), "rb") as f:  # the per-scenario chart beside the summary
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    served_summary = json.load(open(str(tmp_path / "served.summary.json")))
    assert served_summary["results"] == summary["results"]
    assert served_summary["backend_stats"]["prompt_too_long"] == 1

    # Resuming a finished evaluation plays nothing and keeps the file; other settings are refused.
    before = open(local_out).read()
    assert evaluate.main(common + ["--model", policy_dir, "--output", local_out]) == 0
    assert open(local_out).read() == before and "nothing to play" in capsys.readouterr().err
    assert evaluate.main(common[:4] + ["17", "--model", policy_dir, "--output", local_out]) == 2
    assert "holds episodes of another evaluation" in capsys.readouterr().err


def test_oracle_play_over_http_equals_in_process_with_real_tool_calls(tmp_path, sandbox):
    """Multi-turn episodes with single and parallel calls: the openai wire format loses nothing."""
    both = toy_sample()
    both.messages[0]["content"] = user_prompt("Double 7 and greet Ada at once.")
    samples = [toy_sample(), both]
    plans = {id(samples[0]): [[("double", {"x": 7})], [("greet", {"name": "Ada"})]],
             id(samples[1]): [[("double", {"x": 7}), ("greet", {"name": "Ada"})]]}
    tasks = [harness.Task(i, harness.SOLVE_SCENARIO, s) for i, s in enumerate(samples)]

    local_records, served_records = {}, {}
    play = harness.play_in_batches(OracleGenerator(samples, plans), batch_size=8, max_turns=5, sandbox=sandbox)
    harness.evaluate_tasks(tasks, play, output=str(tmp_path / "a.jsonl"), kind="samples", run_id="r",
                            records=local_records, progress=False)
    server, engine = serve_generator(lambda key: OracleGenerator(samples, plans))
    try:
        with OpenAIChatGenerator(server.base_url, "scripted", max_new_tokens=64) as remote:
            play = harness.play_concurrently(remote, concurrency=2, max_turns=5, sandbox=sandbox)
            harness.evaluate_tasks(tasks, play, output=str(tmp_path / "b.jsonl"), kind="samples", run_id="r",
                                    records=served_records, progress=False)
    finally:
        stop(server, engine)
    for key, episode in local_records.items():
        twin = served_records[key]
        assert episode["metrics"]["solve_f1"] == 1.0 and episode["metrics"]["num_calls"] == 2
        assert (episode["messages"], episode["metrics"], episode["num_turns"]) == \
            (twin["messages"], twin["metrics"], twin["num_turns"])
    assert [local_records[task.key]["num_turns"] for task in tasks] == [3, 2]


def test_in_process_batches_group_prompts_of_similar_size(tmp_path, sandbox):
    """Rows of one batch pad to its longest prompt: batches are cut from the tasks ordered by prompt size."""
    samples = []
    for n in (3, 40, 7, 90, 1, 55, 12, 70):
        sample = toy_sample()
        sample.messages[0]["content"] = user_prompt("Double 7. " + "Please. " * n)
        samples.append(sample)
    plans = {id(s): [[("double", {"x": 7})]] for s in samples}
    oracle = OracleGenerator(samples, plans)
    size_of = {s.messages[0]["content"]: harness.prompt_size(s) for s in samples}
    batches = []

    def recording(conversations):
        if all(len(messages) == 1 for messages, _ in conversations):  # first turns: one per play_episodes call
            batches.append([size_of[messages[0]["content"]] for messages, _ in conversations])
        return oracle(conversations)

    tasks = [harness.Task(i, harness.SOLVE_SCENARIO, s) for i, s in enumerate(samples)]
    records = {}
    play = harness.play_in_batches(recording, batch_size=3, max_turns=3, sandbox=sandbox)
    harness.evaluate_tasks(tasks, play, output=str(tmp_path / "a.jsonl"), kind="samples", run_id="r",
                           records=records, progress=False)
    sizes = sorted((harness.prompt_size(s) for s in samples), reverse=True)
    assert [sorted(b, reverse=True) for b in batches] == [sizes[0:3], sizes[3:6], sizes[6:8]]
    assert sorted(records) == sorted(task.key for task in tasks)
    assert all(r["num_turns"] == 2 and r["metrics"]["num_calls"] == 1 for r in records.values())


class Flaky:
    """A generator factory whose generators raise while `failing` is set, else play the oracle."""

    def __init__(self, samples):
        self.samples = samples
        self.failing = True

    def __call__(self, key):
        oracle = OracleGenerator(self.samples)

        def generate(conversations):
            if self.failing:
                raise RuntimeError("device lost")
            return oracle(conversations)

        return generate


def test_failing_requests_are_recorded_as_failed_and_retried_on_resume(tmp_path, capsys):
    samples = [toy_sample()]
    samples[0].oracle_calls = [[{"name": "double", "arguments": {"x": 7}}]]
    data, output = str(tmp_path / "envs.jsonl"), str(tmp_path / "out.jsonl")
    write_samples(data, samples)
    flaky = Flaky(samples)
    server, engine = serve_generator(flaky)

    def command_for(base_url, model_name="scripted", out=output):
        return ["evaluate", "--data", data, "--backend", "openai", "--base_url", base_url, "--model_name", model_name,
                "--output", out, "--max_retries", "1", "--noprogress", "--sandbox_workers", "1"]

    command = command_for(server.base_url)
    try:
        assert evaluate.main(command) == 1
        (failed,) = read_lines(output)
        assert failed["status"] == "failed" and "HTTP 500" in failed["error"] and "device lost" in failed["error"]
        summary = json.load(open(str(tmp_path / "out.summary.json")))
        assert summary["episodes"]["failed"] == 1 and summary["episodes"]["finished"] == 0
        assert summary["results"]["per_source"] == {} and summary["failures"][0]["key"] == "0/solve"
        out = capsys.readouterr().out
        assert "1 failed" in out and "failed 0/solve: " in out and "device lost" in out  # why, on the console

        flaky.failing = False
        assert evaluate.main(command) == 0
        lines = read_lines(output)
        assert [r["status"] for r in lines] == ["failed", "ok"] and lines[1]["metrics"]["solve_rate"] == 0.5
        summary = json.load(open(str(tmp_path / "out.summary.json")))
        assert summary["episodes"]["failed"] == 0 and summary["results"]["per_source"]["toy"]["solve_rate"] == 0.5
    finally:
        stop(server, engine)

    # A wrong model name is a setup error: the run stops at once instead of failing every episode.
    server, engine = serve_generator(flaky)
    try:
        assert evaluate.main(command_for(server.base_url, "other", str(tmp_path / "wrong.jsonl"))) == 2
        assert "model_name" in capsys.readouterr().err
    finally:
        stop(server, engine)


TOOLHOP_ROWS = [
    {"id": "t1", "category": "film", "question": "Who is the mother of the director of Film X?", "answer": "Mary Lee",
     "sub_task": {"Who directed Film X?": "Ann Lee", "Who is the mother of Ann Lee?": "Mary Lee"},
     "tools": {"Who directed Film X?": {"name": "film_director", "description": "Director of a film.",
                                        "parameters": {"type": "object", "properties": {"film": {"type": "string"}},
                                                       "required": ["film"]}},
               "Who is the mother of Ann Lee?": {"name": "mother_of", "description": "Mother of a person.",
                                                 "parameters": {"type": "object",
                                                                "properties": {"person": {"type": "string"}},
                                                                "required": ["person"]}}},
     "functions": ["def film_director(film):\n    return {'director': 'Ann Lee' if film == 'Film X' else 'unknown'}\n",
                   "def mother_of(person):\n    return {'mother': 'Mary Lee' if person == 'Ann Lee' else 'unknown'}\n"],
     "gold_calls": ["film_director('Film X')", "mother_of('Ann Lee')"]},
    {"id": "t2", "category": "music", "question": "In which year was the band of Bo Park founded?", "answer": "1971",
     "sub_task": {"Which band is Bo Park in?": "The Owls", "When was The Owls founded?": "1971"},
     "tools": {"Which band is Bo Park in?": {"name": "band_of", "description": "Band of a musician.",
                                             "parameters": {"type": "object",
                                                            "properties": {"musician": {"type": "string"}},
                                                            "required": ["musician"]}},
               "When was The Owls founded?": {"name": "founded", "description": "Founding year of a band.",
                                              "parameters": {"type": "object",
                                                             "properties": {"band": {"type": "string"}},
                                                             "required": ["band"]}}},
     "functions": ["def band_of(musician):\n    return 'The Owls' if musician == 'Bo Park' else 'unknown'\n",
                   "def founded(band):\n    return 1971 if band == 'The Owls' else 'unknown'\n"],
     "gold_calls": ["band_of('Bo Park')", "founded('The Owls')"]},
]
PLANS = {"Who is the mother of the director of Film X?": [[("film_director", {"film": "Film X"})],
                                                          [("mother_of", {"person": "Ann Lee"})]],
         "In which year was the band of Bo Park founded?": [[("band_of", {"musician": "Bo Park"})],
                                                            [("founded", {"band": "The Owls"})]]}


def toolhop_policy(messages, turn_number):
    """Knows Film X's answer by heart (only says it without tools), plays the plan when told to use tools."""
    content = messages[0]["content"]
    question = content.split("Question: ", 1)[1]
    if content.startswith(harness.DIRECT_INSTRUCTION):
        return "It is Mary Lee." if "Film X" in question else "No idea."
    if content.startswith(harness.FREE_INSTRUCTION):
        return "Perhaps 1970."
    plan = PLANS[question]
    return calls_text(plan[turn_number]) if turn_number < len(plan) else "Done."


def test_toolhop_through_the_command_line(tmp_path, capsys):
    data, output = str(tmp_path / "toolhop.jsonl"), str(tmp_path / "toolhop_eval.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in TOOLHOP_ROWS)
    server, engine = serve_generator(lambda key: ScriptedGenerator(toolhop_policy))
    try:
        assert evaluate.main(["evaluate", "--data", data, "--backend", "openai", "--base_url", server.base_url,
                              "--model_name", "scripted", "--output", output, "--noprogress", "--sandbox_workers",
                              "1"]) == 0
    finally:
        stop(server, engine)
    records = {r["key"]: r for r in read_lines(output)}
    assert len(records) == 6
    assert records["0/direct"]["metrics"] == {"answer_correctness": 1.0, "answered_by": "final_answer", "num_calls": 0}
    assert records["1/mandatory"]["metrics"] == {"answer_correctness": 1.0, "answered_by": "tool_output",
                                                 "num_calls": 2}
    assert records["0/free"]["metrics"]["answer_correctness"] == 0.0
    summary = json.load(open(str(tmp_path / "toolhop_eval.summary.json")))
    per_scenario = summary["results"]["per_scenario"]
    assert {name: means["answer_correctness"] for name, means in per_scenario.items()} == \
        {"direct": 0.5, "mandatory": 1.0, "free": 0.0}
    assert summary["results"]["average"] == 0.5
    assert os.path.getsize(str(tmp_path / "toolhop_eval.scenarios.png")) > 0
    assert "| mandatory | 2 | 100.00 | 0 | 0 |" in capsys.readouterr().out


def test_command_line_mistakes_are_reported(tmp_path, capsys):
    missing = str(tmp_path / "none.jsonl")
    assert evaluate.main(["evaluate", "--data", missing, "--model", "x", "--output", "o.jsonl"]) == 2
    assert "does not exist" in capsys.readouterr().err
    data = str(tmp_path / "envs.jsonl")
    write_samples(data, [toy_sample()])
    output = f"--output={tmp_path / 'o.jsonl'}"
    assert evaluate.main(["evaluate", "--data", data, "--backend", "openai", output]) == 2
    assert "--base_url" in capsys.readouterr().err
    assert evaluate.main(["evaluate", "--data", data, "--model", str(tmp_path), output, "--noprogress"]) == 2
    assert "not a policy directory" in capsys.readouterr().err
    for mistake in ("--limit=-1", "--template=qwen9", "--backend=vllm", "--max_turns=0", "--no_progress"):
        assert evaluate.main(["evaluate", f"--data={data}", "--model=x", output, mistake]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and mistake.split("=")[0][2:] in err, (mistake, err)
    assert evaluate.main(["evaluate", f"--model={tmp_path}", output]) == 2
    assert capsys.readouterr().err == "error: --data is required (see --help)\n"
    assert not (tmp_path / "o.jsonl").exists()


def test_output_and_extra_body_mistakes_stop_before_any_work(tmp_path, capsys, monkeypatch):
    data = str(tmp_path / "envs.jsonl")
    write_samples(data, [toy_sample()])
    monkeypatch.setattr(evaluate, "load_tasks", lambda *a, **k: pytest.fail("data read before the flags were checked"))
    openai = ["--backend=openai", "--base_url=http://127.0.0.1:9/v1", "--model_name=m"]
    for mistakes in ([f"--output={tmp_path / 'o.parquet'}", "--model=x"], ["--output=", "--model=x"],
                     [f"--output={tmp_path / '.jsonl'}", "--model=x"],
                     [f"--output={tmp_path / 'o.jsonl'}", "--extra_body={bad", *openai],
                     [f"--output={tmp_path / 'o.jsonl'}", "--extra_body=[1]", *openai]):
        assert evaluate.main(["evaluate", f"--data={data}", *mistakes]) == 2, mistakes
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5 and all(line.startswith("error: ") for line in err), err
    assert all("name a .jsonl file" in line for line in err[:3])
    assert "not valid JSON" in err[3] and "JSON object" in err[4]
    assert os.listdir(tmp_path) == ["envs.jsonl"]


def test_data_without_rows_is_a_usage_error(tmp_path, capsys):
    empty, broken = tmp_path / "empty.jsonl", tmp_path / "broken.jsonl"
    empty.write_text("")
    broken.write_text("{not json\n")
    for data in (empty, broken):
        assert evaluate.main(["evaluate", f"--data={data}", "--model=x", f"--output={tmp_path / 'o.jsonl'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("holds no episodes to play") == 2 and "1 rows skipped" in err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("given, sent", [([], None), (["--enable_thinking"], True), (["--noenable_thinking"], False)])
def test_enable_thinking_is_sent_only_when_given(given, sent):
    argv = ["evaluate", "--data=d.jsonl", "--output=o.jsonl", *given]
    args = cli.parse(argv, evaluate.define_flags, evaluate.__doc__)
    assert evaluate._enable_thinking(args) is sent
