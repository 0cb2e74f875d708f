"""Hugging Face checkpoint interop: read and write `config.json` + safetensors directories.

Tensors are memory-mapped and converted one at a time, so loading never holds a second full copy
of the model. The name mapping is one table: our parameter path <-> HF tensor name, and whether the
2-D weight is transposed (HF Linear stores [out, in]; Flax Dense stores [in, out]).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ftrl_jax.models.config import ModelConfig, config_to_hf, dtype_from_name, load_hf_config
from ftrl_jax.models.transformer import Params, init_params

# (our path, HF name; `{i}` marks per-layer tensors stacked on axis 0, transpose?)
WEIGHT_TABLE: tuple[tuple[str, str, bool], ...] = (
    ("embed_tokens/embedding", "model.embed_tokens.weight", False),
    ("layers/input_layernorm/scale", "model.layers.{i}.input_layernorm.weight", False),
    ("layers/post_attention_layernorm/scale", "model.layers.{i}.post_attention_layernorm.weight", False),
    ("layers/self_attn/q_proj/kernel", "model.layers.{i}.self_attn.q_proj.weight", True),
    ("layers/self_attn/k_proj/kernel", "model.layers.{i}.self_attn.k_proj.weight", True),
    ("layers/self_attn/v_proj/kernel", "model.layers.{i}.self_attn.v_proj.weight", True),
    ("layers/self_attn/o_proj/kernel", "model.layers.{i}.self_attn.o_proj.weight", True),
    ("layers/self_attn/q_proj/bias", "model.layers.{i}.self_attn.q_proj.bias", False),
    ("layers/self_attn/k_proj/bias", "model.layers.{i}.self_attn.k_proj.bias", False),
    ("layers/self_attn/v_proj/bias", "model.layers.{i}.self_attn.v_proj.bias", False),
    ("layers/self_attn/q_norm/scale", "model.layers.{i}.self_attn.q_norm.weight", False),
    ("layers/self_attn/k_norm/scale", "model.layers.{i}.self_attn.k_norm.weight", False),
    ("layers/mlp/gate_proj/kernel", "model.layers.{i}.mlp.gate_proj.weight", True),
    ("layers/mlp/up_proj/kernel", "model.layers.{i}.mlp.up_proj.weight", True),
    ("layers/mlp/down_proj/kernel", "model.layers.{i}.mlp.down_proj.weight", True),
    ("layers/mlp/gate_proj/bias", "model.layers.{i}.mlp.gate_proj.bias", False),
    ("layers/mlp/up_proj/bias", "model.layers.{i}.mlp.up_proj.bias", False),
    ("layers/mlp/down_proj/bias", "model.layers.{i}.mlp.down_proj.bias", False),
    ("norm/scale", "model.norm.weight", False),
    ("lm_head/kernel", "lm_head.weight", True),
)

# Checkpoint tensors that carry nothing a model needs: cached RoPE frequencies, and a tied output head's copy.
_IGNORED_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$|^lm_head\.weight$")

_ST_DTYPES = {
    "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# ---------------------------------------------------------------------------- parameter paths

def flatten_params(params: Params, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': x}} -> {'a/b': x}."""
    flat = {}
    for key, value in params.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict) or hasattr(value, "items"):
            flat.update(flatten_params(dict(value), path))
        else:
            flat[path] = value
    return flat


def unflatten_params(flat: dict[str, Any]) -> Params:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def abstract_params(config: ModelConfig) -> Params:
    """Parameter shapes/dtypes without allocating anything."""
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))


def hf_tensor_names(config: ModelConfig) -> Iterator[tuple[str, str, int | None, bool]]:
    """Yields (our path, HF name, layer index or None, transpose?) for every tensor the config has."""
    present = flatten_params(abstract_params(config))
    for path, hf_name, transpose in WEIGHT_TABLE:
        if path not in present:
            continue
        if "{i}" in hf_name:
            for i in range(config.num_layers):
                yield path, hf_name.format(i=i), i, transpose
        else:
            yield path, hf_name, None, transpose


# ---------------------------------------------------------------------------- safetensors

