"""Greedy and sampled evaluation: per-source means, the paper's average over scenario types, best of k,
counts and refusals."""

import json

import pytest

from ftrl_jax.envs.samples import environment_key
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.rollout.evaluation import SCENARIO_TYPES, evaluate, evaluate_sampled, summarize, summarize_sampled
from tests.rollout.test_episodes import OracleGenerator, ScriptedGenerator, calls_text, toy_sample


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
    assert [row["env_key"] for row in report.episodes] == [environment_key(s) for s in procedural_samples]
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


def _row(source, f1, precision=1.0, rate=None):
    return {"data_source": source, "solve_precision": precision, "solve_rate": f1 if rate is None else rate,
            "solve_f1": f1}


def test_sampled_rows_give_per_environment_means_and_best_of_k():
    rows = [_row("self/single_hop", 0.0), _row("self/single_hop", 1.0), _row("self/single_hop", 0.0),
            _row("self/single_hop", 0.0), _row("self/single_hop", 0.0), _row("self/single_hop", 0.0),
            _row("self/multi_hop", 0.5), _row("self/multi_hop", 0.5, rate=0.25), _row("self/multi_hop", 0.2)]
    environments, per_source, average, missing = summarize_sampled(rows, 3)
    assert [e["best_solve_f1"] for e in environments] == [1.0, 0.0, 0.5]
    assert [e["solve_f1"] for e in environments] == pytest.approx([1 / 3, 0.0, 0.4])
    assert environments[2]["solve_rate"] == pytest.approx((0.5 + 0.25 + 0.2) / 3)
    # Per type: the mean over its environments of the per-environment values; the average weighs types equally.
    assert per_source["self/single_hop"]["solve_f1"] == pytest.approx(1 / 6)
    assert per_source["self/single_hop"]["best_solve_f1"] == 0.5 and per_source["self/single_hop"]["count"] == 2.0
    assert average["solve_f1"] == pytest.approx((1 / 6 + 0.4) / 2)
    assert average["best_solve_f1"] == pytest.approx((0.5 + 0.5) / 2)
    assert missing == ["self/parallel_single_hop", "self/parallel_multi_hop"]
    # One sample per environment: best of one is the sample itself.
    environments, _, average, _ = summarize_sampled(rows, 1)
    assert all(e["best_solve_f1"] == e["solve_f1"] for e in environments)


def test_sampled_rows_must_come_in_groups_of_one_environment():
    with pytest.raises(ValueError, match="groups of num_samples=2"):
        summarize_sampled([_row("a", 0.0)] * 3, 2)
    with pytest.raises(ValueError, match="sample-major"):
        summarize_sampled([_row("a", 0.0), _row("b", 0.0)], 2)
    keyed = [dict(_row("a", 0.0), env_key=k) for k in ("k1", "k1", "k2", "k3")]
    assert [e["env_key"] for e in summarize_sampled(keyed[:2], 2)[0]] == ["k1"]
    with pytest.raises(ValueError, match="are of 2 environments"):
        summarize_sampled(keyed[2:], 2)


def test_sampled_evaluation_plays_k_copies_in_one_batch(sandbox):
    served = []

    def respond(messages, turn_number):
        # Every other copy of a question calls both tools right away; the others answer without tools.
        if turn_number:
            return "The answer is 14."
        served.append(len(served))
        return calls_text([("double", {"x": 7}), ("greet", {"name": "Ada"})]) if len(served) % 2 else "No idea."

    generator = ScriptedGenerator(respond)
    generator.temperature = 1.0
    report = evaluate_sampled(generator, [toy_sample(), toy_sample()], num_samples=2, sandbox=sandbox)
    assert generator.batches[0] == 4  # all k x N first turns went to the generator at once
    assert report.num_episodes == 4 and report.num_samples == 2
    assert [e["best_solve_f1"] for e in report.environments] == [1.0, 1.0]
    assert [e["solve_f1"] for e in report.environments] == [0.5, 0.5]
    assert report.per_source["toy"]["solve_f1"] == 0.5 and report.scenario_average == {}
    assert report.end_reasons == {"no_tool_call": 4}
    assert json.loads(json.dumps(report.to_json()))["num_samples"] == 2

    generator.temperature = 0.0
    with pytest.raises(ValueError, match="temperature > 0"):
        evaluate_sampled(generator, [toy_sample()], num_samples=2, sandbox=sandbox)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        evaluate_sampled(ScriptedGenerator(respond), [toy_sample()], num_samples=0, sandbox=sandbox)
