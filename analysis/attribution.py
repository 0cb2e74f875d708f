"""Restore-based attribution: which parameter groups carry the RL gain, tested by running the model.

`analysis.layer_deltas` measures where RL moved the parameters; this tests whether those moves matter.
It evaluates (greedy, multi-turn, as `ftrl_jax.rollout.evaluation.evaluate` with `LocalPolicy`):

    python -m analysis.attribution --base=DIR --tuned=DIR --data=PATH --output=OUT \\
        [--limit=N] [--max_turns=T] [--max_new_tokens=K] [--groups=mlp_lower,...] [--tokenizer=DIR]

- `base` and `tuned` themselves;
- `restore:<group>`: the tuned policy with one parameter group put back to its base values;
- `graft:<group>`: the base policy with only that group taken from the tuned one;

for the groups of `GROUPS`: the MLP (`layers/mlp/*`) and the attention (`layers/self_attn/*`, its biases
and q/k norms included) of the lower, middle and upper third of the decoder layers (the thirds of
`analysis.layer_deltas.depth_of`), and all MLP / all attention. Embeddings, norms outside attention and
the output head always stay with the policy being evaluated. Each variant reports Solve-P / Solve-R /
Solve-F1 (the average over scenario types, as the paper's table; the mean over episodes when the data
has no scenario types) and the share of the RL gain it keeps,

    gain_kept = (F1_variant - F1_base) / (F1_tuned - F1_base),

which is undefined (left empty, and said so) when |F1_tuned - F1_base| < --min_gain. If the lower-layer
MLP carries the gain, as the FTRL paper argues, `restore:mlp_lower` keeps little of it and
`graft:mlp_lower` much. Every variant is also compared with base and with tuned environment by environment:
the paired percentile bootstrap of the Solve-F1 difference, resampled within scenario types as the main
job's before/after interval (`ftrl_jax.reporting.stats.paired_rows_bootstrap`), so a share can be told
apart from noise: a restore whose interval against tuned straddles zero loses nothing measurable.

Memory: both checkpoints are held on the host in their stored dtype (a bf16 7B pair is about 30 GB, never
a float32 copy), and each variant is made by exchanging the group's layer slices between the two trees in
place. One exchange turns the tuned tree into `restore:<group>` and the base tree into `graft:<group>`;
the same exchange again puts both back. The accelerator holds one variant at a time.

Writes OUT/attribution.csv, OUT/attribution.json, OUT/attribution.md and OUT/attribution.png. Inputs are
any checkpoints `analysis.checkpoints` reads (Hugging Face directories, main-job orbax checkpoints).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import flags

from analysis.checkpoints import TensorSource, open_checkpoint
from analysis.layer_deltas import DEPTHS, CheckpointWarning, check_same_architecture, depth_ranges, json_safe
from experiments import cli
from ftrl_jax import parallel
from ftrl_jax.envs.samples import Sample, read_samples
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.reporting import stats
from ftrl_jax.reporting.report import interval_text
from ftrl_jax.rollout.evaluation import METRICS, SCENARIO_TYPES, evaluate
from ftrl_jax.models import ModelConfig
from ftrl_jax.models.checkpoint_io import flatten_params, unflatten_params
from ftrl_jax.rollout.policy import LocalPolicy
from ftrl_jax.text.chat import TEMPLATES
from ftrl_jax.text.tokenizer import load_tokenizer

# The paired intervals against each reference (REFERENCES), in Solve-F1 units.
REFERENCES = ("base", "tuned")
INTERVAL_COLUMNS = tuple(f"vs_{ref}_{end}" for ref in REFERENCES for end in ("delta", "low", "high"))
CSV_COLUMNS = ("variant", "direction", "group", "layers", "num_params", *METRICS, "gain_kept", *INTERVAL_COLUMNS,
               "note")
DEFAULT_MIN_GAIN = 1e-3  # a tenth of a Solve-F1 point: below it the gain is noise and its share meaningless

# Module kind -> the prefix of its parameters in the stacked tree (layer axis first).
MODULE_PREFIXES: dict[str, str] = {"mlp": "layers/mlp/", "attention": "layers/self_attn/"}

# Chat template by model family when --template is not given.
TEMPLATE_BY_MODEL_TYPE: dict[str, str] = {"qwen2": "qwen2.5", "qwen3": "qwen3", "llama": "qwen2.5"}

# Direction -> what its variants are.
DIRECTIONS: dict[str, str] = {
    "restore": "tuned with the group put back to base",
    "graft": "base with only the group taken from tuned",
}


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """One module kind (a key of MODULE_PREFIXES) in one depth third, or in every layer (depth None)."""

    module: str
    depth: str | None

    @property
    def name(self) -> str:
        return f"{self.module}_{self.depth or 'all'}"

    def layer_range(self, num_layers: int) -> tuple[int, int] | None:
        """[first, last + 1) of the group's layers, or None when its third has no layers (under 3 layers)."""
        if self.depth is None:
            return (0, num_layers) if num_layers > 0 else None
        span = depth_ranges(num_layers)[self.depth]
        return None if span is None else (span[0], span[1] + 1)

    def slices(self, flat: Mapping[str, Any], num_layers: int) -> dict[str, slice]:
        """{parameter path: slice of its layer axis} that the group covers in the flat tree `flat`."""
        span = self.layer_range(num_layers)
        if span is None:
            return {}
        prefix = MODULE_PREFIXES[self.module]
        return {path: slice(*span) for path in flat if path.startswith(prefix)}


