"""The five stages of FTRL environment construction: data types between them and the Author protocol.

    decompose        kind           -> Scenario          (question, sub-questions, dependency graph)
    write_documents  Scenario       -> [ToolDocument]    (one document per sub-question)
    integrate        [ToolDocument] -> [ToolDocument]    (overlapping documents merged)
    scale            [ToolDocument] -> [ToolDocument]    (four complexity strategies, distractors)
    deploy           [ToolDocument] -> {name: source}    (local Python code for every tool)

`construct` runs them in order and checks the invariants after every stage, so an author
(procedural or LLM) that breaks one fails loudly with the stage's name.
"""

from __future__ import annotations

import ast
import dataclasses
import random
import re
import sys
from typing import Any, Mapping, Protocol, Sequence

from ftrl_jax.envs import samples as samples_lib

# Scenario kind -> FTRL `data_source` value.
SCENARIO_KINDS: dict[str, str] = {
    "single_hop": "self/single_hop",
    "parallel_single_hop": "self/parallel_single_hop",
    "multi_hop": "self/multi_hop",
    "parallel_multi_hop": "self/parallel_multi_hop",
}

ANSWER_SEPARATOR = ", "  # parallel answers are joined with it; the FTRL match rule splits on it
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class StageError(ValueError):
    """A stage produced output that breaks the pipeline's invariants."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"stage {stage!r}: {message}")
        self.stage = stage
        self.message = message


# --- data types ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SubQuestion:
    """One step of a scenario.

    subject: the input value a tool needs; it appears in the question, or (for a dependent
    step) it is the answer of the step it depends on. relation: what is asked (a world relation
    key for the procedural author, a short topic for the LLM author).
    """

    id: str
    question: str
    answer: str
    subject: str
    depends_on: tuple[str, ...] = ()
    relation: str = ""


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A question decomposed into sub-questions with a dependency graph (stage 1 output)."""

    kind: str
    question: str
    sub_questions: tuple[SubQuestion, ...]

    @property
    def final_ids(self) -> list[str]:
        """Sub-questions nothing depends on: the ends of the chains, in order."""
        used = {d for sq in self.sub_questions for d in sq.depends_on}
        return [sq.id for sq in self.sub_questions if sq.id not in used]

    @property
    def answer(self) -> str:
        """Last hop's answer; for parallel kinds the chain ends' answers joined with ', '."""
        by_id = {sq.id: sq for sq in self.sub_questions}
        return ANSWER_SEPARATOR.join(by_id[i].answer for i in self.final_ids)

    def depth(self) -> dict[str, int]:
        """Turn index of every sub-question: 0 without dependencies, else 1 + deepest dependency."""
        depth: dict[str, int] = {}
        for sq in self.sub_questions:  # dependencies always come earlier (check_scenario)
            depth[sq.id] = 1 + max((depth[d] for d in sq.depends_on), default=-1)
        return depth


@dataclasses.dataclass(frozen=True)
class Case:
    """A call a tool must answer: `arguments` -> output containing `answer` under `field`.

    sub_question names the scenario step this call answers (None: extra coverage or distractor).
    """

    arguments: Mapping[str, Any]
    answer: str
    field: str = "result"
    sub_question: str | None = None


@dataclasses.dataclass(frozen=True)
class ToolDocument:
    """A tool's document (name, description, JSON-schema parameters) and the calls it must answer."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    cases: tuple[Case, ...] = ()

    def schema(self) -> dict[str, Any]:
        """The FTRL / OpenAI tool entry: {"type": "function", "function": {...}}."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": dict(self.parameters)}}

    @property
    def answered(self) -> list[str]:
        """Ids of the sub-questions this tool answers."""
        return [c.sub_question for c in self.cases if c.sub_question is not None]


