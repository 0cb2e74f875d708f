"""Dynamic sampling (DAPO, Yu et al. 2025, sec. 3.2): keep only prompt groups that carry a learning signal.

A group is the n rollouts of one prompt. When all n score the same, every group-relative advantage of the
group is 0 (GRPO, Dr. GRPO, RLOO), so the group costs a forward and backward pass and teaches nothing.
DAPO over-samples prompts and keeps the groups whose rewards differ until the batch is full; with
`require_success`, a kept group must also hold at least one success (a reward >= `success_threshold`),
which drops groups that differ only among failures (e.g. -0.3 format penalties against 0).

`informative_groups` is the filter (pure, NumPy); `GroupCollector` fills a batch of `num_groups` groups
from successive sampling rounds, and falls back to rejected groups when the rounds run out, so every step
trains on a batch of the same shape. The sampling itself stays with the caller (`pipeline.main_job`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np


def informative_groups(rewards, group_size: int, *, require_success: bool = False,
                       success_threshold: float = 1.0) -> np.ndarray:
    """Bool `[num_groups]`: which groups of a group-major reward vector `[num_groups * group_size]` to keep.

    A group is kept when its rewards are not all equal (verl's DAPO filter: std > 0). Groups of one have no
    spread to test and are kept (as verl does). With `require_success`, a kept group must also hold a reward
    >= `success_threshold`. Raises ValueError when the rewards do not split into groups of `group_size`.
    """
    scores = np.asarray(rewards, np.float64)
    if group_size < 1 or scores.ndim != 1 or scores.size % group_size:
        raise ValueError(f"expected rewards [num_groups * {group_size}] in group-major order, got shape {scores.shape}")
    groups = scores.reshape(-1, group_size)
    keep = groups.max(axis=1) > groups.min(axis=1) if group_size > 1 else np.ones(len(groups), bool)
    if require_success:
        keep &= (groups >= success_threshold).any(axis=1)
    return keep


@dataclasses.dataclass
class GroupCollector:
    """Fills a batch of `num_groups` groups over sampling rounds, informative groups first.

    Call `add(items, rewards)` with each round's group-major items (any per-rollout objects: sampled turns,
    episodes) and their rewards `[k * group_size]`; it returns True once the batch is full. `add`'s optional
    `eligible` (bool `[k]`) rejects the groups it marks False whatever their rewards, e.g. prompts whose greedy
    turn already succeeds (`rl.prompt_filter`). `batch()` returns `(items, rewards)` of exactly `num_groups`
    groups: the kept groups in the order drawn, then, if the rounds ran out, the earliest rejected ones as filler,
    ineligible ones only after every other rejected group. `stats()` gives the counts to log.
    """

    num_groups: int
    group_size: int
    require_success: bool = False
    success_threshold: float = 1.0
    kept: list[tuple[list[Any], np.ndarray]] = dataclasses.field(default_factory=list)
    rejected: list[tuple[list[Any], np.ndarray]] = dataclasses.field(default_factory=list)
    ineligible: list[tuple[list[Any], np.ndarray]] = dataclasses.field(default_factory=list)
    groups_drawn: int = 0
    rounds: int = 0
    all_rewards: list[np.ndarray] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.num_groups < 1 or self.group_size < 1:
            raise ValueError(f"GroupCollector needs num_groups >= 1 and group_size >= 1; got {self.num_groups} "
                             f"and {self.group_size}")

    @property
    def full(self) -> bool:
        return len(self.kept) >= self.num_groups

    def add(self, items: Sequence[Any], rewards, eligible=None) -> bool:
        scores = np.asarray(rewards, np.float32)
        if len(items) != scores.size:
            raise ValueError(f"got {len(items)} items for {scores.size} rewards")
        keep = informative_groups(scores, self.group_size, require_success=self.require_success,
                                  success_threshold=self.success_threshold)
        eligible = np.ones_like(keep) if eligible is None else np.asarray(eligible, bool)
        if eligible.shape != keep.shape:
            raise ValueError(f"got eligibility for {eligible.size} groups, rewards for {keep.size}")
        n = self.group_size
        for g, (kept, allowed) in enumerate(zip(keep, eligible)):
            group = (list(items[g * n:(g + 1) * n]), scores[g * n:(g + 1) * n])
            (self.ineligible if not allowed else self.kept if kept else self.rejected).append(group)
        self.groups_drawn += len(keep)
        self.rounds += 1
        self.all_rewards.append(scores)
        return self.full

    def batch(self) -> tuple[list[Any], np.ndarray]:
        if self.groups_drawn < self.num_groups:
            raise ValueError(f"only {self.groups_drawn} groups were drawn for a batch of {self.num_groups}; add "
                             "more rounds first")
        chosen = self.kept[:self.num_groups]
        chosen += self.rejected[:self.num_groups - len(chosen)]
        chosen += self.ineligible[:self.num_groups - len(chosen)]
        items = [item for group, _ in chosen for item in group]
        return items, np.concatenate([scores for _, scores in chosen])

    def stats(self) -> dict[str, float]:
        """`groups_drawn`, `groups_kept` (informative groups found, may exceed the batch), `groups_filler`
        (rejected groups that filled the batch), `groups_ineligible` (groups `add`'s `eligible` rejected) and
        `groups_filler_ineligible` (those of them in the batch), `sampling_rounds`, `reward_mean_drawn` (over
        every rollout drawn: unlike the batch's reward, not raised by the filter)."""
        drawn = np.concatenate(self.all_rewards) if self.all_rewards else np.zeros(0, np.float32)
        filler = max(0, self.num_groups - len(self.kept))
        return {"groups_drawn": float(self.groups_drawn), "groups_kept": float(len(self.kept)),
                "groups_ineligible": float(len(self.ineligible)),
                "groups_filler": float(filler),
                "groups_filler_ineligible": float(max(0, filler - len(self.rejected))),
                "sampling_rounds": float(self.rounds),
                "reward_mean_drawn": float(drawn.mean()) if drawn.size else 0.0}
