"""The procedural author: all five stages offline, from the seeded synthetic world.

Fast, deterministic given the RNG, and free of any model: the embedded default author.
Every tool is a lookup over world facts, so its answers are right by construction; the
sandbox validation in build.py still executes the rendered code to prove it.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any, Mapping, Sequence

from ftrl_jax.envs import rewards
from ftrl_jax.envs import world as world_lib
from ftrl_jax.envs.stages import (Case, Complexity, Scenario, StageError, SubQuestion, ToolDocument)

# --- stage 1: scenario decomposition --------------------------------------------------

_SINGLE_WRAPPERS = ("What is {np}?", "Can you tell me {np}?", "I would like to know {np}.",
                    "Please find out {np}.", "Do you know {np}?", "Look up {np}, please.",
                    "Could you check {np}?", "I am trying to find {np}.", "Tell me {np}.")
_PARALLEL_WRAPPERS = ("What are {list}?", "Can you tell me {list}?", "I need {count} facts: {list}.",
                      "Please find {list}.", "Look up {list} for me.", "Could you check {list}?",
                      "For a report I need {list}.")
_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _noun_phrase(relation: world_lib.Relation, mention: str, rng: random.Random) -> str:
    return rng.choice(relation.phrases).format(x=mention)


def _enumerate(phrases: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c' (no Oxford comma: ', ' also separates parallel answers)."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


class ProceduralAuthor:
    """The five stages over a `World`; `world_seed` fixes every fact, `spec` sizes the world.

    With `spec.fixed_tool_names` every name and wording the stages would draw at random
    (tool names, selector names, description openers) is the canonical one instead.
    """

    def __init__(self, world_seed: int = 0, spec: world_lib.WorldSpec | str | None = None):
        self.world = world_lib.World(world_seed, spec)
        self.fixed_names = self.world.spec.fixed_tool_names

    def check(self, kinds: Sequence[str], complexity: Complexity) -> list[str]:
        """Why this world cannot build some of `kinds` at `complexity` (empty when it can)."""
        longest = self.world.longest_chain()
        errors = []
        for kind in kinds:
            needed = _HOPS_NEEDED[kind](complexity)
            if needed > longest:
                errors.append(f"scenario kind {kind!r} needs chains of {needed} hops (complexity "
                              f"hops={complexity.max_hops}), but world spec {self.world.spec} allows at most "
                              f"{longest}; use more relations, fewer hops, or other kinds")
        return errors

    def _tool_name(self, relation: world_lib.Relation, rng: random.Random) -> str:
        return _TOOL_NAMERS[self.fixed_names](relation, rng)

    # stage 1 -----------------------------------------------------------------------
    def _chain(self, chain: Sequence[world_lib.Relation], start: str, first_id: int,
               rng: random.Random) -> tuple[list[SubQuestion], str]:
        """Sub-questions of one chain and the nested noun phrase naming its final answer."""
        subs: list[SubQuestion] = []
        subject, mention = start, start
        for hop, relation in enumerate(chain):
            answer = self.world.fact(relation.key, subject)
            sub_id = f"q{first_id + hop}"
            subs.append(SubQuestion(
                id=sub_id, question=f"What is {_noun_phrase(relation, subject, rng)}?",
                answer=answer, subject=subject,
                depends_on=(f"q{first_id + hop - 1}",) if hop else (), relation=relation.key))
            mention = _noun_phrase(relation, mention, rng)
            subject = answer
        return subs, mention

    def decompose(self, kind: str, complexity: Complexity, rng: random.Random) -> Scenario:
        """A question of `kind` composed from world facts; sub-questions follow the hop rule.

        A draw whose question gives an answer away (the occupation 'botanist' in "the botanist
        who discovered ...") is redrawn.
        """
        for _ in range(_MAX_DRAWS):
            scenario = self._compose(kind, complexity, rng)
            question = scenario.question.lower()
            asked = [(sq.relation, sq.subject) for sq in scenario.sub_questions]
            # A repeated sub-question (possible when names come from a small pool) would ask for
            # the same call twice; it is redrawn like a leak.
            if len(set(asked)) == len(asked) and not any(
                    sq.answer.lower() in question for sq in scenario.sub_questions):
                return scenario
        return scenario  # check_scenario reports the leak

    def _compose(self, kind: str, complexity: Complexity, rng: random.Random) -> Scenario:
        shape = _SCENARIO_SHAPES[kind](complexity, rng)
        subs: list[SubQuestion] = []
        mentions: list[str] = []
        for hops in shape:
            chain = self._parallel_chain(hops, subs, rng) if len(shape) > 1 \
                else self.world.sample_chain(rng, hops)
            start = self.world.entity(chain[0].subject, rng)
            chain_subs, mention = self._chain(chain, start, len(subs) + 1, rng)
            subs.extend(chain_subs)
            mentions.append(mention)
        if len(mentions) == 1:
            question = rng.choice(_SINGLE_WRAPPERS).format(np=mentions[0])
        else:
            question = rng.choice(_PARALLEL_WRAPPERS).format(
                list=_enumerate(mentions), count=_COUNT_WORDS.get(len(mentions), str(len(mentions))))
        return Scenario(kind=kind, question=question, sub_questions=tuple(subs))

    def _parallel_chain(self, hops: int, earlier: Sequence[SubQuestion],
                        rng: random.Random) -> list[world_lib.Relation]:
        """A chain for a parallel scenario; single hops sometimes share a subject type with an
        earlier one, so stage 3 has overlapping documents to merge."""
        if hops == 1 and earlier and rng.random() < 0.45:
            previous = world_lib.RELATIONS[rng.choice(earlier).relation]
            if rng.random() < 0.5:
                return [previous]
            return [rng.choice(self.world.relations_by_subject[previous.subject])]
        return self.world.sample_chain(rng, hops)

    # stage 2 -----------------------------------------------------------------------
    def write_documents(self, scenario: Scenario, rng: random.Random) -> list[ToolDocument]:
        """One single-parameter lookup document per sub-question."""
        documents = []
        for sq in scenario.sub_questions:
            relation = world_lib.RELATIONS[sq.relation]
            entity = world_lib.ENTITY_TYPES[relation.subject]
            documents.append(ToolDocument(
                name=self._tool_name(relation, rng),
                description=f"Finds {relation.summary}.",
                parameters=_object_schema({entity.param: _key_schema(entity, 0)}, [entity.param]),
                cases=(Case({entity.param: sq.subject}, sq.answer, relation.field, sq.id),)))
        return documents

    # stage 3 -----------------------------------------------------------------------
    def integrate(self, scenario: Scenario, documents: Sequence[ToolDocument],
                  rng: random.Random) -> list[ToolDocument]:
        """Documents about the same entity type merge into one tool.

        Same relation: one tool answering all those calls. Several relations: one tool
        with a selector parameter naming the fact wanted.
        """
        groups: dict[str, list[ToolDocument]] = {}
        for doc in documents:
            groups.setdefault(_anatomy(doc).key_param, []).append(doc)
        merged = []
        for docs in groups.values():
            fields = list(dict.fromkeys(c.field for d in docs for c in d.cases))
            if len(docs) == 1:
                merged.append(docs[0])
            elif len(fields) == 1:
                merged.append(dataclasses.replace(docs[0], cases=tuple(c for d in docs for c in d.cases)))
            else:
                merged.append(_with_selector(docs[0], [c for d in docs for c in d.cases],
                                             _anatomy(docs[0]).subject_type, rng, self.fixed_names))
        return _unique_names(merged)

    # stage 4 -----------------------------------------------------------------------
    def scale(self, scenario: Scenario, tools: Sequence[ToolDocument], complexity: Complexity,
              rng: random.Random) -> list[ToolDocument]:
        """Applies the four strategies at their levels, then shuffles the toolset."""
        scaled = [self._scale_tool(t, complexity, rng) for t in tools]
        used = {sq.relation for sq in scenario.sub_questions}
        low, high = _DISTRACTORS[complexity.toolset_extension]
        for _ in range(rng.randint(low, high)):
            unused = [r for r in self.world.relations.values() if r.key not in used]
            if not unused:  # a small world may run out of relations to distract with
                break
            relation = rng.choice(unused)
            used.add(relation.key)
            scaled.append(self._scale_tool(self._distractor(relation, rng), complexity, rng))
        scaled = _unique_names(_without_answering_extras(scaled, [sq.answer for sq in scenario.sub_questions]))
        rng.shuffle(scaled)
        return scaled

    def _distractor(self, relation: world_lib.Relation, rng: random.Random) -> ToolDocument:
        """A tool about subjects the question never mentions: it answers nothing asked."""
        entity = world_lib.ENTITY_TYPES[relation.subject]
        subjects = [self.world.entity(relation.subject, rng) for _ in range(rng.randint(1, 2))]
        return ToolDocument(
            name=self._tool_name(relation, rng), description=f"Finds {relation.summary}.",
            parameters=_object_schema({entity.param: _key_schema(entity, 0)}, [entity.param]),
            cases=tuple(Case({entity.param: s}, self.world.fact(relation.key, s), relation.field)
                        for s in subjects))

    def _scale_tool(self, tool: ToolDocument, complexity: Complexity, rng: random.Random) -> ToolDocument:
        tool = self._generalize(tool, complexity.functional_generalization, rng)
        anatomy = _anatomy(tool)
        entity = world_lib.ENTITY_TYPES[anatomy.subject_type]
        verbosity = complexity.verbosity
        fields = list(dict.fromkeys(c.field for c in tool.cases))
        properties: dict[str, Any] = {anatomy.key_param: _key_schema(entity, verbosity)}
        required = [anatomy.key_param]
        if anatomy.selector:
            properties[anatomy.selector] = _selector_schema(
                fields, complexity.parameter_type_generalization >= 1, verbosity)
            required.append(anatomy.selector)
        optional = _pick_optional(complexity, rng)
        for spec in optional:
            properties[spec.name] = spec.schema(verbosity)
        description = _describe(entity, fields, [s.name for s in optional], verbosity, rng, self.fixed_names)
        return dataclasses.replace(tool, description=description,
                                   parameters=_object_schema(properties, required))

    def _generalize(self, tool: ToolDocument, level: int, rng: random.Random) -> ToolDocument:
        """Functional generalization: the tool covers more subjects and, higher up, more facts."""
        if level == 0:
            return tool
        anatomy = _anatomy(tool)
        extra_subjects, extra_fields = _GENERALIZATION[level]
        subjects = list(dict.fromkeys(c.arguments[anatomy.key_param] for c in tool.cases))
        subjects += [self.world.entity(anatomy.subject_type, rng) for _ in range(rng.randint(*extra_subjects))]
        fields = list(dict.fromkeys(c.field for c in tool.cases))
        spare = [r.field for r in self.world.relations_by_subject[anatomy.subject_type] if r.field not in fields]
        rng.shuffle(spare)
        fields += spare[:rng.randint(*extra_fields)]
        if len(fields) > 1 and not anatomy.selector:
            generalized = _with_selector(tool, list(tool.cases), anatomy.subject_type, rng, self.fixed_names)
            # Half the time the tool keeps its narrower name, as real generalized tools often do
            # (never with fixed names: one name must mean one document).
            keep_name = not self.fixed_names and rng.random() >= 0.5
            tool = dataclasses.replace(generalized, name=tool.name) if keep_name else generalized
            anatomy = _anatomy(tool)
        cases = list(tool.cases)
        covered = {(c.arguments[anatomy.key_param], c.field) for c in cases}
        for subject in subjects:
            for field in fields:
                if (subject, field) in covered:
                    continue
                arguments = {anatomy.key_param: subject}
                if anatomy.selector:
                    arguments[anatomy.selector] = field
                relation = world_lib.RELATION_BY_FIELD[(anatomy.subject_type, field)]
                cases.append(Case(arguments, self.world.fact(relation.key, subject), field))
        return dataclasses.replace(tool, cases=tuple(cases))

    # stage 5 -----------------------------------------------------------------------
    def deploy(self, scenario: Scenario, tools: Sequence[ToolDocument],
               rng: random.Random) -> dict[str, str]:
        """Python source for every tool, rendered from its document and cases.

        Raises StageError when an expected answer occurs in a tool's fixed text (the string
        literals of its logic: messages, names, keys): then some wrong call's output would
        contain that answer and be rewarded. Invented names make this very rare (a city called
        'Vali' inside 'Invalid').
        """
        codes, fixed = {}, []
        for tool in tools:
            codes[tool.name], text = _render(tool)
            fixed.append(text)
        fixed_text = "\n".join(fixed)
        leaked = [sq.answer for sq in scenario.sub_questions if rewards.answer_matches(fixed_text, sq.answer)]
        if leaked:
            raise StageError("deploy", f"expected answers {leaked} occur in the fixed text of the tool code, "
                                       "so a wrong call could output them")
        return codes


_MAX_DRAWS = 8

# Scenario kind -> the longest chain it may ask for at a complexity.
_HOPS_NEEDED = {
    "single_hop": lambda c: 1,
    "multi_hop": lambda c: c.max_hops,
    "parallel_single_hop": lambda c: 1,
    "parallel_multi_hop": lambda c: c.max_hops,
}

# --- scenario shapes: kind -> chain lengths -------------------------------------------

_SCENARIO_SHAPES = {
    "single_hop": lambda c, rng: [1],
    "multi_hop": lambda c, rng: [rng.randint(2, c.max_hops)],
    "parallel_single_hop": lambda c, rng: [1] * rng.randint(2, c.max_parallel),
    "parallel_multi_hop": lambda c, rng: [rng.randint(2, c.max_hops)]
    + [rng.randint(1, c.max_hops) for _ in range(rng.randint(2, c.max_parallel) - 1)],
}

# Level -> (extra subjects range, extra facts range) for functional generalization.
_GENERALIZATION = {1: ((1, 2), (0, 0)), 2: ((1, 3), (1, 2)), 3: ((2, 4), (2, 3))}
# Toolset extension level -> range of distractor tools.
_DISTRACTORS = {0: (0, 0), 1: (1, 2), 2: (3, 5), 3: (5, 8)}
# Parameter expansion level -> range of optional parameters per tool.
_OPTIONAL_COUNTS = {0: (0, 0), 1: (1, 1), 2: (2, 3), 3: (4, 6)}


# --- documents -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Anatomy:
    key_param: str
    subject_type: str
    selector: str | None


_PARAM_TO_TYPE = {t.param: t.key for t in world_lib.ENTITY_TYPES.values()}
_SELECTOR_NAMES = ("field", "attribute", "info_type", "property", "fact")


def _anatomy(tool: ToolDocument) -> _Anatomy:
    """Which required parameter names the subject and which (if any) selects the fact."""
    required = list(tool.parameters.get("required", []))
    key = next(p for p in required if p in _PARAM_TO_TYPE)
    selector = next((p for p in required if p != key), None)
    return _Anatomy(key, _PARAM_TO_TYPE[key], selector)


def _object_schema(properties: Mapping[str, Any], required: Sequence[str]) -> dict[str, Any]:
    return {"type": "object", "properties": dict(properties), "required": list(required)}


def _key_schema(entity: world_lib.EntityType, verbosity: int) -> dict[str, Any]:
    description = _capitalize(entity.param_description) + "."
    if verbosity >= 2:
        description = (f"The exact {entity.param_description} to look up, as written in the question "
                       "or in an earlier result (matching ignores letter case).")
    return {"type": "string", "description": description}


def _selector_schema(fields: Sequence[str], typed: bool, verbosity: int) -> dict[str, Any]:
    listed = ", ".join(f"'{f}'" for f in fields)
    description = f"Which fact to return: one of {listed}."
    if verbosity >= 2:
        description = f"The kind of information to retrieve. Supported values: {listed}."
    schema: dict[str, Any] = {"type": "string", "description": description}
    if typed:
        schema["enum"] = list(fields)
    return schema


def _varied_tool_name(relation: world_lib.Relation, rng: random.Random) -> str:
    stem = rng.choice(relation.stems)
    noun = relation.subject
    if noun not in stem and rng.random() < 0.35:
        stem = f"{noun}_{stem}"
    return f"{stem}_{rng.choice(world_lib.TOOL_SUFFIXES)}"


def canonical_tool_name(relation: world_lib.Relation) -> str:
    """The one name of a relation's tool with fixed names: 'country_capital_lookup'."""
    stem = relation.key if relation.subject in relation.key else f"{relation.subject}_{relation.key}"
    return f"{stem}_{_CANONICAL_SUFFIX}"


