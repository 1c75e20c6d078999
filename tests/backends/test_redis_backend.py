"""RedisBackend against a real redis-server: round trips, tag sets, cluster slots, failures."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import redis
from redis.crc import key_slot

from chengeta_ai.backends.redis_backend import RedisBackend
from chengeta_ai.errors import BackendError
from redis_fixture import RedisServer


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def rb(redis_server: RedisServer) -> Iterator[RedisBackend]:
    b = RedisBackend(redis_server.url, prefix=f"r-{uuid.uuid4().hex[:8]}:")
    yield b
    b.close()


def commandstats(raw: redis.Redis) -> dict[str, int]:
    info: dict[str, Any] = raw.info("commandstats")
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in info.items() if k != "cmdstat_info"}


def test_one_round_trip_per_get_and_per_store(rb: RedisBackend, raw: redis.Redis) -> None:
    # connection set-up (HELLO/CLIENT SETINFO) and the script's first load out of the way
    rb.set("warm", b"x", tags=["warm"])
    before = rb.stats()["round_trips"]
    raw.config_resetstat()
    rb.set("k", b"v" * 1000, ttl=60, tags=["model:gpt-4o", "user:1", "tenant:a"])
    assert rb.stats()["round_trips"] - before == 1
    calls = commandstats(raw)
    # one script: per tag a TYPE check, then the SET and, per tag, ZADD + prune + 2 PEXPIRE
    assert calls == {"evalsha": 1, "type": 3, "set": 1, "zadd": 3, "zremrangebyscore": 3,
                     "pexpire": 6, "config|resetstat": 1}  # fmt: skip
    raw.config_resetstat()
    rb.set("untagged", b"v", ttl=60)  # no tags: a plain SET
    assert commandstats(raw) == {"set": 1, "config|resetstat": 1}
    raw.config_resetstat()
    assert rb.get("k") == b"v" * 1000
    assert rb.get("missing") is None
    assert rb.stats()["round_trips"] - before == 4  # the tagged set, the untagged one, two gets
    assert commandstats(raw) == {"get": 2, "config|resetstat": 1}


@pytest.mark.anyio
async def test_async_twins_round_trips(rb: RedisBackend, raw: redis.Redis) -> None:
    await rb.aset("warm", b"x", tags=["warm"])
    before = rb.stats()["round_trips"]
    raw.config_resetstat()
    await rb.aset("k", b"v", 60, ["t1", "t2"])
    assert await rb.aget("k") == b"v"
    assert rb.stats()["round_trips"] - before == 2
    calls = commandstats(raw)
    assert calls["evalsha"] == calls["get"] == 1 and "eval" not in calls
    assert await rb.ainvalidate("t1") == 1
    assert not await rb.aexists("k")
    await rb.aclose()


def test_tag_set_outlives_its_longest_member(rb: RedisBackend, raw: redis.Redis) -> None:
    tk = rb.tag_key("t")
    grace_ms = int(rb.tag_prune_grace * 1000)
    rb.set("a", b"a", ttl=10, tags=["t"])
    assert 10_000 < raw.pttl(tk) <= 10_000 + grace_ms
    rb.set("b", b"b", ttl=100, tags=["t"])
    assert 100_000 < raw.pttl(tk) <= 100_000 + grace_ms
    rb.set("c", b"c", ttl=5, tags=["t"])  # shorter: GT keeps the longer expiry
    assert raw.pttl(tk) > 100_000
    rb.set("d", b"d", tags=["t"])  # no TTL: the tag set practically never expires
    assert raw.pttl(tk) > 50 * 365 * 24 * 3600 * 1000
    rb.set("e", b"e", ttl=1, tags=["t"])
    assert raw.pttl(tk) > 50 * 365 * 24 * 3600 * 1000
    assert rb.invalidate("t") == 5
    assert not raw.exists(tk)


def test_stale_members_are_pruned(redis_server: RedisServer, raw: redis.Redis) -> None:
    rb = RedisBackend(redis_server.url, prefix="prune:", tag_prune_grace=0.0)
    rb.set("old", b"o", ttl=0.05, tags=["t"])
    time.sleep(0.1)
    rb.set("new", b"n", ttl=60, tags=["t"])
    assert raw.zrange(rb.tag_key("t"), 0, -1) == [b"new"]
    rb.clear()
    rb.close()


def test_cluster_hash_tag_prefix_puts_a_namespace_in_one_slot(
    redis_server: RedisServer, raw: redis.Redis
) -> None:
    rb = RedisBackend(redis_server.url, prefix="{chengeta-test}:")
    for i in range(20):
        rb.set(f"key-{i}", b"v", ttl=60, tags=[f"model:{i % 3}", "all", f"user:{i}"])
    keys = list(raw.scan_iter(match="{chengeta-test}:*"))
    assert len(keys) == 20 + 3 + 1 + 20
    assert {key_slot(k) for k in keys} == {key_slot(b"chengeta-test")}
    # without a hash tag, entries and tag sets spread over slots (why MULTI would fail there)
    assert len({key_slot(k.replace(b"{chengeta-test}", b"plain")) for k in keys}) > 1
    rb.clear()
    assert list(raw.scan_iter(match="{chengeta-test}:*")) == []
    rb.close()


def test_prefixes_isolate_namespaces(redis_server: RedisServer) -> None:
    one = RedisBackend(redis_server.url, prefix="ns[1]*:")
    two = RedisBackend(redis_server.url, prefix="ns[1]*x:")
    one.set("k", b"1", tags=["t"])
    two.set("k", b"2", tags=["t"])
    one.clear()  # glob characters in the prefix are escaped
    assert one.get("k") is None and two.get("k") == b"2"
    assert one.invalidate("t") == 0 and two.invalidate("t") == 1
    one.close()
    two.close()


def test_closed_backend_raises(rb: RedisBackend) -> None:
    rb.close()
    with pytest.raises(BackendError):
        rb.get("k")


def test_given_client_is_not_closed(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    rb = RedisBackend(client=client, prefix="given:")
    rb.set("k", b"v")
    rb.close()
    assert client.get("given:k:k") == b"v"
    client.delete("given:k:k")
    client.close()


def test_server_killed_then_restarted(restartable_redis: RedisServer) -> None:
    rb = RedisBackend(restartable_redis.url, prefix="kill:", down_backoff=0.2)
    rb.set("k", b"v", tags=["t"])
    assert rb.get("k") == b"v"
    restartable_redis.kill()
    for op in (lambda: rb.get("k"), lambda: rb.set("k2", b"v", 1, ["t"]), lambda: rb.exists("k")):
        t0 = time.monotonic()
        with pytest.raises(BackendError):
            op()
        assert time.monotonic() - t0 < 0.5  # refused at once, or short-circuited
    stats = rb.stats()
    assert stats["errors"] == 3 and stats["short_circuited"] >= 1 and stats["down"]
    restartable_redis.start()  # empty: --save '' means nothing survives
    time.sleep(0.25)
    assert rb.get("k") is None  # reconnected
    rb.set("k", b"again", tags=["t"])
    assert rb.get("k") == b"again"
    assert rb.invalidate("t") == 1
    rb.close()


def test_unreachable_server_fails_fast() -> None:
    from redis_fixture import free_port

    rb = RedisBackend(f"redis://127.0.0.1:{free_port()}/0", prefix="x:")
    t0 = time.monotonic()
    for _ in range(20):
        with pytest.raises(BackendError):
            rb.get("k")
    assert time.monotonic() - t0 < 1.0
    rb.close()


@pytest.mark.anyio
async def test_async_server_killed_then_restarted(restartable_redis: RedisServer) -> None:
    rb = RedisBackend(restartable_redis.url, prefix="akill:", down_backoff=0.2)
    await rb.aset("k", b"v")
    assert await rb.aget("k") == b"v"
    restartable_redis.kill()
    with anyio.fail_after(2):
        with pytest.raises(BackendError):
            await rb.aget("k")
        with pytest.raises(BackendError):
            await rb.aset("k", b"v")
    restartable_redis.start()
    await anyio.sleep(0.25)
    assert await rb.aget("k") is None
    await rb.aset("k", b"back")
    assert await rb.aget("k") == b"back"
    await rb.aclose()


def test_values_are_opaque_bytes(rb: RedisBackend) -> None:
    import pickle

    payload = pickle.dumps({"would": "unpickle"})
    rb.set("p", payload)
    assert rb.get("p") == payload  # bytes out, never an object
