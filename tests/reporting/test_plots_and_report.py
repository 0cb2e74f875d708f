"""Figures are written as valid PNGs from logged records and summaries; report.md tables and links them."""

import json
import os

import numpy as np
import pytest
from matplotlib import image

from ftrl_jax.envs.samples import Sample
from ftrl_jax.reporting import plots, report
from ftrl_jax.reporting.stats import paired_bootstrap
from ftrl_jax.rollout import harness

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels[..., :3].std() > 0  # something was drawn
    return pixels


def _rl_records(num_steps=6):
    records = [{"phase": "warmup", "step": 1, "loss": 3.0}]
    for step in range(1, num_steps + 1):
        records.append({"phase": "rl", "step": step, "reward_mean": -0.1 + 0.02 * step, "reward_std": 0.05,
                        "reward_positive": 0.1 * step / num_steps, "groups_mixed": 0.5, "kl": 0.001 * step,
                        "response_length": 30.0 + step})
    records += [{"phase": "eval_curve", "step": s, "solve_f1": f} for s, f in ((0, 0.02), (3, 0.03), (6, 0.05))]
    return records


def test_metric_series_keep_the_last_record_of_a_repeated_step():
    records = _rl_records(4) + [{"phase": "rl", "step": 3, "kl": 0.5}, {"phase": "rl", "step": 5, "kl": "nan"}]
    steps, kl = plots.series(records, "rl", "kl")
    assert steps.tolist() == [1, 2, 3, 4] and kl.tolist() == [0.001, 0.002, 0.5, 0.004]
    assert plots.series(records, "rl", "missing")[0].size == 0


def test_learning_curves_are_a_png_read_from_metrics_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rl_records()) + '{"phase": "rl", "st')  # a cut line
    records = plots.read_metrics(str(path))
    assert len(records) == len(_rl_records())
    out = plots.plot_learning_curves(records, str(tmp_path / "figs" / "learning_curves.png"), title="t")
    _assert_png(out)
    # Nothing logged yet still gives a figure (its panels say what is missing).
    _assert_png(plots.plot_learning_curves([], str(tmp_path / "empty.png")))


def _by_scenario(f1s):
    return {t: {"solve_precision": f, "solve_rate": f, "solve_f1": f, "count": 4.0}
            for t, f in zip(plots.SCENARIO_TYPES, f1s)}


def test_scenario_bars_before_and_after(tmp_path):
    results = {"before RL": {"per_source": _by_scenario([0.0, 0.1, 0.2, 0.3]),
                             "scenario_average": {"solve_precision": 0.15, "solve_rate": 0.15, "solve_f1": 0.15}},
               "after RL": {"per_source": _by_scenario([0.1, 0.1, 0.3]), "scenario_average": {}}}
    _assert_png(plots.plot_scenario_bars(results, str(tmp_path / "bars.png")))
    assert plots._categories(results, "per_source") == [*plots.SCENARIO_TYPES, "average"]
    assert np.isnan(plots._value(results["after RL"], "per_source", plots.SCENARIO_TYPES[3], "solve_f1"))
    with pytest.raises(ValueError, match="no results"):
        plots.plot_scenario_bars({}, str(tmp_path / "none.png"))


def _evaluate_summary(kind, records, tmp_path):
    tasks = [harness.Task(i, r["scenario"], Sample(messages=[{"role": "user", "content": str(i)}], tools=[],
                                                   codes={}, unsolved_set={}, answer="",
                                                   data_source=r["data_source"]))
             for i, r in enumerate(records)]
    keyed = {t.key: {"key": t.key, "status": harness.OK, "end_reason": "no_tool_call", **r}
             for t, r in zip(tasks, records)}
    settings = harness.run_settings(kind, str(tmp_path / "data.jsonl"), backend="local",
                                    policy=str(tmp_path / "export"), max_turns=4, max_new_tokens=16)
    return harness.build_summary(kind, tasks, keyed, settings=settings, run_id="r")


def test_evaluate_summaries_draw_as_per_scenario_bars(tmp_path):
    solve = _evaluate_summary("samples", [
        {"scenario": "solve", "data_source": source, "metrics": {"solve_precision": p, "solve_rate": p / 2,
                                                                 "solve_f1": p / 3}}
        for source, p in zip(plots.SCENARIO_TYPES * 2 + ("other/source",), np.linspace(0, 1, 9))], tmp_path)
    _assert_png(plots.plot_evaluate_summary(solve, str(tmp_path / "one.png")))
    _assert_png(plots.plot_evaluate_summary({"warm start": solve, "after RL": solve}, str(tmp_path / "two.png")))
    toolhop = _evaluate_summary("toolhop", [
        {"scenario": name, "data_source": "toolhop", "metrics": {"answer_correctness": c}}
        for name, c in (("direct", 0.0), ("mandatory", 1.0), ("free", 1.0), ("free", 0.0))], tmp_path)
    _assert_png(plots.plot_evaluate_summary(toolhop, str(tmp_path / "toolhop.png")))
    with pytest.raises(ValueError, match="of one kind"):
        plots.plot_evaluate_summary({"a": solve, "b": toolhop}, str(tmp_path / "mixed.png"))


