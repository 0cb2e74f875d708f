"""Tool-use environments: the FTRL sample format, the sandbox that runs tool code, dataset converters."""

from ftrl_jax.envs import samples, sandbox, toolhop
