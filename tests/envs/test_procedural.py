"""The procedural author: each stage on its own, sizing knobs, and the behaviour of rendered tool code.

Rendered code is our own (generated from world facts), so these tests exec it in-process to probe
its behaviour quickly; test_build.py executes it through the sandbox.
"""

import collections
import dataclasses
import json
import random
import re
import statistics

import pytest

from ftrl_jax.envs import rewards
from ftrl_jax.envs import procedural, world as world_lib
from ftrl_jax.envs.procedural import ProceduralAuthor, render_tool_code
from ftrl_jax.envs.stages import (SCENARIO_KINDS, Case, Complexity, Environment, Scenario, StageError, SubQuestion,
                                  ToolDocument, check_codes, check_scenario, check_toolset, construct,
                                  environment_rng)

LOW, MEDIUM, HIGH = (Complexity.parse(p) for p in ("low", "medium", "high"))


def _environments(kind, complexity, count=40, seed=0):
    author = ProceduralAuthor(world_seed=seed)
    return [construct(author, kind, complexity, environment_rng(seed, i)) for i in range(count)]


def _functions(env):
    namespace = {}
    for source in env.codes.values():
        exec(compile(source, "<tool>", "exec"), namespace)  # our own generated code
    return namespace


def _run(namespace, name, arguments):
    result = namespace[name](**arguments)
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)


@pytest.mark.parametrize("kind", list(SCENARIO_KINDS))
def test_scenarios_have_the_shape_of_their_kind(kind):
    author = ProceduralAuthor(world_seed=1)
    for i in range(60):
        scenario = author.decompose(kind, HIGH, environment_rng(1, i))
        assert check_scenario(scenario) == []
        depth = scenario.depth()
        chains = [depth[i] + 1 for i in scenario.final_ids]
        expected = {
            "single_hop": lambda: chains == [1],
            "multi_hop": lambda: len(chains) == 1 and 2 <= chains[0] <= HIGH.max_hops,
            "parallel_single_hop": lambda: len(chains) >= 2 and set(chains) == {1},
            "parallel_multi_hop": lambda: len(chains) >= 2 and max(chains) >= 2,
        }[kind]
        assert expected(), (kind, chains)


def test_hop_rule_subjects_are_previous_answers_and_answers_come_from_the_world():
    author = ProceduralAuthor(world_seed=5)
    scenario = author.decompose("multi_hop", HIGH, random.Random(0))
    subs = scenario.sub_questions
    assert subs[0].subject in scenario.question
    for previous, current in zip(subs, subs[1:]):
        assert current.depends_on == (previous.id,)
        assert current.subject == previous.answer
    for sq in subs:
        assert sq.answer == author.world.fact(sq.relation, sq.subject)
        assert sq.answer.lower() not in scenario.question.lower()
    assert scenario.answer == subs[-1].answer


def test_parallel_answer_joins_chain_ends_and_passes_the_match_rule():
    author = ProceduralAuthor()
    scenario = author.decompose("parallel_multi_hop", HIGH, random.Random(3))
    ends = [sq for sq in scenario.sub_questions if sq.id in scenario.final_ids]
    assert scenario.answer == ", ".join(sq.answer for sq in ends)
    assert rewards.answer_matches(" ... ".join(sq.answer for sq in ends), scenario.answer)
    assert not rewards.answer_matches(ends[0].answer, scenario.answer)


def test_answers_that_the_question_would_give_away_are_redrawn():
    """'botanist' is an occupation and also a word of a phrase; such draws must not survive."""
    author = ProceduralAuthor()
    for i in range(300):
        scenario = author.decompose("parallel_single_hop", HIGH, environment_rng(9, i))
        question = scenario.question.lower()
        assert all(sq.answer.lower() not in question for sq in scenario.sub_questions)


def test_documents_one_per_sub_question_with_the_subject_as_argument():
    author = ProceduralAuthor()
    rng = random.Random(2)
    scenario = author.decompose("multi_hop", MEDIUM, rng)
    documents = author.write_documents(scenario, rng)
    assert len(documents) == len(scenario.sub_questions)
    assert check_toolset(scenario, documents, unique_names=False) == []
    for doc, sq in zip(documents, scenario.sub_questions):
        (case,) = doc.cases
        assert case.sub_question == sq.id and case.answer == sq.answer
        assert list(case.arguments.values()) == [sq.subject]
        assert doc.parameters["required"] == list(case.arguments)


