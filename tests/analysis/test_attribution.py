"""Restore-based attribution on crafted parameter trees, and the orbax checkpoint reader.

The tuned checkpoints here differ from their base only in known groups (lower-third MLP, upper-third
attention), so every variant's parameters are known exactly.
"""

import csv
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from analysis import attribution, checkpoints, layer_deltas
from analysis.attribution import GROUPS, exchange_groups, gain_kept, swap_groups
from ftrl_jax import models
from ftrl_jax.training.checkpointing import COMMIT_MARKER, Checkpointer
from ftrl_jax.envs import build as env_build
from ftrl_jax.envs.samples import write_samples
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.models.checkpoint_io import abstract_params, flatten_params, unflatten_params
from ftrl_jax.text.tokenizer import default_tokenizer
from ftrl_jax.training.train_state import create_train_state

# Six layers: thirds 0-1, 2-3, 4-5. Qwen3 with attention biases: q/k norms and biases sit under self_attn.
CONFIG = models.preset("tiny", model_type="qwen3", vocab_size=64, hidden_size=16, intermediate_size=32,
                       num_layers=6, num_heads=2, num_kv_heads=1, head_dim=8, tie_word_embeddings=False,
                       attention_bias=True, qk_norm=True)
MLP_PATHS = {"layers/mlp/gate_proj/kernel", "layers/mlp/up_proj/kernel", "layers/mlp/down_proj/kernel"}
ATTENTION_PATHS = {"layers/self_attn/q_proj/kernel", "layers/self_attn/k_proj/kernel",
                   "layers/self_attn/v_proj/kernel", "layers/self_attn/o_proj/kernel",
                   "layers/self_attn/q_proj/bias", "layers/self_attn/k_proj/bias", "layers/self_attn/v_proj/bias",
                   "layers/self_attn/q_norm/scale", "layers/self_attn/k_norm/scale"}
CHANGED = {"mlp": [0, 1], "attention": [5]}  # the layers where tuned differs from base, per module kind


def random_flat(config, seed=0):
    """Random values for every parameter (biases and norms too, so a wrong slice of any tensor shows)."""
    rng = np.random.default_rng(seed)
    return {p: rng.normal(0, 0.05, leaf.shape).astype(np.float32)
            for p, leaf in flatten_params(abstract_params(config)).items()}


def tune(base):
    """base + a known change in the lower-third MLP (layers 0, 1) and the upper-third attention (layer 5)."""
    tuned = {p: v.copy() for p, v in base.items()}
    for kind, layers in CHANGED.items():
        for path in (MLP_PATHS if kind == "mlp" else ATTENTION_PATHS):
            for layer in layers:
                tuned[path][layer] += 0.5 + 0.1 * layer
    return tuned


@pytest.fixture(scope="module")
def pair():
    base = random_flat(CONFIG)
    return base, tune(base)


def assert_trees_equal(got, want):
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=path)


def differing(a, b):
    """{(path, layer or None)} where two flat trees differ."""
    out = set()
    for path in a:
        if path.startswith("layers/"):
            out |= {(path, i) for i in range(a[path].shape[0]) if not np.array_equal(a[path][i], b[path][i])}
        elif not np.array_equal(a[path], b[path]):
            out.add((path, None))
    return out


# ---------------------------------------------------------------------------- groups

def test_groups_are_module_kinds_by_depth_third():
    assert list(GROUPS) == ["mlp_lower", "mlp_middle", "mlp_upper", "attention_lower", "attention_middle",
                            "attention_upper", "mlp_all", "attention_all"]
    flat = random_flat(CONFIG)
    mlp_lower = GROUPS["mlp_lower"].slices(flat, 6)
    assert set(mlp_lower) == MLP_PATHS and all(s == slice(0, 2) for s in mlp_lower.values())
    attention_upper = GROUPS["attention_upper"].slices(flat, 6)
    assert set(attention_upper) == ATTENTION_PATHS and all(s == slice(4, 6) for s in attention_upper.values())
    assert all(s == slice(0, 6) for s in GROUPS["attention_all"].slices(flat, 6).values())
    # Thirds as layer_deltas.depth_of cuts them: 28 layers -> 0-9, 10-18, 19-27.
    assert [GROUPS[f"mlp_{d}"].layer_range(28) for d in ("lower", "middle", "upper")] == [(0, 10), (10, 19), (19, 28)]
    for layer in range(28):
        depth = layer_deltas.depth_of(layer, 28)
        first, stop = GROUPS[f"mlp_{depth}"].layer_range(28)
        assert first <= layer < stop
    # A two-layer model has no upper third: the group is empty, not silently the wrong layers.
    assert GROUPS["mlp_upper"].layer_range(2) is None and GROUPS["mlp_upper"].slices(flat, 2) == {}


