"""Evaluation on tool-use environments, scored as in FTRL's results table.

`evaluate` plays every sample to the end (`rollout.episodes.play_episodes`) with a greedy turn generator and
reports per-episode solve metrics, their means per `data_source`, and the paper's headline figure: the
average over the four scenario types of the per-type means (each type weighs the same, whatever its
number of samples).

`evaluate_sampled` plays every sample k times with a sampling generator, all k x N episodes as one batch,
and reports per environment the mean over its k samples and the best of them (best-of-k Solve-F1), then the
same per-source means and scenario-type average (`summarize_sampled`). Sampled figures measure the policy RL
optimises; they are not comparable with the paper's greedy table.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ftrl_jax.envs.samples import Sample, environment_key
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.rollout.episodes import END_REASONS, Episode, TurnGenerator, play_episodes

# The columns of FTRL's results table, as data_source values of its test set.
SCENARIO_TYPES = ("self/single_hop", "self/parallel_single_hop", "self/multi_hop", "self/parallel_multi_hop")
METRICS = ("solve_precision", "solve_rate", "solve_f1")
# Per environment, over its k sampled episodes: the means of METRICS and the best Solve-F1.
SAMPLED_METRICS = METRICS + ("best_solve_f1",)


class _TimedReport:
    """What both reports share: episodes per minute and a JSON form (subclasses are dataclasses with
    `num_episodes` and `seconds`)."""

    @property
    def episodes_per_minute(self) -> float:
        return 60.0 * self.num_episodes / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON-ready data (episodes_per_minute included)."""
        return {**dataclasses.asdict(self), "episodes_per_minute": self.episodes_per_minute}


