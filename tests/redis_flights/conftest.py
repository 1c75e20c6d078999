"""Fixtures for the cross-process flight tests: a real redis-server on loopback.

``fleet`` builds caches that stand for separate processes inside one test (each its own flight
table, one shared Redis for flights, one shared in-memory backend); test_processes.py uses real
processes. ``anyio_backend`` (asyncio and trio) comes from tests/conftest.py.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: redis_fixture

from chengeta_ai import CacheKeyBuilder, CacheManager, InMemoryBackend, RedisFlights
from chengeta_ai.layers.streaming_cache import StreamingResponseCache
from redis_fixture import RedisServer


@pytest.fixture(scope="session")
def flights_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-flights"))
    server.start()
    yield server
    server.stop()


class Fleet:
    """Caches standing for processes: one Redis, one backend, separate flight tables."""

    def __init__(self, url: str, **flights_kw: Any) -> None:
        self.url = url
        self.prefix = f"t-{uuid.uuid4().hex[:8]}:"
        self.backend = InMemoryBackend()  # shared by the caches, as Redis would be
        self.flights_kw = {"lease": 1.0, "block": 0.1, **flights_kw}
        self._made: list[RedisFlights] = []

    def cache(self, **kw: Any) -> StreamingResponseCache:
        manager = CacheManager(backend=self.backend, key_builder=CacheKeyBuilder())
        rf = RedisFlights(self.url, prefix=self.prefix, **self.flights_kw)
        self._made.append(rf)
        return StreamingResponseCache(manager, flights=rf, **kw)

    def close(self) -> None:
        for rf in self._made:
            rf.close()
        self.backend.close()


@pytest.fixture
def fleet(flights_redis: RedisServer) -> Iterator[Fleet]:
    f = Fleet(flights_redis.url)
    yield f
    f.close()