def canonical_profile_name(subject_type: str) -> str:
    """The one name of a multi-fact (selector) tool about `subject_type` with fixed names."""
    return f"{subject_type}_{world_lib.PROFILE_WORDS[0]}_{_CANONICAL_SUFFIX}"


_CANONICAL_SUFFIX = "lookup"
# fixed_tool_names -> how a relation's tool is named.
_TOOL_NAMERS = {
    False: _varied_tool_name,
    True: lambda relation, rng: canonical_tool_name(relation),
}


def _with_selector(base: ToolDocument, cases: Sequence[Case], subject_type: str,
                   rng: random.Random, fixed_names: bool = False) -> ToolDocument:
    """A multi-fact tool: the calls in `cases` gain a selector argument naming their fact."""
    entity = world_lib.ENTITY_TYPES[subject_type]
    fields = list(dict.fromkeys(c.field for c in cases))
    if fixed_names:
        selector, name = _SELECTOR_NAMES[0], canonical_profile_name(subject_type)
    else:
        selector = rng.choice(_SELECTOR_NAMES)
        name = f"{subject_type}_{rng.choice(world_lib.PROFILE_WORDS)}_{rng.choice(world_lib.TOOL_SUFFIXES)}"
    return ToolDocument(
        name=name, description=f"Looks up facts about a {entity.noun}.",
        parameters=_object_schema({entity.param: _key_schema(entity, 0),
                                   selector: _selector_schema(fields, False, 0)},
                                  [entity.param, selector]),
        cases=tuple(dataclasses.replace(c, arguments={**c.arguments, selector: c.field}) for c in cases))