# ---------------------------------------------------------------------------- swap_groups

def test_restoring_the_changed_groups_gives_base_exactly(pair):
    base, tuned = pair
    assert differing(base, tuned) == {(p, i) for p in MLP_PATHS for i in (0, 1)} | \
        {(p, 5) for p in ATTENTION_PATHS}
    restored = swap_groups(tuned, base, [GROUPS["mlp_lower"], GROUPS["attention_upper"]])
    assert_trees_equal(restored, base)
    # Grafting the same groups onto base gives tuned exactly.
    assert_trees_equal(swap_groups(base, tuned, [GROUPS["mlp_lower"], GROUPS["attention_upper"]]), tuned)


def test_restoring_one_group_leaves_the_other_change(pair):
    base, tuned = pair
    only_attention = swap_groups(tuned, base, [GROUPS["mlp_lower"]])
    assert differing(only_attention, base) == {(p, 5) for p in ATTENTION_PATHS}
    # A group where nothing changed gives tuned back; the all-layers group covers the lower third.
    assert_trees_equal(swap_groups(tuned, base, [GROUPS["mlp_middle"]]), tuned)
    assert_trees_equal(swap_groups(tuned, base, [GROUPS["mlp_all"]]), only_attention)
    graft = swap_groups(base, tuned, [GROUPS["attention_all"]])
    assert differing(graft, base) == {(p, 5) for p in ATTENTION_PATHS}


def test_swap_is_pure_and_shares_untouched_leaves(pair):
    base, tuned = pair
    before = {p: v.copy() for p, v in tuned.items()}
    out = swap_groups(tuned, base, [GROUPS["mlp_lower"]])
    assert_trees_equal(tuned, before)
    for path in out:
        assert (out[path] is tuned[path]) == (path not in MLP_PATHS), path


def test_swap_on_nested_jax_trees_matches_numpy(pair):
    base, tuned = pair
    nested_base = unflatten_params({p: jnp.asarray(v) for p, v in base.items()})
    nested_tuned = unflatten_params({p: jnp.asarray(v) for p, v in tuned.items()})
    out = swap_groups(nested_tuned, nested_base, [GROUPS["attention_upper"]])
    assert isinstance(out["layers"]["self_attn"]["q_proj"]["kernel"], jax.Array)
    assert_trees_equal(flatten_params(out), swap_groups(tuned, base, [GROUPS["attention_upper"]]))


def test_swap_rejects_trees_of_other_shapes(pair):
    base, tuned = pair
    other = dict(tuned, **{"layers/mlp/up_proj/kernel": tuned["layers/mlp/up_proj/kernel"][:, :, :8]})
    with pytest.raises(ValueError, match=r"'layers/mlp/up_proj/kernel' has shape \(6, 16, 32\) .* \(6, 16, 8\)"):
        swap_groups(base, other, [GROUPS["mlp_lower"]])
    with pytest.raises(ValueError, match="differ in paths"):
        swap_groups(base, {p: v for p, v in tuned.items() if p != "norm/scale"}, [GROUPS["mlp_lower"]])


# ---------------------------------------------------------------------------- exchange in place

def test_exchange_makes_both_variants_and_undoes_itself(pair):
    base, tuned = pair
    a, b = {p: v.copy() for p, v in tuned.items()}, {p: v.copy() for p, v in base.items()}
    ids = {p: id(v) for p, v in a.items()}
    groups = [GROUPS["mlp_lower"], GROUPS["mlp_all"]]  # overlapping: each layer must move once
    moved = exchange_groups(a, b, groups)
    assert moved == sum(base[p].size for p in MLP_PATHS)
    assert_trees_equal(a, swap_groups(tuned, base, groups))
    assert_trees_equal(b, swap_groups(base, tuned, groups))
    assert {p: id(v) for p, v in a.items()} == ids  # in place: no new arrays
    exchange_groups(a, b, groups)
    assert_trees_equal(a, tuned)
    assert_trees_equal(b, base)


