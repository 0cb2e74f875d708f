"""Parsing generated assistant turns: Qwen `<tool_call>` blocks, Llama 3.1 JSON calls, `<think>` blocks."""

from __future__ import annotations

import json

import pytest

from ftrl_jax.text.tool_calls import (
    ParsedTurn,
    ToolCall,
    format_qwen_tool_call,
    parse_assistant_turn,
    parse_llama_turn,
    parse_qwen_turn,
    split_reasoning,
    strip_end_markers,
)


def block(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call>"


# ---- Qwen format -----------------------------------------------------------------------------------


def test_plain_text_has_no_calls():
    parsed = parse_assistant_turn("The answer is 42.<|im_end|>")
    assert parsed == ParsedTurn(content="The answer is 42.", tool_calls=[], malformed=False)


def test_one_call():
    parsed = parse_assistant_turn(block('{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}'))
    assert parsed.tool_calls == [ToolCall("get_weather", {"city": "Paris", "days": 3})]
    assert parsed.content == ""
    assert not parsed.malformed and parsed.errors == ()


def test_several_calls_with_text_around_them():
    text = (
        "I'll check both.\n"
        + block('{"name": "a", "arguments": {"x": 1}}')
        + "\n"
        + block('{"name": "b", "arguments": {"y": [1, 2, {"z": null}]}}')
        + "\nThen I will answer."
    )
    parsed = parse_assistant_turn(text)
    assert [c.name for c in parsed.tool_calls] == ["a", "b"]
    assert parsed.tool_calls[1].arguments == {"y": [1, 2, {"z": None}]}
    assert parsed.content == "I'll check both.\nThen I will answer."
    assert not parsed.malformed


def test_blocks_without_newlines_and_with_extra_spaces():
    parsed = parse_assistant_turn('<tool_call>  {"name":"f","arguments":{}}  </tool_call><tool_call>{"name": "g"}</tool_call>')
    assert parsed.tool_calls == [ToolCall("f", {}), ToolCall("g", {})]
    assert not parsed.malformed


@pytest.mark.parametrize(
    "arguments, expected",
    [
        ('"{\\"city\\": \\"Rome\\"}"', {"city": "Rome"}),  # JSON string holding an object
        ('""', {}),
        ("null", {}),
        ('{"nested": {"deep": [true, false]}}', {"nested": {"deep": [True, False]}}),
    ],
)
def test_argument_forms_that_are_accepted(arguments, expected):
    parsed = parse_assistant_turn(block('{"name": "f", "arguments": ' + arguments + "}"))
    assert parsed.tool_calls == [ToolCall("f", expected)]
    assert not parsed.malformed


def test_parameters_key_is_accepted_as_arguments():
    parsed = parse_assistant_turn(block('{"name": "f", "parameters": {"k": "v"}}'))
    assert parsed.tool_calls == [ToolCall("f", {"k": "v"})]


@pytest.mark.parametrize(
    "body, reason",
    [
        ('{"name": "f", "arguments": {"x": 1}', "not valid JSON"),
        ('{"name": "f", "arguments": {"x": 1}}}', "not valid JSON"),
        ("{'name': 'f', 'arguments': {}}", "not valid JSON"),
        ('{"arguments": {"x": 1}}', "'name'"),
        ('{"name": "", "arguments": {}}', "'name'"),
        ('{"name": 7, "arguments": {}}', "'name'"),
        ('{"name": "f", "arguments": [1, 2]}', "must be a JSON object"),
        ('{"name": "f", "arguments": "not json"}', "arguments string is not valid JSON"),
        ('{"name": "f", "arguments": "[1]"}', "must be a JSON object"),
        ('[{"name": "f", "arguments": {}}]', "expected a JSON object"),
        ("", "not valid JSON"),
    ],
)
def test_broken_blocks_are_not_calls_and_are_reported(body, reason):
    parsed = parse_assistant_turn("Before. " + block(body))
    assert parsed.tool_calls == []
    assert parsed.malformed
    assert len(parsed.errors) == 1 and reason in parsed.errors[0] and "block 1" in parsed.errors[0]
    assert parsed.content == "Before."


def test_a_broken_block_does_not_hide_the_good_ones():
    text = block('{"name": "good", "arguments": {}}') + block("{oops") + block('{"name": "also_good", "arguments": {}}')
    parsed = parse_assistant_turn(text)
    assert [c.name for c in parsed.tool_calls] == ["good", "also_good"]
    assert parsed.malformed and "block 2" in parsed.errors[0]


def test_unterminated_and_stray_tags_are_malformed():
    # A complete call whose </tool_call> is missing is recovered (and flagged); see the recovery tests below.
    missing_close = parse_assistant_turn('Checking.\n<tool_call>\n{"name": "f", "arguments": {}}')
    assert missing_close.tool_calls == [ToolCall("f", {})] and missing_close.malformed
    assert "no closing </tool_call>" in missing_close.errors[0]
    cut_off = parse_assistant_turn('Checking.\n<tool_call>\n{"name": "f", "arguments": {"x": 1')
    assert cut_off.tool_calls == [] and cut_off.malformed
    assert "unterminated" in cut_off.errors[0]
    stray = parse_assistant_turn('{"name": "f"}</tool_call>')
    assert stray.tool_calls == [] and stray.malformed and "without a matching" in stray.errors[0]


def test_end_markers_are_stripped():
    assert strip_end_markers("hi <|im_end|>\n<|endoftext|>  ") == "hi"
    assert strip_end_markers("<|im_end|> in the middle stays") == "<|im_end|> in the middle stays"
    parsed = parse_assistant_turn(block('{"name": "f", "arguments": {}}') + "<|im_end|><|endoftext|>")
    assert parsed.tool_calls == [ToolCall("f", {})] and parsed.content == ""


def test_unicode_arguments():
    parsed = parse_assistant_turn(block('{"name": "f", "arguments": {"city": "Zürich", "q": "東京"}}'))
    assert parsed.tool_calls[0].arguments == {"city": "Zürich", "q": "東京"}


@pytest.mark.parametrize(
    "name, arguments",
    [("get_weather", {"city": "Paris"}), ("noop", {}), ("f", {"list": [1, 2.5, None, True], "s": 'quote " and }'})],
)
def test_format_then_parse_round_trips(name, arguments):
    parsed = parse_assistant_turn(format_qwen_tool_call(name, arguments))
    assert parsed.tool_calls == [ToolCall(name, arguments)]


def test_format_matches_the_chat_template_layout():
    assert format_qwen_tool_call("f", {"a": "é"}) == '<tool_call>\n{"name": "f", "arguments": {"a": "é"}}\n</tool_call>'


# ---- reasoning ---------------------------------------------------------------------------------------


def test_think_block_is_split_off_and_calls_inside_it_are_ignored():
    text = (
        "<think>\nMaybe " + block('{"name": "draft", "arguments": {}}') + " first.\n</think>\n\n"
        "Calling.\n" + block('{"name": "real", "arguments": {"n": 1}}')
    )
    parsed = parse_assistant_turn(text)
    assert parsed.reasoning.startswith("Maybe <tool_call>") and parsed.reasoning.endswith("first.")
    assert parsed.tool_calls == [ToolCall("real", {"n": 1})]
    assert parsed.content == "Calling."


def test_closing_think_without_opening_tag():
    parsed = parse_assistant_turn("reasoning only in the prompt's open block\n</think>\n\nAnswer.")
    assert parsed.reasoning == "reasoning only in the prompt's open block"
    assert parsed.content == "Answer."


def test_unterminated_think_is_all_reasoning():
    parsed = parse_assistant_turn('<think>\nStill thinking ' + block('{"name": "f", "arguments": {}}'))
    assert parsed.content == "" and parsed.tool_calls == [] and not parsed.malformed
    assert parsed.reasoning.startswith("Still thinking")


def test_empty_think_block():
    assert split_reasoning("<think>\n\n</think>\n\nHi") == ("", "\n\nHi")
    assert parse_assistant_turn("<think>\n\n</think>\n\nHi").content == "Hi"


# ---- Llama 3.1 JSON format ---------------------------------------------------------------------------


def test_llama_single_call():
    parsed = parse_assistant_turn('{"name": "get_weather", "parameters": {"city": "Rome"}}<|eot_id|>', "llama3")
    assert parsed.tool_calls == [ToolCall("get_weather", {"city": "Rome"})]
    assert parsed.content == "" and not parsed.malformed


def test_llama_python_tag_list_and_semicolons():
    with_tag = parse_llama_turn('<|python_tag|>{"name": "a", "parameters": {}}<|eom_id|>')
    assert with_tag.tool_calls == [ToolCall("a", {})]
    as_list = parse_llama_turn('[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "arguments": {"y": 2}}]')
    assert as_list.tool_calls == [ToolCall("a", {"x": 1}), ToolCall("b", {"y": 2})]
    separated = parse_llama_turn('{"name": "a", "parameters": {"s": "x;y"}}; {"name": "b", "parameters": {}}')
    assert separated.tool_calls == [ToolCall("a", {"s": "x;y"}), ToolCall("b", {})]


def test_llama_plain_text_and_plain_json_answers_are_content():
    text = parse_llama_turn("The weather in Rome is sunny.")
    assert text.content == "The weather in Rome is sunny." and text.tool_calls == [] and not text.malformed
    answer = parse_llama_turn('{"temperature": 21}')
    assert answer.content == '{"temperature": 21}' and answer.tool_calls == [] and not answer.malformed


def test_llama_broken_calls_are_reported():
    invalid = parse_llama_turn('{"name": "a", "parameters": {')
    assert invalid.tool_calls == [] and invalid.malformed and "not valid JSON" in invalid.errors[0]
    mixed = parse_llama_turn('[{"name": "a", "parameters": {}}, {"name": "b", "parameters": 5}]')
    assert mixed.tool_calls == [ToolCall("a", {})] and mixed.malformed and "call 2" in mixed.errors[0]


# ---- API -----------------------------------------------------------------------------------------------


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"'llama3', 'qwen'"):
        parse_assistant_turn("x", fmt="mistral")


