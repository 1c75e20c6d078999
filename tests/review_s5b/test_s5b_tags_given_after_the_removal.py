"""Finding (low): `begin_removal` matches a flight by the tags it has *at the removal*; a
``no_store`` leader's flight takes the tags of the first storing caller that joins it later
(`FlightTable.join_or_lead`, ``store_as``). So ``invalidate("b")`` runs while a stream (begun
before it, led with ``no_store`` and tags ``["a"]``) is in flight; a caller with tags ``["b"]``
joins it after the invalidation returned, and the stream is stored under tag ``b``: an answer
begun before ``invalidate("b")`` is stored with ``b`` after it (README: "an answer begun before
the invalidation is never stored after it").

Fix direction: a flight invalidated by nothing but whose ``wants_store`` flips later should
check, when it takes ``store_as``, whether a removal matching its new tags ran since the flight
began (keep the last removal sequence per tag/namespace in the table, or simply refuse to adopt
``store_as`` tags for a flight older than the newest removal of the table).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

from chengeta_ai import CacheManager
from chengeta_ai.backends.memory_backend import InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

MODEL = "gpt-4o"


def test_tags_adopted_after_an_invalidation_threads() -> None:
    cache = StreamingResponseCache(CacheManager(backend=InMemoryBackend()))
    started, go = threading.Event(), threading.Event()

    def old(_m: Any) -> Iterator[str]:
        yield "old-1"
        started.set()
        assert go.wait(10)
        yield "old-2"

    leader = cache.get_or_stream(
        ["q"], old, model_id=MODEL, tags=["a"], cache_control={"no_store": True}
    )
    t1 = threading.Thread(target=lambda: list(leader))
    t1.start()
    assert started.wait(10)
    cache.manager.invalidate("b")  # returned
    joiner = cache.get_or_stream(["q"], lambda _m: iter(["new"]), model_id=MODEL, tags=["b"])
    t2 = threading.Thread(target=lambda: list(joiner))
    t2.start()
    threading.Event().wait(0.2)
    go.set()
    t1.join(10)
    t2.join(10)
    assert joiner.cache_info.outcome != "stored", joiner.cache_info


@pytest.mark.anyio
async def test_tags_adopted_after_an_invalidation_async() -> None:
    cache = StreamingResponseCache(CacheManager(backend=InMemoryBackend()))
    started, go = anyio.Event(), anyio.Event()

    async def old(_m: Any) -> AsyncIterator[str]:
        yield "old-1"
        started.set()
        await go.wait()
        yield "old-2"

    async def new(_m: Any) -> AsyncIterator[str]:
        yield "new"

    leader = cache.aget_or_stream(
        ["q"], old, model_id=MODEL, tags=["a"], cache_control={"no_store": True}
    )
    joiner = cache.aget_or_stream(["q"], new, model_id=MODEL, tags=["b"])

    async def read(s: Any) -> None:
        [c async for c in s]

    async with anyio.create_task_group() as tg:
        tg.start_soon(read, leader)
        await started.wait()
        await cache.manager.ainvalidate("b")
        tg.start_soon(read, joiner)
        await anyio.sleep(0.2)
        go.set()
    assert joiner.cache_info.outcome != "stored", joiner.cache_info
