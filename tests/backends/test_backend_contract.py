"""The protocol contract, on every backend, through the sync methods and their async twins."""

from __future__ import annotations

import os
import threading
from typing import Any

import anyio
import pytest

from chengeta_ai.backends.base import namespace_tag_prefix, scoped_tag

pytestmark = pytest.mark.anyio


async def test_get_set_overwrite_delete_exists(twin: Any) -> None:
    assert await twin.get("k") is None
    assert not await twin.exists("k")
    await twin.set("k", b"v1")
    assert await twin.get("k") == b"v1"
    assert await twin.exists("k")
    await twin.set("k", b"v2")
    assert await twin.get("k") == b"v2"
    assert await twin.delete("k") is True
    assert await twin.delete("k") is False
    assert await twin.get("k") is None


async def test_binary_large_and_odd_keys(twin: Any) -> None:
    blob = os.urandom(1 << 20) + b"\x00\xff"
    odd = ["", " spaced key ", "ünïcødé/✓", "glob*?[x]\\", "a:b:c", "k" * 1000]
    for i, key in enumerate(odd):
        await twin.set(key, blob[i:] if i == 0 else bytes([i]) * i)
    assert await twin.get("") == blob
    for i, key in enumerate(odd[1:], start=1):
        assert await twin.get(key) == bytes([i]) * i


async def test_ttl_expiry(twin: Any) -> None:
    await twin.set("short", b"s", ttl=0.2)
    await twin.set("none", b"n", ttl=None)
    await twin.set("zero", b"z", ttl=0)
    await twin.set("negative", b"m", ttl=-5)
    assert await twin.get("short") == b"s"
    await anyio.sleep(0.35)
    assert await twin.get("short") is None
    assert not await twin.exists("short")
    assert await twin.get("none") == b"n"
    assert await twin.get("zero") == b"z"
    assert await twin.get("negative") == b"m"
    # a new set without ttl makes a once-expiring entry permanent
    await twin.set("short", b"s2", ttl=0.1)
    await twin.set("short", b"s3")
    await anyio.sleep(0.2)
    assert await twin.get("short") == b"s3"


async def test_invalidate_removes_exactly_the_tagged(twin: Any) -> None:
    await twin.set("a", b"a", tags=["model:gpt-4o", "user:1"])
    await twin.set("b", b"b", ttl=60, tags=["model:gpt-4o"])
    await twin.set("c", b"c", tags=["user:1"])
    await twin.set("d", b"d")
    await twin.set("e", b"e", tags=["model:gpt-4o-mini"])
    assert await twin.invalidate("model:gpt-4o") == 2
    assert [await twin.get(k) for k in "abcde"] == [None, None, b"c", b"d", b"e"]
    assert await twin.invalidate("model:gpt-4o") == 0
    assert await twin.invalidate("user:1") == 1
    assert await twin.invalidate("never-used") == 0
    assert [await twin.get(k) for k in "de"] == [b"d", b"e"]


async def test_duplicate_tags_and_retag(twin: Any) -> None:
    await twin.set("a", b"a", tags=["t", "t", "u"])
    assert await twin.invalidate("t") == 1
    assert await twin.get("a") is None
    await twin.set("a", b"a2", tags=["u"])
    assert await twin.invalidate("u") == 1


async def test_clear(twin: Any) -> None:
    for i in range(50):
        await twin.set(f"k{i}", b"x", tags=["t"] if i % 2 else ())
    await twin.clear()
    assert all([await twin.get(f"k{i}") is None for i in range(50)])
    assert await twin.invalidate("t") == 0
    await twin.set("after", b"ok", tags=["t"])
    assert await twin.get("after") == b"ok"


