"""FTRL's step reward, rule for rule: how bytedance/FTRL parses, executes and scores one generated turn.

`rewards.step_reward(..., semantics="ftrl")` (the default) is built from the pieces here. Every rule below was
read from FTRL's code (github.com/bytedance/FTRL, `Code/`): `tool.py` is `verl/utils/reward_score/tool.py`
(the four `compute_solve_*` functions, identical but for the last line), `parse_output.py` is
`utils/parse_output.py` (`parse_qwen`), `utils.py` is `utils/utils.py` (`answer_verify`, `call_function`,
`get_feedback`), and `func_timeout` is the PyPI package `call_function` is decorated with. Tests:
`tests/envs/test_ftrl_reward.py`, one or more hand-computed cases per rule id.

| id | rule | FTRL source |
|----|------|-------------|
| R1 | The response is stripped, a trailing `<|endoftext|>` removed, stripped again, a trailing `<|im_end|>` removed, stripped again, in that order (so `x<|endoftext|><|im_end|>` keeps its `<|endoftext|>`). | tool.py `compute_solve_*` |
| P1 | No `<tool_call>` anywhere: no calls, and the content is the whole cleaned text. | parse_output.py `parse_qwen` |
| P2 | Otherwise the text from the FIRST `<tool_call>` on is split on `</tool_call>`; the text before it is never parsed. | `parse_qwen` |
| P3 | A piece counts only if, stripped, it starts with `<tool_call>`: a call that follows text after an earlier call (`...</tool_call> text <tool_call>...`) is dropped, so is trailing text; blank pieces are skipped. | `parse_qwen` |
| P4 | The last piece needs no closing tag: an unclosed final call is a call. | `parse_qwen` (`str.split`) |
| P5 | The opening tag is removed with `str.lstrip("<tool_call>")`, which strips a leading run of those CHARACTERS: `<tool_call><tool_call>{...}` is a call. | `parse_qwen` |
| P6 | The rest must be one JSON value (`json.loads`: strict JSON, whitespace around it allowed, nothing after it); a JSON value that is not an object is dropped. | `parse_qwen` (errors caught, printed) |
| P7 | `name` must be truthy (missing, `""`, `null`, `0`, `false`, `[]` drop the call); it is neither stripped nor required to be a string. | `parse_qwen` |
| P8 | The `arguments` key is required (`parameters` does not count); a dict is used as is, a string is JSON-decoded (failure drops the call; any JSON value is kept, even a list), any other value drops the call. | `parse_qwen` |
| P9 | If no piece gave a call, the content is the whole cleaned text, markup included (what the no-call rules S2-S6 read). | `parse_qwen` |
| E1 | Calls run one by one in order. A name that is not a key of `codes` gives `an error occured when call NAME: 'NAME'` (the KeyError's text); an unhashable name gives `...: unhashable type: 'list'`. | utils.py `get_feedback` |
| E2 | The tool's source is `exec`ed inside `call_function`: its top-level names land in that call's locals, so function bodies see only `utils.utils`'s globals (`json`, `sha256`, `sleep`, `deepcopy`, ...) and builtins. A top-level `import re` or helper function is invisible inside the tool (NameError); `__name__` is `"utils.utils"`, so a main-guard block does not run, but other top-level code (example calls) runs on every call. | utils.py `call_function` |
| E3 | The function is `eval(name)` in that scope (a tool named like one of `call_function`'s own variables, e.g. `predict`, is shadowed), called with `**arguments` (a non-object gives `utils.utils.NAME() argument after ** must be a mapping, not list`). | `call_function` |
| E4 | A result whose type is exactly `dict` or `list` becomes `json.dumps(result, ensure_ascii=False)` (not serializable: error text, E5); any other non-`str` becomes `str(result)` (an `OrderedDict` or a tuple too); a `str` is kept. | `call_function` |
| E5 | An exception gives `an error occured when call NAME: ` + `str(exception)`: no exception type name, so `KeyError('Paris')` gives `...: 'Paris'`. | `get_feedback` |
| E6 | A call still running after 10 s gives `an error occured when call NAME: Function call_function (args=(NAME, ARGUMENTS, SOURCE)) (kwargs={}) timed out after 10.000000 seconds.` + newline: the reprs of the name, the arguments and the tool's whole source. | `get_feedback`, func_timeout `FunctionTimedOut.getMsg` |
| E7 | A `BaseException` that is not an `Exception` (`SystemExit`, ...) ends func_timeout's worker thread silently: the output is `None`, which M2 reads as `"None"`. | func_timeout `func_timeout` |
| M1 | Each call's output can solve one answer listed under the call's name (`unsolved_set.get(name, [])`): the first in list order that M2 accepts, which is then removed, so each answer is solved once per turn. | tool.py `compute_solve_*` |
| M2 | `answer_verify(output, expected)`: `expected` is split on `", "`; each part and the output (dict/list as JSON, other non-str via `str`) are lower-cased, stripped of commas, then stripped of whitespace; every part must be a substring. An empty part always is, so an expected `""` matches every output. | utils.py `answer_verify` |
| S1 | At least one call: with n calls and t answers solved, `f1` = 2t/(n+1), `precision` = t/n, `rate` = t, `pr` = t*t/n. | `compute_solve_f1` / `_precision` / `_rate` / `_pr` |
| S2 | No call and empty content: -0.5. | `compute_solve_*` |
| S3 | Else content containing `<tool_call>`, `</tool_call>` or `<tool_parsed_response>`: -0.3. | `compute_solve_*` |
| S4 | Else the final answer, lower-cased, without commas, stripped, is ONE substring of the content treated alike (parts are not reordered; an answer of `""` matches any content; no answer field skips this rule): 1/(1+k), k = answers in the unsolved_set when the turn began. | `compute_solve_*` |
| S5 | Else `solve_rate == 1`: 0.5. | `compute_solve_*` |
| S6 | Else 0. | `compute_solve_*` |
| S7 | Nothing knows `<think>`: a call drafted in a think block is parsed and run, an answer stated there counts. | `parse_qwen`, `compute_solve_*` |

Not reproduced, on purpose (the tests pin what happens instead):
- Execution stays in `Sandbox` worker processes (a memory cap, no state carried between calls); a worker crash,
  which would take FTRL's trainer down, comes back in the sandbox's own wording (`sandbox.error_message`). A
  `MemoryError` (the sandbox recycles the worker) gives `an error occured when call NAME: ` with no detail.
- Tool outputs longer than the sandbox's `max_output_chars` (8192 by default) are cut; FTRL's are not.
- E2 provides the names of `utils.utils` a tool could plausibly use without importing them (`json`, `sha256`,
  `sleep`, `deepcopy`), not `requests`, the transformers classes, func_timeout's names or utils' own functions.
  Error texts come from this interpreter's Python version, FTRL's from its own.
- An unhashable name (a list or object as `name`) makes FTRL's `compute_solve_*` raise (`unsolved_set.get`
  outside any `try`); here such a call gets E1's error text and solves nothing.
- FTRL raises NotImplementedError for `split == "test"`; the split is not looked at here.
- Truncated turns (cut at `max_new_tokens`): FTRL scores them like any other response. This project does not
  run their calls (see `rewards.step_rewards`): the rules S2-S6 score them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ftrl_jax.envs.sandbox import ERROR_PREFIX, Sandbox, ToolRequest

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
MARKUP = (OPEN_TAG, CLOSE_TAG, "<tool_parsed_response>")  # S3: any of these in the content costs -0.3
FTRL_TIMEOUT_S = 10.0  # call_function's @func_set_timeout(10)


# ---------------------------------------------------------------------------------------------
# R1, P1-P9: the response as FTRL's reward sees it.


def clean_response(text: str) -> str:
    """R1: the response with FTRL's end-of-turn suffixes removed (`<|endoftext|>` first, then `<|im_end|>`)."""
    text = text.strip().removesuffix("<|endoftext|>").strip()
    return text.removesuffix("<|im_end|>").strip()


