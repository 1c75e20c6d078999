"""Finding (low-medium, asyncio): `AsyncPump.throw` forwards a cancellation with
``it.throw(...)`` unconditionally, where ``await`` (CPython's ``gen_throw``) raises the
exception in the awaiting frame when the awaitable's iterator has no ``throw`` method. With
an upstream whose ``__anext__()`` awaitable returns such an iterator from ``__await__`` (a
valid awaitable: ``__next__``/``send`` only), cancelling the flight (leaving
``async with stream_cache:`` with a consumer attached) turns asyncio's ``CancelledError`` into
``AttributeError: 'NoThrowIter' object has no attribute 'throw'``: the consumer gets that
AttributeError instead of main's clear "the upstream read ... was cancelled" error, and the
flight's task swallows its own cancellation (`_run` treats it as an upstream failure and does
not re-raise it). On trio (cancellation is delivered by ``send``) the behaviour is main's.

Fix direction: as ``gen_throw``: no ``throw`` attribute -> raise the thrown exception here
(after dropping ``current``).
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any

import anyio
import pytest

from chengeta_ai import CacheKeyBuilder, CacheManager, ChengetaError, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "no throw"}]


class NoThrowIter:
    """An ``__await__`` iterator with ``__next__`` and ``send`` only."""

    def __init__(self, inner: Generator[Any, Any, Any]) -> None:
        self.inner = inner

    def __iter__(self) -> NoThrowIter:
        return self

    def __next__(self) -> Any:
        return self.inner.send(None)

    def send(self, value: Any) -> Any:
        return self.inner.send(value)


class Awaitable:
    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.coro = coro

    def __await__(self) -> NoThrowIter:
        return NoThrowIter(self.coro.__await__())


class Upstream:
    """Three chunks, then a read that never completes."""

    def __init__(self) -> None:
        self.i = 0

    def __aiter__(self) -> Upstream:
        return self

    def __anext__(self) -> Awaitable:
        return Awaitable(self._next())

    async def _next(self) -> int:
        if self.i == 3:
            await anyio.sleep(100)
        self.i += 1
        return self.i


async def test_cancelling_a_read_whose_iterator_has_no_throw() -> None:
    cache = StreamingResponseCache(
        CacheManager(backend=InMemoryBackend(), key_builder=CacheKeyBuilder())
    )
    got: list[Any] = []
    errors: list[BaseException] = []

    async def consumer() -> None:
        try:
            async for chunk in cache.aget_or_stream(MESSAGES, lambda m: Upstream()):
                got.append(chunk)
        except Exception as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        async with cache:
            tg.start_soon(consumer)
            with anyio.fail_after(5):
                while len(got) < 3:
                    await anyio.sleep(0.001)
    assert got == [1, 2, 3]
    assert len(errors) == 1
    assert isinstance(errors[0], ChengetaError), (
        f"the consumer got {errors[0]!r}, not the clear 'was cancelled' error"
    )
    assert "cancelled" in str(errors[0])
