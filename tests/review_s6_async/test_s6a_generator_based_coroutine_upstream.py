"""Finding (medium): an upstream whose ``__anext__`` is a generator-based coroutine
(``@types.coroutine``: a generator with ``CO_ITERABLE_COROUTINE``, which ``await`` accepts)
fails every caller with ``TypeError: object generator can't be used in 'await' expression``
before the first chunk. `AsyncPump`'s ``await_iter`` looks only at the type's ``am_await``
slot, where ``await`` (``_PyCoro_GetAwaitableIter``) also takes coroutines and iterable
coroutines as they are. The same upstream iterates fine with ``async for`` and through the
cache on main.

Fix direction: use the same rules as ``await`` (coroutine -> itself, generator with
``CO_ITERABLE_COROUTINE`` -> itself, else ``am_await``), or fall back to the Python loop for
anything that is not a plain coroutine / ``am_await`` object.
"""

from __future__ import annotations

import types
from collections.abc import Generator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from chengeta_ai import CacheKeyBuilder, CacheManager, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "generator-based coroutine"}]


class Upstream:
    """Five chunks, each read a generator-based coroutine that suspends once."""

    def __init__(self) -> None:
        self.i = 0

    def __aiter__(self) -> Upstream:
        return self

    @types.coroutine
    def __anext__(self) -> Generator[Any, Any, int]:
        yield from anyio.lowlevel.checkpoint().__await__()
        if self.i >= 5:
            raise StopAsyncIteration
        self.i += 1
        return self.i


async def test_upstream_with_generator_based_anext() -> None:
    assert [chunk async for chunk in Upstream()] == [1, 2, 3, 4, 5]
    cache = StreamingResponseCache(
        CacheManager(backend=InMemoryBackend(), key_builder=CacheKeyBuilder())
    )
    got = [chunk async for chunk in cache.aget_or_stream(MESSAGES, lambda m: Upstream())]
    assert got == [1, 2, 3, 4, 5]
    assert cache.stats()["stores"] == 1
