"""CacheManager and InMemoryBackend: values, TTL, tags, bounds, framing and fail-open rules.

Sync and async twins run the same body (`Twin`), async on asyncio and trio.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import anyio
import pytest

from chengeta_ai import (
    BackendError,
    CacheKeyBuilder,
    CacheManager,
    InMemoryBackend,
    JsonSerializer,
    PickleSerializer,
)
from chengeta_ai.backends.base import BaseBackend
from chengeta_ai.core import cache_manager as cm
from chengeta_ai.testing import openai_chunks


@pytest.fixture(params=["sync", "asyncio", "trio"])
def twin(request: pytest.FixtureRequest) -> Any:
    """Calls ``manager.<op>`` or ``await manager.a<op>`` on the chosen side."""
    mode = request.param

    def call(manager: CacheManager, op: str, *args: Any, **kwargs: Any) -> Any:
        if mode == "sync":
            return getattr(manager, op)(*args, **kwargs)

        async def run() -> Any:
            return await getattr(manager, "a" + op)(*args, **kwargs)

        return anyio.run(run, backend=mode)

    return call


def test_values_round_trip_with_every_serializer(twin: Any) -> None:
    chunks = openai_chunks(10)
    for serializer in (None, PickleSerializer()):
        manager = CacheManager(serializer=serializer)
        assert twin(manager, "set", "k", chunks) is True
        assert twin(manager, "get", "k") == chunks
        assert twin(manager, "exists", "k") is True
        assert twin(manager, "get", "missing", "dflt") == "dflt"
    manager = CacheManager(serializer=JsonSerializer())
    assert twin(manager, "set", "k", {"text": "hi", "n": [1, 2]})
    assert twin(manager, "get", "k") == {"text": "hi", "n": [1, 2]}
    stats = manager.stats()
    assert stats["hits"] == 1 and stats["sets"] == 1
    assert stats["backend"]["entries"] == 1


def test_default_ttl_and_per_call_override(twin: Any) -> None:
    manager = CacheManager(default_ttl=0.05)
    twin(manager, "set", "short", 1)
    twin(manager, "set", "long", 2, ttl=60)
    time.sleep(0.08)
    assert twin(manager, "get", "short") is None
    assert twin(manager, "get", "long") == 2


def test_invalidate_removes_exactly_the_tagged_entries(twin: Any) -> None:
    manager = CacheManager()
    twin(manager, "set", "a", 1, tags=["model:x", "team:1"])
    twin(manager, "set", "b", 2, tags=["model:x"])
    twin(manager, "set", "c", 3, tags=["model:y"])
    assert twin(manager, "invalidate", "model:x") == 2
    assert [twin(manager, "exists", k) for k in "abc"] == [False, False, True]
    assert twin(manager, "invalidate", "team:1") == 0
    assert twin(manager, "delete", "c") is True
    assert twin(manager, "delete", "c") is False
    twin(manager, "set", "d", 4)
    twin(manager, "clear")
    assert twin(manager, "get", "d") is None


def test_oversized_and_unencodable_values_are_not_stored(
    twin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    manager = CacheManager(max_entry_bytes=100)
    with caplog.at_level(logging.INFO, logger="chengeta_ai"):
        assert twin(manager, "set", "big", "x" * 1000) is False
        assert twin(manager, "set", "odd", {1, 2}) is False
    assert manager.stats()["oversized_entries"] == 1
    assert manager.stats()["encode_errors"] == 1
    assert "max_entry_bytes" in caplog.text and "set" in caplog.text


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "empty"])
def test_corrupt_entries_are_misses_and_are_deleted(twin: Any, damage: str) -> None:
    manager = CacheManager()
    twin(manager, "set", "k", ["some", "value"])
    raw = bytearray(manager.backend.get("k") or b"")
    if damage == "flip":
        raw[-1] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "foreign":
        raw = bytearray(b"\x80\x04K\x01.")  # a pickle, not ours
    else:
        raw = bytearray()
    manager.backend.set("k", bytes(raw))
    assert twin(manager, "get", "k", "miss") == "miss"
    assert manager.backend.get("k") is None
    assert manager.stats()["corrupt_entries"] == 1


class DownBackend(InMemoryBackend):
    def get(self, key: str) -> bytes | None:
        raise ConnectionError("down")

    def set(self, key: str, value: bytes, ttl: float | None = None, tags: Any = ()) -> None:
        raise ConnectionError("down")

    def invalidate(self, tag: str) -> int:
        raise ConnectionError("down")

    def invalidate_namespace(self, namespace: str, tag: str) -> int:
        raise ConnectionError("down")

    def clear_namespace(self, namespace: str) -> None:
        raise ConnectionError("down")

    def exists(self, key: str) -> bool:
        raise ConnectionError("down")

    async def aget(self, key: str) -> bytes | None:
        return self.get(key)

    async def aset(self, key: str, value: bytes, ttl: float | None = None, tags: Any = ()) -> None:
        self.set(key, value)

    async def ainvalidate(self, tag: str) -> int:
        return self.invalidate(tag)

    async def ainvalidate_namespace(self, namespace: str, tag: str) -> int:
        return self.invalidate_namespace(namespace, tag)

    async def aclear_namespace(self, namespace: str) -> None:
        self.clear_namespace(namespace)

    async def aexists(self, key: str) -> bool:
        return self.exists(key)


def test_reads_and_writes_fail_open_removals_raise(twin: Any) -> None:
    manager = CacheManager(backend=DownBackend())
    assert twin(manager, "get", "k", "dflt") == "dflt"
    assert twin(manager, "set", "k", 1) is False
    assert twin(manager, "exists", "k") is False
    with pytest.raises(BackendError, match="invalidate"):
        twin(manager, "invalidate", "model:x")
    with pytest.raises(BackendError, match="clear"):
        twin(manager, "clear")
    assert manager.stats()["backend_errors"] == 5


class ProtocolOnlyBackend:
    """A third-party backend written against the `Backend` protocol alone: no
    ``invalidate_namespace`` / ``clear_namespace``."""

    def __init__(self) -> None:
        self.inner = InMemoryBackend()

    def get(self, key: str) -> bytes | None:
        return self.inner.get(key)

    def set(self, key: str, value: bytes, ttl: float | None = None, tags: Any = ()) -> None:
        self.inner.set(key, value, ttl, tags)

    def delete(self, key: str) -> bool:
        return self.inner.delete(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def invalidate(self, tag: str) -> int:
        return self.inner.invalidate(tag)

    def clear(self) -> None:
        self.inner.clear()

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}

    async def aget(self, key: str) -> bytes | None:
        return self.get(key)

    async def aset(self, key: str, value: bytes, ttl: float | None = None, tags: Any = ()) -> None:
        self.set(key, value, ttl, tags)

    async def adelete(self, key: str) -> bool:
        return self.delete(key)

    async def aexists(self, key: str) -> bool:
        return self.exists(key)

    async def ainvalidate(self, tag: str) -> int:
        return self.invalidate(tag)

    async def aclear(self) -> None:
        self.clear()

    async def aclose(self) -> None:
        pass


class BaseOnlyBackend(ProtocolOnlyBackend, BaseBackend):
    """A third-party `BaseBackend` subclass from before: the sync operations only (its
    namespace methods are BaseBackend's, raising NotImplementedError; async twins in threads)."""

    aget = BaseBackend.aget
    aset = BaseBackend.aset
    adelete = BaseBackend.adelete
    aexists = BaseBackend.aexists
    ainvalidate = BaseBackend.ainvalidate
    aclear = BaseBackend.aclear


@pytest.mark.parametrize("backend_class", [ProtocolOnlyBackend, BaseOnlyBackend])
def test_backend_without_namespace_methods_keeps_namespaces_apart(
    twin: Any, backend_class: type, caplog: pytest.LogCaptureFixture
) -> None:
    """invalidate falls back to the backend's invalidate of the scoped tag (warned once);
    clear raises rather than empty every namespace."""
    backend = backend_class()
    a = CacheManager(backend=backend, key_builder=CacheKeyBuilder("a"))
    b = CacheManager(backend=backend, key_builder=CacheKeyBuilder("b"))
    for manager in (a, b):
        assert twin(manager, "set", manager.key_builder.build("hi"), 1, tags=["model:x"])
        assert twin(manager, "set", "plain", 2)  # the same key: b's store replaces a's
    with caplog.at_level(logging.WARNING, logger="chengeta_ai"):
        assert twin(a, "invalidate", "model:x") == 1
        assert twin(a, "invalidate", "model:x") == 0
    assert caplog.text.count("has no invalidate_namespace()") == 1
    assert twin(b, "get", b.key_builder.build("hi")) == 1
    with pytest.raises(BackendError, match=r"no clear_namespace\(\).*'a'.*backend\.clear\(\)"):
        twin(a, "clear")
    assert twin(b, "get", b.key_builder.build("hi")) == 1
    assert twin(b, "get", "plain") == 2
    assert twin(b, "invalidate", "model:x") == 1


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"ttl": 0}, ValueError),
        ({"ttl": float("inf")}, ValueError),
        ({"ttl": True}, TypeError),
        ({"tags": "one"}, TypeError),
        ({"tags": [""]}, TypeError),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        CacheManager().set("k", 1, **kwargs)


