"""Finding (low): a write a removal raced that is cancelled by the store deadline
(`fanout.STORE_TIMEOUT`, 10 s: a native async backend whose reply does not come, e.g. the
Redis backend on a stalled primary that already applied the SET) never undoes itself, although
`CacheManager._wait_racing`'s warning and README say "a write that takes longer still undoes
itself when it returns". `AsyncFlight._store` calls ``end_rewrite(may_rewrite=False)`` ("the next
write of the key does it"), the removal's poll then sees no writer and returns, and
`flight_ended` deletes the key's record (no flight left), pending ``REMOVED`` included: no next
write will ever do it. The old entry the server applied after the removal's DEL is served after
the removal returned, for its whole TTL.

Fix direction: when a racing write is interrupted with ``entry is REMOVED`` pending, remove the
key in the interrupted path (a shielded best-effort ``arewrite_raw(key, REMOVED)``), or keep the
record and let the waiting removal do the delete itself once the writers are gone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from chengeta_ai import CacheManager
from chengeta_ai.backends.memory_backend import InMemoryBackend
from chengeta_ai.layers import fanout
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

MODEL = "gpt-4o"


class _LostReply(InMemoryBackend):
    """The first write: applied by the server after the removal's DEL; its reply never comes."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = anyio.Event()
        self.deleted = anyio.Event()
        self._first = True

    async def aset(self, key: str, value: bytes, ttl: Any = None, tags: Any = ()) -> None:
        if self._first:
            self._first = False
            self.sent.set()
            await self.deleted.wait()
            InMemoryBackend.set(self, key, value, ttl, tags)
            await anyio.sleep_forever()
        InMemoryBackend.set(self, key, value, ttl, tags)

    async def adelete(self, key: str) -> bool:
        try:
            return InMemoryBackend.delete(self, key)
        finally:
            self.deleted.set()


@pytest.mark.anyio
async def test_timed_out_racing_write_is_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fanout, "STORE_TIMEOUT", 0.5)
    backend = _LostReply()
    cache = StreamingResponseCache(CacheManager(backend=backend))
    key = cache.manager.key_builder.build(["q"], MODEL)

    async def old(_m: Any) -> AsyncIterator[str]:
        yield "old"

    async def new(_m: Any) -> AsyncIterator[str]:
        yield "new"

    async def read_old() -> None:
        assert [c async for c in cache.aget_or_stream(["q"], old, model_id=MODEL)] == ["old"]

    async with anyio.create_task_group() as tg:
        tg.start_soon(read_old)
        await backend.sent.wait()
        await cache.manager.adelete(key)  # returns once the write gave up
    after = cache.aget_or_stream(["q"], new, model_id=MODEL)
    assert [c async for c in after] == ["new"], after.cache_info
    assert not cache.flights._stores