def test_exchange_needs_one_dtype(pair):
    base, tuned = pair
    half = {p: v.astype(ml_dtypes.bfloat16) for p, v in base.items()}
    with pytest.raises(ValueError, match="'layers/mlp/down_proj/kernel' is float32 in one tree and bfloat16"):
        exchange_groups({p: v.copy() for p, v in tuned.items()}, half, [GROUPS["mlp_lower"]])


# ---------------------------------------------------------------------------- share of the gain

def test_gain_kept_arithmetic():
    assert gain_kept(0.3, 0.2, 0.6) == pytest.approx(0.25)
    assert gain_kept(0.2, 0.2, 0.6) == 0.0 and gain_kept(0.6, 0.2, 0.6) == 1.0
    assert gain_kept(0.7, 0.2, 0.6) == pytest.approx(1.25)  # a variant better than tuned keeps more than all
    assert gain_kept(0.1, 0.2, 0.6) == pytest.approx(-0.25)
    assert gain_kept(0.5, 0.6, 0.4) == pytest.approx(0.5)  # RL made it worse: still the share of the change
    assert gain_kept(0.5, 0.4, 0.4) is None
    assert gain_kept(0.5, 0.4, 0.4005) is None  # |gain| below the default 1e-3
    assert gain_kept(0.4005, 0.4, 0.4010, min_gain=1e-4) == pytest.approx(0.5)
    assert gain_kept(0.5, float("nan"), 0.4) is None


def scoring_evaluator(base, tuned):
    """A stand-in for the model evaluation: F1 = 0.2 + 0.3 if the lower MLP is tuned's + 0.1 if the upper
    attention is, so every variant's score says which parameters it was given. Per sample: two single-hop
    samples scoring 2 x F1 and 0.0 and a multi-hop sample scoring F1 (so their mean over types is F1)."""
    seen = []

    def evaluate_params(flat):
        seen.append({p: v.copy() for p, v in flat.items()})
        mlp = np.array_equal(flat["layers/mlp/gate_proj/kernel"][:2], tuned["layers/mlp/gate_proj/kernel"][:2])
        attention = np.array_equal(flat["layers/self_attn/q_norm/scale"][5], tuned["layers/self_attn/q_norm/scale"][5])
        f1 = 0.2 + 0.3 * mlp + 0.1 * attention
        episodes = [{"data_source": "self/single_hop", "solve_f1": 2 * f1},
                    {"data_source": "self/single_hop", "solve_f1": 0.0},
                    {"data_source": "self/multi_hop", "solve_f1": f1}]
        metrics = {"solve_precision": 1.0, "solve_rate": f1, "solve_f1": f1}
        return metrics, {"self/multi_hop": {"solve_f1": f1}}, episodes

    return evaluate_params, seen


def test_attribute_evaluates_every_variant_and_puts_the_trees_back(pair):
    base, tuned = ({p: v.copy() for p, v in tree.items()} for tree in pair)
    evaluate_params, seen = scoring_evaluator(pair[0], pair[1])
    results = attribution.attribute(base, tuned, evaluate_params, list(GROUPS.values()), log=lambda _: None)
    assert_trees_equal(base, pair[0])
    assert_trees_equal(tuned, pair[1])

    by_name = {r.variant: r for r in results}
    assert [r.variant for r in results][:4] == ["base", "tuned", "restore:mlp_lower", "graft:mlp_lower"]
    assert len(results) == 2 + 2 * len(GROUPS)
    f1 = {name: r.metrics["solve_f1"] for name, r in by_name.items()}
    kept = {name: r.gain_kept for name, r in by_name.items()}
    assert f1["base"] == pytest.approx(0.2) and f1["tuned"] == pytest.approx(0.6)
    assert (kept["base"], kept["tuned"]) == (0.0, pytest.approx(1.0))
    assert kept["restore:mlp_lower"] == pytest.approx(0.25) and kept["graft:mlp_lower"] == pytest.approx(0.75)
    assert kept["restore:attention_upper"] == pytest.approx(0.75) and kept["graft:attention_upper"] == pytest.approx(0.25)
    assert kept["restore:mlp_all"] == pytest.approx(0.25) and kept["graft:attention_all"] == pytest.approx(0.25)
    for unchanged in ("mlp_middle", "mlp_upper", "attention_lower", "attention_middle"):
        assert kept[f"restore:{unchanged}"] == pytest.approx(1.0) and kept[f"graft:{unchanged}"] == 0.0
    # What the evaluator saw is exactly swap_groups' variant.
    order = [r.variant for r in results]
    assert_trees_equal(seen[order.index("restore:mlp_lower")], swap_groups(pair[1], pair[0], [GROUPS["mlp_lower"]]))
    assert_trees_equal(seen[order.index("graft:attention_all")],
                       swap_groups(pair[0], pair[1], [GROUPS["attention_all"]]))
    assert by_name["restore:mlp_lower"].layers == "0-1" and by_name["restore:mlp_all"].layers == "all"
    assert by_name["graft:mlp_lower"].num_params == sum(pair[0][p][:2].size for p in MLP_PATHS)


