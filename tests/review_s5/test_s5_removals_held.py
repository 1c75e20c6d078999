"""Held (review s5): what was tried against removals reaching streams in flight and held:
several caches over one manager, managers of other namespaces over one backend, a removal
from inside a stream_fn and from a consumer's loop, a failing backend removal (BackendError)
with a racing write, a no_cache refresh around a removal; the table keeps no store record."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from chengeta_ai import BackendError, CacheKeyBuilder, CacheManager
from chengeta_ai.backends.memory_backend import InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

MODEL = "gpt-4o"


def _paused() -> tuple[threading.Event, threading.Event, Any]:
    half_way, go_on = threading.Event(), threading.Event()

    def old(_m: Any) -> Iterator[str]:
        yield "old"
        half_way.set()
        assert go_on.wait(10)
        yield "answer"

    return half_way, go_on, old


def test_every_cache_over_the_manager_is_reached() -> None:
    manager = CacheManager()
    caches = [StreamingResponseCache(manager) for _ in range(3)]
    readers, gos = [], []
    for cache in caches:
        half_way, go_on, old = _paused()
        r = threading.Thread(
            target=lambda c=cache, f=old: list(c.get_or_stream(["q"], f, model_id=MODEL))
        )
        r.start()
        assert half_way.wait(10)
        readers.append(r)
        gos.append(go_on)
    manager.clear()
    for go in gos:
        go.set()
    for r in readers:
        r.join(10)
    assert [c.stats().not_stored_invalidated for c in caches] == [1, 1, 1]
    assert manager.backend.get(manager.key_builder.build(["q"], MODEL)) is None
    assert all(c.flights._stores == {} for c in caches)


def test_a_removal_in_one_namespace_leaves_another_namespaces_streams() -> None:
    backend = InMemoryBackend()
    a = StreamingResponseCache(CacheManager(backend=backend, key_builder=CacheKeyBuilder("a")))
    b = StreamingResponseCache(CacheManager(backend=backend, key_builder=CacheKeyBuilder("b")))
    half_way, go_on, old = _paused()
    r = threading.Thread(target=lambda: list(b.get_or_stream(["q"], old, model_id=MODEL)))
    r.start()
    assert half_way.wait(10)
    a.manager.clear()
    a.manager.invalidate(f"model:{MODEL}")
    a.manager.delete(a.manager.key_builder.build(["q"], MODEL))
    go_on.set()
    r.join(10)
    assert b.stats().stores == 1 and b.stats().not_stored_invalidated == 0


def test_a_removal_from_inside_the_stream_fn_and_the_consumer_loop() -> None:
    cache = StreamingResponseCache(CacheManager())

    def removes(_m: Any) -> Iterator[str]:
        yield "a"
        cache.manager.clear()  # on the pull, from inside the upstream
        yield "b"

    assert list(cache.get_or_stream(["q"], removes, model_id=MODEL)) == ["a", "b"]
    assert cache.stats().not_stored_invalidated == 1
    out = []
    for chunk in cache.get_or_stream(["q"], lambda _m: iter(["c", "d"]), model_id=MODEL):
        out.append(chunk)
        cache.manager.invalidate(f"model:{MODEL}")
    assert out == ["c", "d"] and cache.stats().not_stored_invalidated == 2
    assert cache.flights._stores == {}


@pytest.mark.anyio
async def test_async_a_removal_from_inside_the_stream_fn() -> None:
    cache = StreamingResponseCache(CacheManager())

    async def removes(_m: Any) -> AsyncIterator[str]:
        yield "a"
        await cache.manager.aclear()
        cache.manager.invalidate(f"model:{MODEL}")  # the sync one, on the loop
        yield "b"

    assert [c async for c in cache.aget_or_stream(["q"], removes, model_id=MODEL)] == ["a", "b"]
    assert cache.stats().not_stored_invalidated == 1
    assert cache.flights._stores == {}


class _FailingRemovals(InMemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.writing, self.release = threading.Event(), threading.Event()
        self.slow = True

    def set(self, key: str, value: bytes, ttl: float | None = None, tags: Any = ()) -> None:
        if self.slow:
            self.slow = False
            self.writing.set()
            assert self.release.wait(10)
        super().set(key, value, ttl, tags)

    def delete(self, key: str) -> bool:
        raise OSError("backend down")


def test_a_failing_removal_with_a_racing_write_leaves_no_record() -> None:
    backend = _FailingRemovals()
    cache = StreamingResponseCache(CacheManager(backend=backend))
    key = cache.manager.key_builder.build(["q"], MODEL)
    r = threading.Thread(
        target=lambda: list(cache.get_or_stream(["q"], lambda _m: iter(["x"]), model_id=MODEL))
    )
    r.start()
    assert backend.writing.wait(10)
    with pytest.raises(BackendError):
        cache.manager.delete(key)
    backend.release.set()
    r.join(10)
    assert cache.flights._stores == {}
    assert cache.flights.live == 0


def test_a_refresh_after_a_removal_is_stored_and_one_before_is_not() -> None:
    cache = StreamingResponseCache(CacheManager())
    half_way, go_on, old = _paused()
    infos: list[Any] = []

    def refresh() -> None:
        s = cache.get_or_stream(["q"], old, model_id=MODEL, cache_control={"no_cache": True})
        list(s)
        infos.append(s.cache_info)

    r = threading.Thread(target=refresh)
    r.start()
    assert half_way.wait(10)
    cache.manager.invalidate(f"model:{MODEL}")
    fresh = cache.get_or_stream(
        ["q"], lambda _m: iter(["new"]), model_id=MODEL, cache_control={"no_cache": True}
    )
    assert list(fresh) == ["new"]
    go_on.set()
    r.join(10)
    assert infos[0].outcome == "invalidated"
    hit = cache.get_or_stream(["q"], lambda _m: iter(["zzz"]), model_id=MODEL)
    assert list(hit) == ["new"]
    assert cache.flights._stores == {}


@pytest.mark.anyio
async def test_async_removals_from_a_thread_while_streams_run_on_the_loop() -> None:
    cache = StreamingResponseCache(CacheManager())

    async def many(_m: Any) -> AsyncIterator[int]:
        for i in range(50):
            await anyio.lowlevel.checkpoint()
            yield i

    async def read(i: int) -> None:
        assert [c async for c in cache.aget_or_stream([str(i % 5)], many, model_id=MODEL)] == list(
            range(50)
        )

    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(read, i)
        for _ in range(20):
            await anyio.to_thread.run_sync(cache.manager.clear)
    await anyio.sleep(0.05)
    assert cache.flights._stores == {}
    assert cache.flights.live == 0
