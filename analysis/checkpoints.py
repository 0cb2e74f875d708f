"""Tensor-by-tensor read access to a checkpoint directory, for analyses that compare checkpoints.

An analysis asks a checkpoint for `iter_tensors()`: records of (HF tensor name, layer, module, array), in
the order of `ftrl_jax.models.checkpoint_io.hf_tensor_names(config)`, one tensor at a time. Arrays are
views in the checkpoint's own dtype and Hugging Face layout, so nothing is converted until the analysis
asks for it; reading a 14B checkpoint keeps about one tensor (HF) or one layer-stacked parameter (orbax)
resident. `load_params()` instead gives the whole parameter tree (flat paths, layer axis first) in the
checkpoint's dtype, for analyses that run the model.

Backends are a table (`BACKENDS`), tried in order, each a detector and an opener:

- `orbax`: the main job's own checkpoints (`ftrl_jax.training.checkpointing`): an RL or warm-up step directory
  `W/checkpoints/rl/<step>`, a checkpoint root `W/checkpoints/rl` (its newest complete step), or a run's
  workdir `W` (the newest complete RL step). Only the `params` of the saved `TrainState` are read (orbax
  partial restore, optimizer moments untouched). The architecture comes from the run's
  `W/export/config.json`, else `W/warmstart/config.json` (the orbax files hold shapes, not e.g. rope_theta).
- `huggingface`: `config.json` + `*.safetensors`, optionally with `model.safetensors.index.json`; the
  run's `W/warmstart` (before RL) and `W/export` (after RL) are such directories.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator, NamedTuple, Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ftrl_jax import policies
from ftrl_jax.training.checkpointing import COMMIT_MARKER, STATE_ITEM, complete_steps
from ftrl_jax.models import ModelConfig, config_from_hf, load_hf_config
from ftrl_jax.models.checkpoint_io import (WEIGHT_TABLE, SafetensorsFile, abstract_params, flatten_params,
                                           hf_tensor_names, unflatten_params)

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

    def load_params(self) -> dict[str, np.ndarray]:
        """The whole parameter tree as {our flat path: array}, layer axis first, in the checkpoint's dtype."""
        ...


def stack_records(config: ModelConfig, records: Iterator[TensorRecord]) -> dict[str, np.ndarray]:
    """{our flat path: array} from HF-layout records (in `hf_tensor_names(config)` order): per-layer
    tensors stacked on a leading layer axis and HF [out, in] matrices transposed back. Each array is
    copied once, in its stored dtype, so the tree takes the checkpoint's size in memory."""
    flat: dict[str, np.ndarray] = {}
    for (our_path, hf_name, layer, transpose), record in zip(hf_tensor_names(config), records, strict=True):
        if record.hf_name != hf_name:
            raise ValueError(f"checkpoint reader yielded {record.hf_name!r} where {hf_name!r} was expected; "
                             "readers must follow hf_tensor_names(config)")
        array = record.array.T if transpose else record.array
        if layer is None:
            flat[our_path] = np.array(array)
            continue
        if our_path not in flat:
            flat[our_path] = np.empty((config.num_layers, *array.shape), array.dtype)
        flat[our_path][layer] = array
    return flat


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

    def load_params(self) -> dict[str, np.ndarray]:
        return stack_records(self.config, self.iter_tensors())


def is_hf_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


# ---------------------------------------------------------------------------- project orbax checkpoints

RUN_CONFIG_DIRS = ("export", "warmstart")  # a run's HF directories whose config.json gives the architecture
RUN_CHECKPOINTS = os.path.join("checkpoints", "rl")  # what a run's workdir stands for: its RL checkpoints
PARAMS_ITEM = "params"  # the TrainState field analyses read


def _state_dir(step_dir: str) -> str:
    return os.path.join(step_dir, STATE_ITEM)


def _is_step_dir(path: str) -> bool:
    return os.path.isdir(_state_dir(path))


