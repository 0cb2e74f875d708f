"""The in-process rollout policy: a `TurnGenerator` backed by the jit KV-cache sampler.

`LocalPolicy` renders each conversation with its chat template, encodes it, and samples the next assistant
turn of every conversation in one `generate` call, reusing the ids earlier assistant turns were sampled as
so that each prompt extends the previous one (what whole-trajectory RL relies on).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ftrl_jax.generate import sampling
from ftrl_jax.models.config import ModelConfig
from ftrl_jax.rollout.episodes import Conversation, GeneratedTurn
from ftrl_jax.text.chat import IM_END, get_template, render_segments
from ftrl_jax.text.tokenizer import stop_token_ids


class _IdsMemory:
    """A bounded least-recently-used map to token ids (stored as int32 arrays, a tenth of a list's memory)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._ids: collections.OrderedDict[Any, np.ndarray] = collections.OrderedDict()

    def put(self, key: Any, ids: Sequence[int]) -> None:
        self._ids[key] = np.asarray(ids, np.int32)
        self._ids.move_to_end(key)
        while len(self._ids) > self._capacity:
            self._ids.popitem(last=False)

    def get(self, key: Any) -> list[int] | None:
        ids = self._ids.get(key)
        if ids is None:
            return None
        self._ids.move_to_end(key)
        return ids.tolist()


def _after(prefix: Sequence[int], text: str) -> tuple[int, int, str]:
    """The memory key of a generated text: the text and the ids it was generated after."""
    return len(prefix), hash(tuple(prefix)), text


class LocalPolicy:
    """A `TurnGenerator` backed by the jit KV-cache sampler (`ftrl_jax.generate.sampling.generate`).

    Conversations are rendered with the chat template plus its generation prompt, encoded with
    `tokenizer`, and generated in one batch, stopping on `stop_token_ids(tokenizer)`. Earlier assistant
    turns reuse the ids they were sampled as, so each prompt extends the previous prompt and its
    generated ids. A prompt longer than `max_prompt_tokens` (default: the model's context minus
    `max_new_tokens`) is not generated from; its turn comes back with `prompt_too_long=True`.
    `temperature=0` is greedy; otherwise each call draws a fresh key from `seed`.
    """

    def __init__(self, config: ModelConfig, params: Any, tokenizer: Any, *, template: str = "qwen2.5",
                 enable_thinking: bool = False, max_new_tokens: int = 512, max_prompt_tokens: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, data_sharding: Any = None,
                 seed: int = 0, remembered_turns: int = 1 << 15, remembered_pieces: int = 1024) -> None:
        get_template(template)  # unknown names fail here, not in the middle of a rollout
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        context = config.max_position_embeddings
        if max_prompt_tokens is None:
            max_prompt_tokens = context - max_new_tokens
        if max_prompt_tokens < 1 or max_prompt_tokens + max_new_tokens > context:
            raise ValueError(
                f"max_prompt_tokens={max_prompt_tokens} + max_new_tokens={max_new_tokens} must fit the model's "
                f"max_position_embeddings={context} (and max_prompt_tokens must be >= 1); lower one of them"
            )
        if len(tokenizer) > config.vocab_size:
            # Ids past the embedding table would be silently clamped by the gather, not rejected.
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                             f"{config.vocab_size}; use the tokenizer the model was trained with")
        self.config = config
        self.params = params
        self._decode_weights = None  # made at the first call, reused by every later one (same params)
        self.tokenizer = tokenizer
        self.template = template
        self.enable_thinking = enable_thinking
        self.max_new_tokens = int(max_new_tokens)
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.data_sharding = data_sharding
        self.stop_ids = tuple(stop_token_ids(tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._rng = jax.random.PRNGKey(seed)
        # Re-tokenizing a generated text need not give the ids the model sampled (a model may spell a word
        # in other pieces than the tokenizer's merges would), so they are remembered by (the prompt ids they
        # followed, their rendered text); the lookup misses when history was rewritten, and then the prompt
        # no longer extends the earlier one (which episode_token_arrays reports).
        self._generated = _IdsMemory(remembered_turns)
        # Template pieces repeat every turn (system prompt, tools, question) and across a group of samples.
        self._pieces = _IdsMemory(remembered_pieces)

    def _encode_piece(self, text: str) -> list[int]:
        ids = self._pieces.get(text)
        if ids is None:
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
            self._pieces.put(text, ids)
        return ids

    def encode(self, messages: Sequence[Mapping[str, Any]], tools: Any) -> list[int]:
        """The prompt ids for `messages` (rendered with the generation prompt), reusing generated ids."""
        segments = render_segments(messages, tools, template=self.template, enable_thinking=self.enable_thinking)
        prompt = get_template(self.template).generation_prompt(self.enable_thinking)
        # One piece per stretch of template text, cut exactly where generation started and stopped, so a
        # given stretch is encoded the same way in every later prompt.
        if segments and not segments[-1][1]:
            segments[-1] = (segments[-1][0] + prompt, False)
        else:
            segments.append((prompt, False))
        ids: list[int] = []
        for text, generated in segments:
            reused = self._generated.get(_after(ids, text)) if generated else None
            ids.extend(reused if reused is not None else self._encode_piece(text))
        return ids

    def __call__(self, conversations: Sequence[Conversation]) -> list[GeneratedTurn]:
        """The next assistant turn of every conversation, from one `generate` call over those that fit."""
        prompts = [self.encode(messages, tools) for messages, tools in conversations]
        turns: list[GeneratedTurn] = [
            GeneratedTurn("", prompt, [], [], truncated=False, prompt_too_long=True) for prompt in prompts
        ]
        fitting = [i for i, prompt in enumerate(prompts) if len(prompt) <= self.max_prompt_tokens]
        if not fitting:
            return turns
        self._rng, rng = jax.random.split(self._rng)
        if self._decode_weights is None:
            self._decode_weights = sampling.decode_weights(self.config, self.params)
        result = sampling.generate(
            self.config, self.params, [prompts[i] for i in fitting], max_new_tokens=self.max_new_tokens,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, stop_token_ids=self.stop_ids,
            rng=rng, pad_id=self.pad_id, data_sharding=self.data_sharding, weights=self._decode_weights,
        )
        for i, tokens, logprobs, stopped in zip(fitting, result.tokens, result.logprobs, result.stopped):
            body = tokens[:-1] if stopped else tokens
            # Special tokens stay in the text: dropping one the model wrote would change its history.
            text = self.tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if stopped:
                # Both Qwen templates close an assistant turn's generated text with <|im_end|>.
                self._generated.put(_after(prompts[i], text + IM_END), tokens)
            turns[i] = GeneratedTurn(text, prompts[i], list(tokens), list(logprobs), truncated=not stopped)
        return turns