def _without_answering_extras(tools: Sequence[ToolDocument], answers: Sequence[str]) -> list[ToolDocument]:
    """Tools without the extra records (generalization, distractors) whose fact is an expected answer.

    Facts repeat across subjects (14 occupations, 5 conservation statuses; a small world's
    entity pools), so another subject's record may hold the answer a sub-question asks for;
    a call to it is a wrong call that the reward (an expected answer in the output) would
    count as solved. Records of oracle calls stay; no random draw is involved.
    """
    kept = []
    for tool in tools:
        cases = tuple(c for c in tool.cases if c.sub_question is not None or not any(
            rewards.answer_matches(f"{c.field} {c.field.replace('_', ' ')} {c.answer}", a) for a in answers))
        kept.append(tool if len(cases) == len(tool.cases) else dataclasses.replace(tool, cases=cases))
    return kept


def _unique_names(tools: Sequence[ToolDocument]) -> list[ToolDocument]:
    """Renames later tools whose name is taken (`x_finder` -> `x_finder_2`)."""
    seen: set[str] = set()
    unique = []
    for tool in tools:
        name, k = tool.name, 2
        while name in seen:
            name, k = f"{tool.name}_{k}", k + 1
        seen.add(name)
        unique.append(tool if name == tool.name else dataclasses.replace(tool, name=name))
    return unique


