"""Tokenizers: loading a checkpoint's tokenizer, and the small embedded default tokenizer.

The default tokenizer lets the whole pipeline (environments, rollouts, rewards, training) run without
downloading a model: a byte-level BPE with the Qwen2 pre-tokenizer, trained offline with `tokenizers` on a
corpus this module generates (or one the caller passes), carrying the Qwen special tokens each as one token
and the Qwen2.5 chat template with tools, so `apply_chat_template` renders what Qwen2.5 would.

Builds are deterministic (the same corpus and parameters give the same files, byte for byte) and cached in
`$FTRL_JAX_CACHE` (default `~/.cache/ftrl_jax`) under `tokenizer-<hash of the build parameters>`; a cache
directory appears only complete, by an atomic rename.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import tokenizers
import transformers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ftrl_jax.text.chat import render_conversation

# Control tokens: special, skipped by `decode(..., skip_special_tokens=True)`.
CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Markup the model writes itself; kept by decoding (as in Qwen) so tool calls can be parsed from text.
MARKUP_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")
QWEN_SPECIAL_TOKENS = CONTROL_TOKENS + MARKUP_TOKENS
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# Tokens that end a generated turn, in checkpoints of the families this project uses.
_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")

# The Qwen2 pre-tokenizer: contractions, letter runs, single digits, punctuation runs, newlines, spaces.
QWEN2_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Like Qwen2's, except that a capitalized word never takes the space or punctuation mark before it: a name is then
# the same tokens after a space (in a question), after a quote (a JSON argument) or at the start of a text. Under
# the Qwen2 split, "Piarksael" is one token after a space and another after a quote, and copying a name from a
# question into a call means learning that mapping name by name; under this split it is a plain copy.
STABLE_NAMES_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{Ll}\p{L}*|\p{Lu}\p{L}*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# The pre-tokenizers the embedded tokenizer can be built with (`build_default_tokenizer(pretokenizer=...)`).
PRETOKENIZE_PATTERNS = {"qwen2": QWEN2_PRETOKENIZE_PATTERN, "stable_names": STABLE_NAMES_PRETOKENIZE_PATTERN}
MODEL_MAX_LENGTH = 32768
# Bump when the build recipe changes, so old cache entries are not reused.
_BUILD_FORMAT = 1

# The `chat_template` of Qwen/Qwen2.5-7B-Instruct (its public tokenizer configuration).
QWEN2_5_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


# ---- loading a checkpoint's tokenizer ----------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer in a local Hugging Face checkpoint directory (offline, no download)."""
    directory = Path(path).expanduser()
    if not directory.exists():
        raise FileNotFoundError(
            f"tokenizer directory {str(directory)!r} does not exist; pass a local Hugging Face checkpoint "
            "directory (with tokenizer.json / tokenizer_config.json), or use default_tokenizer()"
        )
    if not directory.is_dir():
        raise NotADirectoryError(f"tokenizer path {str(directory)!r} is a file; pass the checkpoint directory")
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # transformers raises many kinds here; all mean the same to the caller
        raise ValueError(
            f"could not load a tokenizer from {str(directory)!r} ({type(err).__name__}: {err}); the directory "
            "needs a readable tokenizer.json or tokenizer_config.json with its vocabulary files"
        ) from err


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of the Qwen special tokens the tokenizer has as single tokens (absent ones are left out)."""
    ids: dict[str, int] = {}
    for token in QWEN_SPECIAL_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            if tokenizer.convert_ids_to_tokens(token_id) == token:
                ids[token] = token_id
    return ids


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end a generated assistant turn: the eos token and the known end-of-turn tokens present."""
    ids: list[int] = []
    candidates = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(token) for token in _STOP_TOKENS]
    for token_id in candidates:
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


# ---- the generated default corpus --------------------------------------------------------------------

