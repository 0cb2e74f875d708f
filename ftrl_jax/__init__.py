"""ftrl_jax: FTRL (arXiv 2508.08791) in JAX/Flax.

Automated tool-use environments, verifiable rewards, and RL (GRPO, Reinforce++) for
Qwen2.5 / Qwen3 / Llama-3 style decoders.
"""

__version__ = "0.1.0"
