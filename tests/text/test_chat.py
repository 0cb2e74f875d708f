"""Our Qwen chat rendering against the real Qwen2.5 / Qwen3 Jinja templates, rendered by transformers."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import tokenizers
from transformers import PreTrainedTokenizerFast

from ftrl_jax.text.chat import (
    TEMPLATES,
    assistant_message_from_turn,
    encode_segments,
    render_conversation,
    render_segments,
    tool_message,
)
from ftrl_jax.text.tokenizer import build_default_tokenizer
from ftrl_jax.text.tool_calls import format_qwen_tool_call

DATA = Path(__file__).parent / "data"
REFERENCE_TEMPLATES = {
    "qwen2.5": (DATA / "qwen2_5_chat_template.jinja").read_text(),
    "qwen3": (DATA / "qwen3_chat_template.jinja").read_text(),
}
FTRL_TEST_SET = Path(__file__).resolve().parents[2] / ".." / "shared" / "benchdata" / "ftrl_test.parquet"


@pytest.fixture(scope="module")
def jinja_host():
    """A bare tokenizer whose only job is running transformers' chat-template renderer."""
    vocab = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=vocab, unk_token="<unk>")


def reference(host, template, messages, tools, add_generation_prompt, enable_thinking):
    return host.apply_chat_template(
        copy.deepcopy(messages),
        tools=copy.deepcopy(tools),
        chat_template=REFERENCE_TEMPLATES[template],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
    )


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name, e.g. Zürich"}},
            "required": ["city"],
        },
    },
}
CONVERT = {
    "type": "function",
    "function": {
        "name": "convert_currency",
        "description": "Convert an amount between currencies <fast>.",
        "parameters": {
            "type": "object",
            "properties": {"amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
            "required": ["amount", "from", "to"],
        },
    },
}


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


CASES = {
    "user_only": ([{"role": "user", "content": "Hello!"}], None),
    "system_user": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], None),
    "multi_turn_no_tools": (
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6"},
        ],
        None,
    ),
    "tools_no_system": ([{"role": "user", "content": "Weather in Paris?"}], [WEATHER]),
    "tools_empty_list": ([{"role": "user", "content": "Weather in Paris?"}], []),
    "tools_with_system_one_call": (
        [
            {"role": "system", "content": "You are a travel agent."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"})]},
            {"role": "tool", "name": "get_weather", "content": '{"temp_c": 21, "sky": "clear"}'},
            {"role": "assistant", "content": "It is 21 °C and clear in Paris."},
        ],
        [WEATHER, CONVERT],
    ),
    "parallel_calls_grouped_responses": (
        [
            {"role": "user", "content": "Weather in Tokyo and 100 USD in EUR?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    call("get_weather", {"city": "東京"}),
                    call("convert_currency", {"amount": 100, "from": "USD", "to": "EUR"}),
                    call("get_weather", {"city": "Osaka"}),
                ],
            },
            {"role": "tool", "content": "sunny"},
            {"role": "tool", "content": "92.5"},
            {"role": "tool", "content": "rain"},
            {"role": "assistant", "content": "Tokyo is sunny, 100 USD is 92.5 EUR, Osaka has rain."},
        ],
        [WEATHER, CONVERT],
    ),
    "string_arguments": (
        [
            {"role": "user", "content": "Convert 5 GBP to JPY"},
            {"role": "assistant", "content": "", "tool_calls": [call("convert_currency", '{"amount": 5, "from": "GBP", "to": "JPY"}')]},
            {"role": "tool", "content": "1050"},
        ],
        [CONVERT],
    ),
    "content_and_calls": (
        [
            {"role": "user", "content": "Weather in Rome?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [call("get_weather", {"city": "Rome"})]},
            {"role": "tool", "content": "hot"},
        ],
        [WEATHER],
    ),
    "bare_call_format": (
        [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]},
            {"role": "tool", "content": "cold"},
        ],
        [WEATHER],
    ),
    "calls_as_markup_in_content": (
        [
            {"role": "user", "content": "Weather in Lima?"},
            {"role": "assistant", "content": format_qwen_tool_call("get_weather", {"city": "Lima"})},
            {"role": "tool", "content": "mild"},
            {"role": "assistant", "content": "Mild."},
        ],
        [WEATHER],
    ),
    "system_in_the_middle": (
        [
            {"role": "user", "content": "Hi"},
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello again"},
        ],
        None,
    ),
    "tool_first_and_last": ([{"role": "tool", "content": "orphan result"}], [WEATHER]),
    "reasoning_content_multi_step": (
        [
            {"role": "user", "content": "Weather in Cairo, then convert 10 EGP to USD."},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "\nI should get the weather first.\n",
                "tool_calls": [call("get_weather", {"city": "Cairo"})],
            },
            {"role": "tool", "content": "hot"},
            {
                "role": "assistant",
                "content": "\nNow the conversion.",
                "reasoning_content": "Weather done.",
                "tool_calls": [call("convert_currency", {"amount": 10, "from": "EGP", "to": "USD"})],
            },
            {"role": "tool", "content": "0.2"},
            {"role": "assistant", "content": "Hot; 10 EGP is 0.2 USD.", "reasoning_content": ""},
        ],
        [WEATHER, CONVERT],
    ),
    "think_inline_in_history": (
        [
            {"role": "user", "content": "First question"},
            {"role": "assistant", "content": "<think>\nold thoughts\n</think>\n\nFirst answer"},
            {"role": "user", "content": "Second question"},
            {"role": "assistant", "content": "<think>new thoughts</think>Second answer"},
        ],
        None,
    ),
    "intermediate_turn_without_reasoning": (
        [
            {"role": "user", "content": "Weather in Lagos?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [call("get_weather", {"city": "Lagos"})]},
            {"role": "tool", "content": "humid"},
            {"role": "assistant", "content": "Humid."},
        ],
        [WEATHER],
    ),
    "wrapped_tool_response_user_turn": (
        [
            {"role": "user", "content": "Weather in Seoul?"},
            {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Seoul"})]},
            {"role": "user", "content": "<tool_response>\nwindy\n</tool_response>"},
            {"role": "assistant", "content": "Windy.", "reasoning": "The tool said windy."},
        ],
        [WEATHER],
    ),
    "nested_arguments": (
        [
            {"role": "user", "content": "Book it"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    call("book", {"guests": [{"name": "Zoë", "age": 7}], "vip": True, "note": None, "price": 12.5}),
                    call("noop", {}),
                ],
            },
        ],
        [WEATHER],
    ),
    "assistant_last_tool_calls_only": (
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Nairobi"})]},
        ],
        [WEATHER],
    ),
}

