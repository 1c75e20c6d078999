"""Finding (high): an async flight whose upstream fails is never freed, not even by the
garbage collector. `AsyncPump` (a pyclass) holds the flight, the log, the encoder and the
upstream's ``__anext__`` but has no ``__traverse__``/``__clear__``, so the cycle
flight -> stored error -> traceback -> `AsyncFlight._pump` frame -> ``pump`` -> flight has an
edge the GC cannot see: the flight, its log with every chunk, the upstream (and whatever its
frame holds) stay alive for good, one set per failed stream. On main (the Python loop, no
pump) the same cycle is collected.

Fix direction: ``__traverse__``/``__clear__`` on `AsyncPump` (flight, anext, log, encoder,
current), or drop ``pump`` from the frame before the error propagates.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chengeta_ai import CacheKeyBuilder, CacheManager, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = pytest.mark.anyio


class Marker:
    """Something only the upstream's frame holds."""


def new_cache() -> StreamingResponseCache:
    return StreamingResponseCache(
        CacheManager(backend=InMemoryBackend(), key_builder=CacheKeyBuilder())
    )


async def run_failing_stream(cache: StreamingResponseCache) -> weakref.ref[Marker]:
    marker = Marker()
    ref = weakref.ref(marker)

    async def upstream(messages: Any) -> AsyncIterator[str]:
        held = marker
        for i in range(5):
            yield f"chunk {i} {id(held)}"
        raise ValueError("upstream failed")

    got: list[str] = []
    with pytest.raises(ValueError, match="upstream failed"):
        async for chunk in cache.aget_or_stream([{"role": "user", "content": "x"}], upstream):
            got.append(chunk)
    assert len(got) == 5
    return ref


async def test_failed_async_stream_is_collected() -> None:
    cache = new_cache()
    ref = await run_failing_stream(cache)
    gc.collect()
    gc.collect()
    assert ref() is None, "the failed stream's upstream frame is still alive after gc.collect()"
