"""Stage invariants, sandbox validation with drop reasons, bulk builds, the CLI and the tokenizer corpus."""

import collections
import dataclasses
import json
import random

import pytest

from ftrl_jax.envs import build, procedural, samples, world as world_lib
from ftrl_jax.envs.procedural import ProceduralAuthor
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.envs.stages import (COMPLEXITY_PRESETS, SCENARIO_KINDS, Case, Complexity, Scenario, StageError,
                                  SubQuestion, ToolDocument, check_codes, check_scenario, check_toolset,
                                  construct, environment_rng)


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(num_workers=2, timeout=5.0) as box:
        yield box


def _env(kind="multi_hop", complexity="medium", index=0, seed=0):
    return construct(ProceduralAuthor(seed), kind, Complexity.parse(complexity), environment_rng(seed, index))


# --- stage invariants ------------------------------------------------------------------

def _chain_scenario(**changes):
    subs = (SubQuestion("q1", "Who wrote X?", "Ada Quill", "The Silent Harbor"),
            SubQuestion("q2", "Where was Ada Quill born?", "Kelvora", "Ada Quill", ("q1",)))
    scenario = Scenario("multi_hop", "Where was the author of The Silent Harbor born?", subs)
    return dataclasses.replace(scenario, **changes)


def test_check_scenario_accepts_a_chain_and_names_each_problem():
    assert check_scenario(_chain_scenario()) == []
    subs = _chain_scenario().sub_questions
    broken_hop = (subs[0], dataclasses.replace(subs[1], subject="Someone Else"))
    assert "must be the answer 'Ada Quill'" in check_scenario(_chain_scenario(sub_questions=broken_hop))[0]
    later = (dataclasses.replace(subs[0], depends_on=("q2",)), subs[1])
    assert any("not an earlier id" in e for e in check_scenario(_chain_scenario(sub_questions=later)))
    leaked = _chain_scenario(question="Was the author of The Silent Harbor born in Kelvora?")
    assert any("given away" in e for e in check_scenario(leaked))
    hidden = _chain_scenario(question="Where was the author of that book born?")
    assert any("does not appear in the question" in e for e in check_scenario(hidden))
    assert "needs exactly 1 sub-question" in check_scenario(_chain_scenario(kind="single_hop"))[0]
    assert any("independent" in e for e in check_scenario(_chain_scenario(kind="parallel_single_hop")))
    assert check_scenario(_chain_scenario(kind="quiz")) == [
        f"unknown scenario kind 'quiz'; use one of {sorted(SCENARIO_KINDS)}"]


def test_check_toolset_requires_one_valid_call_per_sub_question():
    scenario = _chain_scenario()
    schema = {"type": "object", "properties": {"title": {"type": "string", "description": "Title."}},
              "required": ["title"]}
    good = [ToolDocument("author_finder", "Finds authors.", schema,
                         (Case({"title": "The Silent Harbor"}, "Ada Quill", sub_question="q1"),)),
            ToolDocument("birthplace_finder", "Finds birthplaces.", schema,
                         (Case({"title": "Ada Quill"}, "Kelvora", sub_question="q2"),))]
    assert check_toolset(scenario, good) == []
    twice = [good[0], dataclasses.replace(good[1], name="author_finder")]
    assert "tool name 'author_finder' is used twice" in check_toolset(scenario, twice)
    assert check_toolset(scenario, twice, unique_names=False) == []
    assert any("answered by 0 tool calls" in e for e in check_toolset(scenario, good[:1]))
    bad_call = [good[0], dataclasses.replace(good[1], cases=(Case({"name": "x"}, "Kelvora", sub_question="q2"),))]
    assert any("unknown arguments ['name'] or misses required ['title']" in e
               for e in check_toolset(scenario, bad_call))
    assert any("not a valid Python identifier" in e
               for e in check_toolset(scenario, [dataclasses.replace(good[0], name="find author")] + good[1:]))


def test_check_codes_needs_the_function_and_stdlib_imports_only():
    tool = ToolDocument("lookup", "Looks up.", {"type": "object", "properties": {}})
    assert check_codes([tool], {"lookup": "import json\nfrom collections import abc\ndef lookup():\n    return 1\n"}) == []
    assert "does not define a top-level function 'lookup'" in check_codes([tool], {"lookup": "def other():\n  pass\n"})[0]
    assert "imports 'requests'" in check_codes([tool], {"lookup": "import requests\ndef lookup():\n  pass\n"})[0]
    assert "does not parse" in check_codes([tool], {"lookup": "def lookup(:\n"}, parse=True)[0]
    assert check_codes([tool], {}) == ["no code for tool 'lookup'"]


