"""A plain (not known-async) ``stream_fn`` is called in a worker thread by ``aget_or_stream``
(review s4: the sync SDK's ``create(stream=True)`` blocked the loop until the response head);
an ``async def`` / async generator function is called on the loop."""

from __future__ import annotations

import functools
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

from chengeta_ai import CacheManager
from chengeta_ai.layers.streaming_cache import StreamingResponseCache


class Closing:
    """A sync stream that records whether it was closed."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[str]:
        yield "a"

    def close(self) -> None:
        self.closed.set()


@pytest.mark.anyio
async def test_a_caller_cancelled_while_stream_fn_blocks_leaves_and_the_late_stream_is_closed() -> (
    None
):
    cache = StreamingResponseCache(CacheManager())
    release = threading.Event()
    made = Closing()
    threads: list[int] = []

    def stream_fn(messages: Any) -> Closing:
        threads.append(threading.get_ident())
        release.wait(10)
        return made

    with anyio.move_on_after(0.2) as scope:
        async for _ in cache.aget_or_stream(["q"], stream_fn):
            pass
    assert scope.cancelled_caught  # the loop was free to cancel while stream_fn blocked
    assert threads and threads[0] != threading.get_ident()
    release.set()
    assert await anyio.to_thread.run_sync(made.closed.wait, 10)


def test_which_stream_fns_are_known_async() -> None:
    from chengeta_ai.layers.fanout import _known_async

    async def agen(messages: Any, tag: str = "") -> AsyncIterator[str]:
        yield tag

    async def coro(messages: Any) -> list[str]:
        return []

    class Caller:
        async def __call__(self, messages: Any) -> list[str]:
            return []

        async def method(self, messages: Any) -> list[str]:
            return []

    def plain(messages: Any) -> list[str]:
        return []

    for fn in (agen, coro, functools.partial(agen, tag="p"), Caller(), Caller().method):
        assert _known_async(fn), fn
    for fn in (plain, lambda m: coro(m), functools.partial(plain)):
        assert not _known_async(fn), fn


@pytest.mark.anyio
async def test_a_plain_function_returning_the_async_sdk_coroutine_works() -> None:
    """A lambda around an ``async def`` (the async SDK's ``create``) returns a coroutine from
    the worker thread (trio refuses that unless it is boxed)."""
    cache = StreamingResponseCache(CacheManager())

    async def create(messages: Any) -> AsyncIterator[str]:
        async def gen() -> AsyncIterator[str]:
            yield "c"

        return gen()

    assert [c async for c in cache.aget_or_stream(["q"], lambda m: create(m))] == ["c"]