def _describe(entity: world_lib.EntityType, fields: Sequence[str], optional: Sequence[str],
              verbosity: int, rng: random.Random, fixed_names: bool = False) -> str:
    """Short at verbosity 0 ('Finds the capital city of a country.'), FTRL-like at 2+."""
    summaries = [world_lib.RELATION_BY_FIELD[(entity.key, f)].summary for f in fields]
    if len(summaries) == 1:
        what = summaries[0]
    else:
        what = f"facts about a {entity.noun} ({_enumerate([f.replace('_', ' ') for f in fields])})"
    if verbosity == 0:
        return f"Finds {what}."
    if verbosity == 1:
        return f"Finds {what}, given the {entity.param_description}."
    openers = ("An advanced tool designed to retrieve", "A comprehensive service that returns",
               "A reference tool that looks up")
    opener = openers[0] if fixed_names else rng.choice(openers)
    text = (f"{opener} {what}. It takes the {entity.param_description} and answers from a curated "
            f"database of {entity.noun} records.")
    if optional:
        text += f" Optional settings ({_enumerate(list(optional))}) refine the response."
    return text + " Unknown names return an error message explaining what to fix."


# --- optional parameters (parameter expansion x type generalization) --------------------

@dataclasses.dataclass(frozen=True)
class _OptionalParam:
    name: str
    type_level: int  # lowest parameter-type-generalization level that may use it
    short: str
    long: str
    spec: Mapping[str, Any]

    def schema(self, verbosity: int) -> dict[str, Any]:
        return {"type": self.spec["type"], "description": self.long if verbosity >= 2 else self.short,
                **{k: v for k, v in self.spec.items() if k != "type"}}


