"""Review s4, finding: ``RedisBackend(client=...)`` accepts a ``decode_responses`` client; then
nothing is ever cached while every call reports ``stored`` (MEDIUM).

``RedisFlights`` refuses a redis-py client with ``decode_responses`` ("its logs are bytes").
``RedisBackend`` takes the same client without a check (its doc only says "Values must be
``bytes``"). With such a client (an application's shared client, passed in as the README
allows) every read of an entry fails to decode (``UnicodeDecodeError``, counted as a backend
error and logged as "backend get failed"), so every call is a ``miss`` whose outcome is
``stored``: the cache silently never hits while it reports storing every answer, and each call
pays the upstream again.

(A stalled Redis with a client passed in was checked too: redis-py 8's default socket timeout is
finite, so the caller is delayed, not hung; not reported.)

Fix direction: refuse ``decode_responses`` clients in ``RedisBackend.__init__`` as
``RedisFlights`` does (the sync and the async client), with the way out in the message.
"""

from __future__ import annotations

import uuid
from typing import Any

import redis
from tests.redis_fixture import RedisServer

from chengeta_ai import CacheManager, RedisBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache


def _answer(messages: Any) -> list[str]:
    return ["a", "b"]


def test_a_decode_responses_client_is_refused_or_works(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        try:
            backend = RedisBackend(
                redis_server.url, client=client, prefix=f"s4-{uuid.uuid4().hex[:8]}:"
            )
        except (TypeError, ValueError):
            return  # refused at construction, as RedisFlights does
        cache = StreamingResponseCache(CacheManager(backend=backend))
        first = cache.get_or_stream(["review s4: decode"], _answer)
        list(first)
        second = cache.get_or_stream(["review s4: decode"], _answer)
        list(second)
    finally:
        client.close()
    assert first.cache_info is not None and second.cache_info is not None
    # observed on main: outcome 'stored', then 'miss' again (every read fails to decode)
    assert (first.cache_info.outcome, second.cache_info.status) == ("stored", "hit")