def test_every_variant_gets_paired_intervals_against_base_and_tuned(pair):
    evaluate_params, _ = scoring_evaluator(pair[0], pair[1])
    base, tuned = ({p: v.copy() for p, v in tree.items()} for tree in pair)
    results = attribution.attribute(base, tuned, evaluate_params, [GROUPS["mlp_lower"], GROUPS["mlp_upper"]],
                                    bootstrap={"num_resamples": 300, "seed": 1}, log=lambda _: None)
    by_name = {r.variant: r for r in results}
    assert set(by_name["base"].intervals) == {"tuned"} and set(by_name["tuned"].intervals) == {"base"}
    # Restoring the lower MLP costs 0.6 on the first single-hop sample and 0.3 on the multi-hop one: the mean
    # over the two scenario types of their mean differences, (-0.6 / 2 - 0.3) / 2, is the headline's -0.3.
    lost = by_name["restore:mlp_lower"].intervals["tuned"]
    assert lost["delta"] == pytest.approx(-0.3) and lost["high"] < 0 and lost["num_decreased"] == 2
    assert lost["low"] == pytest.approx(-0.45)  # a resample drawing the first single-hop sample twice
    assert lost["num_pairs"] == 3 and lost["num_resamples"] == 300 and lost["seed"] == 1
    assert by_name["graft:mlp_lower"].intervals["base"]["delta"] == pytest.approx(0.3)
    # An unchanged group: its restore is tuned itself, a difference of exactly zero on every sample.
    same = by_name["restore:mlp_upper"].intervals["tuned"]
    assert same["delta"] == same["low"] == same["high"] == 0.0 and same["num_increased"] == same["num_decreased"] == 0
    table = attribution.summary_markdown(results, {"base": "b", "tuned": "t", "data": "d", "num_samples": 3,
                                                   "metric_basis": "x"})
    assert "| F1 - base [95%] | F1 - tuned [95%] |" in table
    assert "| restore:mlp_lower | 0-1 | 100.00 | 30.00 | 30.00 | 25% | +10.00 [" in table
    assert "| base | - | 100.00 | 20.00 | 20.00 | 0% | - | -40.00 [" in table
    # Rows that do not pair: no interval, and a note that says why (the other figures stay).
    short = [dataclasses.replace(r, intervals={}) for r in results]
    short[2] = dataclasses.replace(short[2], episodes=short[2].episodes[:2])
    attribution.add_paired_intervals(short, num_resamples=50)
    assert short[2].intervals == {} and "no interval against base: the two evaluations hold 3 and 2" in short[2].note
    assert short[2].metrics == results[2].metrics and set(short[3].intervals) == {"base", "tuned"}


def test_no_gain_makes_every_share_undefined_and_says_so(pair):
    base, tuned = pair

    def flat_score(_):
        return {"solve_precision": 0.5, "solve_rate": 0.0, "solve_f1": 0.0}, {}, []

    results = attribution.attribute({p: v.copy() for p, v in base.items()}, {p: v.copy() for p, v in tuned.items()},
                                    flat_score, [GROUPS["mlp_lower"]], log=lambda _: None)
    assert all(r.gain_kept is None for r in results)
    assert all("undefined: the RL gain" in r.note for r in results)


