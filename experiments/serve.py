"""Serves a policy over an OpenAI-compatible HTTP API (stdlib `http.server`, no extra dependencies).

    python -m experiments.serve --model=runs/tiny/export --port=8000
    curl http://127.0.0.1:8000/v1/models
    python -m experiments.evaluate --backend=openai --base_url=http://127.0.0.1:8000/v1 \\
        --model_name=runs/tiny/export --data=... --output=...

`--model` is a Hugging Face policy directory or a training WORKDIR (its export/ is served). Routes:
`POST /v1/chat/completions` (messages, tools, temperature, top_p, top_k, max_tokens, seed, stop, n,
chat_template_kwargs.enable_thinking), `GET /v1/models`, `GET /health`. Requests that arrive within
`--batch_window_ms` of each other (for at most `--max_wait_ms`) are generated together by the jit
sampler. See ftrl_jax/serving/server.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from ftrl_jax import serving


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="policy directory (Hugging Face format) or training WORKDIR")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    parser.add_argument("--served_model_name", default="", help="model id clients send (default: --model as given)")
    parser.add_argument("--tokenizer", default="", help="tokenizer directory (default: the policy's)")
    parser.add_argument("--template", default=None, choices=("qwen2.5", "qwen3"),
                        help="chat template (default: from the model type)")
    parser.add_argument("--enable_thinking", action="store_true",
                        help="Qwen3 reasoning mode unless a request sets chat_template_kwargs.enable_thinking")
    parser.add_argument("--dtype", default="float32", help="parameter dtype (float32, bfloat16)")
    parser.add_argument("--tensor_parallel", type=int, default=1, help="devices to shard the weights over")
    parser.add_argument("--max_batch_size", type=int, default=64, help="conversations generated in one call at most")
    parser.add_argument("--batch_window_ms", type=float, default=5.0,
                        help="a batch closes when no request arrived for this long ...")
    parser.add_argument("--max_wait_ms", type=float, default=50.0,
                        help="... or this long after its first request")
    parser.add_argument("--default_max_tokens", type=int, default=512, help="max_tokens of requests that send none")
    parser.add_argument("--max_prompt_tokens", type=int, default=None,
                        help="prompt budget (default: the context minus the request's max_tokens)")
    parser.add_argument("--api_key", default=os.environ.get("FTRL_SERVE_API_KEY", ""),
                        help="require 'Authorization: Bearer KEY' (default: $FTRL_SERVE_API_KEY; empty: open)")
    parser.add_argument("--max_body_mb", type=float, default=32.0, help="largest request body accepted")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    return parser


def build_service(args: argparse.Namespace) -> serving.PolicyService:
    """The service for these flags (`serving.build_service`)."""
    return serving.build_service(
        args.model, served_model_name=args.served_model_name, tokenizer_dir=args.tokenizer or None,
        template=args.template, enable_thinking=args.enable_thinking, dtype=args.dtype,
        tensor_parallel=args.tensor_parallel, max_batch_size=args.max_batch_size,
        batch_window_s=args.batch_window_ms / 1000.0, max_wait_s=args.max_wait_ms / 1000.0,
        default_max_tokens=args.default_max_tokens, max_prompt_tokens=args.max_prompt_tokens, api_key=args.api_key)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)
    try:
        service = build_service(args)
        server = serving.make_server(service, args.host, args.port, max_body_bytes=int(args.max_body_mb * (1 << 20)))
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"serving {service.limits.model_name!r} ({service.limits.template} template, context "
          f"{service.limits.context_length}) at {server.base_url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        service.engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
