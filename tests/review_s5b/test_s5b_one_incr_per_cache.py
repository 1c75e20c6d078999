"""Finding (low): README says a removal through a cache with `RedisFlights` makes "one round
trip per removal"; it makes one per streaming cache over the manager's backend and namespace
(each `StreamingResponseCache` registers its own `_FleetRemovals`, every one INCRs the same
epoch key). Three caches over one manager (per-model caches, one per cached client): three
blocking round trips per removal (on the event loop's thread for an async removal, see
finding 3), and the epoch advances by three.

Fix direction: one `_FleetRemovals` per (RedisFlights prefix/client, namespace) in the
listener set (e.g. cache them on the RedisFlights object by namespace, so the WeakSet holds
one), or de-duplicate by epoch key in `_begin_removal`.
"""

from __future__ import annotations

import pytest
import redis
from tests.redis_flights.conftest import Fleet

from chengeta_ai import CacheKeyBuilder, CacheManager, InMemoryBackend, RedisFlights
from chengeta_ai.layers.streaming_cache import StreamingResponseCache


def _three_caches(fleet: Fleet) -> tuple[CacheManager, RedisFlights, list[StreamingResponseCache]]:
    rf = RedisFlights(fleet.url, prefix=fleet.prefix, lease=1.0, block=0.1)
    fleet._made.append(rf)
    manager = CacheManager(backend=InMemoryBackend(), key_builder=CacheKeyBuilder())
    return manager, rf, [StreamingResponseCache(manager, flights=rf) for _ in range(3)]


def _count_marks(rf: RedisFlights) -> list[object]:
    calls: list[object] = []
    real = rf.mark_removal

    def counted(namespace: str, key: str | None) -> None:
        calls.append((namespace, key))
        real(namespace, key)

    rf.mark_removal = counted  # type: ignore[method-assign]
    return calls


def test_one_epoch_round_trip_per_removal(fleet: Fleet) -> None:
    manager, rf, _caches = _three_caches(fleet)
    calls = _count_marks(rf)
    manager.delete("chengeta:stream:x")
    assert calls == [("chengeta", "chengeta:stream:x")]
    r = redis.Redis.from_url(fleet.url)
    assert int(r.get(rf.key_removal_key("chengeta:stream:x")) or 0) > 0


@pytest.mark.anyio
async def test_one_epoch_round_trip_per_removal_async(fleet: Fleet) -> None:
    manager, rf, _caches = _three_caches(fleet)
    calls = _count_marks(rf)
    await manager.adelete("chengeta:stream:x")
    assert calls == [("chengeta", "chengeta:stream:x")]