_FIRST_NAMES = (
    "Alice Bob Carol David Emma Frank Grace Henry Isabel Jack Karen Liam Maria Noah Olivia Peter Quinn Rachel "
    "Samuel Tina Umar Victor Wendy Xavier Yuki Zoe Ahmed Beatriz Chen Dmitri Elena Farah Giorgio Hana Ivan "
    "Jamal Keiko Lucas Mei Nadia Oscar Priya Rosa Sofia Thomas Valentina William"
).split()
_LAST_NAMES = (
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Wilson Anderson "
    "Thomas Taylor Moore Jackson Martin Lee Thompson White Harris Clark Lewis Robinson Walker Young Allen King "
    "Wright Scott Green Baker Adams Nelson Hill Campbell Mitchell Roberts Carter Phillips Evans Turner Torres"
).split()
_CITIES = (
    ("Paris", "France"), ("London", "United Kingdom"), ("Tokyo", "Japan"), ("New York", "United States"),
    ("Berlin", "Germany"), ("Madrid", "Spain"), ("Rome", "Italy"), ("Toronto", "Canada"), ("Sydney", "Australia"),
    ("Mumbai", "India"), ("Beijing", "China"), ("Seoul", "South Korea"), ("Cairo", "Egypt"), ("Lagos", "Nigeria"),
    ("Mexico City", "Mexico"), ("Buenos Aires", "Argentina"), ("Istanbul", "Turkey"), ("Moscow", "Russia"),
    ("Amsterdam", "Netherlands"), ("Stockholm", "Sweden"), ("Vienna", "Austria"), ("Zurich", "Switzerland"),
    ("Lisbon", "Portugal"), ("Dublin", "Ireland"), ("Singapore", "Singapore"), ("Bangkok", "Thailand"),
    ("Nairobi", "Kenya"), ("Lima", "Peru"), ("Oslo", "Norway"), ("Athens", "Greece"), ("Prague", "Czechia"),
    ("Warsaw", "Poland"), ("Helsinki", "Finland"), ("Jakarta", "Indonesia"), ("Manila", "Philippines"),
)
_MONTHS = (
    "January February March April May June July August September October November December"
).split()
_WORDS = (
    "account address airline airport album amount animal answer apartment apple area article artist author "
    "balance bank battery bill birthday book booking budget building bus business calendar camera capital car "
    "category channel chapter city climate coffee company computer concert contract country course currency "
    "customer date delivery department destination device director discount distance doctor document dollar "
    "employee energy event exchange experience factory file film flight food forecast game garden gift hotel "
    "house humidity income invoice island item journey language library license location machine manager map "
    "market meeting member menu message minute model month mountain movie museum music network newspaper "
    "number office order owner package park password patient payment percentage phone picture planet player "
    "population price product profile project property quantity question rate recipe record region report "
    "reservation restaurant result review river road room route salary schedule school score season seat "
    "server service shipment shop song speed sport station stock store street student subscription summary "
    "team temperature ticket time title total tournament train transaction user value vehicle version weather "
    "website week weight wind year zone"
).split()
_ADJECTIVES = (
    "available average best cheapest closest current daily direct early expensive fastest final first "
    "highest latest local lowest main monthly nearest new next oldest popular previous public recent "
    "remaining shortest total upcoming weekly"
).split()
_VERBS = (
    "book buy calculate cancel check compare convert count create delete estimate fetch find get list look "
    "order plan query rank recommend reserve retrieve schedule search send sort summarize track translate "
    "update validate verify"
).split()
_QUESTION_TEMPLATES = (
    "What is the {adj} {noun} in {city}?",
    "How many {noun}s did {name} {verb} on {date}?",
    "Can you {verb} the {adj} {noun} for {name} before {date}?",
    "What was the {noun} of {city}, {country} in {year}?",
    "Which {noun} has the {adj} {noun2} among the {number} {noun}s listed?",
    "I need to {verb} a {noun} from {city} to {city2} on {date}. What are my options?",
    "Please {verb} the {noun} with ID {ident} and tell me its {noun2}.",
    "If the {noun} costs ${money} and the {noun2} rate is {percent}%, what is the {adj} amount?",
    "Who is the {noun} of the {noun2} that {name} mentioned yesterday?",
    "Tell me the {adj} {noun} for {name} {last}, born on {date}.",
    "Compare the {noun} of {city} and {city2} for the {adj} {number} days.",
    "First find the {noun} of {name}, then use it to {verb} the {noun2}.",
)
_PARAM_TYPES = ("string", "integer", "number", "boolean")


