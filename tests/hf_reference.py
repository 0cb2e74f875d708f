"""Tiny random Hugging Face models, built locally, as references for parity tests."""

from __future__ import annotations

import os

import numpy as np

torch = __import__("pytest").importorskip("torch")
transformers = __import__("pytest").importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# name -> (config class, kwargs): odd sizes on purpose (GQA groups of 3, head_dim != hidden/heads, ...).
REFERENCE_MODELS = {
    "qwen2_tied": ("Qwen2Config", dict(hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                                        num_attention_heads=6, num_key_value_heads=2, vocab_size=97,
                                        tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 1000.0})),
    "qwen2_untied": ("Qwen2Config", dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=4, vocab_size=131,
                                          tie_word_embeddings=False, rms_norm_eps=1e-5)),
    "qwen3_untied": ("Qwen3Config", dict(hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                                          num_attention_heads=3, num_key_value_heads=1, head_dim=24,
                                          vocab_size=89, tie_word_embeddings=False)),
    "qwen3_tied": ("Qwen3Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        vocab_size=101, tie_word_embeddings=True)),
    "llama3_untied": ("LlamaConfig", dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=113,
                                           max_position_embeddings=256, tie_word_embeddings=False,
                                           rope_parameters=LLAMA3_ROPE)),
    "llama_tied": ("LlamaConfig", dict(hidden_size=36, intermediate_size=60, num_hidden_layers=2,
                                        num_attention_heads=3, num_key_value_heads=3, vocab_size=79,
                                        tie_word_embeddings=True)),
}


def build_hf_model(name: str, seed: int = 0):
    """A transformers model with every weight (norms and biases too) random, in float32, eval mode."""
    cls_name, kwargs = REFERENCE_MODELS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model.eval()


def save_hf_model(name: str, path: str | os.PathLike, seed: int = 0, **save_kwargs):
    model = build_hf_model(name, seed)
    model.save_pretrained(path, **save_kwargs)
    return model


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    kwargs = {}
    if attention_mask is not None:
        mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        kwargs = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    with torch.no_grad():
        return model(ids, **kwargs).logits.float().numpy()
