"""Model configuration: one frozen dataclass for Qwen2/Qwen2.5, Qwen3 and Llama 3.x decoders.

The config is hashable so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp

from ftrl_jax.models.attention import DEFAULT_BLOCK_SIZE, IMPLEMENTATIONS

# What distinguishes the supported families, keyed by Hugging Face `model_type`.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": {"attention_bias": True, "qk_norm": False, "architecture": "Qwen2ForCausalLM"},
    "qwen3": {"attention_bias": False, "qk_norm": True, "architecture": "Qwen3ForCausalLM"},
    "llama": {"attention_bias": False, "qk_norm": False, "architecture": "LlamaForCausalLM"},
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_FAMILY_DEFAULTS))

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str | Any) -> Any:
    """'bfloat16' -> jnp.bfloat16; a dtype passes through."""
    if not isinstance(name, str):
        return jnp.dtype(name).type
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # Extra RoPE parameters as sorted (key, value) pairs, e.g. llama3 scaling; () means plain RoPE.
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 32768
    # Parameters are stored in `param_dtype`; matmuls run in `dtype`. Norms and softmax use float32.
    param_dtype: str = "float32"
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # How attention is computed (`attention.IMPLEMENTATIONS`): "auto" = cuDNN on GPU where the mask allows,
    # else "blockwise" (memory linear in length; dense math when one block covers the sequence); "dense".
    # Block size (queries and keys) of the blockwise form. Not part of the checkpoint's config.json.
    attention_impl: str = "auto"
    attention_block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self):
        if self.model_type not in _FAMILY_DEFAULTS:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        dtype_from_name(self.param_dtype)
        dtype_from_name(self.dtype)
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; expected one of {IMPLEMENTATIONS}")
        if self.attention_block_size < 1:
            raise ValueError(f"attention_block_size must be >= 1, got {self.attention_block_size}")

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    @property
    def num_params(self) -> int:
        """Parameter count, computed from shapes."""
        d, f, h, kv, hd = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        if self.attention_bias:
            attn += h * hd + 2 * kv * hd
        if self.qk_norm:
            attn += 2 * hd
        mlp = 3 * d * f
        layer = attn + mlp + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + d

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...]]:
    """Reads RoPE settings from transformers 5 (`rope_parameters`) or 4 (`rope_theta` + `rope_scaling`) configs."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = {**legacy, **params}
    scaling.pop("rope_theta", None)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    scaling.pop("type", None)
    if rope_type in (None, "default"):
        return theta, ()
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope_type {rope_type!r} in config; supported: 'default', 'llama3'")
    scaling["rope_type"] = rope_type
    return theta, tuple(sorted((k, v) for k, v in scaling.items()))


def config_from_hf(hf: Mapping[str, Any], *, param_dtype: str = "float32", dtype: str | None = None) -> ModelConfig:
    """Builds a ModelConfig from a Hugging Face `config.json` mapping (transformers 4 or 5 layout)."""
    model_type = hf.get("model_type")
    if model_type not in _FAMILY_DEFAULTS:
        raise ValueError(
            f"unsupported model_type {model_type!r} in config.json; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    family = _FAMILY_DEFAULTS[model_type]
    num_heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or int(hf["hidden_size"]) // num_heads
    theta, scaling = _rope_from_hf(hf)
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        eos = tuple(eos)
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", family["attention_bias"])),
        qk_norm=family["qk_norm"],
        mlp_bias=bool(hf.get("mlp_bias", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        param_dtype=param_dtype,
        dtype=dtype or param_dtype,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=hf.get("pad_token_id"),
    )


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The `config.json` that transformers 5 and transformers 4 both read back into the same architecture.

    transformers 5 reads RoPE from `rope_parameters` and the dtype from `dtype`; 4.x (the line older vLLM
    and sglang releases bundle) reads `rope_theta`, `rope_scaling` (None for plain RoPE) and `torch_dtype`,
    and ignores the new keys, so both spellings are written.
    """
    rope = {"rope_theta": config.rope_theta, "rope_type": "default"}
    rope.update(config.rope_scaling_dict)
    legacy_scaling = dict(config.rope_scaling_dict) or None
    hf: dict[str, Any] = {
        "architectures": [_FAMILY_DEFAULTS[config.model_type]["architecture"]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope,
        "rope_theta": config.rope_theta,
        "rope_scaling": legacy_scaling,
        "tie_word_embeddings": config.tie_word_embeddings,
        "dtype": config.param_dtype,
        "torch_dtype": config.param_dtype,
        "use_cache": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
    if config.model_type != "qwen2":  # Qwen2 always has q/k/v biases and has no such key.
        hf["attention_bias"] = config.attention_bias
    if config.model_type == "llama":
        hf["mlp_bias"] = config.mlp_bias
    return hf


def load_hf_config(path: str | os.PathLike, **kwargs) -> ModelConfig:
    """Reads `config.json` from a checkpoint directory."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json in checkpoint directory {os.fspath(path)!r}")
    with open(file) as f:
        return config_from_hf(json.load(f), **kwargs)


def _qwen25(hidden, inter, layers, heads, kv, tied, vocab=151936) -> dict[str, Any]:
    return dict(model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads,
                rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied, attention_bias=True,
                max_position_embeddings=32768, eos_token_id=151645, pad_token_id=151643)


def _qwen3(hidden, inter, layers, heads, kv, tied) -> dict[str, Any]:
    return dict(model_type="qwen3", vocab_size=151936, hidden_size=hidden, intermediate_size=inter,
                num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=128, rope_theta=1_000_000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=tied, qk_norm=True, max_position_embeddings=40960,
                eos_token_id=151645, pad_token_id=151643)


# Real shapes of the released checkpoints, plus `tiny` (the embedded default for CPU runs).
PRESETS: dict[str, dict[str, Any]] = {
    # Sized for CPU: RL on it (sampling + updates) must fit a 15-minute run on 2 cores.
    "tiny": dict(model_type="qwen2", vocab_size=2048, hidden_size=256, intermediate_size=640, num_layers=4,
                 num_heads=4, num_kv_heads=1, head_dim=64, rope_theta=10000.0, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, attention_bias=True, max_position_embeddings=4096),
    # SmolLM2-135M shape: the mid-size benchmark model.
    "smol-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192),
    "qwen2.5-0.5b": _qwen25(896, 4864, 24, 14, 2, True),
    "qwen2.5-1.5b": _qwen25(1536, 8960, 28, 12, 2, True),
    "qwen2.5-3b": _qwen25(2048, 11008, 36, 16, 2, True),
    "qwen2.5-7b": _qwen25(3584, 18944, 28, 28, 4, False, vocab=152064),
    "qwen2.5-14b": _qwen25(5120, 13824, 48, 40, 8, False, vocab=152064),
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, 8, True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, 8, True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, 8, True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, 8, False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, 8, False),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named architecture preset; keyword overrides replace fields (e.g. vocab_size, dtype)."""
    try:
        fields = dict(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}") from None
    fields.update(overrides)
    return ModelConfig(**fields)