def test_qwen_alias_and_call_serialisation():
    assert parse_qwen_turn(block('{"name": "f", "arguments": {}}')) == parse_assistant_turn(
        block('{"name": "f", "arguments": {}}')
    )
    call = ToolCall("f", {"a": 1})
    assert call.to_json() == {"name": "f", "arguments": {"a": 1}}
    assert call.to_openai() == {"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
    assert json.loads(json.dumps(call.to_json())) == call.to_json()


@pytest.mark.parametrize("fmt", ["qwen", "llama3"])
@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain",
        block("{}"),
        block('{"name": "f", "arguments": {}}') * 3,
        "<tool_call>",
        '{"name": "f"',
        '[{"name": "f", "parameters": {}}, 3]',
        "<think>x</think>" + block('{"name": 1}'),
    ],
)
def test_malformed_is_true_exactly_when_errors_are_reported(fmt, text):
    parsed = parse_assistant_turn(text, fmt)
    assert parsed.malformed == bool(parsed.errors)
    assert all(isinstance(call, ToolCall) and isinstance(call.arguments, dict) for call in parsed.tool_calls)


# ---- delimiters inside JSON strings (vLLM / sglang bug reports) -----------------------------------------

DELIMITERS = ["</tool_call>", "<tool_call>", "<think>", "</think>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>",
              "<|eom_id|>", "<|python_tag|>"]


