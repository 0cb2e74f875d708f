"""analysis.copy_probe: argument-value spans and teacher-forced copy figures."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from analysis import copy_probe
from ftrl_jax import models
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.envs.world import TINY_WORLD
from ftrl_jax.pipeline import main_job
from ftrl_jax.text.chat import render_segments
from ftrl_jax.text.tokenizer import build_default_tokenizer
from ftrl_jax.training.warmstart import oracle_conversations


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox() as sb:
        yield sb


@pytest.fixture(scope="module")
def setting(sandbox, tmp_path_factory):
    samples = main_job.build_split("train", 6, 3, kinds=["single_hop", "multi_hop"], complexity="low",
                                   world=TINY_WORLD, sandbox=sandbox)
    texts = [t for s in samples for t in main_job._sample_texts(s, "qwen2.5")]
    tokenizer = build_default_tokenizer(texts, vocab_size=700, cache_dir=tmp_path_factory.mktemp("tok"),
                                        pretokenizer="stable_names")
    return samples, tokenizer


def _string_arguments(sample):
    return [v for turn in sample.oracle_calls for call in turn for v in call["arguments"].values()
            if isinstance(v, str) and v]


def test_spans_cover_exactly_the_argument_values(setting, sandbox):
    samples, tokenizer = setting
    sources = []
    for sample, messages in zip(samples, oracle_conversations(samples, sandbox)):
        ids, spans = copy_probe.value_spans(render_segments(messages, sample.tools, enable_thinking=False), tokenizer)
        assert [tokenizer.decode(ids[s.start:s.end]) for s in spans] == _string_arguments(sample)
        sources.append([s.source for s in spans])
    # A multi-hop chain takes its first value from the question, the next one from the tool's result.
    assert any(kinds[:2] == ["prompt", "tool_result"] for kinds in sources)
    assert all(kinds[0] == "prompt" for kinds in sources)


def test_an_argument_called_name_is_a_value_and_the_tool_name_is_not(setting):
    _, tokenizer = setting
    segments = [("<|im_start|>user\nGreet Ada Lovelace.<|im_end|>\n<|im_start|>assistant\n", False),
                ('<tool_call>\n{"name": "greet", "arguments": {"name": "Ada Lovelace", "style": "warm"}}\n'
                 "</tool_call><|im_end|>", True)]
    ids, spans = copy_probe.value_spans(segments, tokenizer)
    assert [(tokenizer.decode(ids[s.start:s.end]), s.source) for s in spans] == \
        [("Ada Lovelace", "prompt"), ("warm", "other")]
    # A value with a quote stands JSON-escaped in the tool result it was read from.
    segments += [('\n<|im_start|>user\n<tool_response>\n{"title": "The \\"Echo\\""}\n</tool_response><|im_end|>\n'
                  "<|im_start|>assistant\n", False),
                 ('<tool_call>\n{"name": "year", "arguments": {"title": "The \\"Echo\\""}}\n</tool_call><|im_end|>',
                  True)]
    ids, spans = copy_probe.value_spans(segments, tokenizer)
    assert [(tokenizer.decode(ids[s.start:s.end]), s.source) for s in spans][2:] == [('The \\"Echo\\"', "tool_result")]


def _logits_from(rule, vocab):
    def logits_fn(ids):
        out = np.zeros((len(ids), vocab), np.float32)
        for t in range(len(ids) - 1):
            out[t, rule(ids, t)] = 30.0
        return out
    return logits_fn


def test_figures_of_a_perfect_a_wrong_and_a_half_right_copier(setting, sandbox):
    samples, tokenizer = setting
    vocab = len(tokenizer)
    num_values = sum(len(_string_arguments(s)) for s in samples)
    perfect = copy_probe.probe(samples, tokenizer, _logits_from(lambda ids, t: ids[t + 1], vocab), sandbox=sandbox)
    assert perfect["all"]["num_values"] == num_values
    assert perfect["all"]["value_exact"] == 1.0 and perfect["all"]["first_token_p"] > 0.999

    uniform = copy_probe.probe(samples, tokenizer, lambda ids: np.zeros((len(ids), vocab), np.float32),
                               sandbox=sandbox)
    assert uniform["all"]["first_token_p"] == pytest.approx(1 / vocab, rel=1e-6)
    assert uniform["all"]["value_exact"] == 0.0

    # Right everywhere except on the token after an opening quote: names are chosen wrongly, spelled right.
    def wrong_choice(ids, t):
        return (ids[t + 1] + 1) % vocab if tokenizer.decode([ids[t]]).endswith('"') else ids[t + 1]

    half = copy_probe.probe(samples, tokenizer, _logits_from(wrong_choice, vocab), sandbox=sandbox)
    assert half["all"]["value_exact"] == 0.0 and half["all"]["first_token_p"] < 1e-6
    if not np.isnan(half["all"]["later_token_p"]):
        assert half["all"]["later_token_p"] > 0.999
    assert sum(half[g]["num_values"] for g in copy_probe.SOURCES if g in half) == num_values


class _PieceTokenizer:
    """A stand-in fast tokenizer with Qwen2-like pieces: a word takes the space before it, and a space, a quote
    and an opening parenthesis can make one token (` "(`), which then straddles a JSON string's opening quote."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=True):
        pieces = list(re.finditer(r' ?"\(| ?[A-Za-z]+|\s|.', text, re.S))
        return {"input_ids": [self.vocab.setdefault(m.group(0), len(self.vocab)) for m in pieces],
                "offset_mapping": [m.span() for m in pieces]}


