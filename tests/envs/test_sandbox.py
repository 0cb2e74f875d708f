"""The sandbox runs untrusted tool code out of process and turns every failure into a message."""

import json
import os

import pytest

from ftrl_jax.envs.sandbox import (
    ERROR_PREFIX,
    Sandbox,
    ToolRequest,
    format_result,
    is_error_output,
    shared_sandbox,
    truncate_output,
)

TIMEOUT_S = 1.0

CODES = {
    "add": "def add(a, b):\n    return {'sum': a + b}\n",
    "echo": "def echo(**kwargs):\n    return kwargs\n",
    "as_list": "def as_list(n):\n    return list(range(n))\n",
    "as_text": "def as_text(value):\n    return value\n",
    "painter": "def painter():\n    return {'name': 'Albrecht Dürer'}\n",
    "boom": "def boom():\n    raise ValueError('bad input')\n",
    "hang": "def hang():\n    while True:\n        pass\n",
    "loop_at_import": "while True:\n    pass\n\ndef loop_at_import():\n    return 1\n",
    "hog": "def hog():\n    block = bytearray(1 << 30)\n    return len(block)\n",
    "die": "import os\n\ndef die():\n    os._exit(3)\n",
    "kill_self": "import os, signal\n\ndef kill_self():\n    os.kill(os.getpid(), signal.SIGKILL)\n",
    "leave": "import sys\n\ndef leave():\n    sys.exit(0)\n",
    "chatty": "print('module level')\n\ndef chatty():\n    print('x' * 100000)\n    return 'done'\n",
    "big": "def big():\n    return 'y' * 1000\n",
    "counter": "calls = []\n\ndef counter():\n    calls.append(1)\n    return len(calls)\n",
    "pid": "import os, time\n\ndef pid(delay=0.0):\n    time.sleep(delay)\n    return os.getpid()\n",
    "nap": "import time\n\ndef nap(seconds, tag):\n    time.sleep(seconds)\n    return tag\n",
    "broken": "def broken(:\n    pass\n",
    "misnamed": "def something_else():\n    return 1\n",
    "where": (
        "import os\n\ndef where():\n"
        "    return {'cwd': os.getcwd(), 'secret': os.environ.get('FTRL_SANDBOX_TEST_SECRET')}\n"
    ),
    "scribble": (
        "import os\n\ndef scribble():\n"
        "    for fd in range(3, 32):\n"
        "        try:\n            os.write(fd, b'not json\\n')\n"
        "        except OSError:\n            pass\n"
        "    return 'scribbled'\n"
    ),
}


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(num_workers=2, timeout=TIMEOUT_S, memory_limit_bytes=512 << 20, max_output_chars=200) as box:
        yield box


def test_results_are_json_for_dict_and_list_and_str_otherwise(sandbox):
    assert sandbox.call(CODES, "add", {"a": 1, "b": 2}) == '{"sum": 3}'
    assert sandbox.call(CODES, "as_list", {"n": 3}) == "[0, 1, 2]"
    assert sandbox.call(CODES, "as_text", {"value": 7}) == "7"
    assert sandbox.call(CODES, "as_text", {"value": None}) == "None"
    # Non-ASCII stays readable, so expected answers such as 'Dürer' can match.
    assert json.loads(sandbox.call(CODES, "painter", {})) == {"name": "Albrecht Dürer"}
    assert "Dürer" in sandbox.call(CODES, "painter", {})


def test_format_result_falls_back_to_str_for_json_it_cannot_write():
    assert format_result({(1, 2): "tuple key"}) == str({(1, 2): "tuple key"})
    assert format_result((1, 2)) == "(1, 2)"


def test_arguments_may_be_a_json_string(sandbox):
    assert sandbox.call(CODES, "add", '{"a": "x", "b": "y"}') == '{"sum": "xy"}'
    assert sandbox.call(CODES, "echo", "") == "{}"


