"""Running untrusted tool code (written by an LLM) in a pool of worker processes.

Each worker is a separate Python process started with `subprocess` (not fork: the trainer holds
JAX threads) running this file as a script. The parent and a worker talk over the worker's
stdin/stdout pipes, one JSON object per line. A worker:
- runs in its own session and a private temporary working directory, with a minimal environment
  (none of the trainer's variables, so no keys or tokens leak to tool code);
- caps its address space (`RLIMIT_AS`), so a runaway allocation raises MemoryError there;
- compiles each tool's source once and caches the code object, keyed by a hash of the tool's
  name and source (finer than a hash of the whole codes mapping, with the same effect, and cheap
  to compute per call); the parent sends a source only to a worker that has not compiled it, and
  routes each tool to the same "home" worker so it is compiled once, not once per worker;
- executes the tool's module code into a fresh namespace on every call (no state carries over
  from one call to the next, so results do not depend on which worker served earlier calls),
  then calls the function with the arguments as keywords.

The parent enforces the wall-clock timeout: a worker that hangs, dies or breaks the protocol is
killed (with anything it started) and replaced, and the call comes back as FTRL's error message
`an error occured when call NAME: ...`, which the model reads like any other tool output.

This is a process boundary, not a security jail: tool code runs with the trainer's user rights.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import hashlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

# FTRL's wording, misspelling included: the models were trained reading exactly this prefix.
ERROR_PREFIX = "an error occured when call"

_STARTUP_GRACE_S = 30.0  # a fresh worker's start-up does not count against a call's timeout
_COMPILE_CACHE_SIZE = 4096  # code objects kept per worker
_TOOL_MODULE_NAME = "__ftrl_tool__"  # not "__main__": example code under a main-guard stays off


def error_message(name: str, detail: str) -> str:
    """The tool output the model sees when a call fails."""
    return f"{ERROR_PREFIX} {name}: {detail}"


def is_error_output(output: str) -> bool:
    """Whether a tool output is the sandbox's error message rather than the tool's own result."""
    return output.startswith(ERROR_PREFIX + " ")


def truncate_output(text: str, max_chars: int) -> str:
    """Cuts text to max_chars, saying how much was cut so the model knows the output is partial."""
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f"\n[output truncated: {len(text) - max_chars} of {len(text)} characters omitted]"


def format_result(result: Any) -> str:
    """A tool's return value as the model sees it: dict/list as JSON, anything else via str()."""
    if isinstance(result, (dict, list)):
        try:
            # Non-ASCII text stays readable (expected answers such as 'Dürer' must match).
            return json.dumps(result, ensure_ascii=False, default=str)
        except (TypeError, ValueError):  # non-string keys that json rejects, circular references
            pass
    return str(result)


def _describe_exception(exc: BaseException) -> str:
    try:
        detail = str(exc)
    except Exception:  # a hostile __str__
        detail = ""
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "the tool's process stopped answering"
    if returncode < 0:
        try:
            return f"the tool's process was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"the tool's process was killed by signal {-returncode}"
    return f"the tool's process exited with code {returncode}"


def tool_key(name: str, source: str) -> str:
    """A stable hash of one tool's name and source: the compile-cache key in the workers.

    Per tool rather than per environment: hashing only the called tool's source is cheap, and
    environments sharing a tool share its compiled code.
    """
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(name.encode("utf-8", "surrogatepass") + b"\0")
    digest.update(source.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class ToolRequest:
    """One tool call of one environment."""

    codes: Mapping[str, str]  # tool name -> source (the whole environment's codes)
    name: str  # tool to call
    arguments: Any  # dict, or a JSON string that should decode to a dict


def _arguments_dict(arguments: Any) -> tuple[dict[str, Any] | None, str]:
    """(arguments as a dict, "") or (None, what is wrong with them)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            return None, f"arguments are not valid JSON ({exc}); pass a JSON object"
    if not isinstance(arguments, Mapping):
        return None, f"arguments must be a JSON object, got {type(arguments).__name__}"
    if not all(isinstance(key, str) for key in arguments):
        return None, "argument names must be strings"
    return dict(arguments), ""


# ---------------------------------------------------------------------------------------------
# Worker side. This code runs in the worker process (this file executed as a script).


class _Lru:
    """A small least-recently-used map (the worker's compile cache, and the parent's mirror of it)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: collections.OrderedDict[Any, Any] = collections.OrderedDict()

    def get(self, key: Any) -> Any:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: Any, value: Any) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        if len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def discard(self, key: Any) -> None:
        self._entries.pop(key, None)