async def test_invalidate_namespace_removes_that_namespace_only(twin: Any) -> None:
    await twin.set("a:s:1", b"1", tags=[scoped_tag("a", "t"), scoped_tag("a", "u")])
    await twin.set("plain", b"p", tags=[scoped_tag("a", "t")])
    await twin.set("a:s:gone", b"x", ttl=0.05, tags=[scoped_tag("a", "t")])
    await twin.set("a:s:old", b"o", tags=["t"])  # bare tag (stored before scoping), key in a
    await twin.set("ab:s:old", b"o", tags=["t"])  # bare tag, key in ab
    await twin.set("old", b"o", tags=["t"])  # bare tag, key in no namespace
    await twin.set("ab:s:1", b"1", tags=[scoped_tag("ab", "t")])
    await twin.set("b:s:1", b"1", tags=[scoped_tag("b", "t"), "t"])
    await anyio.sleep(0.1)
    assert await twin.invalidate_namespace("a", "t") == 3  # live ones: a:s:1, plain, a:s:old
    for key in ("a:s:1", "plain", "a:s:old"):
        assert await twin.get(key) is None
    assert await twin.invalidate_namespace("a", "t") == 0
    assert await twin.invalidate_namespace("a", "u") == 0
    for key in ("ab:s:old", "old", "ab:s:1", "b:s:1"):
        assert await twin.get(key) is not None
    assert await twin.invalidate_namespace("ab", "t") == 2
    assert await twin.invalidate("t") == 2  # the bare tag, whole store: old, b:s:1


async def test_clear_namespace_removes_that_namespace_only(twin: Any) -> None:
    await twin.set("a:s:1", b"1")
    await twin.set("a:s:2", b"2", ttl=60, tags=[scoped_tag("a", "t"), "t"])
    await twin.set("plain-a", b"p", tags=[namespace_tag_prefix("a")])
    await twin.set("tagged-a", b"p", tags=[scoped_tag("a", "u")])
    keep = {
        "ab:s:1": [scoped_tag("ab", "t")],
        "a%:s:1": [scoped_tag("a%", "t")],
        "a_:s:1": [],
        "a*:s:1": [scoped_tag("a*", "t")],
        "b:s:1": ["t", scoped_tag("b", "t")],
        "plain-ab": [namespace_tag_prefix("ab")],
        "a": [],
        "a;": ["a:s:1"],
    }
    for key, tags in keep.items():
        await twin.set(key, b"k", tags=tags)
    await twin.clear_namespace("a")
    for key in ("a:s:1", "a:s:2", "plain-a", "tagged-a"):
        assert await twin.get(key) is None
    for key in keep:
        assert await twin.get(key) == b"k", key
    assert await twin.invalidate(scoped_tag("a", "t")) == 0
    assert await twin.invalidate_namespace("ab", "t") == 1
    await twin.clear_namespace("a")  # nothing left: a no-op
    await twin.set("a:s:1", b"again", tags=[scoped_tag("a", "t")])
    assert await twin.invalidate_namespace("a", "t") == 1


async def test_stats_is_a_dict(abackend: Any) -> None:
    backend = abackend
    backend.set("k", b"v")
    stats = backend.stats()
    assert isinstance(stats, dict)
    assert stats.get("errors", 0) == 0


def test_tag_registrations_survive_8_threads(backend: Any) -> None:
    """8 threads set tagged entries while others invalidate: none escapes a final invalidate."""
    n_threads, per_thread = 8, 60
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)

    def worker(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                backend.set(f"t{t}-{i}", b"v%d" % i, tags=["shared", f"own:{t}"])
                if i % 10 == 0:
                    backend.invalidate("shared" if t % 2 else f"own:{(t + 1) % n_threads}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    backend.set("bystander", b"b", tags=["other"])
    backend.invalidate("shared")
    leftovers = [
        (t, i)
        for t in range(n_threads)
        for i in range(per_thread)
        if backend.get(f"t{t}-{i}") is not None
    ]
    assert leftovers == []
    assert backend.get("bystander") == b"b"


async def test_tag_registrations_survive_concurrent_tasks(abackend: Any) -> None:
    backend = abackend
    n_tasks, per_task = 16, 25

    async def worker(t: int) -> None:
        for i in range(per_task):
            await backend.aset(f"a{t}-{i}", b"v", None, ["shared", f"own:{t}"])
            if i % 5 == 0:
                await backend.ainvalidate("shared" if t % 2 else f"own:{(t + 3) % n_tasks}")

    async with anyio.create_task_group() as tg:
        for t in range(n_tasks):
            tg.start_soon(worker, t)
    await backend.aset("bystander", b"b", None, ["other"])
    await backend.ainvalidate("shared")
    for t in range(n_tasks):
        for i in range(per_task):
            assert await backend.aget(f"a{t}-{i}") is None
    assert await backend.aget("bystander") == b"b"
