"""A local upstream for the demo and the end-to-end tests: the APIs' real wire formats on loopback.

`LocalOpenAIServer` runs the Starlette app of `chengeta_ai.demo.app` with uvicorn (what users
deploy) in a background thread, on a free loopback port. It serves, streamed (Server-Sent
Events over HTTP/1.1 chunked transfer encoding, the real event names) or not:

- ``POST /v1/chat/completions``: OpenAI Chat Completions (``stream_options.include_usage``,
  ``include_obfuscation``, ``n`` > 1; the ``x-request-id`` header);
- ``POST /v1/completions``: OpenAI legacy Completions;
- ``POST /v1/responses``: OpenAI Responses (``response.created`` ... ``response.completed``);
- ``POST /v1/messages``: Anthropic Messages (``message_start`` ... ``message_stop``);
- ``GET /v1/models``: the model list (Anthropic's shape for the ``anthropic`` client).

The event sequences are documented in `chengeta_ai.demo.apis`, the pacing and the failure
injection (headers ``x-chengeta-fail-after`` / ``x-chengeta-fail-mode``, or the attributes
`LocalOpenAIServer.fail_after` / `LocalOpenAIServer.fail_mode`) in `chengeta_ai.demo.app`.
The reply is deterministic per prompt (the seed is a hash of the prompt) and echoes the model.

Starlette and uvicorn come with the ``demo`` extra (``pip install 'chengeta_ai[demo]'``); they
are imported by `LocalOpenAIServer.start`, so this module imports without them.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

from chengeta_ai.demo.apis import (
    ENDPOINTS,
    FAIL_AFTER_HEADER,
    FAIL_MODE_HEADER,
    Endpoint,
    FailMode,
)

if TYPE_CHECKING:
    import uvicorn

__all__ = [
    "FAIL_AFTER_HEADER",
    "FAIL_MODE_HEADER",
    "FailMode",
    "LocalOpenAIServer",
    "RequestCounts",
]

#: How long `LocalOpenAIServer.start` waits for uvicorn to listen, and `stop` for it to end.
STARTUP_TIMEOUT = 10.0
SHUTDOWN_TIMEOUT = 10.0


class RequestCounts(NamedTuple):
    """Requests served per endpoint (a snapshot; see `LocalOpenAIServer.request_counts`)."""

    chat_completions: int = 0
    completions: int = 0
    responses: int = 0
    messages: int = 0
    models: int = 0

    @property
    def generations(self) -> int:
        """Requests for a reply (every endpoint but ``/v1/models``): `request_count`."""
        return self.chat_completions + self.completions + self.responses + self.messages


class LocalOpenAIServer:
    """An OpenAI- and Anthropic-compatible server on loopback, paced like a real model.

    Use it as a context manager (or call `start` / `stop`)::

        with LocalOpenAIServer() as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="local")
            for chunk in client.chat.completions.create(model="gpt-4o-mini", messages=[...],
                                                        stream=True):
                ...
            assert server.request_count == 1

    The ``anthropic`` client takes ``base_url=server.anthropic_base_url`` (no ``/v1``).

    ``tokens`` is the number of content tokens per reply (a streamed chat reply has
    ``tokens + 2`` chunks: role, tokens, finish; plus a usage chunk when
    ``stream_options.include_usage`` is set). The pacing and failure attributes may be changed
    while the server runs; they are read at the start of each request.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        first_token_delay: float = 0.25,
        token_interval: float = 0.02,
        tokens: int = 60,
        *,
        fail_after: int | None = None,
        fail_mode: FailMode = "close",
    ) -> None:
        self.host = host
        self.port = port  # the port bound once started (the one asked for, or a free one)
        self._requested_port = port
        self.first_token_delay = first_token_delay
        self.token_interval = token_interval
        self.tokens = tokens
        self.fail_after = fail_after
        self.fail_mode: FailMode = fail_mode
        self.models = ["gpt-4o-mini", "gpt-4o"]
        self.anthropic_models = ["claude-sonnet-4-6", "claude-haiku-4-5"]
        self._lock = threading.Lock()  # guards the counters and the last request
        self._counts = dict.fromkeys(ENDPOINTS, 0)
        self._last_request: dict[str, Any] | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._failed: BaseException | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> LocalOpenAIServer:
        """Bind, serve in a background thread, return once uvicorn listens. Returns ``self``."""
        if self._server is not None:
            raise RuntimeError("LocalOpenAIServer is already running")
        try:
            import uvicorn

            from chengeta_ai.demo.app import build_app, hide_injected_aborts
        except ImportError as exc:
            from chengeta_ai._optional import missing_extra

            raise missing_extra(exc.name or "uvicorn", "LocalOpenAIServer", "demo") from exc

        hide_injected_aborts()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port))
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        # Created here, bound to the server's loop when first awaited there; set from other
        # threads only through loop.call_soon_threadsafe.
        stopping = asyncio.Event()
        config = uvicorn.Config(
            build_app(self, self._record, stopping),
            loop="asyncio",
            http="h11",
            ws="none",
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_keep_alive=60,  # idle keep-alive connections are dropped after this
            timeout_graceful_shutdown=int(SHUTDOWN_TIMEOUT / 2),
        )
        server = uvicorn.Server(config)
        self._socket, self._server, self._stopping = sock, server, stopping
        self._failed = None
        self._thread = threading.Thread(
            target=self._serve, args=(server, sock), name=f"LocalOpenAIServer:{self.port}"
        )
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                failed = self._failed
                self.stop()
                raise RuntimeError("LocalOpenAIServer did not start") from failed
            time.sleep(0.002)
        return self

    def _serve(self, server: uvicorn.Server, sock: socket.socket) -> None:
        """The server thread: one asyncio loop running uvicorn until `stop`."""

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            await server.serve(sockets=[sock])

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by start(); the thread ends quietly
            self._failed = exc

    def stop(self) -> None:
        """Stop serving: replies in flight are dropped, keep-alive connections closed, the
        thread joined and the socket closed. Idempotent."""
        server, thread, sock = self._server, self._thread, self._socket
        if server is None:
            return
        server.should_exit = True  # uvicorn polls it every 0.1 s
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:  # the loop has already closed
                pass
        if thread is not None:
            thread.join(timeout=SHUTDOWN_TIMEOUT)
        if sock is not None:
            sock.close()  # uvicorn closes it too; closing twice is harmless
        self._server = self._thread = self._socket = None
        self._loop = self._stopping = None

    def __enter__(self) -> LocalOpenAIServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- state ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The URL to give the ``openai`` client, e.g. ``http://127.0.0.1:54321/v1``."""
        return self.anthropic_base_url + "/v1"

    @property
    def anthropic_base_url(self) -> str:
        """The URL to give the ``anthropic`` client, e.g. ``http://127.0.0.1:54321``."""
        if self._server is None:
            raise RuntimeError("LocalOpenAIServer is not running; call start() first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def request_count(self) -> int:
        """Requests for a reply served so far: chat, legacy, Responses and Messages, streamed
        or not (``/v1/models`` is not counted; see `request_counts`)."""
        return self.request_counts.generations

    @property
    def request_counts(self) -> RequestCounts:
        """Requests served so far, per endpoint."""
        with self._lock:
            return RequestCounts(**self._counts)

    @property
    def last_request(self) -> dict[str, Any] | None:
        """The JSON body of the latest request for a reply."""
        with self._lock:
            return self._last_request

    def reset_count(self) -> None:
        """Set every request counter back to zero."""
        with self._lock:
            self._counts = dict.fromkeys(ENDPOINTS, 0)

    def _record(self, endpoint: Endpoint, body: dict[str, Any] | None) -> None:
        """Called by the app (in the server thread) for each valid request."""
        with self._lock:
            self._counts[endpoint] += 1
            if body is not None:
                self._last_request = body


if __name__ == "__main__":  # pragma: no cover - manual use
    with LocalOpenAIServer() as _server:
        print(f"serving on {_server.base_url} (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
