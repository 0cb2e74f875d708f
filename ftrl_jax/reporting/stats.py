"""The paired, stratified percentile bootstrap of a before/after difference in per-environment scores.

The statistic is the one the headline uses: the mean over strata (scenario types) of the per-stratum mean
of `after - before`, so every stratum weighs the same whatever its number of environments. A resample
draws, inside every stratum, as many environments as it holds, uniformly with replacement, and keeps each
environment's before and after score together (paired). The interval is the percentile interval of the
resampled statistic (Efron and Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13); the
stratified resampling is their section 8.4 / Davison and Hinkley (1997) section 3.7.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 10_000
# Resampled indices are drawn in chunks of at most this many entries (int64), bounding memory at ~32 MB.
_CHUNK_ENTRIES = 1 << 22
# Statistics within this fraction of the largest |difference| of zero are rounding of an exact zero (e.g.
# (0.1 + 0.2 - 0.3) / 3 is 1.9e-17 in floating point), and are set to zero.
_ZERO_TOLERANCE = 1e-12


def _strata_indices(strata: Sequence[Hashable] | None, n: int) -> list[tuple[Hashable, np.ndarray]]:
    """(label, indices) per stratum, sorted by label so draws do not depend on the order of environments."""
    if strata is None:
        return [("all", np.arange(n))]
    if len(strata) != n:
        raise ValueError(f"strata has {len(strata)} labels for {n} pairs; give one label per environment")
    labels = sorted(set(strata), key=str)
    return [(label, np.asarray([i for i, s in enumerate(strata) if s == label])) for label in labels]


def stratified_mean(values: Sequence[float] | np.ndarray, strata: Sequence[Hashable] | None = None) -> float:
    """Mean over strata of the per-stratum mean of `values` [N]; the plain mean when `strata` is None."""
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"expected a non-empty 1-D array of scores, got shape {values.shape}")
    return float(np.mean([values[idx].mean() for _, idx in _strata_indices(strata, values.size)]))


def paired_bootstrap(before: Sequence[float] | np.ndarray, after: Sequence[float] | np.ndarray,
                     strata: Sequence[Hashable] | None = None, *, num_resamples: int = DEFAULT_RESAMPLES,
                     confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Percentile bootstrap interval of the stratified mean paired difference `after - before`.

    `before`, `after`: float scores [N] of the same N environments in the same order (e.g. Solve-F1 in
    [0, 1]); `strata`: N labels (scenario types) or None for one stratum. Resampling environments inside each
    stratum, `num_resamples` times with `np.random.default_rng(seed)`, gives the same interval for the same
    inputs and seed.

    Returns a JSON-ready dict, scores in the inputs' units: `delta` (the statistic on the data), `low` and
    `high` (the `confidence` percentile interval), `before` and `after` (their stratified means),
    `share_positive` (share of resamples with a difference above zero; a statistic that is zero up to
    floating-point rounding counts as zero), `num_increased` and `num_decreased` (environments whose score rose
    or fell: with few of them the interval rests on those few), `num_pairs`, `num_strata`, `pairs_by_stratum`,
    `num_resamples`, `confidence`, `seed`.

    Raises ValueError on different lengths, no pairs, non-finite scores, `num_resamples` < 1 or a
    `confidence` outside (0, 1).
    """
    before = np.asarray(before, np.float64)
    after = np.asarray(after, np.float64)
    if before.shape != after.shape or before.ndim != 1:
        raise ValueError(f"before {before.shape} and after {after.shape} must be 1-D scores of the same environments")
    if before.size == 0:
        raise ValueError("no paired scores to compare")
    if not (np.isfinite(before).all() and np.isfinite(after).all()):
        raise ValueError("scores must be finite")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    diff = after - before
    groups = _strata_indices(strata, diff.size)
    rng = np.random.default_rng(seed)
    resampled = np.zeros(num_resamples)
    for _, idx in groups:
        values = diff[idx]
        chunk = max(1, _CHUNK_ENTRIES // values.size)
        means = []
        for start in range(0, num_resamples, chunk):
            rows = min(chunk, num_resamples - start)
            means.append(values[rng.integers(0, values.size, size=(rows, values.size))].mean(axis=1))
        resampled += np.concatenate(means)
    resampled /= len(groups)
    tolerance = _ZERO_TOLERANCE * float(np.abs(diff).max())
    resampled[np.abs(resampled) <= tolerance] = 0.0
    delta = stratified_mean(diff, strata)
    if abs(delta) <= tolerance:
        delta = 0.0
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return {"delta": delta, "low": float(low), "high": float(high),
            "before": stratified_mean(before, strata), "after": stratified_mean(after, strata),
            "share_positive": float((resampled > 0).mean()), "num_increased": int((diff > 0).sum()),
            "num_decreased": int((diff < 0).sum()), "num_pairs": int(diff.size),
            "num_strata": len(groups), "pairs_by_stratum": {str(label): int(idx.size) for label, idx in groups},
            "num_resamples": int(num_resamples), "confidence": float(confidence), "seed": int(seed)}


class UnpairedRowsError(ValueError):
    """Two lists of per-environment rows that are not the same environments in the same order."""


def _headline_rows(rows_before: Sequence[Mapping[str, Any]], rows_after: Sequence[Mapping[str, Any]], metric: str,
                   headline_sources: Collection[str]) -> tuple[list[float], list[float], list[str] | None]:
    """(before scores, after scores, strata or None) of the rows a headline counts; see `paired_rows_bootstrap`."""
    if len(rows_before) != len(rows_after):
        raise UnpairedRowsError(f"the two evaluations hold {len(rows_before)} and {len(rows_after)} environments; "
                                "no paired interval")
    sources = [r["data_source"] for r in rows_before]
    if sources != [r["data_source"] for r in rows_after]:
        raise UnpairedRowsError("the two evaluations' environments differ in their sources at the same positions "
                                "(other environments, or another order); no paired interval")
    keys_before = [r.get("env_key") for r in rows_before]
    keys_after = [r.get("env_key") for r in rows_after]
    if None not in keys_before and None not in keys_after and keys_before != keys_after:
        differ = sum(a != b for a, b in zip(keys_before, keys_after))
        raise UnpairedRowsError(f"the two evaluations are of other environments: their env_key differ at {differ} "
                                f"of {len(keys_before)} positions; no paired interval")
    keep = [i for i, s in enumerate(sources) if s in headline_sources]
    strata = [sources[i] for i in keep] if keep else None
    keep = keep or list(range(len(sources)))
    return [rows_before[i][metric] for i in keep], [rows_after[i][metric] for i in keep], strata


def paired_rows_bootstrap(rows_before: Sequence[Mapping[str, Any]], rows_after: Sequence[Mapping[str, Any]],
                          metric: str = "solve_f1", *, headline_sources: Collection[str] = (),
                          **kwargs: Any) -> dict[str, Any]:
    """`paired_bootstrap` of per-environment rows (dicts with `data_source` and `metric`, e.g. an evaluation
    report's episodes), on the same footing as the headline the rows make.

    Both lists must hold the same environments in the same order (checked by source, and by `env_key`,
    `samples.environment_key`, where every row of both lists has one). When some rows' sources are in
    `headline_sources` (the scenario types a headline averages) only those rows count, resampled within
    their source, as the headline's mean over types; otherwise every row counts, resampled as one stratum, as
    a headline's fallback, the plain mean over environments. `kwargs` go to `paired_bootstrap`
    (num_resamples, confidence, seed).

    Raises UnpairedRowsError (a ValueError) when the lists differ in length, in their sequence of sources or
    of environment keys, and ValueError on what `paired_bootstrap` refuses (non-finite scores, bad settings).
    """
    return paired_bootstrap(*_headline_rows(rows_before, rows_after, metric, headline_sources), **kwargs)


def pooled_rows_bootstrap(pairs: Sequence[tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]]],
                          metric: str = "solve_f1", *, headline_sources: Collection[str] = (),
                          **kwargs: Any) -> dict[str, Any]:
    """`paired_rows_bootstrap` pooled over several pairs of evaluations (e.g. one per seed, each on its own
    environments): every pair's rows are chosen as there, and the strata are (pair, source), labelled
    `"{index}/{source}"` (`"{index}/all"` for a pair counted as one stratum).

    Every stratum weighs the same, so with the same number of scenario types in every pair the statistic is
    the mean over pairs of each pair's headline difference. Pairs must be of different environments: two
    pairs whose rows share an `env_key` are refused, since resampling them apart would count those
    environments twice and narrow the interval. Raises UnpairedRowsError naming the first pair that is not
    paired, or two pairs that share environments (by their index in `pairs`), ValueError on no pairs and on
    what `paired_bootstrap` refuses.
    """
    if not pairs:
        raise ValueError("no pairs of evaluations to pool")
    seen: dict[str, int] = {}
    for index, (_, rows_after) in enumerate(pairs):
        for key in {r.get("env_key") for r in rows_after} - {None}:
            if seen.setdefault(key, index) != index:
                raise UnpairedRowsError(f"pairs {seen[key]} and {index} share environments (env_key {key}); pooling "
                                        "them would count those environments twice")
    before: list[float] = []
    after: list[float] = []
    strata: list[str] = []
    for index, (rows_before, rows_after) in enumerate(pairs):
        try:
            b, a, s = _headline_rows(rows_before, rows_after, metric, headline_sources)
        except UnpairedRowsError as err:
            raise UnpairedRowsError(f"pair {index}: {err}") from None
        before += b
        after += a
        strata += [f"{index}/{label}" for label in (s or ["all"] * len(b))]
    return paired_bootstrap(before, after, strata, **kwargs)