_OPTIONAL_PARAMS = (
    _OptionalParam("include_details", 0, "Add background details.",
                   "Whether to add a short background note to the result. Default is false.",
                   {"type": "boolean", "default": False}),
    _OptionalParam("include_sources", 0, "Cite the record source.",
                   "Whether to name the source of the record in the result. Default is false.",
                   {"type": "boolean", "default": False}),
    _OptionalParam("requester", 0, "Who is asking (for the log).",
                   "Name of the person or team making the request, recorded for auditing.",
                   {"type": "string"}),
    _OptionalParam("language", 1, "Response language.",
                   "Language of the response text (ISO 639-1 code). Default is 'en'.",
                   {"type": "string", "enum": ["en", "fr", "de", "es", "ja"], "default": "en"}),
    _OptionalParam("response_format", 1, "'json' or 'text'.",
                   "Shape of the answer: 'json' for a structured record, 'text' for one sentence. "
                   "Default is 'json'.", {"type": "string", "enum": ["json", "text"], "default": "json"}),
    _OptionalParam("source", 1, "Preferred data source.",
                   "Preferred data source to consult first (e.g., 'registry', 'archive').",
                   {"type": "string", "enum": ["registry", "archive", "survey", "encyclopedia"]}),
    _OptionalParam("as_of_year", 2, "Year of the data.",
                   "Report the record as it stood in this year (1800-2030). Defaults to the latest.",
                   {"type": "integer", "minimum": 1800, "maximum": 2030}),
    _OptionalParam("max_results", 2, "Maximum results.",
                   "Maximum number of matching records to return (1-50). Default is 1.",
                   {"type": "integer", "minimum": 1, "maximum": 50, "default": 1}),
    _OptionalParam("confidence_threshold", 2, "Minimum confidence.",
                   "Minimum confidence score (0 to 1) a record must have to be returned. Default 0.5.",
                   {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5}),
    _OptionalParam("tags", 3, "Labels for the request.",
                   "A list of free-form labels attached to the request.",
                   {"type": "array", "items": {"type": "string"}}),
    _OptionalParam("filters", 3, "Extra filters.",
                   "Additional filters on the records searched.",
                   {"type": "object", "properties": {
                       "region": {"type": "string", "description": "Region the record must belong to."},
                       "verified_only": {"type": "boolean",
                                         "description": "Only return verified records."}}}),
    _OptionalParam("date_range", 3, "Date window.",
                   "Restrict the search to records updated within this date window.",
                   {"type": "object", "properties": {
                       "start": {"type": "string", "format": "date", "description": "First day, YYYY-MM-DD."},
                       "end": {"type": "string", "format": "date", "description": "Last day, YYYY-MM-DD."}}}),
)


