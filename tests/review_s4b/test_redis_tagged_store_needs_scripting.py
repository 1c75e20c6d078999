"""Review s4b, finding: every store to Redis now needs Lua scripting (LOW-MEDIUM).

Fix 6a4d80d made ``RedisBackend.set`` with tags one Lua script (``EVALSHA``, then ``EVAL`` on
NOSCRIPT). Every entry `StreamingResponseCache` stores carries tags (the model's, at least),
so every store is now a script. A Redis user whose ACL leaves out ``@scripting`` (a common
hardening: ``+@all -@scripting``), or a Redis-compatible server with scripting off (Microsoft
Garnet without ``--lua``, proxies that refuse EVAL), gets ``NOPERM`` / an unknown-command error
on every store: each is counted as a backend error and nothing is ever cached, while reads,
plain SETs and the old ``MULTI`` path work. Before the fix the same user cached normally.
Observed on main: outcome ``backend_error``; the second identical call goes upstream again.

Fix direction: when the script is refused (NOPERM, ERR unknown command), fall back once per
backend to a non-script path (``WATCH`` the tag keys, check their ``TYPE``, then ``MULTI``:
still all or nothing, EXEC aborts if a tag key changed), or refuse such a client at
construction with a clear error instead of failing every store quietly; document the ACL
categories RedisBackend needs.
"""

from __future__ import annotations

import uuid

import pytest
import redis
from tests.redis_fixture import RedisServer

from chengeta_ai import CacheManager, RedisBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache


@pytest.fixture
def no_scripting_url(redis_server: RedisServer) -> str:
    """A Redis user allowed every command but scripting, on the session's redis-server."""
    user = f"nolua-{uuid.uuid4().hex[:8]}"
    admin = redis.Redis.from_url(redis_server.url)
    admin.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all", "-@scripting")
    admin.close()
    return redis_server.url.replace("redis://", f"redis://{user}:pw@", 1)


def test_a_user_without_scripting_can_still_cache(no_scripting_url: str) -> None:
    backend = RedisBackend(no_scripting_url, prefix=f"nolua-{uuid.uuid4().hex[:8]}:")
    cache = StreamingResponseCache(CacheManager(backend=backend))
    messages = [{"role": "user", "content": "hardened redis"}]
    try:
        first = cache.get_or_stream(messages, lambda m: ["a", "b"], model_id="gpt-4o")
        assert list(first) == ["a", "b"]
        again = cache.get_or_stream(messages, lambda m: ["live"], model_id="gpt-4o")
        # observed on main: ['live'] (the store failed with NOPERM: backend_error)
        assert list(again) == ["a", "b"], cache.stats()
    finally:
        backend.close()


# -- added with the fix: the fallback (WATCH/TYPE/MULTI) is all or nothing too -----------------


def test_without_scripting_a_wrong_typed_tag_key_stores_nothing(no_scripting_url: str) -> None:
    from chengeta_ai.backends.base import scoped_tag

    prefix = f"nolua-{uuid.uuid4().hex[:8]}:"
    backend = RedisBackend(no_scripting_url, prefix=prefix)
    raw = redis.Redis.from_url(no_scripting_url)
    raw.set(backend.tag_key(scoped_tag("chengeta", "model:gpt-4o")), b"not a sorted set")
    cache = StreamingResponseCache(CacheManager(backend=backend))
    messages = [{"role": "user", "content": "hardened redis, wrong tag"}]
    try:
        first = cache.get_or_stream(messages, lambda m: ["a", "b"], model_id="gpt-4o")
        assert list(first) == ["a", "b"]
        assert first.cache_info is not None and first.cache_info.outcome == "backend_error"
        again = cache.get_or_stream(messages, lambda m: ["live"], model_id="gpt-4o")
        assert list(again) == ["live"]  # nothing was written
    finally:
        backend.close()
        raw.close()


@pytest.mark.anyio
async def test_async_a_user_without_scripting_can_still_cache(no_scripting_url: str) -> None:
    backend = RedisBackend(no_scripting_url, prefix=f"nolua-{uuid.uuid4().hex[:8]}:")
    cache = StreamingResponseCache(CacheManager(backend=backend))
    messages = [{"role": "user", "content": "hardened redis, async"}]
    try:
        first = [c async for c in cache.aget_or_stream(messages, lambda m: ["a"], model_id="m")]
        again = [c async for c in cache.aget_or_stream(messages, lambda m: ["x"], model_id="m")]
    finally:
        await backend.aclose()
    assert first == again == ["a"]