def _pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up name (product names, usernames, codes) to give BPE varied merges."""
    onsets = ("b", "br", "c", "ch", "d", "f", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "pl", "qu", "r",
              "s", "sh", "st", "t", "tr", "v", "w", "z")
    vowels = ("a", "e", "i", "o", "u", "ai", "ea", "io", "ou")
    codas = ("", "", "n", "r", "s", "l", "m", "x", "nd", "rt", "st")
    return "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.randint(1, 3)))


def _date(rng: random.Random) -> str:
    year, month, day = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
    iso = f"{year:04d}-{month:02d}-{day:02d}"
    long_form = f"{_MONTHS[month - 1]} {day}, {year}"
    european = f"{day:02d}/{month:02d}/{year}"
    return rng.choice((iso, long_form, european))


def _snake(rng: random.Random) -> str:
    return rng.choice(_VERBS) + "_" + rng.choice(_ADJECTIVES) + "_" + rng.choice(_WORDS)


def _argument_value(rng: random.Random, kind: str) -> Any:
    makers = {
        "string": lambda: rng.choice([rng.choice(_CITIES)[0], rng.choice(_FIRST_NAMES), _date(rng), _pseudo_word(rng)]),
        "integer": lambda: rng.randint(0, 10 ** rng.randint(1, 7)),
        "number": lambda: round(rng.uniform(-1000, 100000), rng.randint(1, 4)),
        "boolean": lambda: rng.random() < 0.5,
    }
    return makers[kind]()


def _tool_schema(rng: random.Random) -> dict[str, Any]:
    params = {}
    for _ in range(rng.randint(1, 4)):
        params[rng.choice(_WORDS) + rng.choice(["", "_id", "_name", "_date", "_count"])] = {
            "type": rng.choice(_PARAM_TYPES),
            "description": f"The {rng.choice(_ADJECTIVES)} {rng.choice(_WORDS)} to {rng.choice(_VERBS)}.",
        }
    return {
        "type": "function",
        "function": {
            "name": _snake(rng),
            "description": f"{rng.choice(_VERBS).capitalize()} the {rng.choice(_ADJECTIVES)} {rng.choice(_WORDS)} "
            f"of a {rng.choice(_WORDS)} and return its {rng.choice(_WORDS)}.",
            "parameters": {"type": "object", "properties": params, "required": sorted(params)[:1]},
        },
    }


def _question(rng: random.Random) -> str:
    (city, country), (city2, _) = rng.choice(_CITIES), rng.choice(_CITIES)
    slots = {
        "adj": rng.choice(_ADJECTIVES), "noun": rng.choice(_WORDS), "noun2": rng.choice(_WORDS),
        "verb": rng.choice(_VERBS), "city": city, "city2": city2, "country": country,
        "name": rng.choice(_FIRST_NAMES), "last": rng.choice(_LAST_NAMES), "date": _date(rng),
        "year": rng.randint(1900, 2030), "number": rng.randint(2, 50), "money": f"{rng.uniform(1, 9999):.2f}",
        "percent": rng.randint(1, 99), "ident": f"{_pseudo_word(rng).upper()[:3]}-{rng.randint(1000, 99999)}",
    }
    return rng.choice(_QUESTION_TEMPLATES).format(**slots)


def _tool_result(rng: random.Random) -> dict[str, Any]:
    return {
        rng.choice(_WORDS): _argument_value(rng, rng.choice(_PARAM_TYPES)),
        rng.choice(_WORDS): [_pseudo_word(rng).capitalize() for _ in range(rng.randint(1, 3))],
        "status": rng.choice(["ok", "success", "not_found", "error"]),
    }


def _conversation(rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    tools = [_tool_schema(rng) for _ in range(rng.randint(1, 4))]
    messages: list[dict[str, Any]] = [{"role": "user", "content": _question(rng)}]
    for _ in range(rng.randint(0, 2)):
        chosen = [rng.choice(tools) for _ in range(rng.randint(1, 3))]
        calls = []
        for tool in chosen:
            props = tool["function"]["parameters"]["properties"]
            args = {key: _argument_value(rng, spec["type"]) for key, spec in props.items()}
            calls.append({"type": "function", "function": {"name": tool["function"]["name"], "arguments": args}})
        messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        messages.extend({"role": "tool", "content": json.dumps(_tool_result(rng))} for _ in calls)
    answer = f"The {rng.choice(_ADJECTIVES)} {rng.choice(_WORDS)} is {_argument_value(rng, 'number')} ({_date(rng)})."
    messages.append({"role": "assistant", "content": answer})
    return messages, tools


def default_corpus(num_documents: int = 800, seed: int = 0) -> list[str]:
    """English-like questions, JSON tool schemas and calls, numbers, names and dates, as rendered chats.

    Deterministic for a given `(num_documents, seed)`.
    """
    rng = random.Random(seed)
    corpus = []
    for _ in range(num_documents):
        messages, tools = _conversation(rng)
        corpus.append(render_conversation(messages, tools, add_generation_prompt=False))
        corpus.append(" ".join(_pseudo_word(rng) for _ in range(rng.randint(5, 30))))
    return corpus


# ---- building and caching ----------------------------------------------------------------------------


def cache_root() -> Path:
    """Where built tokenizers are cached: `$FTRL_JAX_CACHE`, else `~/.cache/ftrl_jax`."""
    return Path(os.environ.get("FTRL_JAX_CACHE") or Path.home() / ".cache" / "ftrl_jax").expanduser()


def _checked_texts(texts: Iterable[str]) -> list[str]:
    checked = []
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{index}] is {type(text).__name__}, not str; the corpus must be strings")
        checked.append(text)
    if not any(checked):
        raise ValueError("texts is empty; pass some training text, or None for the generated default corpus")
    return checked


def _build_key(texts: list[str], vocab_size: int, pattern: str) -> str:
    """A hash of everything that decides the built files."""
    digest = hashlib.sha256()
    recipe = {
        "format": _BUILD_FORMAT,
        "vocab_size": vocab_size,
        "control_tokens": CONTROL_TOKENS,
        "markup_tokens": MARKUP_TOKENS,
        "pattern": pattern,
        "chat_template": QWEN2_5_CHAT_TEMPLATE,
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
    }
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    for text in texts:
        encoded = text.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()[:16]


def byte_level_pipeline(tokenizer: tokenizers.Tokenizer, pattern: str = QWEN2_PRETOKENIZE_PATTERN
                        ) -> tokenizers.Tokenizer:
    """Sets Qwen2's text pipeline on a BPE `tokenizer` (in place; returned for chaining): NFC, the split
    `pattern` (default Qwen2's), byte-level mapping without a prefix space, byte-level decoding."""
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tokenizer


def _train_bpe(texts: list[str], vocab_size: int, pattern: str) -> tokenizers.Tokenizer:
    """Trains the byte-level BPE and appends the special tokens, so `len(tokenizer) <= vocab_size`."""
    tokenizer = byte_level_pipeline(tokenizers.Tokenizer(models.BPE()), pattern)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN_SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in CONTROL_TOKENS])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in MARKUP_TOKENS])
    return tokenizer


