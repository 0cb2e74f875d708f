"""Decoder-only transformers (Qwen2/Qwen2.5, Qwen3, Llama 3.x) as pure functions over parameter trees."""

from ftrl_jax.models.attention import AttentionMask, dot_product_attention
from ftrl_jax.models.checkpoint_io import load_pretrained, save_pretrained
from ftrl_jax.models.config import (PRESETS, SUPPORTED_MODEL_TYPES, ModelConfig, config_from_hf, config_to_hf,
                                    load_hf_config, preset)
from ftrl_jax.models.gguf import load_gguf_config, load_gguf_tokenizer
from ftrl_jax.models.transformer import (KVCache, attention_probabilities, decode_step, forward, hidden_states,
                                         init_cache, init_params, logits_from_hidden, output_head, prefill,
                                         shared_prompt_hidden_states, split_layers)

__all__ = [
    "PRESETS", "SUPPORTED_MODEL_TYPES", "ModelConfig", "config_from_hf", "config_to_hf", "load_hf_config", "preset",
    "load_pretrained", "save_pretrained", "load_gguf_config", "load_gguf_tokenizer", "KVCache",
    "attention_probabilities", "decode_step", "forward", "hidden_states", "init_cache", "init_params",
    "logits_from_hidden", "output_head", "prefill", "shared_prompt_hidden_states", "split_layers", "AttentionMask",
    "dot_product_attention",
]
