"""Layer deltas on crafted checkpoint pairs whose differences are known tensor by tensor."""

import csv
import json
import math
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

from analysis import checkpoints, layer_deltas
from analysis.layer_deltas import CheckpointWarning, Row, compute_layer_deltas, summarize
from ftrl_jax import models
from ftrl_jax.models.checkpoint_io import (WEIGHT_TABLE, SafetensorsFile, abstract_params, flatten_params,
                                           hf_tensor_names, unflatten_params, write_safetensors)

# Qwen3 with attention biases and an untied head: every module kind of the weight table but MLP biases.
CONFIG = models.preset("tiny", model_type="qwen3", vocab_size=96, hidden_size=32, intermediate_size=64,
                       num_layers=6, num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=False,
                       attention_bias=True, qk_norm=True)

ATTENTION_PATHS = ["layers/self_attn/q_proj/kernel", "layers/self_attn/k_proj/kernel",
                   "layers/self_attn/v_proj/kernel", "layers/self_attn/o_proj/kernel",
                   "layers/self_attn/q_proj/bias", "layers/self_attn/k_proj/bias", "layers/self_attn/v_proj/bias"]
MLP_PATHS = ["layers/mlp/gate_proj/kernel", "layers/mlp/up_proj/kernel", "layers/mlp/down_proj/kernel"]
NORM_PATHS = ["layers/input_layernorm/scale", "layers/post_attention_layernorm/scale",
              "layers/self_attn/q_norm/scale", "layers/self_attn/k_norm/scale"]

# (parameter path, layer or None) -> how the tuned checkpoint differs from the base there.
KNOWN_CHANGES = {
    ("layers/mlp/gate_proj/kernel", 0): lambda w: w + 0.1 * w,
    ("layers/mlp/gate_proj/kernel", 1): lambda w: w + 0.1 * w,
    ("layers/self_attn/o_proj/kernel", 5): lambda w: w + 0.5 * w,
    ("layers/self_attn/q_proj/bias", 3): lambda w: w + 0.25,  # the base bias is zero: rel_change is inf
    ("lm_head/kernel", None): lambda w: w + 0.2 * w,
}
KNOWN_REL = {(0, "gate_proj"): 0.1, (1, "gate_proj"): 0.1, (5, "o_proj"): 0.5, (3, "q_bias"): math.inf,
             (-1, "lm_head"): 0.2}


def changed(flat, changes):
    """A copy of the flat parameters with `changes` applied to whole tensors or to one layer's slice."""
    out = {path: np.array(value) for path, value in flat.items()}
    for (path, layer), change in changes.items():
        if layer is None:
            out[path] = change(out[path]).astype(out[path].dtype)
        else:
            out[path][layer] = change(out[path][layer])
    return out


def save(config, flat, path, **kwargs):
    models.save_pretrained(config, unflatten_params(flat), str(path), **kwargs)
    return str(path)


def tensor_of(flat, path, layer):
    return flat[path] if layer == -1 else flat[path][layer]


def pooled(base_flat, tuned_flat, paths, layers):
    """rel_change and mean_abs_change of the listed tensors as one vector, straight from the parameters."""
    delta_sq = base_sq = abs_sum = n = 0.0
    for path in paths:
        for layer in layers:
            b = tensor_of(base_flat, path, layer).astype(np.float64)
            d = tensor_of(tuned_flat, path, layer).astype(np.float64) - b
            delta_sq, base_sq = delta_sq + np.sum(d * d), base_sq + np.sum(b * b)
            abs_sum, n = abs_sum + np.abs(d).sum(), n + d.size
    return math.sqrt(delta_sq / base_sq), abs_sum / n


