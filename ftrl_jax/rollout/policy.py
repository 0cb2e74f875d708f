"""The in-process rollout policy: a `TurnGenerator` backed by the jit KV-cache sampler.

`LocalPolicy` renders each conversation with its chat format (`ftrl_jax.text.templates`: the native Qwen
renderers, or the checkpoint's own template), encodes it, and samples the next assistant turn of every
conversation, reusing the ids earlier assistant turns were sampled as so that each prompt extends the previous
one (what whole-trajectory RL relies on).

Conversations go to the sampler in micro-batches sized from a memory budget (`plan_micro_batches`, with
`generate_bytes` as the estimate of one `generate` call): a rollout over thousands of conversations must not
ask the device for one batch the size of all of them. Repeated prompts (the n samples of group RL, which the
sampler prefills once) stay in one micro-batch, prompts of similar length go together, and turns come back
in the caller's order.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ftrl_jax.generate import sampling
from ftrl_jax.models.attention import resolve_implementation
from ftrl_jax.models.config import ModelConfig, dtype_from_name
from ftrl_jax.rollout.episodes import Conversation, GeneratedTurn
from ftrl_jax.text.chat import IM_END, get_template, render_segments
from ftrl_jax.text.templates import ChatFormat, resolve_chat_format
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


def _rendered_after(prompt_text: str, text: str) -> tuple[str, int, int, str]:
    """The memory key of a generated text under a checkpoint template: the text and the prompt text before it."""
    return "rendered", len(prompt_text), hash(prompt_text), text


# ---------------------------------------------------------------------------------------------
# Memory budget: how many conversations one `generate` call may take.

# Default budgets: this share of the free memory of the devices the batch is placed on, where JAX reports it
# (`Device.memory_stats()`: GPU, TPU), else a fixed 4 GiB (CPU reports nothing; host memory is shared).
DEFAULT_MEMORY_FRACTION = 0.5
DEFAULT_HOST_BATCH_BYTES = 4 << 30


def prefill_attention_bytes(config: ModelConfig, prompts: int, prompt_len: int) -> int:
    """Bytes of the prefill's attention over `prompts` padded prompts of `prompt_len` tokens, one layer at a time.

    The sampler passes key validity, not a [P, P] mask, so the scores are what counts. Dense attention, and
    blockwise attention when one tile covers the prompt (it then runs the dense math): float32 scores
    [prompts, heads, P, P] and their softmax, plus the mask made from validity and causality. Blockwise beyond
    one tile (`models.attention`): float32 score tiles [prompts, heads, P, block] and their exponentials, at most
    (conservatively, as if every query block were live at once).
    """
    impl = resolve_implementation(config.attention_impl)
    block = config.attention_block_size
    if impl == "dense" or prompt_len * prompt_len <= block * block:
        return prompts * prompt_len * prompt_len * (2 * config.num_heads * 4 + 1)
    return prompts * config.num_heads * prompt_len * block * 4 * 2


def generate_bytes(config: ModelConfig, num_prompts: int, group_size: int, prompt_len: int,
                   max_new_tokens: int) -> int:
    """Estimated device bytes of one `sampling.generate` call beyond the weights (params and decode weights).

    The call's shapes are those of the sampler: `num_prompts` distinct prompts padded to U = a power of two,
    `group_size` rows for each (the most rows any one prompt has, padded to a power of two G; rows
    B = U x G), the longest prompt's `prompt_len` padded to P = a power of two >= 16, `max_new_tokens` to N.
    With kv = layers x 2 x kv_heads x head_dim x (compute dtype bytes), the bytes per cached token:

      state   = kv x (U x P + B x N)                 prompt cache (prefilled once per prompt) + generated cache
                + B x N x 9                           output tokens, log-probs, key validity
      prefill = U x P x (kv + dtype x (4 D + 3 I))    the stacked prompt cache before it is split per layer,
                                                     hidden and MLP activations of one layer
                + prefill_attention_bytes(U, P)       attention scores (dense today: U x H x P^2 x 4 x 2)
                + B x V x 4 x 6                       logits of the last position and the sampling copies
      decode  = 2 x kv x B x N                        working copies of the generated cache
                + B x H x (P + N) x 4 x 2             one step's attention scores and softmax
                + B x V x 4 x 6                       logits, log-softmax, the top-k / top-p sort
      total   = state + max(prefill, decode) + V x D x dtype   (plus a copy of the output head)

    Checked against XLA's own accounting (`compiled.memory_analysis()` of the prefill and decode programs,
    outputs + temporaries, on CPU): 1.15-1.7x what they allocate for the `tiny` model (float32) at 16-256
    prompts of 128-2048 tokens, and 1.1-2.5x for `qwen2.5-0.5b` shapes in bfloat16. Not counted: temporaries
    of the weights' size, which do not grow with the batch (XLA on CPU keeps float32 copies of bfloat16
    weights for its matmuls); the budget is meant as what is left beside the weights.
    """
    u = sampling.bucket(num_prompts, minimum=1)
    rows = u * sampling.bucket(group_size, minimum=1)
    p = sampling.bucket(prompt_len)
    n = sampling.bucket(max_new_tokens)
    dtype = np.dtype(dtype_from_name(config.dtype)).itemsize
    kv = config.num_layers * 2 * config.num_kv_heads * config.head_dim * dtype
    logits = rows * config.vocab_size * 4 * 6
    state = kv * (u * p + rows * n) + rows * n * 9
    prefill = (u * p * (kv + dtype * (4 * config.hidden_size + 3 * config.intermediate_size))
               + prefill_attention_bytes(config, u, p) + logits)
    decode = 2 * kv * rows * n + rows * config.num_heads * (p + n) * 4 * 2 + logits
    head = config.vocab_size * config.hidden_size * dtype
    return int(state + max(prefill, decode) + head)


def default_batch_bytes(data_sharding: Any = None) -> int:
    """`DEFAULT_MEMORY_FRACTION` of the free memory (`bytes_limit - bytes_in_use`) of the first device the
    batch goes to, times the number of shards the batch is split into (1 without `data_sharding`), or
    `DEFAULT_HOST_BATCH_BYTES` where the device reports no memory statistics (CPU)."""
    if data_sharding is None:
        device, shards = jax.devices()[0], 1
    else:
        devices = sorted(data_sharding.device_set, key=lambda d: d.id)
        device = devices[0]
        try:
            shards = len(devices) // data_sharding.shard_shape((len(devices),))[0]
        except Exception:  # noqa: BLE001 - a sharding that cannot split this shape: count every device
            shards = len(devices)
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without the call
        stats = None
    if not stats or not stats.get("bytes_limit"):
        return DEFAULT_HOST_BATCH_BYTES
    free = max(0, int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    return max(1, int(DEFAULT_MEMORY_FRACTION * free * max(1, shards)))


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """Rows (indices into the planned prompts, ascending) of one `generate` call and its estimated bytes."""

    rows: tuple[int, ...]
    estimated_bytes: int


def plan_micro_batches(config: ModelConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                       max_batch_bytes: int, max_batch_rows: int | None = None) -> list[MicroBatch]:
    """Splits `prompts` into micro-batches whose `generate_bytes` estimate fits `max_batch_bytes` and which
    hold at most `max_batch_rows` rows (None: no cap).

    When everything fits, the plan is one micro-batch of every row, the call an unbounded policy makes.
    Otherwise identical prompts (one group) stay in one micro-batch, a group too large for the budget or the
    row cap alone being cut into as few pieces as fit, and groups are packed greedily in order of padded
    group size, then prompt length (longest first), a micro-batch never mixing group sizes or prompt buckets
    (`sampling.bucket`): padding a prompt to a longer bucket, or a lone row to a group's rows, would cost
    compute in every decode step. A single row whose estimate alone exceeds the budget still runs, alone,
    with a `RuntimeWarning` naming the budget. The plan depends only on the prompts and the settings.
    """
    if max_batch_bytes < 1:
        raise ValueError(f"max_batch_bytes must be >= 1, got {max_batch_bytes}")
    if max_batch_rows is not None and max_batch_rows < 1:
        raise ValueError(f"max_batch_rows must be >= 1 or None, got {max_batch_rows}")
    if not prompts:
        return []
    row_cap = len(prompts) if max_batch_rows is None else max_batch_rows

    def estimate(num_prompts: int, group_size: int, prompt_len: int) -> int:
        return generate_bytes(config, num_prompts, group_size, prompt_len, max_new_tokens)

    groups: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(tuple(prompt), []).append(i)
    whole = estimate(len(groups), max(map(len, groups.values())), max(map(len, groups)))
    if len(prompts) <= row_cap and whole <= max_batch_bytes:
        return [MicroBatch(tuple(range(len(prompts))), whole)]

    units: list[tuple[tuple[int, ...], list[int]]] = []
    for key, rows in groups.items():
        size = min(len(rows), row_cap)
        while size > 1 and estimate(1, size, len(key)) > max_batch_bytes:
            size = sampling.bucket(size, minimum=1) // 2  # the estimate only changes at powers of two
        one_row = estimate(1, 1, len(key))
        if one_row > max_batch_bytes:
            warnings.warn(
                f"a {len(key)}-token prompt with max_new_tokens={max_new_tokens} needs an estimated "
                f"{one_row / 2**30:.2f} GiB to generate from, over the policy's max_batch_bytes={max_batch_bytes} "
                f"({max_batch_bytes / 2**30:.2f} GiB); its {len(rows)} row(s) run alone, one at a time, and may "
                f"run out of memory: raise max_batch_bytes if the device has room, or lower max_prompt_tokens "
                f"or max_new_tokens", RuntimeWarning, stacklevel=3)
        units.extend((key, rows[start:start + size]) for start in range(0, len(rows), size))

    def kind(unit: tuple[tuple[int, ...], list[int]]) -> tuple[int, int]:
        return -sampling.bucket(len(unit[1]), minimum=1), -sampling.bucket(len(unit[0]))

    units.sort(key=lambda unit: (*kind(unit), -len(unit[0]), unit[1][0]))
    plan: list[MicroBatch] = []
    members: list[int] = []
    counts: dict[tuple[int, ...], int] = {}
    shape = (0, 0, 0)  # distinct prompts, largest group, longest prompt
    cost, batch_kind = 0, None
    for unit in units:
        key, rows = unit
        count = counts.get(key, 0) + len(rows)
        grown = (len(counts) + (key not in counts), max(shape[1], count), max(shape[2], len(key)))
        grown_cost = estimate(*grown)
        if members and (kind(unit) != batch_kind or len(members) + len(rows) > row_cap
                        or grown_cost > max_batch_bytes):
            plan.append(MicroBatch(tuple(sorted(members)), cost))
            members, counts = [], {}
            count, grown = len(rows), (1, len(rows), len(key))
            grown_cost = estimate(*grown)
        members.extend(rows)
        counts[key] = count
        shape, cost, batch_kind = grown, grown_cost, kind(unit)
    plan.append(MicroBatch(tuple(sorted(members)), cost))
    return plan


class LocalPolicy:
    """A `TurnGenerator` backed by the jit KV-cache sampler (`ftrl_jax.generate.sampling.generate`).

    Conversations are rendered with the chat format plus its generation prompt, encoded with `tokenizer`, and
    generated stopping on `stop_token_ids(tokenizer)`. `template` is "qwen2.5" or "qwen3" (native renderers),
    "checkpoint" (the tokenizer's `chat_template` through `apply_chat_template`, with the fallbacks and
    warnings of `templates.resolve_chat_format`), "auto" (by `config.model_type`) or a resolved `ChatFormat`;
    `tool_format` is the tool-call format its turns are parsed in (`play_episodes` reads it). Earlier
    assistant turns reuse the ids they were sampled as, so each prompt extends the previous prompt and its
    generated ids (with a checkpoint template: where the template writes the turn back as it was generated,
    followed by the end-of-turn token the model stopped on, and renders earlier turns unchanged). A prompt
    longer than `max_prompt_tokens` (default: the model's context minus `max_new_tokens`) is not generated
    from; its turn comes back with `prompt_too_long=True`.

    A call's conversations are generated in micro-batches (`plan_micro_batches`): each at most
    `max_batch_rows` conversations (None: no cap) and at most `max_batch_bytes` by the estimate
    `generate_bytes` (default `default_batch_bytes(data_sharding)` read at the first call: half the free
    device memory where JAX reports it, else 4 GiB). Repeated prompts share a micro-batch; turns come back
    in the caller's order. When everything fits the budget, a call is one `generate` call, as before.

    `temperature=0` is greedy: the tokens do not depend on how a call is split (the sampler masks padding
    out; log-probs may differ in the last float32 bits, so only a near-exact tie could flip a pick).
    Otherwise each call draws a fresh key from `seed`; a call that fits one micro-batch samples with that
    key exactly as an unsplit call does, and micro-batch k of a split call with `jax.random.fold_in(key, k)`.
    So the same seed, calls and budget give the same samples, but a different budget (hence split) gives
    different, equally distributed, samples.
    """

    def __init__(self, config: ModelConfig, params: Any, tokenizer: Any, *, template: str | ChatFormat = "qwen2.5",
                 enable_thinking: bool = False, max_new_tokens: int = 512, max_prompt_tokens: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, data_sharding: Any = None,
                 seed: int = 0, remembered_turns: int = 1 << 15, remembered_pieces: int = 1024,
                 max_batch_bytes: int | None = None, max_batch_rows: int | None = None) -> None:
        # Unknown names fail here, not in the middle of a rollout; a checkpoint template is probed once.
        self.chat_format = resolve_chat_format(template, tokenizer, model_type=config.model_type)
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
        if max_batch_bytes is not None and max_batch_bytes < 1:
            raise ValueError(f"max_batch_bytes must be >= 1 or None (the default budget), got {max_batch_bytes}")
        if max_batch_rows is not None and max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1 or None (no cap), got {max_batch_rows}")
        self.config = config
        self.params = params
        self._decode_weights = None  # made at the first call, reused by every later one (same params)
        self.tokenizer = tokenizer
        self.template = self.chat_format.name
        self.tool_format = self.chat_format.tool_format
        self.enable_thinking = enable_thinking
        self.max_new_tokens = int(max_new_tokens)
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.data_sharding = data_sharding
        # None: `default_batch_bytes`, taken when first needed (after the decode weights exist, so the free
        # memory it reads already excludes them).
        self._max_batch_bytes = None if max_batch_bytes is None else int(max_batch_bytes)
        self.max_batch_rows = None if max_batch_rows is None else int(max_batch_rows)
        self.stop_ids = tuple(stop_token_ids(tokenizer))
        self._stop_texts = tuple(tokenizer.decode([i], skip_special_tokens=False) for i in self.stop_ids)
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
        return self._encode(messages, tools)[0]

    def _encode(self, messages: Sequence[Mapping[str, Any]], tools: Any) -> tuple[list[int], str | None]:
        """(prompt ids, rendered text): the text only for checkpoint templates, where it keys generated ids."""
        if not self.chat_format.is_native:
            text = self.chat_format.render(messages, tools, enable_thinking=self.enable_thinking)
            return self._encode_rendered(text), text
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
        return ids, None

    def _encode_rendered(self, text: str) -> list[int]:
        """Ids of a prompt a checkpoint template rendered whole, reusing the ids of earlier generated turns.

        A generated turn starts after an occurrence of the generation prompt and runs to the first end-of-turn
        token text after it; it is reused when a turn generated after exactly that prompt text had exactly that
        text. Template text between turns is encoded as one piece, cut where generation started and stopped, so
        it encodes the same in every later prompt.
        """
        marker = self.chat_format.generation_prompt
        ids: list[int] = []
        start = 0
        cut = text.find(marker) if marker else -1
        while cut >= 0:
            begin = cut + len(marker)
            ends = [(text.find(stop, begin), stop) for stop in self._stop_texts if stop]
            ends = [(at, stop) for at, stop in ends if at >= 0]
            if not ends:
                break
            at, stop = min(ends)
            end = at + len(stop)
            reused = self._generated.get(_rendered_after(text[:begin], text[begin:end]))
            if reused is not None:
                ids.extend(self._encode_piece(text[start:begin]))
                ids.extend(reused)
                start = end
            cut = text.find(marker, end if reused is not None else begin)
        ids.extend(self._encode_piece(text[start:]))
        return ids

    @property
    def max_batch_bytes(self) -> int:
        """The memory budget of one micro-batch, in bytes (by `generate_bytes`)."""
        if self._max_batch_bytes is None:
            self._max_batch_bytes = int(default_batch_bytes(self.data_sharding))
        return self._max_batch_bytes

    def plan(self, prompts: Sequence[Sequence[int]]) -> list[MicroBatch]:
        """The micro-batches `prompts` (ids that fit `max_prompt_tokens`) would be generated in."""
        return plan_micro_batches(self.config, prompts, max_new_tokens=self.max_new_tokens,
                                  max_batch_bytes=self.max_batch_bytes, max_batch_rows=self.max_batch_rows)

    def __call__(self, conversations: Sequence[Conversation]) -> list[GeneratedTurn]:
        """The next assistant turn of every conversation, generated in micro-batches within the memory budget."""
        encoded = [self._encode(messages, tools) for messages, tools in conversations]
        prompts = [ids for ids, _ in encoded]
        turns: list[GeneratedTurn] = [
            GeneratedTurn("", prompt, [], [], truncated=False, prompt_too_long=True) for prompt in prompts
        ]
        fitting = [i for i, prompt in enumerate(prompts) if len(prompt) <= self.max_prompt_tokens]
        if not fitting:
            return turns
        self._rng, rng = jax.random.split(self._rng)
        if self._decode_weights is None:
            self._decode_weights = sampling.decode_weights(self.config, self.params)
        batches = self.plan([prompts[i] for i in fitting])
        for number, batch in enumerate(batches):
            rows = [fitting[j] for j in batch.rows]
            result = sampling.generate(
                self.config, self.params, [prompts[i] for i in rows], max_new_tokens=self.max_new_tokens,
                temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, stop_token_ids=self.stop_ids,
                rng=rng if len(batches) == 1 else jax.random.fold_in(rng, number), pad_id=self.pad_id,
                data_sharding=self.data_sharding, weights=self._decode_weights,
            )
            for i, tokens, logprobs, stopped in zip(rows, result.tokens, result.logprobs, result.stopped):
                turns[i] = self._turn(prompts[i], tokens, logprobs, stopped, encoded[i][1])
        return turns

    def _turn(self, prompt: list[int], tokens: list[int], logprobs: list[float], stopped: bool,
              prompt_text: str | None = None) -> GeneratedTurn:
        body = tokens[:-1] if stopped else tokens
        # Special tokens stay in the text: dropping one the model wrote would change its history.
        text = self.tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if stopped and prompt_text is None:
            # Both Qwen templates close an assistant turn's generated text with <|im_end|>.
            self._generated.put(_after(prompt, text + IM_END), tokens)
        elif stopped:
            end = self.tokenizer.decode(tokens[-1:], skip_special_tokens=False)
            self._generated.put(_rendered_after(prompt_text, text + end), tokens)
        return GeneratedTurn(text, prompt, list(tokens), list(logprobs), truncated=not stopped)
