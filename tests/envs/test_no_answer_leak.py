"""A wrong call never counts as solved in the environments we build.

FTRL's reward reads tool outputs: an expected answer is solved when it occurs in an output of its
tool (`rewards.match_outputs`). A tool that echoes its arguments ("No record found for
city_name='Velm'") therefore rewards a wrong call whose argument is the answer. Here every tool of
every environment `build_environments` makes (four scenario kinds, three complexity levels, the
default world and a small one) is called with each expected answer in each of its arguments; no
output may contain an expected answer unless the call is the oracle's own.

Calls run in-process for speed, formatted exactly as the sandbox formats results and exceptions;
a sample is replayed through the real sandbox to show both agree.
"""

import itertools

import pytest

from ftrl_jax.envs import rewards
from ftrl_jax.envs import sandbox as sandbox_lib
from ftrl_jax.envs.build import build_environments
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.envs.stages import SCENARIO_KINDS, Environment
from ftrl_jax.envs.world import WorldSpec

WORLDS = {"full": None, "small": WorldSpec.parse("pool=8,relations=12,fixed_names=1")}
LEVELS = ("low", "medium", "high")
PER_LEVEL = 24  # environments per world and level: 6 of each scenario kind
SANDBOX_STRIDE = 40  # every 40th in-process call is replayed through the sandbox


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(num_workers=2, timeout=5.0) as box:
        yield box


@pytest.fixture(scope="module")
def environments(sandbox) -> dict[tuple[str, str], list[Environment]]:
    built = {}
    for (world_name, spec), level in itertools.product(WORLDS.items(), LEVELS):
        envs, report = build_environments(PER_LEVEL, seed=0, kinds=tuple(SCENARIO_KINDS), complexity=level,
                                          sandbox=sandbox, world=spec)
        # Kept environments passed validation: their oracle plan reproduces every expected answer.
        assert len(envs) == PER_LEVEL, report.summary()
        assert {env.scenario.kind for env in envs} == set(SCENARIO_KINDS)
        built[(world_name, level)] = envs
    return built


def _normal(value) -> str:
    return str(value).strip().lower()


class _Tools:
    """An environment's tools executed in-process; outputs as the sandbox would return them."""

    def __init__(self, codes):
        self.namespace = {}
        for source in codes.values():
            exec(compile(source, "<tool>", "exec"), self.namespace)  # our own generated code

    def __call__(self, name, arguments) -> str:
        try:
            return sandbox_lib.format_result(self.namespace[name](**arguments))
        except Exception as exc:  # the sandbox's error path, quoting the exception's text
            return sandbox_lib.error_message(name, f"{type(exc).__name__}: {exc}")


def _answers(env: Environment) -> list[str]:
    return list(dict.fromkeys(a for answers in env.unsolved_set().values() for a in answers))


def _values(answer: str) -> list:
    """An answer as a model could pass it: the text, and a number when it reads as one ('12,345')."""
    values = [answer]
    digits = answer.replace(",", "")
    if digits.isdigit():
        values.append(int(digits))
    return values


def _placements(schema: dict, value) -> list:
    """`value` as a parameter of `schema`, and inside it where it holds lists or objects."""
    placed = [value]
    if schema.get("type") == "array":
        placed.append([value])
    placed += [{key: value} for key in schema.get("properties", {})]
    return placed


def _is_oracle(oracle: list[dict], properties: dict, name: str, arguments: dict) -> bool:
    """The call is one of the oracle plan's: its arguments, as the tools compare them (ignoring case
    and surrounding spaces), and maybe optional settings (they do not make a correct call wrong)."""
    return set(arguments) <= set(properties) and any(
        call["name"] == name and all(k in arguments and _normal(arguments[k]) == _normal(v)
                                     for k, v in call["arguments"].items())
        for call in oracle)


def _distinct(dicts) -> list[dict]:
    return list({tuple(sorted(d.items())): dict(d) for d in dicts}.values())


def _wrong_calls(env: Environment):
    """(tool name, arguments) of calls putting an expected answer into one argument (as text, as a
    number where it reads as one, inside a list or object parameter) or using it as an argument
    name; oracle calls are left out.

    The other arguments are none, or those of a call the tool has a record for: for a required
    parameter, every combination of the other required ones with every answer; for an optional
    one, every record (so every fact a tool holds is seen), the answers taking turns.
    """
    oracle = [call for turn in env.oracle_calls() for call in turn]
    answers = _answers(env)
    for tool in env.tools:
        properties, required = tool.parameters["properties"], tool.parameters["required"]
        records = _distinct(c.arguments for c in tool.cases)
        trials = []
        for param, schema in properties.items():
            if param in required:
                others = _distinct({k: v for k, v in r.items() if k != param} for r in records)
                pairs = itertools.product([{}] + others, answers)
            else:
                pairs = [({}, a) for a in answers] + [(r, answers[i % len(answers)]) for i, r in enumerate(records)]
            trials += [{**base, param: placed} for base, answer in pairs
                       for value in _values(answer) for placed in _placements(schema, value)]
        trials += [{**base, answer: "x"} for base, answer in itertools.product([{}] + records[:1], answers)]
        for arguments in trials:
            if not _is_oracle(oracle, properties, tool.name, arguments):
                yield tool.name, arguments


