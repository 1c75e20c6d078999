"""A local OpenAI-compatible HTTP server for the demo and the end-to-end tests.

`LocalOpenAIServer` serves ``POST /v1/chat/completions`` (streamed or not), ``POST
/v1/completions`` (legacy, streamed or not) and ``GET /v1/models`` on loopback, with the wire
format of the real API: Server-Sent Events (``data: {json}\\n\\n`` per chunk, then ``data:
[DONE]\\n\\n``) over HTTP/1.1 chunked transfer encoding, paced like a real model (a delay before
the first token, then one token every ``token_interval`` seconds). The chunk payloads come from
`chengeta_ai.testing.openai_chunk_dicts`; the content is deterministic per request: the seed is
a hash of the request's messages (or prompt), and the requested ``model`` is echoed.

Only the standard library is used: a `http.server.ThreadingHTTPServer` running in a daemon
thread, one thread per connection.

Failure injection, for tests of upstream errors mid-stream. Either per request, with headers::

    x-chengeta-fail-after: 5        # fail after 5 chunks have been sent (0: before the first)
    x-chengeta-fail-mode: close     # "close" (default): drop the connection without ending the
                                    # chunked body, so the client sees a protocol error;
                                    # "error": send an OpenAI error event and end the stream;
                                    # "end": end the body cleanly half way (no final chunk, no
                                    # [DONE]), as a proxy that cut the stream would

(pass them with the ``openai`` client's ``extra_headers=``), or for every request, with the
attributes `LocalOpenAIServer.fail_after` / `LocalOpenAIServer.fail_mode`. Headers win.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import sys
import threading
import time
from types import TracebackType
from typing import Any, Literal

from chengeta_ai.testing import TEXT, openai_chunk_dicts

__all__ = ["FailMode", "LocalOpenAIServer"]

FailMode = Literal["close", "error", "end"]

FAIL_AFTER_HEADER = "x-chengeta-fail-after"
FAIL_MODE_HEADER = "x-chengeta-fail-mode"

_SENTENCES = [s.strip() for s in TEXT.split(". ") if s.strip()]
_CREATED = 1_764_288_000


def _text_for(seed: int) -> str:
    """The reply text for a seed: the sentences of `TEXT`, rotated by the seed."""
    k = seed % len(_SENTENCES)
    rotated = _SENTENCES[k:] + _SENTENCES[:k]
    return ". ".join(s.rstrip(".") for s in rotated) + ". "


def _seed_for(payload: Any) -> int:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big")


def _error_body(
    message: str, type_: str = "invalid_request_error", code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


class _ClientGone(Exception):
    """The client closed the connection (or the server is stopping): stop writing."""


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked bodies, like api.openai.com
    server_version = "chengeta-local-openai/1"
    sys_version = ""
    timeout = 60  # idle keep-alive connections are dropped after this many seconds

    server: _HTTPServer

    # -- plumbing ---------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the demo's output is its own."""

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, add=False)

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _write_chunk(self, data: bytes) -> None:
        """Write one HTTP/1.1 chunk (``data`` must be non-empty)."""
        if self.server.owner._stopping.is_set():
            raise _ClientGone
        try:
            self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        except OSError as exc:  # BrokenPipeError, ConnectionResetError, ...
            raise _ClientGone from exc

    def _sleep(self, seconds: float) -> None:
        if seconds > 0 and self.server.owner._stopping.wait(seconds):
            raise _ClientGone

    def _abort_connection(self) -> None:
        """Drop the connection mid-body: no terminating chunk, so the body is truncated."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- routes -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            owner = self.server.owner
            self._send_json(
                200,
                {
                    "object": "list",
                    "data": [
                        {"id": m, "object": "model", "created": _CREATED, "owned_by": "chengeta"}
                        for m in owner.models
                    ],
                },
            )
        else:
            self._send_json(404, _error_body(f"Unknown path: GET {self.path}", code="not_found"))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if path not in ("/v1/chat/completions", "/v1/completions"):
            self._send_json(404, _error_body(f"Unknown path: POST {self.path}", code="not_found"))
            return
        try:
            body = json.loads(raw)
        except ValueError as exc:
            self._send_json(
                400,
                _error_body(
                    f"We could not parse the JSON body of your request. ({exc})",
                    code="invalid_json",
                ),
            )
            return
        if not isinstance(body, dict):
            self._send_json(400, _error_body("The request body must be a JSON object."))
            return
        chat = path == "/v1/chat/completions"
        field = "messages" if chat else "prompt"
        if field not in body:
            self._send_json(400, _error_body(f"Missing required parameter: '{field}'."))
            return
        if chat and not (isinstance(body["messages"], list) and body["messages"]):
            self._send_json(400, _error_body("'messages' must be a non-empty array."))
            return

        owner = self.server.owner
        owner._count_request(body)
        fail_after, fail_mode = owner._failure_for(self.headers)
        model = str(body.get("model") or "gpt-4o-mini")
        seed = _seed_for(body[field])
        try:
            if body.get("stream"):
                self._stream(
                    body,
                    chat=chat,
                    model=model,
                    seed=seed,
                    fail_after=fail_after,
                    fail_mode=fail_mode,
                )
            else:
                self._complete(
                    body,
                    chat=chat,
                    model=model,
                    seed=seed,
                    fail_after=fail_after,
                    fail_mode=fail_mode,
                )
        except _ClientGone:
            self.close_connection = True

    # -- responses --------------------------------------------------------------------------

    def _chunk_dicts(self, body: dict[str, Any], *, model: str, seed: int) -> list[dict[str, Any]]:
        opts = body.get("stream_options") or {}
        return list(
            openai_chunk_dicts(
                self.server.owner.tokens,
                seed=seed,
                model=model,
                text=_text_for(seed),
                include_usage=bool(opts.get("include_usage", False)),
                include_obfuscation=bool(opts.get("include_obfuscation", True)),
            )
        )

    def _stream(
        self,
        body: dict[str, Any],
        *,
        chat: bool,
        model: str,
        seed: int,
        fail_after: int | None,
        fail_mode: FailMode,
    ) -> None:
        owner = self.server.owner
        dicts = self._chunk_dicts(body, model=model, seed=seed)
        if not chat:
            dicts = _legacy_chunks(dicts)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("x-request-id", f"req_{seed:016x}")
        self.end_headers()
        self._sleep(owner.first_token_delay)
        for i, chunk in enumerate(dicts):
            if fail_after is not None and i >= fail_after:
                self._fail(fail_mode)
                return
            if i:
                self._sleep(owner.token_interval)
            self._write_chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if fail_after is not None and fail_after <= len(dicts):
            self._fail(fail_mode)
            return
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk_end()

    def _write_chunk_end(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
        except OSError as exc:
            raise _ClientGone from exc

    def _fail(self, mode: FailMode) -> None:
        if mode == "error":
            err = _error_body(
                "The server had an error while processing your request. (injected failure)",
                type_="server_error",
                code="injected_failure",
            )
            self._write_chunk(b"data: " + json.dumps(err).encode() + b"\n\n")
            self._write_chunk_end()
        elif mode == "end":
            self._write_chunk_end()
        else:
            self._abort_connection()

    def _complete(
        self,
        body: dict[str, Any],
        *,
        chat: bool,
        model: str,
        seed: int,
        fail_after: int | None,
        fail_mode: FailMode,
    ) -> None:
        owner = self.server.owner
        self._sleep(owner.first_token_delay + owner.token_interval * owner.tokens)
        if fail_after is not None:
            if fail_mode == "close":
                self._abort_connection()
            else:
                self._send_json(
                    500,
                    _error_body(
                        "The server had an error while processing your request. (injected failure)",
                        type_="server_error",
                        code="injected_failure",
                    ),
                )
            return
        dicts = list(
            openai_chunk_dicts(
                owner.tokens,
                seed=seed,
                model=model,
                text=_text_for(seed),
                include_obfuscation=False,
            )
        )
        head = dicts[0]
        text = "".join(d["choices"][0]["delta"].get("content") or "" for d in dicts)
        usage = {
            "prompt_tokens": 14,
            "completion_tokens": owner.tokens,
            "total_tokens": 14 + owner.tokens,
        }
        if chat:
            result: dict[str, Any] = {
                "id": head["id"],
                "object": "chat.completion",
                "created": head["created"],
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": text,
                            "refusal": None,
                            "annotations": [],
                        },
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
                "service_tier": head["service_tier"],
                "system_fingerprint": head["system_fingerprint"],
            }
        else:
            result = {
                "id": "cmpl-" + head["id"].removeprefix("chatcmpl-"),
                "object": "text_completion",
                "created": head["created"],
                "model": model,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
                "usage": usage,
            }
        self._send_json(200, result)


def _legacy_chunks(dicts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turn chat chunk payloads into legacy ``/v1/completions`` stream payloads."""
    out: list[dict[str, Any]] = []
    for d in dicts:
        if not d["choices"]:
            continue  # the usage chunk
        choice = d["choices"][0]
        if "role" in choice["delta"]:
            continue  # the legacy API has no role chunk
        out.append(
            {
                "id": "cmpl-" + d["id"].removeprefix("chatcmpl-"),
                "object": "text_completion",
                "created": d["created"],
                "model": d["model"],
                "choices": [
                    {
                        "text": choice["delta"].get("content") or "",
                        "index": 0,
                        "logprobs": None,
                        "finish_reason": choice["finish_reason"],
                    }
                ],
            }
        )
    return out


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: LocalOpenAIServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that hang up (keep-alive closes, aborted streams)."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class LocalOpenAIServer:
    """An OpenAI-compatible server on loopback, paced like a real model.

    Use it as a context manager (or call `start` / `stop`)::

        with LocalOpenAIServer() as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="local")
            for chunk in client.chat.completions.create(model="gpt-4o-mini", messages=[...],
                                                        stream=True):
                ...
            assert server.request_count == 1

    ``tokens`` is the number of content chunks per streamed reply (there are ``tokens + 2``
    chunks in all: role, tokens, finish; plus a usage chunk when ``stream_options.include_usage``
    is set). The pacing and failure attributes may be changed while the server runs; they are
    read at the start of each request.
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
        self.port = port
        self.first_token_delay = first_token_delay
        self.token_interval = token_interval
        self.tokens = tokens
        self.fail_after = fail_after
        self.fail_mode: FailMode = fail_mode
        self.models = ["gpt-4o-mini", "gpt-4o"]
        self._lock = threading.Lock()
        self._request_count = 0
        self._last_request: dict[str, Any] | None = None
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> LocalOpenAIServer:
        """Bind, then serve in a daemon thread. Returns ``self``."""
        if self._httpd is not None:
            raise RuntimeError("LocalOpenAIServer is already running")
        self._stopping.clear()
        httpd = _HTTPServer((self.host, self.port), _Handler)
        httpd.owner = self
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"LocalOpenAIServer:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop open connections (streams in flight end abruptly)."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if thread is not None:
            thread.join(timeout=5)
        self._httpd = None
        self._thread = None

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
        if self._httpd is None:
            raise RuntimeError("LocalOpenAIServer is not running; call start() first")
        return f"http://{self.host}:{self.port}/v1"

    @property
    def request_count(self) -> int:
        """Completion requests served so far (chat and legacy, streamed or not)."""
        with self._lock:
            return self._request_count

    @property
    def last_request(self) -> dict[str, Any] | None:
        """The JSON body of the latest completion request."""
        with self._lock:
            return self._last_request

    def reset_count(self) -> None:
        """Set `request_count` back to zero."""
        with self._lock:
            self._request_count = 0

    def _count_request(self, body: dict[str, Any]) -> None:
        with self._lock:
            self._request_count += 1
            self._last_request = body

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _failure_for(self, headers: Any) -> tuple[int | None, FailMode]:
        after: int | None = self.fail_after
        mode: FailMode = self.fail_mode
        raw_after = headers.get(FAIL_AFTER_HEADER)
        if raw_after is not None:
            after = int(raw_after)
        raw_mode = headers.get(FAIL_MODE_HEADER)
        if raw_mode is not None:
            word = raw_mode.strip().lower()
            mode = "error" if word == "error" else "end" if word == "end" else "close"
        return after, mode


if __name__ == "__main__":  # pragma: no cover - manual use
    with LocalOpenAIServer() as _server:
        print(f"serving on {_server.base_url} (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
