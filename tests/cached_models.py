"""Model set-up shared by test modules, built once per process (init and mesh creation cost seconds each)."""

from __future__ import annotations

import functools

import jax

from ftrl_jax import models, parallel


@functools.lru_cache(maxsize=None)
def init_params(config: models.ModelConfig):
    """Params of `config` from PRNGKey(0). Shared between callers: copy them before donating to a step."""
    return models.init_params(config, jax.random.PRNGKey(0))


@functools.lru_cache(maxsize=None)
def one_device_mesh():
    return parallel.make_mesh(devices=jax.devices()[:1])
