"""`python -m experiments.serve`: absl flags (help, usage errors), and the command serving until SIGINT."""

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from experiments import build_envs, evaluate, sample, serve, train  # noqa: F401 - one process, no duplicate flags
from tests.serving.test_server import tiny_policy_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as info:
        serve.main(["serve", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for name, default in [("model", None), ("tokenizer", "''"), ("dtype", "'float32'"), ("seed", "'0'"),
                          ("host", "'127.0.0.1'"), ("port", "'8000'"), ("template", "'auto'"), ("timeout", "'600.0'"),
                          ("max_batch_size", "'64'"), ("api_key", "''"), ("max_body_mb", "'32.0'")]:
        assert re.search(rf"--(\[no\])?{name}:", text), name
        if default is not None:
            assert re.search(rf"--{name}:.*?\(default: {re.escape(default)}\)", text, re.S), name


@pytest.mark.parametrize("argv,message", [
    ([], "--model"),
    (["--model=x", "--port=70000"], "--port"),
    (["--model=x", "--colour=red"], "colour"),
    (["--model=x", "stray"], "unexpected arguments"),
    (["--model=/nonexistent/policy"], "is not a policy directory"),
])
def test_usage_errors_exit_2_naming_the_problem(argv, message, capsys):
    assert serve.main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_the_command_serves_until_interrupted(tmp_path):
    policy = tiny_policy_dir(tmp_path / "policy")
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments.serve", f"--model={policy}", "--port=0", "--served_model_name=tiny"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"at (http://127\.0\.0\.1:\d+/v1)$", line.strip())
        assert match, (line, process.stderr.read() if process.poll() is not None else "")
        base_url = match.group(1)
        with urllib.request.urlopen(base_url[:-len("/v1")] + "/health", timeout=30) as response:
            assert json.loads(response.read()) == {"status": "ok"}
        with urllib.request.urlopen(base_url + "/models", timeout=30) as response:
            assert [m["id"] for m in json.loads(response.read())["data"]] == ["tiny"]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