GROUPS: dict[str, ParamGroup] = {
    g.name: g for g in [ParamGroup(m, d) for m in MODULE_PREFIXES for d in DEPTHS]
    + [ParamGroup(m, None) for m in MODULE_PREFIXES]
}


# ---------------------------------------------------------------------------- variants as pure functions

def num_layers_of(flat: Mapping[str, Any]) -> int:
    """The length of the layer axis shared by every `layers/...` parameter."""
    lengths = {path: np.shape(value)[0] for path, value in flat.items() if path.startswith("layers/")}
    if not lengths:
        raise ValueError("the parameter tree has no 'layers/...' entries; expected the stacked decoder tree")
    if len(set(lengths.values())) > 1:
        raise ValueError(f"'layers/...' parameters disagree on the number of layers: {lengths}")
    return next(iter(lengths.values()))


def _check_pair(params: Mapping[str, Any], donor: Mapping[str, Any]) -> None:
    if params.keys() != donor.keys():
        raise ValueError(f"the two parameter trees differ in paths: only in one {sorted(params.keys() ^ donor.keys())}")
    for path in params:
        if np.shape(params[path]) != np.shape(donor[path]):
            raise ValueError(f"parameter {path!r} has shape {np.shape(params[path])} in one tree and "
                             f"{np.shape(donor[path])} in the other; the checkpoints are not the same architecture")


def _covered(flat: Mapping[str, Any], groups: Sequence[ParamGroup]) -> dict[str, list[slice]]:
    num_layers = num_layers_of(flat)
    covered: dict[str, list[slice]] = {}
    for group in groups:
        for path, layers in group.slices(flat, num_layers).items():
            covered.setdefault(path, []).append(layers)
    return covered


def _with_slices(target: Any, donor: Any, layer_slices: Sequence[slice]) -> Any:
    """`target` with the given layer slices taken from `donor` (a new array; numpy or JAX alike)."""
    if isinstance(target, np.ndarray):
        out = target.copy()
        for layers in layer_slices:
            out[layers] = donor[layers]
        return out
    for layers in layer_slices:
        target = target.at[layers].set(donor[layers].astype(target.dtype))
    return target


def swap_groups(params: Mapping[str, Any], donor: Mapping[str, Any], groups: Sequence[ParamGroup]) -> Any:
    """`params` with the parameters of `groups` taken from `donor` (pure: neither input changes).

    Both are parameter trees of one architecture, nested as the model uses them or flat ({'a/b': x});
    the result has the same form as `params`. Leaves outside the groups are the very objects of `params`;
    a leaf a group covers is copied once. `swap_groups(tuned, base, [g])` is tuned with g restored to base;
    `swap_groups(base, tuned, [g])` is base with only g from tuned.
    """
    nested = any(isinstance(v, Mapping) for v in params.values())
    flat, flat_donor = (flatten_params(params), flatten_params(donor)) if nested else (dict(params), dict(donor))
    _check_pair(flat, flat_donor)
    for path, layer_slices in _covered(flat, groups).items():
        flat[path] = _with_slices(flat[path], flat_donor[path], layer_slices)
    return unflatten_params(flat) if nested else flat


