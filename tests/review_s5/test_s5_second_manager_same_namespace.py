"""Finding (low, docs): a removal through one `CacheManager` does not reach the streams in flight
of caches over *another manager of the same namespace and backend* in the same process: the
stream begun before the removal is stored after it returned and served as a hit.

The README says a removal "also reaches the streams of that tag in flight in this process
(through every streaming cache over the manager ...)" and that only "a stream in flight in
*another process* cannot be reached". Two managers over one Redis or SQLite backend with the
default namespace (one per module, one per web worker thread, a cached client built with its own
manager) are an ordinary setup; either the listeners are shared per (backend, namespace) or the
README must say that only caches over the very same manager object are reached.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

from chengeta_ai import CacheManager, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

MODEL = "gpt-4o"


def test_a_removal_reaches_a_stream_over_another_manager_of_the_namespace() -> None:
    backend = InMemoryBackend()
    remover = CacheManager(backend=backend)
    cache = StreamingResponseCache(CacheManager(backend=backend))
    half_way, go_on = threading.Event(), threading.Event()

    def old(_m: Any) -> Iterator[str]:
        yield "old"
        half_way.set()
        assert go_on.wait(10)
        yield "answer"

    reader = threading.Thread(target=lambda: list(cache.get_or_stream(["q"], old, model_id=MODEL)))
    reader.start()
    assert half_way.wait(10)
    remover.invalidate(f"model:{MODEL}")
    go_on.set()
    reader.join(10)
    later = cache.get_or_stream(["q"], lambda _m: iter(["new answer"]), model_id=MODEL)
    assert list(later) == ["new answer"], later.cache_info


@pytest.mark.anyio
async def test_async_a_removal_reaches_a_stream_over_another_manager_of_the_namespace() -> None:
    backend = InMemoryBackend()
    remover = CacheManager(backend=backend)
    cache = StreamingResponseCache(CacheManager(backend=backend))
    half_way, go_on = anyio.Event(), anyio.Event()

    async def old(_m: Any) -> AsyncIterator[str]:
        yield "old"
        half_way.set()
        await go_on.wait()
        yield "answer"

    async def fresh(_m: Any) -> AsyncIterator[str]:
        yield "new answer"

    async def read() -> None:
        assert [c async for c in cache.aget_or_stream(["q"], old, model_id=MODEL)] == [
            "old",
            "answer",
        ]

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        await half_way.wait()
        await remover.ainvalidate(f"model:{MODEL}")
        go_on.set()
    later = cache.aget_or_stream(["q"], fresh, model_id=MODEL)
    assert [c async for c in later] == ["new answer"], later.cache_info
