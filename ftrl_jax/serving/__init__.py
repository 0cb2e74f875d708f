"""Serving: an OpenAI-compatible chat-completions server for a policy (`server`: requests, batching, replies;
`app`: the FastAPI app, run by uvicorn) and a turn generator that talks to any such server (`client`)."""

from ftrl_jax.serving.app import ServerThread, create_app, serve, start_server
from ftrl_jax.serving.server import (BatchingEngine, LoadedPolicy, PolicyService, RequestError, SamplingKey,
                                     ServedPolicy, ServerLimits, build_service, call_opening, load_policy,
                                     local_policy_factory, parse_chat_request, resolve_policy_dir,
                                     save_random_policy)

__all__ = [
    "BatchingEngine", "LoadedPolicy", "PolicyService", "RequestError", "SamplingKey", "ServedPolicy", "ServerLimits",
    "ServerThread", "build_service", "call_opening", "create_app", "load_policy", "local_policy_factory",
    "parse_chat_request", "resolve_policy_dir", "save_random_policy", "serve", "start_server",
]