def exchange_groups(a: dict[str, np.ndarray], b: dict[str, np.ndarray], groups: Sequence[ParamGroup]) -> int:
    """Exchanges the groups' layer slices between two flat numpy trees in place; returns the values moved.

    Afterwards `a` is `swap_groups(a, b, groups)` and `b` is `swap_groups(b, a, groups)` of the trees
    before; calling it again with the same groups restores both. Extra memory: one layer slice at a time.
    """
    _check_pair(a, b)
    moved = 0
    for path, layer_slices in _covered(a, groups).items():
        if a[path].dtype != b[path].dtype:
            raise ValueError(f"parameter {path!r} is {a[path].dtype} in one tree and {b[path].dtype} in the other; "
                             "an in-place exchange needs one dtype (convert the narrower first)")
        # Overlapping groups must not exchange a layer twice (which would undo it).
        layers = sorted({i for s in layer_slices for i in range(*s.indices(a[path].shape[0]))})
        for i in layers:
            held = a[path][i].copy()
            a[path][i] = b[path][i]
            b[path][i] = held
            moved += held.size
    return moved


def gain_kept(f1_variant: float, f1_base: float, f1_tuned: float, min_gain: float = DEFAULT_MIN_GAIN) -> float | None:
    """(F1_variant - F1_base) / (F1_tuned - F1_base), or None when |F1_tuned - F1_base| < min_gain."""
    gain = f1_tuned - f1_base
    if not abs(gain) >= min_gain:
        return None
    return (f1_variant - f1_base) / gain


# ---------------------------------------------------------------------------- evaluation

@dataclasses.dataclass
class VariantResult:
    """One evaluated (or skipped) variant."""

    variant: str
    direction: str           # reference | restore | graft
    group: str               # a GROUPS name, or "" for the references
    layers: str              # e.g. "0-9", "all", "" (references), "none" (empty third)
    num_params: int          # values exchanged with the other checkpoint
    metrics: dict[str, float] | None
    per_source: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    episodes: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # per sample, in order
    gain_kept: float | None = None
    # reference name -> stats.paired_bootstrap of this variant's Solve-F1 minus the reference's (none for itself)
    intervals: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    note: str = ""
    seconds: float = 0.0


