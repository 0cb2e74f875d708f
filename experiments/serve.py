"""Serves a policy over an OpenAI-compatible HTTP API (FastAPI, run by uvicorn).

    python -m experiments.serve --model=runs/tiny/export --port=8000
    curl http://127.0.0.1:8000/v1/models
    python -m experiments.evaluate --backend=openai --base_url=http://127.0.0.1:8000/v1 \\
        --model_name=runs/tiny/export --data=... --output=...

`--model` is a Hugging Face policy directory or a training WORKDIR (its export/ is served). Routes:
`POST /v1/chat/completions` (messages, tools, tool_choice auto/none/required/a named function, stream with
stream_options.include_usage, temperature, top_p, top_k, max_tokens, seed, stop, n,
chat_template_kwargs.enable_thinking), `GET /v1/models`, `GET /health`. Requests that arrive within
`--batch_window_ms` of each other (for at most `--max_wait_ms`) are generated together by the jit sampler;
a streamed reply is sent when its turn is complete. See ftrl_jax/serving/server.py and app.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from absl import flags

from experiments import cli
from ftrl_jax import serving
from ftrl_jax.text.templates import TEMPLATE_CHOICES, as_chat_format

API_KEY_ENV = "FTRL_SERVE_API_KEY"


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("model", None, "Hugging Face policy directory, a training WORKDIR (its export/), or a shipped "
                        "policy's name (tiny-instruct) (required).",
                        required=True, flag_values=fv)
    flags.DEFINE_string("tokenizer", "", "Tokenizer directory (empty: the policy's).", flag_values=fv)
    flags.DEFINE_string("dtype", "float32", "Parameter dtype (float32, bfloat16).", flag_values=fv)
    flags.DEFINE_integer("tensor_parallel", 1, "Devices to shard the weights over.", lower_bound=1, flag_values=fv)
    flags.DEFINE_enum("template", "auto", TEMPLATE_CHOICES,
                      "Chat template (auto: from the model type; checkpoint: the tokenizer's own).", flag_values=fv)
    flags.DEFINE_bool("enable_thinking", False,
                      "Qwen3 reasoning mode unless a request sets chat_template_kwargs.enable_thinking.",
                      flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of sampled requests that send no seed of their own.", flag_values=fv)
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind (0.0.0.0: every interface).", flag_values=fv)
    flags.DEFINE_integer("port", 8000, "Port to bind (0: any free port).", lower_bound=0, upper_bound=65535,
                         flag_values=fv)
    flags.DEFINE_string("served_model_name", "", "Model id clients send (empty: --model as given).", flag_values=fv)
    flags.DEFINE_integer("max_batch_size", 64, "Conversations generated in one sampler call at most.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_float("batch_window_ms", 5.0, "A batch closes when no request arrived for this long ...",
                       lower_bound=0.0, flag_values=fv)
    flags.DEFINE_float("max_wait_ms", 50.0, "... or this long after its first request.", lower_bound=0.0,
                       flag_values=fv)
    flags.DEFINE_integer("default_max_tokens", 512, "max_tokens of requests that send none.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("max_prompt_tokens", 0, "Prompt budget (0: the context minus the request's max_tokens).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_string("api_key", "", f"Require 'Authorization: Bearer KEY' (empty: ${API_KEY_ENV}; both empty: "
                        "no key).", flag_values=fv)
    flags.DEFINE_float("timeout", 600.0, "Seconds a request may wait for its turns before it is answered 503.",
                       lower_bound=0.001, flag_values=fv)
    flags.DEFINE_float("max_body_mb", 32.0, "Largest request body accepted, in MiB (larger: 413).", lower_bound=0.001,
                       flag_values=fv)
    flags.DEFINE_bool("verbose", False, "Log every request.", flag_values=fv)


def build_service(args: flags.FlagValues) -> serving.PolicyService:
    """The service for parsed flags (`serving.build_service`); raises what loading the policy raises."""
    return serving.build_service(
        args.model, served_model_name=args.served_model_name, tokenizer_dir=args.tokenizer or None,
        template=args.template, enable_thinking=args.enable_thinking,
        dtype=args.dtype, tensor_parallel=args.tensor_parallel, max_batch_size=args.max_batch_size,
        batch_window_s=args.batch_window_ms / 1000.0, max_wait_s=args.max_wait_ms / 1000.0,
        default_max_tokens=args.default_max_tokens, max_prompt_tokens=args.max_prompt_tokens or None,
        api_key=args.api_key or os.environ.get(API_KEY_ENV, ""), request_timeout_s=args.timeout, seed=args.seed)


def main(argv: Sequence[str]) -> int:
    try:
        args = cli.parse(argv, define_flags, __doc__)
        if args.verbose:
            logging.getLogger("ftrl_jax").setLevel(logging.DEBUG)
        service = build_service(args)
    except cli.UsageError as exc:
        return cli.fail(exc)
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, OSError) as exc:
        return cli.fail(exc)
    limits = service.limits

    def announce(base_url: str) -> None:
        print(f"serving {limits.model_name!r} ({as_chat_format(limits.template).name} template, context "
              f"{limits.context_length}) at {base_url}", flush=True)

    try:
        serving.serve(service, args.host, args.port, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                      log_level="debug" if args.verbose else "info", on_started=announce)
    except OSError as exc:
        return cli.fail(f"cannot serve on {args.host}:{args.port}: {exc}")
    return 0


if __name__ == "__main__":
    cli.run(main)
