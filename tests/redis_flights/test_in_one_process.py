"""RedisFlights with several caches in one process standing for several processes (each cache
has its own flight table, as a process would): asyncio, trio and threads."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest
from tests.helpers import Upstream, collect
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
