"""Sampler throughput: `ftrl_jax.generate.sampling.generate` vs transformers `generate`, same weights, one process.

    python -m benchmarks.bench_sampler [--presets=tiny,smol-135m] [--dtypes=float32,bfloat16] [--batch=16]
        [--prompt_len=64] [--new_tokens=128]

Both decode exactly `new_tokens` tokens greedily for every row (no stop tokens), with the same weights in the
same dtype (parameters and compute; transformers gets `torch_dtype` of that name). JAX compile time is
measured separately and excluded from the throughput, as it is paid once per shape. In bfloat16 the two
sides round differently, so greedy rows may part after a near-tie.

    python -m benchmarks.bench_sampler --groups=4 [--group_size=8] [--prompt_len=600] [--new_tokens=96]

measures group sampling as RL does it (n samples of each prompt, temperature 1) against the same number of
distinct prompts, ours only: repeated prompts are prefilled once and share their cache.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("presets", ["tiny", "smol-135m"], "Model presets to benchmark.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Parameter and compute dtypes, each run on both sides.")
flags.DEFINE_integer("batch", 16, "Prompts per batch.")
flags.DEFINE_integer("prompt_len", 64, "Prompt length in tokens.")
flags.DEFINE_integer("new_tokens", 128, "New tokens per prompt.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions of our generate (the best is reported).")
flags.DEFINE_integer("hf_repeats", 1, "Timed repetitions of transformers generate.")
flags.DEFINE_integer("groups", 0, "If > 0: group-sampling benchmark with this many distinct prompts.")
flags.DEFINE_integer("group_size", 8, "Samples per prompt in the group-sampling benchmark.")


def _time_best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_preset(name: str, dtype: str, batch: int, prompt_len: int, new_tokens: int, repeats: int,
                 hf_repeats: int) -> dict:
    import jax
    import numpy as np
    import torch
    import transformers

    from ftrl_jax import models
    from ftrl_jax.generate.sampling import generate

    config = models.preset(name, dtype=dtype, param_dtype=dtype)
    params = models.init_params(config, jax.random.PRNGKey(0))
    prompts = np.random.default_rng(0).integers(0, config.vocab_size, size=(batch, prompt_len))
    prompt_lists = prompts.tolist()

    def ours():
        out = generate(config, params, prompt_lists, max_new_tokens=new_tokens)
        assert all(len(t) == new_tokens for t in out.tokens)
        return out

    start = time.perf_counter()
    first = ours()
    compile_s = time.perf_counter() - start
    ours_s = _time_best(ours, repeats)

    with tempfile.TemporaryDirectory() as tmp:
        models.save_pretrained(config, params, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, dtype)).eval()
    ids = torch.as_tensor(prompts)
    mask = torch.ones_like(ids)

    def theirs():
        with torch.no_grad():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0, eos_token_id=None)

    hf_out = theirs()  # warm-up
    hf_s = _time_best(theirs, hf_repeats)
    same = sum(a == b for a, b in zip(first.tokens, hf_out[:, prompt_len:].tolist()))
    tokens = batch * new_tokens
    return dict(preset=name, dtype=dtype, params_m=config.num_params / 1e6, ours_tok_s=tokens / ours_s, hf_tok_s=tokens / hf_s,
                ratio=hf_s / ours_s, compile_s=compile_s, rows_identical=f"{same}/{batch}")


def bench_groups(name: str, groups: int, group_size: int, prompt_len: int, new_tokens: int, repeats: int) -> None:
    import jax
    import numpy as np

    from ftrl_jax import models
    from ftrl_jax.generate.sampling import generate

    config = models.preset(name)
    params = models.init_params(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    rows = groups * group_size
    distinct = [rng.integers(0, config.vocab_size, size=prompt_len).tolist() for _ in range(rows)]
    grouped = [p for p in distinct[:groups] for _ in range(group_size)]
    print(f"{name}: {rows} rows of {prompt_len}-token prompts, {new_tokens} new tokens, temperature 1")
    for label, prompts in ((f"{groups} prompts x {group_size} samples", grouped), (f"{rows} distinct prompts", distinct)):
        def run():
            return generate(config, params, prompts, max_new_tokens=new_tokens, temperature=1.0,
                            rng=jax.random.PRNGKey(1))
        run()  # compile
        seconds = _time_best(run, repeats)
        print(f"  {label}: {seconds:.2f} s ({rows * new_tokens / seconds:.0f} tokens/s)", flush=True)


def main(argv):
    del argv
    if FLAGS.groups:
        for name in FLAGS.presets:
            bench_groups(name, FLAGS.groups, FLAGS.group_size, FLAGS.prompt_len, FLAGS.new_tokens, FLAGS.repeats)
        return
    import jax
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); batch {FLAGS.batch}, prompt {FLAGS.prompt_len}, "
          f"{FLAGS.new_tokens} new tokens, greedy")
    print("| preset | dtype | params (M) | ftrl_jax tok/s | transformers tok/s | ratio | compile s | "
          "greedy rows identical |")
    print("|---|---|---|---|---|---|---|---|")
    for name in FLAGS.presets:
        for dtype in FLAGS.dtypes:
            r = bench_preset(name, dtype, FLAGS.batch, FLAGS.prompt_len, FLAGS.new_tokens, FLAGS.repeats,
                             FLAGS.hf_repeats)
            print(f"| {r['preset']} | {r['dtype']} | {r['params_m']:.1f} | {r['ours_tok_s']:.0f} | "
                  f"{r['hf_tok_s']:.0f} | {r['ratio']:.1f}x | {r['compile_s']:.1f} | {r['rows_identical']} |",
                  flush=True)


if __name__ == "__main__":
    app.run(main)
