"""Review: a key whose stored entry is valid, while a ``no_cache`` refresh of it is being
cancelled (its only caller left; the upstream is still closing).

The README says ``only_if_cached`` "never call[s] the upstream: replay the entry, or join a
stream of the key in flight in this process ...; else raise `CacheMiss`". The entry is there,
yet the lookup is skipped because the key's slot is occupied by the cancelling refresh, which
nobody may join: `_join_or_lead` then raises `CacheMiss`, and a plain caller waits for the
release and then leads a new upstream call (status ``miss``) instead of hitting the entry.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest
from tests.helpers import Upstream

from chengeta_ai import CacheManager, CacheMiss, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

M = [{"role": "user", "content": "hello"}]
A = ["a1", "a2", "a3"]
B = ["b1", "b2", "b3"]


def new_cache() -> StreamingResponseCache:
    return StreamingResponseCache(CacheManager(backend=InMemoryBackend()))


class SlowCloseSync:
    """A sync upstream (an SDK stream holding a socket) whose ``close()`` takes a while."""

    def __init__(self, chunks: list[Any]) -> None:
        self._it = iter(chunks)
        self.closing = threading.Event()
        self.may_close = threading.Event()

    def __iter__(self) -> SlowCloseSync:
        return self

    def __next__(self) -> Any:
        return next(self._it)

    def close(self) -> None:
        self.closing.set()
        self.may_close.wait(10)


class SlowCloseAsync:
    """An async upstream that waits for its next chunk and whose ``aclose()`` takes a while."""

    def __init__(self, chunks: list[Any]) -> None:
        self._chunks = list(chunks)
        self.closing = anyio.Event()
        self.may_close = anyio.Event()
        self.more = anyio.Event()

    def __aiter__(self) -> SlowCloseAsync:
        return self

    async def __anext__(self) -> Any:
        if not self._chunks:
            raise StopAsyncIteration
        if len(self._chunks) < len(B):
            await self.more.wait()
        return self._chunks.pop(0)

    async def aclose(self) -> None:
        self.closing.set()
        with anyio.fail_after(10):
            await self.may_close.wait()


def _refresh_left_sync(cache: StreamingResponseCache, refresh: SlowCloseSync) -> threading.Thread:
    """Starts a thread whose no_cache call reads one chunk and leaves: the refresh is then
    cancelled and its upstream closes slowly (the flight keeps its slot meanwhile)."""

    def run() -> None:
        stream = cache.get_or_stream(M, lambda m: refresh, cache_control={"no_cache": True})
        assert next(stream) == "b1"
        stream.close()  # blocks in refresh.close() until may_close

    t = threading.Thread(target=run)
    t.start()
    assert refresh.closing.wait(10)
    return t


def test_only_if_cached_while_a_refresh_is_cancelling_replays_the_entry_threads() -> None:
    cache = new_cache()
    assert list(cache.get_or_stream(M, Upstream(A).sync)) == A  # the entry
    refresh = SlowCloseSync(B)
    t = _refresh_left_sync(cache, refresh)
    try:
        stream = cache.get_or_stream(M, Upstream(A).sync, cache_control={"only_if_cached": True})
        try:
            got = list(stream)
        except CacheMiss as exc:  # the defect
            pytest.fail(f"only_if_cached raised CacheMiss with a valid entry stored: {exc}")
        assert got == A
        assert stream.cache_info is not None and stream.cache_info.status == "hit"
    finally:
        refresh.may_close.set()
        t.join(10)


def test_plain_call_while_a_refresh_is_cancelling_hits_the_entry_threads() -> None:
    cache = new_cache()
    assert list(cache.get_or_stream(M, Upstream(A).sync)) == A
    refresh = SlowCloseSync(B)
    t = _refresh_left_sync(cache, refresh)
    plain = Upstream(A)
    out: list[Any] = []

    def call() -> None:
        stream = cache.get_or_stream(M, plain.sync)
        out.append(list(stream))
        out.append(stream.cache_info)

    caller = threading.Thread(target=call)
    caller.start()
    caller.join(0.5)  # it waits for the cancelling refresh's release ...
    refresh.may_close.set()
    t.join(10)
    caller.join(10)
    assert out[0] == A
    # ... and then calls the upstream again although the entry was stored all along
    assert plain.calls == 0, "a plain call re-read the upstream of a key whose entry is stored"
    assert out[1].status == "hit"


async def _refresh_left_async(
    cache: StreamingResponseCache, refresh: SlowCloseAsync, tg: Any
) -> None:
    async def run() -> None:
        stream = cache.aget_or_stream(M, lambda m: refresh, cache_control={"no_cache": True})
        assert await stream.__anext__() == "b1"
        await stream.aclose()

    tg.start_soon(run)
    with anyio.fail_after(10):
        await refresh.closing.wait()


@pytest.mark.anyio
async def test_only_if_cached_while_a_refresh_is_cancelling_replays_the_entry_async() -> None:
    cache = new_cache()
    assert [c async for c in cache.aget_or_stream(M, Upstream(A).asyncgen)] == A
    refresh = SlowCloseAsync(B)
    async with anyio.create_task_group() as tg:
        await _refresh_left_async(cache, refresh, tg)
        try:
            stream = cache.aget_or_stream(
                M, Upstream(A).asyncgen, cache_control={"only_if_cached": True}
            )
            try:
                got = [c async for c in stream]
            except CacheMiss as exc:  # the defect
                pytest.fail(f"only_if_cached raised CacheMiss with a valid entry stored: {exc}")
            assert got == A
            assert stream.cache_info is not None and stream.cache_info.status == "hit"
        finally:
            refresh.may_close.set()


@pytest.mark.anyio
async def test_plain_call_while_a_refresh_is_cancelling_hits_the_entry_async() -> None:
    cache = new_cache()
    assert [c async for c in cache.aget_or_stream(M, Upstream(A).asyncgen)] == A
    refresh = SlowCloseAsync(B)
    plain = Upstream(A)
    out: list[Any] = []
    async with anyio.create_task_group() as tg:
        await _refresh_left_async(cache, refresh, tg)

        async def call() -> None:
            stream = cache.aget_or_stream(M, plain.asyncgen)
            out.append([c async for c in stream])
            out.append(stream.cache_info)

        tg.start_soon(call)
        await anyio.sleep(0.2)
        refresh.may_close.set()
    assert out[0] == A
    assert plain.calls == 0, "a plain call re-read the upstream of a key whose entry is stored"
    assert out[1].status == "hit"
