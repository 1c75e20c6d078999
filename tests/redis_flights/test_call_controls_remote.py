"""Per-call controls with RedisFlights (caches in one process standing for processes):
``no_store`` on the producer, ``only_if_cached`` never elects, ``no_cache`` never follows;
on asyncio and trio, and from sync callers in threads."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import pytest
from tests.helpers import Upstream, collect
from tests.redis_flights.conftest import Fleet

from chengeta_ai import CacheMiss

M = [{"role": "user", "content": "controls across processes"}]


async def _produce_paused(fleet: Fleet, **kw: Any) -> tuple[Any, Upstream, Any]:
    producer = fleet.cache()
    up = Upstream([f"c{i}" for i in range(10)], pause_at=3)
    up.gate = anyio.Event()
    stream = producer.aget_or_stream(M, up.asyncgen, **kw)
    assert await stream.__anext__() == "c0"
    return producer, up, stream


@pytest.mark.anyio
async def test_no_store_on_the_producer_stores_nothing_fleet_wide(fleet: Fleet) -> None:
    producer, up, stream = await _produce_paused(fleet, cache_control={"no_store": True})
    other = fleet.cache()
    follower = other.aget_or_stream(M, up.asyncgen)
    got: list[Any] = []
    async with anyio.create_task_group() as tg:

        async def follow() -> None:
            got.extend(await collect(follower))

        tg.start_soon(follow)
        await anyio.sleep(0.2)
        up.gate.set()
        rest = await collect(stream)
    assert ["c0", *rest] == got == up.chunks
    assert up.calls == 1
    assert stream.cache_info.outcome == "no_store"
    assert follower.cache_info.status == "miss" and follower.cache_info.outcome == "follower"
    assert producer.stats().stores == other.stats().stores == 0
    assert other.stats().remote_joins == 1


@pytest.mark.anyio
async def test_only_if_cached_never_elects(fleet: Fleet) -> None:
    _producer, up, stream = await _produce_paused(fleet)
    other = fleet.cache()
    with pytest.raises(CacheMiss):
        await collect(other.aget_or_stream(M, up.asyncgen, cache_control={"only_if_cached": True}))
    up.gate.set()
    assert await collect(stream) == up.chunks[1:]
    assert up.calls == 1
    # stored by the producer: now a hit everywhere
    got = await collect(
        other.aget_or_stream(M, up.asyncgen, cache_control={"only_if_cached": True})
    )
    assert got == up.chunks


@pytest.mark.anyio
async def test_no_cache_reads_its_own_upstream_and_stores_it(fleet: Fleet) -> None:
    _producer, up, stream = await _produce_paused(fleet)
    other = fleet.cache()
    fresh = Upstream([f"n{i}" for i in range(5)])
    refresh = other.aget_or_stream(M, fresh.asyncgen, cache_control={"no_cache": True})
    assert await collect(refresh) == fresh.chunks
    assert refresh.cache_info.status == "refresh" and refresh.cache_info.outcome == "stored"
    assert fresh.calls == 1 and other.stats().remote_joins == 0
    up.gate.set()
    assert await collect(stream) == up.chunks[1:]
    assert up.calls == 1


# the same controls from sync callers in threads (RedisFlights' sync path)


def _sync_produce_paused(fleet: Fleet, **kw: Any) -> tuple[Any, Upstream, Any]:
    producer = fleet.cache()
    up = Upstream([f"c{i}" for i in range(10)], pause_at=3)
    stream = producer.get_or_stream(M, up.sync, **kw)
    assert next(stream) == "c0"
    return producer, up, stream


def test_no_store_on_a_sync_producer_stores_nothing_fleet_wide(fleet: Fleet) -> None:
    producer, up, stream = _sync_produce_paused(fleet, cache_control={"no_store": True})
    other = fleet.cache()
    follower = other.get_or_stream(M, up.sync)
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.extend(follower))
    thread.start()
    time.sleep(0.2)
    up.thread_gate.set()
    rest = list(stream)
    thread.join(20)
    assert ["c0", *rest] == got == up.chunks
    assert up.calls == 1
    assert stream.cache_info.outcome == "no_store"
    assert follower.cache_info.status == "miss" and follower.cache_info.outcome == "follower"
    assert producer.stats().stores == other.stats().stores == 0
    assert other.stats().remote_joins == 1


def test_sync_only_if_cached_never_elects(fleet: Fleet) -> None:
    _producer, up, stream = _sync_produce_paused(fleet)
    other = fleet.cache()
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            list(other.get_or_stream(M, up.sync, cache_control={"only_if_cached": True}))
        except CacheMiss as exc:
            errors.append(exc)

    thread = threading.Thread(target=ask)
    thread.start()
    thread.join(20)
    assert len(errors) == 1
    up.thread_gate.set()
    assert list(stream) == up.chunks[1:]
    assert up.calls == 1
    got = list(other.get_or_stream(M, up.sync, cache_control={"only_if_cached": True}))
    assert got == up.chunks


def test_sync_no_cache_reads_its_own_upstream_and_stores_it(fleet: Fleet) -> None:
    _producer, up, stream = _sync_produce_paused(fleet)
    other = fleet.cache()
    fresh = Upstream([f"n{i}" for i in range(5)])
    got: list[Any] = []
    refresh = other.get_or_stream(M, fresh.sync, cache_control={"no_cache": True})
    thread = threading.Thread(target=lambda: got.extend(refresh))
    thread.start()
    thread.join(20)
    assert got == fresh.chunks
    assert refresh.cache_info.status == "refresh" and refresh.cache_info.outcome == "stored"
    assert fresh.calls == 1 and other.stats().remote_joins == 0
    up.thread_gate.set()
    assert list(stream) == up.chunks[1:]
    assert up.calls == 1
