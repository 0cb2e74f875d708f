"""Chat formats: the checkpoint's own template where it renders tools, the Qwen2.5 tool format inside its turns
where it cannot (SmolLM2), native Qwen2.5 where there is none, and byte identity with the native renderer for
the real Qwen2.5 tokenizer."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import tokenizers
from transformers import PreTrainedTokenizerFast

from ftrl_jax.text.chat import render_conversation
from ftrl_jax.text.templates import (CHECKPOINT_KIND, NATIVE, QWEN_TOOLS_KIND, TemplateError, hf_chat_messages,
                                     resolve_chat_format)
from tests.text.llama_style_template import LLAMA_STYLE_TEMPLATE

FTRL_TEST_SET = Path(__file__).resolve().parents[2] / ".." / "shared" / "benchdata" / "ftrl_test.parquet"
SMOLLM2 = "SmolLM2-135M-Instruct"

LOOKUP = {"type": "function", "function": {
    "name": "lookup_city", "description": "Population of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "How many people live in Zürich and Bern?"},
    {"role": "assistant", "content": "Let me look both up.", "tool_calls": [
        {"type": "function", "function": {"name": "lookup_city", "arguments": {"city": "Zürich"}}},
        {"type": "function", "function": {"name": "lookup_city", "arguments": {"city": "Bern"}}}]},
    {"role": "tool", "name": "lookup_city", "content": "{\"population\": 421878}"},
    {"role": "tool", "name": "lookup_city", "content": "{\"population\": 134591}"},
    {"role": "assistant", "content": "<tool_call>\n{\"name\": \"lookup_city\", \"arguments\": {\"city\": \"Basel\"}}"
                                     "\n</tool_call>"},
    {"role": "tool", "name": "lookup_city", "content": "{\"population\": 173863}"},
]


def host(chat_template: str | None) -> PreTrainedTokenizerFast:
    """A bare tokenizer that only runs transformers' chat-template renderer."""
    vocab = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocab, unk_token="<unk>", bos_token="<|begin_of_text|>")
    tokenizer.chat_template = chat_template
    return tokenizer


def resolve_quietly(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none expected
        return resolve_chat_format(*args, **kwargs)


# ---- SmolLM2-135M-Instruct: its template ignores tools ----------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
    from ftrl_jax.models import load_gguf_tokenizer

    return load_gguf_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_format(smollm2_tokenizer):
    with pytest.warns(UserWarning) as caught:
        chat_format = resolve_chat_format("auto", smollm2_tokenizer, model_type="llama", checkpoint=SMOLLM2)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and SMOLLM2 in messages[0] and "cannot render tools" in messages[0], messages
    assert "Qwen2.5 tool format" in messages[0]
    return chat_format


def test_smollm2_falls_back_to_the_qwen2_5_tool_format(smollm2_format):
    assert smollm2_format.kind == QWEN_TOOLS_KIND and smollm2_format.tool_format == "qwen"
    assert smollm2_format.generation_prompt == "<|im_start|>assistant\n"


def test_smollm2_with_a_system_message_renders_what_qwen2_5_renders(smollm2_format):
    # Its ChatML turns carrying the Qwen2.5 tool format are Qwen2.5's bytes (the tools block joins the system text).
    assert smollm2_format.render(CONVERSATION, [LOOKUP]) == render_conversation(CONVERSATION, [LOOKUP])
    assert smollm2_format.render(CONVERSATION[:2], [LOOKUP], add_generation_prompt=False) == \
        render_conversation(CONVERSATION[:2], [LOOKUP], add_generation_prompt=False)


def test_smollm2_keeps_its_own_turns_and_system_prompt(smollm2_format):
    question = [{"role": "user", "content": "Hi?"}]
    plain = smollm2_format.render(question)
    assert plain == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                     "<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n")
    with_tools = smollm2_format.render(question, [LOOKUP])
    assert with_tools.startswith("<|im_start|>system\n# Tools\n\n") and "You are Qwen" not in with_tools
    assert json.dumps(LOOKUP, ensure_ascii=False) in with_tools
    assert with_tools.endswith("</tool_call><|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n")


# ---- Qwen2.5: the real tokenizer's template equals the native renderer --------------------------------------


@pytest.fixture(scope="module")
def qwen_tokenizer():
    from ftrl_jax.text.qwen_tokenizer import build_qwen2_5_tokenizer

    return build_qwen2_5_tokenizer()


def test_qwen2_5_checkpoint_template_is_byte_identical_to_the_native_renderer(qwen_tokenizer):
    chat_format = resolve_quietly("checkpoint", qwen_tokenizer, model_type="qwen2")
    assert chat_format.kind == CHECKPOINT_KIND and chat_format.tool_format == "qwen"
    conversations = [(CONVERSATION, [LOOKUP]), (CONVERSATION[1:], [LOOKUP]), (CONVERSATION[1:2], None)]
    if FTRL_TEST_SET.exists():
        import pyarrow.parquet as pq

        rows = pq.read_table(FTRL_TEST_SET, columns=["messages", "tools"]).to_pylist()[:40]
        conversations += [(row["messages"], json.loads(row["tools"])) for row in rows]
    for messages, tools in conversations:
        for add_generation_prompt in (True, False):
            assert chat_format.render(messages, tools, add_generation_prompt=add_generation_prompt) == \
                render_conversation(messages, tools, add_generation_prompt=add_generation_prompt)


