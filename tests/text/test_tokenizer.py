"""The embedded default tokenizer and checkpoint tokenizer loading."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ftrl_jax.text import tokenizer as tokenizer_module
from ftrl_jax.text.chat import render_conversation
from ftrl_jax.text.tokenizer import (
    CONTROL_TOKENS,
    MARKUP_TOKENS,
    QWEN_SPECIAL_TOKENS,
    build_default_tokenizer,
    cache_root,
    default_corpus,
    default_tokenizer,
    load_tokenizer,
    special_token_ids,
    stop_token_ids,
)

DATA = Path(__file__).parent / "data"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CONVERSATION = [
    {"role": "user", "content": "Weather in Zürich on 2024-05-01?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
    },
    {"role": "tool", "content": '{"temp_c": 18.5}'},
    {"role": "assistant", "content": "It is 18.5 °C."},
]
SMALL_CORPUS = ["the weather in Paris is sunny", '{"name": "get_weather", "arguments": {"city": "Rome"}}'] * 20


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ftrl-cache")


@pytest.fixture(scope="module")
def tok(cache):
    return build_default_tokenizer(cache_dir=cache)


def test_size_and_special_tokens_are_single_tokens(tok):
    assert len(tok) == 4096
    ids = special_token_ids(tok)
    assert list(ids) == list(QWEN_SPECIAL_TOKENS)
    assert len(set(ids.values())) == len(QWEN_SPECIAL_TOKENS)
    for token, token_id in ids.items():
        assert tok.encode(token, add_special_tokens=False) == [token_id]
        assert tok.encode("x" + token + "y", add_special_tokens=False).count(token_id) == 1
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == ids["<|im_end|>"]
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == ids["<|endoftext|>"]
    assert stop_token_ids(tok) == [ids["<|im_end|>"], ids["<|endoftext|>"]]


def test_control_tokens_are_skipped_by_decoding_but_markup_is_kept(tok):
    text = "<|im_start|>assistant\n<think>\nhm\n</think>\n\n<tool_call>\n{}\n</tool_call><|im_end|><|endoftext|>"
    kept = tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=True)
    assert all(token not in kept for token in CONTROL_TOKENS)
    assert all(token in kept for token in MARKUP_TOKENS if "response" not in token)


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "  leading and trailing spaces \n\n\t tabs",
        '{"name": "convert", "arguments": {"amount": 12.5, "to": "EUR"}}',
        "Zürich, 東京, naïve café, emoji 🙂",
        "def f(x):\n    return x * 2\n",
        "2024-02-29T23:59:59Z",
    ],
)
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_numbers_split_into_digits_like_qwen(tok):
    assert tok.convert_ids_to_tokens(tok.encode("12345", add_special_tokens=False)) == list("12345")


def test_chat_template_is_qwen2_5_and_matches_our_renderer(tok):
    assert tok.chat_template == (DATA / "qwen2_5_chat_template.jinja").read_text()
    for add_generation_prompt in (True, False):
        rendered = tok.apply_chat_template(
            CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert rendered == render_conversation(CONVERSATION, TOOLS, add_generation_prompt=add_generation_prompt)
    ids = tok.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tok.decode(ids) == render_conversation(CONVERSATION, TOOLS)


def test_save_pretrained_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = render_conversation(CONVERSATION, TOOLS)
    assert reloaded.encode(text) == tok.encode(text)
    assert special_token_ids(reloaded) == special_token_ids(tok)
    assert (reloaded.eos_token, reloaded.pad_token) == (tok.eos_token, tok.pad_token)
    assert reloaded.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True) == text
    assert load_tokenizer(tmp_path).encode(text) == tok.encode(text)


def test_builds_are_byte_identical(tmp_path):
    first = build_default_tokenizer(SMALL_CORPUS, vocab_size=320, cache_dir=tmp_path / "a")
    second = build_default_tokenizer(SMALL_CORPUS, vocab_size=320, cache_dir=tmp_path / "b")
    (dir_a,) = (tmp_path / "a").iterdir()
    (dir_b,) = (tmp_path / "b").iterdir()
    assert dir_a.name == dir_b.name and dir_a.name.startswith("tokenizer-")
    files_a = sorted(p.name for p in dir_a.iterdir())
    assert files_a == sorted(p.name for p in dir_b.iterdir()) and "tokenizer.json" in files_a
    for name in files_a:
        assert (dir_a / name).read_bytes() == (dir_b / name).read_bytes(), name
    assert first.get_vocab() == second.get_vocab()


def test_default_corpus_is_deterministic_and_varied():
    corpus = default_corpus(20)
    assert corpus == default_corpus(20)
    assert corpus != default_corpus(20, seed=1)
    joined = "".join(corpus)
    for expected in ('"arguments": {', "<tool_call>", '"parameters": {"type": "object"', "<tool_response>", "?"):
        assert expected in joined
    assert any(char.isdigit() for char in joined)


def test_cache_is_reused_and_keyed_by_the_corpus(tmp_path, monkeypatch):
    build_default_tokenizer(SMALL_CORPUS, vocab_size=320, cache_dir=tmp_path)

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the cache holds this build")

    monkeypatch.setattr(tokenizer_module, "_train_bpe", no_training)
    cached = build_default_tokenizer(SMALL_CORPUS, vocab_size=320, cache_dir=tmp_path)
    assert cached.encode("the weather") == build_default_tokenizer(SMALL_CORPUS, 320, tmp_path).encode("the weather")
    with pytest.raises(AssertionError, match="trained again"):
        build_default_tokenizer(SMALL_CORPUS + ["one more line"], vocab_size=320, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="trained again"):
        build_default_tokenizer(SMALL_CORPUS, vocab_size=330, cache_dir=tmp_path)
    # The failed builds left no half-written directories behind.
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("tokenizer-")] == []
    assert len(list(tmp_path.iterdir())) == 1


def test_cache_root_and_default_tokenizer_follow_the_environment(cache, tok, monkeypatch):
    monkeypatch.setenv("FTRL_JAX_CACHE", str(cache))
    assert cache_root() == cache
    default_tokenizer.cache_clear()
    try:
        assert default_tokenizer() is default_tokenizer()
        assert default_tokenizer().get_vocab() == tok.get_vocab()
    finally:
        default_tokenizer.cache_clear()
    monkeypatch.delenv("FTRL_JAX_CACHE")
    assert cache_root() == Path.home() / ".cache" / "ftrl_jax"


NAME_CORPUS = [
    "Question: What is the capacity of Piarksael Stadium?",
    '{"name": "stadium_capacity_lookup", "arguments": {"stadium_name": "Piarksael Stadium"}}',
    '{"capacity": "82,347"} The river that flows through Quoskiosgreth is long.',
    "Piarksael Stadium holds many. Tell me the mayor of Quoskiosgreth.",
] * 30


def _name_ids(tok, text: str, name: str) -> list[int]:
    """The ids of the tokens that spell `name` inside `text` (checked against the offsets)."""
    encoding = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    start = text.index(name)
    ids = [i for i, (a, b) in zip(encoding["input_ids"], encoding["offset_mapping"])
           if start <= a and b <= start + len(name)]
    assert tok.decode(ids) == name, (text, tok.convert_ids_to_tokens(ids))
    return ids


def test_stable_names_pretokenizer_spells_a_name_the_same_everywhere(tmp_path):
    stable = build_default_tokenizer(NAME_CORPUS, vocab_size=400, cache_dir=tmp_path, pretokenizer="stable_names")
    contexts = ["capacity of Piarksael Stadium?", '"stadium_name": "Piarksael Stadium"}', "Piarksael Stadium holds"]
    spellings = {tuple(_name_ids(stable, text, "Piarksael Stadium")) for text in contexts}
    assert len(spellings) == 1
    # Under Qwen2's split the first word takes the space or quote before it: another token in each context.
    qwen2 = build_default_tokenizer(NAME_CORPUS, vocab_size=400, cache_dir=tmp_path, pretokenizer="qwen2")
    assert len({qwen2.encode(text, add_special_tokens=False)[0] for text in (" Piarksael", '"Piarksael')}) == 2
    assert qwen2.get_vocab() != stable.get_vocab()  # the pattern is part of the cache key
    for text in NAME_CORPUS[:4] + ["MixedCase words, digits 1234 and  two  spaces\n\nÜber ÄÖ"]:
        assert stable.decode(stable.encode(text, add_special_tokens=False)) == text
    # Lower-case words keep Qwen2's leading space: few extra tokens.
    assert stable.convert_ids_to_tokens(stable.encode(" the river", add_special_tokens=False)) == ["Ġthe", "Ġriver"]


def test_bad_build_arguments_are_reported(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_default_tokenizer(SMALL_CORPUS, vocab_size=100, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"texts\[1\] is int"):
        build_default_tokenizer(["ok", 3], vocab_size=300, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="texts is empty"):
        build_default_tokenizer([], vocab_size=300, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown pretokenizer 'gpt2'.*qwen2.*stable_names"):
        build_default_tokenizer(SMALL_CORPUS, vocab_size=300, cache_dir=tmp_path, pretokenizer="gpt2")


def test_load_tokenizer_reports_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_tokenizer(tmp_path / "does-not-exist")
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="weights.bin"):
        load_tokenizer(a_file)
    empty = tmp_path / "empty-checkpoint"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty-checkpoint"):
        load_tokenizer(empty)
