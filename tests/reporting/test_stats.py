"""The paired, stratified bootstrap: coverage of a known difference, a null straddling zero, strata, determinism."""

import numpy as np
import pytest

from ftrl_jax.reporting.stats import (UnpairedRowsError, paired_bootstrap, paired_rows_bootstrap, pooled_rows_bootstrap,
                                     stratified_mean)


def test_a_known_paired_difference_is_covered_and_excludes_zero():
    rng = np.random.default_rng(1)
    before = rng.uniform(0.0, 0.6, size=64)
    after = before + 0.2 + rng.normal(0.0, 0.05, size=64)  # the true gain is 0.2 for every environment
    result = paired_bootstrap(before, after, num_resamples=4000, seed=0)
    assert result["delta"] == pytest.approx(np.mean(after - before))
    assert 0.0 < result["low"] < 0.2 < result["high"]
    assert result["share_positive"] == 1.0
    assert result["num_pairs"] == 64 and result["num_strata"] == 1 and result["num_resamples"] == 4000


def test_a_null_difference_straddles_zero():
    before = np.tile([0.0, 1.0], 20)
    after = np.tile([1.0, 0.0], 20)  # half gain one point, half lose one: no change on average
    result = paired_bootstrap(before, after, num_resamples=2000, seed=3)
    assert result["delta"] == 0.0
    assert result["low"] < 0.0 < result["high"]
    assert 0.3 < result["share_positive"] < 0.7


def test_percentile_intervals_reach_their_nominal_coverage():
    # 200 simulated evaluations of 64 environments with a true mean gain of 0.1 (noisy per environment).
    covered = 0
    for trial in range(200):
        rng = np.random.default_rng(100 + trial)
        before = rng.uniform(0.0, 1.0, size=64)
        after = before + 0.1 + rng.normal(0.0, 0.3, size=64)
        result = paired_bootstrap(before, after, num_resamples=1000, seed=trial)
        covered += result["low"] <= 0.1 <= result["high"]
    assert 0.88 <= covered / 200 <= 0.99


def test_strata_weigh_equally_and_are_resampled_within():
    # 90 environments of one type that did not change, 10 of another that all gained one point.
    strata = ["a"] * 90 + ["b"] * 10
    before = np.zeros(100)
    after = np.r_[np.zeros(90), np.ones(10)]
    stratified = paired_bootstrap(before, after, strata, num_resamples=500, seed=0)
    pooled = paired_bootstrap(before, after, None, num_resamples=500, seed=0)
    # The headline's weighting: each type's mean counts once, so the gain is (0 + 1) / 2.
    assert stratified["delta"] == 0.5 and stratified["after"] == 0.5 and stratified["before"] == 0.0
    assert pooled["delta"] == pytest.approx(0.1)
    # Each resample keeps 90 and 10 environments of the types, whose differences are constant: no spread.
    assert stratified["low"] == stratified["high"] == 0.5
    assert pooled["low"] < 0.1 < pooled["high"]  # resampling across types changes their mix
    assert stratified["pairs_by_stratum"] == {"a": 90, "b": 10} and stratified["num_strata"] == 2
    assert stratified_mean(after, strata) == 0.5 and stratified_mean(after) == pytest.approx(0.1)


def test_the_same_seed_gives_the_same_interval():
    rng = np.random.default_rng(7)
    before, after = rng.uniform(size=40), rng.uniform(size=40)
    strata = ["x", "y"] * 20
    first = paired_bootstrap(before, after, strata, num_resamples=1000, seed=5)
    assert paired_bootstrap(before, after, strata, num_resamples=1000, seed=5) == first
    other = paired_bootstrap(before, after, strata, num_resamples=1000, seed=6)
    assert other["delta"] == first["delta"] and (other["low"], other["high"]) != (first["low"], first["high"])


def test_large_resample_counts_are_drawn_in_chunks_with_the_same_statistic():
    before, after = np.zeros(3000), np.r_[np.zeros(1500), np.ones(1500)]
    result = paired_bootstrap(before, after, num_resamples=3000, seed=0)  # 9M draws: several chunks
    assert result["delta"] == 0.5 and 0.47 < result["low"] < 0.5 < result["high"] < 0.53