def test_closing_tag_inside_a_string_argument_does_not_split_the_call():
    text = ('<tool_call>\n{"name": "save_note", "arguments": {"text": "the reply must end with </tool_call> on its '
            'own line"}}\n</tool_call>')
    parsed = parse_assistant_turn(text)
    assert parsed == ParsedTurn(
        content="", malformed=False,
        tool_calls=[ToolCall("save_note", {"text": "the reply must end with </tool_call> on its own line"})])


@pytest.mark.parametrize("delimiter", DELIMITERS)
@pytest.mark.parametrize("where", ["middle", "end", "whole"])
def test_any_delimiter_inside_a_string_argument_is_text(delimiter, where):
    value = {"middle": f"a {delimiter} b", "end": f"ends with {delimiter}", "whole": delimiter}[where]
    args = {"text": value, "n": 1}
    text = "Before.\n" + format_qwen_tool_call("f", args) + "\n" + format_qwen_tool_call("g", {"t": value}) + "\nAfter."
    parsed = parse_assistant_turn(text)
    assert parsed.tool_calls == [ToolCall("f", args), ToolCall("g", {"t": value})]
    assert parsed.content == "Before.\nAfter." and parsed.reasoning == "" and not parsed.malformed
    # Also in a call whose closing tag is missing, after a real <think> block, and at the turn's end.
    unclosed = format_qwen_tool_call("f", args)[: -len("</tool_call>")]
    recovered = parse_assistant_turn("<think>\nplan\n</think>\n\n" + unclosed + "<|im_end|>")
    assert recovered.tool_calls == [ToolCall("f", args)] and recovered.reasoning == "plan" and recovered.content == ""
    # And in the Llama 3.1 JSON format.
    llama = parse_llama_turn(json.dumps({"name": "f", "parameters": args}) + "<|eot_id|>")
    assert llama.tool_calls == [ToolCall("f", args)] and llama.content == "" and not llama.malformed
    with_tag = parse_llama_turn("<|python_tag|>" + json.dumps({"name": "f", "parameters": args}, ensure_ascii=False))
    assert with_tag.tool_calls == [ToolCall("f", args)] and not with_tag.malformed