def read_csv(path):
    with open(path) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == layer_deltas.CSV_COLUMNS
        return {(int(r["layer"]), r["module"]): (float(r["rel_change"]), float(r["mean_abs_change"]),
                                                 int(r["num_params"])) for r in reader}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(flat float32 parameters, checkpoint directory) of a freshly initialised model."""
    params = models.init_params(CONFIG, jax.random.PRNGKey(0))
    flat = {path: np.array(value) for path, value in flatten_params(params).items()}
    return flat, save(CONFIG, flat, tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def known_pair(base, tmp_path_factory):
    base_flat, base_dir = base
    tuned_flat = changed(base_flat, KNOWN_CHANGES)
    return base_flat, base_dir, tuned_flat, save(CONFIG, tuned_flat, tmp_path_factory.mktemp("tuned"))


# ---------------------------------------------------------------------------- per-tensor rows

def test_csv_has_known_changes_and_zero_elsewhere(known_pair, tmp_path):
    base_flat, base_dir, tuned_flat, tuned_dir = known_pair
    layer_deltas.write_csv(compute_layer_deltas(base_dir, tuned_dir), str(tmp_path / "layer_deltas.csv"))
    table = read_csv(tmp_path / "layer_deltas.csv")

    module_paths = {module: path for path, module in checkpoints.MODULE_NAMES.items()}
    expected_keys = {(-1 if layer is None else layer, checkpoints.MODULE_NAMES[path])
                     for path, _, layer, _ in hf_tensor_names(CONFIG)}
    assert set(table) == expected_keys
    assert sum(n for _, _, n in table.values()) == CONFIG.num_params
    assert table[(0, "gate_proj")][2] == CONFIG.hidden_size * CONFIG.intermediate_size
    assert table[(2, "q_bias")][2] == CONFIG.num_heads * CONFIG.head_dim

    for key, (rel, mean_abs, _) in table.items():
        b = tensor_of(base_flat, module_paths[key[1]], key[0]).astype(np.float64)
        t = tensor_of(tuned_flat, module_paths[key[1]], key[0]).astype(np.float64)
        if key in KNOWN_REL:
            assert rel == pytest.approx(KNOWN_REL[key], rel=1e-6), key
            assert mean_abs == pytest.approx(np.abs(t - b).mean(), rel=1e-9), key
            assert mean_abs > 0
        else:
            assert (rel, mean_abs) == (0.0, 0.0), key
    assert table[(3, "q_bias")][1] == pytest.approx(0.25)


def test_bf16_sharded_pair_is_exact(base, tmp_path):
    """bf16 on both sides, the tuned one sharded with an index; power-of-two changes are exact in bf16."""
    base_flat, _ = base
    as_bf16 = {p: v.astype(ml_dtypes.bfloat16).astype(np.float32) for p, v in base_flat.items()}
    tuned_flat = changed(as_bf16, {("layers/mlp/down_proj/kernel", 2): lambda w: -w,
                                   ("layers/self_attn/k_norm/scale", 4): lambda w: 2 * w})
    base_dir = save(CONFIG, base_flat, tmp_path / "base", dtype="bfloat16")
    tuned_dir = save(CONFIG, tuned_flat, tmp_path / "tuned", dtype="bfloat16", max_shard_bytes=20_000)
    assert os.path.isfile(os.path.join(tuned_dir, "model.safetensors.index.json"))
    assert len([n for n in os.listdir(tuned_dir) if n.endswith(".safetensors")]) > 2
    assert SafetensorsFile(os.path.join(base_dir, "model.safetensors")).entries["lm_head.weight"]["dtype"] == "BF16"

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # same dtypes, same config: nothing to warn about
        rows = {(r.layer, r.module): r for r in compute_layer_deltas(base_dir, tuned_dir)}
    down = as_bf16["layers/mlp/down_proj/kernel"][2].astype(np.float64)
    assert rows[(2, "down_proj")].rel_change == pytest.approx(2.0, rel=1e-12)
    assert rows[(2, "down_proj")].mean_abs_change == pytest.approx(2 * np.abs(down).mean(), rel=1e-12)
    assert rows[(4, "k_norm")].rel_change == pytest.approx(1.0, rel=1e-12)
    assert rows[(4, "k_norm")].mean_abs_change == pytest.approx(1.0, rel=1e-12)
    others = [r for key, r in rows.items() if key not in ((2, "down_proj"), (4, "k_norm"))]
    assert all(r.rel_change == 0 and r.mean_abs_change == 0 for r in others)


def test_float32_against_bf16_copy_reports_rounding_and_warns(base, tmp_path):
    base_flat, base_dir = base
    tuned_dir = save(CONFIG, base_flat, tmp_path / "bf16", dtype="bfloat16")
    with pytest.warns(CheckpointWarning, match=r"dtypes differ .*float32 in base, bfloat16 in tuned"):
        rows = compute_layer_deltas(base_dir, tuned_dir)
    for r in rows:
        if r.group in ("attention", "mlp", "embedding") and not r.module.endswith("_bias"):
            assert 0 < r.rel_change <= 2.0 ** -8, (r.layer, r.module)  # bf16 keeps 8 significant bits
        else:  # unit norms and zero biases are exact in bf16
            assert r.rel_change == 0, (r.layer, r.module)


def test_chunked_streaming_matches_whole_tensors(known_pair):
    _, base_dir, _, tuned_dir = known_pair
    whole = compute_layer_deltas(base_dir, tuned_dir, chunk_elements=1 << 30)
    chunked = compute_layer_deltas(base_dir, tuned_dir, chunk_elements=100)
    assert [(r.layer, r.module) for r in whole] == [(r.layer, r.module) for r in chunked]
    for a, b in zip(whole, chunked):
        assert b.delta_sq_norm == pytest.approx(a.delta_sq_norm, rel=1e-12, abs=0)
        assert b.base_sq_norm == pytest.approx(a.base_sq_norm, rel=1e-12, abs=0)
        assert b.abs_change_sum == pytest.approx(a.abs_change_sum, rel=1e-12, abs=0)


# ---------------------------------------------------------------------------- aggregates

def test_summary_pools_groups_and_depth_thirds(known_pair):
    base_flat, base_dir, tuned_flat, tuned_dir = known_pair
    summary = summarize(compute_layer_deltas(base_dir, tuned_dir), CONFIG.num_layers)
    assert summary["depth_ranges"] == {"lower": [0, 1], "middle": [2, 3], "upper": [4, 5]}
    thirds = {"lower": [0, 1], "middle": [2, 3], "upper": [4, 5]}
    groups = {"attention": ATTENTION_PATHS, "mlp": MLP_PATHS, "norm": NORM_PATHS}

    for group, paths in groups.items():
        for depth, layers in thirds.items():
            got = summary["by_group_and_depth"][group][depth]
            rel, mean_abs = pooled(base_flat, tuned_flat, paths, layers)
            assert got["rel_change"] == pytest.approx(rel, rel=1e-9, abs=0), (group, depth)
            assert got["mean_abs_change"] == pytest.approx(mean_abs, rel=1e-9, abs=0), (group, depth)
        rel, _ = pooled(base_flat, tuned_flat, paths, range(6))
        assert summary["by_group"][group]["rel_change"] == pytest.approx(rel, rel=1e-9, abs=0)
    all_paths = ATTENTION_PATHS + MLP_PATHS + NORM_PATHS
    for depth, layers in thirds.items():
        rel, _ = pooled(base_flat, tuned_flat, all_paths, layers)
        assert summary["by_depth"][depth]["rel_change"] == pytest.approx(rel, rel=1e-9, abs=0)

    # What the crafted pair must show: MLP moved only in the lower third, attention only in the middle and upper.
    cells = summary["by_group_and_depth"]
    assert cells["mlp"]["lower"]["rel_change"] > 0 == cells["mlp"]["middle"]["rel_change"] == \
        cells["mlp"]["upper"]["rel_change"]
    assert cells["attention"]["lower"]["rel_change"] == 0 < cells["attention"]["upper"]["rel_change"]
    assert all(cells["norm"][d]["rel_change"] == 0 for d in thirds)
    assert set(summary["non_layer"]) == {"embed", "lm_head", "final_norm"}
    assert summary["non_layer"]["lm_head"]["rel_change"] == pytest.approx(0.2, rel=1e-6)
    assert summary["non_layer"]["embed"]["rel_change"] == 0
    assert summary["overall"]["num_params"] == CONFIG.num_params
    assert summary["all_layers"]["num_params"] == CONFIG.num_params - summary["non_layer"]["embed"]["num_params"] \
        - summary["non_layer"]["lm_head"]["num_params"] - CONFIG.hidden_size


def test_depth_thirds():
    assert layer_deltas.depth_ranges(28) == {"lower": [0, 9], "middle": [10, 18], "upper": [19, 27]}
    assert layer_deltas.depth_ranges(36) == {"lower": [0, 11], "middle": [12, 23], "upper": [24, 35]}
    assert layer_deltas.depth_ranges(2) == {"lower": [0, 0], "middle": [1, 1], "upper": None}
    with pytest.raises(ValueError, match="layer 6 is outside the model's 6 decoder layers"):
        layer_deltas.depth_of(6, 6)


def test_summarize_rejects_rows_beyond_num_layers_and_handles_empty_thirds():
    rows = [Row(0, "gate_proj", 4, 1.0, 4.0, 2.0), Row(1, "q_proj", 4, 0.0, 1.0, 0.0)]
    with pytest.raises(ValueError, match="layer 1 is outside"):
        summarize(rows, 1)
    summary = summarize(rows, 2)
    assert summary["by_group_and_depth"]["mlp"]["lower"]["rel_change"] == 0.5
    assert summary["by_group_and_depth"]["mlp"]["lower"]["mean_abs_change"] == 0.5
    assert summary["by_depth"]["upper"] == {"rel_change": None, "mean_abs_change": None, "num_params": 0,
                                            "num_tensors": 0}
    assert summary["all_layers"]["rel_change"] == pytest.approx(math.sqrt(1.0 / 5.0))


def test_relative_change_of_zero_base():
    assert layer_deltas.relative_change(0.0, 0.0) == 0.0
    assert layer_deltas.relative_change(1.0, 0.0) == math.inf
    assert layer_deltas.relative_change(1.0, 4.0) == 0.5


# ---------------------------------------------------------------------------- command line and files

def test_command_line_writes_every_output(known_pair, tmp_path, capsys):
    _, base_dir, _, tuned_dir = known_pair
    out = tmp_path / "out"
    assert layer_deltas.main(["layer_deltas", f"--base={base_dir}", f"--tuned={tuned_dir}", f"--output={out}"]) == 0
    printed = capsys.readouterr().out
    assert "| mlp |" in printed and "lower (0-1)" in printed

    def no_nan_or_inf(name):
        raise AssertionError(f"summary.json holds {name}, which is not JSON")

    summary = json.loads((out / "summary.json").read_text(), parse_constant=no_nan_or_inf)
    assert summary["base"] == os.path.abspath(base_dir) and summary["warnings"] == []
    assert summary["by_group_and_depth"]["mlp"]["lower"]["rel_change"] > 0
    md = (out / "summary.md").read_text()
    assert md.count("| attention |") == 2 and "| lm_head | 0.2 |" in md
    assert len(read_csv(out / "layer_deltas.csv")) == 3 + 6 * 14  # embed, head, final norm; 14 modules a layer

    from matplotlib.image import imread
    for name in ("heatmap.png", "by_layer.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, name
        pixels = imread(out / name)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400, name
        assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20, name  # more than a blank canvas


def test_log_scale_plots(known_pair, tmp_path):
    _, base_dir, _, tuned_dir = known_pair
    rows = compute_layer_deltas(base_dir, tuned_dir)
    paths = layer_deltas.plot(rows, CONFIG.num_layers, tmp_path, log_scale=True)
    assert sorted(paths) == ["by_layer", "heatmap"]
    assert all(os.path.getsize(p) > 10_000 for p in paths.values())


# ---------------------------------------------------------------------------- mismatches and bad input

def random_flat(config, seed=0):
    rng = np.random.default_rng(seed)
    return {path: rng.normal(0, 0.02, leaf.shape).astype(np.float32)
            for path, leaf in flatten_params(abstract_params(config)).items()}


def test_different_number_of_layers_is_named(base, tmp_path, capsys):
    base_flat, base_dir = base
    four = {p: v[:4] if p.startswith("layers/") else v for p, v in base_flat.items()}
    other = save(CONFIG.replace(num_layers=4), four, tmp_path / "four")
    with pytest.raises(ValueError, match=r"num_layers \(config.json 'num_hidden_layers'\) is 6 in .* but 4 in"):
        compute_layer_deltas(base_dir, other)
    out = f"--out={tmp_path / 'out'}"  # the old spelling of --output, an alias
    assert layer_deltas.main(["layer_deltas", f"--base={base_dir}", f"--tuned={other}", out]) == 2
    assert "num_hidden_layers" in capsys.readouterr().err
    assert not (tmp_path / "out" / "layer_deltas.csv").exists()


def test_different_hidden_size_is_named(base, tmp_path):
    _, base_dir = base
    wider = CONFIG.replace(hidden_size=48)
    other = save(wider, random_flat(wider), tmp_path / "wide")
    with pytest.raises(ValueError, match=r"hidden_size \(config.json 'hidden_size'\) is 32 .* but 48") as err:
        compute_layer_deltas(base_dir, other)
    assert "num_layers" not in str(err.value)


def rewrite_tensor(directory, name, array=None):
    """Replaces (or, with array None, removes) one tensor of a single-file checkpoint."""
    file = os.path.join(directory, "model.safetensors")
    st = SafetensorsFile(file)
    tensors = {k: np.array(st.get(k)) for k in st.keys() if k != name}
    del st
    if array is not None:
        tensors[name] = array
    write_safetensors(file, tensors)


def test_tensor_shape_mismatch_is_named(base, tmp_path):
    _, base_dir = base
    other = shutil.copytree(base_dir, tmp_path / "other")
    rewrite_tensor(other, "model.layers.2.mlp.up_proj.weight", np.zeros((64, 31), np.float32))
    with pytest.raises(ValueError, match=r"'model\.layers\.2\.mlp\.up_proj\.weight' has shape \(64, 32\) .* "
                                         r"but \(64, 31\)"):
        compute_layer_deltas(base_dir, other)


def test_missing_tensor_is_named(base, tmp_path):
    _, base_dir = base
    other = shutil.copytree(base_dir, tmp_path / "other")
    rewrite_tensor(other, "model.layers.5.self_attn.k_norm.weight")
    with pytest.raises(KeyError, match=r"model\.layers\.5\.self_attn\.k_norm\.weight.* is missing from checkpoint"):
        compute_layer_deltas(base_dir, other)


def test_extra_tensor_and_config_difference_are_reported(base, tmp_path):
    _, base_dir = base
    other = shutil.copytree(base_dir, tmp_path / "other")
    rewrite_tensor(other, "model.rotary_emb.inv_freq", np.ones(4, np.float32))
    config = json.loads((other / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 5e5
    (other / "config.json").write_text(json.dumps(config))
    with pytest.warns(CheckpointWarning) as caught:
        rows = compute_layer_deltas(base_dir, other)
    messages = " | ".join(str(w.message) for w in caught)
    assert "model.rotary_emb.inv_freq" in messages and "skipped" in messages
    assert "rope_theta differs" in messages
    assert all(r.rel_change == 0 for r in rows)
    # The command records them in summary.json.
    record = layer_deltas.run(base_dir, str(other), str(tmp_path / "out"))
    assert any("inv_freq" in w for w in record["warnings"])


def test_directories_that_are_not_checkpoints(base, tmp_path):
    _, base_dir = base
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compute_layer_deltas(base_dir, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a checkpoint directory this analysis reads"):
        compute_layer_deltas(tmp_path / "empty", base_dir)


def test_name_tables_cover_the_weight_table():
    assert {path for path, _, _ in WEIGHT_TABLE} <= set(checkpoints.MODULE_NAMES)
    assert set(checkpoints.MODULE_NAMES.values()) == set(layer_deltas.MODULE_GROUPS)


def test_iter_tensors_yields_hf_layout_records(base):
    base_flat, base_dir = base
    records = list(checkpoints.iter_tensors(base_dir))
    assert len(records) == len(list(hf_tensor_names(CONFIG)))
    by_name = {r.hf_name: r for r in records}
    gate = by_name["model.layers.3.mlp.gate_proj.weight"]
    assert (gate.layer, gate.module) == (3, "gate_proj")
    np.testing.assert_array_equal(gate.array, base_flat["layers/mlp/gate_proj/kernel"][3].T)  # HF [out, in]
    assert (by_name["model.norm.weight"].layer, by_name["model.norm.weight"].module) == (-1, "final_norm")
