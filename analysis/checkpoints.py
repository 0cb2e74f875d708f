"""Tensor-by-tensor read access to a checkpoint directory, for analyses that compare checkpoints.

An analysis asks a checkpoint for `iter_tensors()`: records of (HF tensor name, layer, module, array), in
the order of `ftrl_jax.models.checkpoint_io.hf_tensor_names(config)`, one tensor at a time. Arrays are
memory-mapped views in the checkpoint's own dtype and Hugging Face layout, so nothing is converted or
copied until the analysis asks for it; each tensor is mapped on its own and unmapped when dropped, so
reading a 14B checkpoint keeps about one tensor resident, as a 0.5B one does.

Backends are a table (`BACKENDS`): each has a detector and an opener. Only Hugging Face directories
(`config.json` + `*.safetensors`, optionally with `model.safetensors.index.json`) are read today; a
project orbax checkpoint backend can be added as a second entry yielding the same records.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterator, NamedTuple, Protocol

import numpy as np

from ftrl_jax.models import ModelConfig, load_hf_config
from ftrl_jax.models.checkpoint_io import WEIGHT_TABLE, SafetensorsFile, hf_tensor_names

OUTSIDE_LAYERS = -1  # the `layer` of embeddings, the output head and the final norm

# Our parameter path -> the module name analyses report. Biases are modules of their own so a change
# in a bias is never hidden inside (or mistaken for) a change of its weight matrix.
MODULE_NAMES: dict[str, str] = {
    "embed_tokens/embedding": "embed",
    "layers/input_layernorm/scale": "input_norm",
    "layers/post_attention_layernorm/scale": "post_attn_norm",
    "layers/self_attn/q_proj/kernel": "q_proj",
    "layers/self_attn/k_proj/kernel": "k_proj",
    "layers/self_attn/v_proj/kernel": "v_proj",
    "layers/self_attn/o_proj/kernel": "o_proj",
    "layers/self_attn/q_proj/bias": "q_bias",
    "layers/self_attn/k_proj/bias": "k_bias",
    "layers/self_attn/v_proj/bias": "v_bias",
    "layers/self_attn/q_norm/scale": "q_norm",
    "layers/self_attn/k_norm/scale": "k_norm",
    "layers/mlp/gate_proj/kernel": "gate_proj",
    "layers/mlp/up_proj/kernel": "up_proj",
    "layers/mlp/down_proj/kernel": "down_proj",
    "layers/mlp/gate_proj/bias": "gate_bias",
    "layers/mlp/up_proj/bias": "up_bias",
    "layers/mlp/down_proj/bias": "down_bias",
    "norm/scale": "final_norm",
    "lm_head/kernel": "lm_head",
}
_unnamed = [path for path, _, _ in WEIGHT_TABLE if path not in MODULE_NAMES]
if _unnamed:  # a new weight in the model's table must get a reported name here
    raise ImportError(f"analysis.checkpoints.MODULE_NAMES has no module name for parameter paths {_unnamed}")


class TensorRecord(NamedTuple):
    hf_name: str        # e.g. "model.layers.3.mlp.gate_proj.weight"
    layer: int          # decoder layer index, or OUTSIDE_LAYERS
    module: str         # a value of MODULE_NAMES, e.g. "gate_proj"
    array: np.ndarray   # as stored: checkpoint dtype, HF layout; may be a memory-mapped view


class TensorSource(Protocol):
    """What a checkpoint backend provides."""

    path: str
    config: ModelConfig

    def iter_tensors(self) -> Iterator[TensorRecord]:
        """Every tensor the config implies, one at a time, in `hf_tensor_names(config)` order."""
        ...

    def unmapped_names(self) -> list[str]:
        """Tensors stored in the checkpoint that `iter_tensors` does not yield (reported, not analysed)."""
        ...


# ---------------------------------------------------------------------------- Hugging Face directories

def tensor_files(path: str) -> dict[str, str]:
    """HF tensor name -> the safetensors file holding it, from the index file or from every *.safetensors."""
    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        with open(index_file) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_file} has no 'weight_map' object mapping tensor names to files")
        contents: dict[str, set[str]] = {}
        for fname in sorted(set(weight_map.values())):
            full = os.path.join(path, fname)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{index_file} lists {fname!r} but {full!r} does not exist")
            contents[fname] = set(SafetensorsFile(full).keys())
        for name, fname in weight_map.items():
            if name not in contents[fname]:
                raise KeyError(f"{index_file} places tensor {name!r} in {fname!r}, which does not contain it")
        return {name: os.path.join(path, fname) for name, fname in weight_map.items()}

    names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(
            f"no *.safetensors files in checkpoint directory {path!r} (PyTorch .bin checkpoints are not read; "
            "convert them with transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    by_tensor: dict[str, str] = {}
    for fname in names:
        full = os.path.join(path, fname)
        for key in SafetensorsFile(full).keys():
            if key in by_tensor:
                raise ValueError(
                    f"tensor {key!r} is stored in both {by_tensor[key]!r} and {full!r}; "
                    "add a model.safetensors.index.json saying which one is meant, or remove the stale file"
                )
            by_tensor[key] = full
    return by_tensor


class HFCheckpoint:
    """A Hugging Face checkpoint directory: `config.json` + safetensors, read tensor by tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"checkpoint directory {self.path!r} does not exist")
        self.config = load_hf_config(self.path)
        self._files = tensor_files(self.path)
        self._names = list(hf_tensor_names(self.config))

    def iter_tensors(self) -> Iterator[TensorRecord]:
        for our_path, hf_name, layer, _transpose in self._names:
            file = self._files.get(hf_name)
            if file is None:
                raise KeyError(
                    f"tensor {hf_name!r} is missing from checkpoint {self.path!r}, although its config.json "
                    f"implies it (model_type {self.config.model_type!r}); the checkpoint is incomplete"
                )
            # A mapping of its own per tensor: it is unmapped as soon as the consumer drops the array, so
            # resident memory stays near one tensor per checkpoint instead of growing to the whole files.
            yield TensorRecord(hf_name, OUTSIDE_LAYERS if layer is None else layer, MODULE_NAMES[our_path],
                               SafetensorsFile(file).get(hf_name))

    def unmapped_names(self) -> list[str]:
        expected = {hf_name for _, hf_name, _, _ in self._names}
        return sorted(name for name in self._files if name not in expected)


def is_hf_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


# Backend name -> (does this directory look like one?, open it). Tried in order.
BACKENDS: dict[str, tuple[Callable[[str], bool], Callable[[str], TensorSource]]] = {
    "huggingface": (is_hf_directory, HFCheckpoint),
}


def open_checkpoint(path: str | os.PathLike) -> TensorSource:
    """Opens a checkpoint directory with the first backend that recognises it."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    for detect, open_source in BACKENDS.values():
        if detect(path):
            return open_source(path)
    raise ValueError(
        f"{path!r} is not a checkpoint directory this analysis reads: expected a Hugging Face directory "
        f"(config.json + *.safetensors); readers: {', '.join(BACKENDS)}. Project orbax checkpoints are not read "
        "yet: export one with ftrl_jax.models.save_pretrained first"
    )


def iter_tensors(path: str | os.PathLike) -> Iterator[TensorRecord]:
    """(hf_name, layer, module, array) for every tensor of the checkpoint in `path`, streamed one at a time."""
    return open_checkpoint(path).iter_tensors()
