"""Multi-turn episodes: the batched play loop, RL prompts, whole-trajectory token arrays, the local policy."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftrl_jax import models
from ftrl_jax.envs import rewards
from ftrl_jax.text.chat import IM_END, render_conversation
from ftrl_jax.envs.samples import Sample, decode_sample, encode_sample, read_samples, user_prompt
from ftrl_jax.envs.sandbox import ERROR_PREFIX, Sandbox
from ftrl_jax.rollout.policy import LocalPolicy
from ftrl_jax.rollout.episodes import (GeneratedTurn, episode_token_arrays, play_episodes,
                                       rl_prompts_from_conversation, rl_prompts_from_episode)
from ftrl_jax.training.warmstart import oracle_conversations
from ftrl_jax.text.tokenizer import default_tokenizer
from ftrl_jax.text.tool_calls import format_qwen_tool_call

FTRL_TEST = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "benchdata", "ftrl_test.parquet")

# Calls written by reading the tool code of three rows of FTRL's test set (index -> turns of calls).
FTRL_ORACLE = {
    0: [[("historical_event_finder", {"keywords": "WikiLeaks leak the standard US army protocol at Guantanamo Bay"})]],
    52: [[("earthquake_event_locator", {"date": "2015-04-25", "magnitude": 7.8})],
         [("agricultural_data_analyzer", {"country": "Nepal"})]],
    100: [[("unified_specification_retriever", {"brand": "Apple", "model": "latest", "specification": "storage"}),
           ("unified_specification_retriever", {"brand": "Samsung", "model": "latest", "specification": "storage"})]],
}


def char_ids(text):
    """A tokenizer-free encoding (one id per character) that keeps scripted episodes' ids consistent."""
    return [ord(c) for c in text]


class ScriptedGenerator:
    """A TurnGenerator that answers with `respond(messages, turn_number)`; ids are character codes.

    `respond` returns the text, or (text, truncated). Conversations longer than `max_messages` are
    refused as too long. Batch sizes are recorded.
    """

    def __init__(self, respond, template="qwen2.5", max_messages=None):
        self.respond = respond
        self.template = template
        self.max_messages = max_messages
        self.batches = []

    def __call__(self, conversations):
        self.batches.append(len(conversations))
        turns = []
        for messages, tools in conversations:
            prompt = char_ids(render_conversation(messages, tools, template=self.template, enable_thinking=False))
            if self.max_messages is not None and len(messages) > self.max_messages:
                turns.append(GeneratedTurn("", prompt, [], [], truncated=False, prompt_too_long=True))
                continue
            reply = self.respond(messages, sum(m["role"] == "assistant" for m in messages))
            text, truncated = reply if isinstance(reply, tuple) else (reply, False)
            tokens = char_ids(text if truncated else text + IM_END)
            turns.append(GeneratedTurn(text, prompt, tokens, [-0.01 * (i + 1) for i in range(len(tokens))],
                                       truncated=truncated))
        return turns


def calls_text(calls):
    return "\n".join(format_qwen_tool_call(name, arguments) for name, arguments in calls)


class OracleGenerator(ScriptedGenerator):
    """Plays each sample's oracle calls turn by turn, then states the final answer."""

    def __init__(self, samples, plans=None, **kwargs):
        self.by_question = {}
        for sample in samples:
            plan = plans[id(sample)] if plans else [[(c["name"], c["arguments"]) for c in turn]
                                                    for turn in sample.oracle_calls]
            self.by_question[sample.messages[0]["content"]] = (plan, sample.answer)
        super().__init__(self._respond, **kwargs)

    def _respond(self, messages, turn_number):
        plan, answer = self.by_question[messages[0]["content"]]
        if turn_number < len(plan):
            return calls_text(plan[turn_number])
        return f"The answer is {answer}."


class CountingSandbox:
    """Forwards to a real sandbox and counts call_many batches."""

    def __init__(self, sandbox):
        self.sandbox = sandbox
        self.batches = []

    def call_many(self, requests, **kwargs):
        self.batches.append(len(requests))
        return self.sandbox.call_many(requests, **kwargs)


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(num_workers=2, timeout=5.0) as box:
        yield box


