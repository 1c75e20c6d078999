"""Review: ``stats().chunks_replayed`` and ``chunks_delivered`` count chunks never handed out.

`CacheStats` documents them as "Chunks handed out by hits" and "Chunks handed out by in-flight
streams". Both are counted a *batch* at a time, before the batch's chunks are yielded
(`_replay`: ``replayed += len(batch)`` then ``yield from batch``; the async hit path the same;
`SyncFlight.consume`: ``delivered += len(batch)`` then ``yield from batch``): a caller that
reads one chunk and leaves is counted for the whole batch (up to 64 on a hit, 256 on a join).
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from tests.helpers import Upstream

from chengeta_ai import CacheManager, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

M = [{"role": "user", "content": "count me"}]
CHUNKS = [f"c{i}" for i in range(10)]


def new_cache() -> StreamingResponseCache:
    return StreamingResponseCache(CacheManager(backend=InMemoryBackend()))


def test_a_hit_left_after_one_chunk_counts_one_replayed_chunk_sync() -> None:
    cache = new_cache()
    assert list(cache.get_or_stream(M, Upstream(CHUNKS).sync)) == CHUNKS
    stream = cache.get_or_stream(M, Upstream(CHUNKS).sync)
    assert next(stream) == "c0"
    stream.close()
    assert stream.cache_info is not None and stream.cache_info.status == "hit"
    assert cache.stats().chunks_replayed == 1


@pytest.mark.anyio
async def test_a_hit_left_after_one_chunk_counts_one_replayed_chunk_async() -> None:
    cache = new_cache()
    assert [c async for c in cache.aget_or_stream(M, Upstream(CHUNKS).asyncgen)] == CHUNKS
    stream = cache.aget_or_stream(M, Upstream(CHUNKS).asyncgen)
    assert await stream.__anext__() == "c0"
    await stream.aclose()
    assert stream.cache_info is not None and stream.cache_info.status == "hit"
    assert cache.stats().chunks_replayed == 1


def test_a_joiner_left_after_one_chunk_counts_one_delivered_chunk_threads() -> None:
    cache = new_cache()
    up = Upstream(CHUNKS, pause_at=5)
    leader = cache.get_or_stream(M, up.sync)
    got: list[Any] = [next(leader) for _ in range(5)]
    assert cache.stats().chunks_delivered == 0  # counted when a consumer leaves
    joiner = cache.get_or_stream(M, up.sync)
    assert next(joiner) == "c0"
    assert joiner.cache_info is not None and joiner.cache_info.status == "join"
    joiner.close()
    up.thread_gate.set()
    got.extend(leader)
    assert got == CHUNKS
    # the leader was handed 10 chunks, the joiner 1
    assert cache.stats().chunks_delivered == 11


@pytest.mark.anyio
async def test_a_joiner_left_after_one_chunk_counts_one_delivered_chunk_async() -> None:
    cache = new_cache()
    up = Upstream(CHUNKS, pause_at=5)
    up.gate = anyio.Event()
    leader = cache.aget_or_stream(M, up.asyncgen)
    got: list[Any] = [await leader.__anext__() for _ in range(5)]
    joiner = cache.aget_or_stream(M, up.asyncgen)
    assert await joiner.__anext__() == "c0"
    assert joiner.cache_info is not None and joiner.cache_info.status == "join"
    await joiner.aclose()
    up.gate.set()
    got.extend([c async for c in leader])
    assert got == CHUNKS
    assert cache.stats().chunks_delivered == 11