def test_construct_names_the_stage_that_broke():
    class WrongKind(ProceduralAuthor):
        def decompose(self, kind, complexity, rng):
            return super().decompose("single_hop", complexity, rng)

    with pytest.raises(StageError, match="stage 'decompose': asked for a multi_hop scenario") as info:
        construct(WrongKind(), "multi_hop", Complexity(), random.Random(0))
    assert info.value.stage == "decompose"


def test_complexity_parse():
    assert Complexity.parse("low") == COMPLEXITY_PRESETS["low"]
    assert Complexity.parse("high,te=0").toolset_extension == 0
    assert Complexity.parse("fg=2,pe=1,hops=3") == Complexity(2, 1, 0, 0, max_hops=3)
    assert Complexity.parse("2").parameter_type_generalization == 2
    with pytest.raises(ValueError, match="unknown complexity key 'xx'"):
        Complexity.parse("xx=1")
    with pytest.raises(ValueError, match="must be an integer in 0..3, got 4"):
        Complexity.parse("pe=4")


# --- the FTRL row ------------------------------------------------------------------------

def test_row_follows_the_ftrl_format():
    env = _env("parallel_multi_hop", "high")
    row = env.to_row("train")
    sample = samples.decode_sample(row)
    assert sample.messages[0]["content"] == samples.user_prompt(env.question)
    assert sample.data_source == "self/parallel_multi_hop" and sample.solve_rate == 0.0
    assert set(sample.codes) == set(sample.tool_names)
    assert sum(len(v) for v in sample.unsolved_set.values()) == len(env.scenario.sub_questions)
    assert [len(turn) for turn in sample.oracle_calls] == [len(t) for t in env.oracle_plan()]
    assert isinstance(row["tools"], str) and isinstance(row["codes"], str)


# --- validation -------------------------------------------------------------------------

def test_validation_keeps_correct_environments(sandbox):
    envs = [_env(kind, level, index=i) for i, kind in enumerate(SCENARIO_KINDS) for level in ("low", "high")]
    for env, outputs in zip(envs, build.run_oracle(envs, sandbox)):
        assert build.validate(env, outputs) is None
        assert len(outputs) == len(env.oracle_plan())


def test_validation_names_why_an_environment_fails(sandbox):
    env = _env("multi_hop", "medium", index=3)
    (outputs,) = build.run_oracle([env], sandbox)
    first_answer = env.scenario.sub_questions[0].answer

    def tampered(turn, text):
        changed = [list(t) for t in outputs]
        changed[turn][0] = text
        return changed

    assert build.validate(env, tampered(-1, outputs[-1][0].replace(env.answer, "somewhere"))) == "final_answer_missing"
    assert build.validate(env, tampered(0, outputs[0][0].replace(first_answer, "someone"))) == "sub_answer_missing"
    assert build.validate(env, tampered(0, "an error occured when call x: ValueError: boom")) == "tool_error"
    hidden = dataclasses.replace(env, scenario=dataclasses.replace(env.scenario, question="Guess it?"))
    assert build.validate(hidden, outputs) == "argument_not_grounded"


def test_parallel_final_answer_needs_every_chain_end(sandbox):
    env = _env("parallel_single_hop", "low", index=1)
    (outputs,) = build.run_oracle([env], sandbox)
    assert build.validate(env, outputs) is None
    for position, sub in enumerate(env.scenario.sub_questions):
        changed = [list(outputs[0])]
        changed[0][position] = changed[0][position].replace(sub.answer, "unknown")
        assert build.validate(env, changed) == "final_answer_missing"


class _FlakyAuthor(ProceduralAuthor):
    """Breaks some environments on purpose, in three different ways."""

    def decompose(self, kind, complexity, rng):
        self.mode = rng.choice(["ok", "ok", "raise", "wrong", "stage"])
        if self.mode == "stage":
            kind = "single_hop" if kind != "single_hop" else "multi_hop"
        return super().decompose(kind, complexity, rng)

    def deploy(self, scenario, tools, rng):
        codes = super().deploy(scenario, tools, rng)
        broken = {
            "raise": "def {name}(**kwargs):\n    raise KeyError('lost')\n",
            "wrong": "def {name}(**kwargs):\n    return {{'result': 'no idea'}}\n",
        }.get(self.mode)
        for tool in tools:
            if broken and tool.answered:
                codes[tool.name] = broken.format(name=tool.name)
        return codes


