"""Review s4b, finding (seen while testing the Redis fixes under Redis Cluster; older than
them): a ``RedisBackend(client=...)`` talks to another server on asyncio (HIGH).

``RedisBackend(client=<redis.Redis or RedisCluster>)`` without ``url`` (the module doc: "Pass a
``redis.cluster.RedisCluster`` as ``client`` to use a cluster") uses the given client for the
sync methods and, on trio, for the async twins (in a worker thread). On asyncio the async twins
(`_aclient`) build a ``redis.asyncio.Redis`` from ``self.url``, which is then the *default*
``redis://127.0.0.1:6379/0``: every ``aget_or_stream`` lookup and store goes to localhost,
not to the server the user gave. With nothing on 6379 every async call is a backend error and
nothing is cached on asyncio (sync and trio cache fine); with a local Redis on 6379 (a dev box,
a sidecar) async entries are read from and written to the wrong server, mixing caches that
were meant to be apart. The same happens with the Redis Cluster fixture
(tests/redis_flights/redis_cluster.py): sync tagged stores work, async ones go to 6379.
Observed on main (asyncio): nothing stored on the given server, the second call not a hit.

Fix direction: when ``client`` is given without ``async_client``, do not invent a URL: derive
the async client from the given client's connection kwargs (``client.connection_pool.
connection_kwargs``; ``redis.asyncio.RedisCluster`` for a cluster), or run the given sync
client in a worker thread as on trio; refuse ``url`` and ``client`` that disagree.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from tests.redis_fixture import RedisServer

from chengeta_ai import CacheManager, RedisBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache


@pytest.fixture
def given_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.mark.anyio
async def test_async_twins_use_the_given_client(given_client: redis.Redis) -> None:
    prefix = f"given-{uuid.uuid4().hex[:8]}:"
    backend = RedisBackend(client=given_client, prefix=prefix)
    cache = StreamingResponseCache(CacheManager(backend=backend))
    messages = [{"role": "user", "content": "which server?"}]
    first = [c async for c in cache.aget_or_stream(messages, lambda m: ["a", "b"])]
    again = [c async for c in cache.aget_or_stream(messages, lambda m: ["live"])]
    stored = given_client.keys(prefix + "k:*")
    await backend.aclose()
    assert first == ["a", "b"]
    # observed on main (asyncio): [] stored on the given server, ['live'] (backend errors
    # against redis://127.0.0.1:6379/0); trio: stored, a hit
    assert stored, f"nothing stored on the given server; stats: {cache.stats()}"
    assert again == ["a", "b"]