def test_empty_thirds_are_reported_not_evaluated():
    small = CONFIG.replace(num_layers=2)
    base = random_flat(small)
    calls = []

    def count(flat):
        calls.append(1)
        return {"solve_precision": 1.0, "solve_rate": 0.5, "solve_f1": 0.5}, {}, []

    results = attribution.attribute(base, {p: v + 1 for p, v in base.items()}, count,
                                    [GROUPS["mlp_lower"], GROUPS["mlp_upper"]], log=lambda _: None)
    upper = [r for r in results if r.group == "mlp_upper"]
    assert [r.metrics for r in upper] == [None, None] and all("no upper third" in r.note for r in upper)
    assert len(calls) == 4  # base, tuned, restore and graft of the lower third


def test_headline_metrics_fall_back_to_the_episode_mean():
    from ftrl_jax.rollout.evaluation import summarize

    rows = [{"data_source": "self/multi_hop", "solve_precision": 1.0, "solve_rate": 0.5, "solve_f1": 0.6},
            {"data_source": "self/multi_hop", "solve_precision": 0.0, "solve_rate": 0.0, "solve_f1": 0.0},
            {"data_source": "self/single_hop", "solve_precision": 1.0, "solve_rate": 1.0, "solve_f1": 1.0}]

    class Report:
        episodes = rows
        scenario_average = summarize(rows)[1]

    metrics, basis = attribution.headline_metrics(Report)
    assert basis == "average over scenario types" and metrics["solve_f1"] == pytest.approx((0.3 + 1.0) / 2)
    Report.episodes = [dict(r, data_source="toolhop") for r in rows]
    Report.scenario_average = {}
    metrics, basis = attribution.headline_metrics(Report)
    assert basis.startswith("mean over episodes") and metrics["solve_f1"] == pytest.approx(1.6 / 3)


# ---------------------------------------------------------------------------- a main-job run's layout

def save_run(root, base, tuned, tokenizer, samples, *, steps=(1, 2), dtype=None):
    """A workdir as the main job leaves it: warmstart/ (base), export/ (tuned), tokenizer/, envs/eval.jsonl and
    orbax RL checkpoints whose last step holds tuned (earlier steps: halfway between)."""
    config = CONFIG.replace(vocab_size=len(tokenizer), eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                            pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    root = str(root)
    models.save_pretrained(config, unflatten_params(base), os.path.join(root, "warmstart"))
    models.save_pretrained(config, unflatten_params(tuned), os.path.join(root, "export"))
    for directory in ("tokenizer", "export", "warmstart"):
        tokenizer.save_pretrained(os.path.join(root, directory))
    write_samples(os.path.join(root, "envs", "eval.jsonl"), samples)
    with open(os.path.join(root, "config.json"), "w") as f:  # the training config, not a model config
        json.dump({"preset": "tiny", "workdir": root}, f)
    with Checkpointer(os.path.join(root, "checkpoints", "rl"), max_to_keep=None, async_save=False) as ckpt:
        for step in steps:
            weight = step / steps[-1]
            params = {p: (base[p] + weight * (tuned[p] - base[p])).astype(dtype or base[p].dtype) for p in base}
            state = create_train_state(unflatten_params({p: jnp.asarray(v) for p, v in params.items()}),
                                       optax.adam(1e-3))
            ckpt.save(step, state, {"rl_step": step})
    return root, config


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(scope="module")
def samples():
    with Sandbox() as sandbox:
        envs, _ = env_build.build_environments(3, seed=11, complexity="low", sandbox=sandbox)
    return [e.to_sample("eval") for e in envs]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer, samples):
    config = CONFIG.replace(vocab_size=len(tokenizer))
    base = random_flat(config, seed=3)
    return (*save_run(tmp_path_factory.mktemp("run"), base, tune(base), tokenizer, samples), base)


