"""The web side of the OpenAI-compatible server: a FastAPI app around a `PolicyService`, run by uvicorn.

Routes: `POST /v1/chat/completions` (JSON, or server-sent events with `stream=true`), `GET /v1/models`,
`GET /v1/models/{id}` and `GET /health` (never behind the API key). Every refusal, unknown routes and
methods included, is an OpenAI error body `{"error": {"message", "type", "param", "code"}}` with its
status. Request handlers are coroutines: a request waits for its turns on the batching engine without
holding a thread, so many concurrent clients cost one event loop and the engine's worker.

    service = serving.build_service("runs/tiny/export", served_model_name="tiny")
    with serving.start_server(service) as server:      # 127.0.0.1, a free port, a background thread
        openai.OpenAI(base_url=server.base_url, api_key="x").models.list()

`serve` runs the same app in the foreground until SIGINT/SIGTERM (`python -m experiments.serve`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import fastapi
import uvicorn
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ftrl_jax.serving.server import PolicyService, RequestError

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 32 << 20


def _error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def _read_body(request: fastapi.Request, max_body_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `max_body_bytes`."""

    def too_large(size: str) -> RequestError:
        return RequestError(413, f"the request body has {size} bytes, over this server's limit of {max_body_bytes}; "
                            "send fewer or shorter messages", code="request_too_large")

    length = request.headers.get("content-length")
    if length is not None and not length.isdigit():
        raise RequestError(400, f"Content-Length must be a byte count, got {length!r}", param=None)
    if length is not None and int(length) > max_body_bytes:
        raise too_large(length)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise too_large(f"more than {max_body_bytes}")
        chunks.append(chunk)
    return b"".join(chunks)


class ClientDisconnected(Exception):
    """The client closed its connection while its request waited for its turns."""


