"""Review: a ``no_cache`` refresh that supersedes a stream whose store is in progress.

README: "A stream of the key already in flight is superseded: it goes on for its consumers,
is not stored, and new callers join the refresh"; ``no_cache`` "replace[s] the entry when it
ends". `FlightState.supersede` only marks a *RUNNING* flight not-to-store: a flight in
FINISHING (its upstream ended, its backend write under way: still in the slot, still
joinable) is superseded without that mark, so its write lands whenever the backend finishes,
after the refresh's own store: the entry is the older stream and the refresh is lost.
A slow backend write (Redis or SQLite under load) is all it takes.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest
from tests.helpers import Upstream

from chengeta_ai import CacheManager, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

M = [{"role": "user", "content": "hello"}]
A = ["a1", "a2", "a3"]
B = ["b1", "b2", "b3"]


class SlowFirstWrite(InMemoryBackend):
    """An in-memory backend whose first write is slow (held until ``release``)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self.aentered: anyio.Event | None = None
        self.arelease: anyio.Event | None = None

    def set(self, key: str, value: bytes, ttl: Any = None, tags: Any = ()) -> None:
        self.writes += 1
        if self.writes == 1:
            self.entered.set()
            self.release.wait(10)
        super().set(key, value, ttl, tags)

    async def aset(self, key: str, value: bytes, ttl: Any = None, tags: Any = ()) -> None:
        self.writes += 1
        if self.writes == 1:
            assert self.aentered is not None and self.arelease is not None
            self.aentered.set()
            await self.arelease.wait()
        super().set(key, value, ttl, tags)


def test_a_superseded_stream_storing_slowly_does_not_overwrite_the_refresh_threads() -> None:
    backend = SlowFirstWrite()
    cache = StreamingResponseCache(CacheManager(backend=backend))
    old = Upstream(A)
    out: list[Any] = []

    def first() -> None:
        stream = cache.get_or_stream(M, old.sync)
        out.append(list(stream))
        out.append(stream.cache_info)

    t = threading.Thread(target=first)
    t.start()
    assert backend.entered.wait(10)  # the old stream ended; its write is under way
    refresh = cache.get_or_stream(M, Upstream(B).sync, cache_control={"no_cache": True})
    assert list(refresh) == B
    assert refresh.cache_info is not None
    assert (refresh.cache_info.status, refresh.cache_info.outcome) == ("refresh", "stored")
    backend.release.set()
    t.join(10)
    assert out[0] == A
    after = cache.get_or_stream(M, Upstream(["x"]).sync)
    assert list(after) == B, "the refresh was overwritten by the stream it superseded"


@pytest.mark.anyio
async def test_a_superseded_stream_storing_slowly_does_not_overwrite_the_refresh_async() -> None:
    backend = SlowFirstWrite()
    backend.aentered = anyio.Event()
    backend.arelease = anyio.Event()
    cache = StreamingResponseCache(CacheManager(backend=backend))
    out: list[Any] = []
    async with anyio.create_task_group() as tg:

        async def first() -> None:
            stream = cache.aget_or_stream(M, Upstream(A).asyncgen)
            out.append([c async for c in stream])

        tg.start_soon(first)
        with anyio.fail_after(10):
            await backend.aentered.wait()
        refresh = cache.aget_or_stream(M, Upstream(B).asyncgen, cache_control={"no_cache": True})
        assert [c async for c in refresh] == B
        assert refresh.cache_info is not None
        assert (refresh.cache_info.status, refresh.cache_info.outcome) == ("refresh", "stored")
        backend.arelease.set()
    assert out[0] == A
    after = cache.aget_or_stream(M, Upstream(["x"]).asyncgen)
    assert [c async for c in after] == B, "the refresh was overwritten by the stream it superseded"