@pytest.fixture(scope="module")
def ftrl_rows():
    if not os.path.exists(FTRL_TEST):
        pytest.skip(f"{FTRL_TEST} is absent (outside data, see shared/benchdata/README.md)")
    samples, errors = read_samples(FTRL_TEST)
    assert not errors
    return [samples[i] for i in FTRL_ORACLE]


@pytest.fixture(scope="module")
def procedural_samples(sandbox):
    build = pytest.importorskip("ftrl_jax.envs.build")
    environments, report = build.build_environments(8, seed=11, sandbox=sandbox, batch_size=8)
    assert report.kept == 8
    return [env.to_sample() for env in environments]


def toy_sample(unsolved=None, solve_rate=0.0):
    """Two tools: `double` (x -> 2x) and `greet` (name -> 'Hello, name'); expects 14 and 'Hello, Ada'."""
    codes = {"double": "def double(x):\n    return {'value': 2 * x}\n",
             "greet": "def greet(name):\n    return 'Hello, ' + name\n"}
    tools = [{"type": "function", "function": {"name": name, "description": f"The {name} tool.",
                                               "parameters": {"type": "object", "properties": {}}}}
             for name in codes]
    return Sample(messages=[{"role": "user", "content": user_prompt("Double 7, then greet Ada.")}], tools=tools,
                  codes=codes, unsolved_set=unsolved or {"double": ["14"], "greet": ["Hello, Ada"]},
                  answer="14", solve_rate=solve_rate, data_source="toy")


# --- the episode loop ------------------------------------------------------------------------


def test_oracle_play_on_real_ftrl_rows_solves_everything(ftrl_rows, sandbox):
    plans = {id(s): FTRL_ORACLE[i] for s, i in zip(ftrl_rows, FTRL_ORACLE)}
    episodes = play_episodes(OracleGenerator(ftrl_rows, plans), ftrl_rows, sandbox=sandbox)
    for sample, episode in zip(ftrl_rows, episodes):
        plan = plans[id(sample)]
        assert episode.metrics["solve_f1"] == 1.0 and episode.metrics["solve_precision"] == 1.0
        assert episode.metrics["num_solved"] == sample.num_expected
        assert episode.end_reason == "no_tool_call" and len(episode.turns) == len(plan) + 1
        assert episode.unsolved_after == {}
        assert [t.num_solved for t in episode.turns] == [len(turn) for turn in plan] + [0]
        assert episode.messages[: len(sample.messages)] == sample.messages
        assert episode.messages[-1] == {"role": "assistant", "content": f"The answer is {sample.answer}."}
    # The Nepal row: two dependent hops, the second fed by the first one's output.
    nepal = episodes[1]
    assert nepal.turns[0].tool_outputs == ["Nepal"] and "Rice" in nepal.turns[1].tool_outputs[0]
    assert nepal.turns[1].unsolved_before == {"agricultural_data_analyzer": ["Rice"]}
    assert [m["role"] for m in nepal.messages] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]


def test_oracle_play_on_procedural_envs_batches_each_round(procedural_samples, sandbox):
    generator = OracleGenerator(procedural_samples)
    counting = CountingSandbox(sandbox)
    episodes = play_episodes(generator, procedural_samples, sandbox=counting)
    assert {e.sample.data_source for e in episodes} == {"self/single_hop", "self/multi_hop",
                                                        "self/parallel_single_hop", "self/parallel_multi_hop"}
    for sample, episode in zip(procedural_samples, episodes):
        assert episode.metrics["solve_f1"] == 1.0, (sample.data_source, episode.messages)
        assert episode.end_reason == "no_tool_call" and len(episode.turns) == len(sample.oracle_calls) + 1
    # One generator call per round over the episodes still playing, one sandbox batch per round with calls.
    plan_lengths = [len(s.oracle_calls) for s in procedural_samples]
    rounds = max(plan_lengths) + 1
    assert generator.batches == [sum(n >= r for n in plan_lengths) for r in range(rounds)]
    assert counting.batches == [sum(len(s.oracle_calls[r]) for s in procedural_samples if r < len(s.oracle_calls))
                                for r in range(rounds - 1)]