def _leaks(env: Environment, calls) -> list[tuple[str, dict, str, list[str]]]:
    """Of (tool name, arguments, output) calls, those whose output scores under FTRL's reward or
    contains any expected answer (each distinct output is matched once)."""
    unsolved = env.unsolved_set()
    answers = _answers(env)
    verdicts: dict[tuple[str, str], list[str] | None] = {}
    found = []
    for name, arguments, output in calls:
        if (name, output) not in verdicts:
            solved, _ = rewards.match_outputs([(name, output)], unsolved)
            matched = [a for a in answers if rewards.answer_matches(output, a)]
            verdicts[(name, output)] = (matched or ["(scored)"]) if solved or matched else None
        if verdicts[(name, output)]:
            found.append((name, arguments, output, verdicts[(name, output)]))
    return found


_OUTPUTS: dict[int, list[tuple[str, dict, str]]] = {}


def _wrong_call_outputs(env: Environment) -> list[tuple[str, dict, str]]:
    """(tool name, arguments, output) of every wrong call of `env`, run in-process (cached)."""
    if id(env) not in _OUTPUTS:
        run = _Tools(env.codes)
        _OUTPUTS[id(env)] = [(name, arguments, run(name, arguments)) for name, arguments in _wrong_calls(env)]
    return _OUTPUTS[id(env)]


@pytest.mark.parametrize("world", list(WORLDS))
@pytest.mark.parametrize("level", LEVELS)
def test_no_wrong_call_outputs_an_expected_answer(environments, world, level):
    calls, leaks = 0, []
    for env in environments[(world, level)]:
        outputs = _wrong_call_outputs(env)
        calls += len(outputs)
        leaks += [(env.question, *leak) for leak in _leaks(env, outputs)]
    assert calls > 8 * PER_LEVEL
    assert not leaks, f"{len(leaks)} wrong calls output an expected answer, e.g. {leaks[:3]}"


def test_the_sandbox_returns_the_same_outputs(environments, sandbox):
    """The in-process outputs above are the sandbox's own, error path included."""
    sampled = []
    for envs in environments.values():
        for env in envs:
            sampled += [(env, *call) for call in _wrong_call_outputs(env)]
    sampled = sampled[::SANDBOX_STRIDE]
    assert len(sampled) > 500
    requests = [sandbox_lib.ToolRequest(env.codes, name, arguments) for env, name, arguments, _ in sampled]
    outputs = sandbox.call_many(requests)
    for (env, name, arguments, expected), output in zip(sampled, outputs):
        assert output == expected, (name, arguments)
        assert not _leaks(env, [(name, arguments, output)])


def test_the_check_catches_a_tool_that_echoes_its_arguments(environments):
    """The test can fail: a tool echoing its input, as they did before, leaks in every environment."""
    leaking = 0
    envs = [env for level in LEVELS for env in environments[("full", level)][:8]]
    for env in envs:
        codes = dict(env.codes)
        name = env.oracle_calls()[0][0]["name"]
        codes[name] += (f"\n_original = {name}\n\ndef {name}(**arguments):\n"
                        f"    result = _original(**arguments)\n"
                        f"    if isinstance(result, dict) and 'error' in result:\n"
                        f"        result['error'] += f' (got {{arguments!r}})'\n"
                        f"    return result\n")
        echoing = Environment(env.scenario, env.tools, codes)
        run = _Tools(codes)
        outputs = [(n, a, run(n, a)) for n, a in _wrong_calls(echoing) if n == name]
        leaking += bool(_leaks(echoing, outputs))
    assert leaking == len(envs)


MARKER = "Zorvenquill"
# JSON values of every type, the marker in strings, lists, keys and nested objects.
JSON_VALUES = (None, True, False, 0, -7, 1.5, float("inf"), 10**30, MARKER, "", " ", [], [MARKER], [1, MARKER],
               {}, {MARKER: MARKER}, {"start": MARKER, "end": 3}, {"region": [MARKER], "verified_only": MARKER},
               {"region": MARKER, "verified_only": True}, [[MARKER]], {"nested": {MARKER: [MARKER]}})


@pytest.mark.parametrize("world", list(WORLDS))
def test_tools_raise_nothing_and_echo_nothing_on_any_json_argument(environments, world):
    """Whatever JSON a model passes, the tool answers without an exception (whose text the sandbox
    would show) and without repeating it."""
    for env in environments[(world, "high")] + environments[(world, "low")][:6]:
        namespace = _Tools(env.codes).namespace
        for tool in env.tools:
            function = namespace[tool.name]
            base = dict(tool.cases[0].arguments) if tool.cases else {}
            for param, value in itertools.product(tool.parameters["properties"], JSON_VALUES):
                result = function(**{**base, param: value})  # raises nothing
                output = sandbox_lib.format_result(result)
                assert MARKER.lower() not in output.lower(), (tool.name, param, value, output)
