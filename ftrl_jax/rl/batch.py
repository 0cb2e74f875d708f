"""Turning sampled rollouts and their rewards into the padded arrays the RL update consumes.

Layout (all [B, T], right-padded): `tokens` = prompt + response ids, `attention_mask` 1 on real tokens,
`loss_mask` 1 on policy-generated tokens. Position t of any log-prob array is log p(tokens[t] | tokens[:t]).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ftrl_jax.rollout.episodes import Episode, GeneratedTurn, episode_token_arrays
from ftrl_jax.training.warmstart import length_bucket


def pad_rows(rows: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int, multiple: int = 64) -> dict[str, np.ndarray]:
    """(ids, loss_mask) rows -> tokens, attention_mask, loss_mask padded to a bucketed length."""
    length = length_bucket(max(len(ids) for ids, _ in rows), multiple)
    b = len(rows)
    out = {"tokens": np.full((b, length), pad_id, np.int32), "attention_mask": np.zeros((b, length), np.int32),
           "loss_mask": np.zeros((b, length), np.int32)}
    for i, (ids, mask) in enumerate(rows):
        out["tokens"][i, : len(ids)] = ids
        out["attention_mask"][i, : len(ids)] = 1
        out["loss_mask"][i, : len(ids)] = mask
    return out


def step_rows(turns: Sequence[GeneratedTurn]) -> list[tuple[np.ndarray, np.ndarray]]:
    """One row per sampled turn: the prompt (mask 0) followed by the generated tokens (mask 1)."""
    rows = []
    for turn in turns:
        ids = np.asarray(list(turn.prompt_ids) + list(turn.token_ids), np.int32)
        mask = np.zeros(len(ids), np.int32)
        mask[len(turn.prompt_ids):] = 1
        rows.append((ids, mask))
    return rows


def trajectory_rows(episodes: Sequence[Episode], tokenizer, template: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """One row per episode: the whole multi-turn trajectory, tool responses and template text masked out."""
    rows = []
    for episode in episodes:
        ids, mask, _ = episode_token_arrays(episode, tokenizer, template)
        rows.append((np.asarray(ids, np.int32), np.asarray(mask, np.int32)))
    return rows


def response_lengths(batch: dict[str, np.ndarray]) -> np.ndarray:
    return batch["loss_mask"].sum(axis=1)
