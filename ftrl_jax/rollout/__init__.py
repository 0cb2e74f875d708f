"""Rollouts: multi-turn episodes in tool environments, the in-process policy, and evaluation.

- `episodes`: `play_episodes`, the turn-generator protocol, RL prompts and token arrays from episodes;
- `policy`: `LocalPolicy`, the jit-sampler turn generator;
- `evaluation`: greedy held-out evaluation of procedural environments (Solve-P/R/F1 per scenario type);
- `harness`: resumable evaluation of files (FTRL's test set, ToolHop) with per-episode output and summaries.
"""

from ftrl_jax.rollout.episodes import (END_REASONS, Episode, GeneratedTurn, TurnGenerationError, TurnGenerator,
                                       episode_token_arrays, play_episodes, rl_prompts_from_conversation,
                                       rl_prompts_from_episode)

# Loaded on first use: they bring JAX, which a remote-policy evaluation or the server's request path never needs.
_LAZY = {"LocalPolicy": "ftrl_jax.rollout.policy", "evaluate": "ftrl_jax.rollout.evaluation"}

__all__ = ["END_REASONS", "Episode", "GeneratedTurn", "LocalPolicy", "TurnGenerationError", "TurnGenerator",
           "episode_token_arrays", "evaluate", "play_episodes", "rl_prompts_from_conversation",
           "rl_prompts_from_episode"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ftrl_jax.rollout' has no attribute {name!r}")
