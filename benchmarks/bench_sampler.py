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
from collections.abc import Sequence

from absl import flags

from experiments import cli


def define_flags(fv: flags.FlagValues) -> None:
    from ftrl_jax.models.config import PRESETS

    flags.DEFINE_list("presets", ["tiny", "smol-135m"], "Model presets to benchmark.", flag_values=fv)
    cli.allow_only(fv, "presets", tuple(PRESETS))
    flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Parameter and compute dtypes, each run on both sides.",
                      flag_values=fv)
    flags.DEFINE_integer("batch", 16, "Prompts per batch.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("prompt_len", 64, "Prompt length in tokens.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("new_tokens", 128, "New tokens per prompt.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "Timed repetitions of our generate (the best is reported).", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("hf_repeats", 1, "Timed repetitions of transformers generate.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("groups", 0, "If > 0: group-sampling benchmark with this many distinct prompts.",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("group_size", 8, "Samples per prompt in the group-sampling benchmark.", lower_bound=1,
                         flag_values=fv)


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


def main(argv: Sequence[str]) -> int:
    try:
        args = cli.parse(argv, define_flags, __doc__)
    except cli.UsageError as exc:
        return cli.fail(exc)
    if args.groups:
        for name in args.presets:
            bench_groups(name, args.groups, args.group_size, args.prompt_len, args.new_tokens, args.repeats)
        return 0
    import jax
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy")
    print("| preset | dtype | params (M) | ftrl_jax tok/s | transformers tok/s | ratio | compile s | "
          "greedy rows identical |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.presets:
        for dtype in args.dtypes:
            r = bench_preset(name, dtype, args.batch, args.prompt_len, args.new_tokens, args.repeats, args.hf_repeats)
            print(f"| {r['preset']} | {r['dtype']} | {r['params_m']:.1f} | {r['ours_tok_s']:.0f} | "
                  f"{r['hf_tok_s']:.0f} | {r['ratio']:.1f}x | {r['compile_s']:.1f} | {r['rows_identical']} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