def _main_job_summary():
    f1_before = np.array([0.0, 0.5, 0.0, 0.25, 0.0, 0.0, 1.0, 0.0])
    f1_after = np.array([0.5, 0.5, 0.0, 0.25, 0.5, 0.0, 1.0, 0.0])
    sources = list(plots.SCENARIO_TYPES) * 2

    def evaluation(f1):
        figures = {"solve_precision": 0.5, "solve_rate": 0.4, "solve_f1": float(f1.mean())}
        return {**figures, "by_scenario": _by_scenario([f1[[i, i + 4]].mean() for i in range(4)]),
                "sampled": {"num_samples": 2, "solve_f1": 0.1, "best_solve_f1": 0.2,
                            "by_scenario": _by_scenario([0.1] * 4)},
                "train_subset": {"solve_f1": 0.3, "num_episodes": 16}}

    return {"preset": "tiny", "seed": 0, "algorithm": "grpo", "rl_steps": 30, "num_eval_envs": 8,
            "num_train_envs": 512, "eval_before": evaluation(f1_before), "eval_after": evaluation(f1_after),
            "paired_delta": {"greedy_solve_f1": paired_bootstrap(f1_before, f1_after, sources, num_resamples=200)},
            "eval_seconds": {"greedy": 61.0, "sampled": 80.5}, "wall_seconds": 1300.0}


def test_report_tables_the_run_and_links_its_figures(tmp_path):
    summary = _main_job_summary()
    figures = {"RL learning curves": "learning_curves.png", "per scenario": "scenario_bars.png"}
    path = report.write_report(summary, str(tmp_path / "report.md"), figures)
    text = open(path).read()
    assert "![RL learning curves](learning_curves.png)" in text and "](scenario_bars.png)" in text
    delta = summary["paired_delta"]["greedy_solve_f1"]
    assert f"| greedy Solve-F1 (headline) | 21.88 | 34.38 | +12.50 [{100 * delta['low']:+.2f}, " in text
    assert "| sampled Solve-F1, mean of 2 | 10.00 | 10.00 | +0.00 |" in text
    assert "| sampled Solve-F1, best of 2 | 20.00 | 20.00 | +0.00 |" in text
    assert "| greedy Solve-F1, 16 RL training envs | 30.00 | 30.00 | +0.00 |" in text
    assert "200 resamples" in text and "self/single_hop 2" in text
    assert "| self/multi_hop | 4 |" in text and "sampled F1 after" in text
    assert "greedy 61.0 s, sampled 80.5 s" in text and "1300.0 s" in text
    console = report.console_table(summary)
    assert "greedy Solve-F1 (headline)" in console and "+12.50 [" in console
    # Without per-environment rows there is no interval, and the report says why.
    del summary["paired_delta"]["greedy_solve_f1"]
    text = report.render_report(summary)
    assert "No paired interval" in text and "![" not in text
    assert not os.path.exists(str(tmp_path / "report.md.tmp"))


def test_the_report_names_the_intervals_confidence_and_the_environments_that_changed():
    summary = _main_job_summary()
    delta = dict(summary["paired_delta"]["greedy_solve_f1"], confidence=0.29, num_increased=3, num_decreased=1)
    summary["paired_delta"] = {"greedy_solve_f1": delta}
    text = report.render_report(summary)
    assert "after - before [29% interval]" in text and "29% interval from" in text and "28%" not in text
    assert "changed on 4 of the " in text and "(3 up, 1 down)" in text
    assert "after - before [29% interval]" in report.console_table(summary)
    # A summary without intervals keeps the usual heading.
    summary["paired_delta"] = {}
    assert "after - before [95% interval]" in report.render_report(summary)


def test_the_report_says_which_step_after_rl_is_and_the_curve_draws_validation(tmp_path):
    summary = _main_job_summary()
    assert report.selection_note(summary) == ""  # no validation points, nothing to say
    points = [{"step": 0, "solve_f1": 0.1}, {"step": 10, "solve_f1": 0.25}, {"step": 20, "solve_f1": 0.2}]
    summary.update(rl_steps=20, select="validation", selected_step=10,
                   validation={"num_envs": 64, "points": points, "best_step": 10, "best_solve_f1": 0.25})
    text = report.render_report(summary)
    assert "After RL is the policy of step 10 of 20, the best greedy Solve-F1 on 64 validation" in text
    assert "0: 10.00, 10: 25.00, 20: 20.00." in text and "step 10 of 20" in report.console_table(summary)
    assert "after equals before" not in text
    summary.update(selected_step=0)
    assert "step 0 of 20" in report.render_report(summary) and "after equals before by construction" in (
        report.render_report(summary))
    summary.update(select="last", selected_step=20)
    assert "the last step (20); greedy Solve-F1 on 64 validation environments was best at step 10" in (
        report.render_report(summary))
    records = _rl_records() + [{"phase": "validation", "step": p["step"], "solve_f1": p["solve_f1"]} for p in points]
    with_validation = _assert_png(plots.plot_learning_curves(records, str(tmp_path / "curves.png")))
    without = _assert_png(plots.plot_learning_curves(_rl_records(), str(tmp_path / "no_validation.png")))
    assert with_validation.shape == without.shape and not np.array_equal(with_validation, without)
    only_validation = [r for r in records if r["phase"] != "eval_curve"]
    _assert_png(plots.plot_learning_curves(only_validation, str(tmp_path / "validation_only.png")))