def test_build_drops_broken_environments_and_counts_reasons(sandbox):
    kept, report = build.build_environments(40, seed=2, author=_FlakyAuthor(2), complexity="low",
                                            sandbox=sandbox, batch_size=16)
    assert len(kept) == 40 and report.kept == 40
    assert report.attempted == 40 + sum(report.dropped.values())
    assert set(report.dropped) == {"tool_error", "final_answer_missing", "stage_failed:decompose"}
    assert "stage_failed:decompose" in report.summary() and "validated envs/min" in report.summary()


def test_build_stops_after_max_attempts_when_everything_fails(sandbox):
    class Hopeless(ProceduralAuthor):
        def deploy(self, scenario, tools, rng):
            return {t.name: f"def {t.name}(**kwargs):\n    return 'nothing'\n" for t in tools}

    kept, report = build.build_environments(5, seed=0, author=Hopeless(), sandbox=sandbox, max_attempts=20,
                                            batch_size=8)
    assert kept == [] and report.attempted <= 24 and report.dropped == {"final_answer_missing": report.attempted}


def test_300_environments_have_many_tool_names_and_all_scenario_kinds(sandbox):
    envs, report = build.build_environments(300, seed=0, complexity="low", sandbox=sandbox)
    assert len(envs) == 300 and not report.dropped
    assert len(build.distinct_tool_names(envs)) > 150
    assert collections.Counter(e.scenario.kind for e in envs) == {k: 75 for k in SCENARIO_KINDS}


def test_builds_do_not_depend_on_batch_size(sandbox):
    a, _ = build.build_environments(20, seed=9, complexity="high", sandbox=sandbox, batch_size=7)
    b, _ = build.build_environments(20, seed=9, complexity="high", sandbox=sandbox, batch_size=64)
    assert [e.to_row() for e in a] == [e.to_row() for e in b]
    c, _ = build.build_environments(20, seed=10, complexity="high", sandbox=sandbox)
    assert [e.question for e in a] != [e.question for e in c]


def test_corpus_texts_yields_questions_tool_documents_and_outputs(sandbox):
    texts = list(build.corpus_texts(6, seed=1, sandbox=sandbox))
    again = list(build.corpus_texts(6, seed=1, sandbox=sandbox))
    assert texts == again and all(isinstance(t, str) and t for t in texts)
    prompts = [t for t in texts if "Question: " in t]
    assert len(prompts) == 6
    documents = [json.loads(t) for t in texts if t.startswith('{"type": "function"')]
    assert documents and all(d["function"]["name"] for d in documents)
    outputs = [t for t in texts if t not in prompts and not t.startswith('{"type": "function"')]
    assert len(outputs) >= 6


# --- small worlds ---------------------------------------------------------------------------

SMALL_WORLD = "pool=32,relations=12,fixed_names=1"


def test_small_world_builds_and_validates_every_scenario_kind(sandbox):
    envs, report = build.build_environments(80, seed=0, complexity="low", sandbox=sandbox, world=SMALL_WORLD)
    assert len(envs) == 80 and not report.dropped
    assert collections.Counter(e.scenario.kind for e in envs) == {k: 20 for k in SCENARIO_KINDS}
    full, _ = build.build_environments(80, seed=0, complexity="low", sandbox=sandbox)
    assert len(build.distinct_tool_names(envs)) <= 12 + 12 < len(build.distinct_tool_names(full))
    # Training and held-out builds differ in fact seed but share the world's names and relations.
    held_out, _ = build.build_environments(40, seed=1, complexity="low", sandbox=sandbox, world=SMALL_WORLD)
    training_world = ProceduralAuthor(world_seed=0, spec=SMALL_WORLD).world
    canonical = {procedural.canonical_tool_name(r) for r in training_world.relations.values()}
    profiles = {procedural.canonical_profile_name(t) for t in world_lib.ENTITY_TYPES}
    assert build.distinct_tool_names(held_out) <= canonical | profiles
    assert {sq.relation for e in held_out for sq in e.scenario.sub_questions} <= set(training_world.relations)


def test_build_rejects_a_world_that_cannot_supply_the_kinds(sandbox):
    with pytest.raises(ValueError, match="'multi_hop' needs chains of 3 hops"):
        build.build_environments(4, seed=0, complexity="low,hops=3", kinds=["multi_hop"], sandbox=sandbox,
                                 world="relations=capital+city_population")
    with pytest.raises(ValueError, match="pass the world spec to the author"):
        build.build_environments(4, seed=0, author=ProceduralAuthor(), sandbox=sandbox, world=SMALL_WORLD)
