"""A paper preset's path end to end: `--config=configs/qwen.py:qwen2.5-7b --config.model.path=DIR` on a tiny
random Qwen2 checkpoint with the real Qwen2.5 tokenizer, bfloat16 parameters, training environments from a
sample-format file. It checkpoints, resumes, exports, and the export reloads in transformers."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ftrl_jax import models
from ftrl_jax.envs.build import build_environments
from ftrl_jax.envs.samples import write_samples
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.text.qwen_tokenizer import build_qwen2_5_tokenizer
from tests.hf_reference import hf_logits, torch, transformers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A two-layer random model with Qwen2.5-7B's structure (q/k/v biases, untied head) and Qwen's tokenizer."""
    directory = tmp_path_factory.mktemp("qwen-random")
    tokenizer = build_qwen2_5_tokenizer(cache_dir=tmp_path_factory.mktemp("tokenizer-cache"))
    config = models.preset("qwen2.5-7b", num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4,
                           num_kv_heads=2, head_dim=16, vocab_size=len(tokenizer), max_position_embeddings=4096,
                           param_dtype="bfloat16", dtype="bfloat16")
    models.save_pretrained(config, models.init_params(config, jax.random.PRNGKey(0)), directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    with Sandbox(num_workers=1, timeout=5.0) as sandbox:
        envs, _ = build_environments(4, seed=7, kinds=["single_hop"], complexity="low", sandbox=sandbox)
    path = str(tmp_path_factory.mktemp("data") / "train.jsonl")
    write_samples(path, [env.to_sample("train") for env in envs])
    return path


def run_train(checkpoint, train_file, workdir, *extra):
    command = [sys.executable, "-m", "experiments.train", "--config=configs/qwen.py:qwen2.5-7b",
               f"--config.model.path={checkpoint}", f"--config.workdir={workdir}",
               f"--config.envs.train_file={train_file}", "--config.envs.num_eval=2",
               "--config.envs.scenarios=single_hop", "--config.envs.complexity=low",
               "--config.rl.prompts_per_step=2", "--config.rl.num_rollouts=2", "--config.rl.refresh_every=1",
               "--config.rl.num_minibatches=1", "--config.rl.num_microbatches=1",
               "--config.rollout.max_new_tokens=12", "--config.rollout.max_turns=2",
               "--config.rollout.max_prompt_tokens=2048", "--config.eval.max_new_tokens=8",
               "--config.eval.max_turns=1", "--config.checkpoint.every=1",
               # The sampled, training-subset and curve evaluations are tested on the tiny job; here they would
               # only add compilations of the same path.
               "--config.eval.num_samples=0", "--config.eval.num_train_envs=0", "--config.eval.curve_every=0", *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def test_paper_preset_checkpoints_resumes_and_exports(checkpoint, train_file, tmp_path):
    workdir = tmp_path / "run"
    run_train(checkpoint, train_file, workdir, "--config.rl.num_steps=1")
    rl_dir = workdir / "checkpoints" / "rl"
    first = sorted(os.listdir(rl_dir)) if rl_dir.is_dir() else []
    assert first, f"no RL checkpoint under {rl_dir}: {sorted(os.listdir(workdir))}"

    proc = run_train(checkpoint, train_file, workdir, "--config.rl.num_steps=2", "--config.resume=True")
    assert "RL resumes at step 1" in proc.stdout + proc.stderr
    metrics = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    rl_steps = sorted({m["step"] for m in metrics if m.get("phase") == "rl"})
    assert rl_steps == [1, 2], rl_steps  # the resumed run did step 2 only, after the first run's step 1

    summary = json.loads((workdir / "summary.json").read_text())
    assert {"eval_before", "eval_after"} <= set(summary)
    # The user's train file was read, not overwritten by built environments.
    assert len(open(train_file).read().splitlines()) == 4

    export = str(workdir / "export")
    config, params = models.load_pretrained(export, dtype="float32")
    assert config.model_type == "qwen2" and config.vocab_size == 151665
    ids = np.array([[151644, 8948, 198, 9707, 1879, 0, 151645]], np.int32)
    ours = np.asarray(models.forward(config, params, ids, np.ones_like(ids)))
    reference = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    theirs = hf_logits(reference, ids)
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)
