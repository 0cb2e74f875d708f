"""Serving: an OpenAI-compatible chat-completions server for a policy (`server`) and a turn generator that
talks to any such server (`client`)."""

from ftrl_jax.serving.server import (BatchingEngine, LoadedPolicy, PolicyHTTPServer, PolicyService, RequestError,
                                     SamplingKey, ServerLimits, build_service, load_policy, local_policy_factory,
                                     make_server, parse_chat_request, resolve_policy_dir, save_random_policy,
                                     start_in_thread)

__all__ = [
    "BatchingEngine", "LoadedPolicy", "PolicyHTTPServer", "PolicyService", "RequestError", "SamplingKey",
    "ServerLimits", "build_service", "load_policy", "local_policy_factory", "make_server", "parse_chat_request",
    "resolve_policy_dir", "save_random_policy", "start_in_thread",
]
