"""Finding (low, stats): a stream whose write was under way when a removal ran is reported
``superseded`` (and counted in ``not_stored_superseded``, not ``not_stored_invalidated``) when a
stream begun after the removal stores before the old write returns.

`begin_removal` does not count a finishing flight (`FlightState.invalidate` returns False for
it: "the table refuses or undoes its store"), and the table's ``removed`` flag, which names the
reason at `end_store`, is cleared by the newer store's `begin_store`, so the removal that kept
the old stream from being the key's entry is reported as a supersession that never happened
(no ``no_cache`` call was made).
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from tests.review_s5.blocking_backends import FirstASetBlocks, FirstSetBlocks

from chengeta_ai import CacheManager
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

MODEL = "gpt-4o"


def _marked(cache: StreamingResponseCache) -> bool:
    return any(order.removed for order in cache.flights._stores.values())


def _wait_removal_marked(cache: StreamingResponseCache) -> None:
    for _ in range(10_000):
        if _marked(cache):
            return
        time.sleep(0.001)
    raise AssertionError("the removal never began")


def test_a_write_undone_by_a_removal_is_reported_invalidated() -> None:
    backend = FirstSetBlocks()
    cache = StreamingResponseCache(CacheManager(backend=backend))
    infos: list[Any] = []

    def read_old() -> None:
        stream = cache.get_or_stream(["q"], lambda _m: iter(["old"]), model_id=MODEL)
        list(stream)
        infos.append(stream.cache_info)

    old = threading.Thread(target=read_old)
    old.start()
    assert backend.writing.wait(10)
    # (fixed design: the removal waits for the write it raced before it returns, so it runs
    # in a thread; the new stream begins once the removal has marked the key)
    remover = threading.Thread(target=cache.manager.invalidate, args=(f"model:{MODEL}",))
    remover.start()
    _wait_removal_marked(cache)
    # a stream begun after the removal is stored while the old write is still under way
    assert list(cache.get_or_stream(["q"], lambda _m: iter(["new"]), model_id=MODEL)) == ["new"]
    backend.release.set()
    old.join(10)
    remover.join(10)
    assert list(cache.get_or_stream(["q"], lambda _m: iter(["x"]), model_id=MODEL)) == ["new"]
    stats = cache.stats()
    assert (infos[0].outcome, stats.not_stored_invalidated, stats.not_stored_superseded) == (
        "invalidated",
        1,
        0,
    )


def _answer(text: str) -> Any:
    async def fn(_m: Any) -> AsyncIterator[str]:
        yield text

    return fn


@pytest.mark.anyio
async def test_async_a_write_undone_by_a_removal_is_reported_invalidated() -> None:
    backend = FirstASetBlocks()
    cache = StreamingResponseCache(CacheManager(backend=backend))
    infos: list[Any] = []

    async def read_old() -> None:
        stream = cache.aget_or_stream(["q"], _answer("old"), model_id=MODEL)
        assert [c async for c in stream] == ["old"]
        infos.append(stream.cache_info)

    async with anyio.create_task_group() as tg:
        tg.start_soon(read_old)
        await backend.writing.wait()
        tg.start_soon(cache.manager.ainvalidate, f"model:{MODEL}")
        while not _marked(cache):
            await anyio.sleep(0.001)
        new = cache.aget_or_stream(["q"], _answer("new"), model_id=MODEL)
        assert [c async for c in new] == ["new"]
        backend.release.set()
    hit = cache.aget_or_stream(["q"], _answer("x"), model_id=MODEL)
    assert [c async for c in hit] == ["new"]
    stats = cache.stats()
    assert (infos[0].outcome, stats.not_stored_invalidated, stats.not_stored_superseded) == (
        "invalidated",
        1,
        0,
    )
