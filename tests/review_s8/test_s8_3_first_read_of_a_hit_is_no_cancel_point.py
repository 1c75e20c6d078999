"""Finding S8-3 (low, main's behaviour, not this change): the first ``__anext__`` of a hit is
no cancel point. On a backend whose async read runs inline (`InMemoryBackend`), nothing awaits
anything before the first chunk is handed out, so a consumer whose scope is already cancelled
still gets a first chunk (on main; the whole short hit on the branch, S8-2), and a loop of hits
each read for one chunk (a "is it cached, what does it start with" probe) gives the loop no turn
and cannot be cancelled from another task, on main as on the branch. trio's convention (and
anyio's own streams: ``MemoryObjectReceiveStream.receive`` checkpoints first) is that an async
call is a cancel point. Fails on main: yes.

Suggested fix: ``await anyio.lowlevel.checkpoint_if_cancelled()`` once before a hit's first
chunk (no task switch unless cancelled, so the time to first chunk is kept), and the S8-1 fix
for the turn; or a full ``checkpoint()`` before the first chunk in place of S8-1's turn after it
(a loop of one-chunk probes then gives turns too, at the cost of a task switch before every
hit's first chunk).
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from tests.review_s8.hits import cache_for, never, stored

pytestmark = [
    pytest.mark.anyio,
]


@pytest.mark.xfail(
    strict=True,
    reason=(
        "S8-3, not fixed on purpose: anyio's checkpoint_if_cancelled() before a hit's first "
        "chunk cost 10-40 us of time to first chunk after the bench's gc.collect() (interleaved "
        "in one process: median 229 vs 207 us, 267 vs 256 us), a full checkpoint 50-100 us; a "
        "cancelled consumer gets the first chunk and the cancellation at the turn after it, as "
        "before this branch"
    ),
)
async def test_a_cancelled_consumer_gets_no_chunk_of_a_hit() -> None:
    cache = cache_for()
    messages = [{"role": "user", "content": "late"}]
    await stored(cache, messages, 3)
    got = 0
    with anyio.CancelScope() as scope:
        scope.cancel()
        async for _ in cache.aget_or_stream(messages, never):
            got += 1
    assert scope.cancelled_caught
    assert got == 0, got  # main: 1, branch: 3


@pytest.mark.xfail(
    strict=True,
    reason=(
        "S8-3, second part, not fixed on purpose: a turn before every hit's first chunk (the "
        "suggested fix) delayed the first chunk by 50-100 us in bench_hot_path (0.20 -> "
        "0.25-0.31 ms, asyncio); a hit's first read is a cancel point "
        "(checkpoint_if_cancelled) and its turn comes after its first chunk, so only a loop of "
        "hits each read for exactly one chunk, awaiting nothing else, gives no turn (as before)"
    ),
)
async def test_a_loop_of_one_chunk_probes_can_be_cancelled() -> None:
    cache = cache_for()
    messages = [{"role": "user", "content": "probe"}]
    await stored(cache, messages, 3)
    probes = 0

    async def canceller(scope: anyio.CancelScope) -> None:
        scope.cancel()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(canceller, scope)
            for _ in range(100):
                stream = cache.aget_or_stream(messages, never)
                async for _ in stream:
                    break
                await stream.aclose()
                probes += 1
    assert probes < 100, probes  # main and branch: all 100 probes run
    assert scope.cancelled_caught