@pytest.mark.parametrize(
    "arguments, detail",
    [([1, 2], "must be a JSON object, got list"), ("[1, 2]", "must be a JSON object, got list"),
     ("{not json", "not valid JSON"), (7, "must be a JSON object, got int")],
)
def test_arguments_that_are_not_an_object_are_error_messages(sandbox, arguments, detail):
    output = sandbox.call(CODES, "add", arguments)
    assert output.startswith(f"{ERROR_PREFIX} add: ")
    assert detail in output


def test_unknown_tool_is_an_error_message_listing_the_tools(sandbox):
    output = sandbox.call(CODES, "subtract", {"a": 1})
    assert output.startswith(f"{ERROR_PREFIX} subtract: no tool named 'subtract'")
    assert "add" in output


def test_raising_tool_reports_the_exception(sandbox):
    assert sandbox.call(CODES, "boom", {}) == f"{ERROR_PREFIX} boom: ValueError: bad input"
    missing = sandbox.call(CODES, "add", {"a": 1})
    assert missing.startswith(f"{ERROR_PREFIX} add: TypeError:") and "'b'" in missing


def test_hanging_call_times_out_and_the_next_call_works(sandbox):
    before = sandbox.stats
    assert sandbox.call(CODES, "hang", {}) == f"{ERROR_PREFIX} hang: the call timed out after 1 s"
    after = sandbox.stats
    assert after.get("timeouts", 0) == before.get("timeouts", 0) + 1
    assert after.get("worker_restarts", 0) == before.get("worker_restarts", 0) + 1
    assert sandbox.call(CODES, "add", {"a": 2, "b": 3}) == '{"sum": 5}'


def test_loop_while_defining_the_tool_times_out_too(sandbox):
    assert "timed out" in sandbox.call(CODES, "loop_at_import", {})
    assert sandbox.call(CODES, "add", {"a": 1, "b": 1}) == '{"sum": 2}'


def test_memory_exhaustion_is_an_error_and_the_worker_is_replaced(sandbox):
    restarts = sandbox.stats.get("worker_restarts", 0)
    assert sandbox.call(CODES, "hog", {}) == f"{ERROR_PREFIX} hog: MemoryError: the tool ran out of memory"
    assert sandbox.stats["worker_restarts"] == restarts + 1
    assert sandbox.call(CODES, "add", {"a": 1, "b": 2}) == '{"sum": 3}'


@pytest.mark.parametrize(
    "name, detail", [("die", "exited with code 3"), ("kill_self", "killed by SIGKILL"), ("leave", "SystemExit")]
)
def test_a_tool_that_ends_its_process_is_an_error_and_the_next_call_works(sandbox, name, detail):
    output = sandbox.call(CODES, name, {})
    assert output.startswith(f"{ERROR_PREFIX} {name}: ") and detail in output
    assert sandbox.call(CODES, "add", {"a": 4, "b": 4}) == '{"sum": 8}'


def test_prints_do_not_reach_the_reply_channel(sandbox):
    assert sandbox.call(CODES, "chatty", {}) == "done"


def test_garbage_written_on_the_reply_channel_retires_the_worker(sandbox):
    output = sandbox.call(CODES, "scribble", {})
    # Either the garbage reached the parent (reply channel broken) or it went nowhere (plain result).
    assert output in ("scribbled", f"{ERROR_PREFIX} scribble: the tool's process broke its reply channel")
    assert [sandbox.call(CODES, "add", {"a": i, "b": 0}) for i in range(4)] == [f'{{"sum": {i}}}' for i in range(4)]


def test_long_output_is_truncated_with_a_note(sandbox):
    output = sandbox.call(CODES, "big", {})
    assert output.startswith("y" * 200)
    assert output.endswith("[output truncated: 800 of 1000 characters omitted]")
    assert truncate_output("short", 200) == "short"


def test_compile_errors_and_missing_functions_are_error_messages(sandbox):
    for _ in range(2):  # the second call must not find a stale cache entry
        output = sandbox.call(CODES, "broken", {})
        assert output.startswith(f"{ERROR_PREFIX} broken: SyntaxError")
    assert sandbox.call(CODES, "misnamed", {}) == f"{ERROR_PREFIX} misnamed: its code defines no function named 'misnamed'"