def _scenario_of(author, relations, subjects):
    subs = tuple(SubQuestion(f"q{i + 1}", f"What is it for {s}?", author.world.fact(r, s), s, (), r)
                 for i, (r, s) in enumerate(zip(relations, subjects)))
    return Scenario("parallel_single_hop", "Tell me about " + " and ".join(subjects) + ".", subs)


def test_integration_merges_same_relation_into_one_tool():
    author = ProceduralAuthor()
    rng = random.Random(0)
    scenario = _scenario_of(author, ["capital", "capital"], ["Lodrania", "Mirrowland"])
    tools = author.integrate(scenario, author.write_documents(scenario, rng), rng)
    assert len(tools) == 1 and sorted(tools[0].answered) == ["q1", "q2"]
    assert check_toolset(scenario, tools) == []


def test_integration_merges_relations_of_one_type_behind_a_selector():
    author = ProceduralAuthor()
    rng = random.Random(0)
    scenario = _scenario_of(author, ["capital", "currency", "author"],
                            ["Lodrania", "Mirrowland", "The Silent Harbor"])
    tools = author.integrate(scenario, author.write_documents(scenario, rng), rng)
    assert len(tools) == 2
    country_tool = next(t for t in tools if "country_name" in t.parameters["properties"])
    selector = [p for p in country_tool.parameters["required"] if p != "country_name"]
    assert len(selector) == 1
    assert {c.arguments[selector[0]] for c in country_tool.cases} == {"capital", "currency"}
    namespace = _functions(Environment(scenario, tuple(tools), author.deploy(scenario, tools, rng)))
    for case in country_tool.cases:
        assert case.answer in _run(namespace, country_tool.name, case.arguments)


def _sizes(envs):
    tools = [t for e in envs for t in e.tools]
    return {
        "tools_per_env": statistics.mean(len(e.tools) for e in envs),
        "description_chars": statistics.mean(len(t.description) for t in tools),
        "params_per_tool": statistics.mean(len(t.parameters["properties"]) for t in tools),
        "types": {spec["type"] for t in tools for spec in t.parameters["properties"].values()},
        "enums": sum("enum" in spec for t in tools for spec in t.parameters["properties"].values()),
        "distractors": sum(not t.cases or not t.answered for e in envs for t in e.tools),
    }


def test_low_complexity_is_small_and_high_complexity_is_ftrl_like():
    low = _sizes([e for k in SCENARIO_KINDS for e in _environments(k, LOW, 15)])
    high = _sizes([e for k in SCENARIO_KINDS for e in _environments(k, HIGH, 15)])
    assert low["tools_per_env"] <= 3.0 and low["distractors"] == 0
    assert low["params_per_tool"] <= 2.0 and low["description_chars"] < 60
    assert low["types"] == {"string"}
    # The FTRL test set: 9.3 tools per sample, ~230-character descriptions, ~7 parameters per tool.
    assert high["tools_per_env"] >= 8
    assert high["description_chars"] >= 200 and high["params_per_tool"] >= 5
    assert {"string", "boolean", "integer", "number", "array", "object"} <= high["types"]
    assert high["enums"] > 0 and high["distractors"] > 0


@pytest.mark.parametrize("field,levels", [
    ("toolset_extension", (0, 1, 2, 3)),
    ("parameter_expansion", (0, 1, 2, 3)),
])
def test_each_strategy_level_grows_its_own_measure(field, levels):
    measure = {"toolset_extension": "tools_per_env", "parameter_expansion": "params_per_tool"}[field]
    values = [_sizes(_environments("multi_hop", Complexity(**{field: level}), 25))[measure] for level in levels]
    assert values == sorted(values) and values[-1] > values[0], values


def test_functional_generalization_covers_more_queries_than_asked():
    envs = _environments("single_hop", Complexity(functional_generalization=3), 20)
    world = ProceduralAuthor(world_seed=0).world
    for env in envs:
        answering = [t for t in env.tools if t.answered]
        assert all(len(t.cases) > len(t.answered) for t in answering)
        for tool in answering:  # every extra query is a true fact of the world
            (key_param, subject_type), = [(p, t.key) for t in world_lib.ENTITY_TYPES.values()
                                          for p in tool.parameters["required"] if p == t.param]
            for case in tool.cases:
                relation = world_lib.RELATION_BY_FIELD[(subject_type, case.field)]
                assert case.answer == world.fact(relation.key, case.arguments[key_param])
        namespace = _functions(env)
        for tool in answering:  # the extra queries are answered too
            for case in tool.cases:
                assert case.answer in _run(namespace, tool.name, case.arguments)