@dataclasses.dataclass
class EvalReport(_TimedReport):
    """What an evaluation measured.

    `episodes`: one dict per sample, in order (data_source, env_key, end_reason, num_turns and the trajectory
    metrics; `episode_row`). `per_source`: data_source -> mean of each of METRICS, plus `count`. `scenario_average`:
    mean over the scenario types present of their per-type means (`missing_types` lists the absent
    ones). `end_reasons`: how many episodes ended for each reason.
    """

    episodes: list[dict[str, Any]]
    per_source: dict[str, dict[str, float]]
    scenario_average: dict[str, float]
    missing_types: list[str]
    end_reasons: dict[str, int]
    num_episodes: int
    num_turns: int
    seconds: float

    def summary(self) -> str:
        """A table in percent, like the paper's: Solve-P / Solve-R / Solve-F1 per source and averaged."""
        lines = [f"{'data_source':<28}{'n':>5}{'Solve-P':>9}{'Solve-R':>9}{'Solve-F1':>9}"]
        for source, means in sorted(self.per_source.items()):
            lines.append(f"{source:<28}{int(means['count']):>5}"
                         + "".join(f"{100 * means[m]:>9.2f}" for m in METRICS))
        if self.scenario_average:
            label = "average of scenario types" + (" *" if self.missing_types else "")
            lines.append(f"{label:<28}{'':>5}" + "".join(f"{100 * self.scenario_average[m]:>9.2f}" for m in METRICS))
        if self.missing_types:
            lines.append(f"* scenario types missing from the samples: {', '.join(self.missing_types)}")
        lines.append(f"{self.num_episodes} episodes, {self.num_turns} turns in {self.seconds:.1f} s "
                     f"({self.episodes_per_minute:,.1f} episodes/min)")
        for reason, count in sorted(self.end_reasons.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  ended {count:>6} {reason}: {END_REASONS.get(reason, '')}")
        return "\n".join(lines)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def episode_row(episode: Episode) -> dict[str, Any]:
    """The per-episode line of a report: source, the environment's `samples.environment_key`, why it ended,
    how many turns, and its metrics."""
    return {"data_source": episode.sample.data_source, "env_key": environment_key(episode.sample),
            "end_reason": episode.end_reason, "num_turns": len(episode.turns), **episode.metrics}


def summarize(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = METRICS
              ) -> tuple[dict[str, dict[str, float]], dict[str, float], list[str]]:
    """Pure scoring of per-episode rows: (per-source means with counts, scenario-type average, missing types).

    Each row holds `data_source` and every name in `metrics` (default: Solve-P, Solve-R, Solve-F1).
    """
    by_source: dict[str, list[Mapping[str, Any]]] = collections.defaultdict(list)
    for row in rows:
        by_source[row["data_source"]].append(row)
    per_source = {
        source: {**{m: _mean([float(r[m]) for r in group]) for m in metrics}, "count": float(len(group))}
        for source, group in by_source.items()
    }
    present = [t for t in SCENARIO_TYPES if t in per_source]
    average = {m: _mean([per_source[t][m] for t in present]) for m in metrics} if present else {}
    return per_source, average, [t for t in SCENARIO_TYPES if t not in per_source]


def evaluate(generator: TurnGenerator, samples: Sequence[Sample | Mapping[str, Any]], *, max_turns: int = 20,
             sandbox: Sandbox | None = None) -> EvalReport:
    """Plays every sample greedily and scores the episodes (see `EvalReport`).

    The generator must be greedy: one that declares a `temperature` above 0 (as `LocalPolicy` does) is
    refused, since sampled evaluations are not comparable with the paper's figures.
    """
    temperature = getattr(generator, "temperature", 0.0)
    if temperature:
        raise ValueError(f"evaluation is greedy, but the generator samples at temperature={temperature}; "
                         "build it with temperature=0.0")
    started = time.perf_counter()
    episodes = play_episodes(generator, samples, max_turns=max_turns, sandbox=sandbox)
    seconds = time.perf_counter() - started
    rows = [episode_row(episode) for episode in episodes]
    per_source, average, missing = summarize(rows)
    return EvalReport(
        episodes=rows,
        per_source=per_source,
        scenario_average=average,
        missing_types=missing,
        end_reasons=dict(collections.Counter(episode.end_reason for episode in episodes)),
        num_episodes=len(episodes),
        num_turns=sum(len(episode.turns) for episode in episodes),
        seconds=seconds,
    )


@dataclasses.dataclass
class SampledReport(_TimedReport):
    """What a sampled evaluation (k episodes per environment) measured.

    `environments`: one dict per sample, in order: data_source, the means over its k episodes of METRICS
    and `best_solve_f1` (the largest of its k Solve-F1 values). `per_source` and `scenario_average`: as in
    `EvalReport`, over those per-environment values (SAMPLED_METRICS), so `scenario_average["solve_f1"]` is
    the mean sampled Solve-F1 and `scenario_average["best_solve_f1"]` the best-of-k one. `end_reasons`,
    `num_episodes` (k x environments) and `num_turns` count episodes; `seconds` is wall time.
    """

    num_samples: int
    environments: list[dict[str, Any]]
    per_source: dict[str, dict[str, float]]
    scenario_average: dict[str, float]
    missing_types: list[str]
    end_reasons: dict[str, int]
    num_episodes: int
    num_turns: int
    seconds: float


def summarize_sampled(rows: Sequence[Mapping[str, Any]], num_samples: int
                      ) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]], dict[str, float], list[str]]:
    """Pure scoring of sampled episodes: (per-environment rows, per-source means, scenario average, missing types).

    `rows`: episode rows (`episode_row`) in sample-major order, the k = `num_samples` episodes of an environment
    next to each other. Per environment: the mean over its k episodes of each of METRICS and `best_solve_f1`,
    the largest of its k Solve-F1 values; those are then averaged as `summarize` does (SAMPLED_METRICS).
    Rows that carry `env_key` keep it on their environment's row. Raises ValueError when the rows do not split
    into groups of k episodes of one data_source (and one env_key, where rows carry one).
    """
    if num_samples < 1 or len(rows) % num_samples:
        raise ValueError(f"{len(rows)} episode rows do not split into groups of num_samples={num_samples}")
    environments = []
    for start in range(0, len(rows), num_samples):
        group = rows[start:start + num_samples]
        sources = {r["data_source"] for r in group}
        if len(sources) != 1:
            raise ValueError(f"episodes {start}..{start + num_samples - 1} mix data sources {sorted(sources)}; "
                             "rows must be sample-major (the k episodes of an environment together)")
        keys = {r.get("env_key") for r in group}
        if len(keys) != 1:
            raise ValueError(f"episodes {start}..{start + num_samples - 1} are of {len(keys)} environments (env_key); "
                             "rows must be sample-major (the k episodes of an environment together)")
        key = {"env_key": group[0]["env_key"]} if "env_key" in group[0] else {}
        environments.append({"data_source": group[0]["data_source"], **key,
                             **{m: _mean([float(r[m]) for r in group]) for m in METRICS},
                             "best_solve_f1": max(float(r["solve_f1"]) for r in group)})
    per_source, average, missing = summarize(environments, SAMPLED_METRICS)
    return environments, per_source, average, missing


def evaluate_sampled(generator: TurnGenerator, samples: Sequence[Sample | Mapping[str, Any]], *, num_samples: int,
                     max_turns: int = 20, sandbox: Sandbox | None = None) -> SampledReport:
    """Plays every sample `num_samples` times with a sampling generator, as one batch; see `SampledReport`.

    The k copies of a sample go to the generator next to each other (a `LocalPolicy` then prefills their
    shared prompt once and keeps them in one micro-batch). A generator that declares `temperature` 0 is
    refused: its k episodes would be one episode k times.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if getattr(generator, "temperature", None) == 0:
        raise ValueError("sampled evaluation needs a generator with temperature > 0 (this one is greedy); "
                         "use `evaluate` for greedy figures")
    started = time.perf_counter()
    repeated = [sample for sample in samples for _ in range(num_samples)]
    episodes = play_episodes(generator, repeated, max_turns=max_turns, sandbox=sandbox)
    seconds = time.perf_counter() - started
    environments, per_source, average, missing = summarize_sampled([episode_row(e) for e in episodes], num_samples)
    return SampledReport(
        num_samples=num_samples,
        environments=environments,
        per_source=per_source,
        scenario_average=average,
        missing_types=missing,
        end_reasons=dict(collections.Counter(episode.end_reason for episode in episodes)),
        num_episodes=len(episodes),
        num_turns=sum(len(episode.turns) for episode in episodes),
        seconds=seconds,
    )
