"""Helpers of the eighth review (the async hit's time-sliced turns of s8-hit): a cache on the
in-memory backend (whose async reads run inline: the backend read gives the loop no turn, so a
hit's own checkpoints are the only ones), and a stored entry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from chengeta_ai import CacheKeyBuilder, CacheManager, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache


def cache_for() -> StreamingResponseCache:
    return StreamingResponseCache(
        CacheManager(backend=InMemoryBackend(), key_builder=CacheKeyBuilder())
    )


async def stored(cache: StreamingResponseCache, messages: Any, n: int) -> list[str]:
    """Stores an entry of ``n`` string chunks for ``messages`` (a miss) and returns them."""
    items = [f"t{i} " for i in range(n)]

    async def stream_fn(_: object) -> AsyncIterator[str]:
        for item in items:
            yield item

    async for _ in cache.aget_or_stream(messages, stream_fn):
        pass
    assert cache.stats()["misses"] == 1
    return items


async def never(_: object) -> AsyncIterator[str]:
    raise AssertionError("a hit must not call upstream")
    yield  # pragma: no cover