CASE_IDS = sorted(CASES)


def random_conversation(rng: random.Random) -> tuple[list[dict], list[dict] | None]:
    """A conversation mixing every feature the templates treat specially."""
    tools = rng.choice([None, [WEATHER], [WEATHER, CONVERT]])
    messages: list[dict] = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(["Be helpful.", "Système: réponds en français.", ""])})
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": rng.choice(["Weather in Lima?", "Convert 3 USD", "多少钱?", " spaced "])})
        for _ in range(rng.randint(0, 2)):
            calls = []
            for _ in range(rng.randint(1, 3)):
                args = rng.choice([{"city": "Lima"}, {"amount": rng.randint(0, 99), "from": "USD", "to": "EUR"}, {}])
                args = json.dumps(args) if rng.random() < 0.3 else args
                calls.append(call(rng.choice(["get_weather", "convert_currency"]), args))
            message = {"role": "assistant", "content": rng.choice(["", "Let me check.", "\nOn it."]), "tool_calls": calls}
            if rng.random() < 0.4:
                message["reasoning_content"] = rng.choice(["", "plan: call tools", "\nthink\n"])
            messages.append(message)
            messages.extend({"role": "tool", "content": rng.choice(["42", '{"ok": true}', "é"])} for _ in calls)
        final = {"role": "assistant", "content": rng.choice(["Done.", "<think>\nhmm\n</think>\n\nDone!", "Answer: 7"])}
        if rng.random() < 0.3:
            final["reasoning_content"] = "final reasoning"
        if rng.random() < 0.8:
            messages.append(final)
    return messages, tools


RANDOM_CASES = [random_conversation(random.Random(seed)) for seed in range(40)]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("enable_thinking", [True, False])
@pytest.mark.parametrize("case", CASE_IDS)
def test_render_matches_real_template(jinja_host, template, add_generation_prompt, enable_thinking, case):
    messages, tools = CASES[case]
    ours = render_conversation(
        messages, tools, template=template, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
    )
    assert ours == reference(jinja_host, template, messages, tools, add_generation_prompt, enable_thinking)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_render_matches_real_template_on_random_conversations(jinja_host, template):
    for messages, tools in RANDOM_CASES:
        for add_generation_prompt in (True, False):
            for enable_thinking in (True, False):
                ours = render_conversation(
                    messages,
                    tools,
                    template=template,
                    add_generation_prompt=add_generation_prompt,
                    enable_thinking=enable_thinking,
                )
                expected = reference(jinja_host, template, messages, tools, add_generation_prompt, enable_thinking)
                assert ours == expected, json.dumps(messages, ensure_ascii=False)


