"""An unpaced async hit gives the event loop turns, on asyncio and trio.

A hit's chunks are all in hand, so a consumer that never awaits anything of its own would hold
the loop for the whole replay if the replay did not yield. It yields before its first chunk
(a cancel point, and a loop of short hits lets other tasks run), at the end of every batch
after which another task is ready to run (as often as it always did), and otherwise once per
`REPLAY_SLICE` of replay (a task waiting for a timer or I/O is seen ready only when the loop
polls), so a cancellation reaches a consumer that never awaits anything of its own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import pytest

from chengeta_ai import CacheKeyBuilder, CacheManager, InMemoryBackend
from chengeta_ai.layers import streaming_cache
from chengeta_ai.layers.streaming_cache import REPLAY_BATCH, REPLAY_SLICE, StreamingResponseCache

pytestmark = pytest.mark.anyio


def cache_for() -> StreamingResponseCache:
    return StreamingResponseCache(
        CacheManager(backend=InMemoryBackend(), key_builder=CacheKeyBuilder())
    )


def spin(seconds: float) -> None:
    """Busy work that never yields to the loop."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def stored(cache: StreamingResponseCache, messages: list[dict[str, str]], n: int) -> None:
    items = [f"t{i} " for i in range(n)]

    async def stream_fn(_: object):  # type: ignore[no-untyped-def]
        for item in items:
            yield item

    async for _ in cache.aget_or_stream(messages, stream_fn):
        pass


async def never(_: object):  # type: ignore[no-untyped-def]
    raise AssertionError("a hit must not call upstream")
    yield  # pragma: no cover


class Ticker:
    """Another task on the loop: counts the turns it gets until the block ends. ``nap``: it
    waits that long on the loop's timer between turns (then it is not ready to run until the
    loop polls), else a checkpoint (always ready)."""

    def __init__(self) -> None:
        self.ticks = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, nap: float = 0.0) -> AsyncIterator[Ticker]:
        ticker = cls()
        done = anyio.Event()

        async def tick() -> None:
            while not done.is_set():
                ticker.ticks += 1
                if nap:
                    await anyio.sleep(nap)
                else:
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(tick)
            await anyio.lowlevel.checkpoint()
            ticker.ticks = 0
            try:
                yield ticker
            finally:
                done.set()


def turns_in(seen: list[int]) -> list[int]:
    """Where the ticker had run since the chunk before."""
    return [i for i in range(1, len(seen)) if seen[i] != seen[i - 1]]


async def test_with_another_task_ready_a_hit_turns_at_every_batch() -> None:
    cache = cache_for()
    messages = [{"role": "user", "content": "ready"}]
    n = 20 * REPLAY_BATCH
    await stored(cache, messages, n)
    seen: list[int] = []
    async with Ticker.running() as ticker:
        async for _ in cache.aget_or_stream(messages, never):
            seen.append(ticker.ticks)  # a fast consumer: 20 batches in well under a slice each
    turns = turns_in(seen)
    # a turn at each batch's end (trio, which runs a batch of ready tasks in random order,
    # may run this one twice before the ticker)
    assert len(turns) >= n // REPLAY_BATCH // 2, turns
    longest = max(b - a for a, b in zip([0, *turns[:-1]], turns, strict=True))
    assert longest <= 2 * REPLAY_BATCH, turns


async def test_alone_a_long_hit_turns_once_per_slice() -> None:
    """The other task waits on a timer (not ready until the loop polls): a batch that takes two
    slices ends with a turn."""
    cache = cache_for()
    messages = [{"role": "user", "content": "alone"}]
    n = 20 * REPLAY_BATCH
    await stored(cache, messages, n)
    seen: list[int] = []
    async with Ticker.running(nap=1e-6) as ticker:
        async for _ in cache.aget_or_stream(messages, never):
            seen.append(ticker.ticks)
            spin(REPLAY_SLICE / REPLAY_BATCH * 2)
    turns = turns_in(seen)
    # (the ticker's timer is due at the loop's next poll: it may run at every other turn)
    assert len(turns) >= n // REPLAY_BATCH // 4, turns
    longest = max(b - a for a, b in zip([0, *turns[:-1]], turns, strict=True))
    assert longest <= 4 * REPLAY_BATCH + 1, turns


async def test_a_loop_of_short_hits_lets_other_tasks_run() -> None:
    cache = cache_for()
    messages = [{"role": "user", "content": "short"}]
    await stored(cache, messages, 3)
    async with Ticker.running() as ticker:
        for _ in range(50):
            async for _ in cache.aget_or_stream(messages, never):
                pass
        ran = ticker.ticks
    assert ran >= 25, ran  # ~one turn per hit (before its first chunk)


async def test_a_loop_of_short_hits_lets_a_task_waiting_on_a_timer_run() -> None:
    """Nobody is ready to run (the other task waits on the loop's timer, seen only when the
    loop polls): each hit still gives a turn, after its first chunk."""
    cache = cache_for()
    messages = [{"role": "user", "content": "short, timer"}]
    await stored(cache, messages, 3)
    async with Ticker.running(nap=1e-6) as ticker:
        for _ in range(50):
            async for _ in cache.aget_or_stream(messages, never):
                pass
        ran = ticker.ticks
    assert ran >= 10, ran  # (its timer is due at the loop's next poll: every other turn)


async def test_a_consumer_that_never_awaits_is_cancelled_within_a_slice() -> None:
    cache = cache_for()
    messages = [{"role": "user", "content": "cancel"}]
    n = 200 * REPLAY_BATCH
    await stored(cache, messages, n)
    got = 0
    t0 = time.perf_counter()
    with anyio.move_on_after(0.02) as scope:
        async for _ in cache.aget_or_stream(messages, never):
            got += 1
            spin(REPLAY_SLICE / REPLAY_BATCH)  # the whole replay: ~200 slices, >= 50 ms
    elapsed = time.perf_counter() - t0
    assert scope.cancelled_caught
    assert 0 < got < n
    assert elapsed < 0.02 + 0.5, elapsed  # cancelled at a turn, long before the end


def test_the_slice_is_a_fraction_of_a_millisecond() -> None:
    # a loop held up to a slice plus one batch: well under the 1 ms a timer can tell apart
    assert 0 < streaming_cache.REPLAY_SLICE <= 0.0005