def _pick_optional(complexity: Complexity, rng: random.Random) -> list[_OptionalParam]:
    allowed = [p for p in _OPTIONAL_PARAMS if p.type_level <= complexity.parameter_type_generalization]
    count = min(rng.randint(*_OPTIONAL_COUNTS[complexity.parameter_expansion]), len(allowed))
    # Favor the richest types the level allows, so type generalization shows up in the schemas.
    richest = [p for p in allowed if p.type_level == complexity.parameter_type_generalization]
    rng.shuffle(richest)
    rest = [p for p in allowed if p not in richest[:1]]
    rng.shuffle(rest)
    chosen = (richest[:1] + rest)[:count]
    return sorted(chosen, key=_OPTIONAL_PARAMS.index)


# --- stage 5: code rendering -----------------------------------------------------------

# JSON-schema type -> Python check on the value expression, and the wording of its error.
_TYPE_CHECKS = {
    "string": ("isinstance({v}, str)", "a string"),
    "boolean": ("isinstance({v}, bool)", "true or false"),
    "integer": ("isinstance({v}, int) and not isinstance({v}, bool)", "an integer"),
    "number": ("isinstance({v}, (int, float)) and not isinstance({v}, bool)", "a number"),
    "array": ("isinstance({v}, list)", "a list"),
    "object": ("isinstance({v}, dict)", "an object"),
}