def test_malformed_and_unknown_calls(sandbox):
    broken = "<tool_call>\n{\"name\": \"double\", \"arguments\": {\"x\": 7}\n</tool_call>"  # JSON never closed
    scripts = {
        "only_malformed": [broken],
        "valid_and_malformed": [calls_text([("double", {"x": 7})]) + "\n" + broken, "done"],
        "unknown_tool": [calls_text([("triple", {"x": 7}), ("greet", {"name": "Ada"})]), "done"],
    }
    samples = []
    for name in scripts:
        sample = toy_sample()
        sample.messages[0]["content"] += " " + name
        samples.append(sample)
    generator = ScriptedGenerator(lambda messages, n: scripts[messages[0]["content"].split()[-1]][n])
    only_malformed, valid_and_malformed, unknown_tool = play_episodes(generator, samples, sandbox=sandbox)

    assert only_malformed.end_reason == "no_tool_call" and len(only_malformed.turns) == 1
    assert only_malformed.turns[0].parse_errors and only_malformed.turns[0].tool_calls == []
    assert [m["role"] for m in only_malformed.messages] == ["user", "assistant"]

    assert valid_and_malformed.turns[0].parse_errors
    assert valid_and_malformed.turns[0].tool_outputs == ['{"value": 14}']
    assert valid_and_malformed.turns[0].num_solved == 1 and valid_and_malformed.end_reason == "no_tool_call"

    outputs = unknown_tool.turns[0].tool_outputs
    assert outputs[0].startswith(f"{ERROR_PREFIX} triple: no tool named 'triple'") and outputs[1] == "Hello, Ada"
    assert unknown_tool.messages[2] == {"role": "tool", "name": "triple", "content": outputs[0]}
    assert unknown_tool.metrics["num_calls"] == 2 and unknown_tool.metrics["num_solved"] == 1
    assert unknown_tool.metrics["solve_precision"] == 0.5 and unknown_tool.unsolved_after == {"double": ["14"]}


def test_max_turns_runs_the_last_calls_then_stops(sandbox):
    generator = ScriptedGenerator(lambda messages, n: calls_text([("double", {"x": n})]))
    (episode,) = play_episodes(generator, [toy_sample()], max_turns=3, sandbox=sandbox)
    assert episode.end_reason == "max_turns" and len(episode.turns) == 3
    assert [t.tool_outputs for t in episode.turns] == [['{"value": 0}'], ['{"value": 2}'], ['{"value": 4}']]
    assert episode.messages[-1]["role"] == "tool" and len(episode.messages) == 7
    with pytest.raises(ValueError, match="max_turns must be >= 1"):
        play_episodes(generator, [toy_sample()], max_turns=0, sandbox=sandbox)


def test_prompt_too_long_and_truncated_end_episodes(sandbox):
    call = calls_text([("double", {"x": 7})])
    refusing = ScriptedGenerator(lambda messages, n: call, max_messages=3)
    (too_long,) = play_episodes(refusing, [toy_sample()], sandbox=sandbox)
    # Turn 1 (1 message) and turn 2 (3 messages) were generated; the 5-message prompt was refused.
    assert too_long.end_reason == "prompt_too_long" and len(too_long.turns) == 2
    assert too_long.messages[-1]["role"] == "tool"

    cut = ScriptedGenerator(lambda messages, n: (call + "\n<tool_call>\n{\"name\": \"gr", True))
    (truncated,) = play_episodes(cut, [toy_sample()], sandbox=sandbox)
    assert truncated.end_reason == "truncated" and truncated.turns[0].truncated
    assert truncated.turns[0].tool_calls == [] and truncated.turns[0].tool_outputs == []
    assert [m["role"] for m in truncated.messages] == ["user", "assistant"]


