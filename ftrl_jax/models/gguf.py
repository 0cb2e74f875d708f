"""GGUF interop: read a llama.cpp GGUF file into (config, params), and its tokenizer through transformers.

`models.load_pretrained(path)` dispatches here when `path` is a file (`load_gguf`). What is read, and from where:

- The file layout (header, metadata key/values, tensor infos, aligned tensor data) is parsed by the `gguf` PyPI
  package (`gguf.GGUFReader`, memory-mapped: tensors are read one at a time). Format: ggml's `docs/gguf.md`.
- Tensors are dequantized by `gguf.quants.dequantize` to float32, then cast to the requested parameter dtype.
  Tested types (`TESTED_TYPES`): F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K; every other type the
  installed `gguf` can dequantize (Q5_K, Q2_K, Q3_K, IQ*, ...) goes through the same call. Block layouts
  (ggml `ggml-common.h`, QK = 32 elements per block, QK_K = 256 per super-block):
    Q8_0 (34 B): f16 d, int8 q[32];                  x = d * q
    Q4_0 (18 B): f16 d, u8 qs[16];                   x[j] = d * ((qs[j] & 15) - 8), x[j+16] = d * ((qs[j] >> 4) - 8)
    Q4_1 (20 B): f16 d, f16 m, u8 qs[16];            x[j] = d * (qs[j] & 15) + m,  x[j+16] = d * (qs[j] >> 4) + m
    Q4_K (144 B): f16 d, f16 dmin, u8 scales[12] (8 packed 6-bit scale/min pairs), u8 qs[128];
                  sub-block b of 32: x = d * sc[b] * q - dmin * mn[b], q 4-bit
    Q6_K (210 B): u8 ql[128] (low 4 bits), u8 qh[64] (high 2 bits), int8 scales[16], f16 d;
                  sub-block b of 16: x = d * scales[b] * (q - 32), q 6-bit
- A GGUF tensor's dims `ne` list the fastest-varying axis first; the numpy array is `ne` reversed, so a linear
  weight reads as [out, in] exactly like a PyTorch `nn.Linear.weight`, and is transposed to our [in, out] kernels.
- Architecture and hyperparameters come from the `general.architecture` and `{arch}.*` metadata (llama, qwen2,
  qwen3: `models.SUPPORTED_MODEL_TYPES`), turned into a Hugging Face style dict and passed through
  `config_from_hf`, so family defaults (Qwen2 q/k/v biases, Qwen3 q/k norms) are the same as for HF checkpoints.
  Tied embeddings = no `output.weight` tensor; attention / MLP biases = presence of `blk.0.attn_q.bias` /
  `blk.0.ffn_gate.bias`; `head_dim` = `{arch}.attention.key_length`, else hidden size / heads; `vocab_size` =
  rows of `token_embd.weight`.
- RoPE: theta = `{arch}.rope.freq_base`. llama.cpp stores Llama 3.1-style scaling not as metadata but as the
  `rope_freqs.weight` tensor ([head_dim / 2] float32 divisors of the inverse frequencies, llama.cpp
  `convert_hf_to_gguf.py`); the llama3 parameters (factor, low/high frequency factors, original context) are
  recovered from it and checked to reproduce it. `{arch}.rope.scaling.type` linear / yarn / longrope is
  unsupported (as in `config_from_hf`) and raises.
- llama.cpp's converter permutes the rows of the q and k projections of `llama` models (per head, from the Hugging
  Face half-split rotary layout to ggml's interleaved pairs); `_unpermute_rows` inverts that. Qwen2/Qwen3 use the
  half-split ("NEOX") layout in llama.cpp and are stored unpermuted.
- Special tokens: bos = `tokenizer.ggml.bos_token_id`; eos = `tokenizer.ggml.eos_token_id` plus the eot / eom ids
  when present and different (llama.cpp stops on all of them); pad = `tokenizer.ggml.padding_token_id`.
- The tokenizer is built by transformers from the GGUF metadata (`load_gguf_tokenizer`), not here.

`gguf` is imported lazily: the rest of the package works without it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ftrl_jax.models.checkpoint_io import abstract_params, flatten_params, unflatten_params
from ftrl_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, config_from_hf, dtype_from_name
from ftrl_jax.models.transformer import Params

GGUF_MAGIC = b"GGUF"

# Quantization types covered by tests/models/test_gguf.py.
TESTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K")

# (our path, GGUF tensor name; `{i}` marks per-layer tensors stacked on axis 0, transpose?)
GGUF_WEIGHT_TABLE: tuple[tuple[str, str, bool], ...] = (
    ("embed_tokens/embedding", "token_embd.weight", False),
    ("layers/input_layernorm/scale", "blk.{i}.attn_norm.weight", False),
    ("layers/post_attention_layernorm/scale", "blk.{i}.ffn_norm.weight", False),
    ("layers/self_attn/q_proj/kernel", "blk.{i}.attn_q.weight", True),
    ("layers/self_attn/k_proj/kernel", "blk.{i}.attn_k.weight", True),
    ("layers/self_attn/v_proj/kernel", "blk.{i}.attn_v.weight", True),
    ("layers/self_attn/o_proj/kernel", "blk.{i}.attn_output.weight", True),
    ("layers/self_attn/q_proj/bias", "blk.{i}.attn_q.bias", False),
    ("layers/self_attn/k_proj/bias", "blk.{i}.attn_k.bias", False),
    ("layers/self_attn/v_proj/bias", "blk.{i}.attn_v.bias", False),
    ("layers/self_attn/q_norm/scale", "blk.{i}.attn_q_norm.weight", False),
    ("layers/self_attn/k_norm/scale", "blk.{i}.attn_k_norm.weight", False),
    ("layers/mlp/gate_proj/kernel", "blk.{i}.ffn_gate.weight", True),
    ("layers/mlp/up_proj/kernel", "blk.{i}.ffn_up.weight", True),
    ("layers/mlp/down_proj/kernel", "blk.{i}.ffn_down.weight", True),
    ("layers/mlp/gate_proj/bias", "blk.{i}.ffn_gate.bias", False),
    ("layers/mlp/up_proj/bias", "blk.{i}.ffn_up.bias", False),
    ("layers/mlp/down_proj/bias", "blk.{i}.ffn_down.bias", False),
    ("norm/scale", "output_norm.weight", False),
    ("lm_head/kernel", "output.weight", True),
)

# Tensors a supported GGUF may carry that are not parameters (read into the config instead).
_CONFIG_TENSORS = ("rope_freqs.weight",)

# Llama 3.x RoPE scaling as released (Llama 3.1 / 3.2 / 3.3): tried first when reading `rope_freqs.weight`.
_LLAMA3_CANONICAL = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _gguf():
    """The `gguf` PyPI package, imported on first use."""
    try:
        return importlib.import_module("gguf")
    except ImportError as e:
        raise ImportError(
            "reading GGUF files needs the `gguf` package (llama.cpp's gguf-py): pip install gguf"
        ) from e


def is_gguf_file(path: str | os.PathLike) -> bool:
    """True if `path` is a file that starts with the GGUF magic bytes."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def open_gguf(path: str | os.PathLike):
    """A `gguf.GGUFReader` over the file (memory-mapped), with clear errors for a missing or non-GGUF path."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    if not is_gguf_file(path):
        raise ValueError(f"{path!r} is not a GGUF file (it does not start with the magic bytes {GGUF_MAGIC!r})")
    return _gguf().GGUFReader(path)


# ---------------------------------------------------------------------------- metadata

def _tidy_float(value: float, value_type) -> float:
    """GGUF FLOAT32 metadata as the shortest decimal that round-trips in float32 (9.9999997e-06 -> 1e-05)."""
    if value_type == _gguf().GGUFValueType.FLOAT32:
        return float(str(np.float32(value)))
    return float(value)


def metadata_value(reader, key: str, default: Any = None) -> Any:
    """One metadata value: int / float / bool / str, or a list for arrays; `default` if the key is absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    gguf = _gguf()
    if field.types and field.types[0] in (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64):
        value = _tidy_float(value, field.types[0])
    return value


