"""LocalPolicy with a checkpoint's own chat template: a Llama 3.1-style template renders the prompts, the model's
bare-JSON call is parsed and run in the sandbox, and later prompts reuse the ids the turns were sampled as.

The sampler is replaced by a scripted one (a call first, an answer once a tool result is in the prompt), so
the test follows the real encode / parse / execute / re-render path without a trained model."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from ftrl_jax import models
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.envs.samples import Sample, user_prompt
from ftrl_jax.generate import sampling
from ftrl_jax.rollout.episodes import episode_token_arrays, play_episodes
from ftrl_jax.rollout.harness import final_answer_check
from ftrl_jax.rollout.policy import LocalPolicy
from ftrl_jax.text.tokenizer import default_tokenizer
from ftrl_jax.text.tool_calls import ToolCall
from tests.text.llama_style_template import LLAMA_SPECIAL_TOKENS, LLAMA_STYLE_TEMPLATE

DOUBLE = {"type": "function", "function": {
    "name": "double", "description": "Twice a number.",
    "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}
CALL_TEXT = '{"name": "double", "parameters": {"x": 7}}'
ANSWER_TEXT = "Twice 7 is 14."


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory):
    """The embedded BPE with Llama 3's header and end-of-turn tokens added and a Llama 3.1-style template."""
    directory = tmp_path_factory.mktemp("llama-style")
    default_tokenizer().save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                  "additional_special_tokens": list(LLAMA_SPECIAL_TOKENS)})
    tokenizer.chat_template = LLAMA_STYLE_TEMPLATE
    return tokenizer


@pytest.fixture
def scripted_sampler(monkeypatch, llama_tokenizer):
    """Replaces the jit sampler: a call while no tool result is in the prompt, then an answer. Records prompts."""
    prompts: list[list[int]] = []
    eot = llama_tokenizer.convert_tokens_to_ids("<|eot_id|>")

    def generate(config, params, batch, **kwargs):
        tokens = []
        for prompt in batch:
            prompts.append(list(prompt))
            text = llama_tokenizer.decode(prompt, skip_special_tokens=False)
            reply = ANSWER_TEXT if "<|start_header_id|>ipython" in text else CALL_TEXT
            # Spelled in other pieces than the tokenizer's merges would give: re-tokenizing the turn would
            # not give these ids back, so later prompts extend this one only if the policy reuses them.
            tokens.append([i for part in (reply[:9], reply[9:]) for i in llama_tokenizer.encode(
                part, add_special_tokens=False)] + [eot])
        return sampling.GenerationResult(tokens, [[-0.25] * len(t) for t in tokens], [True] * len(tokens))

    monkeypatch.setattr(sampling, "generate", generate)
    monkeypatch.setattr(sampling, "decode_weights", lambda config, params: None)
    return prompts


def test_llama_style_episode_renders_with_the_checkpoint_template_and_runs_the_bare_json_call(
        llama_tokenizer, scripted_sampler):
    config = models.preset("tiny", model_type="llama", vocab_size=len(llama_tokenizer))
    policy = LocalPolicy(config, None, llama_tokenizer, template="auto", max_new_tokens=32)
    assert policy.template == "checkpoint" and policy.tool_format == "llama3"
    sample = Sample(messages=[{"role": "user", "content": user_prompt("What is twice 7?")}], tools=[DOUBLE],
                    codes={"double": "def double(x):\n    return {'value': 2 * x}\n"},
                    unsolved_set={"double": ["14"]}, answer="14", solve_rate=0.0, data_source="toy")
    with Sandbox(num_workers=1, timeout=5.0) as sandbox:
        episode, = play_episodes(policy, [sample], max_turns=4, sandbox=sandbox)

    assert episode.end_reason == "no_tool_call" and episode.tool_format == "llama3"
    first, second = episode.turns
    assert first.tool_calls == [ToolCall("double", {"x": 7})] and not first.parse_errors
    assert "14" in first.tool_outputs[0]
    assert episode.metrics["num_calls"] == 1 and episode.metrics["num_solved"] == 1
    # History in the shape Hugging Face templates render calls and results from.
    call = {"type": "function", "function": {"name": "double", "arguments": {"x": 7}}}
    assert episode.messages[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert episode.messages[2]["role"] == "tool" and episode.messages[3]["content"] == ANSWER_TEXT
    assert final_answer_check(episode.messages[1:], "14", episode.tool_format) == "final_answer"

    # Prompts are the template's own rendering...
    first_text = llama_tokenizer.apply_chat_template(sample.messages, tools=[DOUBLE], add_generation_prompt=True,
                                                     tokenize=False)
    assert scripted_sampler[0] == list(llama_tokenizer.encode(first_text, add_special_tokens=False))
    history = [sample.messages[0], {"role": "assistant", "content": "", "tool_calls": [call]},
               {"role": "tool", "content": first.tool_outputs[0]}]
    second_text = llama_tokenizer.apply_chat_template(history, tools=[DOUBLE], add_generation_prompt=True,
                                                      tokenize=False)
    assert '<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions' in first_text
    assert llama_tokenizer.decode(scripted_sampler[1], skip_special_tokens=False) == second_text
    # ...and the second extends the first and the ids the call was sampled as, as whole-trajectory RL needs.
    assert first.token_ids[:-1] != list(llama_tokenizer.encode(CALL_TEXT, add_special_tokens=False))
    assert second.prompt_ids[:len(first.prompt_ids) + len(first.token_ids)] == first.prompt_ids + first.token_ids
    ids, mask, _ = episode_token_arrays(episode, llama_tokenizer, policy.template)
    assert int(mask.sum()) == len(first.token_ids) + len(second.token_ids)


def test_play_episodes_refuses_an_unknown_tool_format(llama_tokenizer, scripted_sampler):
    config = models.preset("tiny", model_type="llama", vocab_size=len(llama_tokenizer))
    policy = LocalPolicy(config, None, llama_tokenizer, template="checkpoint", max_new_tokens=32)
    with pytest.raises(ValueError, match="tool_format 'hermes' is not a tool-call format.*'qwen', 'llama3'"):
        play_episodes(policy, [{"messages": [{"role": "user", "content": "q"}]}], tool_format="hermes")