def test_orbax_step_reads_as_the_exported_directory(run_dir):
    root, _, _ = run_dir
    step = checkpoints.open_checkpoint(os.path.join(root, "checkpoints", "rl", "2"))
    exported = checkpoints.open_checkpoint(os.path.join(root, "export"))
    assert isinstance(step, checkpoints.OrbaxCheckpoint) and isinstance(exported, checkpoints.HFCheckpoint)
    assert step.config == exported.config and step.workdir == root
    assert step.config_file == os.path.join(root, "export", "config.json")
    records = list(step.iter_tensors())
    for got, want in zip(records, exported.iter_tensors(), strict=True):
        assert (got.hf_name, got.layer, got.module) == (want.hf_name, want.layer, want.module)
        np.testing.assert_array_equal(got.array, want.array, err_msg=got.hf_name)
    assert_trees_equal(step.load_params(), exported.load_params())
    assert step.unmapped_names() == []


def test_workdir_and_checkpoint_root_mean_the_newest_step(run_dir):
    root, _, _ = run_dir
    for path in (root, os.path.join(root, "checkpoints", "rl")):
        source = checkpoints.open_checkpoint(path)
        assert source.path == os.path.join(root, "checkpoints", "rl", "2"), path


def test_layer_deltas_between_warmstart_and_an_orbax_step(run_dir):
    root, _, base = run_dir
    rows = layer_deltas.compute_layer_deltas(os.path.join(root, "warmstart"), os.path.join(root, "checkpoints", "rl", "1"))
    changed = {(r.layer, r.module) for r in rows if r.rel_change > 0}
    mlp_modules = {"gate_proj", "up_proj", "down_proj"}
    attention_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm"}
    assert changed == {(i, m) for i in (0, 1) for m in mlp_modules} | {(5, m) for m in attention_modules}
    # Step 1 of 2 is halfway: |dW| is half of the tuned change (0.5 + 0.1 layer) everywhere it changed.
    by_key = {(r.layer, r.module): r for r in rows}
    assert by_key[(1, "up_proj")].mean_abs_change == pytest.approx(0.3, rel=1e-5)
    assert by_key[(5, "k_norm")].mean_abs_change == pytest.approx(0.5, rel=1e-5)


def test_orbax_bf16_parameters_stay_bf16(tmp_path, tokenizer, samples):
    config = CONFIG.replace(vocab_size=len(tokenizer))
    base = random_flat(config, seed=4)
    root, _ = save_run(tmp_path, base, tune(base), tokenizer, samples, steps=(3,), dtype=ml_dtypes.bfloat16)
    source = checkpoints.open_checkpoint(root)
    assert source.config.param_dtype == "bfloat16"
    params = source.load_params()
    assert {v.dtype for v in params.values()} == {np.dtype(ml_dtypes.bfloat16)}
    np.testing.assert_array_equal(params["layers/mlp/up_proj/kernel"],
                                  tune(base)["layers/mlp/up_proj/kernel"].astype(ml_dtypes.bfloat16))


def test_orbax_inputs_that_cannot_be_read_say_why(run_dir, tmp_path):
    root, _, _ = run_dir
    copy = shutil.copytree(root, tmp_path / "run")
    os.remove(copy / "checkpoints" / "rl" / "2" / COMMIT_MARKER)
    with pytest.raises(ValueError, match=rf"has no {COMMIT_MARKER}: it is incomplete"):
        checkpoints.open_checkpoint(copy / "checkpoints" / "rl" / "2")
    assert checkpoints.open_checkpoint(copy).path.endswith(os.path.join("rl", "1"))  # newest complete step

    shutil.rmtree(copy / "export")
    assert checkpoints.open_checkpoint(copy).config_file == str(copy / "warmstart" / "config.json")
    shutil.rmtree(copy / "warmstart")
    with pytest.raises(FileNotFoundError, match="stores shapes but not the architecture.*export.*warmstart"):
        checkpoints.open_checkpoint(copy)

    loose = shutil.copytree(root + "/checkpoints/rl/1", tmp_path / "loose" / "1")
    with pytest.raises(FileNotFoundError, match="is not inside W/checkpoints/<phase>/"):
        checkpoints.open_checkpoint(loose)

    wrong = shutil.copytree(root, tmp_path / "wrong")
    hf = json.loads((wrong / "export" / "config.json").read_text())
    hf["intermediate_size"] = 24
    (wrong / "export" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"layers/mlp/gate_proj/kernel: shape \(6, 16, 32\), .* implies \(6, 16, 24\)"):
        checkpoints.open_checkpoint(wrong)

    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no complete orbax checkpoint"):
        checkpoints.open_checkpoint(tmp_path / "empty_run")


