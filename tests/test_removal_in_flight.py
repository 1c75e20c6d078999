"""A removal through the manager (``delete``, ``invalidate``, ``clear``) reaches the streams in
flight that it covers: their callers get every chunk, but the stream begun before the removal is
never stored after it, nobody joins it, and a write of it already under way is undone.

Each test failed before the fix (review s4: the stream was stored right after the removal and
served as a hit). Threads for the sync API; asyncio and trio for the async one.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import pytest

from chengeta_ai import CacheManager
from chengeta_ai.backends.memory_backend import InMemoryBackend
from chengeta_ai.layers.flight_state import FlightState, Phase
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

MODEL = "gpt-4o"


def _new(messages: Any) -> list[str]:
    return ["new answer"]


def _key(cache: StreamingResponseCache, messages: Any, model: str = MODEL) -> str:
    return cache.manager.key_builder.build(messages, model)


Removal = Callable[[StreamingResponseCache], Any]

REMOVALS: dict[str, Removal] = {
    "invalidate": lambda cache: cache.manager.invalidate(f"model:{MODEL}"),
    "delete": lambda cache: cache.manager.delete(_key(cache, ["q"])),
    "clear": lambda cache: cache.manager.clear(),
}


async def _aremove(name: str, cache: StreamingResponseCache) -> None:
    if name == "invalidate":
        await cache.manager.ainvalidate(f"model:{MODEL}")
    elif name == "delete":
        await cache.manager.adelete(_key(cache, ["q"]))
    else:
        await cache.manager.aclear()


# -- the state transition, without threads or a loop ------------------------------------------


def test_invalidating_a_running_flight_keeps_it_from_store_and_out_of_its_slot() -> None:
    state = FlightState("cancel")
    assert state.invalidate() is True
    assert (state.not_stored, state.in_slot, state.joinable) == ("invalidated", False, False)
    assert state.invalidate() is False  # counted once
    # the stream still ends normally for its consumers, not stored
    state.upstream_ended(True)
    assert state.outcome == "invalidated"


def test_invalidating_a_finishing_flight_leaves_its_store_to_the_table() -> None:
    state = FlightState("cancel")
    state.upstream_ended(True)
    assert state.phase is Phase.FINISHING
    assert state.invalidate() is False
    assert (state.not_stored, state.in_slot) == (None, False)
    state.stored(True, superseded="invalidated")
    assert state.outcome == "invalidated"


# -- sync, threads -------------------------------------------------------------------------------


@pytest.mark.parametrize("removal", sorted(REMOVALS))
def test_a_stream_in_flight_during_a_removal_is_not_stored_after_it(removal: str) -> None:
    cache = StreamingResponseCache(CacheManager())
    half_way, go_on = threading.Event(), threading.Event()

    def old(messages: Any) -> Iterator[str]:
        yield "old"
        half_way.set()
        go_on.wait(10)
        yield "answer"

    result: list[str] = []
    infos: list[Any] = []

    def read() -> None:
        stream = cache.get_or_stream(["q"], old, model_id=MODEL)
        result.extend(stream)
        infos.append(stream.cache_info)  # type: ignore[attr-defined]

    reader = threading.Thread(target=read)
    reader.start()
    assert half_way.wait(10)
    REMOVALS[removal](cache)
    go_on.set()
    reader.join(10)
    assert result == ["old", "answer"]  # its caller gets its whole stream
    assert infos[0].outcome == "invalidated"
    assert cache.stats().not_stored_invalidated == 1
    assert cache.stats().stores == 0
    later = cache.get_or_stream(["q"], _new, model_id=MODEL)
    assert list(later) == ["new answer"]
    assert later.cache_info.status == "miss"  # type: ignore[attr-defined]
    assert cache.stats().stores == 1  # a stream begun after the removal is stored as usual


def test_a_removal_leaves_streams_it_does_not_cover() -> None:
    cache = StreamingResponseCache(CacheManager())
    half_way, go_on = threading.Event(), threading.Event()

    def other(messages: Any) -> Iterator[str]:
        yield "other"
        half_way.set()
        go_on.wait(10)
        yield "model"

    reader = threading.Thread(
        target=lambda: list(cache.get_or_stream(["q"], other, model_id="claude"))
    )
    reader.start()
    assert half_way.wait(10)
    cache.manager.invalidate(f"model:{MODEL}")
    cache.manager.delete(_key(cache, ["q"]))  # the gpt-4o key, not this stream's
    go_on.set()
    reader.join(10)
    assert cache.stats().stores == 1
    hit = cache.get_or_stream(["q"], _new, model_id="claude")
    assert list(hit) == ["other", "model"]
    assert hit.cache_info.status == "hit"  # type: ignore[attr-defined]


def test_a_caller_after_the_removal_leads_a_fresh_stream_instead_of_joining() -> None:
    cache = StreamingResponseCache(CacheManager())
    half_way, go_on = threading.Event(), threading.Event()
    calls: list[str] = []

    def old(messages: Any) -> Iterator[str]:
        calls.append("old")
        yield "old"
        half_way.set()
        go_on.wait(10)
        yield "answer"

    def fresh(messages: Any) -> Iterator[str]:
        calls.append("fresh")
        yield "new answer"

    reader = threading.Thread(target=lambda: list(cache.get_or_stream(["q"], old, model_id=MODEL)))
    reader.start()
    assert half_way.wait(10)
    cache.manager.invalidate(f"model:{MODEL}")
    after = cache.get_or_stream(["q"], fresh, model_id=MODEL)
    assert list(after) == ["new answer"]
    assert after.cache_info.status == "miss"  # type: ignore[attr-defined]
    go_on.set()
    reader.join(10)
    assert calls == ["old", "fresh"]
    # the fresh stream is the entry, the old one (ending later) did not overwrite it
    assert list(cache.get_or_stream(["q"], old, model_id=MODEL)) == ["new answer"]


class _SlowSets(InMemoryBackend):
    """Sets that block until released: the removal runs while a stream's write is under way."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = threading.Event()
        self.release = threading.Event()
        self.slow = True

    def set(self, key: str, value: bytes, ttl: float | None = None, tags: Any = ()) -> None:
        if self.slow:
            self.slow = False
            self.writing.set()
            self.release.wait(10)
        super().set(key, value, ttl, tags)