def test_type_generalization_level_zero_keeps_selectors_plain_strings():
    plain = _environments("parallel_single_hop", Complexity(functional_generalization=2), 20)
    typed = _environments("parallel_single_hop", Complexity(functional_generalization=2,
                                                            parameter_type_generalization=1), 20)
    assert _sizes(plain)["enums"] == 0 and _sizes(typed)["enums"] > 0


def test_rendered_code_answers_valid_calls_and_explains_invalid_ones():
    (env,) = _environments("multi_hop", HIGH, 1, seed=11)
    namespace = _functions(env)
    assert check_codes(env.tools, env.codes, parse=True) == []
    for turn in env.oracle_plan():
        for name, case in turn:
            output = _run(namespace, name, case.arguments)
            assert rewards.answer_matches(output, case.answer)
            key_param = next(iter(case.arguments))
            shouted = {**case.arguments, key_param: f"  {case.arguments[key_param].upper()} "}
            assert case.answer in _run(namespace, name, shouted)  # case and spacing do not matter
            # Errors name the parameter, never the value (an echoed value could be an expected answer).
            unknown = json.loads(_run(namespace, name, {**case.arguments, key_param: "Nowhere Atlantis"}))
            assert unknown["error"].startswith(f"No record found for the given {key_param}")
            assert "atlantis" not in json.dumps(unknown).lower()
            missing = json.loads(_run(namespace, name, {k: v for k, v in case.arguments.items() if k != key_param}))
            assert f"Missing required parameter '{key_param}'" in missing["error"]
            wrong_type = json.loads(_run(namespace, name, {**case.arguments, key_param: 4217}))
            assert wrong_type == {"error": f"Invalid {key_param}: expected a string."}
            stray = json.loads(_run(namespace, name, {**case.arguments, "Nowhere Atlantis": 1}))
            assert stray["error"].startswith("Unknown parameter given; this tool takes: ")
            assert "atlantis" not in stray["error"].lower()


def test_rendered_code_validates_optional_parameters_by_schema():
    author = ProceduralAuthor()
    scenario = _scenario_of(author, ["capital"], ["Lodrania"])
    (tool,) = author.integrate(scenario, author.write_documents(scenario, random.Random(0)), random.Random(0))
    properties = {
        "country_name": tool.parameters["properties"]["country_name"],
        "response_format": {"type": "string", "description": "Shape.", "enum": ["json", "text"], "default": "json"},
        "as_of_year": {"type": "integer", "description": "Year.", "minimum": 1800, "maximum": 2030},
        "tags": {"type": "array", "description": "Labels.", "items": {"type": "string"}},
        "date_range": {"type": "object", "description": "Window.", "properties": {
            "start": {"type": "string", "format": "date", "description": "First day."}}},
    }
    tool = dataclasses.replace(tool, parameters={"type": "object", "properties": properties,
                                                 "required": ["country_name"]})
    namespace = {}
    exec(render_tool_code(tool), namespace)
    call = namespace[tool.name]
    answer = author.world.fact("capital", "Lodrania")
    # Results carry the fact asked for and the names of the settings changed, not the input.
    assert call(country_name="Lodrania") == {"capital": answer}
    assert call(country_name="Lodrania", tags=["a"], as_of_year=1999) == {
        "capital": answer, "options_applied": ["as_of_year", "tags"]}
    assert call(country_name="Lodrania", response_format="text") == f"The capital is {answer}."
    # Errors say what is allowed without repeating the value (nor any number it could match).
    assert call(country_name="Lodrania", response_format="xml") == {
        "error": "Invalid response_format: must be one of: json, text."}
    out_of_range = call(country_name="Lodrania", as_of_year=1200)["error"]
    assert "out of range" in out_of_range and not any(ch.isdigit() for ch in out_of_range)
    assert call(country_name="Lodrania", as_of_year=True) == {"error": "Invalid as_of_year: expected an integer."}
    assert "every item must be a string" in call(country_name="Lodrania", tags=[1])["error"]
    assert call(country_name="Lodrania", date_range={"stop": "x"}) == {
        "error": "Invalid date_range: it has unknown keys; allowed: start."}
    assert call(country_name="Lodrania", date_range={"start": "May 1st"}) == {
        "error": "Invalid date_range.start: not a date; use the YYYY-MM-DD format."}
    assert call(country_name="Lodrania", date_range={"start": "2020-05-01"})["capital"] == answer
    assert call(country_name="Lodrania", **{"Lodrania capital": 1}) == {
        "error": "Unknown parameter given; this tool takes: country_name, response_format, as_of_year, tags, "
                 "date_range."}


