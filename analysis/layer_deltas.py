"""Per-layer, per-module parameter change between two checkpoints of one architecture.

The FTRL paper reports that RL gains come from updates to the lower layers' MLP parameters; this
measures where a tuned checkpoint moved away from its base:

    python -m analysis.layer_deltas --base=DIR --tuned=DIR --output=OUT [--log_scale]

For every tensor (one row per layer and module) it reports
    rel_change      = ||W_tuned - W_base||_F / ||W_base||_F
    mean_abs_change = mean |W_tuned - W_base|
accumulated in float64 over chunks of the memory-mapped tensors, so memory stays at a few chunks
whatever the model size. Modules are those of `analysis.checkpoints.MODULE_NAMES`; biases are rows of
their own (`q_bias`, ...). Embeddings, the output head and the final norm are rows with layer -1.

Aggregates (summary.json / summary.md) pool tensors of the decoder layers: a group's rel_change is
sqrt(sum ||dW||^2) / sqrt(sum ||W||^2) over its tensors (the relative change of the group as one vector),
its mean_abs_change is sum |dW| / sum n. Groups: attention (q/k/v/o and their biases), mlp (gate/up/down
and biases), norm (input, post-attention, q and k norms). Depth thirds: layer i is in third
floor(3 i / num_layers) (28 layers split 10/9/9). Rows with layer -1 are reported apart (`non_layer`).

Writes OUT/layer_deltas.csv, OUT/summary.json, OUT/summary.md, OUT/heatmap.png, OUT/by_layer.png.
Reads Hugging Face directories only (see `analysis.checkpoints`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import warnings
from typing import Any, Iterable, Sequence

import numpy as np
from absl import flags

from analysis.checkpoints import OUTSIDE_LAYERS, TensorSource, open_checkpoint
from experiments import cli
from ftrl_jax.models import ModelConfig

CSV_COLUMNS = ("layer", "module", "rel_change", "mean_abs_change", "num_params")

# Module -> group, in the column order of tables and plots.
MODULE_GROUPS: dict[str, str] = {
    "q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "o_proj": "attention",
    "q_bias": "attention", "k_bias": "attention", "v_bias": "attention",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
    "gate_bias": "mlp", "up_bias": "mlp", "down_bias": "mlp",
    "input_norm": "norm", "post_attn_norm": "norm", "q_norm": "norm", "k_norm": "norm",
    "embed": "embedding", "lm_head": "embedding", "final_norm": "norm",
}
LAYER_GROUPS = ("attention", "mlp", "norm")
DEPTHS = ("lower", "middle", "upper")

# ModelConfig field -> its config.json key, for the fields that fix tensor names and shapes.
ARCHITECTURE_FIELDS: dict[str, str] = {
    "model_type": "model_type",
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "tie_word_embeddings": "tie_word_embeddings",
    "attention_bias": "attention_bias",
    "qk_norm": "model_type",
    "mlp_bias": "mlp_bias",
}
# Fields that may differ between a base and its fine-tune without changing any tensor (dtype is per tensor).
_IGNORED_FIELDS = {"param_dtype", "dtype", "bos_token_id", "eos_token_id", "pad_token_id"}

DEFAULT_CHUNK_ELEMENTS = 1 << 22  # 4M elements: two float64 chunks are 64 MiB


class CheckpointWarning(UserWarning):
    """Something about the pair worth knowing that does not stop the comparison."""


@dataclasses.dataclass(frozen=True)
class Row:
    """The change of one tensor. The three sums let aggregates pool rows exactly."""

    layer: int
    module: str
    num_params: int
    delta_sq_norm: float   # ||W_tuned - W_base||_F^2
    base_sq_norm: float    # ||W_base||_F^2
    abs_change_sum: float  # sum |W_tuned - W_base|

    @property
    def rel_change(self) -> float:
        return relative_change(self.delta_sq_norm, self.base_sq_norm)

    @property
    def mean_abs_change(self) -> float:
        return self.abs_change_sum / self.num_params if self.num_params else 0.0

    @property
    def group(self) -> str:
        return MODULE_GROUPS[self.module]


def relative_change(delta_sq_norm: float, base_sq_norm: float) -> float:
    """||dW|| / ||W||; 0 when nothing changed, inf when a zero tensor (e.g. a fresh bias) changed."""
    if base_sq_norm > 0:
        return math.sqrt(delta_sq_norm / base_sq_norm)
    return 0.0 if delta_sq_norm == 0 else math.inf


# ---------------------------------------------------------------------------- comparing two checkpoints

def check_same_architecture(base: TensorSource, tuned: TensorSource) -> list[str]:
    """Raises naming every shape-relevant config field that differs; returns notes on other differing fields."""
    mismatches = [
        f"{field} (config.json {key!r}) is {getattr(base.config, field)!r} in {base.path!r} "
        f"but {getattr(tuned.config, field)!r} in {tuned.path!r}"
        for field, key in ARCHITECTURE_FIELDS.items()
        if getattr(base.config, field) != getattr(tuned.config, field)
    ]
    if mismatches:
        raise ValueError("the checkpoints are not the same architecture, so their tensors cannot be compared: "
                         + "; ".join(mismatches))
    return [
        f"config field {f.name} differs (base {getattr(base.config, f.name)!r}, "
        f"tuned {getattr(tuned.config, f.name)!r}); it does not change any tensor"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in ARCHITECTURE_FIELDS and f.name not in _IGNORED_FIELDS
        and getattr(base.config, f.name) != getattr(tuned.config, f.name)
    ]


def tensor_change(base: np.ndarray, tuned: np.ndarray,
                  chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> tuple[float, float, float]:
    """(||tuned - base||^2, ||base||^2, sum |tuned - base|) in float64, reading `chunk_elements` at a time."""
    base_flat, tuned_flat = base.reshape(-1), tuned.reshape(-1)
    delta_sq = base_sq = abs_sum = 0.0
    for start in range(0, base_flat.size, chunk_elements):
        b = base_flat[start:start + chunk_elements].astype(np.float64)
        d = tuned_flat[start:start + chunk_elements].astype(np.float64)
        d -= b  # exact for float32/bf16/fp16 inputs, which float64 holds with room to spare
        delta_sq += float(d @ d)
        base_sq += float(b @ b)
        abs_sum += float(np.abs(d, out=d).sum())
    return delta_sq, base_sq, abs_sum


def _module_order(module: str) -> int:
    return list(MODULE_GROUPS).index(module)


def compare_sources(base: TensorSource, tuned: TensorSource, *,
                    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> list[Row]:
    """Rows for two opened checkpoints (any backend); see `compute_layer_deltas`."""
    for note in check_same_architecture(base, tuned):
        warnings.warn(note, CheckpointWarning, stacklevel=3)
    for source in (base, tuned):
        skipped = source.unmapped_names()
        if skipped:
            warnings.warn(f"{len(skipped)} tensors in {source.path!r} are not part of the model's weight table and "
                          f"are skipped: {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}",
                          CheckpointWarning, stacklevel=3)
    rows = []
    dtype_note_given = False
    for b, t in zip(base.iter_tensors(), tuned.iter_tensors(), strict=True):
        if b.hf_name != t.hf_name:
            raise ValueError(f"the checkpoints yield tensors in different orders ({b.hf_name!r} in {base.path!r}, "
                             f"{t.hf_name!r} in {tuned.path!r}); their readers must follow hf_tensor_names(config)")
        if b.array.shape != t.array.shape:
            raise ValueError(f"tensor {b.hf_name!r} has shape {tuple(b.array.shape)} in {base.path!r} but "
                             f"{tuple(t.array.shape)} in {tuned.path!r}; the checkpoints are not the same architecture")
        if b.array.dtype != t.array.dtype and not dtype_note_given:
            dtype_note_given = True
            warnings.warn(f"tensor dtypes differ (first at {b.hf_name!r}: {b.array.dtype} in base, {t.array.dtype} in "
                          "tuned); the changes include the rounding between the two dtypes", CheckpointWarning,
                          stacklevel=3)
        delta_sq, base_sq, abs_sum = tensor_change(b.array, t.array, chunk_elements)
        if not (math.isfinite(delta_sq) and math.isfinite(base_sq)):
            warnings.warn(f"tensor {b.hf_name!r} holds non-finite values (nan or inf) in base or tuned; its row is "
                          "nan/inf and so are the aggregates that include it", CheckpointWarning, stacklevel=3)
        rows.append(Row(b.layer, b.module, int(b.array.size), delta_sq, base_sq, abs_sum))
    # Rows outside the layers (layer -1) first, then layer by layer, modules in MODULE_GROUPS order.
    rows.sort(key=lambda r: (r.layer, _module_order(r.module)))
    return rows


def compute_layer_deltas(base_dir: str | os.PathLike, tuned_dir: str | os.PathLike, *,
                         chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> list[Row]:
    """One Row per (layer, module) tensor: how far `tuned_dir` moved from `base_dir`.

    Both are checkpoint directories of the same architecture (config fields and tensor shapes; a mismatch
    raises ValueError naming it). Tensors are streamed one at a time; differences that do not stop the
    comparison (skipped tensors, differing dtypes, non-shape config fields) are `CheckpointWarning`s.
    """
    return compare_sources(open_checkpoint(base_dir), open_checkpoint(tuned_dir), chunk_elements=chunk_elements)


# ---------------------------------------------------------------------------- aggregates

def depth_of(layer: int, num_layers: int) -> str:
    """'lower', 'middle' or 'upper' third of the decoder layers."""
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is outside the model's {num_layers} decoder layers")
    return DEPTHS[layer * len(DEPTHS) // num_layers]


def depth_ranges(num_layers: int) -> dict[str, list[int] | None]:
    """Third -> [first layer, last layer] (inclusive), or None for a third with no layers (under 3 layers)."""
    members: dict[str, list[int]] = {d: [] for d in DEPTHS}
    for layer in range(num_layers):
        members[depth_of(layer, num_layers)].append(layer)
    return {d: [m[0], m[-1]] if m else None for d, m in members.items()}


def pool(rows: Iterable[Row]) -> dict[str, Any]:
    """Pooled change of several tensors, as if they were one vector."""
    rows = list(rows)
    num_params = sum(r.num_params for r in rows)
    delta_sq = sum(r.delta_sq_norm for r in rows)
    base_sq = sum(r.base_sq_norm for r in rows)
    return {
        "rel_change": relative_change(delta_sq, base_sq) if rows else None,
        "mean_abs_change": sum(r.abs_change_sum for r in rows) / num_params if num_params else None,
        "num_params": num_params,
        "num_tensors": len(rows),
    }


def summarize(rows: Sequence[Row], num_layers: int) -> dict[str, Any]:
    """Pooled changes by module group, by depth third, by both, and for the tensors outside the layers."""
    for r in rows:
        if r.layer != OUTSIDE_LAYERS:
            depth_of(r.layer, num_layers)  # raises for a row that does not fit num_layers
    in_layers = [r for r in rows if r.layer != OUTSIDE_LAYERS]
    by_cell: dict[tuple[str, str], list[Row]] = {}
    for r in in_layers:
        by_cell.setdefault((r.group, depth_of(r.layer, num_layers)), []).append(r)

    def cells(group: str | None = None, depth: str | None = None) -> list[Row]:
        return [r for (g, d), rs in by_cell.items() if group in (None, g) and depth in (None, d) for r in rs]

    return {
        "num_layers": num_layers,
        "depth_ranges": depth_ranges(num_layers),
        "by_group": {g: pool(cells(group=g)) for g in LAYER_GROUPS},
        "by_depth": {d: pool(cells(depth=d)) for d in DEPTHS},
        "by_group_and_depth": {g: {d: pool(cells(g, d)) for d in DEPTHS} for g in LAYER_GROUPS},
        "all_layers": pool(in_layers),
        "non_layer": {r.module: pool([r]) for r in rows if r.layer == OUTSIDE_LAYERS},
        "overall": pool(rows),
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def summary_markdown(summary: dict[str, Any], base: str = "", tuned: str = "") -> str:
    """summary.md: group x depth tables of rel_change and mean_abs_change, then the tensors outside the layers."""
    ranges = summary["depth_ranges"]
    header_cells = [f"{d} ({ranges[d][0]}-{ranges[d][1]})" if ranges[d] else f"{d} (none)" for d in DEPTHS]
    lines = ["# Parameter change, tuned vs base", ""]
    if base or tuned:
        lines += [f"base: `{base}`  ", f"tuned: `{tuned}`", ""]
    lines += [f"{summary['num_layers']} decoder layers. rel_change = ||W_tuned - W_base||_F / ||W_base||_F pooled "
              "over a cell's tensors; mean_abs_change = mean |W_tuned - W_base|.", ""]
    for metric in ("rel_change", "mean_abs_change"):
        lines += [f"## {metric} by module group and depth", "",
                  "| group | " + " | ".join(header_cells) + " | all layers |",
                  "|---" * (len(DEPTHS) + 2) + "|"]
        for g in LAYER_GROUPS:
            cells = [_fmt(summary["by_group_and_depth"][g][d][metric]) for d in DEPTHS]
            lines.append(f"| {g} | " + " | ".join(cells) + f" | {_fmt(summary['by_group'][g][metric])} |")
        cells = [_fmt(summary["by_depth"][d][metric]) for d in DEPTHS]
        lines += ["| all | " + " | ".join(cells) + f" | {_fmt(summary['all_layers'][metric])} |", ""]
    lines += ["## Outside the decoder layers", "", "| module | rel_change | mean_abs_change | num_params |",
              "|---|---|---|---|"]
    for module, s in summary["non_layer"].items():
        lines.append(f"| {module} | {_fmt(s['rel_change'])} | {_fmt(s['mean_abs_change'])} | {s['num_params']} |")
    lines += ["", f"Whole model: rel_change {_fmt(summary['overall']['rel_change'])}, mean_abs_change "
              f"{_fmt(summary['overall']['mean_abs_change'])} over {summary['overall']['num_params']} parameters."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- files

def write_csv(rows: Sequence[Row], path: str) -> None:
    """layer,module,rel_change,mean_abs_change,num_params; floats at full precision, inf as 'inf'."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            writer.writerow([r.layer, r.module, repr(r.rel_change), repr(r.mean_abs_change), r.num_params])


