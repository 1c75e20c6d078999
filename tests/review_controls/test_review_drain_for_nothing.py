"""Review: ``on_abandon="finish"`` reads a stream to the end for nobody when it cannot be stored.

``on_abandon="finish"`` exists to store a stream whose callers all left ("reads it to the end in
the background and stores it"). `FlightState.consumer_left` drains whatever the stream's store
decision is: a ``no_store`` call's stream (nobody wants it stored) and a stream superseded by a
``no_cache`` refresh (never stored) are read to their end from the upstream, tokens billed, for
no consumer and no entry; they should be cancelled like under ``"cancel"``.
"""

from __future__ import annotations

import time

import anyio
import pytest
from tests.helpers import Upstream

from chengeta_ai import CacheManager, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

M = [{"role": "user", "content": "nobody wants this"}]
CHUNKS = [f"c{i}" for i in range(6)]


def new_cache() -> StreamingResponseCache:
    return StreamingResponseCache(CacheManager(backend=InMemoryBackend()), on_abandon="finish")


def _settle_sync(cache: StreamingResponseCache, up: Upstream) -> None:
    deadline = time.monotonic() + 10
    while (cache.stats().in_flight or up.closed == 0) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_no_store_stream_left_by_its_caller_is_not_drained_threads() -> None:
    cache = new_cache()
    up = Upstream(CHUNKS, pause_at=1)
    stream = cache.get_or_stream(M, up.sync, cache_control={"no_store": True})
    assert next(stream) == "c0"
    stream.close()
    up.thread_gate.set()
    _settle_sync(cache, up)
    assert cache.stats().stores == 0
    assert up.completed == 0, "a no_store stream nobody reads was read to its end"


def test_a_superseded_stream_left_by_its_caller_is_not_drained_threads() -> None:
    cache = new_cache()
    up = Upstream(CHUNKS, pause_at=1)
    stream = cache.get_or_stream(M, up.sync)
    assert next(stream) == "c0"
    refresh = cache.get_or_stream(M, Upstream(["r"]).sync, cache_control={"no_cache": True})
    assert list(refresh) == ["r"]
    stream.close()
    up.thread_gate.set()
    _settle_sync(cache, up)
    assert up.completed == 0, "a superseded stream nobody reads was read to its end"


@pytest.mark.anyio
async def test_a_no_store_stream_left_by_its_caller_is_not_drained_async() -> None:
    cache = new_cache()
    up = Upstream(CHUNKS, pause_at=1)
    up.gate = anyio.Event()
    stream = cache.aget_or_stream(M, up.asyncgen, cache_control={"no_store": True})
    assert await stream.__anext__() == "c0"
    await stream.aclose()
    up.gate.set()
    with anyio.fail_after(10):
        while cache.stats().in_flight or up.closed == 0:
            await anyio.sleep(0.01)
    assert cache.stats().stores == 0
    assert up.completed == 0, "a no_store stream nobody reads was read to its end"


@pytest.mark.anyio
async def test_a_superseded_stream_left_by_its_caller_is_not_drained_async() -> None:
    cache = new_cache()
    up = Upstream(CHUNKS, pause_at=1)
    up.gate = anyio.Event()
    stream = cache.aget_or_stream(M, up.asyncgen)
    assert await stream.__anext__() == "c0"
    refresh = cache.aget_or_stream(M, Upstream(["r"]).asyncgen, cache_control={"no_cache": True})
    assert [c async for c in refresh] == ["r"]
    await stream.aclose()
    up.gate.set()
    with anyio.fail_after(10):
        while cache.stats().in_flight or up.closed == 0:
            await anyio.sleep(0.01)
    assert up.completed == 0, "a superseded stream nobody reads was read to its end"


def test_a_stream_that_will_be_stored_is_still_drained_threads() -> None:
    """The policy itself holds: a storable stream its caller left is read to the end and stored."""
    cache = new_cache()
    up = Upstream(CHUNKS, pause_at=1)
    stream = cache.get_or_stream(M, up.sync)
    assert next(stream) == "c0"
    stream.close()
    up.thread_gate.set()
    _settle_sync(cache, up)
    assert up.completed == 1
    assert cache.stats().stores == 1
    assert list(cache.get_or_stream(M, Upstream(["x"]).sync)) == CHUNKS


@pytest.mark.anyio
async def test_a_stream_that_will_be_stored_is_still_drained_async() -> None:
    cache = new_cache()
    up = Upstream(CHUNKS, pause_at=1)
    up.gate = anyio.Event()
    stream = cache.aget_or_stream(M, up.asyncgen)
    assert await stream.__anext__() == "c0"
    await stream.aclose()
    up.gate.set()
    with anyio.fail_after(10):
        while cache.stats().in_flight or up.closed == 0:
            await anyio.sleep(0.01)
    assert up.completed == 1
    assert cache.stats().stores == 1