def test_every_call_starts_from_fresh_module_state(sandbox):
    assert [sandbox.call(CODES, "counter", {}) for _ in range(3)] == ["1", "1", "1"]


def test_code_is_compiled_once_and_then_served_from_the_cache(sandbox):
    codes = {"fresh": "def fresh(x):\n    return x * 2\n"}
    hits = sandbox.stats.get("cache_hits", 0)
    assert sandbox.call(codes, "fresh", {"x": 2}) == "4"
    assert sandbox.stats.get("cache_hits", 0) == hits
    assert sandbox.call(codes, "fresh", {"x": 3}) == "6"
    assert sandbox.stats["cache_hits"] == hits + 1


def test_changed_source_under_the_same_name_is_recompiled(sandbox):
    assert sandbox.call({"f": "def f():\n    return 'old'\n"}, "f", {}) == "old"
    assert sandbox.call({"f": "def f():\n    return 'new'\n"}, "f", {}) == "new"


def test_call_many_keeps_request_order_and_uses_every_worker(sandbox):
    requests = [ToolRequest(CODES, "nap", {"seconds": 0.2 - 0.05 * i, "tag": i}) for i in range(4)]
    assert sandbox.call_many(requests) == ["0", "1", "2", "3"]
    pids = sandbox.call_many([ToolRequest(CODES, "pid", {"delay": 0.1}) for _ in range(4)])
    assert len(set(pids)) == 2


def test_call_many_mixes_failures_and_results(sandbox):
    requests = [
        ToolRequest(CODES, "hang", {}),
        ToolRequest(CODES, "add", {"a": 1, "b": 1}),
        ToolRequest(CODES, "nope", {}),
        ToolRequest(CODES, "boom", {}),
        ToolRequest(CODES, "add", '{"a": 2, "b": 2}'),
    ]
    outputs = sandbox.call_many(requests, timeout=0.5)
    assert outputs[0] == f"{ERROR_PREFIX} hang: the call timed out after 0.5 s"
    assert outputs[1] == '{"sum": 2}' and outputs[4] == '{"sum": 4}'
    assert is_error_output(outputs[2]) and is_error_output(outputs[3])
    assert sandbox.call_many([]) == []


def test_workers_run_in_a_private_directory_without_the_parent_environment(monkeypatch):
    monkeypatch.setenv("FTRL_SANDBOX_TEST_SECRET", "token")
    box = Sandbox(num_workers=1, timeout=5.0)
    try:
        seen = json.loads(box.call(CODES, "where", {}))
        workdir = seen["cwd"]
        assert seen["secret"] is None
        assert os.path.realpath(workdir) != os.path.realpath(os.getcwd())
        assert os.path.isdir(workdir)
        pids = [worker.proc.pid for worker in box._workers]
    finally:
        box.close()
    assert not os.path.exists(workdir)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="closed"):
        box.call(CODES, "add", {"a": 1, "b": 1})
    box.close()  # idempotent


def test_bad_settings_and_bad_requests_are_rejected():
    with pytest.raises(ValueError, match="num_workers"):
        Sandbox(num_workers=0)
    with pytest.raises(ValueError, match="timeout"):
        Sandbox(num_workers=1, timeout=0)
    with Sandbox(num_workers=1) as box, pytest.raises(TypeError, match="codes"):
        box.call_many([ToolRequest(["not", "a", "mapping"], "add", {})])


def test_shared_sandbox_is_one_pool_per_process():
    first = shared_sandbox()
    assert shared_sandbox() is first
    assert first.call(CODES, "add", {"a": 20, "b": 22}) == '{"sum": 42}'


def test_error_outputs_are_recognised():
    assert is_error_output(f"{ERROR_PREFIX} add: ValueError: x")
    assert not is_error_output('{"error": "not found"}')