def test_auto_keeps_the_native_renderers_for_qwen(qwen_tokenizer):
    assert resolve_quietly("auto", qwen_tokenizer, model_type="qwen2").kind == NATIVE
    assert resolve_quietly(None, qwen_tokenizer, model_type="qwen3").name == "qwen3"
    assert resolve_quietly("qwen2.5", None).name == "qwen2.5"  # native needs no tokenizer
    assert resolve_quietly("qwen2.5", None) == "qwen2.5" != resolve_quietly("qwen3", None)  # equals its name


# ---- a Llama 3.1-style template: its own rendering and bare-JSON calls ---------------------------------------


def test_llama_style_template_renders_tools_and_parses_bare_json():
    tokenizer = host(LLAMA_STYLE_TEMPLATE)
    chat_format = resolve_quietly("auto", tokenizer, model_type="llama", checkpoint="llama-style")
    assert chat_format.kind == CHECKPOINT_KIND and chat_format.tool_format == "llama3"
    assert chat_format.generation_prompt == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    # A bare-JSON call left in the text becomes a structured call the template writes itself.
    history = [{"role": "user", "content": "Population of Bern?"},
               {"role": "assistant", "content": '{"name": "lookup_city", "parameters": {"city": "Bern"}}'},
               {"role": "tool", "name": "lookup_city", "content": "134591"}]
    assert hf_chat_messages(history, "llama3")[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "lookup_city", "arguments": {"city": "Bern"}}}]}
    text = chat_format.render(history, [LOOKUP])
    assert text == tokenizer.apply_chat_template(hf_chat_messages(history, "llama3"), tools=[LOOKUP],
                                                 add_generation_prompt=True, tokenize=False)
    assert '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "lookup_city", "parameters": {"city": ' \
           '"Bern"}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n134591<|eot_id|>' in text
    assert text.startswith("<|begin_of_text|><|start_header_id|>system")
    # Two calls in one turn: this template refuses them, with an error naming the template and its reason.
    with pytest.raises(TemplateError, match="llama-style.*single tool-calls"):
        chat_format.render(CONVERSATION, [LOOKUP])


# ---- fallbacks and errors -------------------------------------------------------------------------------------

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
RENDERS_TOOLS_BUT_REFUSES_RESULTS = (
    "{% if tools %}{% for tool in tools %}{{ tool | tojson }}{% endfor %}{% endif %}{% for message in messages %}"
    "{% if message.role == 'tool' %}{{ raise_exception('tool messages are not supported') }}{% endif %}"
    "{{ '<|im_start|>' + message.role + '\n' + (message.content or '') + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
REFUSES_SYSTEM = ("{% for message in messages %}{% if message.role == 'system' %}"
                  "{{ raise_exception('System role not supported') }}{% endif %}"
                  "{{ message.role + ': ' + message.content + '\n' }}{% endfor %}")


def test_template_raising_on_tool_messages_falls_back_with_a_warning():
    with pytest.warns(UserWarning, match=r"refuses-results.*cannot render tools.*tool messages are not supported"):
        chat_format = resolve_chat_format("checkpoint", host(RENDERS_TOOLS_BUT_REFUSES_RESULTS),
                                          checkpoint="refuses-results")
    assert chat_format.kind == QWEN_TOOLS_KIND
    assert "<tool_response>\n42\n</tool_response>" in chat_format.render(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
         {"role": "tool", "content": "42"}], [LOOKUP])


def test_no_chat_template_or_an_unusable_one_renders_native_qwen2_5():
    with pytest.warns(UserWarning, match="bare-checkpoint ships no chat template.*Qwen2.5"):
        chat_format = resolve_chat_format("auto", host(None), model_type="llama", checkpoint="bare-checkpoint")
    assert chat_format.kind == NATIVE and chat_format.name == "qwen2.5"
    with pytest.warns(UserWarning, match="no-system.*nor plain turns"):
        chat_format = resolve_chat_format("checkpoint", host(REFUSES_SYSTEM), checkpoint="no-system")
    assert chat_format.kind == NATIVE and chat_format.name == "qwen2.5"


def test_chatml_template_without_tools_keeps_plain_turns():
    with pytest.warns(UserWarning, match="chatml-only"):
        chat_format = resolve_chat_format("checkpoint", host(CHATML), checkpoint="chatml-only")
    assert chat_format.render([{"role": "user", "content": "Hi"}]) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_bad_names_and_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown chat template 'llama3'.*'auto', 'checkpoint'"):
        resolve_chat_format("llama3", host(CHATML))
    with pytest.raises(ValueError, match="needs its tokenizer"):
        resolve_chat_format("checkpoint", None)
    chat_format = resolve_quietly("checkpoint", host(LLAMA_STYLE_TEMPLATE), model_type="llama")
    with pytest.raises(TemplateError, match=r"messages\[1\].*arguments of 'f' are not valid JSON"):
        chat_format.render([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{nope"}}]}])
    with pytest.raises(TemplateError, match="messages is empty"):
        chat_format.render([])