def _run_tool(request: Mapping[str, Any], cache: _Lru, max_chars: int) -> dict[str, Any]:
    """Executes one request; every failure of the tool's code becomes an error message.

    A request carries the tool's source only when the parent believes this worker has not
    compiled it yet; without a source and without a cached compile, the reply asks for it.
    """
    name = request["name"]
    entry = (request["key"], name)
    code = cache.get(entry)
    hit = code is not None
    try:
        if code is None:
            if request.get("source") is None:
                return {"missing": True}
            # dont_inherit: this file's `from __future__` flags must not leak into tool code.
            code = compile(request["source"], f"<tool {name}>", "exec", dont_inherit=True)
            cache.put(entry, code)
        namespace: dict[str, Any] = {"__name__": _TOOL_MODULE_NAME, "__builtins__": builtins}
        exec(code, namespace)
        function = namespace.get(name)
        if not callable(function):
            return {"output": error_message(name, f"its code defines no function named {name!r}"), "cache_hit": hit}
        output = format_result(function(**request["arguments"]))
        return {"output": truncate_output(output, max_chars), "cache_hit": hit}
    except MemoryError:
        # The heap may be fragmented or half-updated; answer, then let the parent start a fresh worker.
        return {"output": error_message(name, "MemoryError: the tool ran out of memory"), "recycle": True}
    except BaseException as exc:  # SystemExit and KeyboardInterrupt from tool code are tool failures too
        detail = truncate_output(_describe_exception(exc), max_chars)
        return {"output": error_message(name, detail), "cache_hit": hit}


def _exit_when_orphaned(parent_pid: int) -> None:
    # If the trainer dies while a tool loops, nobody would kill this worker; it notices instead.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def _serve(memory_limit_bytes: int, max_chars: int, parent_pid: int) -> None:
    """The worker's loop: read a request line, answer with a reply line, until stdin closes."""
    import resource

    if memory_limit_bytes > 0:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = memory_limit_bytes if hard == resource.RLIM_INFINITY else min(memory_limit_bytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    # Keep the protocol pipes on private descriptors; tool code's print()/input() get /dev/null.
    requests_in = os.fdopen(os.dup(0), "rb")
    replies_out = os.fdopen(os.dup(1), "wb")
    null_fd = os.open(os.devnull, os.O_RDWR)
    os.dup2(null_fd, 0)
    os.dup2(null_fd, 1)
    sys.stdin = open(os.devnull, encoding="utf-8")
    sys.stdout = open(os.devnull, "w", encoding="utf-8")
    # Running as a script put this package directory on sys.path; tool imports must not see it.
    script_dir = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != script_dir]
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()

    cache = _Lru(_COMPILE_CACHE_SIZE)
    replies_out.write(b'{"ready": true}\n')
    replies_out.flush()
    for line in requests_in:
        reply = _run_tool(json.loads(line), cache, max_chars)
        replies_out.write(json.dumps(reply, ensure_ascii=True).encode("ascii") + b"\n")
        replies_out.flush()
        if reply.get("recycle"):
            os._exit(0)


# ---------------------------------------------------------------------------------------------
# Parent side.


