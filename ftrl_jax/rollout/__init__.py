"""Rollouts: multi-turn episodes in tool environments, the in-process policy, and evaluation.

- `episodes`: `play_episodes`, the turn-generator protocol, RL prompts and token arrays from episodes;
- `policy`: `LocalPolicy`, the jit-sampler turn generator;
- `evaluation`: greedy held-out evaluation of procedural environments (Solve-P/R/F1 per scenario type);
- `harness`: resumable evaluation of files (FTRL's test set, ToolHop) with per-episode output and summaries.
"""