@dataclasses.dataclass(frozen=True)
class Call:
    """One call as parse_qwen accepts it: `name` is any truthy JSON value, `arguments` any JSON value (P7, P8)."""

    name: Any
    arguments: Any


@dataclasses.dataclass(frozen=True)
class Turn:
    """A parsed response: its calls, and the content the no-call rules read (P9)."""

    calls: list[Call]
    content: str


def _piece_call(piece: str) -> Call | None:
    """P3, P5-P8: the call one `</tool_call>`-separated piece holds, or None."""
    piece = piece.strip()
    if not piece.startswith(OPEN_TAG):
        return None  # P3
    body = piece.lstrip(OPEN_TAG).strip()  # P5: a CHARACTER SET, as in FTRL
    try:
        value = json.loads(body)  # P6
    except (ValueError, RecursionError):  # FTRL catches every Exception here
        return None
    if not isinstance(value, dict) or not value.get("name"):  # P6, P7
        return None
    if "arguments" not in value:  # P8
        return None
    arguments = value["arguments"]
    if type(arguments) is not dict:
        if not isinstance(arguments, str):
            return None  # json.loads of a list, number, bool or None raises TypeError there
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return None
    return Call(value["name"], arguments)


def parse_turn(response: str) -> Turn:
    """R1 and P1-P9: FTRL's reading of a generated turn (its calls, or the content when there are none)."""
    text = clean_response(response)
    start = text.find(OPEN_TAG)
    if start == -1:
        return Turn([], text)  # P1
    pieces = text[start:].split(CLOSE_TAG)  # P2, P4
    calls = [call for call in map(_piece_call, pieces) if call is not None]
    return Turn(calls, text)  # P9: the content only matters when there is no call


