"""Review: a ``no_cache`` refresh does not supersede a stream of the key in flight in another
scope of the same process (sync threads vs an event loop, or another event loop).

README: "A stream of the key already in flight is superseded: it goes on for its consumers, is
not stored". Flights are keyed by ``(scope, key)`` (threads, or one event loop), and the
supersede happens only inside the caller's own scope: in an app that serves some requests from
threads (FastAPI's sync endpoints, a worker pool) and others on the loop, an async refresh
leaves the older sync stream to finish and store *after* it, and the entry is the old answer.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import anyio.to_thread
import pytest
from tests.helpers import Upstream

from chengeta_ai import CacheManager, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

M = [{"role": "user", "content": "two scopes"}]
A = ["a1", "a2", "a3"]
B = ["b1", "b2", "b3"]


@pytest.mark.anyio
async def test_an_async_refresh_supersedes_a_sync_stream_in_flight() -> None:
    cache = StreamingResponseCache(CacheManager(backend=InMemoryBackend()))
    old = Upstream(A, pause_at=1)
    started = threading.Event()
    out: list[Any] = []

    def sync_caller() -> None:
        stream = cache.get_or_stream(M, old.sync)
        first = next(stream)
        started.set()
        out.append([first, *stream])
        out.append(stream.cache_info)

    t = threading.Thread(target=sync_caller)
    t.start()
    assert await anyio.to_thread.run_sync(started.wait, 10)
    refresh = cache.aget_or_stream(M, Upstream(B).asyncgen, cache_control={"no_cache": True})
    assert [c async for c in refresh] == B
    assert refresh.cache_info is not None and refresh.cache_info.outcome == "stored"
    old.thread_gate.set()
    await anyio.to_thread.run_sync(t.join, 10)
    assert out[0] == A
    after = cache.aget_or_stream(M, Upstream(["x"]).asyncgen)
    assert [c async for c in after] == B, (
        f"the refresh was overwritten by an older stream ({out[1].outcome})"
    )


def test_a_sync_refresh_supersedes_an_async_stream_in_flight() -> None:
    cache = StreamingResponseCache(CacheManager(backend=InMemoryBackend()))
    old = Upstream(A, pause_at=1)
    started = threading.Event()
    proceed = threading.Event()
    out: list[Any] = []

    async def async_caller() -> None:
        old.gate = anyio.Event()
        stream = cache.aget_or_stream(M, old.asyncgen)
        first = await stream.__anext__()
        started.set()
        await anyio.to_thread.run_sync(proceed.wait, 10)
        old.gate.set()
        out.append([first, *[c async for c in stream]])

    t = threading.Thread(target=anyio.run, args=(async_caller,))
    t.start()
    assert started.wait(10)
    refresh = cache.get_or_stream(M, Upstream(B).sync, cache_control={"no_cache": True})
    assert list(refresh) == B
    proceed.set()
    t.join(10)
    assert out[0] == A
    assert list(cache.get_or_stream(M, Upstream(["x"]).sync)) == B, (
        "the refresh was overwritten by an older stream"
    )