@pytest.mark.parametrize("delimiter", DELIMITERS)
def test_delimiters_inside_a_call_drafted_while_thinking(delimiter):
    draft = format_qwen_tool_call("draft", {"t": delimiter})
    text = f"<think>\nMaybe {draft} first.\n</think>\n\nCalling.\n" + format_qwen_tool_call("real", {"t": delimiter})
    parsed = parse_assistant_turn(text)
    assert parsed.reasoning == f"Maybe {draft} first."
    assert parsed.tool_calls == [ToolCall("real", {"t": delimiter})] and parsed.content == "Calling."
    assert not parsed.malformed


def test_split_reasoning_skips_tags_inside_call_json():
    call = format_qwen_tool_call("f", {"t": "</think>"})
    assert split_reasoning(call) == ("", call)
    assert split_reasoning("r</think>" + call) == ("r", call)
    llama_call = '{"name": "f", "parameters": {"t": "x </think> y"}}'
    assert split_reasoning(llama_call, "llama3") == ("", llama_call)
    assert split_reasoning("<think>r</think>" + llama_call, "llama3") == ("r", llama_call)


# ---- a complete call whose closing tag is missing ---------------------------------------------------------

CITY = '<tool_call>\n{"name": "city_of_zip", "arguments": {"zip": "10115"}}'


@pytest.mark.parametrize("ending", ["\n<|im_end|>", "", "\n", "<|endoftext|>", "\n<|im_end|>\n<|endoftext|>"])
def test_missing_closing_tag_at_the_end_of_the_turn_is_recovered_and_flagged(ending):
    parsed = parse_assistant_turn(CITY + ending)
    assert parsed.tool_calls == [ToolCall("city_of_zip", {"zip": "10115"})] and parsed.content == ""
    assert parsed.malformed and parsed.errors == ("<tool_call> block 1: no closing </tool_call> after the JSON "
                                                  "(call 'city_of_zip' kept)",)


def test_missing_closing_tag_before_the_next_call_or_an_end_token():
    parsed = parse_assistant_turn("Two.\n" + CITY + "\n" + format_qwen_tool_call("b", {}) + "\n" + CITY)
    assert [c.name for c in parsed.tool_calls] == ["city_of_zip", "b", "city_of_zip"]
    assert parsed.content == "Two." and len(parsed.errors) == 2
    # Text after an end-of-turn token in the middle stays content; the call before it counts.
    mid = parse_assistant_turn(CITY + "<|im_end|>stray")
    assert [c.name for c in mid.tool_calls] == ["city_of_zip"] and mid.content == "<|im_end|>stray"


@pytest.mark.parametrize("text, reason", [
    (CITY[:-3], "unterminated"),  # cut mid-object
    (CITY[:-10], "unterminated"),  # cut mid-string
    ("<tool_call>\n", "unterminated"),
    ("<tool_call>\n{", "unterminated"),
    (CITY + "\nI will wait for the result.", "extra text after the JSON value"),  # prose, never closed
    ('<tool_call>\n{"arguments": {}}', "'name'"),  # complete JSON but not a call
])
def test_incomplete_or_unclosed_blocks_are_no_call(text, reason):
    parsed = parse_assistant_turn("Before.\n" + text)
    assert parsed.tool_calls == [] and parsed.malformed
    assert len(parsed.errors) == 1 and reason in parsed.errors[0] and "block 1" in parsed.errors[0]
    assert parsed.content == "Before."


def test_a_broken_block_ends_at_the_next_opening_tag():
    parsed = parse_assistant_turn("<tool_call>{oops\n" + format_qwen_tool_call("good", {"a": "}"}))
    assert parsed.tool_calls == [ToolCall("good", {"a": "}"})] and parsed.content == ""
    assert parsed.malformed and "before the next <tool_call>" in parsed.errors[0]


def test_text_after_the_json_inside_a_block_is_broken_even_with_delimiters_in_strings():
    parsed = parse_assistant_turn('<tool_call>{"name": "f", "arguments": {"t": "</tool_call>"}} oops</tool_call>ok')
    assert parsed.tool_calls == [] and parsed.content == "ok"
    assert parsed.errors == ("<tool_call> block 1: not valid JSON (extra text after the JSON value: "
                             "'oops</tool_call>ok'): '{\"name\": \"f\", \"arguments\": {\"t\": \"</tool_call>\"}} oops'",)


# ---- Llama 3.1: only call-shaped JSON is a call -----------------------------------------------------------


@pytest.mark.parametrize("text", [
    '{"name": "Ada Lovelace", "born": 1815, "field": "mathematics"}',
    '{"name": "f"}',
    '[{"name": "Ada"}, {"name": "Grace"}]',
    '{"title": "x", "parameters": {}}',
])
def test_llama_json_without_name_and_arguments_is_content(text):
    parsed = parse_llama_turn(text + "<|eot_id|>")
    assert parsed == ParsedTurn(content=text, tool_calls=[], malformed=False)


