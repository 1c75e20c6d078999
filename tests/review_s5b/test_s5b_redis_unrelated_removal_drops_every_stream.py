"""Finding (medium): with `RedisFlights`, a removal of *one unrelated key* keeps every stream
of the namespace in flight at that moment from being stored, in every process including the
removing one (outcome ``invalidated``), and makes every caller after it read its own upstream
instead of following those streams.

The removal epoch is per namespace: `_FleetRemovals.begin_removal` ignores ``matches`` and
INCRs ``{prefix}fl:removals:<ns>``; `_Producer.before_store` refuses to store when the epoch
advanced at all. Without RedisFlights the same process keeps the stream (review s5 finding
"unrelated removal invalidates" was fixed for the flight table), so adding RedisFlights
brings that defect back. README states the per-namespace scope, but the effect is a hit-rate
collapse for ordinary workloads: with removals at rate r (per-user ``delete``, a periodic
``invalidate`` of one model) and streams lasting d seconds, a fraction 1 - exp(-r*d) of all
streams is never stored (one delete every 10 s, 20 s streams: 86 %).

Fix direction: per-key epochs for ``delete`` (an INCR on a key in the lease's hash slot, read
by the _ACQUIRE script and by before_store), per-tag epochs for ``invalidate`` (the producer
knows its tags), the namespace epoch only for ``clear``.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from tests.redis_flights.conftest import Fleet

MODEL = "gpt-4o"


def test_unrelated_delete_keeps_the_stream_from_being_stored_threads(fleet: Fleet) -> None:
    cache = fleet.cache()
    go = threading.Event()
    started = threading.Event()

    def upstream(_m: Any) -> Iterator[str]:
        yield "a"
        started.set()
        assert go.wait(10)
        yield "b"

    stream = cache.get_or_stream(["q1"], upstream, model_id=MODEL)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(stream))
    reader.start()
    assert started.wait(10)
    unrelated = cache.manager.key_builder.build(["some other prompt"], MODEL)
    cache.manager.delete(unrelated)
    go.set()
    reader.join(10)
    assert got == ["a", "b"]
    assert stream.cache_info.outcome == "stored", stream.cache_info
    again = cache.get_or_stream(["q1"], lambda _m: iter(["x"]), model_id=MODEL)
    assert list(again) == ["a", "b"]
    assert again.cache_info.status == "hit"


@pytest.mark.anyio
async def test_unrelated_delete_keeps_the_stream_from_being_stored_async(fleet: Fleet) -> None:
    cache = fleet.cache()
    go = anyio.Event()
    started = anyio.Event()

    async def upstream(_m: Any) -> AsyncIterator[str]:
        yield "a"
        started.set()
        await go.wait()
        yield "b"

    stream = cache.aget_or_stream(["q1"], upstream, model_id=MODEL)
    got: list[str] = []

    async def read() -> None:
        got.extend([c async for c in stream])

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        await started.wait()
        unrelated = cache.manager.key_builder.build(["some other prompt"], MODEL)
        await cache.manager.adelete(unrelated)
        go.set()
    assert got == ["a", "b"]
    assert stream.cache_info.outcome == "stored", stream.cache_info

    async def other(_m: Any) -> AsyncIterator[str]:
        yield "x"

    again = cache.aget_or_stream(["q1"], other, model_id=MODEL)
    assert [c async for c in again] == ["a", "b"]
    assert again.cache_info.status == "hit"


def test_unrelated_delete_in_another_process_stops_following(fleet: Fleet) -> None:
    """Process B's caller after an unrelated delete in process A does not follow A's live
    stream of its key: it reads a second upstream (two upstream calls for one answer)."""
    a, b = fleet.cache(), fleet.cache()
    go = threading.Event()
    started = threading.Event()
    calls = []

    def upstream(_m: Any) -> Iterator[str]:
        calls.append(1)
        yield "a"
        started.set()
        assert go.wait(10)
        yield "b"

    stream_a = a.get_or_stream(["q1"], upstream, model_id=MODEL)
    got_a: list[str] = []
    reader = threading.Thread(target=lambda: got_a.extend(stream_a))
    reader.start()
    assert started.wait(10)
    a.manager.delete(a.manager.key_builder.build(["some other prompt"], MODEL))
    got_b: list[str] = []
    stream_b = b.get_or_stream(["q1"], upstream, model_id=MODEL)
    reader_b = threading.Thread(target=lambda: got_b.extend(stream_b))
    reader_b.start()
    threading.Event().wait(0.3)
    go.set()
    reader.join(10)
    reader_b.join(10)
    assert got_a == got_b == ["a", "b"]
    assert len(calls) == 1, f"{len(calls)} upstream calls for one answer"
