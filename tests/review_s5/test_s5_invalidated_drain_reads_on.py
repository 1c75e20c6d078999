"""Finding (low): a stream abandoned under ``on_abandon="finish"`` (read to its end for the entry
it will store) keeps reading its upstream to the end for nobody after a removal invalidated
it: nothing will be stored, so the drain is a pure cost (upstream tokens, a connection, a
thread for sync flights).

`FlightState.consumer_left` drains only "when the stream will be stored", and
`FlightState.unstorable_now` cancels a drain that becomes unstorable (oversized,
unserializable); `FlightState.invalidate` returns no action, so `begin_removal` never cancels
such a drain.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any

import anyio
import pytest

from chengeta_ai import CacheManager
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

MODEL = "gpt-4o"
REST = 200


def test_an_invalidated_drain_stops_reading_its_upstream() -> None:
    cache = StreamingResponseCache(CacheManager(), on_abandon="finish")
    go_on, ended = threading.Event(), threading.Event()
    read: list[int] = []

    def upstream(_m: Any) -> Iterator[str]:
        try:
            yield "first"
            assert go_on.wait(10)
            for i in range(REST):
                read.append(i)
                time.sleep(0.005)
                yield f"c{i}"
        finally:
            ended.set()

    stream = cache.get_or_stream(["q"], upstream, model_id=MODEL)
    assert next(stream) == "first"
    stream.close()  # the only caller leaves: the flight drains for its entry
    assert cache.stats().abandoned_finished == 1
    cache.manager.invalidate(f"model:{MODEL}")  # the entry will never be stored now
    go_on.set()
    assert ended.wait(10)
    assert cache.stats().stores == 0
    assert len(read) < REST, "the invalidated drain read the whole upstream for nobody"


@pytest.mark.anyio
async def test_async_an_invalidated_drain_stops_reading_its_upstream() -> None:
    cache = StreamingResponseCache(CacheManager(), on_abandon="finish")
    go_on, ended = anyio.Event(), anyio.Event()
    read: list[int] = []

    async def upstream(_m: Any) -> AsyncIterator[str]:
        try:
            yield "first"
            await go_on.wait()
            for i in range(REST):
                read.append(i)
                await anyio.sleep(0.005)
                yield f"c{i}"
        finally:
            ended.set()

    async with aclosing(cache.aget_or_stream(["q"], upstream, model_id=MODEL)) as stream:
        async for chunk in stream:
            assert chunk == "first"
            break
    assert cache.stats().abandoned_finished == 1
    await cache.manager.ainvalidate(f"model:{MODEL}")
    go_on.set()
    with anyio.fail_after(10):
        await ended.wait()
    assert cache.stats().stores == 0
    assert len(read) < REST, "the invalidated drain read the whole upstream for nobody"