@dataclasses.dataclass(frozen=True)
class Complexity:
    """Complexity-scaling levels (0..3 each, stage 4) and scenario size.

    Level 0 everywhere gives short documents, one parameter per tool and no distractors;
    level 3 gives FTRL-like tools (long descriptions, 5+ typed parameters, ~10 tools).
    """

    functional_generalization: int = 0
    parameter_expansion: int = 0
    parameter_type_generalization: int = 0
    toolset_extension: int = 0
    max_hops: int = 2
    max_parallel: int = 2

    def __post_init__(self) -> None:
        for name in ("functional_generalization", "parameter_expansion",
                     "parameter_type_generalization", "toolset_extension"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= 3:
                raise ValueError(f"Complexity.{name} must be an integer in 0..3, got {value!r}")
        if self.max_hops < 2 or self.max_parallel < 2:
            raise ValueError(f"max_hops and max_parallel must be at least 2, got "
                             f"{self.max_hops} and {self.max_parallel}")

    @property
    def verbosity(self) -> int:
        """How rich documents are: the highest of the four strategy levels."""
        return max(self.functional_generalization, self.parameter_expansion,
                   self.parameter_type_generalization, self.toolset_extension)

    @classmethod
    def parse(cls, text: str) -> "Complexity":
        """'low' | 'medium' | 'high' | '0'..'3' | 'fg=1,pe=2,pt=1,te=3,hops=3,parallel=2'.

        A preset or level may be followed by overrides: 'low,te=2'.
        """
        values: dict[str, int] = {}
        for part in [p.strip() for p in text.split(",") if p.strip()]:
            if part in COMPLEXITY_PRESETS:
                values.update(dataclasses.asdict(COMPLEXITY_PRESETS[part]))
            elif part.isdigit():
                level = int(part)
                values.update({f: level for f in _STRATEGY_FIELDS})
                values.update(max_hops=2 + min(level, 2), max_parallel=2 + min(level, 1))
            elif "=" in part:
                key, _, raw = part.partition("=")
                field = _COMPLEXITY_KEYS.get(key.strip())
                if field is None:
                    raise ValueError(f"unknown complexity key {key.strip()!r} in {text!r}; use one of "
                                     f"{sorted(_COMPLEXITY_KEYS)}")
                try:
                    values[field] = int(raw)
                except ValueError:
                    raise ValueError(f"complexity {key.strip()}={raw!r} in {text!r}: "
                                     "the value must be an integer") from None
            else:
                raise ValueError(f"cannot read complexity part {part!r} in {text!r}; use a preset "
                                 f"{sorted(COMPLEXITY_PRESETS)}, a level 0..3 or key=value pairs")
        return cls(**values)


_STRATEGY_FIELDS = ("functional_generalization", "parameter_expansion",
                    "parameter_type_generalization", "toolset_extension")
_COMPLEXITY_KEYS = {
    "fg": "functional_generalization", "pe": "parameter_expansion",
    "pt": "parameter_type_generalization", "te": "toolset_extension",
    "hops": "max_hops", "parallel": "max_parallel",
    **{f: f for f in _STRATEGY_FIELDS}, "max_hops": "max_hops", "max_parallel": "max_parallel"}
COMPLEXITY_PRESETS: dict[str, Complexity] = {
    "low": Complexity(0, 0, 0, 0, max_hops=2, max_parallel=2),
    "medium": Complexity(1, 1, 1, 1, max_hops=3, max_parallel=3),
    "high": Complexity(3, 3, 3, 3, max_hops=4, max_parallel=3),
}


@dataclasses.dataclass(frozen=True)
class Environment:
    """A finished environment: scenario, tools with code, and the oracle plan."""

    scenario: Scenario
    tools: tuple[ToolDocument, ...]
    codes: Mapping[str, str]

    @property
    def question(self) -> str:
        return self.scenario.question

    @property
    def answer(self) -> str:
        return self.scenario.answer

    def oracle_plan(self) -> list[list[tuple[str, Case]]]:
        """Turns of (tool name, case); calls in one turn are independent of each other."""
        case_of = {c.sub_question: (t.name, c) for t in self.tools for c in t.cases
                   if c.sub_question is not None}
        depth = self.scenario.depth()
        turns: list[list[tuple[str, Case]]] = [[] for _ in range(max(depth.values()) + 1)]
        for sq in self.scenario.sub_questions:
            turns[depth[sq.id]].append(case_of[sq.id])
        return turns

    def oracle_calls(self) -> list[list[dict[str, Any]]]:
        """The oracle plan as FTRL-style calls: [[{"name": ..., "arguments": {...}}, ...], ...]."""
        return [[{"name": name, "arguments": dict(case.arguments)} for name, case in turn]
                for turn in self.oracle_plan()]

    def unsolved_set(self) -> dict[str, list[str]]:
        """Tool name -> expected answers of the sub-questions it answers (in sub-question order)."""
        answers: dict[str, list[str]] = {}
        for turn in self.oracle_plan():
            for name, case in turn:
                answers.setdefault(name, []).append(case.answer)
        return answers

    def to_sample(self, split: str = "train") -> samples_lib.Sample:
        """The environment in FTRL's sample format (fresh: solve_rate 0), with its oracle calls."""
        return samples_lib.Sample(
            messages=[{"role": "user", "content": samples_lib.user_prompt(self.question)}],
            tools=[t.schema() for t in self.tools], codes=dict(self.codes),
            unsolved_set=self.unsolved_set(), answer=self.answer, solve_rate=0.0,
            data_source=SCENARIO_KINDS[self.scenario.kind], split=split,
            oracle_calls=self.oracle_calls())

    def to_row(self, split: str = "train") -> dict[str, Any]:
        """The FTRL row: nested fields as JSON strings, as in ftrl_test.parquet."""
        return samples_lib.encode_sample(self.to_sample(split))


class Author(Protocol):
    """One method per stage; `construct` calls them in order."""

    def decompose(self, kind: str, complexity: Complexity, rng: random.Random) -> Scenario: ...

    def write_documents(self, scenario: Scenario, rng: random.Random) -> list[ToolDocument]: ...

    def integrate(self, scenario: Scenario, documents: Sequence[ToolDocument],
                  rng: random.Random) -> list[ToolDocument]: ...

    def scale(self, scenario: Scenario, tools: Sequence[ToolDocument], complexity: Complexity,
              rng: random.Random) -> list[ToolDocument]: ...

    def deploy(self, scenario: Scenario, tools: Sequence[ToolDocument],
               rng: random.Random) -> dict[str, str]: ...


# --- invariants checked between stages -----------------------------------------------

def _chain_lengths(scenario: Scenario) -> list[int]:
    depth = scenario.depth()
    return [depth[i] + 1 for i in scenario.final_ids]


def _shape_errors(kind: str, scenario: Scenario) -> list[str]:
    """What is wrong with the dependency graph for this scenario kind (empty if nothing)."""
    subs = scenario.sub_questions
    roots = [sq for sq in subs if not sq.depends_on]
    chains = _chain_lengths(scenario)
    single_parent = all(len(sq.depends_on) <= 1 for sq in subs)
    used = [d for sq in subs for d in sq.depends_on]
    linear = single_parent and len(used) == len(set(used))  # no step feeds two others
    rules = {
        "single_hop": (len(subs) == 1, "needs exactly 1 sub-question"),
        "multi_hop": (len(subs) >= 2 and len(roots) == 1 and linear and len(chains) == 1,
                      "needs one chain of 2+ sub-questions, each depending on the previous one"),
        "parallel_single_hop": (len(subs) >= 2 and len(roots) == len(subs),
                                "needs 2+ independent sub-questions (no depends_on)"),
        "parallel_multi_hop": (len(chains) >= 2 and linear and max(chains, default=0) >= 2,
                               "needs 2+ independent chains, at least one of 2+ hops"),
    }
    ok, message = rules[kind]
    return [] if ok else [f"{kind} {message}; got {len(subs)} sub-questions in chains of {chains}"]


def check_scenario(scenario: Scenario) -> list[str]:
    """Errors in a stage-1 scenario: kind, ids, dependency order, hop rule, answer leaks."""
    errors: list[str] = []
    if scenario.kind not in SCENARIO_KINDS:
        return [f"unknown scenario kind {scenario.kind!r}; use one of {sorted(SCENARIO_KINDS)}"]
    if not scenario.question.strip():
        errors.append("the question is empty")
    seen: dict[str, SubQuestion] = {}
    for sq in scenario.sub_questions:
        if not sq.id or sq.id in seen:
            errors.append(f"sub-question id {sq.id!r} is empty or repeated")
        if not sq.answer.strip() or not sq.subject.strip():
            errors.append(f"sub-question {sq.id!r} needs a non-empty answer and subject")
        if ANSWER_SEPARATOR in sq.answer:
            errors.append(f"sub-question {sq.id!r}: answer {sq.answer!r} must not contain ', ' "
                          "(it separates parallel answers)")
        for dep in sq.depends_on:
            if dep not in seen:
                errors.append(f"sub-question {sq.id!r} depends on {dep!r}, which is not an earlier id")
            elif seen[dep].answer != sq.subject:
                errors.append(f"sub-question {sq.id!r}: its subject {sq.subject!r} must be the answer "
                              f"{seen[dep].answer!r} of {dep!r} it depends on")
        if not sq.depends_on and sq.subject.lower() not in scenario.question.lower():
            errors.append(f"sub-question {sq.id!r}: subject {sq.subject!r} does not appear in the "
                          "question, so no tool call can start from it")
        seen[sq.id] = sq
    if errors:
        return errors
    errors.extend(_shape_errors(scenario.kind, scenario))
    for sq in scenario.sub_questions:
        if sq.answer.lower() in scenario.question.lower():
            errors.append(f"sub-question {sq.id!r}: its answer {sq.answer!r} is given away by the "
                          "question; the answer must only be reachable through tools")
    return errors


def _schema_errors(tool: ToolDocument) -> list[str]:
    params = tool.parameters
    if not isinstance(params, Mapping) or params.get("type") != "object":
        return [f"tool {tool.name!r}: parameters must be a JSON schema with type 'object'"]
    props = params.get("properties", {})
    if not isinstance(props, Mapping):
        return [f"tool {tool.name!r}: parameters.properties must be an object"]
    errors = [f"tool {tool.name!r}: parameter {p!r} is not a valid Python identifier"
              for p in props if not _IDENTIFIER.match(str(p))]
    errors += [f"tool {tool.name!r}: parameter {p!r} needs a 'type' and a 'description'"
               for p, spec in props.items()
               if not isinstance(spec, Mapping) or "type" not in spec or "description" not in spec]
    missing = [r for r in params.get("required", []) if r not in props]
    if missing:
        errors.append(f"tool {tool.name!r}: required {missing} are not in properties")
    return errors


def check_toolset(scenario: Scenario, tools: Sequence[ToolDocument], unique_names: bool = True) -> list[str]:
    """Errors in a list of tool documents: names, schemas, and one oracle call per sub-question.

    unique_names=False for stage-2 documents, whose overlaps stage 3 has yet to merge.
    """
    errors: list[str] = []
    names = [t.name for t in tools]
    errors += [f"tool name {n!r} is not a valid Python identifier" for n in names
               if not _IDENTIFIER.match(n)]
    if unique_names:
        errors += [f"tool name {n!r} is used twice"
                   for n in sorted({n for n in names if names.count(n) > 1})]
    for tool in tools:
        errors += _schema_errors(tool)
        if not tool.description.strip():
            errors.append(f"tool {tool.name!r} has an empty description")
        props = tool.parameters.get("properties", {}) if isinstance(tool.parameters, Mapping) else {}
        required = tool.parameters.get("required", []) if isinstance(tool.parameters, Mapping) else []
        for case in tool.cases:
            unknown = sorted(set(case.arguments) - set(props))
            absent = sorted(set(required) - set(case.arguments))
            if unknown or absent:
                errors.append(f"tool {tool.name!r}: call {dict(case.arguments)} has unknown arguments "
                              f"{unknown} or misses required {absent}")
    answered = [i for t in tools for i in t.answered]
    for sq in scenario.sub_questions:
        count = answered.count(sq.id)
        if count != 1:
            errors.append(f"sub-question {sq.id!r} is answered by {count} tool calls; it needs exactly 1")
    known = {sq.id for sq in scenario.sub_questions}
    errors += [f"a tool answers unknown sub-question {i!r}" for i in answered if i not in known]
    return errors


_STDLIB = frozenset(sys.stdlib_module_names)
_IMPORT_LINE = re.compile(r"^\s*(?:from\s+([\w.]+)\s+import\b|import\s+(.+))", re.MULTILINE)


def _imported_modules(source: str) -> list[str]:
    """Module names of the import statements in `source` (a line-level scan)."""
    modules = []
    for from_module, import_list in _IMPORT_LINE.findall(source):
        if from_module:
            modules.append(from_module)
        else:
            modules += [part.split(" as ")[0].strip() for part in import_list.split(";")[0].split(",")]
    return [m for m in modules if m]


def check_codes(tools: Sequence[ToolDocument], codes: Mapping[str, str], parse: bool = False) -> list[str]:
    """Errors in stage-5 code: every tool has source defining it that imports only the stdlib.

    The default check reads lines only (cheap enough for thousands of environments; the sandbox
    validation executes the code anyway). parse=True also parses the source with `ast`, for
    authors (LLMs) that can be asked to fix a syntax error.
    """
    errors: list[str] = []
    for tool in tools:
        source = codes.get(tool.name)
        if not isinstance(source, str):
            errors.append(f"no code for tool {tool.name!r}")
            continue
        if parse:
            try:
                module = ast.parse(source)
            except SyntaxError as exc:
                errors.append(f"code of {tool.name!r} does not parse: {exc.msg} (line {exc.lineno})")
                continue
            defines = any(isinstance(n, ast.FunctionDef) and n.name == tool.name for n in module.body)
        else:
            header = f"def {tool.name}("
            defines = source.startswith(header) or f"\n{header}" in source
        if not defines:
            errors.append(f"code of {tool.name!r} does not define a top-level function {tool.name!r}")
        errors += [f"code of {tool.name!r} imports {m!r}, which is not in the standard library"
                   for m in _imported_modules(source) if m.split(".")[0] not in _STDLIB]
    extra = sorted(set(codes) - {t.name for t in tools})
    if extra:
        errors.append(f"code given for unknown tools {extra}")
    return errors


def _require(stage: str, errors: list[str]) -> None:
    if errors:
        raise StageError(stage, "; ".join(errors))


def construct(author: Author, kind: str, complexity: Complexity, rng: random.Random) -> Environment:
    """Runs the five stages of `author` and checks each stage's output; raises StageError."""
    scenario = author.decompose(kind, complexity, rng)
    _require("decompose", check_scenario(scenario))
    if scenario.kind != kind:
        raise StageError("decompose", f"asked for a {kind} scenario, got {scenario.kind}")
    documents = author.write_documents(scenario, rng)
    _require("write_documents", check_toolset(scenario, documents, unique_names=False))
    tools = author.integrate(scenario, documents, rng)
    _require("integrate", check_toolset(scenario, tools))
    tools = author.scale(scenario, tools, complexity, rng)
    _require("scale", check_toolset(scenario, tools))
    codes = author.deploy(scenario, tools, rng)
    _require("deploy", check_codes(tools, codes))
    return Environment(scenario=scenario, tools=tuple(tools), codes=dict(codes))


def environment_rng(seed: int, index: int) -> random.Random:
    """The RNG of environment `index` under `seed`: independent of every other index."""
    return random.Random(f"ftrl-env|{seed}|{index}")
