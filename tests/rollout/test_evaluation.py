"""Greedy evaluation: per-source means, the paper's average over scenario types, counts and refusals."""

import json

import pytest

from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.rollout.evaluation import SCENARIO_TYPES, evaluate, summarize
from tests.rollout.test_episodes import OracleGenerator, ScriptedGenerator, toy_sample


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(num_workers=2, timeout=5.0) as box:
        yield box


@pytest.fixture(scope="module")
def procedural_samples(sandbox):
    build = pytest.importorskip("ftrl_jax.envs.build")
    environments, _ = build.build_environments(8, seed=5, sandbox=sandbox, batch_size=8)
    return [env.to_sample() for env in environments]


def test_summarize_averages_per_type_means_not_episodes():
    rows = [{"data_source": "self/single_hop", "solve_precision": 1.0, "solve_rate": 1.0, "solve_f1": 1.0}]
    rows += [{"data_source": "self/multi_hop", "solve_precision": p, "solve_rate": 0.0, "solve_f1": 0.0}
             for p in (1.0, 0.0, 0.5)]
    rows += [{"data_source": "toolhop/3_hop", "solve_precision": 0.0, "solve_rate": 0.0, "solve_f1": 0.0}]
    per_source, average, missing = summarize(rows)
    assert per_source["self/multi_hop"] == {"solve_precision": 0.5, "solve_rate": 0.0, "solve_f1": 0.0, "count": 3.0}
    assert per_source["toolhop/3_hop"]["count"] == 1.0
    # Two scenario types present, each weighing one half; other sources stay out of the average.
    assert average == {"solve_precision": 0.75, "solve_rate": 0.5, "solve_f1": 0.5}
    assert missing == ["self/parallel_single_hop", "self/parallel_multi_hop"]
    assert summarize([]) == ({}, {}, list(SCENARIO_TYPES))


def test_oracle_evaluation_scores_everything_solved(procedural_samples, sandbox):
    report = evaluate(OracleGenerator(procedural_samples), procedural_samples, sandbox=sandbox)
    assert set(report.per_source) == set(SCENARIO_TYPES) and report.missing_types == []
    assert sum(means["count"] for means in report.per_source.values()) == report.num_episodes == 8
    assert report.scenario_average == {"solve_precision": 1.0, "solve_rate": 1.0, "solve_f1": 1.0}
    assert report.end_reasons == {"no_tool_call": 8}
    assert report.num_turns == sum(len(s.oracle_calls) + 1 for s in procedural_samples)
    assert [row["data_source"] for row in report.episodes] == [s.data_source for s in procedural_samples]
    assert report.episodes_per_minute > 0
    assert json.loads(json.dumps(report.to_json()))["num_episodes"] == 8
    summary = report.summary()
    assert "average of scenario types" in summary and "100.00" in summary and "no_tool_call" in summary


def test_a_policy_that_never_calls_scores_zero_recall(sandbox):
    samples = [toy_sample(), toy_sample()]
    report = evaluate(ScriptedGenerator(lambda messages, n: "I cannot tell."), samples, sandbox=sandbox)
    assert report.per_source["toy"] == {"solve_precision": 1.0, "solve_rate": 0.0, "solve_f1": 0.0, "count": 2.0}
    assert report.scenario_average == {} and report.missing_types == list(SCENARIO_TYPES)
    assert "scenario types missing" in report.summary()


def test_sampling_generators_are_refused(sandbox):
    generator = ScriptedGenerator(lambda messages, n: "")
    generator.temperature = 0.7
    with pytest.raises(ValueError, match="temperature=0.7; build it with temperature=0.0"):
        evaluate(generator, [toy_sample()], sandbox=sandbox)