def has_markup(content: str) -> bool:
    """S3."""
    return any(tag in content for tag in MARKUP)


# ---------------------------------------------------------------------------------------------
# M2, S4: matching.


def _normalise(text: str) -> str:
    return text.lower().replace(",", "").strip()


def _output_text(output: Any) -> str:
    if type(output) is dict or type(output) is list:
        return json.dumps(output, ensure_ascii=False)
    return output if type(output) is str else str(output)


def answer_verify(output: Any, expected: str) -> bool:
    """M2: every `", "`-separated part of `expected` is a substring of the output (case, commas, outer blanks
    ignored); an empty part, and so an empty `expected`, matches anything."""
    text = _normalise(_output_text(output))
    return all(_normalise(part) in text for part in expected.split(", "))


def final_answer_in(content: str, answer: str | None) -> bool:
    """S4: the whole answer (case, commas, outer blanks ignored) is a substring of the content."""
    return answer is not None and _normalise(answer) in _normalise(content)


# ---------------------------------------------------------------------------------------------
# E1-E7: what call_function / get_feedback give back, computed by running the tool in the sandbox.

# The sandbox runs this tool, which runs the model's call the way FTRL's call_function does. It marks what
# it returns, so the sandbox's own failures (timeouts, crashes) are told apart from the call's output.
RUNNER_NAME = "ftrl_call_function"
OUTPUT_MARK = "\x00ftrl-output\x00"
NONE_MARK = "\x00ftrl-none\x00"
RUNNER_SOURCE = f'''
def {RUNNER_NAME}(name, arguments, code):
    import builtins, copy, hashlib, json, time

    # E2: utils.utils's module globals (the names a tool could use without importing them).
    module_globals = {{"__name__": "utils.utils", "__builtins__": builtins, "json": json,
                      "sha256": hashlib.sha256, "sleep": time.sleep, "deepcopy": copy.deepcopy}}
    # call_function's locals() dict, which exec fills with the tool's top-level names.
    frame_locals = {{"name": name, "arguments": arguments, "code": code, "kwargs": {{}}}}
    no_kwargs = {{}}
    try:
        try:
            exec(code, module_globals, frame_locals)
            # E3: eval(name) reads locals() again, which rewrites call_function's own variables into the
            # dict and drops `predict` (not yet assigned).
            frame_locals.update(name=name, arguments=arguments, code=code, kwargs={{}})
            frame_locals.pop("predict", None)
            predict = eval(name, module_globals, frame_locals)(**arguments, **no_kwargs)
            if type(predict) == dict or type(predict) == list:  # E4
                predict = json.dumps(predict, ensure_ascii=False)
            elif type(predict) != str:
                predict = str(predict)
            return {OUTPUT_MARK!r} + predict
        except MemoryError:
            raise  # the sandbox answers and replaces the worker
        except Exception as exc:  # E5
            try:
                detail = str(exc)
            except Exception:
                detail = ""
            return {OUTPUT_MARK!r} + "{ERROR_PREFIX} " + f"{{name}}: {{detail}}"
    except MemoryError:
        raise
    except BaseException:  # E7
        return {NONE_MARK!r}
'''
_RUNNER_CODES = {RUNNER_NAME: RUNNER_SOURCE}
_SANDBOX_FAILURE = f"{ERROR_PREFIX} {RUNNER_NAME}: "


