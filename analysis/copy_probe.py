"""How well a policy copies values into tool-call arguments, teacher-forced on oracle conversations.

    python -m analysis.copy_probe --model=DIR --data=FILE.jsonl [--num=64] [--template=qwen2.5] [--noattention]
        [--output=OUT.json]

A tool-use policy in the procedural worlds mostly fails by writing the wrong name into an argument. This
measures that skill alone, without sampling: the first `--num` samples of a sample-format file (for example a
recipe's `WORKDIR/envs/held_out.jsonl`) are played with their oracle calls through the sandbox (the tools
really run), each gold conversation goes through the policy in one forward pass, and for every string argument
of every oracle call, over the tokens of its JSON string value inside the assistant turn:

    value_exact     1 if every token is the policy's argmax given the gold conversation before it, else 0
                    (greedy decoding would write this value here), averaged over values
    first_token_p   mean probability of a value's first token (where the choice of name is made)
    later_token_p   mean probability of the values' other tokens, pooled (spelling a name out once chosen)
    source_attention  (on unless `--noattention`) over the values whose text stands earlier in the conversation
                    (`values_with_source` of them): the attention mass that the position choosing the value puts
                    on the tokens where those earlier occurrences start, for the head that puts the most there
                    (max over heads and layers), averaged; `source_attention_by_layer` the same per layer (max
                    over heads); `attended` the share of those values with some head above 0.5. A policy that
                    copies has a head reading the name it writes; one that writes names from memory does not.

Values are flat string arguments (the procedural worlds' kind). They are grouped by where their text appears
before the call: the prompt (system prompt with the tool documents, and user messages: `prompt`), a tool result
(`tool_result`), or neither (`other`). Figures are fractions in [0, 1]; a group without values is absent. The
policy's tokenizer must be a fast (Rust) one, for character offsets.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable, Sequence

import numpy as np
from absl import flags

from experiments import cli

# `"key": "value"` pairs of a JSON object as json.dumps writes them; values with escapes are matched whole.
_STRING_ARGUMENT = re.compile(r'"((?:[^"\\]|\\.)+)": "((?:[^"\\]|\\.)*)"')
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
SOURCES = ("prompt", "tool_result", "other")


@dataclasses.dataclass(frozen=True)
class ValueSpan:
    """The tokens [start, end) of one argument value in a conversation's ids, where the value came from, and
    `sources`: the positions of the tokens on which the value's text starts wherever it stands earlier in the
    conversation (the token covering its first character: `ĠPi` of ` Piarksael` in prose counts for the value
    `Piarksael`)."""

    start: int
    end: int
    source: str
    sources: tuple[int, ...] = ()


def _occurrence_tokens(texts: Sequence[tuple[str, list[tuple[int, int]], int]], forms: Sequence[str],
                       limit: int) -> tuple[int, ...]:
    """Positions (< limit) of the tokens covering the first character of each occurrence of `forms`."""
    found = set()
    for text, offsets, base in texts:
        for form in forms:
            at = text.find(form)
            while at >= 0:
                found.update(base + i for i, (x0, x1) in enumerate(offsets) if x0 <= at < x1 and base + i < limit)
                at = text.find(form, at + 1)
    return tuple(sorted(found))


def value_spans(segments: Sequence[tuple[str, bool]], tokenizer: Any) -> tuple[list[int], list[ValueSpan]]:
    """(ids, argument value spans) of a rendered conversation.

    `segments`: (text, generated) pieces as `text.chat.render_segments` gives them; each is tokenized on its own,
    as in supervised training. A span covers the tokens of a string value of the `arguments` of a `<tool_call>`
    block of a generated piece; values whose first or last token straddles a quote are skipped.
    """
    ids: list[int] = []
    spans: list[ValueSpan] = []
    question, results = "", ""
    earlier: list[tuple[str, list[tuple[int, int]], int]] = []  # (text, offsets, first id position) so far
    for text, generated in segments:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(o) for o in encoding["offset_mapping"]]
        base = len(ids)
        if generated:
            for block in _TOOL_CALL.finditer(text):
                arguments = text.find('"arguments": ', block.start(1), block.end(1))
                if arguments < 0:
                    continue
                for match in _STRING_ARGUMENT.finditer(text, arguments + 1, block.end(1)):
                    if not match.group(2):
                        continue
                    a, b = match.span(2)
                    inside = [i for i, (x0, x1) in enumerate(offsets) if a <= x0 and x1 <= b and x1 > x0]
                    if (not inside or inside != list(range(inside[0], inside[-1] + 1))
                            or offsets[inside[0]][0] != a or offsets[inside[-1]][1] != b):
                        continue
                    value = json.loads(f'"{match.group(2)}"')
                    forms = (value, match.group(2))  # as written, and JSON-escaped as inside a tool result
                    source = ("prompt" if any(f in question for f in forms) else
                              "tool_result" if any(f in results for f in forms) else "other")
                    before = earlier + [(text[:a], offsets, base)]
                    spans.append(ValueSpan(base + inside[0], base + inside[-1] + 1, source,
                                           _occurrence_tokens(before, forms, base + inside[0])))
        elif "<tool_response>" in text:
            results += text
        else:
            question += text
        earlier.append((text, offsets, base))
        ids.extend(encoding["input_ids"])
    return ids, spans


def score_values(logits: np.ndarray, ids: Sequence[int], spans: Sequence[ValueSpan],
                 attention: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Per value: source, exact (all tokens argmax), first token probability, later tokens' probabilities, and
    with `attention` `source_attention`: per layer, the most mass one head puts from the position choosing the
    value (the one before its first token) on the value's `sources` (None when it has none).

    `logits`: [len(ids), vocab] next-token logits (row t predicts ids[t + 1]). `attention`: [L, H, Q, len(ids)]
    probabilities whose Q rows are the queries `[span.start - 1 for span in spans]`, in order. Pure numpy.
    """
    rows = []
    for k, span in enumerate(spans):
        targets = np.asarray(ids[span.start:span.end])
        step = np.asarray(logits[span.start - 1:span.end - 1], np.float64)
        log_probs = step - step.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        probs = np.exp(log_probs[np.arange(len(targets)), targets])
        row = {"source": span.source, "exact": bool((step.argmax(-1) == targets).all()),
               "first_p": float(probs[0]), "later_p": [float(p) for p in probs[1:]]}
        if attention is not None:
            row["source_attention"] = ([float(m) for m in attention[:, :, k, list(span.sources)].sum(-1).max(-1)]
                                       if span.sources else None)
        rows.append(row)
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Means per source and over all values: value_exact and first_token_p over values, later_token_p over all
    later tokens pooled (None when no value has more than one token), num_values; and when the rows carry
    `source_attention`, its figures (module docstring; None where no value has an earlier occurrence)."""
    out = {}
    for group in ("all",) + SOURCES:
        chosen = [r for r in rows if group in ("all", r["source"])]
        if not chosen:
            continue
        later = [p for r in chosen for p in r["later_p"]]
        out[group] = {"value_exact": float(np.mean([r["exact"] for r in chosen])),
                      "first_token_p": float(np.mean([r["first_p"] for r in chosen])),
                      "later_token_p": float(np.mean(later)) if later else None,
                      "num_values": len(chosen)}
        if any("source_attention" in r for r in chosen):
            seen = np.array([r["source_attention"] for r in chosen if r.get("source_attention") is not None])
            out[group].update(
                values_with_source=len(seen),
                source_attention=float(seen.max(1).mean()) if len(seen) else None,
                source_attention_by_layer=[float(m) for m in seen.mean(0)] if len(seen) else None,
                attended=float((seen.max(1) > 0.5).mean()) if len(seen) else None)
    return out


def probe(samples: Sequence[Any], tokenizer: Any, logits_fn: Callable[[list[int]], np.ndarray], *, sandbox: Any,
          template: str = "qwen2.5",
          attention_fn: Callable[[list[int], list[int]], np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """Teacher-forced copy figures (see the module docstring) of `logits_fn` (ids -> [len, vocab] logits) on the
    oracle conversations of `samples` (`envs.samples.Sample`s with oracle calls); with `attention_fn` ((ids,
    query positions) -> [L, H, len(queries), len(ids)] attention probabilities) the source-attention figures."""
    from ftrl_jax.text.chat import render_segments
    from ftrl_jax.training.warmstart import oracle_conversations

    rows = []
    for sample, messages in zip(samples, oracle_conversations(samples, sandbox)):
        ids, spans = value_spans(render_segments(messages, sample.tools, template=template, enable_thinking=False),
                                 tokenizer)
        if spans:
            attention = (None if attention_fn is None else
                         np.asarray(attention_fn(ids, [span.start - 1 for span in spans])))
            rows.extend(score_values(logits_fn(ids), ids, spans, attention))
    return summarize(rows)


def _right_padded(values: Sequence[int], size: int) -> np.ndarray:
    """[1, size] int32: `values`, then zeros."""
    out = np.zeros((1, size), np.int32)
    out[0, :len(values)] = values
    return out


def model_logits_fn(model_config: Any, params: Any, bucket: int = 256) -> Callable[[list[int]], np.ndarray]:
    """ids -> float32 logits of one unpadded forward pass (right-padded to a multiple of `bucket`, jit once per
    length bucket)."""
    import jax
    import jax.numpy as jnp

    from ftrl_jax import models
    from ftrl_jax.training.warmstart import length_bucket

    forward = jax.jit(lambda p, x, m: models.forward(model_config, p, x, m))

    def logits_fn(ids: list[int]) -> np.ndarray:
        length = length_bucket(len(ids), bucket)
        out = forward(params, jnp.asarray(_right_padded(ids, length)),
                      jnp.asarray(_right_padded([1] * len(ids), length)))
        out = out[0] if isinstance(out, tuple) else out
        return np.asarray(out[0, :len(ids)], np.float32)

    return logits_fn


def model_attention_fn(model_config: Any, params: Any, bucket: int = 256
                       ) -> Callable[[list[int], list[int]], np.ndarray]:
    """(ids, query positions) -> [L, H, Q, len(ids)] float32 attention probabilities of one sequence at those
    query rows (`models.attention_probabilities`; ids right-padded to a multiple of `bucket`, which causal rows
    do not see, queries padded to a power of two; jit once per shape)."""
    import jax
    import jax.numpy as jnp

    from ftrl_jax import models
    from ftrl_jax.generate.sampling import bucket as power_of_two
    from ftrl_jax.training.warmstart import length_bucket

    attention = jax.jit(lambda p, x, q: models.attention_probabilities(model_config, p, x, q))

    def attention_fn(ids: list[int], queries: list[int]) -> np.ndarray:
        x = _right_padded(ids, length_bucket(len(ids), bucket))
        q = _right_padded(queries, power_of_two(len(queries), minimum=1))[0]
        return np.asarray(attention(params, jnp.asarray(x), jnp.asarray(q))[:, 0, :, :len(queries), :len(ids)])

    return attention_fn


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("model", None, "Policy: a Hugging Face directory or a shipped policy's name "
                        "(tiny-instruct) (required).", required=True, flag_values=fv)
    flags.DEFINE_string("data", None, "Sample-format JSONL with oracle calls (required).", required=True,
                        flag_values=fv)
    flags.DEFINE_integer("num", 64, "Probe the first NUM samples.", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("template", "qwen2.5", "Chat template the policy was trained with.", flag_values=fv)
    flags.DEFINE_bool("attention", True, "Also measure the attention on the source of each value "
                      "(source_attention; one more pass per sample).", flag_values=fv)
    flags.DEFINE_string("output", "", "Also write the figures to this JSON file (empty: print only).", flag_values=fv)


def main(argv: Sequence[str]) -> int:
    try:
        args = cli.parse(argv, define_flags, __doc__)
    except cli.UsageError as exc:
        return cli.fail(exc)
    from analysis.checkpoints import load_policy
    from ftrl_jax.envs.samples import read_samples
    from ftrl_jax.envs.sandbox import Sandbox
    from ftrl_jax.text.chat import TEMPLATES

    if args.template not in TEMPLATES:
        return cli.fail(f"--template={args.template}: use one of {', '.join(sorted(TEMPLATES))}")
    problem = cli.output_file_problem(args.output)
    if problem:
        return cli.fail(problem)
    try:
        samples, errors = read_samples(args.data)
        model_config, params, tokenizer = load_policy(args.model)
    except (OSError, ValueError) as exc:
        return cli.fail(exc)
    if not getattr(tokenizer, "is_fast", False):
        return cli.fail(f"{args.model}: its tokenizer is not a fast (Rust) tokenizer, which the probe needs for "
                        "character offsets; save it with tokenizer.json")
    samples = [s for s in samples if s.oracle_calls][:args.num]
    if not samples:
        return cli.fail(f"{args.data} has no samples with oracle calls ({len(errors)} unreadable rows)")
    with Sandbox() as sandbox:
        figures = probe(samples, tokenizer, model_logits_fn(model_config, params), sandbox=sandbox,
                        template=args.template,
                        attention_fn=model_attention_fn(model_config, params) if args.attention else None)
    print(f"teacher-forced argument values, {len(samples)} samples of {args.data}:")
    extra = " source_attention | attended | by layer (max over heads) | values with source |" if args.attention else ""
    print("| values from | value_exact | first_token_p | later_token_p | values |" + extra + "\n|---|---|---|---|---|"
          + "---|---|---|---|" * bool(args.attention))
    for group, f in figures.items():
        later = "-" if f["later_token_p"] is None else f"{f['later_token_p']:.3f}"
        line = f"| {group} | {f['value_exact']:.3f} | {f['first_token_p']:.3f} | {later} | {f['num_values']} |"
        if args.attention:
            if f["source_attention"] is None:
                line += " - | - | - | 0 |"
            else:
                layers = " / ".join(f"{m:.2f}" for m in f["source_attention_by_layer"])
                line += (f" {f['source_attention']:.3f} | {f['attended']:.3f} | {layers} | "
                         f"{f['values_with_source']} |")
        print(line)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"model": args.model, "data": args.data, "num_samples": len(samples), "figures": figures}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    cli.run(main)