def test_sources_are_found_by_text_and_straddling_values_are_skipped():
    tokenizer = _PieceTokenizer()
    segments = [("<|im_start|>user\nGreet Ada Lovelace, not Ada Byron, then Ada Lovelace.<|im_end|>\n"
                 "<|im_start|>assistant\n", False),
                ('<tool_call>\n{"name": "greet", "arguments": {"name": "Ada Lovelace", "note": "(draft) notes", '
                 '"style": "warm"}}\n</tool_call><|im_end|>', True)]
    ids, spans = copy_probe.value_spans(segments, tokenizer)
    pieces = {i: p for p, i in tokenizer.vocab.items()}
    # "(draft) notes" starts inside the token ' "(' and is skipped; "warm" stands nowhere earlier.
    assert [("".join(pieces[i] for i in ids[s.start:s.end]), s.source) for s in spans] == \
        [("Ada Lovelace", "prompt"), ("warm", "other")]
    ada, warm = spans
    # In the question the name starts on the token ' Ada' (another id than the argument's 'Ada'); both mentions
    # of the whole value count, Ada Byron does not.
    assert [pieces[ids[i]] for i in ada.sources] == [" Ada", " Ada"]
    assert ids[ada.start] not in {ids[i] for i in ada.sources}
    assert warm.sources == ()