def error_text(name: Any, detail: Any) -> str:
    """E5: get_feedback's message for a failed call."""
    return f"{ERROR_PREFIX} {name}: {detail}"


def timeout_text(name: Any, arguments: Any, code: Any, timeout: float = FTRL_TIMEOUT_S) -> str:
    """E6: func_timeout's message for call_function(name, arguments, code), wrapped by get_feedback."""
    return error_text(name, f"Function call_function (args={(name, arguments, code)!r}) (kwargs={{}}) "
                            f"timed out after {timeout:f} seconds.\n")


def _lookup_failure(name: Any, codes: Mapping[str, Any]) -> str | None:
    """E1: get_feedback's `codes[tool_name]`, which fails for unknown and unhashable names."""
    try:
        codes[name]
    except (KeyError, TypeError) as exc:
        return error_text(name, exc)
    return None


def _feedback(output: str, call: Call, code: Any, timeout: float) -> str | None:
    """The FTRL output of one call from what the sandbox returned for the runner."""
    if output.startswith(OUTPUT_MARK):
        return output[len(OUTPUT_MARK):]
    if output == NONE_MARK:
        return None
    detail = output[len(_SANDBOX_FAILURE):] if output.startswith(_SANDBOX_FAILURE) else output
    if detail.startswith("the call timed out after"):
        return timeout_text(call.name, call.arguments, code, timeout)
    if detail.startswith("MemoryError"):
        return error_text(call.name, "")
    return error_text(call.name, detail)


def run_calls(batches: Sequence[tuple[Sequence[Call], Mapping[str, Any]]], sandbox: Sandbox,
              timeout: float = FTRL_TIMEOUT_S) -> list[list[str | None]]:
    """E1-E7 for many turns at once: per (calls, codes), the outputs get_feedback would give, in call order.

    Every call that reaches a tool runs in `sandbox` in one `call_many` batch, with `timeout` seconds each.
    """
    outputs: list[list[str | None]] = []
    requests: list[ToolRequest] = []
    pending: list[tuple[int, int, Call, Any]] = []  # (turn, call position, call, code) of each request
    for turn_index, (calls, codes) in enumerate(batches):
        outputs.append([None] * len(calls))
        for position, call in enumerate(calls):
            failure = _lookup_failure(call.name, codes)
            if failure is not None:
                outputs[turn_index][position] = failure
                continue
            code = codes[call.name]
            requests.append(ToolRequest(_RUNNER_CODES, RUNNER_NAME,
                                        {"name": call.name, "arguments": call.arguments, "code": code}))
            pending.append((turn_index, position, call, code))
    if requests:
        for (turn_index, position, call, code), output in zip(pending, sandbox.call_many(requests, timeout=timeout)):
            outputs[turn_index][position] = _feedback(output, call, code, timeout)
    return outputs
