"""Finding (medium): with `RedisFlights`, a caller that starts *after* a removal of its key
returned follows the stream that the removal invalidated, in the same process.

The removal takes the invalidated flight out of the local table, but its producer still holds
the key's Redis lease: the next local caller leads a new local flight whose election finds the
lease and follows the old producer's log. It is served the answer begun before the removal
(the README: "nobody joins it (the next caller leads a fresh stream)"), and nothing is stored
(the producer was invalidated, a follower never stores), so its outcome is ``follower`` and
its stream_fn is never called.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from tests.redis_flights.conftest import Fleet

MODEL = "gpt-4o"


def test_a_caller_after_a_removal_does_not_follow_the_invalidated_producer(fleet: Fleet) -> None:
    cache = fleet.cache()
    half_way, go_on = threading.Event(), threading.Event()

    def old(_m: Any) -> Iterator[str]:
        yield "old"
        half_way.set()
        assert go_on.wait(10)
        yield "answer"

    reader = threading.Thread(target=lambda: list(cache.get_or_stream(["q"], old, model_id=MODEL)))
    reader.start()
    assert half_way.wait(10)
    cache.manager.invalidate(f"model:{MODEL}")  # returned: the old answer is gone
    calls: list[str] = []

    def fresh(_m: Any) -> Iterator[str]:
        calls.append("fresh")
        yield "new answer"

    got: list[Any] = []
    infos: list[Any] = []

    def read_after() -> None:
        stream = cache.get_or_stream(["q"], fresh, model_id=MODEL)
        got.extend(stream)
        infos.append(stream.cache_info)

    after = threading.Thread(target=read_after)
    after.start()
    after.join(1.0)  # a fresh stream ends at once; a follower waits for the old producer
    go_on.set()
    after.join(10)
    reader.join(10)
    assert got == ["new answer"], infos
    assert calls == ["fresh"]


@pytest.mark.anyio
async def test_async_a_caller_after_a_removal_does_not_follow_the_invalidated_producer(
    fleet: Fleet,
) -> None:
    cache = fleet.cache()
    half_way, go_on = anyio.Event(), anyio.Event()

    async def old(_m: Any) -> AsyncIterator[str]:
        yield "old"
        half_way.set()
        await go_on.wait()
        yield "answer"

    calls: list[str] = []

    async def fresh(_m: Any) -> AsyncIterator[str]:
        calls.append("fresh")
        yield "new answer"

    got: list[Any] = []
    infos: list[Any] = []

    async def read_old() -> None:
        assert [c async for c in cache.aget_or_stream(["q"], old, model_id=MODEL)] == [
            "old",
            "answer",
        ]

    async def read_after() -> None:
        stream = cache.aget_or_stream(["q"], fresh, model_id=MODEL)
        got.extend([c async for c in stream])
        infos.append(stream.cache_info)

    async with anyio.create_task_group() as tg:
        tg.start_soon(read_old)
        await half_way.wait()
        await cache.manager.ainvalidate(f"model:{MODEL}")
        tg.start_soon(read_after)
        with anyio.move_on_after(1.0):
            while not got:
                await anyio.sleep(0.01)
        go_on.set()
    assert got == ["new answer"], infos
    assert calls == ["fresh"]