def _required(reader, key: str) -> Any:
    value = metadata_value(reader, key)
    if value is None:
        raise KeyError(f"GGUF metadata key {key!r} is missing")
    return value


def _uniform(value: Any, key: str) -> int:
    """A per-layer array metadata value (some converters write one per layer) that must be one number here."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"GGUF metadata {key!r} differs between layers ({value}); not supported")
        value = value[0]
    return int(value)


def _llama3_factors(theta: float, head_dim: int, factor: float, low: float, high: float, orig: float) -> np.ndarray:
    """The [head_dim / 2] divisors Llama 3 scaling applies to the RoPE inverse frequencies (what rope_freqs holds)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - low) / (high - low)
    ramp = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, ramp))


def _snap(x: float) -> float:
    """x rounded to 6 significant digits when that moves it by under 1e-6 relative (fit noise: 3.9999999 -> 4.0)."""
    x = float(x)
    nice = float(f"{x:.6g}")
    return nice if abs(nice - x) <= 1e-6 * abs(x) else x


def llama3_scaling_from_rope_freqs(rope_freqs: np.ndarray, theta: float, head_dim: int) -> dict[str, Any] | None:
    """Llama 3 `rope_parameters` reproducing llama.cpp's `rope_freqs.weight`; None when it is all ones.

    `rope_freqs`: float32 [head_dim / 2]. The ramp depends only on original_context / low_freq_factor and
    original_context / high_freq_factor, so the released values (low 1, high 4, original context 8192) are tried
    first; otherwise low_freq_factor = 1 is fixed and the rest solved from the ramp, scaled so the original
    context is an integer. Raises ValueError when no Llama 3 scaling reproduces the tensor.
    """
    f = np.asarray(rope_freqs, np.float64).reshape(-1)
    if f.shape != (head_dim // 2,):
        raise ValueError(f"rope_freqs.weight has {f.size} values, expected head_dim / 2 = {head_dim // 2}")
    if np.allclose(f, 1.0, rtol=0, atol=1e-6):
        return None
    factor = float(str(np.float32(f.max())))
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)

    candidates = [dict(_LLAMA3_CANONICAL)]
    tol = 1e-5 * factor
    ramp = (f > 1 + tol) & (f < factor - tol)
    if ramp.any() and factor > 1:
        # smooth = (orig / wavelen - low) / (high - low), and 1 / f = (1 - smooth) / factor + smooth.
        smooth = (1 / f[ramp] - 1 / factor) / (1 - 1 / factor)
        if ramp.sum() >= 2:
            slope, intercept = np.polyfit(1 / wavelen[ramp], smooth, 1)  # smooth = slope / wavelen + intercept
            high = 1 - 1 / intercept if intercept < 0 else None  # intercept = -1 / (high - 1) with low = 1
            orig = slope * (high - 1) if high is not None else None
        else:
            high = 4.0
            orig = wavelen[ramp][0] * (smooth[0] * (high - 1) + 1)
        if orig is not None and orig > 0:
            candidates.append({"low_freq_factor": 1.0, "high_freq_factor": high,
                               "original_max_position_embeddings": orig})
    else:
        # No point on the ramp: any thresholds between the last unscaled and the first scaled wavelength work.
        unscaled, scaled = wavelen[f <= 1 + tol], wavelen[f >= factor - tol]
        if len(scaled):
            hi_w = scaled.min()
            lo_w = unscaled.max() if len(unscaled) else hi_w / 8
            ratio = hi_w / lo_w
            candidates.append({"low_freq_factor": 1.0, "high_freq_factor": float(ratio ** 0.5),
                               "original_max_position_embeddings": float(lo_w * ratio ** 0.75)})
    for cand in candidates:
        low, high, orig = (_snap(cand[k]) for k in ("low_freq_factor", "high_freq_factor",
                                                    "original_max_position_embeddings"))
        if orig != round(orig) or orig < 1:  # rescale all three so the context length is an integer (same ramp)
            k = max(1, round(orig)) / orig
            low, high, orig = _snap(low * k), _snap(high * k), max(1, round(orig))
        cand = {"low_freq_factor": low, "high_freq_factor": high, "original_max_position_embeddings": int(orig)}
        if high <= low:
            continue
        got = _llama3_factors(theta, head_dim, factor, cand["low_freq_factor"], cand["high_freq_factor"],
                              cand["original_max_position_embeddings"])
        if np.allclose(got, f, rtol=1e-4, atol=1e-6):
            return {"rope_type": "llama3", "factor": factor, **cand}
    raise ValueError(
        f"rope_freqs.weight ({np.round(f, 4).tolist()}) is not a Llama 3 RoPE scaling of theta={theta}, "
        f"head_dim={head_dim}; other frequency scalings are not supported"
    )