def json_safe(value: Any) -> Any:
    """inf/nan are not JSON: written as null (summary.md and the CSV show them as inf/nan)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------------- plots

def _layer_modules(rows: Sequence[Row]) -> list[str]:
    present = {r.module for r in rows if r.layer != OUTSIDE_LAYERS}
    return [m for m in MODULE_GROUPS if m in present]


def heatmap_figure(rows: Sequence[Row], num_layers: int, *, log_scale: bool = False):
    """Layers (rows, layer 0 at the bottom) x modules (columns, by group) coloured by rel_change."""
    import matplotlib
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    modules = _layer_modules(rows)
    grid = np.full((num_layers, len(modules)), np.nan)
    for r in rows:
        if r.layer != OUTSIDE_LAYERS:
            grid[r.layer, modules.index(r.module)] = r.rel_change
    shown = np.ma.masked_invalid(grid)
    positive = grid[np.isfinite(grid) & (grid > 0)]
    # At least a decade of colour, so near-equal values do not fill the bar with identical ticks.
    norm = (LogNorm(min(positive.min(), positive.max() / 10), positive.max())
            if log_scale and positive.size else None)
    if log_scale:
        shown = np.ma.masked_less_equal(shown, 0)

    fig = Figure(figsize=(2.5 + 0.45 * len(modules), 2.0 + 0.22 * num_layers), layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.8")
    image = ax.imshow(shown, origin="lower", aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="rel_change" + (" (log)" if norm else ""))
    ax.set_xticks(range(len(modules)), modules, rotation=60, ha="right")
    ax.set_yticks(range(num_layers))
    ax.tick_params(axis="y", labelsize=max(4, 9 - num_layers // 12))
    ax.set_ylabel("layer")
    groups = [MODULE_GROUPS[m] for m in modules]
    for group in dict.fromkeys(groups):
        columns = [i for i, g in enumerate(groups) if g == group]
        ax.text((columns[0] + columns[-1]) / 2, 1.01, group, transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=9)
        if columns[0] > 0:
            ax.axvline(columns[0] - 0.5, color="white", linewidth=2)
    for span in depth_ranges(num_layers).values():
        if span and span[0] > 0:
            ax.axhline(span[0] - 0.5, color="white", linewidth=1, linestyle=":")
    grey = "grey: unchanged, or zero in base" if norm else "grey: zero in base, changed"
    ax.set_title(f"||dW|| / ||W|| per layer and module ({grey})", fontsize=9, pad=16)
    return fig


def by_layer_figure(rows: Sequence[Row], num_layers: int, *, groups: Sequence[str] = ("attention", "mlp"),
                    log_scale: bool = False):
    """One panel per group: rel_change vs layer for each module, and the group pooled per layer (black).

    A module whose base tensor is zero and changed (rel_change inf, e.g. a bias) has no point on its line;
    its change still counts in the pooled line.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * len(groups), 4.0), layout="constrained")
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)[0]
    layers = np.arange(num_layers)
    for ax, group in zip(axes, groups):
        group_rows = [r for r in rows if r.layer != OUTSIDE_LAYERS and r.group == group]
        for module in _layer_modules(group_rows):
            values = np.full(num_layers, np.nan)
            for r in group_rows:
                if r.module == module:
                    values[r.layer] = r.rel_change
            ax.plot(layers, np.where(np.isfinite(values), values, np.nan), marker=".", linewidth=1, label=module)
        pooled = [pool(r for r in group_rows if r.layer == layer)["rel_change"] for layer in layers]
        ax.plot(layers, [np.nan if v is None else v for v in pooled], color="black", linewidth=2.5,
                label=f"{group} (pooled)")
        for span in depth_ranges(num_layers).values():
            if span and span[0] > 0:
                ax.axvline(span[0] - 0.5, color="grey", linewidth=1, linestyle=":")
        if log_scale:
            ax.set_yscale("log")
        ax.set_title(f"{group}: rel_change by layer (dotted: depth thirds)", fontsize=10)
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("||dW|| / ||W||")
    return fig


