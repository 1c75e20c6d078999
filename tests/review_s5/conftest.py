"""Fixtures of the fifth review (removals reaching streams in flight): the cached-client
fixtures, a real ``redis-server`` on loopback, and the RedisFlights ``fleet``.

``anyio_backend`` (asyncio and trio) comes from tests/conftest.py.
"""

from __future__ import annotations

from tests.backends.conftest import redis_server, restartable_redis
from tests.clients.conftest import aclaude, aoai, cache, claude, oai, server, text
from tests.redis_flights.conftest import fleet, flights_redis

__all__ = [
    "aclaude",
    "aoai",
    "cache",
    "claude",
    "fleet",
    "flights_redis",
    "oai",
    "redis_server",
    "restartable_redis",
    "server",
    "text",
]