def gguf_to_hf_config(reader) -> dict[str, Any]:
    """The Hugging Face `config.json` mapping equivalent to the GGUF metadata (see the module docstring)."""
    arch = _required(reader, "general.architecture")
    if arch not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise KeyError("tensor 'token_embd.weight' is missing from the GGUF file")
    hidden = int(_required(reader, f"{arch}.embedding_length"))
    num_heads = _uniform(_required(reader, f"{arch}.attention.head_count"), f"{arch}.attention.head_count")
    kv_key = f"{arch}.attention.head_count_kv"
    num_kv_heads = _uniform(metadata_value(reader, kv_key, num_heads), kv_key)
    head_dim = int(metadata_value(reader, f"{arch}.attention.key_length", 0) or hidden // num_heads)
    value_dim = metadata_value(reader, f"{arch}.attention.value_length")
    if value_dim is not None and int(value_dim) != head_dim:
        raise ValueError(f"GGUF key_length {head_dim} != value_length {value_dim}; not supported")
    rope_dim = metadata_value(reader, f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ValueError(f"partial rotary embeddings (rope.dimension_count {rope_dim} != head_dim {head_dim}) "
                         "are not supported")
    theta = float(metadata_value(reader, f"{arch}.rope.freq_base", 10000.0))

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    # `rope.scaling.type` (none / linear / yarn / longrope) + `.factor`; older files: `rope.scale_linear`.
    legacy_linear = metadata_value(reader, f"{arch}.rope.scale_linear")
    scaling_type = metadata_value(reader, f"{arch}.rope.scaling.type") or ("linear" if legacy_linear else "none")
    scaling_factor = float(metadata_value(reader, f"{arch}.rope.scaling.factor", legacy_linear or 1.0))
    if scaling_type != "none" and not (scaling_type == "linear" and scaling_factor == 1.0):
        raise ValueError(f"unsupported RoPE scaling {scaling_type!r} (factor {scaling_factor}) in GGUF metadata; "
                         "supported: none, and Llama 3 scaling (rope_freqs.weight)")
    if "rope_freqs.weight" in tensors:
        llama3 = llama3_scaling_from_rope_freqs(read_tensor(tensors["rope_freqs.weight"]), theta, head_dim)
        if llama3 is not None:
            rope.update(llama3)

    eos = [metadata_value(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eos = list(dict.fromkeys(int(e) for e in eos if e is not None))
    return {
        "model_type": arch,
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),  # ne = [hidden, vocab]
        "hidden_size": hidden,
        "intermediate_size": _uniform(_required(reader, f"{arch}.feed_forward_length"), f"{arch}.feed_forward_length"),
        "num_hidden_layers": int(_required(reader, f"{arch}.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "rope_parameters": rope,
        "rms_norm_eps": float(_required(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_gate.bias" in tensors,
        "max_position_embeddings": int(metadata_value(reader, f"{arch}.context_length", 32768)),
        "bos_token_id": metadata_value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
        "pad_token_id": metadata_value(reader, "tokenizer.ggml.padding_token_id"),
    }


def load_gguf_config(path: str | os.PathLike, *, param_dtype: str = "float32", dtype: str | None = None,
                     reader=None) -> ModelConfig:
    """The ModelConfig of a GGUF file, from its metadata (and `rope_freqs.weight`); reads no weights."""
    reader = reader if reader is not None else open_gguf(path)
    return config_from_hf(gguf_to_hf_config(reader), param_dtype=param_dtype, dtype=dtype)


# ---------------------------------------------------------------------------- tensors

def read_tensor(tensor) -> np.ndarray:
    """A `gguf.ReaderTensor` dequantized to float32, shape = its GGUF dims reversed ([out, in] for a weight)."""
    gguf = _gguf()
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ValueError(f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the installed "
                         f"gguf package ({importlib.metadata.version('gguf')}) cannot dequantize") from e
    return np.asarray(array, np.float32).reshape(shape)


def _unpermute_rows(array: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverts llama.cpp's q/k row permutation for `llama` GGUFs.

    `array`: [num_heads * head_dim, ...] (a weight [out, in] or a bias [out]). Per head, llama.cpp stored row
    2 * j + h (h in {0, 1}, j < head_dim / 2) from Hugging Face row h * head_dim / 2 + j; this puts it back.
    """
    rows = array.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"cannot un-permute {rows} rows into {num_heads} heads of even size")
    half = rows // num_heads // 2
    return array.reshape(num_heads, half, 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)


def gguf_tensor_names(config: ModelConfig) -> Iterator[tuple[str, str, int | None, bool]]:
    """Yields (our path, GGUF name, layer index or None, transpose?) for every tensor the config has."""
    present = flatten_params(abstract_params(config))
    for path, name, transpose in GGUF_WEIGHT_TABLE:
        if path not in present:
            continue
        if "{i}" in name:
            for i in range(config.num_layers):
                yield path, name.format(i=i), i, transpose
        else:
            yield path, name, None, transpose


def load_gguf(path: str | os.PathLike, dtype: Any = "float32", *, compute_dtype: Any = None,
              shardings: Callable[[str, tuple[int, ...]], Any] | None = None) -> tuple[ModelConfig, Params]:
    """Loads a GGUF file into (config, params), as `load_pretrained` does for a Hugging Face directory.

    Every tensor is dequantized to float32 (`read_tensor`), q/k rows of `llama` models are un-permuted, then it
    is cast to `dtype` (the parameter dtype; `compute_dtype` is the matmul dtype, default `dtype`) and stacked
    per layer. `shardings`, if given, maps (our path, shape) to a `jax.sharding.Sharding`. Raises KeyError for a
    missing tensor, ValueError for a shape mismatch or a tensor this loader does not know.
    """
    path = os.fspath(path)
    reader = open_gguf(path)
    dtype_name = jnp.dtype(dtype_from_name(dtype)).name
    compute_name = jnp.dtype(dtype_from_name(compute_dtype)).name if compute_dtype is not None else dtype_name
    config = load_gguf_config(path, param_dtype=dtype_name, dtype=compute_name, reader=reader)
    tensors = {t.name: t for t in reader.tensors}
    expected = flatten_params(abstract_params(config))
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name)
    heads_of = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}

    names = list(gguf_tensor_names(config))
    for _, name, _, _ in names:
        if name not in tensors:
            raise KeyError(f"tensor {name!r} is missing from the GGUF file {path!r}")
    unknown = sorted(set(tensors) - {name for _, name, _, _ in names} - set(_CONFIG_TENSORS))
    if unknown:
        raise ValueError(f"GGUF file {path!r} has tensors this {config.model_type} loader does not know: "
                         f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    params: dict[str, jax.Array] = {}
    slabs: dict[str, np.ndarray] = {}

    def to_device(our_path):
        # Names come parameter by parameter (all layers of one, then the next), so each stacked slab is complete
        # here: moving it now keeps one parameter, not the whole model, on the host at a time.
        array = slabs.pop(our_path)
        sharding = shardings(our_path, array.shape) if shardings else None
        params[our_path] = jax.device_put(array, sharding) if sharding is not None else jnp.asarray(array)

    for our_path, name, layer, transpose in names:
        for done in [p for p in slabs if p != our_path]:
            to_device(done)
        array = read_tensor(tensors[name])
        module = name.split(".")[-2]
        if config.model_type == "llama" and module in heads_of:
            array = _unpermute_rows(array, heads_of[module])
        if transpose:
            array = array.T
        want = expected[our_path].shape[1:] if layer is not None else expected[our_path].shape
        if tuple(array.shape) != tuple(want):
            shown = tuple(array.shape)[::-1] if transpose else tuple(array.shape)
            wanted = tuple(want)[::-1] if transpose else tuple(want)
            raise ValueError(f"tensor {name!r} in {path!r} has shape {shown}, expected {wanted} from its metadata")
        if layer is None:
            slabs[our_path] = array.astype(np_dtype, copy=False)
        else:
            slab = slabs.get(our_path)
            if slab is None:
                slab = slabs[our_path] = np.empty(expected[our_path].shape, np_dtype)
            slab[layer] = array
    for done in list(slabs):
        to_device(done)
    return config, unflatten_params(params)


def load_gguf_tokenizer(path: str | os.PathLike, **kwargs):
    """The transformers tokenizer built from a GGUF file's metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).

    `AutoTokenizer.from_pretrained(directory, gguf_file=name, **kwargs)`: a fast (`tokenizers`) tokenizer with
    the file's vocabulary, merges, special tokens and chat template. Save it next to `save_pretrained`'s output
    (`tokenizer.save_pretrained(dir)`) to make a complete Hugging Face directory.
    """
    path = os.path.abspath(os.fspath(path))
    if not is_gguf_file(path):
        open_gguf(path)  # raises the right error
    _gguf()  # transformers needs it too; fail with our message
    import transformers

    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                      **kwargs)
