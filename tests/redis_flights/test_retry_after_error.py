"""A caller that retries right after an upstream error gets a fresh stream, not UpstreamLost.

The producer's writer thread writes the stream's final ``error`` record (which also frees the
key's lease in Redis). If the local callers saw the error before that record was written, a
caller retrying at once found the dead stream's lease still held, followed it from its first
chunk and then read the error: ``UpstreamLost`` for a retry that should simply call the
upstream again. The writer here is slowed down (``finish`` sleeps first) so that the old order
fails every time rather than most of the time.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from tests.redis_flights.conftest import Fleet

from chengeta_ai import CacheKeyBuilder, CacheManager, RedisFlights
from chengeta_ai.layers.streaming_cache import StreamingResponseCache


class _SlowFinish(RedisFlights):
    """Real RedisFlights whose final record reaches Redis 0.2 s late."""

    def finish(self, key: str, token: str, kind: str, message: str, keep: bool) -> bool:
        time.sleep(0.2)
        return super().finish(key, token, kind, message, keep)


def _cache(fleet: Fleet) -> StreamingResponseCache:
    manager = CacheManager(backend=fleet.backend, key_builder=CacheKeyBuilder())
    rf = _SlowFinish(fleet.url, prefix=fleet.prefix, **fleet.flights_kw)
    fleet._made.append(rf)
    return StreamingResponseCache(manager, flights=rf)


class Boom(RuntimeError):
    pass


@pytest.mark.anyio
async def test_an_async_retry_after_an_upstream_error_calls_the_upstream_again(
    fleet: Fleet,
) -> None:
    cache = _cache(fleet)
    for i in range(3):
        messages = [{"role": "user", "content": f"retry {i}"}]

        async def failing(_: Any) -> Any:
            yield "a"
            raise Boom("upstream broke")

        async def working(_: Any) -> Any:
            yield "a"
            yield "b"

        with pytest.raises(Boom):
            async for _ in cache.aget_or_stream(messages, failing):
                pass
        got = [c async for c in cache.aget_or_stream(messages, working)]
        assert got == ["a", "b"]
    assert cache.stats().stores == 3


def test_a_sync_retry_after_an_upstream_error_calls_the_upstream_again(fleet: Fleet) -> None:
    cache = _cache(fleet)
    for i in range(3):
        messages = [{"role": "user", "content": f"sync retry {i}"}]

        def failing(_: Any) -> Any:
            yield "a"
            raise Boom("upstream broke")

        with pytest.raises(Boom):
            for _ in cache.get_or_stream(messages, failing):
                pass
        assert list(cache.get_or_stream(messages, lambda _: iter(["a", "b"]))) == ["a", "b"]


def test_a_retry_in_another_thread_after_an_upstream_error_calls_the_upstream_again(
    fleet: Fleet,
) -> None:
    """The error reaches a joiner in another thread; it retries at once, while the leader's
    writer may still be writing."""
    cache = _cache(fleet)
    messages = [{"role": "user", "content": "threads retry"}]
    started = threading.Event()
    release = threading.Event()

    def failing(_: Any) -> Any:
        yield "a"
        started.set()
        release.wait(10)
        raise Boom("upstream broke")

    leader_errors: list[BaseException] = []

    def leader() -> None:
        try:
            list(cache.get_or_stream(messages, failing))
        except Boom as exc:
            leader_errors.append(exc)

    thread = threading.Thread(target=leader)
    thread.start()
    assert started.wait(10)
    threading.Timer(0.1, release.set).start()
    with pytest.raises(Boom):
        list(cache.get_or_stream(messages, failing))  # joins the leader's flight
    assert list(cache.get_or_stream(messages, lambda _: iter(["a", "b"]))) == ["a", "b"]
    thread.join(20)
    assert len(leader_errors) == 1
