"""Finding (medium): a write of the old stream that was under way when a removal ran can land
*after* the removal's backend call, and the removal returns without waiting for it: until that
write's call returns and its undo (the rewrite ``REMOVED``) runs, the old entry is in the
backend and a caller that starts after the removal returned is served it as a hit.

On a network backend the window is the rest of the write's round trip plus the undo's (the
server applied ``SET``, its reply is in flight); if the writing process is killed in it, the old
entry stays for its whole TTL. The README promises "an answer begun before the invalidation is
never stored after it". Fix direction: the removal's ``end_removal`` waits (bounded) for the
writes it raced to return, then removes the key itself before returning, so that nothing it
covers can be read once it returned.
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


class _ReplyInFlight(InMemoryBackend):
    """A network backend's write: sent, applied by the server after the removal's, and its
    reply delayed until ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = threading.Event()
        self.release = threading.Event()


def test_a_caller_after_the_removal_is_not_served_the_racing_write() -> None:
    backend = _ReplyInFlight()
    cache = StreamingResponseCache(CacheManager(backend=backend))
    writer = threading.Thread(
        target=lambda: list(cache.get_or_stream(["q"], lambda _m: iter(["old"]), model_id=MODEL))
    )
    # the old stream's write is sent; the removal reaches the backend first
    original_set = InMemoryBackend.set
    removal_done = threading.Event()

    def set_after_removal(key: str, value: bytes, ttl: Any = None, tags: Any = ()) -> None:
        backend.sent.set()
        assert removal_done.wait(10)  # the server applies the SET after the DEL
        original_set(backend, key, value, ttl, tags)
        assert backend.release.wait(10)  # ... and its reply is in flight

    backend.set = set_after_removal  # type: ignore[method-assign]
    real_invalidate = backend.invalidate_namespace

    def invalidate_then_apply_the_set(namespace: str, tag: str) -> int:
        n = real_invalidate(namespace, tag)
        removal_done.set()
        return n

    backend.invalidate_namespace = invalidate_then_apply_the_set  # type: ignore[method-assign]
    writer.start()
    assert backend.sent.wait(10)
    # (fixed design: the removal returns only once the writes it raced returned and undid
    # themselves, so it runs in a thread here)
    remover = threading.Thread(target=cache.manager.invalidate, args=(f"model:{MODEL}",))
    remover.start()
    try:
        for _ in range(100):  # the old write has reached the store
            if InMemoryBackend.get(backend, cache.manager.key_builder.build(["q"], MODEL)):
                break
            threading.Event().wait(0.01)
        remover.join(0.2)
        assert remover.is_alive()  # the removal has not returned: the old entry is not its
    finally:
        backend.release.set()
        writer.join(10)
        remover.join(10)
    after = cache.get_or_stream(["q"], lambda _m: iter(["new"]), model_id=MODEL)
    assert list(after) == ["new"], after.cache_info


@pytest.mark.anyio
async def test_async_a_caller_after_the_removal_is_not_served_the_racing_write() -> None:
    backend = InMemoryBackend()
    sent, removal_done, release = anyio.Event(), anyio.Event(), anyio.Event()
    first = [True]

    async def aset(key: str, value: bytes, ttl: Any = None, tags: Any = ()) -> None:
        if first[0]:
            first[0] = False
            sent.set()
            await removal_done.wait()  # the server applies the SET after the DEL
            InMemoryBackend.set(backend, key, value, ttl, tags)
            await release.wait()  # ... and its reply is in flight
            return
        InMemoryBackend.set(backend, key, value, ttl, tags)

    backend.aset = aset  # type: ignore[method-assign]
    cache = StreamingResponseCache(CacheManager(backend=backend))

    async def old(_m: Any) -> AsyncIterator[str]:
        yield "old"

    async def new(_m: Any) -> AsyncIterator[str]:
        yield "new"

    async def read_old() -> None:
        assert [c async for c in cache.aget_or_stream(["q"], old, model_id=MODEL)] == ["old"]

    real_invalidate = backend.ainvalidate_namespace

    async def invalidate_then_apply_the_set(namespace: str, tag: str) -> int:
        n = await real_invalidate(namespace, tag)
        removal_done.set()
        return n

    backend.ainvalidate_namespace = invalidate_then_apply_the_set  # type: ignore[method-assign]
    returned = anyio.Event()

    async def remove() -> None:
        await cache.manager.ainvalidate(f"model:{MODEL}")
        returned.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(read_old)
        await sent.wait()
        tg.start_soon(remove)
        await removal_done.wait()
        await anyio.sleep(0.05)  # the old write has reached the store
        # (fixed design) the removal has not returned: it waits for the write it raced
        assert not returned.is_set()
        release.set()
    after = cache.aget_or_stream(["q"], new, model_id=MODEL)
    got = [c async for c in after]
    assert got == ["new"], after.cache_info
