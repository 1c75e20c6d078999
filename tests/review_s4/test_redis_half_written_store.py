"""Review s4, finding: a Redis store reported failed is in fact stored, untagged (MEDIUM).

`RedisBackend.set` sends ``SET`` and the tag commands (``ZADD``, ...) in one ``MULTI/EXEC``.
Redis transactions are not rolled back: when a queued command fails at run time (here
``WRONGTYPE``: the tag's key holds a string, left by another program, an older layout, or a
stray ``SET``), the other commands still run and redis-py raises after ``EXEC``. So:

- the entry **is** written (the next call is a ``hit`` replaying it), but the cache reports the
  stream as not stored: outcome ``backend_error``, ``stats().not_stored_backend_error == 1``,
  ``stats().stores == 0``, and a warning "will not be cached";
- the entry is not registered under its tag, so once the tag key is repaired,
  ``manager.invalidate("model:<id>")`` returns without removing it: an invalidated answer keeps
  being served (until its TTL, possibly never).

Fix direction: make the write all-or-nothing (a Lua script that checks the tag keys' types
before writing anything, or ``WATCH``/``TYPE`` checks), or on a partial failure ``UNLINK`` the
entry so that what is reported (not stored) is what happened.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import redis
from tests.redis_fixture import RedisServer

from chengeta_ai import CacheManager, RedisBackend
from chengeta_ai.backends.base import scoped_tag
from chengeta_ai.layers.streaming_cache import StreamingResponseCache


class Setup:
    def __init__(self, server: RedisServer) -> None:
        self.prefix = f"s4-{uuid.uuid4().hex[:8]}:"
        self.raw = redis.Redis.from_url(server.url)
        self.backend = RedisBackend(server.url, prefix=self.prefix)
        self.cache = StreamingResponseCache(CacheManager(backend=self.backend))
        # the tag set the store will ZADD to, planted as a plain string
        self.tag_key = self.backend.tag_key(scoped_tag("chengeta", "model:gpt-4o"))
        self.raw.set(self.tag_key, b"not a sorted set")

    def close(self) -> None:
        self.backend.close()
        self.raw.close()


@pytest.fixture
def setup(redis_server: RedisServer) -> Iterator[Setup]:
    s = Setup(redis_server)
    yield s
    s.close()


def _first(m: Any) -> list[str]:
    return ["first", "answer"]


def _second(m: Any) -> list[str]:
    return ["second", "answer"]


def test_outcome_says_not_stored_but_the_entry_is_served(setup: Setup) -> None:
    cache = setup.cache
    stream = cache.get_or_stream(["q"], _first, model_id="gpt-4o")
    assert list(stream) == ["first", "answer"]
    assert stream.cache_info is not None
    reported = stream.cache_info.outcome
    again = cache.get_or_stream(["q"], _second, model_id="gpt-4o")
    served = list(again)
    assert again.cache_info is not None
    # observed on main: reported 'backend_error' (not_stored_backend_error=1, stores=0), and
    # the next call is a hit replaying ['first', 'answer']
    assert (reported == "stored") == (again.cache_info.status == "hit"), (
        f"outcome {reported!r} but the next call was a {again.cache_info.status} serving {served}"
    )


def test_invalidate_after_repair_leaves_the_entry(setup: Setup) -> None:
    cache = setup.cache
    list(cache.get_or_stream(["q"], _first, model_id="gpt-4o"))
    setup.raw.delete(setup.tag_key)  # the stray key is removed
    cache.manager.invalidate("model:gpt-4o")
    again = cache.get_or_stream(["q"], _second, model_id="gpt-4o")
    # observed on main: ['first', 'answer'] (a hit) after invalidate
    assert list(again) == ["second", "answer"]


@pytest.mark.anyio
async def test_async_outcome_says_not_stored_but_the_entry_is_served(setup: Setup) -> None:
    cache = setup.cache
    try:
        stream = cache.aget_or_stream(["q"], _first, model_id="gpt-4o")
        assert [c async for c in stream] == ["first", "answer"]
        assert stream.cache_info is not None
        reported = stream.cache_info.outcome
        again = cache.aget_or_stream(["q"], _second, model_id="gpt-4o")
        served = [c async for c in again]
        assert again.cache_info is not None
    finally:
        await setup.backend.aclose()
    await anyio.lowlevel.checkpoint()
    assert (reported == "stored") == (again.cache_info.status == "hit"), (
        f"outcome {reported!r} but the next call was a {again.cache_info.status} serving {served}"
    )