async def _disconnected(request: fastapi.Request) -> None:
    """Returns once the client has gone (the body is already read, so the next ASGI message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _turns_unless_disconnected(request: fastapi.Request, future: Any, timeout_s: float) -> Any:
    """The result of the engine's `future`; TimeoutError after `timeout_s` seconds, ClientDisconnected as soon
    as the client closes its connection (a client that timed out and retries must not leave its first request
    queued), and the future's exception when generation failed."""
    turns = asyncio.ensure_future(asyncio.wrap_future(future))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({turns, gone}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not gone.done():  # stop listening before the response (a streamed one listens itself) is sent
            gone.cancel()
            await asyncio.wait({gone})
    if turns in done:
        return turns.result()
    turns.cancel()
    if gone in done:
        gone.exception()  # a receive that failed means the connection is unusable too
        raise ClientDisconnected()
    raise TimeoutError(f"no turns within {timeout_s:g} s")


def create_app(service: PolicyService, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> fastapi.FastAPI:
    """The FastAPI app serving `service` (routes in the module notes); bodies over `max_body_bytes` get 413.

    Raises ValueError when `max_body_bytes` < 1.
    """
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")

    def check_key(authorization: str | None = fastapi.Header(default=None)) -> None:
        service.check_api_key(authorization)

    app = fastapi.FastAPI(title="ftrl_jax", docs_url=None, redoc_url=None, openapi_url=None)
    api = fastapi.APIRouter(prefix="/v1", dependencies=[fastapi.Depends(check_key)])

    @app.exception_handler(RequestError)
    async def request_error(_: fastapi.Request, exc: RequestError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: fastapi.Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            error = RequestError(404, f"no route {request.method} {request.url.path}; this server answers POST "
                                 "/v1/chat/completions, GET /v1/models and GET /health", code="not_found")
        elif exc.status_code == 405:
            error = RequestError(405, f"{request.method} is not allowed on {request.url.path}",
                                 code="method_not_allowed")
        else:
            error = RequestError(exc.status_code, str(exc.detail))
        return _error_response(error)

    @app.exception_handler(Exception)
    async def unexpected_error(_: fastapi.Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error while answering a request")
        return _error_response(RequestError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/models")
    async def models() -> dict[str, Any]:
        return service.models()

    @api.get("/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        return service.model(name)

    @api.post("/chat/completions")
    async def chat_completions(request: fastapi.Request) -> Any:
        chat = service.parse(await _read_body(request, max_body_bytes))
        future = service.submit(chat)
        try:
            turns = await _turns_unless_disconnected(request, future, service.request_timeout_s)
        except ClientDisconnected:
            future.cancel()  # a request still queued is dropped rather than generated for nobody
            logger.info("a client closed its connection before its turns were ready; its request is dropped")
            return fastapi.Response(status_code=499)  # nobody reads it
        except asyncio.CancelledError:  # shutdown cancels requests still waiting after the graceful period
            future.cancel()
            return _error_response(RequestError(
                503, "the server shut down before this request's turns were ready; retry when it is serving again",
                type="server_error", code="shutting_down"))
        except Exception as exc:  # noqa: BLE001 - a time-out or a failed generation, told to the client
            future.cancel()
            raise service.generation_error(exc) from None
        if not chat.stream:
            return JSONResponse(service.completion(chat, turns))
        events = service.stream_events(chat, turns)

        async def send() -> AsyncIterator[str]:
            for event in events:
                yield event

        return StreamingResponse(send(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app.include_router(api)
    return app


def _config(service: PolicyService, host: str, port: int, max_body_bytes: int, log_level: str,
            graceful_shutdown_s: int) -> uvicorn.Config:
    return uvicorn.Config(create_app(service, max_body_bytes=max_body_bytes), host=host, port=port,
                          log_level=log_level, log_config=None, access_log=log_level == "debug", lifespan="off",
                          timeout_graceful_shutdown=graceful_shutdown_s, timeout_keep_alive=30)


def _listening_socket(config: uvicorn.Config) -> socket.socket:
    # Bound and listening before uvicorn starts: port 0 has its real port, and a client that connects as soon
    # as the address is announced waits in the backlog instead of being refused.
    sock = config.bind_socket()
    sock.listen(config.backlog)
    return sock


class ServerThread:
    """uvicorn serving a `PolicyService` on a daemon thread (made by `start_server`).

    `base_url` is the API root clients use (`http://HOST:PORT/v1`), `url` the server root, `port` the bound
    port. `stop()` (or leaving a `with` block) stops serving and, unless told not to, closes the service's
    batching engine.
    """

    def __init__(self, service: PolicyService, host: str = "127.0.0.1", port: int = 0, *,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, log_level: str = "warning",
                 graceful_shutdown_s: int = 5) -> None:
        self.service = service
        config = _config(service, host, port, max_body_bytes, log_level, graceful_shutdown_s)
        self._socket = _listening_socket(config)
        self._server = uvicorn.Server(config)
        self.host = host
        self.port = self._socket.getsockname()[1]
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name=f"policy-server-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        """The server root, e.g. http://127.0.0.1:8000."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The API root clients use, e.g. http://127.0.0.1:8000/v1."""
        return self.url + "/v1"

    def start(self, timeout_s: float = 30.0) -> "ServerThread":
        """Starts serving and waits until uvicorn accepts connections; raises RuntimeError if it does not
        within `timeout_s` seconds."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop(close_service=False)
                raise RuntimeError(f"the server on {self.url} did not start within {timeout_s:g} s; see the log")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0, *, close_service: bool = True) -> None:
        """Stops serving (open connections get `graceful_shutdown_s` to finish), then closes the service's
        batching engine unless `close_service` is False. Safe to call twice."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._socket.close()
        if close_service:
            self.service.close()

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def start_server(service: PolicyService, host: str = "127.0.0.1", port: int = 0, *,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, log_level: str = "warning") -> ServerThread:
    """Serves `service` on host:port (port 0: any free port) from a background thread, started.

    Returns the `ServerThread` (`base_url`, `stop()`, usable as a context manager). Raises OSError when the
    address cannot be bound and RuntimeError when the server does not start.
    """
    return ServerThread(service, host, port, max_body_bytes=max_body_bytes, log_level=log_level).start()


def serve(service: PolicyService, host: str = "127.0.0.1", port: int = 8000, *,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, log_level: str = "info",
          on_started: Any = None) -> None:
    """Serves `service` in the foreground until SIGINT (then returns) or SIGTERM (uvicorn shuts down, then the
    signal's default action ends the process), closing its batching engine either way.

    `on_started(base_url)` is called once the socket listens (port 0 resolved); connections made from then on
    wait until uvicorn accepts them.
    Raises OSError when the address cannot be bound.
    """
    config = _config(service, host, port, max_body_bytes, log_level, graceful_shutdown_s=5)
    sock = _listening_socket(config)
    try:
        bound = sock.getsockname()[1]
        if on_started is not None:
            on_started(f"http://{f'[{host}]' if ':' in host else host}:{bound}/v1")
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it shut down on: the normal way to stop
            pass
    finally:
        sock.close()
        service.close()


__all__: Sequence[str] = ("DEFAULT_MAX_BODY_BYTES", "ServerThread", "create_app", "serve", "start_server")
