"""Tenants are isolated: removals through a manager touch only its namespace.

Two (or more) `CacheManager`s with different ``CacheKeyBuilder(namespace=...)`` share ONE
backend (memory, a SQLite file, a real redis-server); ``invalidate`` and ``clear`` through one
leave the others' entries alone, through the sync methods and their async twins (asyncio and
trio). Before tags were scoped, every one of these tests failed: the default tag carried no
namespace and the backends' ``invalidate`` / ``clear`` acted on the whole store.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from chengeta_ai import CacheKeyBuilder, CacheManager
from chengeta_ai.core.cache_manager import frame
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "Explain caching."}]
# Prefixes of each other, and every SQL LIKE wildcard / Redis glob character.
ODD_NAMESPACES = ["a", "ab", "a%", "a_", "%", "_", "a*", "*", "a?", "?", "a[b]", "[", "a\\", "\\"]


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Tenant:
    """A manager of one namespace on the shared backend, driven sync or async."""

    def __init__(self, backend: Any, namespace: str, mode: str) -> None:
        self.manager = CacheManager(backend=backend, key_builder=CacheKeyBuilder(namespace))
        self.mode = mode

    def key(self, model_id: str = "gpt-4o") -> str:
        return self.manager.key_builder.build(MESSAGES, model_id)

    async def call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        if self.mode == "sync":
            return getattr(self.manager, op)(*args, **kwargs)
        return await getattr(self.manager, "a" + op)(*args, **kwargs)

    async def set_raw(self, key: str, value: bytes, tags: tuple[str, ...]) -> bool:
        """What the streaming layer does: framed bytes, its default ``model:<id>`` tag."""
        if self.mode == "sync":
            return self.manager.set_raw(key, frame(value), None, tags)
        return await self.manager.aset_raw(key, frame(value), None, tags)


def tenants(backend: Any, mode: str, *namespaces: str) -> list[Tenant]:
    return [Tenant(backend, ns, mode) for ns in namespaces]


async def fill(t: Tenant) -> None:
    """Entries as the streaming layer and as a direct user store them, all tagged alike."""
    assert await t.set_raw(t.key("gpt-4o"), b"stream", ("model:gpt-4o",))
    assert await t.call("set", t.key("gpt-4o-mini"), "v", tags=["model:gpt-4o", "team:x"])
    assert await t.call("set", t.key("other"), "v", tags=["model:other"])


async def present(t: Tenant) -> list[bool]:
    return [await t.call("exists", t.key(m)) for m in ("gpt-4o", "gpt-4o-mini", "other")]


async def test_invalidate_in_one_namespace_leaves_the_other(abackend: Any, mode: str) -> None:
    backend = abackend  # closed on this test's own loop (see conftest)
    a, b = tenants(backend, mode, "tenant-a", "tenant-b")
    await fill(a)
    await fill(b)
    assert await a.call("invalidate", "model:gpt-4o") == 2
    assert await present(a) == [False, False, True]
    assert await present(b) == [True, True, True]
    assert await a.call("invalidate", "model:gpt-4o") == 0
    assert await a.call("invalidate", "team:x") == 0
    assert await b.call("invalidate", "team:x") == 1
    assert await b.call("invalidate", "model:gpt-4o") == 1
    assert await present(b) == [False, False, True]
    assert await a.call("get", a.key("other")) == "v"


async def test_clear_in_one_namespace_leaves_the_other(abackend: Any, mode: str) -> None:
    backend = abackend  # closed on this test's own loop (see conftest)
    a, b = tenants(backend, mode, "tenant-a", "tenant-b")
    await fill(a)
    await fill(b)
    # keys of the user's own choosing, outside any namespace's key prefix
    assert await a.call("set", "plain-a", 1)
    assert await b.call("set", "plain-b", 2, tags=["model:gpt-4o"])
    await a.call("clear")
    assert await present(a) == [False, False, False]
    assert not await a.call("exists", "plain-a")
    assert await present(b) == [True, True, True]
    assert await b.call("get", "plain-b") == 2
    assert await b.call("invalidate", "model:gpt-4o") == 3
    await b.call("clear")
    assert not await b.call("exists", "plain-b")
    assert await present(b) == [False, False, False]
    # the manager still stores after a clear
    await fill(a)
    assert await present(a) == [True, True, True]


async def test_namespaces_that_are_prefixes_or_wildcards_do_not_collide(
    abackend: Any, mode: str
) -> None:
    backend = abackend  # closed on this test's own loop (see conftest)
    ts = tenants(backend, mode, *ODD_NAMESPACES)
    for t in ts:
        await fill(t)
        assert await t.call("set", f"plain-{t.manager.key_builder.namespace}", 1, tags=["t"])
    for i, t in enumerate(ts):
        assert await t.call("invalidate", "model:gpt-4o") == 2, t.manager.key_builder
        for other in ts[i + 1 :]:
            assert await present(other) == [True, True, True], (t.manager, other.manager)
    for i, t in enumerate(ts):
        await t.call("clear")
        assert await present(t) == [False, False, False]
        for other in ts[i + 1 :]:
            assert await present(other) == [False, False, True], (t.manager, other.manager)
            ns = other.manager.key_builder.namespace
            assert await other.call("exists", f"plain-{ns}"), (t.manager, other.manager)


async def test_entries_stored_with_bare_tags_stay_reachable_per_namespace(
    abackend: Any, mode: str
) -> None:
    backend = abackend  # closed on this test's own loop (see conftest)
    """Entries stored before tags were scoped carry the bare tag: the manager of their key's
    namespace still invalidates them, no other manager does."""
    a, b, ab = tenants(backend, mode, "a", "b", "ab")
    for t in (a, b, ab):
        backend.set(t.key(), frame(b"old"), None, ["model:gpt-4o"])
    backend.set("someone-else", frame(b"old"), None, ["model:gpt-4o"])
    assert await a.call("invalidate", "model:gpt-4o") == 1
    assert [await t.call("exists", t.key()) for t in (a, b, ab)] == [False, True, True]
    await b.call("clear")
    assert [await t.call("exists", t.key()) for t in (a, b, ab)] == [False, False, True]
    assert await ab.call("invalidate", "model:gpt-4o") == 1
    assert backend.get("someone-else") is not None  # in no namespace: left to its owner


def test_streaming_default_tags_are_per_namespace(backend: Any) -> None:
    """The streaming layer, unchanged, tags ``model:<id>``: the tag is scoped by the manager."""
    caches = [
        StreamingResponseCache(CacheManager(backend=backend, key_builder=CacheKeyBuilder(ns)))
        for ns in ("tenant-a", "tenant-b")
    ]
    calls = [0]

    def upstream(messages: Any) -> Iterator[str]:
        calls[0] += 1
        yield from ("a", "b", "c")

    def stream(cache: StreamingResponseCache) -> list[Any]:
        out = list(cache.get_or_stream(MESSAGES, upstream, model_id="gpt-4o"))
        deadline = time.monotonic() + 10
        while not cache.manager.exists(cache.manager.key_builder.build(MESSAGES, "gpt-4o")):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        return out

    for cache in caches:
        assert stream(cache) == ["a", "b", "c"]
    assert calls == [2]
    assert caches[0].manager.invalidate("model:gpt-4o") == 1
    assert list(caches[1].get_or_stream(MESSAGES, upstream, model_id="gpt-4o")) == ["a", "b", "c"]
    assert calls == [2]  # B's entry survived: a hit
    assert stream(caches[0]) == ["a", "b", "c"]
    assert calls == [3]


def test_redis_scoped_tags_cost_no_round_trip(redis_server: Any) -> None:
    """Scoping happens in the manager, in memory: still one round trip per store and per hit."""
    from chengeta_ai.backends.redis_backend import RedisBackend

    backend = RedisBackend(redis_server.url, prefix="rt-ns:")
    manager = CacheManager(backend=backend, key_builder=CacheKeyBuilder("tenant-a"))
    key = manager.key_builder.build(MESSAGES, "gpt-4o")
    before = backend.stats()["round_trips"]
    assert manager.set(key, "v", tags=["model:gpt-4o", "team:x"])
    assert backend.stats()["round_trips"] == before + 1
    assert manager.get(key) == "v"
    assert backend.stats()["round_trips"] == before + 2
    manager.clear()
    backend.close()
