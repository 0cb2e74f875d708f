"""Sharding on a simulated 2x2x2 CPU mesh gives the single-device results."""

import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from ftrl_jax import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_forward_and_generate_on_8_device_mesh(model_type):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "mesh_check.py"), model_type],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "MESH_OK" in proc.stdout, proc.stdout + proc.stderr


def test_partition_spec_rules_and_divisibility():
    mesh = jax.sharding.Mesh(__import__("numpy").asarray(jax.devices()[:1]).reshape(1, 1, 1), parallel.MESH_AXES)
    assert parallel.partition_spec("layers/mlp/down_proj/kernel", (4, 704, 256), mesh) == P(None, "tensor", "fsdp")
    assert parallel.partition_spec("norm/scale", (256,), mesh) == P(None)


def test_mesh_size_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="config.mesh"):
        parallel.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:1])