def test_a_truncated_turn_gets_one_rule_in_evaluation_and_rl(sandbox):
    # A correct, complete call followed by rambling that hits the token limit.
    text = calls_text([("double", {"x": 7})]) + "\nNow let me also think about how to greet"
    (episode,) = play_episodes(ScriptedGenerator(lambda messages, n: (text, True)), [toy_sample()], sandbox=sandbox)
    assert episode.end_reason == "truncated" and episode.turns[0].tool_calls == []
    # Not run, so not counted: no call made, nothing solved.
    assert (episode.metrics["num_calls"], episode.metrics["num_solved"]) == (0, 0)
    metrics = episode.metrics
    assert (metrics["solve_precision"], metrics["solve_rate"], metrics["solve_f1"]) == (1.0, 0.0, 0.0)
    assert rl_prompts_from_episode(episode) == [toy_sample()]  # no state after a turn whose calls ran
    # RL's step reward of the same turn: no call run, the no-call rules give -0.3 for the markup.
    for semantics in ("ftrl", "strict", "lenient"):
        assert rewards.step_reward(text, toy_sample(), sandbox=sandbox, semantics=semantics, truncated=True) == -0.3
        assert rewards.step_reward(text, toy_sample(), sandbox=sandbox, semantics=semantics) == 1.0  # not cut: 1 of 1


def test_generator_must_answer_every_conversation(sandbox):
    with pytest.raises(RuntimeError, match="returned 0 turns for 1 conversations"):
        play_episodes(lambda conversations: [], [toy_sample()], sandbox=sandbox)


# --- RL prompts ------------------------------------------------------------------------------


def test_rl_prompts_reduce_the_unsolved_set_and_raise_the_solve_rate(sandbox):
    turns = [calls_text([("double", {"x": 7}), ("double", {"x": 8})]), calls_text([("greet", {"name": "Ada"})]),
             "The answer is 14."]
    generator = ScriptedGenerator(lambda messages, n: turns[n])
    fresh, half_done = toy_sample(), toy_sample(solve_rate=0.5)
    episode, half_episode = play_episodes(generator, [fresh, half_done], sandbox=sandbox)

    states = rl_prompts_from_episode(episode)
    assert [len(s.messages) for s in states] == [1, 4, 6]
    assert [s.unsolved_set for s in states] == [{"double": ["14"], "greet": ["Hello, Ada"]},
                                                {"greet": ["Hello, Ada"]}, {}]
    assert [s.solve_rate for s in states] == [0.0, 0.5, 1.0]
    assert states[1].messages == episode.messages[:4] and states[1].messages[-1]["content"] == '{"value": 16}'
    for state in states:
        assert (state.tools, state.codes, state.answer, state.data_source) == (
            fresh.tools, fresh.codes, fresh.answer, fresh.data_source)
        assert decode_sample(json.loads(json.dumps(encode_sample(state)))) == state  # a valid FTRL row
    assert fresh.unsolved_set == {"double": ["14"], "greet": ["Hello, Ada"]}  # the input is left alone

    assert rl_prompts_from_episode(episode, include_initial=False) == states[1:]
    # A sample already half solved: the rate counts against its original answers, not the ones left.
    assert [s.solve_rate for s in rl_prompts_from_episode(half_episode)] == [0.5, 0.75, 1.0]


