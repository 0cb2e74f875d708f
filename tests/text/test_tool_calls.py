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
    cut_off = parse_assistant_turn('Checking.\n<tool_call>\n{"name": "f", "arguments": {}}')
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
