"""The review tests reuse the RedisFlights fleet fixtures (one real redis-server, caches
standing for processes)."""

from tests.redis_flights.conftest import fleet, flights_redis

__all__ = ["fleet", "flights_redis"]