def headline_metrics(report) -> tuple[dict[str, float], str]:
    """(Solve-P/R/F1, what they average): the scenario-type average, else the mean over episodes."""
    if report.scenario_average:
        return {m: float(report.scenario_average[m]) for m in METRICS}, "average over scenario types"
    episodes = report.episodes
    return ({m: float(np.mean([e[m] for e in episodes])) if episodes else 0.0 for m in METRICS},
            "mean over episodes (the data has no scenario-type data_source)")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How every variant is evaluated (identical for all, so they compare)."""

    max_turns: int = 20
    max_new_tokens: int = 256
    max_prompt_tokens: int | None = None
    template: str | None = None       # None: from the model type (TEMPLATE_BY_MODEL_TYPE)
    enable_thinking: bool = False
    dtype: str | None = None          # compute dtype; None: the checkpoint's


class Evaluator:
    """Evaluates flat host parameter trees on fixed samples with a greedy LocalPolicy on a mesh of all devices."""

    def __init__(self, config: ModelConfig, tokenizer: Any, samples: Sequence[Sample], settings: EvalSettings,
                 sandbox: Sandbox):
        self.config = config
        self.tokenizer = tokenizer
        self.samples = list(samples)
        self.settings = settings
        self.sandbox = sandbox
        self.template = settings.template or TEMPLATE_BY_MODEL_TYPE.get(config.model_type, "qwen2.5")
        # Parameters split over every device (tensor axis), prompts not split: variants are few and small batches.
        self.mesh = parallel.make_mesh(1, 1, jax.device_count())
        self.basis = ""

    def __call__(self, flat: Mapping[str, np.ndarray]):
        params = parallel.shard_params(unflatten_params(dict(flat)), self.mesh)
        s = self.settings
        policy = LocalPolicy(self.config, params, self.tokenizer, template=self.template,
                             enable_thinking=s.enable_thinking, max_new_tokens=s.max_new_tokens,
                             max_prompt_tokens=s.max_prompt_tokens, temperature=0.0,
                             data_sharding=parallel.batch_sharding(self.mesh) if self.mesh.size > 1 else None)
        report = evaluate(policy, self.samples, max_turns=s.max_turns, sandbox=self.sandbox)
        del policy, params  # the device copy goes before the host trees are exchanged again
        metrics, self.basis = headline_metrics(report)
        return metrics, report.per_source, report.episodes


def _layers_label(group: ParamGroup, num_layers: int) -> str:
    span = group.layer_range(num_layers)
    if span is None:
        return "none"
    first, last = span[0], span[1] - 1
    return "all" if span == (0, num_layers) else str(first) if first == last else f"{first}-{last}"


def attribute(base: dict[str, np.ndarray], tuned: dict[str, np.ndarray], evaluate_params, groups: Sequence[ParamGroup],
              *, min_gain: float = DEFAULT_MIN_GAIN, bootstrap: Mapping[str, Any] | None = None,
              log=print) -> list[VariantResult]:
    """Evaluates base, tuned and every group's restore and graft variant; `base`/`tuned` are exchanged in place
    while a variant is evaluated and are as given again on return.
    `evaluate_params(flat) -> (metrics, per_source, episodes)`, `episodes` one row per sample in a fixed order
    (`data_source`, `solve_f1`; `EvalReport.episodes`). `bootstrap` goes to `add_paired_intervals`."""
    num_layers = num_layers_of(tuned)

    def timed(flat):
        started = time.perf_counter()
        metrics, per_source, episodes = evaluate_params(flat)
        return metrics, per_source, list(episodes), time.perf_counter() - started

    results = []
    for name, flat in zip(REFERENCES, (base, tuned)):
        metrics, per_source, episodes, seconds = timed(flat)
        results.append(VariantResult(name, "reference", "", "", 0, metrics, per_source, episodes, seconds=seconds))
        log(f"{name:<22} Solve-F1 {metrics['solve_f1']:.4f}  ({seconds:.1f} s)")
    for group in groups:
        label = _layers_label(group, num_layers)
        if group.layer_range(num_layers) is None:
            note = f"skipped: a {num_layers}-layer model has no {group.depth} third"
            results += [VariantResult(f"{d}:{group.name}", d, group.name, label, 0, None, note=note) for d in DIRECTIONS]
            log(f"{group.name:<22} {note}")
            continue
        moved = exchange_groups(tuned, base, [group])  # tuned -> restore variant, base -> graft variant
        try:
            for direction, flat in (("restore", tuned), ("graft", base)):
                metrics, per_source, episodes, seconds = timed(flat)
                results.append(VariantResult(f"{direction}:{group.name}", direction, group.name, label, moved,
                                             metrics, per_source, episodes, seconds=seconds))
                log(f"{direction + ':' + group.name:<22} Solve-F1 {metrics['solve_f1']:.4f}  ({seconds:.1f} s)")
        finally:
            exchange_groups(tuned, base, [group])
    add_gain_shares(results, min_gain)
    add_paired_intervals(results, **(bootstrap or {}))
    return results


def add_gain_shares(results: list[VariantResult], min_gain: float = DEFAULT_MIN_GAIN) -> None:
    """Fills `gain_kept` (and a note when it is undefined) from the base and tuned references."""
    by_name = {r.variant: r for r in results}
    f1_base, f1_tuned = by_name["base"].metrics["solve_f1"], by_name["tuned"].metrics["solve_f1"]
    undefined = (f"undefined: the RL gain F1_tuned - F1_base = {f1_tuned - f1_base:+.4g} is below "
                 f"--min_gain={min_gain:g} in size")
    for r in results:
        if r.metrics is None:
            continue
        r.gain_kept = gain_kept(r.metrics["solve_f1"], f1_base, f1_tuned, min_gain)
        if r.gain_kept is None:
            r.note = "; ".join(n for n in (r.note, undefined) if n)


def add_paired_intervals(results: list[VariantResult], **bootstrap: Any) -> None:
    """Fills each evaluated variant's `intervals` against base and tuned: `stats.paired_rows_bootstrap` of its
    per-sample Solve-F1 minus the reference's, within scenario types (every sample when the data has none).
    `bootstrap`: num_resamples, confidence, seed (defaults: 10,000, 0.95, 0). Variants without per-sample
    rows (an evaluator that gives none) get no interval; one that cannot be computed (rows that do not pair,
    a non-finite score) gets none either, and a note that says why."""
    by_name = {r.variant: r for r in results}
    for r in results:
        if r.metrics is None or not r.episodes:
            continue
        for ref in REFERENCES:
            if ref == r.variant or not by_name[ref].episodes:
                continue
            try:
                r.intervals[ref] = stats.paired_rows_bootstrap(by_name[ref].episodes, r.episodes,
                                                               headline_sources=SCENARIO_TYPES, **bootstrap)
            except ValueError as err:
                r.note = "; ".join(n for n in (r.note, f"no interval against {ref}: {err}") if n)


# ---------------------------------------------------------------------------- files

def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "" if value is None else format(value, spec)


def write_csv(results: Sequence[VariantResult], path: str) -> None:
    """CSV_COLUMNS: the variant, its metrics, gain_kept, the paired differences from base and tuned with their
    interval ends (empty where there is none), and the note."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in results:
            metrics = [repr(r.metrics[m]) if r.metrics else "" for m in METRICS]
            intervals = [repr(r.intervals[ref][key]) if ref in r.intervals else ""
                         for ref in REFERENCES for key in ("delta", "low", "high")]
            writer.writerow([r.variant, r.direction, r.group, r.layers, r.num_params, *metrics,
                             "" if r.gain_kept is None else repr(r.gain_kept), *intervals, r.note])