def _wrap(tokenizer: tokenizers.Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=QWEN2_5_CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def build_default_tokenizer(
    texts: Iterable[str] | None = None,
    vocab_size: int = 4096,
    cache_dir: str | os.PathLike | None = None,
    pretokenizer: str = "qwen2",
) -> PreTrainedTokenizerBase:
    """Builds (or loads from the cache) the embedded byte-level BPE tokenizer.

    `texts` is the training corpus (None: `default_corpus()`); `vocab_size` counts the special tokens, so
    `len(tokenizer) <= vocab_size` (equal unless the corpus runs out of merges); `cache_dir` is the cache
    root (None: `cache_root()`); `pretokenizer` names the split applied before BPE, a key of
    `PRETOKENIZE_PATTERNS`: "qwen2" (Qwen2's) or "stable_names" (a capitalized word is the same tokens wherever
    it appears). The result is always loaded from the cache directory, so a fresh build and a cache hit return
    the same tokenizer. Raises ValueError for a vocabulary too small, an unknown pre-tokenizer or a bad corpus.
    """
    minimum = 256 + len(QWEN_SPECIAL_TOKENS) + 1
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small; byte-level BPE needs at least {minimum}")
    if pretokenizer not in PRETOKENIZE_PATTERNS:
        raise ValueError(f"unknown pretokenizer {pretokenizer!r}; choose one of {sorted(PRETOKENIZE_PATTERNS)}")
    pattern = PRETOKENIZE_PATTERNS[pretokenizer]
    corpus = default_corpus() if texts is None else _checked_texts(texts)
    name = f"tokenizer-{_build_key(corpus, vocab_size, pattern)}"
    return load_cached_build(name, lambda: _wrap(_train_bpe(corpus, vocab_size, pattern)), cache_dir)


def load_cached_build(name: str, build: Callable[[], PreTrainedTokenizerBase],
                      cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer cached as `name` under `cache_dir` (None: `cache_root()`), built with `build()` first if
    absent. The directory appears only complete (an atomic rename), so concurrent builders are safe; the
    result is always loaded from the cache, so a fresh build and a cache hit return the same tokenizer."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    target = root / name
    if not target.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-building-", dir=root))
        try:
            build().save_pretrained(str(staging))
            try:
                os.rename(staging, target)
            except OSError:
                if not target.is_dir():
                    raise
                # Another process finished the same build first; its files are identical.
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return load_tokenizer(target)


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> PreTrainedTokenizerBase:
    """The default embedded tokenizer (generated corpus, 4096 tokens), built once per process."""
    return build_default_tokenizer()