def test_rl_prompts_along_the_oracle_conversation_match_those_of_the_oracle_episode(procedural_samples, sandbox):
    episodes = play_episodes(OracleGenerator(procedural_samples), procedural_samples, sandbox=sandbox)
    conversations = oracle_conversations(procedural_samples, sandbox)
    for sample, episode, conversation in zip(procedural_samples, episodes, conversations):
        from_episode = rl_prompts_from_episode(episode)
        from_oracle = rl_prompts_from_conversation(sample, conversation)
        # The fresh question, then one state per oracle turn: the last one has everything solved.
        assert len(from_oracle) == len(sample.oracle_calls) + 1 == len(from_episode)
        assert [s.unsolved_set for s in from_oracle] == [s.unsolved_set for s in from_episode]
        assert [s.solve_rate for s in from_oracle] == [s.solve_rate for s in from_episode]
        assert from_oracle[-1].unsolved_set == {} and from_oracle[-1].solve_rate == 1.0
        for state, turn in zip(from_oracle[1:], range(len(sample.oracle_calls))):
            # Ends with the turn's tool responses; the state is a valid FTRL row.
            calls = sample.oracle_calls[turn]
            assert [m["role"] for m in state.messages[-len(calls) - 1:]] == ["assistant"] + ["tool"] * len(calls)
            assert decode_sample(json.loads(json.dumps(encode_sample(state)))) == state
        assert rl_prompts_from_conversation(sample, conversation, include_initial=False) == from_oracle[1:]
    sample, conversation = procedural_samples[0], conversations[0]
    with pytest.raises(ValueError, match="does not start with the sample's messages"):
        rl_prompts_from_conversation(sample, conversation[1:])
    cut = conversation[: len(sample.messages) + 1]  # an oracle turn without its tool responses
    n = len(sample.oracle_calls[0])
    with pytest.raises(ValueError, match=rf"conversation\[{len(sample.messages)}\] makes {n} tool calls but is not "
                                         rf"followed by {n} tool messages"):
        rl_prompts_from_conversation(sample, cut)


# --- whole-trajectory token arrays -----------------------------------------------------------


def test_token_arrays_mask_exactly_the_generated_tokens(sandbox):
    turns = [calls_text([("double", {"x": 7})]), calls_text([("greet", {"name": "Ada"})]), "The answer is 14."]
    (episode,) = play_episodes(ScriptedGenerator(lambda messages, n: turns[n]), [toy_sample()], sandbox=sandbox)
    ids, mask, logprobs = episode_token_arrays(episode, tokenizer=None)
    assert ids.shape == mask.shape == logprobs.shape and ids.dtype == np.int32
    # The last prompt plus the last generation is the whole sequence; masked ids are the generated texts.
    last = episode.turns[-1]
    assert ids.tolist() == last.prompt_ids + last.token_ids
    generated = "".join(chr(i) for i in ids[mask == 1])
    assert generated == "".join(text + IM_END for text in turns)
    assert logprobs[mask == 1].tolist() == pytest.approx([lp for t in episode.turns for lp in t.logprobs])
    assert not logprobs[mask == 0].any()
    assert "<tool_response>" in "".join(chr(i) for i in ids[mask == 0])


def test_token_arrays_refuse_a_template_that_rewrites_history(sandbox):
    turns = [calls_text([("double", {"x": 7})]), "The answer is 14."]
    qwen3 = ScriptedGenerator(lambda messages, n: turns[n], template="qwen3")
    (episode,) = play_episodes(qwen3, [toy_sample()], sandbox=sandbox)

    class CharTokenizer:
        def decode(self, ids, **kwargs):
            return "".join(map(chr, ids))

    with pytest.raises(ValueError, match=r"prompt of turn 1 does not extend.*'qwen3' chat template rewrote history"):
        episode_token_arrays(episode, CharTokenizer(), template="qwen3")


# --- the local policy (tiny random model) ----------------------------------------------------


def _stopping_at_first_odd_spelling(config, params, tokenizer, prompts_policy, samples):
    """Greedy tokens of the first sample, and params whose greedy run ends just after its first k tokens.

    k is the first length at which the tokenizer would spell the decoded text differently (a random model
    rarely writes canonical BPE); the <|im_end|> column of the untied head becomes a slightly larger copy
    of the column of the token greedy picked next, so generation stops there.
    """
    first = prompts_policy([(s.messages, s.tools) for s in samples])[0].token_ids
    canonical = [tokenizer.encode(tokenizer.decode(first[:k], skip_special_tokens=False), add_special_tokens=False)
                 == first[:k] for k in range(1, len(first))]
    k = canonical.index(False) + 1 if False in canonical else 8
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    head = params["lm_head"]["kernel"]
    stopping = {**params, "lm_head": {"kernel": head.at[:, im_end].set(1.05 * head[:, first[k]])}}
    return first, k, stopping, False in canonical