def _is_checkpoint_root(path: str) -> bool:
    return any(name.isdigit() and _is_step_dir(os.path.join(path, name)) for name in os.listdir(path))


def _is_run_workdir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints"))


def is_orbax_checkpoint(path: str) -> bool:
    """A step directory, a checkpoint root holding step directories, or a main-job workdir."""
    return _is_step_dir(path) or _is_run_workdir(path) or _is_checkpoint_root(path)


def resolve_orbax_step(path: str) -> str:
    """The step directory `path` stands for: itself, or the newest complete step of a root or a workdir."""
    path = os.path.abspath(path)
    if _is_step_dir(path):
        if not os.path.isfile(os.path.join(path, COMMIT_MARKER)):
            raise ValueError(f"orbax checkpoint {path!r} has no {COMMIT_MARKER}: it is incomplete (a save was cut "
                             "off); pass a complete step directory")
        return path
    root = os.path.join(path, RUN_CHECKPOINTS) if _is_run_workdir(path) else path
    steps = complete_steps(root)
    if not steps:
        raise FileNotFoundError(
            f"no complete orbax checkpoint in {root!r}; pass a complete step directory "
            f"(e.g. {os.path.join(root, '<step>')}) or one of the run's Hugging Face directories "
            f"({', '.join(RUN_CONFIG_DIRS)})")
    return os.path.join(root, str(steps[-1]))


def run_workdir_of(step_dir: str) -> str | None:
    """W for a step directory W/checkpoints/<phase>/<step>, or None if it does not sit in a run's layout."""
    checkpoints_dir = os.path.dirname(os.path.dirname(os.path.abspath(step_dir)))
    return os.path.dirname(checkpoints_dir) if os.path.basename(checkpoints_dir) == "checkpoints" else None


def _run_config_file(step_dir: str, workdir: str | None) -> str:
    candidates = [os.path.join(workdir, d, "config.json") for d in RUN_CONFIG_DIRS] if workdir else []
    for file in candidates:
        if os.path.isfile(file):
            return file
    where = " or ".join(repr(f) for f in candidates) if candidates else \
        f"a run workdir (the step directory {step_dir!r} is not inside W/checkpoints/<phase>/)"
    raise FileNotFoundError(
        f"orbax checkpoint {step_dir!r} stores shapes but not the architecture, which is read from {where}; none "
        "exists. Restore the run's layout, or export the params with ftrl_jax.models.save_pretrained and pass "
        "that Hugging Face directory instead")


def _restore(state_dir: str, item: dict[str, Any]) -> dict[str, Any]:
    """Partial orbax restore of `item` (a subtree of ShapeDtypeStructs) as host numpy arrays."""
    restore_args = jax.tree.map(lambda leaf: ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype), item)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        return checkpointer.restore(epath.Path(state_dir), args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))