def test_same_rng_same_environment():
    author = ProceduralAuthor(world_seed=4)
    for kind in SCENARIO_KINDS:
        a = construct(author, kind, HIGH, environment_rng(4, 17)).to_row()
        b = construct(ProceduralAuthor(world_seed=4), kind, HIGH, environment_rng(4, 17)).to_row()
        assert a == b
    assert construct(author, "multi_hop", HIGH, environment_rng(4, 18)).to_row() != a


def test_tool_names_vary_across_environments():
    names = {t.name for k in SCENARIO_KINDS for e in _environments(k, LOW, 25) for t in e.tools}
    assert len(names) > 80
    assert all(name.isidentifier() for name in names)
    assert sum(any(s in name for s in world_lib.TOOL_SUFFIXES) for name in names) == len(names)


# --- world spec: small, learnable worlds ------------------------------------------------------

SMALL = world_lib.WorldSpec.parse("pool=32,relations=12,fixed_names=1")


def _small_environments(kind, complexity, count=30, seed=0, spec=SMALL):
    author = ProceduralAuthor(world_seed=seed, spec=spec)
    return author, [construct(author, kind, complexity, environment_rng(seed, i)) for i in range(count)]


@pytest.mark.parametrize("kind", list(SCENARIO_KINDS))
def test_pooled_names_recur_and_stay_within_the_pool(kind):
    author, envs = _small_environments(kind, LOW, spec=world_lib.WorldSpec(entity_pool=6, relations=6))
    mentions = []
    for env in envs:
        for sq in env.scenario.sub_questions:
            relation = world_lib.RELATIONS[sq.relation]
            if not sq.depends_on:
                assert sq.subject in author.world.pools[relation.subject]
                mentions.append(sq.subject)
            if relation.chains:
                assert sq.answer in author.world.pools[relation.target]
                mentions.append(sq.answer)
        for tool in env.tools:
            for case in tool.cases:
                key = next(p for p in tool.parameters["required"] if p.endswith(("_name", "_title")))
                assert any(case.arguments[key] in pool for pool in author.world.pools.values())
        asked = [(sq.relation, sq.subject) for sq in env.scenario.sub_questions]
        assert len(asked) == len(set(asked)), "a sub-question is asked twice"
    relations = author.world.relations.values()
    in_play = {r.subject for r in relations} | {r.target for r in relations if r.chains}
    assert len(set(mentions)) <= 6 * len(in_play) < len(mentions)
    assert max(collections.Counter(mentions).values()) >= 3  # names recur across environments


@pytest.mark.parametrize("complexity", [LOW, HIGH])
def test_only_the_subset_relations_reach_questions_and_tool_documents(complexity):
    spec = world_lib.WorldSpec(relations=12, seed=2)
    author = ProceduralAuthor(world_seed=0, spec=spec)
    subset = author.world.relations
    assert len(subset) == 12
    summaries = {r.summary for r in world_lib.RELATIONS.values()}
    for kind in SCENARIO_KINDS:
        for i in range(15):
            env = construct(author, kind, complexity, environment_rng(0, i))
            assert {sq.relation for sq in env.scenario.sub_questions} <= set(subset)
            for tool in env.tools:
                subject_type = next(world_lib.ENTITY_TYPES[t].key for t in world_lib.ENTITY_TYPES
                                    if world_lib.ENTITY_TYPES[t].param in tool.parameters["required"])
                for case in tool.cases:
                    assert world_lib.RELATION_BY_FIELD[(subject_type, case.field)].key in subset
                named = {s for s in summaries if s in tool.description}
                assert named <= {r.summary for r in subset.values()}, tool.description


def test_fixed_names_give_one_document_per_relation_across_environments():
    documents: dict[str, set[str]] = {}
    author = None
    for kind in SCENARIO_KINDS:
        author, envs = _small_environments(kind, LOW, count=40)
        for env in envs:
            for tool in env.tools:
                documents.setdefault(tool.name, set()).add(json.dumps(tool.schema(), sort_keys=True))
    relation_names = {procedural.canonical_tool_name(r): r for r in author.world.relations.values()}
    profile_names = {procedural.canonical_profile_name(t) for t in world_lib.ENTITY_TYPES}
    assert set(documents) <= set(relation_names) | profile_names
    assert len(set(documents) & set(relation_names)) >= 10
    for name, relation in relation_names.items():
        if name in documents:
            assert len(documents[name]) == 1, (name, documents[name])
            assert relation.summary in next(iter(documents[name]))
    # Without fixed names the same world varies its tool names.
    varied_spec = dataclasses.replace(SMALL, fixed_tool_names=False)
    _, varied = _small_environments("single_hop", LOW, count=40, spec=varied_spec)
    assert len({t.name for e in varied for t in e.tools}) > len(relation_names)


