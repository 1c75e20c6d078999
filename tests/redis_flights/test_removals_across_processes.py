"""A removal reaches the other processes of a `RedisFlights` fleet (real worker processes, a
real redis-server): a stream another process began before the removal is not stored after it,
and a stored stream's "=<token>" lease (which lets callers that missed the store replay its
log for ``done_ttl``) is not followed after the removal. Both failed before the removal epoch
(review s5, findings 1 and 2, seen in one process; here across processes)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from tests.redis_flights.test_processes import (  # the worker harness
    Worker,
    client,  # noqa: F401 - fixture
    log_entries,
    names,
    prefix,  # noqa: F401 - fixture
    spawn,  # noqa: F401 - fixture
    stored,
    wait_for,
)

from chengeta_ai import (
    CacheKeyBuilder,
    CacheManager,
    RedisBackend,
    RedisFlights,
    StreamingResponseCache,
)
from redis_fixture import RedisServer

PROMPT = [{"role": "user", "content": "p"}]


@pytest.fixture
def here(flights_redis: RedisServer, prefix: str) -> Iterator[StreamingResponseCache]:  # noqa: F811
    """This process's cache of the fleet: the same Redis, backend prefix and flights prefix
    as the workers'."""
    backend = RedisBackend(flights_redis.url, prefix=prefix)
    rf = RedisFlights(flights_redis.url, prefix=prefix, lease=1.0, block=0.1)
    cache = StreamingResponseCache(
        CacheManager(backend=backend, key_builder=CacheKeyBuilder()), flights=rf
    )
    yield cache
    rf.close()
    backend.close()


REMOVALS = {
    "invalidate": lambda cache: cache.manager.invalidate("model:default"),
    "delete": lambda cache: cache.manager.delete(
        cache.manager.key_builder.build(PROMPT, "default")
    ),
    "clear": lambda cache: cache.manager.clear(),
}


@pytest.mark.parametrize("mode", ["asyncio", "threads"])
@pytest.mark.parametrize("removal", sorted(REMOVALS))
def test_a_stream_another_process_began_before_a_removal_is_not_stored(
    spawn: Any,  # noqa: F811
    client: redis.Redis,  # noqa: F811
    prefix: str,  # noqa: F811
    flights_redis: RedisServer,
    here: StreamingResponseCache,
    removal: str,
    mode: str,
) -> None:
    worker: Worker = spawn("--chunks", "30", "--delay", "0.03", "--mode", mode)
    wait_for(lambda: log_entries(client, prefix) >= 3)  # the worker's stream is under way
    REMOVALS[removal](here)
    (r,) = worker.rounds()
    assert r["results"] == [names("up", 30)]  # its caller still gets every chunk
    assert r["stats"]["stores"] == 0
    assert stored(flights_redis.url, prefix) is None
    # and no "=<token>" lease of it: the next caller anywhere calls its own upstream
    after = here.get_or_stream(PROMPT, lambda _m: iter(["fresh"]))
    assert list(after) == ["fresh"], after.cache_info  # type: ignore[attr-defined]


@pytest.mark.parametrize("removal", sorted(REMOVALS))
def test_a_stored_stream_is_not_replayed_from_its_lease_after_a_removal(
    spawn: Any,  # noqa: F811
    flights_redis: RedisServer,
    prefix: str,  # noqa: F811
    here: StreamingResponseCache,
    removal: str,
) -> None:
    worker: Worker = spawn("--chunks", "5", "--done-ttl", "5")
    (r,) = worker.rounds()
    assert r["stats"]["stores"] == 1
    assert stored(flights_redis.url, prefix) is not None
    REMOVALS[removal](here)
    assert stored(flights_redis.url, prefix) is None
    after = here.get_or_stream(PROMPT, lambda _m: iter(["fresh"]))
    assert list(after) == ["fresh"], after.cache_info  # type: ignore[attr-defined]
    assert after.cache_info.status == "miss"  # type: ignore[attr-defined]