def test_local_policy_end_to_end_records_consistent_ids_and_logprobs(sandbox):
    tokenizer = default_tokenizer()
    config = models.preset("tiny", num_layers=1, tie_word_embeddings=False, vocab_size=len(tokenizer))
    params = models.init_params(config, jax.random.PRNGKey(0))
    samples = [toy_sample(), toy_sample(unsolved={"greet": ["Hello, Ada"]})]
    samples[1].messages[0]["content"] += " Please."
    probe = LocalPolicy(config, params, tokenizer, max_new_tokens=16, max_prompt_tokens=1024)
    first, k, params, odd_spelling = _stopping_at_first_odd_spelling(config, params, tokenizer, probe, samples)
    policy = LocalPolicy(config, params, tokenizer, max_new_tokens=16, max_prompt_tokens=1024)
    episodes = play_episodes(policy, samples, max_turns=2, sandbox=sandbox)

    for sample, episode in zip(samples, episodes):
        turn = episode.turns[0]
        assert episode.end_reason in {"no_tool_call", "truncated"} and len(episode.turns) == 1
        assert turn.prompt_ids == tokenizer.encode(render_conversation(sample.messages, sample.tools),
                                                   add_special_tokens=False)
        assert 1 <= len(turn.token_ids) == len(turn.logprobs) <= 16
        assert turn.truncated == (turn.token_ids[-1] not in policy.stop_ids)
        assert episode_token_arrays(episode, tokenizer)[1].sum() == len(turn.token_ids)
    stopped = episodes[0].turns[0]
    assert stopped.token_ids == first[:k] + [tokenizer.convert_tokens_to_ids(IM_END)] and not stopped.truncated
    assert episodes[0].messages[-1]["content"] == tokenizer.decode(first[:k], skip_special_tokens=False)

    # The next prompt holds the turn's sampled ids, not the tokenizer's spelling of its text.
    follow_up = episodes[0].messages + [{"role": "tool", "name": "greet", "content": "Hello, Ada"}]
    seen = stopped.prompt_ids + stopped.token_ids
    assert policy.encode(follow_up, samples[0].tools)[: len(seen)] == seen
    assert policy.encode(samples[0].messages, samples[0].tools) == stopped.prompt_ids  # remembered pieces
    if odd_spelling:  # without that memory, re-tokenizing would have rewritten the model's own turn
        forgetful = LocalPolicy(config, params, tokenizer, max_new_tokens=16, max_prompt_tokens=1024,
                                remembered_turns=0)
        assert forgetful.encode(follow_up, samples[0].tools)[: len(seen)] != seen

    # Sampler log-probs (greedy: of the untempered logits) are the model's log-softmax at each generated
    # token. One forward over both sequences, right-padded: a causal model's earlier positions ignore it.
    sequences = [e.turns[0].prompt_ids + e.turns[0].token_ids for e in episodes]
    width = max(map(len, sequences))
    batch = jnp.asarray([seq + [0] * (width - len(seq)) for seq in sequences])
    logp_btv = jax.nn.log_softmax(models.forward(config, params, batch), axis=-1)
    for row, episode in enumerate(episodes):
        turn = episode.turns[0]
        expected = [float(logp_btv[row, len(turn.prompt_ids) - 1 + i, t]) for i, t in enumerate(turn.token_ids)]
        np.testing.assert_allclose(turn.logprobs, expected, atol=2e-4)

    # A prompt over the budget is refused without generating.
    small = LocalPolicy(config, params, tokenizer, max_new_tokens=16, max_prompt_tokens=8)
    (refused,) = play_episodes(small, samples[:1], sandbox=sandbox)
    assert refused.end_reason == "prompt_too_long" and refused.turns == []
    with pytest.raises(ValueError, match="must fit the model's max_position_embeddings=4096"):
        LocalPolicy(config, params, tokenizer, max_new_tokens=16, max_prompt_tokens=4090)
