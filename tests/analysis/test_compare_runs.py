"""analysis.compare_runs: paired before/after figures of main-job runs, per pair and pooled over pairs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from analysis import compare_runs
from ftrl_jax.reporting import stats
from ftrl_jax.rollout.evaluation import SCENARIO_TYPES


def _episodes(f1, turns=2, envs="s0"):
    """One row per environment, 4 per scenario type in SCENARIO_TYPES order; f1 [16]; `envs` names the set."""
    return [{"data_source": SCENARIO_TYPES[i // 4], "env_key": f"{envs}-{i}", "end_reason": "no_tool_call",
             "num_turns": turns,
             "solve_precision": float(v), "solve_rate": float(v), "solve_f1": float(v)} for i, v in enumerate(f1)]


def _run(path, before, after, turns_after=3, sampled=False, envs="s0"):
    """A main-job workdir holding summary.json with both evaluations."""
    path.mkdir()
    summary = {"eval_before": {"episodes": _episodes(before, envs=envs)},
               "eval_after": {"episodes": _episodes(after, turns_after, envs=envs)}}
    if sampled:
        for key, f1 in (("eval_before", before), ("eval_after", after)):
            summary[key]["sampled"] = {"environments": [{"data_source": r["data_source"], "solve_f1": r["solve_f1"] / 2}
                                                        for r in _episodes(f1, envs=envs)]}
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "eval_before.json").write_text(json.dumps(summary["eval_before"]))
    return str(path)


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(0)
    start = rng.uniform(0, 1, 16).round(2)
    # Run a: single-hop environments (the first type) gain 0.4 each, the rest unchanged: headline +0.1.
    a = _run(tmp_path / "a", start, start + np.r_[np.full(4, 0.4), np.zeros(12)], sampled=True)
    # Run b, from the same start (same environments): every environment gains 0.2.
    b = _run(tmp_path / "b", start, start + 0.2, sampled=True)
    # Run c, another seed's environments: the third type loses 0.4, headline -0.1.
    start_c = rng.uniform(0, 1, 16).round(2)
    c = _run(tmp_path / "c", start_c, start_c - np.r_[np.zeros(8), np.full(4, 0.4), np.zeros(4)], envs="s1")
    return a, b, c


def test_a_run_against_its_start_and_pooled_over_runs(runs):
    a, _, c = runs
    result = compare_runs.run([a, c], bootstrap={"num_resamples": 500})
    first, second = result["pairs"]
    assert first["before"] == f"{a}:before" and first["after"] == a
    f1 = first["metrics"]["solve_f1"]
    assert f1["delta"] == pytest.approx(0.1) and f1["num_increased"] == 4 and f1["num_decreased"] == 0
    assert f1["low"] == f1["high"] == pytest.approx(0.1)  # resampled within type: each type's change is constant
    assert f1["num_strata"] == 4
    assert first["by_type"][SCENARIO_TYPES[0]]["after"] - first["by_type"][SCENARIO_TYPES[0]]["before"] == \
        pytest.approx(0.4)
    assert first["turns"] == {"before": 2.0, "after": 3.0}
    assert second["metrics"]["solve_f1"]["delta"] == pytest.approx(-0.1)
    pooled = result["pooled"]["metrics"]["solve_f1"]
    # Eight strata (pair, type) of equal weight: the mean of the two pairs' headline changes.
    assert pooled["delta"] == pytest.approx(0.0) and pooled["num_strata"] == 8 and pooled["num_pairs"] == 32
    assert set(pooled["pairs_by_stratum"]) == {f"{k}/{s}" for k in (0, 1) for s in SCENARIO_TYPES}
    assert pooled["num_increased"] == 4 and pooled["num_decreased"] == 4
    text = compare_runs.markdown(result)
    assert "| pooled | 2 pairs, 32 environments |" in text and "+10.00 [+10.00, +10.00]" in text
    assert "single_hop" in text and "2.00 -> 3.00" in text and "(2.00 -> 3.00)" in text  # mean turns, per type
    # A run pooled with itself, or with another run on its environments, would count environments twice.
    with pytest.raises(stats.UnpairedRowsError, match="share environments"):
        compare_runs.run([a, a], bootstrap={"num_resamples": 100})


def test_one_run_against_another_on_the_same_environments(runs):
    a, b, c = runs
    result = compare_runs.run([b], [a], bootstrap={"num_resamples": 500})
    f1 = result["pairs"][0]["metrics"]["solve_f1"]
    # b - a: single-hop environments -0.2, the other twelve +0.2; the headline is (-0.2 + 3 * 0.2) / 4.
    assert f1["delta"] == pytest.approx(0.1) and f1["num_increased"] == 12 and f1["num_decreased"] == 4
    assert result["pooled"] is None
    # The evaluation before RL named explicitly, and an evaluation file, give the run's own comparison.
    own = compare_runs.run([a], [f"{a}:before"], bootstrap={"num_resamples": 500})
    from_file = compare_runs.run([a], [f"{a}/eval_before.json"], bootstrap={"num_resamples": 500})
    assert own["pairs"][0]["metrics"] == from_file["pairs"][0]["metrics"] == \
        compare_runs.run([a], bootstrap={"num_resamples": 500})["pairs"][0]["metrics"]
    sampled = compare_runs.run([b], [a], evaluation="sampled", bootstrap={"num_resamples": 500})
    assert sampled["pairs"][0]["metrics"]["solve_f1"]["delta"] == pytest.approx(0.05)
    assert set(sampled["pairs"][0]["metrics"]) == {"solve_f1"} and "turns" not in sampled["pairs"][0]
    # Runs on other environments are not paired.
    with pytest.raises(stats.UnpairedRowsError, match="same seed's environments"):
        compare_runs.run([c], [a], bootstrap={"num_resamples": 100})
    assert compare_runs.run([b], [a], bootstrap={"num_resamples": 100})["notes"] == []


def _strip_keys(run_dir):
    """Rewrites a run's summary as an older run's, without env_key."""
    path = f"{run_dir}/summary.json"
    summary = json.load(open(path))
    for key in ("eval_before", "eval_after"):
        for row in summary[key]["episodes"]:
            del row["env_key"]
    with open(path, "w") as f:
        json.dump(summary, f)


def test_older_runs_without_env_keys_are_paired_by_their_held_out_files(runs):
    a, b, c = runs
    for run_dir in (a, b, c):
        _strip_keys(run_dir)
    # Same sources in the same order: nothing tells seed 1's environments from seed 0's but their files.
    result = compare_runs.run([c], [a], bootstrap={"num_resamples": 100})
    assert "no envs/eval.jsonl" in result["notes"][0]
    for run_dir, text in ((a, "seed 0\n"), (b, "seed 0\n"), (c, "seed 1\n")):
        os.makedirs(f"{run_dir}/envs")
        with open(f"{run_dir}/envs/eval.jsonl", "w") as f:
            f.write(text)
    with pytest.raises(stats.UnpairedRowsError, match="envs/eval.jsonl differ"):
        compare_runs.run([c], [a], bootstrap={"num_resamples": 100})
    assert compare_runs.run([b], [a], bootstrap={"num_resamples": 100})["notes"] == []
    # Keyless runs of one seed's environments are not pooled either.
    with pytest.raises(stats.UnpairedRowsError, match="same environments"):
        compare_runs.run([a, b], bootstrap={"num_resamples": 100})
    pooled = compare_runs.run([a, c], bootstrap={"num_resamples": 100})["pooled"]
    assert pooled["metrics"]["solve_f1"]["num_pairs"] == 32


def test_a_keyless_run_against_its_own_start_needs_no_note(runs):
    a, _, _ = runs
    _strip_keys(a)
    assert compare_runs.run([a], bootstrap={"num_resamples": 100})["notes"] == []


def test_the_command_prints_the_table_writes_json_and_refuses_bad_input(runs, tmp_path, capsys):
    a, b, c = runs
    out = tmp_path / "cmp.json"
    assert compare_runs.main(["prog", f"--after={a},{c}", f"--output={out}", "--bootstrap_resamples=200"]) == 0
    printed = capsys.readouterr().out
    assert "| pooled |" in printed and f"wrote {out}" in printed
    saved = json.loads(out.read_text())
    assert saved["pooled"]["metrics"]["solve_f1"]["num_resamples"] == 200 and len(saved["pairs"]) == 2
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    assert compare_runs.main(["prog", f"--after={unfinished}"]) == 2
    assert "no summary.json" in capsys.readouterr().err
    assert compare_runs.main(["prog", f"--after={a}", f"--before={a},{b}"]) == 2
    assert "one before run per after run" in capsys.readouterr().err
    assert compare_runs.main(["prog", f"--after={c}", f"--before={a}"]) == 2
    assert "same seed's environments" in capsys.readouterr().err
    assert compare_runs.main(["prog", f"--after={c}", "--evaluation=sampled"]) == 2
    assert "--config.eval.num_samples" in capsys.readouterr().err
    assert compare_runs.main(["prog", f"--after={a}/eval_before.json"]) == 2  # a file without its start
    assert "no evaluation before RL of its own; name what to compare it with in --before" in capsys.readouterr().err
    assert compare_runs.main(["prog", f"--after={a}", f"--before={a}/eval_before.json:before"]) == 2
    assert "is one evaluation, not a run's summary.json" in capsys.readouterr().err
    assert compare_runs.main(["prog", f"--after={a}:before"]) == 2
    assert "name what to compare it with in --before" in capsys.readouterr().err
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text(json.dumps({"eval_before": {"solve_f1": 0.1},
                                                              "eval_after": {"solve_f1": 0.2}}))
    assert compare_runs.main(["prog", f"--after={tmp_path / 'old'}"]) == 2
    assert "no per-environment rows" in capsys.readouterr().err
    assert compare_runs.main(["prog", f"--after={a}", f"--output={tmp_path / 'no' / 'x.json'}"]) == 2
    assert "--output=" in capsys.readouterr().err
    assert compare_runs.main(["prog", f"--after={a}", f"--output={a}/summary.json"]) == 2
    assert "is one of the runs read" in capsys.readouterr().err and "eval_after" in open(f"{a}/summary.json").read()
    assert compare_runs.main(["prog", f"--after={a}", "--confidence=0.995", "--bootstrap_resamples=50"]) == 0
    assert "change [99.5%]" in capsys.readouterr().out
    bad = tmp_path / "bad"
    bad.mkdir()
    summary = json.load(open(f"{a}/summary.json"))
    summary["eval_after"]["episodes"] = {"rows": 1}
    (bad / "summary.json").write_text(json.dumps(summary))
    assert compare_runs.main(["prog", f"--after={bad}"]) == 2
    assert "'episodes' must be a list of per-environment objects, got dict" in capsys.readouterr().err
    summary["eval_after"]["episodes"] = [dict(r, solve_f1="abc") for r in summary["eval_before"]["episodes"]]
    (bad / "summary.json").write_text(json.dumps(summary))
    assert compare_runs.main(["prog", f"--after={bad}"]) == 2
    assert f"{bad}:before and {bad}: solve_f1:" in capsys.readouterr().err