class SafetensorsFile:
    """A memory-mapped safetensors file: `get(name)` returns a numpy view without copying."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        (header_len,) = struct.unpack("<Q", self._mmap[:8])
        header = json.loads(self._mmap[8 : 8 + header_len])
        header.pop("__metadata__", None)
        self.entries = header
        self._data_start = 8 + header_len

    def keys(self):
        return self.entries.keys()

    def get(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name!r} in {self.path} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        buf = memoryview(self._mmap)[self._data_start + start : self._data_start + end]
        return np.frombuffer(buf, dtype=dtype).reshape(entry["shape"])


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes tensors in the safetensors layout (bfloat16 included); atomic via a temporary file."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, array in tensors.items():
        nbytes = array.nbytes
        header[name] = {"dtype": _ST_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # keep tensor data 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())
    os.replace(tmp, path)


def _open_checkpoint(path: str) -> dict[str, SafetensorsFile]:
    """HF tensor name -> the file that holds it, from the index or from every *.safetensors file."""
    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        with open(index_file) as f:
            weight_map = json.load(f)["weight_map"]
        files = {}
        for fname in sorted(set(weight_map.values())):
            full = os.path.join(path, fname)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{index_file} lists {fname!r} but {full!r} does not exist")
            files[fname] = SafetensorsFile(full)
        return {name: files[fname] for name, fname in weight_map.items()}
    names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(
            f"no *.safetensors files in checkpoint directory {path!r} (PyTorch .bin checkpoints are not read; "
            "convert them with transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    by_tensor = {}
    for fname in names:
        st = SafetensorsFile(os.path.join(path, fname))
        for key in st.keys():
            by_tensor[key] = st
    return by_tensor


# ---------------------------------------------------------------------------- load / save

def load_pretrained(path: str | os.PathLike, dtype: Any = "float32", *, compute_dtype: Any = None,
                    shardings: Callable[[str, tuple[int, ...]], Any] | None = None) -> tuple[ModelConfig, Params]:
    """Loads a local Hugging Face checkpoint directory, or a GGUF file, into (config, params).

    `dtype` is the parameter dtype; `compute_dtype` the matmul dtype (defaults to `dtype`). `shardings`,
    if given, maps (our path, shape) to a `jax.sharding.Sharding` and each tensor is placed straight there.
    A file path (`*.gguf`) is read by `ftrl_jax.models.gguf.load_gguf` (needs `pip install gguf`); its
    tokenizer comes from `models.load_gguf_tokenizer(path)`.
    """
    path = os.fspath(path)
    if os.path.isfile(path) or path.lower().endswith(".gguf"):
        from ftrl_jax.models.gguf import load_gguf  # imports this module: kept local

        return load_gguf(path, dtype, compute_dtype=compute_dtype, shardings=shardings)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    dtype_name = jnp.dtype(dtype_from_name(dtype)).name
    compute_name = jnp.dtype(dtype_from_name(compute_dtype)).name if compute_dtype is not None else dtype_name
    config = load_hf_config(path, param_dtype=dtype_name, dtype=compute_name)
    tensors = _open_checkpoint(path)
    used = {hf_name for _, hf_name, _, _ in hf_tensor_names(config)}
    unknown = sorted(name for name in tensors if name not in used and not _IGNORED_TENSORS.search(name))
    if unknown:
        raise ValueError(
            f"the checkpoint in {path!r} holds {len(unknown)} tensor(s) this {config.model_type} model has no place "
            f"for, e.g. {unknown[:3]}; loading would drop them silently and change the model's outputs (a Llama "
            "o_proj bias, for one, is not supported)")
    expected = flatten_params(abstract_params(config))
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name)

    slabs: dict[str, np.ndarray] = {}
    for our_path, hf_name, layer, transpose in hf_tensor_names(config):
        if hf_name not in tensors:
            raise KeyError(f"tensor {hf_name!r} is missing from the checkpoint in {path!r}")
        array = tensors[hf_name].get(hf_name)
        if transpose:
            array = array.T
        want = expected[our_path].shape[1:] if layer is not None else expected[our_path].shape
        if tuple(array.shape) != tuple(want):
            raise ValueError(
                f"tensor {hf_name!r} in {path!r} has shape {tuple(array.shape)[::-1] if transpose else tuple(array.shape)}, "
                f"expected {tuple(want)[::-1] if transpose else tuple(want)} for this config.json"
            )
        if layer is None:
            slabs[our_path] = array.astype(np_dtype)
        else:
            slab = slabs.get(our_path)
            if slab is None:
                slab = slabs[our_path] = np.empty(expected[our_path].shape, np_dtype)
            slab[layer] = array
    params = {}
    for our_path, array in slabs.items():
        sharding = shardings(our_path, array.shape) if shardings else None
        params[our_path] = jax.device_put(array, sharding) if sharding is not None else jnp.asarray(array)
        slabs[our_path] = None  # release the host copy as soon as it is on device
    return config, unflatten_params(params)


def save_pretrained(config: ModelConfig, params: Params, path: str | os.PathLike, *,
                    max_shard_bytes: int = 4 << 30, dtype: Any = None) -> None:
    """Writes `config.json` and safetensors (sharded with an index when large) that transformers loads."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    out_dtype = dtype_from_name(dtype or config.param_dtype)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if jnp.dtype(out_dtype) == jnp.bfloat16 else np.dtype(jnp.dtype(out_dtype).name)
    flat = flatten_params(params)

    # Shards are written as soon as they fill, so at most one shard sits on the host.
    written: list[tuple[str, list[str]]] = []
    shard: dict[str, np.ndarray] = {}
    shard_bytes = total = 0
    host_cache: dict[str, np.ndarray] = {}

    def flush():
        tmp_name = f"shard-{len(written):05d}.partial"
        write_safetensors(os.path.join(path, tmp_name), shard)
        written.append((tmp_name, list(shard)))
        shard.clear()

    for our_path, hf_name, layer, transpose in hf_tensor_names(config):
        if our_path not in host_cache:
            host_cache.clear()  # one stacked parameter on host at a time
            host_cache[our_path] = np.asarray(jax.device_get(flat[our_path])).astype(np_dtype)
        array = host_cache[our_path][layer] if layer is not None else host_cache[our_path]
        array = np.ascontiguousarray(array.T if transpose else array)
        if shard and shard_bytes + array.nbytes > max_shard_bytes:
            flush()
            shard_bytes = 0
        shard[hf_name] = array
        shard_bytes += array.nbytes
        total += array.nbytes
    flush()

    if len(written) == 1:
        os.replace(os.path.join(path, written[0][0]), os.path.join(path, "model.safetensors"))
    else:
        weight_map = {}
        for k, (tmp_name, names) in enumerate(written):
            fname = f"model-{k + 1:05d}-of-{len(written):05d}.safetensors"
            os.replace(os.path.join(path, tmp_name), os.path.join(path, fname))
            weight_map.update({name: fname for name in names})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf = config_to_hf(config)
    hf["dtype"] = jnp.dtype(out_dtype).name
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
