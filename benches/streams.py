"""What the streaming and fan-out benchmarks share: chunks, fresh requests, caches, upstreams."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from chengeta_ai import CacheKeyBuilder, CacheManager, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache
from chengeta_ai.testing import openai_chunks

MODEL = "gpt-4o-2024-08-06"
_CHUNKS: dict[int, list[Any]] = {}
_fresh = itertools.count()


def chunks(n: int) -> list[Any]:
    """``n`` realistic ChatCompletionChunk objects (role, n - 2 tokens, finish), made once."""
    if n not in _CHUNKS:
        _CHUNKS[n] = openai_chunks(n - 2)
    return _CHUNKS[n]


def fresh_messages() -> list[dict[str, str]]:
    """A request no earlier round has made (a guaranteed miss)."""
    return [{"role": "user", "content": f"Explain caching in 3 sentences #{next(_fresh)}"}]


def new_cache() -> StreamingResponseCache:
    manager = CacheManager(backend=InMemoryBackend(), key_builder=CacheKeyBuilder())
    return StreamingResponseCache(manager, max_lag=64)


def sync_upstream(items: list[Any]) -> Callable[[Any], Iterator[Any]]:
    def stream_fn(messages: Any) -> Iterator[Any]:
        yield from items

    return stream_fn


def async_upstream(items: list[Any]) -> Callable[[Any], AsyncIterator[Any]]:
    async def stream_fn(messages: Any) -> AsyncIterator[Any]:
        for item in items:
            yield item

    return stream_fn
