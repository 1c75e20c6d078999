"""Fixtures of review s5b (removals reaching streams in flight, second pass): a real
``redis-server`` on loopback and the RedisFlights ``fleet``.

``anyio_backend`` (asyncio and trio) comes from tests/conftest.py.
"""

from __future__ import annotations

from tests.redis_flights.conftest import fleet, flights_redis

__all__ = ["fleet", "flights_redis"]