def test_render_matches_real_template_on_ftrl_test_set(jinja_host):
    if not FTRL_TEST_SET.exists():
        pytest.skip(f"{FTRL_TEST_SET} is absent")
    pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
    rows = pyarrow_parquet.read_table(FTRL_TEST_SET, columns=["messages", "tools"]).to_pylist()
    for row in rows[::20]:
        for template in TEMPLATES:
            ours = render_conversation(row["messages"], row["tools"], template=template)
            expected = reference(jinja_host, template, row["messages"], json.loads(row["tools"]), True, True)
            assert ours == expected


def test_qwen2_5_specifics():
    text = render_conversation([{"role": "user", "content": "Hi"}], [WEATHER])
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n")
    assert "<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n</tools>" in text
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # tojson on an already-encoded string: the arguments become a quoted JSON string.
    string_args = render_conversation(CASES["string_arguments"][0], [CONVERT])
    assert '"arguments": "{\\"amount\\": 5' in string_args


def test_qwen3_specifics():
    prompt = render_conversation([{"role": "user", "content": "Hi"}], template="qwen3", enable_thinking=False)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    messages = CASES["think_inline_in_history"][0]
    text = render_conversation(messages, template="qwen3", add_generation_prompt=False)
    assert "old thoughts" not in text  # history before the last query loses its thinking
    assert text.endswith("<|im_start|>assistant\n<think>\nnew thoughts\n</think>\n\nSecond answer<|im_end|>\n")
    string_args = render_conversation(CASES["string_arguments"][0], [CONVERT], template="qwen3")
    assert '"arguments": {"amount": 5, "from": "GBP", "to": "JPY"}}' in string_args


def test_tools_as_json_string_equal_tools_as_list():
    messages = [{"role": "user", "content": "Hi"}]
    assert render_conversation(messages, json.dumps([WEATHER])) == render_conversation(messages, [WEATHER])


ALL_CASES = [CASES[name] for name in CASE_IDS] + RANDOM_CASES


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("enable_thinking", [True, False])
def test_segments_join_to_the_rendering_and_alternate(template, enable_thinking):
    for messages, tools in ALL_CASES:
        segments = render_segments(messages, tools, template=template, enable_thinking=enable_thinking)
        joined = "".join(text for text, _ in segments)
        assert joined == render_conversation(messages, tools, template=template, add_generation_prompt=False)
        assert all(text for text, _ in segments)
        assert all(a[1] != b[1] for a, b in zip(segments, segments[1:]))
        generated = [text for text, flag in segments if flag]
        assert len(generated) == sum(m["role"] == "assistant" for m in messages)
        for text in generated:
            assert text.endswith("<|im_end|>")
            assert not text.startswith("<|im_start|>")
            assert "<tool_response>" not in text and "<|im_start|>" not in text


def last_query_index(messages):
    for index in range(len(messages) - 1, -1, -1):
        content = messages[index]["content"]
        if messages[index]["role"] == "user" and not (
            content.startswith("<tool_response>") and content.endswith("</tool_response>")
        ):
            return index
    return len(messages) - 1


def has_reasoning(message):
    given = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if message.get(k) is not None), None)
    if isinstance(given, str):
        return bool(given.strip("\n"))
    return "</think>" in (message.get("content") or "")


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("enable_thinking", [True, False])
def test_generated_segments_start_where_the_generation_prompt_ends(template, enable_thinking):
    """Prompt for turn k + generated piece k is exactly how the full conversation renders turn k."""
    checked = 0
    for messages, tools in ALL_CASES:
        segments = render_segments(messages, tools, template=template, enable_thinking=enable_thinking)
        starts, offset = [], 0
        for text, generated in segments:
            if generated:
                starts.append(offset)
            offset += len(text)
        full = "".join(text for text, _ in segments)
        assistant_indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for k, start in zip(assistant_indices, starts):
            message = messages[k]
            if k == 0 or messages[k - 1]["role"] == "assistant":
                continue  # the templates treat back-to-back assistant turns differently as prefixes
            if template == "qwen3":
                if k <= last_query_index(messages):
                    continue  # Qwen3 drops thinking from history by design
                is_last = k == len(messages) - 1
                # Without thinking the prompt ends in an empty think block, which Qwen3 keeps only on the
                # last turn, and only a turn without reasoning can follow it.
                if not enable_thinking and (not is_last or has_reasoning(message)):
                    continue
            prompt = render_conversation(
                messages[:k], tools, template=template, add_generation_prompt=True, enable_thinking=enable_thinking
            )
            assert full[:start] == prompt
            checked += 1
    assert checked >= 10


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    texts = [render_conversation(m, t, add_generation_prompt=False) for m, t in ALL_CASES]
    return build_default_tokenizer(texts, vocab_size=600, cache_dir=tmp_path_factory.mktemp("tok-cache"))


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_encode_segments_decodes_back_and_masks_only_generated_text(small_tokenizer, template):
    for messages, tools in ALL_CASES[:30]:
        segments = render_segments(messages, tools, template=template)
        ids, mask = encode_segments(small_tokenizer, segments)
        assert len(ids) == len(mask) > 0
        assert set(mask) <= {0, 1}
        assert small_tokenizer.decode(ids) == "".join(text for text, _ in segments)
        masked = small_tokenizer.decode([i for i, m in zip(ids, mask) if m])
        assert masked == "".join(text for text, flag in segments if flag)
        im_end = small_tokenizer.convert_tokens_to_ids("<|im_end|>")
        # Every assistant turn's closing <|im_end|> is trained on; the others are not.
        assert sum(1 for i, m in zip(ids, mask) if i == im_end and m) == sum(
            msg["role"] == "assistant" for msg in messages
        )