def test_source_attention_of_a_reader_and_of_a_head_looking_elsewhere(setting, sandbox):
    samples, tokenizer = setting
    vocab = len(tokenizer)
    logits_fn = _logits_from(lambda ids, t: ids[t + 1], vocab)
    spans_of = {}
    for sample, messages in zip(samples, oracle_conversations(samples, sandbox)):
        ids, spans = copy_probe.value_spans(render_segments(messages, sample.tools, enable_thinking=False), tokenizer)
        spans_of[tuple(ids)] = spans

    def reader(ids, queries):  # 2 layers x 3 heads; layer 1 head 2 reads where the value it writes stood before
        att = np.zeros((2, 3, len(queries), len(ids)), np.float32)
        att[:, :, np.arange(len(queries)), queries] = 1.0  # everyone else looks at the query token itself
        for k, span in enumerate(spans_of[tuple(ids)]):
            assert queries[k] == span.start - 1
            if span.sources:
                att[1, 2, k] = 0.0
                att[1, 2, k, list(span.sources)] = 1.0 / len(span.sources)
        return att

    figures = copy_probe.probe(samples, tokenizer, logits_fn, sandbox=sandbox, attention_fn=reader)["all"]
    with_source = sum(bool(s.sources) for spans in spans_of.values() for s in spans)
    assert figures["values_with_source"] == with_source > 0
    assert figures["source_attention"] == pytest.approx(1.0) and figures["attended"] == 1.0
    assert figures["source_attention_by_layer"] == pytest.approx([0.0, 1.0])

    def self_only(ids, queries):
        att = np.zeros((1, 2, len(queries), len(ids)), np.float32)
        att[:, :, np.arange(len(queries)), queries] = 1.0
        return att

    elsewhere = copy_probe.probe(samples, tokenizer, logits_fn, sandbox=sandbox, attention_fn=self_only)["all"]
    assert elsewhere["values_with_source"] == with_source
    assert elsewhere["source_attention"] == 0.0 and elsewhere["attended"] == 0.0
    # Without attention_fn the figures are not there.
    assert "source_attention" not in copy_probe.probe(samples, tokenizer, logits_fn, sandbox=sandbox)["all"]


def test_model_attention_fn_pads_without_changing_the_rows(setting):
    _, tokenizer = setting
    model_config, params = main_job.random_model("tiny", "num_layers=2", tokenizer, param_dtype="float32",
                                                 dtype="float32", seed=0)
    ids = [int(i) for i in np.random.default_rng(0).integers(0, len(tokenizer), 37)]
    queries = [3, 20, 36]
    padded = copy_probe.model_attention_fn(model_config, params, bucket=64)(ids, queries)
    exact = np.asarray(models.attention_probabilities(model_config, params, np.asarray([ids], np.int32)))[:, 0]
    assert padded.shape == (2, model_config.num_heads, 3, 37)
    np.testing.assert_allclose(padded, exact[:, :, queries], atol=1e-6)
    np.testing.assert_allclose(padded.sum(-1), 1.0, atol=1e-5)


def test_command_prints_and_writes_the_figures(setting, sandbox, tmp_path, capsys):
    samples, tokenizer = setting
    from ftrl_jax.envs.samples import write_samples

    data = tmp_path / "held_out.jsonl"
    write_samples(str(data), samples)
    model_config, params = main_job.random_model("tiny", "", tokenizer, param_dtype="float32", dtype="float32",
                                                 seed=0)
    policy = tmp_path / "policy"
    models.save_pretrained(model_config, params, str(policy))
    tokenizer.save_pretrained(str(policy))
    out = tmp_path / "probe.json"
    assert copy_probe.main(["copy_probe", f"--model={policy}", f"--data={data}", "--num=4", f"--output={out}"]) == 0
    printed = capsys.readouterr().out
    assert "| all |" in printed and "4 samples" in printed and "source_attention" in printed
    record = json.loads(out.read_text())
    assert record["num_samples"] == 4
    assert record["figures"]["all"]["num_values"] == sum(len(_string_arguments(s)) for s in samples[:4])
    assert 0.0 <= record["figures"]["all"]["value_exact"] <= 1.0
    assert 0.0 <= record["figures"]["all"]["source_attention"] <= 1.0
    assert copy_probe.main(["copy_probe", f"--model={policy}", f"--data={data}", "--num=2", "--noattention"]) == 0
    assert "source_attention" not in capsys.readouterr().out

    assert copy_probe.main(["copy_probe", f"--model={policy}", f"--data={tmp_path / 'missing.jsonl'}"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    # Mistakes found before the model is loaded.
    assert copy_probe.main(["copy_probe", f"--model={policy}", f"--data={data}", "--template=qwen9"]) == 2
    assert "--template=qwen9" in capsys.readouterr().err
    assert copy_probe.main(["copy_probe", f"--model={policy}", f"--data={data}",
                            f"--output={tmp_path / 'no' / 'dir.json'}"]) == 2
    assert "not a writable directory" in capsys.readouterr().err
