"""Device meshes and name-based partition rules.

The mesh has three axes: `data` (batch), `fsdp` (batch and parameter shards, gathered per use),
`tensor` (heads / MLP width). Model code never names devices; parameters are laid out by the first
rule in `PARTITION_RULES` whose regex matches their path. A dimension that the mesh axis does not
divide is replicated instead, so odd toy shapes still run on any mesh.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex on the parameter path, spec). Stacked layer params have the layer axis first (never sharded).
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens/embedding$", P("tensor", "fsdp")),
    (r"layers/self_attn/(q|k|v)_proj/kernel$", P(None, "fsdp", "tensor")),
    (r"layers/self_attn/(q|k|v)_proj/bias$", P(None, "tensor")),
    (r"layers/self_attn/o_proj/kernel$", P(None, "tensor", "fsdp")),
    (r"layers/mlp/(gate|up)_proj/kernel$", P(None, "fsdp", "tensor")),
    (r"layers/mlp/(gate|up)_proj/bias$", P(None, "tensor")),
    (r"layers/mlp/down_proj/kernel$", P(None, "tensor", "fsdp")),
    (r"lm_head/kernel$", P("fsdp", "tensor")),
    (r".*", P()),  # norms, biases of the residual width, scalars: replicated
)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; the axis sizes must multiply to the device count."""
    devices = list(jax.devices() if devices is None else devices)
    if data * fsdp * tensor != len(devices):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} devices, but "
            f"{len(devices)} are available ({devices[0].platform}); set config.mesh.* so the product is {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(data, fsdp, tensor), MESH_AXES)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def partition_spec(path: str, shape: Sequence[int], mesh: Mesh) -> P:
    """The first matching rule's spec, with axes that do not divide their dimension dropped."""
    for pattern, spec in PARTITION_RULES:
        if re.search(pattern, path):
            break
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    fitted = []
    for dim, axis in zip(shape, spec[: len(shape)]):
        size = 1 if axis is None else int(np.prod([mesh.shape[a] for a in np.atleast_1d(axis)]))
        fitted.append(axis if axis is not None and dim % size == 0 else None)
    return P(*fitted)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """A pytree of NamedSharding matching `params` (real or abstract arrays)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, partition_spec(_path_str(path), x.shape, mesh)), params
    )


def shard_params(params: Any, mesh: Mesh) -> Any:
    return jax.device_put(params, param_shardings(params, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data and fsdp; everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def checkpoint_sharding_fn(mesh: Mesh):
    """For `load_pretrained(..., shardings=...)`: places each tensor straight onto its shard layout."""
    return lambda path, shape: NamedSharding(mesh, partition_spec(path, shape, mesh))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Multi-host start-up (TPU pods, multi-node GPU). Call once per host before any other JAX call.

    On Cloud TPU all arguments can be left out; elsewhere pass the coordinator `host:port`, the number of
    processes and this process's index. Afterwards `jax.devices()` lists every host's devices and
    `make_mesh` builds the global mesh.
    """
    kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address, num_processes=num_processes,
                                     process_id=process_id).items() if v is not None}
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d, %d global devices",
                 jax.process_index(), jax.process_count(), jax.device_count())