def _worker_environment(workdir: str) -> dict[str, str]:
    """A minimal, fixed environment: nothing of the trainer's, deterministic hashing and time zone."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
        "PYTHONHASHSEED": "0",  # set iteration order, hence outputs, equal across workers
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        # Numeric libraries reserve per-thread buffers that would eat the address-space cap.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


class _Worker:
    """One worker process and the parent's end of its pipes."""

    def __init__(self, argv: list[str], workdir: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=workdir,
            env=env,
            start_new_session=True,  # its own process group: killing it takes its children too
            bufsize=0,
        )
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buffer = bytearray()
        self.ready = False

    def send(self, line: bytes) -> None:
        view = memoryview(line)
        while view:
            written = os.write(self.proc.stdin.fileno(), view)
            view = view[written:]

    def read_lines(self) -> list[bytes] | None:
        """Complete lines received so far; None once the worker has closed its end (it died)."""
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        if not chunk:
            return None
        self.buffer += chunk
        lines = []
        while (end := self.buffer.find(b"\n")) >= 0:
            lines.append(bytes(self.buffer[:end]))
            del self.buffer[: end + 1]
        return lines

    def kill(self) -> int | None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            returncode = self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            returncode = None
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        return returncode


def _shutdown(workers: list[_Worker], workdir: str) -> None:
    for worker in workers:
        worker.kill()
    workers.clear()
    shutil.rmtree(workdir, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class _Job:
    """A call ready for a worker: its place in the batch and the parts of its request line."""

    index: int
    name: str
    key: str  # tool_key of the tool
    source: str
    head: str  # the request line's JSON without the source and the closing brace

    @property
    def entry(self) -> tuple[str, str]:
        return (self.key, self.name)

    def line(self, with_source: bool) -> bytes:
        # Encoding the source is the bulk of a request's cost; warm workers do not need it.
        tail = ', "source": ' + json.dumps(self.source) + "}\n" if with_source else "}\n"
        return (self.head + tail).encode("ascii")


@dataclasses.dataclass
class _Pending:
    """A call in flight on a worker."""

    slot: int
    worker: _Worker
    job: _Job
    deadline: float


class Sandbox:
    """A pool of worker processes that run tool calls with a timeout, a memory cap and an output cap.

    Calls from one thread at a time; concurrent callers are served one batch after another
    (`call_many` is how calls run in parallel).
    """

    def __init__(
        self,
        num_workers: int | None = None,
        timeout: float = 10.0,
        memory_limit_bytes: int = 2 << 30,
        max_output_chars: int = 8192,
    ) -> None:
        if num_workers is None:
            num_workers = min(len(os.sched_getaffinity(0)), 16)
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout}")
        if memory_limit_bytes < 0:
            raise ValueError(f"memory_limit_bytes must be >= 0 (0 means no cap), got {memory_limit_bytes}")
        if max_output_chars < 1:
            raise ValueError(f"max_output_chars must be at least 1, got {max_output_chars}")
        self.timeout = float(timeout)
        self.memory_limit_bytes = int(memory_limit_bytes)
        self.max_output_chars = int(max_output_chars)
        self._workdir = tempfile.mkdtemp(prefix="ftrl_sandbox_")
        self._env = _worker_environment(self._workdir)
        self._argv = [
            sys.executable, "-s", os.path.abspath(__file__), "--worker",
            str(self.memory_limit_bytes), str(self.max_output_chars), str(os.getpid()),
        ]  # fmt: skip
        self._lock = threading.Lock()
        self._stats: collections.Counter[str] = collections.Counter()
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._workdir)
        self._workers.extend(self._spawn() for _ in range(num_workers))
        # Per worker slot, a mirror of the worker's compile cache: which tools need no source sent.
        self._compiled = [_Lru(_COMPILE_CACHE_SIZE) for _ in range(num_workers)]
        self._source_keys = _Lru(_COMPILE_CACHE_SIZE)  # id(source) -> (source, name, tool_key)

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    @property
    def stats(self) -> dict[str, int]:
        """Counters: calls, errors, timeouts, crashes, worker_restarts, cache_hits."""
        return dict(self._stats)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _spawn(self) -> _Worker:
        return _Worker(self._argv, self._workdir, self._env)

    def _replace(self, slot: int) -> _Worker:
        self._workers[slot].kill()
        self._workers[slot] = self._spawn()
        self._compiled[slot] = _Lru(_COMPILE_CACHE_SIZE)
        self._stats["worker_restarts"] += 1
        return self._workers[slot]

    def call(self, codes: Mapping[str, str], name: str, arguments: Any) -> str:
        """Runs one tool call and returns its output (or FTRL's error message)."""
        return self.call_many([ToolRequest(codes, name, arguments)])[0]

    def call_many(self, requests: Sequence[ToolRequest], *, timeout: float | None = None) -> list[str]:
        """Runs calls concurrently on the pool; outputs come back in the order of `requests`.

        `timeout` overrides the sandbox's per-call timeout for this batch.
        """
        timeout = self.timeout if timeout is None else float(timeout)
        with self._lock:
            if self.closed:
                raise RuntimeError("this Sandbox is closed; create a new one (or use shared_sandbox())")
            outputs: list[str | None] = [None] * len(requests)
            # One queue per worker slot: calls of a tool go to the same worker ("home"), which then
            # has it compiled already; idle workers steal from the longest queue.
            queues: list[collections.deque[_Job]] = [collections.deque() for _ in self._workers]
            for index, request in enumerate(requests):
                job = self._encode(index, request)
                if isinstance(job, _Job):
                    queues[int(job.key[:8], 16) % len(queues)].append(job)
                else:
                    outputs[index] = job
            self._run(queues, outputs, timeout)
            self._stats["calls"] += len(requests)
            self._stats["errors"] += sum(is_error_output(output) for output in outputs)
            return outputs  # type: ignore[return-value]  # every slot is filled

    def _key(self, name: str, source: str) -> str:
        # Memoised by the source string's identity: strings are immutable, so a hit is exact.
        memo = self._source_keys.get(id(source))
        if memo is None or memo[0] is not source or memo[1] != name:
            memo = (source, name, tool_key(name, source))
            self._source_keys.put(id(source), memo)
        return memo[2]

    def _encode(self, index: int, request: ToolRequest) -> _Job | str:
        """The job for a worker, or the error message if the call cannot be made."""
        name, codes = request.name, request.codes
        if not isinstance(codes, Mapping):
            raise TypeError(f"ToolRequest.codes must map tool names to source, got {type(codes).__name__}")
        if not isinstance(name, str) or name not in codes:
            available = ", ".join(sorted(codes)) or "none"
            return error_message(str(name), f"no tool named {name!r}; available tools: {available}")
        arguments, problem = _arguments_dict(request.arguments)
        if arguments is None:
            return error_message(name, problem)
        source = codes[name]
        if not isinstance(source, str):
            return error_message(name, f"its code is not a source string (got {type(source).__name__})")
        key = self._key(name, source)
        try:
            head = f'{{"key": "{key}", "name": {json.dumps(name)}, "arguments": {json.dumps(arguments)}'
        except (TypeError, ValueError) as exc:
            return error_message(name, f"arguments are not JSON-serializable ({exc})")
        return _Job(index, name, key, source, head)

    def _run(self, queues: list[collections.deque[_Job]], outputs: list[str | None], timeout: float) -> None:
        """Feeds jobs to idle workers and collects replies until every job has an output."""
        idle = collections.deque(range(len(self._workers)))  # worker slots
        busy: dict[int, _Pending] = {}  # fd -> call in flight
        selector = selectors.DefaultSelector()

        def finish(pending: _Pending, output: str, replace: bool) -> None:
            selector.unregister(pending.worker.fd)
            del busy[pending.worker.fd]
            outputs[pending.job.index] = output
            if replace:
                self._replace(pending.slot)
            idle.append(pending.slot)

        try:
            while busy or any(queues):
                while idle and any(queues):
                    slot = idle.popleft()
                    queue = queues[slot] or max(queues, key=len)
                    self._dispatch(slot, queue.popleft(), busy, selector, idle, outputs, timeout)
                if not busy:
                    continue
                wait = max(0.0, min(p.deadline for p in busy.values()) - time.monotonic())
                for key, _ in selector.select(wait):
                    self._collect(busy[key.fd], finish, timeout)
                now = time.monotonic()
                for pending in [p for p in busy.values() if p.deadline <= now]:
                    self._stats["timeouts"] += 1
                    finish(pending, error_message(pending.job.name, f"the call timed out after {timeout:g} s"), True)
        finally:
            for pending in list(busy.values()):  # interrupted (e.g. KeyboardInterrupt): no half-used workers
                self._replace(pending.slot)
            selector.close()

    def _dispatch(self, slot: int, job: _Job, busy, selector, idle, outputs, timeout: float) -> None:
        worker = self._workers[slot]
        try:
            self._send(slot, job)
        except OSError:
            # The worker died while idle; a fresh one takes the call.
            worker = self._replace(slot)
            try:
                self._send(slot, job)
            except OSError as exc:
                outputs[job.index] = error_message(job.name, f"could not start a tool process ({exc})")
                idle.append(slot)
                return
        grace = 0.0 if worker.ready else _STARTUP_GRACE_S
        busy[worker.fd] = _Pending(slot, worker, job, time.monotonic() + timeout + grace)
        selector.register(worker.fd, selectors.EVENT_READ)

    def _send(self, slot: int, job: _Job, force_source: bool = False) -> None:
        compiled = self._compiled[slot]
        with_source = force_source or compiled.get(job.entry) is None
        self._workers[slot].send(job.line(with_source))
        if with_source:
            compiled.put(job.entry, True)

    def _collect(self, pending: _Pending, finish, timeout: float) -> None:
        worker, name = pending.worker, pending.job.name
        lines = worker.read_lines()
        if lines is None:
            try:
                returncode = worker.proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                returncode = None
            self._stats["crashes"] += 1
            finish(pending, error_message(name, _describe_exit(returncode)), True)
            return
        for position, line in enumerate(lines):
            try:
                reply = json.loads(line)
                if reply.get("ready"):
                    worker.ready = True
                    pending.deadline = time.monotonic() + timeout
                    continue
                if reply.get("missing"):  # the worker had not compiled it after all (a compile error)
                    self._send(pending.slot, pending.job, force_source=True)
                    continue
                output = reply["output"]
                if not isinstance(output, str):
                    raise TypeError("output is not a string")
            except (ValueError, TypeError, KeyError, AttributeError, OSError):
                # Tool code wrote onto the protocol pipe; the worker can no longer be trusted.
                self._stats["crashes"] += 1
                finish(pending, error_message(name, "the tool's process broke its reply channel"), True)
                return
            self._stats["cache_hits"] += bool(reply.get("cache_hit"))
            # Bytes after the reply were not written by the worker loop: retire the worker.
            stray = position < len(lines) - 1 or bool(worker.buffer)
            finish(pending, output, bool(reply.get("recycle")) or stray)
            return

    def close(self) -> None:
        """Kills the workers and removes their working directory; idempotent."""
        with self._lock:
            self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


_shared: Sandbox | None = None
_shared_lock = threading.Lock()


def shared_sandbox() -> Sandbox:
    """The process-wide default pool, created on first use with default settings, closed at exit."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.closed:
            _shared = Sandbox()  # its finalizer kills the workers at interpreter exit
        return _shared


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _serve(memory_limit_bytes=int(sys.argv[2]), max_chars=int(sys.argv[3]), parent_pid=int(sys.argv[4]))