def test_constructor_defaults_and_validation() -> None:
    manager = CacheManager()
    assert isinstance(manager.backend, InMemoryBackend)
    assert isinstance(manager.key_builder, CacheKeyBuilder)
    with pytest.raises(ValueError, match="max_entry_bytes"):
        CacheManager(max_entry_bytes=0)
    with pytest.raises(ValueError, match="max_entries"):
        InMemoryBackend(max_entries=0)
    assert "InMemoryBackend" in repr(manager)


def test_frame_detects_any_single_bit_flip() -> None:
    framed = cm.frame(b"payload bytes")
    assert bytes(cm.unframe(framed)) == b"payload bytes"
    for i in range(len(framed) * 8):
        damaged = bytearray(framed)
        damaged[i // 8] ^= 1 << (i % 8)
        with pytest.raises(cm.DecodeError):
            cm.unframe(bytes(damaged))


def test_memory_backend_lru_bounds() -> None:
    backend = InMemoryBackend(max_entries=3, max_bytes=100)
    for key in "abc":
        backend.set(key, b"x" * 10)
    backend.get("a")  # a is now the most recently used
    backend.set("d", b"x" * 10)
    assert [backend.exists(k) for k in "abcd"] == [True, False, True, True]
    backend.set("e", b"x" * 85)  # over max_bytes: evicts the least recent until it fits
    assert backend.stats()["bytes"] <= 100
    assert backend.exists("e")
    backend.set("huge", b"x" * 101)  # larger than the bound on its own: not stored
    assert not backend.exists("huge")
    assert backend.stats()["evictions"] >= 3


def test_memory_backend_under_threads() -> None:
    backend = InMemoryBackend(max_entries=None, max_bytes=None)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(300):
                backend.set(f"{n}:{i}", b"v", tags=[f"t{n}", "all"])
                if i % 50 == 0:
                    backend.invalidate(f"t{(n + 1) % 8}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    entries = backend.stats()["entries"]
    assert backend.invalidate("all") == entries
    assert backend.stats()["entries"] == 0
    assert backend.stats()["tags"] == 0