def test_assistant_message_round_trips_through_the_template():
    turn = (
        "I'll look both up.\n"
        + format_qwen_tool_call("get_weather", {"city": "Paris"})
        + "\n"
        + format_qwen_tool_call("convert_currency", {"amount": 3.5, "from": "EUR", "to": "USD"})
        + "<|im_end|>"
    )
    message = assistant_message_from_turn(turn)
    assert message["role"] == "assistant"
    assert message["content"] == "I'll look both up."
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "convert_currency"]
    assert message["tool_calls"][1]["function"]["arguments"] == {"amount": 3.5, "from": "EUR", "to": "USD"}
    messages = [{"role": "user", "content": "q"}, message]
    generated = [text for text, flag in render_segments(messages, [WEATHER, CONVERT]) if flag]
    assert generated == [turn]


def test_assistant_message_keeps_qwen3_reasoning():
    turn = "<think>\nNeed the weather.\n</think>\n\n" + format_qwen_tool_call("get_weather", {"city": "Oslo"})
    message = assistant_message_from_turn(turn)
    assert message["reasoning_content"] == "Need the weather."
    assert message["content"] == ""
    messages = [{"role": "user", "content": "q"}, message]
    generated = [text for text, flag in render_segments(messages, [WEATHER], template="qwen3") if flag]
    assert generated == [turn + "<|im_end|>"]


def test_assistant_message_without_calls_and_with_broken_markup():
    assert assistant_message_from_turn("Just text.") == {"role": "assistant", "content": "Just text."}
    broken = assistant_message_from_turn('<tool_call>{"name": "f", "arguments": {</tool_call>')
    assert "tool_calls" not in broken


def test_assistant_message_from_llama_turn():
    message = assistant_message_from_turn('{"name": "get_weather", "parameters": {"city": "Rome"}}', fmt="llama3")
    assert message["tool_calls"] == [call("get_weather", {"city": "Rome"})]


def test_tool_message():
    assert tool_message("f", "ok") == {"role": "tool", "name": "f", "content": "ok"}
    assert tool_message("f", {"temp": 3, "city": "Zürich"})["content"] == '{"temp": 3, "city": "Zürich"}'
    with pytest.raises(TypeError, match="'f'"):
        tool_message("f", object())


@pytest.mark.parametrize(
    "messages, tools, match",
    [
        ([], None, "empty"),
        ([{"role": "robot", "content": "x"}], None, r"messages\[0\].*'robot'"),
        ([{"role": "user", "content": ["a", "b"]}], None, r"messages\[0\].*string"),
        ([{"role": "user"}], None, r"messages\[0\].*content"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"arguments": {}}}]}], None, "name"),
        ([{"role": "assistant", "content": "", "tool_calls": [call("f", 3)]}], None, "arguments"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}], None, "no 'arguments'"),
        ([{"role": "user", "content": "x", "tool_calls": [call("f", {})]}], None, "only assistant"),
        ([{"role": "user", "content": "x"}], {"not": "a list"}, "tools"),
        ([{"role": "user", "content": "x"}], ["get_weather"], r"tools\[0\]"),
        ([{"role": "user", "content": "x"}], "[not json", "JSON"),
    ],
)
def test_bad_input_is_reported(messages, tools, match):
    with pytest.raises(ValueError, match=match):
        render_conversation(messages, tools)


def test_unknown_template_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"'qwen2\.5', 'qwen3'"):
        render_conversation([{"role": "user", "content": "x"}], template="llama")
    with pytest.raises(ValueError, match="qwen3"):
        render_segments([{"role": "user", "content": "x"}], template="chatml")
