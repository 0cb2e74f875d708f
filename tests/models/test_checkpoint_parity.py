"""Logit parity with transformers' PyTorch models, and the checkpoint round trip both ways."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftrl_jax import models
from tests.hf_reference import REFERENCE_MODELS, hf_logits, save_hf_model, torch, transformers

TOL = 1e-4


def _random_ids(vocab, shape, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=shape)


@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_load_pretrained_matches_transformers(name, tmp_path):
    hf_model = save_hf_model(name, tmp_path)
    config, params = models.load_pretrained(tmp_path, dtype=jnp.float32)
    assert config.num_layers == hf_model.config.num_hidden_layers
    ids = _random_ids(config.vocab_size, (2, 11))
    ours = np.asarray(jax.jit(models.forward, static_argnums=0)(config, params, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, hf_logits(hf_model, ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["qwen2_tied", "qwen3_untied", "llama3_untied"])
def test_attention_probabilities_match_transformers(name, tmp_path):
    """Per-layer, per-head attention maps (GQA, q/k norms, llama3 RoPE) equal transformers' eager ones."""
    save_hf_model(name, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
    config, params = models.load_pretrained(tmp_path, dtype=jnp.float32)
    ids = _random_ids(config.vocab_size, (2, 13), seed=3)
    ours = np.asarray(models.attention_probabilities(config, params, jnp.asarray(ids)))
    with torch.no_grad():
        theirs = torch.stack(hf_model(torch.as_tensor(ids), output_attentions=True).attentions).numpy()
    assert ours.shape == theirs.shape == (config.num_layers, 2, config.num_heads, 13, 13)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(ours, k=1) == 0)  # causal: nothing from later tokens
    rows = np.asarray(jax.jit(models.attention_probabilities, static_argnums=0)(
        config, params, jnp.asarray(ids), jnp.asarray([12, 0, 5])))
    np.testing.assert_allclose(rows, ours[:, :, :, [12, 0, 5]], atol=1e-6)


@pytest.mark.parametrize("name", ["qwen2_tied", "qwen3_untied", "llama3_untied"])
def test_padded_batch_matches_transformers(name, tmp_path):
    """Left and right padding: valid positions give the same logits as transformers."""
    hf_model = save_hf_model(name, tmp_path)
    config, params = models.load_pretrained(tmp_path)
    ids = _random_ids(config.vocab_size, (3, 9), seed=1)
    mask = np.ones_like(ids)
    mask[0, :3] = 0  # left padded
    mask[1, 6:] = 0  # right padded
    ours = np.asarray(models.forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    ref = hf_logits(hf_model, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["qwen2_untied", "qwen3_tied", "llama3_untied"])
def test_save_pretrained_loads_in_transformers(name, tmp_path):
    """Our params -> save_pretrained -> transformers from_pretrained gives the same logits."""
    save_hf_model(name, tmp_path / "src")
    config, params = models.load_pretrained(tmp_path / "src")
    # Perturb so the round trip carries our numbers, not the originals.
    params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.PRNGKey(3), x.shape), params)
    models.save_pretrained(config, params, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = _random_ids(config.vocab_size, (2, 7), seed=2)
    ours = np.asarray(models.forward(config, params, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, hf_logits(reloaded, ids), atol=TOL, rtol=0)


def test_init_params_round_trip_sharded(tmp_path):
    """A fresh model saved in several shards with an index loads back bit-exactly."""
    config = models.preset("tiny", vocab_size=300, num_layers=2)
    params = models.init_params(config, jax.random.PRNGKey(0))
    models.save_pretrained(config, params, tmp_path, max_shard_bytes=200_000)
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) > 1
    config2, params2 = models.load_pretrained(tmp_path)
    assert config2.replace(eos_token_id=None, pad_token_id=None) == config.replace(eos_token_id=None, pad_token_id=None)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # transformers reads the sharded directory too.
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = _random_ids(config.vocab_size, (1, 5))
    np.testing.assert_allclose(np.asarray(models.forward(config, params, jnp.asarray(ids))), hf_logits(hf, ids),
                               atol=TOL, rtol=0)


def test_bfloat16_round_trip(tmp_path):
    config = models.preset("tiny", vocab_size=200, num_layers=1, param_dtype="bfloat16", dtype="bfloat16")
    params = models.init_params(config, jax.random.PRNGKey(1))
    models.save_pretrained(config, params, tmp_path)
    config2, params2 = models.load_pretrained(tmp_path, dtype="bfloat16")
    assert config2.param_dtype == "bfloat16"
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_missing_tensor_is_named(tmp_path):
    save_hf_model("qwen2_tied", tmp_path)
    from ftrl_jax.models.checkpoint_io import SafetensorsFile, write_safetensors
    st = SafetensorsFile(str(tmp_path / "model.safetensors"))
    kept = {k: np.array(st.get(k)) for k in st.keys() if k != "model.layers.1.mlp.up_proj.weight"}
    del st
    write_safetensors(str(tmp_path / "model.safetensors"), kept)
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        models.load_pretrained(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    save_hf_model("qwen3_untied", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight"):
        models.load_pretrained(tmp_path)


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8,
                                                      "intermediate_size": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        models.load_pretrained(tmp_path)


def test_unsupported_model_type_lists_supported():
    with pytest.raises(ValueError, match="supported: llama, qwen2, qwen3"):
        models.config_from_hf({"model_type": "gpt2"})


def test_transformers4_style_config_is_read():
    """Released Qwen checkpoints still carry `rope_theta` / `rope_scaling` / `torch_dtype` at top level."""
    cfg = models.config_from_hf({"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
                                 "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                 "rope_theta": 1e6, "rope_scaling": None, "torch_dtype": "bfloat16"})
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling == () and cfg.attention_bias and cfg.head_dim == 4


@pytest.mark.parametrize("name", sorted(models.PRESETS))
def test_presets_have_real_shapes(name):
    cfg = models.preset(name)
    expected_billions = {"qwen2.5-0.5b": 0.49, "qwen2.5-1.5b": 1.54, "qwen2.5-3b": 3.09, "qwen2.5-7b": 7.62,
                         "qwen2.5-14b": 14.77, "qwen3-0.6b": 0.60, "qwen3-1.7b": 1.72, "qwen3-4b": 4.02,
                         "qwen3-8b": 8.19, "qwen3-14b": 14.77, "smol-135m": 0.135, "tiny": 0.0031}
    assert cfg.num_params / 1e9 == pytest.approx(expected_billions[name], rel=0.03)
    abstract = models.checkpoint_io.abstract_params(cfg) if name in ("tiny", "smol-135m") else None
    if abstract is not None:
        assert sum(x.size for x in jax.tree.leaves(abstract)) == cfg.num_params


def test_tensors_the_model_has_no_place_for_are_an_error_not_dropped(tmp_path):
    # A Llama with attention biases carries o_proj.bias, which this decoder has no place for: loading must say so
    # instead of dropping it (the logits would silently differ).
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, attention_bias=True)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"o_proj\.bias"):
        models.load_pretrained(str(tmp_path))
