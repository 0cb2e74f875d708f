"""ftrl_jax: FTRL (arXiv 2508.08791) in JAX/Flax.

Automated tool-use environments, verifiable rewards, and RL (GRPO, Reinforce++) for
Qwen2.5 / Qwen3 / Llama-3 style decoders. One sub-package per concept, imported in one direction:

    models, text  ->  generate, envs (with the reward)  ->  rollout  ->  training  ->  rl  ->  pipeline
                                                        rollout  ->  serving

`parallel` (meshes, partition rules) sits beside `models` at the bottom.

The short names of the public API are kept: `from ftrl_jax import models, sampling, rewards` (and `chat`,
`tool_calls`, `tokenizer`) give the modules that now live in `generate/`, `envs/` and `text/`. They load on
first use, so `import ftrl_jax` stays cheap.
"""

import importlib as _importlib

__version__ = "0.1.0"

# Short public name -> the module it stands for.
_ALIASES = {
    "sampling": "ftrl_jax.generate.sampling",
    "rewards": "ftrl_jax.envs.rewards",
    "chat": "ftrl_jax.text.chat",
    "tool_calls": "ftrl_jax.text.tool_calls",
    "tokenizer": "ftrl_jax.text.tokenizer",
}


def __getattr__(name: str):
    if name in _ALIASES:
        module = _importlib.import_module(_ALIASES[name])
        globals()[name] = module
        return module
    raise AttributeError(f"module 'ftrl_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_ALIASES))
