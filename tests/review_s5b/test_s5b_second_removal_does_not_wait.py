"""Finding (medium): of two removals of a key that race one write of it, only the first waits
for the write to undo itself; the second returns at once, and the old entry the write lands
afterwards is read after the second removal returned.

`FlightTable.begin_removal` marks a key whose write is under way (``entry = REMOVED``) and
returns it as racing only when *this* removal moved the key's order (``order.newest == seq``).
A second removal finds ``entry is REMOVED`` ("an earlier removal whose undo is still pending,
which there is nothing to add to") and ``newest`` still the first removal's: the key is not in
its racing list, so it does not wait. Two admin calls (``clear()`` while an ``invalidate`` runs,
two workers deleting the same key) are enough. Fix: a removal that matches a key whose undo
is pending (``writers`` and ``entry is REMOVED``, or ``removed > 0`` with writers) appends it
to its racing list as well.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from chengeta_ai import CacheManager
from chengeta_ai.backends.memory_backend import InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

MODEL = "gpt-4o"


class _SlowWrite(InMemoryBackend):
    """A network backend: the first write is sent, applied by the server once ``apply`` is
    set (after both removals' DELs), and its reply comes back once ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = threading.Event()
        self.apply = threading.Event()
        self.applied = threading.Event()
        self.release = threading.Event()
        self.deletes = 0
        self._first = True

    def set(self, key: str, value: bytes, ttl: Any = None, tags: Any = ()) -> None:
        if self._first:
            self._first = False
            self.sent.set()
            assert self.apply.wait(10)
            super().set(key, value, ttl, tags)
            self.applied.set()
            assert self.release.wait(10)
            return
        super().set(key, value, ttl, tags)

    def delete(self, key: str) -> bool:
        self.deletes += 1
        return super().delete(key)


def _wait_for(cond: Any) -> None:
    for _ in range(1000):
        if cond():
            return
        threading.Event().wait(0.005)
    raise AssertionError("timed out")


def test_second_removal_waits_for_the_pending_undo_threads() -> None:
    backend = _SlowWrite()
    cache = StreamingResponseCache(CacheManager(backend=backend))
    key = cache.manager.key_builder.build(["q"], MODEL)
    writer = threading.Thread(
        target=lambda: list(cache.get_or_stream(["q"], lambda _m: iter(["old"]), model_id=MODEL))
    )
    writer.start()
    assert backend.sent.wait(10)
    first = threading.Thread(target=cache.manager.delete, args=(key,))
    first.start()
    _wait_for(lambda: backend.deletes == 1)  # the first removal ran and waits for the write
    second = threading.Thread(target=cache.manager.delete, args=(key,))
    second.start()
    _wait_for(lambda: backend.deletes == 2)
    second.join(0.3)
    try:
        backend.apply.set()  # the old write lands now, after both removals' DELs
        assert backend.applied.wait(10)
        # a removal that returned must not see its key come back
        second_returned = not second.is_alive()
        stale = InMemoryBackend.get(backend, key)
        assert not (second_returned and stale is not None), (
            "the second delete() returned, then the old entry was readable"
        )
    finally:
        backend.release.set()
        writer.join(10)
        first.join(10)
        second.join(10)
    after = cache.get_or_stream(["q"], lambda _m: iter(["new"]), model_id=MODEL)
    assert list(after) == ["new"], after.cache_info
    assert not cache.flights._stores


class _ASlowWrite(InMemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.sent = anyio.Event()
        self.apply = anyio.Event()
        self.applied = anyio.Event()
        self.release = anyio.Event()
        self.deletes = 0
        self._first = True

    async def aset(self, key: str, value: bytes, ttl: Any = None, tags: Any = ()) -> None:
        if self._first:
            self._first = False
            self.sent.set()
            await self.apply.wait()
            InMemoryBackend.set(self, key, value, ttl, tags)
            self.applied.set()
            await self.release.wait()
            return
        InMemoryBackend.set(self, key, value, ttl, tags)

    async def adelete(self, key: str) -> bool:
        self.deletes += 1
        return InMemoryBackend.delete(self, key)


@pytest.mark.anyio
async def test_second_removal_waits_for_the_pending_undo_async() -> None:
    backend = _ASlowWrite()
    cache = StreamingResponseCache(CacheManager(backend=backend))
    key = cache.manager.key_builder.build(["q"], MODEL)

    async def old(_m: Any) -> AsyncIterator[str]:
        yield "old"

    async def new(_m: Any) -> AsyncIterator[str]:
        yield "new"

    async def read_old() -> None:
        assert [c async for c in cache.aget_or_stream(["q"], old, model_id=MODEL)] == ["old"]

    returned = [anyio.Event(), anyio.Event()]

    async def remove(i: int) -> None:
        await cache.manager.adelete(key)
        returned[i].set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(read_old)
        await backend.sent.wait()
        tg.start_soon(remove, 0)
        while backend.deletes < 1:
            await anyio.sleep(0.001)
        tg.start_soon(remove, 1)
        while backend.deletes < 2:
            await anyio.sleep(0.001)
        await anyio.sleep(0.05)
        backend.apply.set()  # the old write lands now, after both removals' DELs
        await backend.applied.wait()
        second_returned = returned[1].is_set()
        stale = InMemoryBackend.get(backend, key)
        backend.release.set()
        assert not (second_returned and stale is not None), (
            "the second adelete() returned, then the old entry was readable"
        )
    after = cache.aget_or_stream(["q"], new, model_id=MODEL)
    assert [c async for c in after] == ["new"], after.cache_info
    assert not cache.flights._stores