def test_fixed_names_hold_at_high_complexity_for_tool_and_selector_names():
    author, envs = _small_environments("parallel_multi_hop", HIGH, count=20)
    allowed = ({procedural.canonical_tool_name(r) for r in author.world.relations.values()}
               | {procedural.canonical_profile_name(t) for t in world_lib.ENTITY_TYPES})
    for env in envs:
        for tool in env.tools:
            # Two tools about one type (a question's and a distractor's) keep apart by a suffix.
            assert re.sub(r"_[0-9]+$", "", tool.name) in allowed
            assert set(tool.parameters["required"][1:]) <= {"field"}
        assert check_toolset(env.scenario, env.tools) == []


def test_check_names_kinds_a_small_world_cannot_build():
    author = ProceduralAuthor(spec=world_lib.WorldSpec(relations=("capital", "city_population")))
    assert author.check(list(SCENARIO_KINDS), LOW) == []
    errors = author.check(list(SCENARIO_KINDS), HIGH)
    assert len(errors) == 2 and "'multi_hop' needs chains of 4 hops" in errors[0]
    assert "'parallel_multi_hop'" in errors[1] and "allows at most 2" in errors[1]
    with pytest.raises(ValueError, match="allows chains of at most 2 hops"):
        author.decompose("multi_hop", HIGH, random.Random(0))


def test_a_small_world_runs_out_of_distractors_without_failing():
    author = ProceduralAuthor(spec=world_lib.WorldSpec(relations=4, entity_pool=8))
    hops = Complexity.parse(f"high,hops={author.world.longest_chain()}")
    for kind in SCENARIO_KINDS:
        for i in range(10):
            env = construct(author, kind, hops, environment_rng(0, i))
            fields = {c.field for t in env.tools for c in t.cases}
            assert len(env.tools) <= 4 and fields <= {r.field for r in author.world.relations.values()}


# --- no wrong call may output an expected answer (see also test_no_answer_leak.py) -------------

@pytest.mark.parametrize("spec", [None, world_lib.WorldSpec.parse("pool=8,relations=12,fixed_names=1")])
def test_extra_records_never_hold_an_expected_answer(spec):
    """Generalization and distractors add other subjects' records; facts repeat (14 occupations,
    a small world's pools), so those holding an expected answer are left out."""
    author = ProceduralAuthor(world_seed=0, spec=spec)
    extras = 0
    for kind in SCENARIO_KINDS:
        for i in range(25):
            env = construct(author, kind, HIGH, environment_rng(0, i))
            answers = [sq.answer for sq in env.scenario.sub_questions]
            for tool in env.tools:
                for case in tool.cases:
                    if case.sub_question is None:
                        extras += 1
                        assert not any(rewards.answer_matches(case.answer, a) for a in answers), (tool.name, case)
    assert extras > 500


def test_extra_records_holding_an_answer_are_dropped_but_oracle_records_stay():
    schema = {"type": "object", "properties": {"person_name": {"type": "string", "description": "Name."}},
              "required": ["person_name"]}
    tool = ToolDocument("occupation_finder", "Finds occupations.", schema, (
        Case({"person_name": "Ada Quill"}, "architect", "occupation", "q1"),
        Case({"person_name": "Bo Renn"}, "architect", "occupation"),
        Case({"person_name": "Cy Marl"}, "beekeeper", "occupation")))
    (kept,) = procedural._without_answering_extras([tool], ["architect", "Kelvora"])
    assert [c.arguments["person_name"] for c in kept.cases] == ["Ada Quill", "Cy Marl"]
    (same,) = procedural._without_answering_extras([tool], ["Kelvora"])
    assert same is tool


def test_deploy_refuses_an_answer_hidden_in_the_fixed_text_of_a_tool():
    """'Invalid', 'No record found ...' are outputs of wrong calls: an answer inside them would score."""
    author = ProceduralAuthor()
    rng = random.Random(0)
    scenario = _scenario_of(author, ["capital"], ["Lodrania"])
    tools = author.integrate(scenario, author.write_documents(scenario, rng), rng)
    assert author.deploy(scenario, tools, rng)
    hidden = dataclasses.replace(scenario, sub_questions=(
        dataclasses.replace(scenario.sub_questions[0], answer="Vali"),))
    tools = [dataclasses.replace(t, cases=tuple(dataclasses.replace(c, answer="Vali") for c in t.cases))
             for t in tools]
    with pytest.raises(StageError, match=r"expected answers \['Vali'\] occur in the fixed text"):
        author.deploy(hidden, tools, rng)
