"""Review: `cache_info.outcome` of a RedisFlights producer that lost its lease.

`CacheOutcome` (call_controls.py) and the README list every outcome a stream can end with; a
producer fenced off (its lease taken over: a paused process, a lost network) ends with
``"fenced"`` (`_Producer.before_store` keeps it from the store with that reason), which is in
neither: a caller or a dashboard that branches on the documented values meets an unknown one,
and the OpenTelemetry ``cache.outcome`` attribute gets an undocumented value. (Not storing is
right; the label is what is wrong.)
"""

from __future__ import annotations

import time
from typing import Any, get_args

import anyio
import pytest
import redis
from tests.helpers import Upstream
from tests.redis_flights.conftest import Fleet

from chengeta_ai.layers.call_controls import CacheOutcome
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

M = [{"role": "user", "content": "fenced producer"}]
CHUNKS = [f"c{i}" for i in range(6)]


def _steal_lease(fleet: Fleet, cache: StreamingResponseCache, key: str) -> None:
    """What a lease lapsing and another process winning the election leave in Redis."""
    rf = cache.remote_flights
    assert rf is not None
    client = redis.Redis.from_url(fleet.url)
    try:
        assert client.get(rf.lease_key(key)) is not None
        client.set(rf.lease_key(key), b"999999.stolen", px=60_000)
    finally:
        client.close()


def test_a_fenced_producer_reports_a_documented_outcome_threads(fleet: Fleet) -> None:
    cache = fleet.cache()
    up = Upstream(CHUNKS, pause_at=2)
    stream = cache.get_or_stream(M, up.sync)
    assert [next(stream), next(stream)] == CHUNKS[:2]
    assert stream.cache_info is not None
    _steal_lease(fleet, cache, stream.cache_info.key)
    deadline = time.monotonic() + 10
    while cache.stats().fenced == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cache.stats().fenced == 1
    up.thread_gate.set()
    assert list(stream) == CHUNKS[2:]
    assert cache.stats().stores == 0  # right: a fenced producer does not store
    info = stream.cache_info
    assert info is not None and info.done
    assert info.outcome in get_args(CacheOutcome), f"undocumented outcome {info.outcome!r}"


@pytest.mark.anyio
async def test_a_fenced_producer_reports_a_documented_outcome_async(fleet: Fleet) -> None:
    cache = fleet.cache()
    up = Upstream(CHUNKS, pause_at=2)
    up.gate = anyio.Event()
    stream = cache.aget_or_stream(M, up.asyncgen)
    got: list[Any] = [await stream.__anext__(), await stream.__anext__()]
    assert got == CHUNKS[:2]
    assert stream.cache_info is not None
    await anyio.to_thread.run_sync(_steal_lease, fleet, cache, stream.cache_info.key)
    with anyio.fail_after(10):
        while cache.stats().fenced == 0:
            await anyio.sleep(0.02)
    up.gate.set()
    got.extend([c async for c in stream])
    assert got == CHUNKS
    assert cache.stats().stores == 0
    info = stream.cache_info
    assert info is not None and info.done
    assert info.outcome in get_args(CacheOutcome), f"undocumented outcome {info.outcome!r}"