class OrbaxCheckpoint:
    """The params of a main-job orbax checkpoint (`W/checkpoints/<phase>/<step>`), read leaf by leaf."""

    def __init__(self, path: str | os.PathLike):
        self.requested = os.fspath(path)
        self.path = resolve_orbax_step(self.requested)
        self.workdir = run_workdir_of(self.path)
        state_dir = _state_dir(self.path)
        metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
        stored = getattr(metadata, "tree", metadata)
        if PARAMS_ITEM not in stored:
            raise ValueError(f"orbax checkpoint {self.path!r} holds {sorted(stored)} but no {PARAMS_ITEM!r}; it is "
                             "not a TrainState saved by ftrl_jax.training.checkpointing")
        self._stored = flatten_params(stored[PARAMS_ITEM])  # path -> ArrayMetadata (shape, dtype)
        config_file = _run_config_file(self.path, self.workdir)
        dtype = np.dtype(self._stored["embed_tokens/embedding"].dtype).name \
            if "embed_tokens/embedding" in self._stored else "float32"
        with open(config_file) as f:
            self.config = config_from_hf(json.load(f), param_dtype=dtype)
        self.config_file = config_file
        expected = flatten_params(abstract_params(self.config))
        problems = [f"{p}: missing" for p in expected if p not in self._stored] + [
            f"{p}: shape {tuple(self._stored[p].shape)}, {config_file} implies {tuple(leaf.shape)}"
            for p, leaf in expected.items() if p in self._stored and tuple(self._stored[p].shape) != tuple(leaf.shape)]
        if problems:
            raise ValueError(f"orbax checkpoint {self.path!r} does not match the architecture in {config_file}: "
                             + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else ""))
        self._expected = expected

    def _target(self, paths: list[str]) -> dict[str, Any]:
        return {PARAMS_ITEM: unflatten_params({p: jax.ShapeDtypeStruct(tuple(self._stored[p].shape), self._stored[p].dtype)
                                    for p in paths})}

    def _restore_flat(self, paths: list[str]) -> dict[str, np.ndarray]:
        return flatten_params(_restore(_state_dir(self.path), self._target(paths))[PARAMS_ITEM])

    def iter_tensors(self) -> Iterator[TensorRecord]:
        # One layer-stacked parameter restored at a time; its per-layer records are views into it.
        current_path, current = None, None
        for our_path, hf_name, layer, transpose in hf_tensor_names(self.config):
            if our_path != current_path:
                current = None  # drop the previous parameter before restoring the next
                current_path, current = our_path, self._restore_flat([our_path])[our_path]
            array = current if layer is None else current[layer]
            yield TensorRecord(hf_name, OUTSIDE_LAYERS if layer is None else layer, MODULE_NAMES[our_path],
                               array.T if transpose else array)

    def unmapped_names(self) -> list[str]:
        return sorted(f"{PARAMS_ITEM}/{p}" for p in self._stored if p not in self._expected)

    def load_params(self) -> dict[str, np.ndarray]:
        return self._restore_flat(list(self._expected))


# Backend name -> (does this directory look like one?, open it). Tried in order: a run's workdir also has a
# config.json (the training config), so the orbax detector goes first.
BACKENDS: dict[str, tuple[Callable[[str], bool], Callable[[str], TensorSource]]] = {
    "orbax": (is_orbax_checkpoint, OrbaxCheckpoint),
    "huggingface": (is_hf_directory, HFCheckpoint),
}


def open_checkpoint(path: str | os.PathLike) -> TensorSource:
    """Opens a checkpoint directory (or a shipped policy by name, `ftrl_jax.policies`) with the first backend that
    recognises it."""
    path = policies.resolve(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    for detect, open_source in BACKENDS.values():
        if detect(path):
            return open_source(path)
    raise ValueError(
        f"{path!r} is not a checkpoint directory this analysis reads (readers: {', '.join(BACKENDS)}): expected a "
        "Hugging Face directory (config.json + *.safetensors), a main-job orbax step directory "
        "(W/checkpoints/rl/<step>, holding state/), a checkpoint root (W/checkpoints/rl) or a main-job workdir W"
    )


def iter_tensors(path: str | os.PathLike) -> Iterator[TensorRecord]:
    """(hf_name, layer, module, array) for every tensor of the checkpoint in `path`, streamed one at a time."""
    return open_checkpoint(path).iter_tensors()


def load_params(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, {our flat path: array}) of the checkpoint in `path`, in its stored dtype (no float32 copy)."""
    source = open_checkpoint(path)
    return source.config, source.load_params()


def load_policy(name_or_dir: str | os.PathLike) -> tuple[ModelConfig, Any, Any]:
    """A policy to run, by a shipped policy's name (`ftrl_jax.policies`) or a Hugging Face directory: (model
    config, float32 params, its tokenizer). Raises OSError / ValueError as the loaders do."""
    from ftrl_jax import models
    from ftrl_jax.text.tokenizer import load_tokenizer

    model_dir = policies.resolve(name_or_dir)
    config, params = models.load_pretrained(model_dir, dtype="float32")
    return config, params, load_tokenizer(model_dir)
