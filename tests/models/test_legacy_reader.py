"""Exports that stacks on transformers 4 read right: a transformers 4.57 reader (the line older vLLM and sglang
releases bundle), installed into a temporary folder, sees our RoPE settings and gives our logits."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ftrl_jax import models

LEGACY_TRANSFORMERS = ("transformers==4.57.1", "huggingface-hub>=0.34,<1.0", "tokenizers>=0.22,<=0.23.0")
LLAMA3_SCALING = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                  ("original_max_position_embeddings", 64), ("rope_type", "llama3"))

READER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import torch
    import transformers
    assert transformers.__version__.startswith("4."), transformers.__version__
    path, ids_file, out_file = sys.argv[1:]
    config = transformers.AutoConfig.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    ids = torch.as_tensor(np.load(ids_file), dtype=torch.long)
    with torch.no_grad():
        np.save(out_file, model(ids).logits.float().numpy())
    print(json.dumps({"rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling,
                      "torch_dtype": str(config.torch_dtype)}))
""")


@pytest.fixture(scope="module")
def legacy_site(tmp_path_factory):
    """A folder holding transformers 4.57 (and the hub/tokenizers it pins); torch comes from this environment."""
    target = tmp_path_factory.mktemp("transformers4")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           *LEGACY_TRANSFORMERS], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail("could not install a transformers 4.57 reader with pip (the package index must be "
                    f"reachable): {proc.stderr[-2000:]}")
    return str(target)


def read_with_transformers4(site, path, ids, tmp_path):
    ids_file, out_file = str(tmp_path / "ids.npy"), str(tmp_path / "logits.npy")
    np.save(ids_file, ids)
    env = {**os.environ, "PYTHONPATH": site, "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", READER, path, ids_file, out_file], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), np.load(out_file)


@pytest.mark.parametrize("family", ["qwen2", "llama3", "qwen3"])
def test_transformers4_reads_rope_and_gives_our_logits(family, legacy_site, tmp_path):
    if family == "qwen2":
        config = models.preset("tiny", model_type="qwen2", rope_theta=1e6, attention_bias=True, num_layers=2)
    elif family == "llama3":
        config = models.preset("tiny", model_type="llama", rope_theta=5e5, rope_scaling=LLAMA3_SCALING,
                               attention_bias=False, num_layers=2, max_position_embeddings=256)
    else:
        config = models.preset("tiny", model_type="qwen3", rope_theta=1e6, qk_norm=True, attention_bias=False,
                               num_layers=2)
    params = models.init_params(config, jax.random.PRNGKey(1))
    path = str(tmp_path / "export")
    models.save_pretrained(config, params, path)

    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 96)).astype(np.int32)
    seen, theirs = read_with_transformers4(legacy_site, path, ids, tmp_path)
    assert seen["rope_theta"] == config.rope_theta
    if family == "llama3":
        assert seen["rope_scaling"]["rope_type"] == "llama3"
        assert seen["rope_scaling"]["factor"] == 8.0
        assert seen["rope_scaling"]["original_max_position_embeddings"] == 64
    else:
        assert seen["rope_scaling"] is None
    assert seen["torch_dtype"] == "torch.float32"
    ours = np.asarray(models.forward(config, params, ids, np.ones_like(ids)))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_transformers5_reads_the_same_file(tmp_path):
    """Both spellings side by side must not confuse today's reader (ours and transformers 5)."""
    transformers = pytest.importorskip("transformers")
    config = models.preset("tiny", model_type="llama", rope_theta=5e5, rope_scaling=LLAMA3_SCALING,
                           attention_bias=False, num_layers=1, max_position_embeddings=256)
    path = str(tmp_path / "export")
    models.save_pretrained(config, models.init_params(config, jax.random.PRNGKey(0)), path)
    hf = transformers.AutoConfig.from_pretrained(path)
    assert hf.rope_parameters["rope_theta"] == 5e5 and hf.rope_parameters["rope_type"] == "llama3"
    assert models.load_hf_config(path).rope_scaling == config.rope_scaling
    assert models.load_hf_config(path).rope_theta == config.rope_theta
