"""Finding (medium): a removal that does not cover a key still invalidates the key's stream in
flight while an earlier removal's write of the key is under way.

`FlightTable.begin_removal` treats every key whose pending entry is `REMOVED` (a write of the
key racing an earlier removal) as covered (``order.entry is REMOVED or matches(...)``): it
moves the key's ``newest`` past every flight alive, so a stream begun *after* the earlier
removal, whose tags the later removal does not match, is refused its store
(outcome ``invalidated``) although nothing removed its entry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from tests.review_s5.blocking_backends import FirstASetBlocks, FirstSetBlocks

from chengeta_ai import CacheManager
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

MODEL = "gpt-4o"


def test_a_removal_of_another_tag_leaves_a_stream_begun_after_an_earlier_removal() -> None:
    backend = FirstSetBlocks()
    cache = StreamingResponseCache(CacheManager(backend=backend))
    key = cache.manager.key_builder.build(["q"], MODEL)

    # 1. an old stream of the key is being written
    old = threading.Thread(
        target=lambda: list(cache.get_or_stream(["q"], lambda _m: iter(["old"]), model_id=MODEL))
    )
    old.start()
    assert backend.writing.wait(10)
    # 2. the key is deleted while that write is under way (fixed design: the delete waits
    # for the write it raced, so it runs in a thread; the test goes on once it began)
    deleter = threading.Thread(target=cache.manager.delete, args=(key,))
    deleter.start()
    while not cache.flights._stores[key].removed:
        time.sleep(0.001)
    # 3. a new stream of the key begins after the delete
    half_way, go_on = threading.Event(), threading.Event()

    def fresh(_m: Any) -> Iterator[str]:
        yield "new"
        half_way.set()
        assert go_on.wait(10)
        yield "answer"

    infos: list[Any] = []

    def read_fresh() -> None:
        stream = cache.get_or_stream(["q"], fresh, model_id=MODEL)
        assert list(stream) == ["new", "answer"]
        infos.append(stream.cache_info)

    new = threading.Thread(target=read_fresh)
    new.start()
    assert half_way.wait(10)
    # 4. a removal that does not cover the key: another tag
    assert cache.manager.invalidate("model:claude") == 0
    backend.release.set()
    old.join(10)
    deleter.join(10)
    go_on.set()
    new.join(10)
    # the new stream began after the delete and no removal covers it: it is stored
    assert infos[0].outcome == "stored", infos[0]
    assert cache.stats().not_stored_invalidated == 1  # the old stream only
    hit = cache.get_or_stream(["q"], lambda _m: iter(["other"]), model_id=MODEL)
    assert list(hit) == ["new", "answer"]
    assert cache.flights._stores == {}


@pytest.mark.anyio
async def test_async_a_removal_of_another_tag_leaves_a_stream_begun_after_an_earlier_removal() -> (
    None
):
    backend = FirstASetBlocks()
    cache = StreamingResponseCache(CacheManager(backend=backend))
    key = cache.manager.key_builder.build(["q"], MODEL)

    async def old(_m: Any) -> AsyncIterator[str]:
        yield "old"

    half_way, go_on = anyio.Event(), anyio.Event()

    async def fresh(_m: Any) -> AsyncIterator[str]:
        yield "new"
        half_way.set()
        await go_on.wait()
        yield "answer"

    infos: list[Any] = []

    async def read_old() -> None:
        assert [c async for c in cache.aget_or_stream(["q"], old, model_id=MODEL)] == ["old"]

    async def read_fresh() -> None:
        stream = cache.aget_or_stream(["q"], fresh, model_id=MODEL)
        assert [c async for c in stream] == ["new", "answer"]
        infos.append(stream.cache_info)

    async with anyio.create_task_group() as tg:
        tg.start_soon(read_old)
        await backend.writing.wait()
        tg.start_soon(cache.manager.adelete, key)  # it waits for the write it raced
        while not cache.flights._stores[key].removed:
            await anyio.sleep(0.001)
        tg.start_soon(read_fresh)
        await half_way.wait()
        assert await cache.manager.ainvalidate("model:claude") == 0
        backend.release.set()
        await anyio.sleep(0.05)
        go_on.set()
    assert infos[0].outcome == "stored", infos[0]
    hit = cache.aget_or_stream(["q"], old, model_id=MODEL)
    assert [c async for c in hit] == ["new", "answer"]
    assert cache.flights._stores == {}