def _error_line(indent: str, message: str) -> str:
    """A line returning {'error': message}; the message is a plain literal (no argument values)."""
    return f"{indent}return {{'error': {message!r}}}"


def _check_lines(label: str, value: str, schema: Mapping[str, Any], indent: str) -> list[str]:
    """Lines returning an error dict when `value` (a Python expression) breaks `schema`.

    Messages say which parameter is wrong and what it accepts, never the value given: an
    output that echoed its argument would match that argument as an expected answer (the
    reward reads tool outputs), so a wrong call could count as solved. For the same reason
    they hold no numbers (a range's bounds are in the schema).
    """
    check, wording = _TYPE_CHECKS[schema["type"]]
    lines = [f"{indent}if not ({check.format(v=value)}):",
             _error_line(indent + "    ", f"Invalid {label}: expected {wording}.")]
    if "enum" in schema:
        allowed = ", ".join(map(str, schema["enum"]))
        lines += [f"{indent}if {value} not in {list(schema['enum'])!r}:",
                  _error_line(indent + "    ", f"Invalid {label}: must be one of: {allowed}.")]
    if "minimum" in schema or "maximum" in schema:
        low, high = schema.get("minimum"), schema.get("maximum")
        lines += [f"{indent}if not ({low!r} <= {value} <= {high!r}):",
                  _error_line(indent + "    ", f"Invalid {label}: out of range; see the minimum and maximum "
                                             "in its schema.")]
    if schema.get("format") == "date":
        lines += [f"{indent}try:",
                  f"{indent}    datetime.date.fromisoformat({value})",
                  f"{indent}except ValueError:",
                  _error_line(indent + "    ", f"Invalid {label}: not a date; use the YYYY-MM-DD format.")]
    if schema["type"] == "array" and "items" in schema:
        item_check, item_wording = _TYPE_CHECKS[schema["items"]["type"]]
        lines += [f"{indent}if not all({item_check.format(v='item')} for item in {value}):",
                  _error_line(indent + "    ", f"Invalid {label}: every item must be {item_wording}.")]
    if schema["type"] == "object" and "properties" in schema:
        known = list(schema["properties"])
        lines += [f"{indent}if set({value}) - set({known!r}):",
                  _error_line(indent + "    ", f"Invalid {label}: it has unknown keys; allowed: "
                                             f"{', '.join(known)}.")]
        for key, sub in schema["properties"].items():
            lines.append(f"{indent}if {value}.get({key!r}) is not None:")
            lines += _check_lines(f"{label}.{key}", f"{value}[{key!r}]", sub, indent + "    ")
    return lines


def _uses_date(schema: Mapping[str, Any]) -> bool:
    return schema.get("format") == "date" or any(
        _uses_date(s) for s in schema.get("properties", {}).values())


# Name of the catch-all keyword parameter of rendered tools: an unknown argument name would
# otherwise raise a TypeError whose message (which the sandbox shows) quotes that name.
_EXTRA_ARGUMENTS = "_unexpected_arguments"