# ---------------------------------------------------------------------------- the command, end to end

def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_command_line_on_a_run(run_dir, tmp_path, capsys):
    root, _, _ = run_dir
    out = tmp_path / "out"
    argv = ["attribution", f"--base={root}/warmstart", f"--tuned={root}", f"--data={root}/envs/eval.jsonl",
            f"--output={out}", "--limit=2", "--max_turns=2", "--max_new_tokens=6", "--groups=mlp_lower,attention_upper"]
    assert attribution.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| restore:mlp_lower | 0-1 |" in printed

    rows = read_csv(out / "attribution.csv")
    assert tuple(rows[0]) == attribution.CSV_COLUMNS
    assert [r["variant"] for r in rows] == ["base", "tuned", "restore:mlp_lower", "graft:mlp_lower",
                                            "restore:attention_upper", "graft:attention_upper"]
    for r in rows:
        for metric in ("solve_precision", "solve_rate", "solve_f1"):
            assert 0.0 <= float(r[metric]) <= 1.0
        assert (r["gain_kept"] == "") == ("undefined" in r["note"])
        assert (r["vs_base_delta"] == "") == (r["variant"] == "base")
        if r["vs_tuned_delta"]:
            assert float(r["vs_tuned_low"]) <= float(r["vs_tuned_delta"]) <= float(r["vs_tuned_high"])
    assert rows[2]["num_params"] == str(2 * 3 * CONFIG.hidden_size * CONFIG.intermediate_size)  # 2 layers' MLP

    record = json.loads((out / "attribution.json").read_text())
    assert record["tuned"] == os.path.join(root, "checkpoints", "rl", "2")  # the workdir's newest RL step
    assert record["tokenizer"] == os.path.join(root, "tokenizer")
    assert record["num_samples"] == 2 and record["settings"]["template"] == "qwen3"
    assert record["settings"]["max_new_tokens"] == 6 and record["depth_ranges"]["upper"] == [4, 5]
    assert len(record["episode_data_sources"]) == 2 and "episodes" not in record["variants"][0]
    assert all(len(v["episode_solve_f1"]) == 2 for v in record["variants"])
    png = (out / "attribution.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_command_line_reports_bad_input(run_dir, tmp_path, capsys):
    root, _, _ = run_dir
    common = [f"--data={root}/envs/eval.jsonl", f"--out={tmp_path / 'out'}"]  # --out: the old spelling of --output
    assert attribution.main(["attribution", f"--base={root}/warmstart", f"--tuned={root}", "--groups=mlp_lowr",
                             *common]) == 2
    assert "error: unknown parameter groups ['mlp_lowr']" in capsys.readouterr().err
    assert attribution.main(["attribution", f"--base={root}/warmstart", *common]) == 2
    assert capsys.readouterr().err == "error: --tuned is required (see --help)\n"
    assert attribution.main(["attribution", f"--base={root}/warmstart", f"--tuned={root}", "--template=chatml",
                             *common]) == 2
    assert capsys.readouterr().err.startswith("error: flag --template=chatml")

    other = models.preset("tiny", vocab_size=CONFIG.vocab_size, num_layers=2, hidden_size=16, intermediate_size=32,
                          num_heads=2, num_kv_heads=1, head_dim=8)
    models.save_pretrained(other, models.init_params(other, jax.random.PRNGKey(0)), str(tmp_path / "other"))
    assert attribution.main(["attribution", f"--base={tmp_path / 'other'}", f"--tuned={root}/export", *common]) == 2
    assert "not the same architecture" in capsys.readouterr().err

    with pytest.raises(FileNotFoundError, match="no tokenizer .* pass --tokenizer=DIR"):
        attribution.find_tokenizer_dir(str(tmp_path / "other"), checkpoints.open_checkpoint(tmp_path / "other"))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": 3}\n')
    assert attribution.main(["attribution", f"--base={root}/warmstart", f"--tuned={root}/export", f"--data={bad}",
                             f"--output={tmp_path / 'out'}"]) == 2
    captured = capsys.readouterr()
    assert "skipping" in captured.out and "no usable samples" in captured.err
    assert not (tmp_path / "out" / "attribution.csv").exists()
