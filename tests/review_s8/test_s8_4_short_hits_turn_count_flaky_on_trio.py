"""Finding S8-4 (medium for the gate, a test of s8-hit): the branch's own
``tests/test_hit_turns.py::test_a_loop_of_short_hits_lets_other_tasks_run[trio]`` fails about
one run in five (8 of 40 runs here: ``assert 49 >= 50``), so ``make test`` goes red at random.
With one turn per 3-chunk hit, the ticker runs once per hit, but trio runs each batch of ready
tasks in a random order: when the main task comes first after the last hit's turn, it reads
``ticks`` before the ticker's last increment and sees 49 of 50. asyncio (FIFO) always sees 50.
On main the same loop had two turns per 3-chunk hit (after the one-chunk first batch and after
the second), so the measurement had a margin of 50. This test repeats the branch test's
measurement 50 times (the chance that all 50 pass on the branch is about 0.8^50, 1e-5).
Fails on main: no (about 100 turns every time).

Suggested fix: allow for the last turn in the test (``ran >= 50 - 1``), or count turns the
ticker ran up to the end of the last hit (e.g. stop it with the ``done`` event and await one
more checkpoint before reading ``ticks``).
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from tests.review_s8.hits import cache_for, never, stored

pytestmark = pytest.mark.anyio

REPEATS = 50


async def short_hits_turns(cache: object, messages: object) -> int:
    """The measurement of test_a_loop_of_short_hits_lets_other_tasks_run, as written."""
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
        for _ in range(50):
            async for _ in cache.aget_or_stream(messages, never):  # type: ignore[attr-defined]
                pass
        ran = ticks - start
        done.set()
    return ran


async def test_the_short_hits_turn_count_is_always_fifty(
    anyio_backend: str, request: pytest.FixtureRequest
) -> None:
    if anyio_backend == "trio":
        request.applymarker(
            pytest.mark.xfail(strict=True, reason="S8-4: trio's random batch order: 49 < 50")
        )
    cache = cache_for()
    messages = [{"role": "user", "content": "short"}]
    await stored(cache, messages, 3)
    seen = [await short_hits_turns(cache, messages) for _ in range(REPEATS)]
    assert min(seen) >= 50, seen
