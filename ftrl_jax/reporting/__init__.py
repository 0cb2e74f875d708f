"""Statistics, figures and the markdown report of a run, from plain dicts and arrays.

- `stats`: the paired, stratified percentile bootstrap of a before/after difference;
- `plots`: learning curves from `metrics.jsonl` records and per-scenario bar charts (matplotlib, Agg canvas);
- `report`: the main job's `report.md` and its console table.

This package imports nothing else of `ftrl_jax`: callers pass summaries, metric records and score arrays.
"""