@pytest.mark.parametrize("text, expected", [
    ('{"name": "f", "arguments": {"a": 1}}', [ToolCall("f", {"a": 1})]),
    ('{"name": "f", "parameters": null}', [ToolCall("f", {})]),
    ('{"name": "f", "arguments": "{\\"a\\": {\\"b\\": \\"}\\"}}"}', [ToolCall("f", {"a": {"b": "}"}})]),
    ('  \n{"name": "f", "parameters": {}}\n\n;\n {"name": "g", "parameters": {"s": ";"}}  ',
     [ToolCall("f", {}), ToolCall("g", {"s": ";"})]),
])
def test_llama_call_forms(text, expected):
    parsed = parse_llama_turn(text)
    assert parsed.tool_calls == expected and parsed.content == "" and not parsed.malformed


@pytest.mark.parametrize("text, reason", [
    ('{"name": 7, "parameters": {}}', "'name'"),
    ('{"name": "f", "arguments": "oops"}', "arguments string is not valid JSON"),
    ('{"name": "f", "parameters": {}} Let me know.', "not valid JSON"),
])
def test_llama_call_shaped_but_broken_is_malformed(text, reason):
    parsed = parse_llama_turn(text)
    assert parsed.tool_calls == [] and parsed.malformed and reason in parsed.errors[0]


# ---- other kinds: argument strings, whitespace, braces, unicode ---------------------------------------------


def test_openai_style_string_arguments_with_braces_and_delimiters():
    inner = {"code": "if (x) { return '}'; }", "tag": "</tool_call>", "q": 'say "hi"'}
    body = json.dumps({"name": "run", "arguments": json.dumps(inner)})
    parsed = parse_assistant_turn(block(body))
    assert parsed.tool_calls == [ToolCall("run", inner)] and not parsed.malformed


@pytest.mark.parametrize("layout", [
    "<tool_call>{body}</tool_call>",
    "<tool_call>\r\n{body}\r\n</tool_call>",
    "<tool_call>\n\n\t {body} \t\n\n</tool_call>",
    "\n\n  <tool_call>\n{body}\n</tool_call>  \n\n",
])
def test_whitespace_variations(layout):
    body = '{\n  "name": "f",\n  "arguments": {\n    "x": [1,\n 2]\n  }\n}'
    parsed = parse_assistant_turn(layout.replace("{body}", body))
    assert parsed == ParsedTurn(content="", tool_calls=[ToolCall("f", {"x": [1, 2]})], malformed=False)


def test_nested_braces_escaped_quotes_and_backslashes_in_strings():
    args = {"a": "}}}{{", "b": "\\", "c": '\\"}', "d": {"e": ["]", "[", "{"]}}
    parsed = parse_assistant_turn("x " + format_qwen_tool_call("f", args) + " y")
    assert parsed.tool_calls == [ToolCall("f", args)] and parsed.content == "x\ny" and not parsed.malformed


def test_unicode_escapes():
    parsed = parse_assistant_turn(block(r'{"name": "f", "arguments": {"a": "\u00e9\u6771", "e": "\ud83d\ude00"}}'))
    assert parsed.tool_calls == [ToolCall("f", {"a": "é東", "e": "😀"})] and not parsed.malformed
    # A lone surrogate is not valid Unicode (it cannot even be encoded as UTF-8): the call is malformed.
    for body in (r'{"name": "f", "arguments": {"a": "\ud800"}}', r'{"name": "f\udc00", "arguments": {}}',
                 r'{"name": "f", "arguments": {"\ud83d": 1}}'):
        lone = parse_assistant_turn(block(body))
        assert lone.tool_calls == [] and lone.malformed and "surrogate" in lone.errors[0]


def test_json_nested_too_deeply_is_malformed_not_a_crash():
    deep = parse_assistant_turn(block('{"name": "f", "arguments": ' + "[" * 100_000 + "]" * 100_000 + "}"))
    assert deep.tool_calls == [] and deep.malformed
    llama = parse_llama_turn("[" * 100_000)
    assert llama.tool_calls == [] and llama.malformed


def test_a_tag_mentioned_in_prose_does_not_swallow_the_real_call():
    parsed = parse_assistant_turn("I use <tool_call> tags. Here:\n" + format_qwen_tool_call("f", {"a": 1}))
    assert parsed.tool_calls == [ToolCall("f", {"a": 1})] and parsed.content == "I use"
    assert parsed.malformed and "before the next <tool_call>" in parsed.errors[0]
