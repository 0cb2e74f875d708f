"""Supervised warm start on oracle trajectories.

A randomly initialised model never emits a well-formed tool call, so RL would see no reward. The warm
start plays each environment's gold plan (`oracle_calls`) through the sandbox, renders the resulting
conversation with the chat template and trains only on the assistant-generated text.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import numpy as np

from ftrl_jax.text.chat import encode_segments, render_segments
from ftrl_jax.envs.samples import Sample
from ftrl_jax.envs.sandbox import Sandbox, ToolRequest


def oracle_conversations(samples: Sequence[Sample], sandbox: Sandbox) -> list[list[dict[str, Any]]]:
    """The full gold conversation of each sample: its messages, one assistant turn per oracle turn with
    the calls, the tool responses, and a last assistant turn that states the answer.

    All calls of all samples go through one `call_many` per oracle-turn depth.
    """
    conversations = [list(s.messages) for s in samples]
    plans = [s.oracle_calls or [] for s in samples]
    for depth in range(max((len(p) for p in plans), default=0)):
        requests, owners = [], []
        for i, (sample, plan) in enumerate(zip(samples, plans)):
            if depth >= len(plan):
                continue
            calls = plan[depth]
            conversations[i].append({
                "role": "assistant", "content": "",
                "tool_calls": [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                               for c in calls],
            })
            for call in calls:
                requests.append(ToolRequest(sample.codes, call["name"], call["arguments"]))
                owners.append((i, call["name"]))
        for (i, name), output in zip(owners, sandbox.call_many(requests)):
            conversations[i].append({"role": "tool", "name": name, "content": output})
    for i, sample in enumerate(samples):
        conversations[i].append({"role": "assistant", "content": sample.answer})
    return conversations


@dataclasses.dataclass
class SupervisedExamples:
    """Token ids and loss masks of rendered conversations (variable length), plus what was left out."""

    ids: list[np.ndarray]
    loss_masks: list[np.ndarray]
    dropped_too_long: int = 0

    def __len__(self) -> int:
        return len(self.ids)


def encode_conversations(conversations: Sequence[list[dict[str, Any]]], samples: Sequence[Sample], tokenizer: Any,
                         *, template: str, enable_thinking: bool, max_len: int) -> SupervisedExamples:
    """Renders and tokenizes each conversation; loss mask 1 on assistant-generated tokens only."""
    out = SupervisedExamples([], [])
    for messages, sample in zip(conversations, samples):
        segments = render_segments(messages, sample.tools, template=template, enable_thinking=enable_thinking)
        ids, mask = encode_segments(tokenizer, segments)
        if len(ids) > max_len:
            out.dropped_too_long += 1
            continue
        out.ids.append(np.asarray(ids, np.int32))
        out.loss_masks.append(np.asarray(mask, np.int32))
    return out


def pad_batch(rows: Sequence[np.ndarray], masks: Sequence[np.ndarray], length: int, pad_id: int
              ) -> dict[str, np.ndarray]:
    """Right-pads rows to `length`: tokens, attention_mask, loss_mask [B, length]."""
    b = len(rows)
    tokens = np.full((b, length), pad_id, np.int32)
    attention = np.zeros((b, length), np.int32)
    loss = np.zeros((b, length), np.int32)
    for i, (ids, mask) in enumerate(zip(rows, masks)):
        n = min(len(ids), length)
        tokens[i, :n], attention[i, :n], loss[i, :n] = ids[:n], 1, mask[:n]
    return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss}


def length_bucket(n: int, multiple: int = 128) -> int:
    """Rounds a sequence length up to a multiple, so only a few shapes compile."""
    return max(multiple, -(-n // multiple) * multiple)


def epoch_batches(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches of example indices, grouped by similar length so little is padding.

    Shuffle, sort within windows of 8 batches by length, cut into batches, shuffle the batches: the
    usual "sortish" order. Depends only on (seed, epoch), so a resumed run sees the same batches.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    if len(order) < batch_size:  # fewer examples than one batch: repeat them
        order = (order * (batch_size // len(order) + 1))[:batch_size]
    window = batch_size * 8
    grouped: list[list[int]] = []
    for start in range(0, len(order) - batch_size + 1, window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        grouped.extend(chunk[j:j + batch_size] for j in range(0, len(chunk) - batch_size + 1, batch_size))
    return [grouped[i] for i in rng.permutation(len(grouped))]


def batches(examples: SupervisedExamples, batch_size: int, *, seed: int, start_step: int, pad_id: int
            ) -> Iterator[dict[str, np.ndarray]]:
    """Endless length-grouped batches; batch k depends only on (seed, k), so a resumed run sees the same data."""
    if len(examples) == 0:
        raise ValueError("no supervised examples to warm-start on (all dropped as too long?); raise warmup.max_len")
    lengths = [len(ids) for ids in examples.ids]
    epoch, skipped, current = 0, 0, epoch_batches(lengths, batch_size, seed=seed, epoch=0)
    while skipped + len(current) <= start_step:  # fast-forward to the resumed step
        skipped += len(current)
        epoch += 1
        current = epoch_batches(lengths, batch_size, seed=seed, epoch=epoch)
    position = start_step - skipped
    while True:
        for picks in current[position:]:
            rows = [examples.ids[i] for i in picks]
            length = length_bucket(max(len(r) for r in rows))
            yield pad_batch(rows, [examples.loss_masks[i] for i in picks], length, pad_id)
        epoch, position = epoch + 1, 0
        current = epoch_batches(lengths, batch_size, seed=seed, epoch=epoch)
