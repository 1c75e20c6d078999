"""RedisFlights with several caches in one process standing for several processes (each cache
has its own flight table, as a process would): asyncio, trio and threads."""

from __future__ import annotations

import threading
from contextlib import aclosing
from typing import Any

import anyio
import pytest
from tests.helpers import Heartbeat, Upstream, collect
from tests.redis_flights.conftest import Fleet

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "shared across processes"}]


async def test_four_processes_share_one_upstream(fleet: Fleet) -> None:
    caches = [fleet.cache() for _ in range(4)]
    up = Upstream([f"c{i}" for i in range(100)], delay=0.001)
    results: list[list[Any]] = []

    async def caller(i: int) -> None:
        results.append(await collect(caches[i % 4].aget_or_stream(MESSAGES, up.asyncgen)))

    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(caller, i)
    assert up.calls == 1
    assert len(results) == 40
    assert all(r == up.chunks for r in results)
    stats = [c.stats() for c in caches]
    assert sum(s["stores"] for s in stats) == 1
    assert sum(s["remote_leads"] for s in stats) == 1
    assert sum(s["remote_joins"] for s in stats) == 3
    assert sum(s["redis_fallbacks"] for s in stats) == 0


def test_threads_in_four_processes_share_one_upstream(fleet: Fleet) -> None:
    caches = [fleet.cache() for _ in range(4)]
    up = Upstream([f"c{i}" for i in range(100)], delay=0.001)
    results: list[list[Any]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def caller(i: int) -> None:
        barrier.wait()
        got = list(caches[i % 4].get_or_stream(MESSAGES, up.sync))
        with lock:
            results.append(got)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert up.calls == 1
    assert len(results) == 16 and all(r == up.chunks for r in results)
    assert sum(c.stats()["stores"] for c in caches) == 1


async def test_producer_keeps_reading_for_other_processes_after_its_callers_left(
    fleet: Fleet,
) -> None:
    producer, follower = fleet.cache(), fleet.cache()
    up = Upstream([f"c{i}" for i in range(60)], delay=0.005)
    got: list[Any] = []
    followed: list[Any] = []

    async def leaves_early() -> None:
        async with aclosing(producer.aget_or_stream(MESSAGES, up.asyncgen)) as stream:
            async for chunk in stream:
                got.append(chunk)
                if len(got) == 20:
                    break

    async def follows() -> None:
        followed.extend(await collect(follower.aget_or_stream(MESSAGES, up.asyncgen)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(leaves_early)
        await anyio.sleep(0.02)
        tg.start_soon(follows)
    assert up.calls == 1
    assert followed == up.chunks  # the upstream was not cancelled under it
    assert producer.stats()["abandoned_finished"] == 1
    assert producer.stats()["stores"] == 1


async def test_a_lone_producer_abandoned_is_cancelled_fleet_wide(fleet: Fleet) -> None:
    producer = fleet.cache()
    up = Upstream([f"c{i}" for i in range(60)], delay=0.002)
    async with aclosing(producer.aget_or_stream(MESSAGES, up.asyncgen)) as stream:
        async for chunk in stream:
            if chunk == "c5":
                break
    await anyio.sleep(0.05)
    assert up.closed == 1 and up.produced < 60
    assert producer.stats()["abandoned_cancelled"] == 1
    # the cancel is a final record: the next caller elects a new producer at once
    again = fleet.cache()
    assert await collect(again.aget_or_stream(MESSAGES, up.asyncgen)) == up.chunks
    assert up.calls == 2


async def test_upstream_error_reaches_followers_with_chunks_as_upstream_lost(
    fleet: Fleet,
) -> None:
    from tests.helpers import Boom

    from chengeta_ai import UpstreamLost

    producer, follower = fleet.cache(), fleet.cache()
    up = Upstream([f"c{i}" for i in range(40)], delay=0.005, fail_at=30)
    errors: list[BaseException] = []

    async def run(cache: Any) -> None:
        try:
            await collect(cache.aget_or_stream(MESSAGES, up.asyncgen))
        except Exception as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, producer)
        await anyio.sleep(0.02)
        tg.start_soon(run, follower)
    assert up.calls == 1
    assert sorted(type(e).__name__ for e in errors) == ["Boom", "UpstreamLost"]
    lost = next(e for e in errors if isinstance(e, UpstreamLost))
    assert "Boom" in str(lost)
    assert any(isinstance(e, Boom) for e in errors)
    assert follower.stats()["upstream_lost"] == 1


def test_redis_unreachable_falls_back_to_in_process_flights() -> None:
    from chengeta_ai import CacheManager, InMemoryBackend, RedisFlights
    from chengeta_ai.layers.streaming_cache import StreamingResponseCache
    from redis_fixture import free_port

    rf = RedisFlights(f"redis://127.0.0.1:{free_port()}/0", lease=1.0)
    cache = StreamingResponseCache(CacheManager(backend=InMemoryBackend()), flights=rf)
    up = Upstream([f"c{i}" for i in range(10)])
    try:
        assert list(cache.get_or_stream(MESSAGES, up.sync)) == up.chunks
        assert cache.stats()["redis_fallbacks"] == 1
        assert cache.stats()["stores"] == 1
    finally:
        rf.close()


async def test_following_through_redis_never_blocks_the_event_loop(fleet: Fleet) -> None:
    # every XREAD BLOCK (up to `block` = 0.1 s here, ~80 ms per chunk) runs in a worker thread
    producer, follower = fleet.cache(), fleet.cache()
    up = Upstream([f"c{i}" for i in range(8)], delay=0.08)
    heartbeat = Heartbeat()
    got: list[Any] = []

    async def follow() -> None:
        await anyio.sleep(0.02)
        got.extend(await collect(follower.aget_or_stream(MESSAGES, up.asyncgen)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(heartbeat.run)
        async with anyio.create_task_group() as streams:
            streams.start_soon(collect, producer.aget_or_stream(MESSAGES, up.asyncgen))
            streams.start_soon(follow)
        heartbeat.stop()
    assert got == up.chunks and up.calls == 1
    assert follower.stats()["remote_joins"] == 1
    assert heartbeat.max_gap < 0.05, heartbeat.max_gap
