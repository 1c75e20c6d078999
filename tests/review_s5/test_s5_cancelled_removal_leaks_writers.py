"""Finding (medium): a removal interrupted while it rewrites one key (cancelled ``aclear`` /
``ainvalidate``; Ctrl-C in the sync ``clear``) never ends its write of the other keys it raced.

`CacheManager._aend_removal` (and `FlightTable.end_removal`, and `CacheManager._end_removal`
across tables) walk the racing keys one by one; the first key's rewrite that raises
(cancellation, KeyboardInterrupt) leaves every later key with the removal still counted as a
writer. That key's `_KeyStores` record then never goes (``FlightTable._stores`` leaks), and,
worse, every later write of it looks overlapped forever and never reaches writers == 0: a later
removal racing a write of that key no longer undoes the write, so the stream begun before that
removal is stored after it returned and served as a hit.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from chengeta_ai import CacheManager
from chengeta_ai.backends.memory_backend import InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

MODEL = "gpt-4o"


class _Slow(InMemoryBackend):
    """Writes of the keys in ``hold`` wait for their event; ``aclear_namespace`` waits for
    ``clear_go``; async deletes are I/O (a checkpoint), as on every real backend."""

    def __init__(self) -> None:
        super().__init__()
        self.hold: dict[str, anyio.Event] = {}
        self.writing: dict[str, anyio.Event] = {}
        self.clearing = anyio.Event()
        self.clear_go = anyio.Event()

    async def aset(self, key: str, value: bytes, ttl: float | None = None, tags: Any = ()) -> None:
        held = self.hold.pop(key, None)
        if held is not None:
            self.writing[key].set()
            await held.wait()
        super().set(key, value, ttl, tags)

    async def adelete(self, key: str) -> bool:
        await anyio.lowlevel.checkpoint()
        return self.delete(key)

    async def aclear_namespace(self, namespace: str) -> None:
        self.clearing.set()
        await self.clear_go.wait()
        self.clear_namespace(namespace)


def _hold(backend: _Slow, key: str) -> anyio.Event:
    backend.hold[key] = go = anyio.Event()
    backend.writing[key] = anyio.Event()
    return go


def _answer(text: str) -> Any:
    async def fn(_m: Any) -> AsyncIterator[str]:
        yield text

    return fn


@pytest.mark.anyio
async def test_a_cancelled_clear_ends_its_write_of_every_key_it_raced() -> None:
    backend = _Slow()
    cache = StreamingResponseCache(CacheManager(backend=backend))
    k1 = cache.manager.key_builder.build(["a"], MODEL)
    k2 = cache.manager.key_builder.build(["b"], MODEL)
    go1, go2 = _hold(backend, k1), _hold(backend, k2)
    done1 = anyio.Event()

    async def read(messages: list[str], done: anyio.Event | None = None) -> None:
        assert [c async for c in cache.aget_or_stream(messages, _answer("x"), model_id=MODEL)]
        if done is not None:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(read, ["a"], done1)
        await backend.writing[k1].wait()
        tg.start_soon(read, ["b"])  # after: k1 is the first key the removal races
        await backend.writing[k2].wait()
        scope = anyio.CancelScope()  # e.g. a request handler's timeout

        async def remove() -> None:
            with scope:
                await cache.manager.aclear()

        tg.start_soon(remove)
        await backend.clearing.wait()
        go1.set()  # the write of k1 returns: the removal is the last writer of k1
        await done1.wait()
        scope.cancel()  # the removal, cancelled, rewrites k1 (interrupted) and ...
        await anyio.sleep(0.05)
        go2.set()  # ... the write of k2 returns
    # every stream ended: no store order is left behind
    assert cache.flights._stores == {}


@pytest.mark.anyio
async def test_after_a_cancelled_clear_a_removal_still_undoes_a_racing_write() -> None:
    backend = _Slow()
    cache = StreamingResponseCache(CacheManager(backend=backend))
    k1 = cache.manager.key_builder.build(["a"], MODEL)
    k2 = cache.manager.key_builder.build(["b"], MODEL)
    go1, go2 = _hold(backend, k1), _hold(backend, k2)
    done1 = anyio.Event()

    async def read(messages: list[str], text: str, done: anyio.Event | None = None) -> None:
        assert [c async for c in cache.aget_or_stream(messages, _answer(text), model_id=MODEL)]
        if done is not None:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(read, ["a"], "x", done1)
        await backend.writing[k1].wait()
        tg.start_soon(read, ["b"], "x")
        await backend.writing[k2].wait()
        scope = anyio.CancelScope()

        async def remove() -> None:
            with scope:
                await cache.manager.aclear()

        tg.start_soon(remove)
        await backend.clearing.wait()
        go1.set()
        await done1.wait()
        scope.cancel()
        await anyio.sleep(0.05)
        go2.set()
    backend.clear_go.set()
    await cache.manager.adelete(k2)
    # later: an old answer of k2 is being written when k2 is deleted; the delete returns
    go3 = _hold(backend, k2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(read, ["b"], "old")
        await backend.writing[k2].wait()
        # (fixed design: the delete waits for the write it raced, so it runs in a task)
        tg.start_soon(cache.manager.adelete, k2)
        while not cache.flights._stores[k2].removed:
            await anyio.sleep(0.001)
        go3.set()
    hit = cache.aget_or_stream(["b"], _answer("new"), model_id=MODEL)
    # the answer begun before the delete must not be served after it
    assert [c async for c in hit] == ["new"], hit.cache_info


# -- sync: Ctrl-C while the removal rewrites one of the keys it raced --------------------------


class _SyncSlow(InMemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.hold: dict[str, threading.Event] = {}
        self.writing: dict[str, threading.Event] = {}
        self.interrupt_next_delete = False

    def set(self, key: str, value: bytes, ttl: float | None = None, tags: Any = ()) -> None:
        held = self.hold.pop(key, None)
        if held is not None:
            self.writing[key].set()
            assert held.wait(10)
        super().set(key, value, ttl, tags)

    def delete(self, key: str) -> bool:
        if self.interrupt_next_delete:
            self.interrupt_next_delete = False
            raise KeyboardInterrupt  # Ctrl-C lands in the removal's rewrite
        return super().delete(key)


def test_a_clear_interrupted_in_its_rewrite_ends_its_write_of_every_key_it_raced() -> None:
    backend = _SyncSlow()
    cache = StreamingResponseCache(CacheManager(backend=backend))
    keys = [cache.manager.key_builder.build([m], MODEL) for m in ("a", "b")]
    gos = {}
    for key in keys:
        gos[key] = backend.hold[key] = threading.Event()
        backend.writing[key] = threading.Event()
    readers = [
        threading.Thread(
            target=lambda m=m: list(
                cache.get_or_stream([m], lambda _m: iter(["x"]), model_id=MODEL)
            )
        )
        for m in ("a", "b")
    ]
    for r in readers:
        r.start()
    for key in keys:
        assert backend.writing[key].wait(10)

    real_clear = backend.clear_namespace

    def clear_namespace(namespace: str) -> None:
        real_clear(namespace)
        # both writes return while the removal is under way: the removal is the last writer
        # of both keys and rewrites them (removes them again) when it returns
        for key in keys:
            gos[key].set()
        for r in readers:
            r.join(10)
        backend.interrupt_next_delete = True

    backend.clear_namespace = clear_namespace  # type: ignore[method-assign]
    # (fixed design: the removal is no writer; the racing writes undo themselves when they
    # return, so there is no rewrite of the removal's own left to interrupt)
    cache.manager.clear()
    assert cache.flights._stores == {}
    assert all(backend.get(key) is None for key in keys)
