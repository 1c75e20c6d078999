"""Finding S8-1 (medium, regression of s8-hit): a hit read for a few chunks and then closed
gives the event loop no turn at all. The branch's turns come at a batch's end once
`REPLAY_SLICE` (0.25 ms) has passed, and once after the last batch; a consumer that stops
before the end (reads the first chunks, finds what it wanted, ``break`` + ``aclose()``) never
reaches either when it stops within a slice. On main a turn came at the end of every batch,
and the first batch is one chunk: any hit read for two chunks or more gave one. So a loop of
such reads (on a backend whose read runs inline: `InMemoryBackend`) now starves every other
task on the loop, and a `CancelScope.cancel()` from another task (a deadline's watchdog, a
server's shutdown) never lands, for as long as the loop runs. Measured: 100 hits read for
2, 10, 65 or 300 chunks gave another task 0 turns on the branch, 100 (500 for 300 chunks) on
main, on asyncio and trio. Fails on main: no.

Suggested fix: keep one unconditional turn per hit where main had its first one, at the end of
the first (one-chunk) batch, instead of after the last batch (``turn`` set so that the first
batch's end always checkpoints, then every `REPLAY_SLICE`; drop the final checkpoint). The cost
is the same one task switch per hit; a 1-chunk entry still gets it at its end, a loop of short
hits still lets other tasks run, and a hit read for two chunks or more turns as on main.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from tests.review_s8.hits import cache_for, never, stored

pytestmark = [
    pytest.mark.anyio,
]

HITS = 100
TAKE = 10  # chunks read from each hit before closing it (of 300)


async def canceller(scope: anyio.CancelScope) -> None:
    scope.cancel()


async def read_part(cache: object, messages: object) -> None:
    stream = cache.aget_or_stream(messages, never)  # type: ignore[attr-defined]
    got = 0
    async for _ in stream:
        got += 1
        if got == TAKE:
            break
    await stream.aclose()
    assert got == TAKE


async def test_a_loop_of_partly_read_hits_lets_other_tasks_run() -> None:
    cache = cache_for()
    messages = [{"role": "user", "content": "peek"}]
    await stored(cache, messages, 300)
    ticks = 0
    done = anyio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.lowlevel.checkpoint()
        start = ticks
        for _ in range(HITS):
            await read_part(cache, messages)
        ran = ticks - start
        done.set()
    assert cache.stats()["hits"] == HITS
    # main: a turn per hit (after its first, one-chunk batch; trio runs a batch of ready tasks
    # in a random order, so slightly fewer may be seen); branch: none
    assert ran >= HITS // 2, ran


async def test_a_cancel_from_another_task_reaches_a_loop_of_partly_read_hits() -> None:
    cache = cache_for()
    messages = [{"role": "user", "content": "peek"}]
    await stored(cache, messages, 300)
    done = 0
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(canceller, scope)  # cancels at the first turn it gets
            for _ in range(HITS):
                await read_part(cache, messages)
                done += 1
    assert done < HITS, done  # main: cancelled within the first hit or two
    assert scope.cancelled_caught