def plot(rows: Sequence[Row], num_layers: int, out_dir: str | os.PathLike, *,
         log_scale: bool = False) -> dict[str, str]:
    """Writes heatmap.png and by_layer.png into out_dir (Agg, no pyplot state); returns their paths."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"heatmap": os.path.join(out_dir, "heatmap.png"), "by_layer": os.path.join(out_dir, "by_layer.png")}
    figures = {"heatmap": heatmap_figure(rows, num_layers, log_scale=log_scale),
               "by_layer": by_layer_figure(rows, num_layers, log_scale=log_scale)}
    for name, fig in figures.items():
        fig.savefig(paths[name], dpi=120)  # a bare Figure renders with Agg
    return paths


# ---------------------------------------------------------------------------- command line

def run(base_dir: str, tuned_dir: str, out_dir: str, *, log_scale: bool = False,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> dict[str, Any]:
    """Computes, writes every output file into out_dir and returns the summary (with the warnings raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointWarning)
        base, tuned = open_checkpoint(base_dir), open_checkpoint(tuned_dir)
        rows = compare_sources(base, tuned, chunk_elements=chunk_elements)
    notes = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    for w in caught:  # pass on everything, ours printed to stderr below
        if not issubclass(w.category, CheckpointWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)

    num_layers = base.config.num_layers
    summary = summarize(rows, num_layers)
    os.makedirs(out_dir, exist_ok=True)
    write_csv(rows, os.path.join(out_dir, "layer_deltas.csv"))
    record = {"base": os.path.abspath(base_dir), "tuned": os.path.abspath(tuned_dir), **summary, "warnings": notes}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(json_safe(record), f, indent=2)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(summary, base_dir, tuned_dir))
    plot(rows, num_layers, out_dir, log_scale=log_scale)
    return record


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("base", None, "Base checkpoint: HF directory, orbax step dir or run workdir (required).",
                        required=True, flag_values=fv)
    flags.DEFINE_string("tuned", None, "Tuned checkpoint of the same architecture (required).", required=True,
                        flag_values=fv)
    flags.DEFINE_string("output", None, "Output directory, created (required).", required=True, flag_values=fv)
    flags.DEFINE_alias("out", "output", flag_values=fv)
    flags.DEFINE_bool("log_scale", False, "Log colour/y scale in the plots.", flag_values=fv)


def main(argv: Sequence[str]) -> int:
    try:
        args = cli.parse(argv, define_flags, __doc__)
        record = run(args.base, args.tuned, args.output, log_scale=args.log_scale)
    except cli.UsageError as exc:
        return cli.fail(exc)
    except (OSError, KeyError, ValueError) as exc:
        return cli.fail(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)  # KeyError's str() adds quotes
    print(summary_markdown(record, args.base, args.tuned))
    print(f"wrote layer_deltas.csv, summary.json, summary.md, heatmap.png, by_layer.png to {args.output}")
    return 0


if __name__ == "__main__":
    cli.run(main)
