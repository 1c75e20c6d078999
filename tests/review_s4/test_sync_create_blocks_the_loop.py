"""Review s4, finding: ``aget_or_stream`` calls a sync ``stream_fn`` on the event loop, so the
sync SDK's ``create(..., stream=True)`` blocks the loop until the response head (MEDIUM).

README ("Async, on asyncio and trio"): ``stream_fn`` may return "a sync iterable ... any other
sync iterable (a sync ``openai.Stream``, a generator) may block on I/O in ``next()``, so it is
read one ``next()`` at a time in a worker thread ... and the loop never waits on it"; the
"Mistakes" table: "a blocking sync iterator (``openai.OpenAI`` streaming) inside
``aget_or_stream``: not a mistake any more: it is read in a worker thread".

But `fanout._open_upstream` calls ``stream_fn(messages)`` itself on the event loop. With the
sync client, ``create(..., stream=True)`` sends the request and waits for the response head
before it returns the ``Stream`` (connect, TLS, and for a streamed reply the server's time to
its first byte): all of it on the loop, which is frozen for every other task meanwhile. Only the
``next()`` calls afterwards are moved to a thread.

The test is deterministic (no timing assertion): a real ``openai.OpenAI`` client talks to a
loopback HTTP server that holds the response head until a task on the event loop has run once
(or 2 s pass). On main the loop cannot run that task while ``create`` blocks it, so the server
gives up waiting and the assertion fails.

Fix direction: call a sync ``stream_fn`` (one that is not a coroutine / async generator
function) in the upstream reader thread too, e.g. make `ThreadedIterator` take the
zero-argument "open" callable and run it as its first step; the awaitable case stays on the loop.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import openai
import pytest

from chengeta_ai import CacheManager
from chengeta_ai.layers.streaming_cache import StreamingResponseCache


def _chunk(content: str | None, finish: str | None) -> bytes:
    delta: dict[str, Any] = {"content": content} if content is not None else {}
    body = {
        "id": "chatcmpl-s4",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class HeadHoldingServer:
    """Answers one streamed chat completion per connection, holding the response head until
    `loop_ran` is set (or 2 s pass); records whether it was set in time."""

    def __init__(self) -> None:
        self.loop_ran = threading.Event()
        self.released_by_loop: list[bool] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                while len(body) < length:
                    body += conn.recv(65536)
                self.released_by_loop.append(self.loop_ran.wait(2))
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"connection: close\r\n\r\n"
                    + _chunk("Hello", None)
                    + _chunk(None, "stop")
                    + b"data: [DONE]\n\n"
                )

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def held() -> Iterator[HeadHoldingServer]:
    srv = HeadHoldingServer()
    yield srv
    srv.close()


@pytest.mark.anyio
async def test_sync_create_runs_off_the_event_loop(held: HeadHoldingServer) -> None:
    cache = StreamingResponseCache(CacheManager())
    with openai.OpenAI(
        base_url=f"http://127.0.0.1:{held.port}/v1", api_key="sk", max_retries=0
    ) as client:

        def stream_fn(messages: Any) -> Any:
            return client.chat.completions.create(
                model="gpt-4o-mini", messages=messages, stream=True
            )

        async def loop_task() -> None:
            await anyio.sleep(0.05)
            held.loop_ran.set()

        chunks: list[Any] = []

        async def caller() -> None:
            messages = [{"role": "user", "content": "review s4"}]
            async for chunk in cache.aget_or_stream(messages, stream_fn, model_id="gpt-4o-mini"):
                chunks.append(chunk)

        async with anyio.create_task_group() as tg:
            tg.start_soon(caller)
            tg.start_soon(loop_task)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello"
    # observed on main: [False]: no other task could run while create() waited for the head
    assert held.released_by_loop == [True], "the event loop was blocked inside stream_fn"