@pytest.mark.parametrize("removal", sorted(REMOVALS))
def test_a_write_under_way_when_the_removal_runs_is_undone(removal: str) -> None:
    backend = _SlowSets()
    cache = StreamingResponseCache(CacheManager(backend=backend))
    result: list[str] = []
    reader = threading.Thread(
        target=lambda: result.extend(
            cache.get_or_stream(["q"], lambda _m: iter(["old", "answer"]), model_id=MODEL)
        )
    )
    reader.start()
    assert backend.writing.wait(10)  # the entry is being written
    remover = threading.Thread(target=lambda: REMOVALS[removal](cache))
    remover.start()
    remover.join(0.2)
    assert remover.is_alive()  # the removal waits for the write it raced to undo itself
    backend.release.set()
    reader.join(10)
    remover.join(10)
    assert result == ["old", "answer"]
    assert cache.manager.backend.get(_key(cache, ["q"])) is None
    later = cache.get_or_stream(["q"], _new, model_id=MODEL)
    assert list(later) == ["new answer"]


# -- async, asyncio and trio ---------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("removal", sorted(REMOVALS))
async def test_async_a_stream_in_flight_during_a_removal_is_not_stored_after_it(
    removal: str,
) -> None:
    cache = StreamingResponseCache(CacheManager())
    half_way, go_on = anyio.Event(), anyio.Event()

    async def old(messages: Any) -> AsyncIterator[str]:
        yield "old"
        half_way.set()
        await go_on.wait()
        yield "answer"

    result: list[str] = []
    infos: list[Any] = []

    async def reader() -> None:
        stream = cache.aget_or_stream(["q"], old, model_id=MODEL)
        result.extend([c async for c in stream])
        infos.append(stream.cache_info)  # type: ignore[attr-defined]

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await half_way.wait()
        await _aremove(removal, cache)
        go_on.set()
    assert result == ["old", "answer"]
    assert infos[0].outcome == "invalidated"
    assert cache.stats().not_stored_invalidated == 1
    later = cache.aget_or_stream(["q"], _new, model_id=MODEL)
    assert [c async for c in later] == ["new answer"]
    assert later.cache_info.status == "miss"  # type: ignore[attr-defined]
    assert cache.stats().stores == 1


@pytest.mark.anyio
async def test_async_a_sync_removal_from_a_thread_reaches_a_stream_on_the_loop() -> None:
    cache = StreamingResponseCache(CacheManager())
    half_way, go_on = anyio.Event(), anyio.Event()

    async def old(messages: Any) -> AsyncIterator[str]:
        yield "old"
        half_way.set()
        await go_on.wait()
        yield "answer"

    async def reader() -> None:
        assert [c async for c in cache.aget_or_stream(["q"], old, model_id=MODEL)] == [
            "old",
            "answer",
        ]

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await half_way.wait()
        await anyio.to_thread.run_sync(cache.manager.invalidate, f"model:{MODEL}")
        go_on.set()
    later = cache.aget_or_stream(["q"], _new, model_id=MODEL)
    assert [c async for c in later] == ["new answer"]


class _AsyncSlowSets(InMemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.writing = anyio.Event()
        self.release = anyio.Event()
        self.slow = True

    async def aset(self, key: str, value: bytes, ttl: float | None = None, tags: Any = ()) -> None:
        if self.slow:
            self.slow = False
            self.writing.set()
            await self.release.wait()
        super().set(key, value, ttl, tags)


@pytest.mark.anyio
@pytest.mark.parametrize("removal", sorted(REMOVALS))
async def test_async_a_write_under_way_when_the_removal_runs_is_undone(removal: str) -> None:
    backend = _AsyncSlowSets()
    cache = StreamingResponseCache(CacheManager(backend=backend))
    result: list[str] = []

    async def old(messages: Any) -> AsyncIterator[str]:
        for c in ("old", "answer"):
            yield c

    async def reader() -> None:
        result.extend([c async for c in cache.aget_or_stream(["q"], old, model_id=MODEL)])

    returned = anyio.Event()

    async def remove() -> None:
        await _aremove(removal, cache)
        returned.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await backend.writing.wait()
        tg.start_soon(remove)
        while not cache.flights._stores[_key(cache, ["q"])].removed:
            await anyio.sleep(0.001)
        await anyio.sleep(0.05)
        assert not returned.is_set()  # the removal waits for the write it raced to undo itself
        backend.release.set()
    assert result == ["old", "answer"]
    assert cache.manager.backend.get(_key(cache, ["q"])) is None
    later = cache.aget_or_stream(["q"], _new, model_id=MODEL)
    assert [c async for c in later] == ["new answer"]