@pytest.mark.parametrize("kwargs, match", [
    (dict(before=[0.1, 0.2], after=[0.3]), "same environments"),
    (dict(before=[], after=[]), "no paired scores"),
    (dict(before=[0.1, float("nan")], after=[0.1, 0.2]), "finite"),
    (dict(before=[0.1], after=[0.2], num_resamples=0), "num_resamples"),
    (dict(before=[0.1], after=[0.2], confidence=1.0), "confidence"),
    (dict(before=[0.1, 0.2], after=[0.2, 0.3], strata=["a"]), "one label per environment"),
])
def test_bad_inputs_say_what_is_wrong(kwargs, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(**kwargs)


def test_reporting_imports_nothing_else_of_the_package():
    import ast
    import pathlib

    import ftrl_jax.reporting

    for path in pathlib.Path(ftrl_jax.reporting.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith("ftrl_jax") or name.startswith("ftrl_jax.reporting"), (path.name, name)


def test_a_zero_difference_that_floating_point_rounds_is_not_a_gain():
    # Differences 0.1, 0.2 and -0.3 average to zero, but (0.1 + 0.2 - 0.3) / 3 is 1.9e-17 in floating point:
    # resamples that draw each environment once must not count as gains.
    before, after = [0.0, 0.0, 0.3], [0.1, 0.2, 0.0]
    result = paired_bootstrap(before, after, num_resamples=20_000, seed=0)
    assert result["delta"] == 0.0
    rng = np.random.default_rng(0)
    draws = np.sort(rng.integers(0, 3, size=(20_000, 3)), axis=1)
    diff = np.array([0.1, 0.2, -0.3])
    exact_positive = np.mean([(diff[row].sum() > 1e-9) for row in draws])  # gains in exact arithmetic
    assert result["share_positive"] == pytest.approx(exact_positive)
    assert result["num_increased"] == 2 and result["num_decreased"] == 1


def test_the_environments_that_changed_are_counted():
    before = np.zeros(64)
    after = np.zeros(64)
    after[[6, 10, 58]] = [0.4, 0.1, 0.3]
    after[20] = -0.2
    result = paired_bootstrap(before, after, num_resamples=100, seed=0)
    assert result["num_increased"] == 3 and result["num_decreased"] == 1 and result["num_pairs"] == 64


def test_rows_are_paired_by_position_and_the_headline_sources_alone_count():
    before = [{"data_source": "single_hop", "solve_f1": 0.0}, {"data_source": "multi_hop", "solve_f1": 0.5},
              {"data_source": "toolhop", "solve_f1": 0.0}]
    after = [dict(before[0], solve_f1=1.0), dict(before[1], solve_f1=0.5), dict(before[2], solve_f1=1.0)]
    # No headline source given: every row counts, as one stratum (the plain mean over environments).
    everything = paired_rows_bootstrap(before, after, num_resamples=200)
    assert everything["delta"] == pytest.approx((1.0 + 0.0 + 1.0) / 3) and everything["num_strata"] == 1
    headline = paired_rows_bootstrap(before, after, headline_sources=("single_hop", "multi_hop"), num_resamples=200)
    assert headline["delta"] == pytest.approx(0.5) and headline["num_pairs"] == 2  # toolhop left out
    assert headline["num_strata"] == 2 and headline["low"] == headline["high"] == 0.5  # resampled within types
    # No row from a headline source: every row counts.
    assert paired_rows_bootstrap(before, after, headline_sources=("parallel_single_hop",),
                                 num_resamples=200)["num_pairs"] == 3
    with pytest.raises(UnpairedRowsError, match="differ in their sources at the same positions"):
        paired_rows_bootstrap(before, after[::-1], num_resamples=200)
    with pytest.raises(UnpairedRowsError, match="hold 3 and 2 environments"):
        paired_rows_bootstrap(before, after[:2], num_resamples=200)
    with pytest.raises(ValueError, match="finite") as refused:
        paired_rows_bootstrap(before, [dict(after[0], solve_f1=float("nan"))] + after[1:], num_resamples=200)
    assert not isinstance(refused.value, UnpairedRowsError)


def test_rows_of_other_environments_are_not_paired_by_their_keys():
    before = [{"data_source": "single_hop", "env_key": k, "solve_f1": 0.0} for k in ("a", "b")]
    after = [dict(before[0], solve_f1=1.0), dict(before[1], env_key="c", solve_f1=1.0)]
    with pytest.raises(UnpairedRowsError, match="env_key differ at 1 of 2 positions"):
        paired_rows_bootstrap(before, after, num_resamples=100)
    # Rows without keys (older evaluations) are paired by their sources alone.
    assert paired_rows_bootstrap([{k: v for k, v in r.items() if k != "env_key"} for r in before],
                                 after, num_resamples=100)["delta"] == 1.0


def test_pooled_rows_weigh_every_pair_and_type_alike():
    def rows(f1, source="single_hop"):
        return [{"data_source": source, "solve_f1": v} for v in f1]

    # Pair 0: two types, changes +1 and 0 (headline +0.5). Pair 1: one type of four rows, change -0.1.
    pair0 = (rows([0.0, 0.0]) + rows([0.5], "multi_hop"), rows([1.0, 1.0]) + rows([0.5], "multi_hop"))
    pair1 = (rows([0.2] * 4), rows([0.1] * 4))
    headline = ("single_hop", "multi_hop")
    pooled = pooled_rows_bootstrap([pair0, pair1], headline_sources=headline, num_resamples=200)
    assert pooled["delta"] == pytest.approx((1.0 + 0.0 - 0.1) / 3) and pooled["num_pairs"] == 7
    assert pooled["pairs_by_stratum"] == {"0/multi_hop": 1, "0/single_hop": 2, "1/single_hop": 4}
    assert pooled["low"] == pooled["high"] == pytest.approx(pooled["delta"])  # constant within every stratum
    # A pair without headline sources counts as one stratum.
    other = (rows([0.0], "toolhop"), rows([1.0], "toolhop"))
    assert "1/all" in pooled_rows_bootstrap([pair0, other], headline_sources=headline,
                                            num_resamples=50)["pairs_by_stratum"]
    with pytest.raises(UnpairedRowsError, match="pair 1: the two evaluations hold 4 and 3"):
        pooled_rows_bootstrap([pair0, (pair1[0], pair1[1][:3])], num_resamples=50)
    with pytest.raises(ValueError, match="no pairs"):
        pooled_rows_bootstrap([])


def test_pairs_that_share_environments_are_not_pooled():
    rows = [{"data_source": "single_hop", "env_key": k, "solve_f1": 0.0} for k in ("a", "b")]
    other = [dict(r, env_key=r["env_key"] + "2") for r in rows]
    assert pooled_rows_bootstrap([(rows, rows), (other, other)], num_resamples=20)["num_pairs"] == 4
    with pytest.raises(UnpairedRowsError, match="pairs 0 and 1 share environments"):
        pooled_rows_bootstrap([(rows, rows), (rows, rows)], num_resamples=20)