def render_tool_code(tool: ToolDocument) -> str:
    """Standalone, deterministic, stdlib-only Python source for a lookup tool.

    Valid calls return {field: answer} (plus the effects of optional settings); bad input
    returns {'error': ...} saying which parameter was wrong and what is allowed. No output
    repeats an argument value: FTRL's reward counts an expected answer as solved when it
    occurs in a tool's output, so an echo would reward a wrong call whose argument is the
    answer. The code raises nothing on JSON arguments (an exception's text, which the
    sandbox shows, could quote them).
    """
    return _render(tool)[0]


def _render(tool: ToolDocument) -> tuple[str, str]:
    """(source, fixed text): the fixed text joins the string literals of the source's logic
    (not its docstring or records): every string the tool can output but a record's fact."""
    anatomy = _anatomy(tool)
    properties = tool.parameters["properties"]
    required = list(tool.parameters["required"])
    optional = [p for p in properties if p not in required]
    signature = [f"{p}=None" for p in required]
    signature += [f"{p}={properties[p].get('default')!r}" for p in optional]
    signature.append(f"**{_EXTRA_ARGUMENTS}")
    records = {tuple(str(c.arguments[p]).strip().lower() for p in required): [c.field, c.answer]
               for c in tool.cases}
    head = [f"def {tool.name}({', '.join(signature)}):"]
    docstring = [f"    {tool.description!r}"]
    if any(_uses_date(properties[p]) for p in optional):
        head.append("    import datetime")
    table = ["    records = {"] + [f"        {key!r}: {value!r}," for key, value in records.items()] + ["    }"]
    body = [f"    if {_EXTRA_ARGUMENTS}:",
             _error_line("        ", f"Unknown parameter given; this tool takes: {', '.join(properties)}.")]
    for p in required:
        wording = _TYPE_CHECKS[properties[p]["type"]][1]
        body += [f"    if {p} is None:", _error_line("        ", f"Missing required parameter '{p}' ({wording}).")]
        body += _check_lines(p, p, properties[p], "    ")
    for p in optional:
        body.append(f"    if {p} is not None:")
        body += _check_lines(p, p, properties[p], "        ")
    key = ", ".join(f"str({p}).strip().lower()" for p in required) + ","
    given = anatomy.key_param + (f" and {anatomy.selector}" if anatomy.selector else "")
    body += [f"    key = ({key})",
             "    if key not in records:",
             _error_line("        ", f"No record found for the given {given}. Check the spelling, or use a value "
                                    "taken from the question or an earlier result."),
             "    field, answer = records[key]",
             "    result = {field: answer}"]
    body += _effect_lines(optional, properties)
    body.append("    return result")
    fixed = "\n".join(literal for line in body for literal in _STRING_LITERAL.findall(line))
    return "\n".join(head[:1] + docstring + head[1:] + table + body) + "\n", fixed


# A quoted literal of the rendered code (they are all reprs or plain f-string text).
_STRING_LITERAL = re.compile(r"'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\"")


def _effect_lines(optional: Sequence[str], properties: Mapping[str, Any]) -> list[str]:
    """Optional parameters change the result in small, deterministic ways, never by echoing a value."""
    lines = []
    effects = {
        "include_details": [
            "    if include_details:",
            "        result['details'] = 'Record checked against two independent entries.'"],
        "include_sources": [
            "    if include_sources:",
            "        result['source'] = 'curated reference database'"],
    }
    noted = []
    for p in optional:
        if p in effects:
            lines += effects[p]
        elif p != "response_format":
            noted.append(p)
    if noted:
        # The names of the settings the caller changed, not their values (defaults would be noise).
        lines += ["    applied = [name for name, value, default in ["
                  + ", ".join(f"({p!r}, {p}, {properties[p].get('default')!r})" for p in noted)
                  + "] if value is not None and value != default]",
                  "    if applied:",
                  "        result['options_applied'] = applied"]
    if "response_format" in optional:
        lines += ["    if response_format == 'text':",
                  "        return f\"The {field.replace('_', ' ')} is {answer}.\""]
    return lines