def summary_markdown(results: Sequence[VariantResult], record: Mapping[str, Any]) -> str:
    """A table of every variant in percent, with the share of the RL gain kept and the paired Solve-F1
    differences from base and tuned in points with their intervals."""
    confidence = next((iv["confidence"] for r in results for iv in r.intervals.values()), 0.95)
    lines = ["# Restore-based attribution", "",
             f"base: `{record['base']}`  ", f"tuned: `{record['tuned']}`  ",
             f"data: `{record['data']}` ({record['num_samples']} samples; metrics: {record['metric_basis']})", "",
             f"| variant | layers | Solve-P | Solve-R | Solve-F1 | gain kept | F1 - base [{100 * confidence:.0f}%] "
             f"| F1 - tuned [{100 * confidence:.0f}%] |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        cells = [_fmt(100 * r.metrics[m], ".2f") if r.metrics else "-" for m in METRICS]
        kept = "n/a" if r.gain_kept is None else f"{100 * r.gain_kept:.0f}%"
        cells += [kept] + [interval_text(r.intervals.get(ref)) or "-" for ref in REFERENCES]
        lines.append(f"| {r.variant} | {r.layers or '-'} | " + " | ".join(cells) + " |")
    notes = sorted({r.note for r in results if r.note})
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def bar_figure(results: Sequence[VariantResult]):
    """Solve-F1 of every variant (restore and graft panels) against the base and tuned lines, bars labelled
    with the share of the RL gain they keep."""
    from matplotlib.figure import Figure

    by_name = {r.variant: r for r in results}
    f1_base, f1_tuned = by_name["base"].metrics["solve_f1"], by_name["tuned"].metrics["solve_f1"]
    panels = [(d, [r for r in results if r.direction == d]) for d in DIRECTIONS]
    panels = [(d, rs) for d, rs in panels if rs]
    fig = Figure(figsize=(5.5 * max(1, len(panels)), 4.2), layout="constrained")
    axes = fig.subplots(1, max(1, len(panels)), sharey=True, squeeze=False)[0]
    top = max([f1_base, f1_tuned] + [r.metrics["solve_f1"] for r in results if r.metrics]) or 1.0
    for ax, (direction, rows) in zip(axes, panels):
        names = [r.group for r in rows]
        values = [r.metrics["solve_f1"] if r.metrics else 0.0 for r in rows]
        colors = ["tab:blue" if r.group.startswith("mlp") else "tab:orange" for r in rows]
        bars = ax.bar(range(len(rows)), values, color=colors)
        for bar, r in zip(bars, rows):
            label = "skipped" if r.metrics is None else "n/a" if r.gain_kept is None else f"{100 * r.gain_kept:.0f}%"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.axhline(f1_base, color="grey", linestyle="--", linewidth=1.2, label=f"base {f1_base:.3f}")
        ax.axhline(f1_tuned, color="black", linestyle="-", linewidth=1.2, label=f"tuned {f1_tuned:.3f}")
        ax.set_xticks(range(len(rows)), names, rotation=35, ha="right")
        ax.set_ylim(0, top * 1.18)
        ax.set_title(f"{direction}: {DIRECTIONS[direction]}", fontsize=10)
        ax.legend(fontsize=8, loc="best")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("Solve-F1 (labels: share of the RL gain kept)")
    if by_name["tuned"].gain_kept is None:
        fig.suptitle(f"RL gain {f1_tuned - f1_base:+.4f} is ~0: the shares are undefined", fontsize=10)
    return fig


# ---------------------------------------------------------------------------- command line

def find_tokenizer_dir(tuned_path: str, source: TensorSource) -> str:
    """The tuned directory if it holds a tokenizer, else its run's `tokenizer/` or `export/` (orbax inputs)."""
    workdir = getattr(source, "workdir", None)
    candidates = [tuned_path] + ([os.path.join(workdir, d) for d in ("tokenizer", "export")] if workdir else [])
    for directory in candidates:
        if any(os.path.isfile(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            return directory
    raise FileNotFoundError(f"no tokenizer (tokenizer.json or tokenizer_config.json) in {', '.join(candidates)}; "
                            "pass --tokenizer=DIR")


def load_samples(path: str, limit: int | None, log=print) -> list[Sample]:
    """The evaluation samples of `path` (.jsonl or .parquet), bad rows reported and skipped; first `limit`."""
    samples, errors = read_samples(path)
    for err in errors:
        log(f"warning: skipping {err}")
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise ValueError(f"no usable samples in {path!r}" + (f" ({len(errors)} rows skipped)" if errors else ""))
    return samples


def _matching_dtypes(base: dict[str, np.ndarray], tuned: dict[str, np.ndarray]) -> list[str]:
    """Converts the narrower of two differently typed parameters to the wider, in place; returns notes."""
    notes = []
    for path in tuned:
        if base[path].dtype != tuned[path].dtype:
            wide = np.promote_types(base[path].dtype, tuned[path].dtype)
            notes.append(f"{path}: base {base[path].dtype}, tuned {tuned[path].dtype}; both evaluated as {wide}")
            base[path], tuned[path] = base[path].astype(wide, copy=False), tuned[path].astype(wide, copy=False)
    return notes


def run(base_dir: str, tuned_dir: str, data_path: str, out_dir: str, *, limit: int | None = None,
        settings: EvalSettings = EvalSettings(), groups: Sequence[str] = tuple(GROUPS),
        tokenizer_dir: str | None = None, min_gain: float = DEFAULT_MIN_GAIN,
        bootstrap: Mapping[str, Any] | None = None, log=print) -> dict[str, Any]:
    """Evaluates every variant, writes the four output files into out_dir and returns the JSON record.
    `bootstrap`: the paired intervals' num_resamples, confidence and seed (`add_paired_intervals`)."""
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown parameter groups {unknown}; choose from {', '.join(GROUPS)}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointWarning)
        base_source, tuned_source = open_checkpoint(base_dir), open_checkpoint(tuned_dir)
        config_notes = check_same_architecture(base_source, tuned_source)
    notes = config_notes + [str(w.message) for w in caught]
    samples = load_samples(data_path, limit, log)
    tokenizer_dir = tokenizer_dir or find_tokenizer_dir(tuned_dir, tuned_source)
    tokenizer = load_tokenizer(tokenizer_dir)

    base, tuned = base_source.load_params(), tuned_source.load_params()
    notes += _matching_dtypes(base, tuned)
    for note in notes:
        log(f"warning: {note}")
    stored = np.dtype(tuned["embed_tokens/embedding"].dtype).name
    config = tuned_source.config.replace(param_dtype=stored, dtype=settings.dtype or stored)
    log(f"{len(samples)} samples from {data_path}; {config.num_layers} layers, {stored} parameters; "
        f"{2 + 2 * len(groups)} evaluations")
    with Sandbox() as sandbox:
        evaluator = Evaluator(config, tokenizer, samples, settings, sandbox)
        results = attribute(base, tuned, evaluator, [GROUPS[g] for g in groups], min_gain=min_gain,
                            bootstrap=bootstrap, log=log)

    record = {
        "base": base_source.path, "tuned": tuned_source.path, "data": os.path.abspath(data_path),
        "tokenizer": os.path.abspath(tokenizer_dir), "num_samples": len(samples), "metric_basis": evaluator.basis,
        "settings": {**dataclasses.asdict(settings), "template": evaluator.template, "dtype": config.dtype},
        "min_gain": min_gain, "num_layers": config.num_layers, "depth_ranges": depth_ranges(config.num_layers),
        # Per-sample Solve-F1 of every variant, in the order of `episode_data_sources` (the samples' order).
        "episode_data_sources": [e["data_source"] for e in next((r.episodes for r in results if r.episodes), [])],
        "variants": [_variant_record(r) for r in results], "warnings": notes,
    }
    os.makedirs(out_dir, exist_ok=True)
    write_csv(results, os.path.join(out_dir, "attribution.csv"))
    with open(os.path.join(out_dir, "attribution.json"), "w") as f:
        json.dump(json_safe(record), f, indent=2)
    with open(os.path.join(out_dir, "attribution.md"), "w") as f:
        f.write(summary_markdown(results, record))
    bar_figure(results).savefig(os.path.join(out_dir, "attribution.png"), dpi=120)
    return record


def _variant_record(result: VariantResult) -> dict[str, Any]:
    """A variant for attribution.json: its fields, the per-sample rows reduced to their Solve-F1."""
    record = dataclasses.asdict(result)
    record["episode_solve_f1"] = [e["solve_f1"] for e in record.pop("episodes")]
    return record


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("base", None, "Base checkpoint: HF directory, orbax step dir or run workdir (required).",
                        required=True, flag_values=fv)
    flags.DEFINE_string("tuned", None, "Tuned checkpoint of the same architecture (required).", required=True,
                        flag_values=fv)
    flags.DEFINE_string("data", None, "Evaluation samples, .jsonl or .parquet in the FTRL sample format (required).",
                        required=True, flag_values=fv)
    flags.DEFINE_string("output", None, "Output directory, created (required).", required=True, flag_values=fv)
    flags.DEFINE_alias("out", "output", flag_values=fv)
    flags.DEFINE_integer("limit", 0, "Evaluate only the first N samples (0: all).", lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("max_turns", 20, "Assistant turns per episode.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 256, "New tokens per assistant turn.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("max_prompt_tokens", 0, "Prompt budget (0: the context minus --max_new_tokens).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_enum("template", "auto", ("auto", *TEMPLATES), "Chat template (auto: from the model type).",
                      flag_values=fv)
    flags.DEFINE_bool("enable_thinking", False, "Qwen3 thinking mode.", flag_values=fv)
    flags.DEFINE_string("dtype", "", "Compute dtype (empty: the checkpoint's parameter dtype).", flag_values=fv)
    flags.DEFINE_string("groups", ",".join(GROUPS), f"Parameter groups, comma-separated, from {','.join(GROUPS)}.",
                        flag_values=fv)
    flags.DEFINE_string("tokenizer", "", "Tokenizer directory (empty: the tuned checkpoint's).", flag_values=fv)
    flags.DEFINE_float("min_gain", DEFAULT_MIN_GAIN,
                       "Smallest |F1_tuned - F1_base| for which the share of the gain is reported.", lower_bound=0.0,
                       flag_values=fv)
    cli.define_bootstrap_flags(fv, "Resamples of the paired intervals against base and tuned.")


def main(argv: Sequence[str]) -> int:
    try:
        args = cli.parse(argv, define_flags, __doc__)
    except cli.UsageError as exc:
        return cli.fail(exc)
    settings = EvalSettings(max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                            max_prompt_tokens=args.max_prompt_tokens or None,
                            template=None if args.template == "auto" else args.template,
                            enable_thinking=args.enable_thinking, dtype=args.dtype or None)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    log = lambda message: print(message, flush=True)  # noqa: E731
    try:
        record = run(args.base, args.tuned, args.data, args.output, limit=args.limit or None, settings=settings,
                     groups=groups, tokenizer_dir=args.tokenizer or None, min_gain=args.min_gain,
                     bootstrap=cli.bootstrap_settings(args), log=log)
    except (OSError, KeyError, ValueError) as exc:
        return cli.fail(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)  # KeyError's str() adds quotes
    with open(os.path.join(args.output, "attribution.md")) as f:
        print(f.read())
    print(f"wrote attribution.csv, attribution.json, attribution.md, attribution.png to {args.output} "
          f"({sum(v['seconds'] for v in record['variants']):.0f} s of evaluation)")
    return 0


if __name__ == "__main__":
    cli.run(main)
