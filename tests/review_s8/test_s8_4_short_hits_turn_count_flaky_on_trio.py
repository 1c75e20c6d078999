"""Finding S8-4 (medium for the gate, a test of s8-hit): the branch's own
``tests/test_hit_turns.py::test_a_loop_of_short_hits_lets_other_tasks_run[trio]`` fails about
one run in five (8 of 40 runs here: ``assert 49 >= 50``), so ``make test`` goes red at random.
With one turn per 3-chunk hit, the ticker runs once per hit, but trio runs each batch of ready
tasks in a random order: when the main task comes first after the last hit's turn, it reads
``ticks`` before the ticker's last increment and sees 49 of 50. asyncio (FIFO) always sees 50.
On main the same loop had two turns per 3-chunk hit (after the one-chunk first batch and after
the second), so the measurement had a margin of 50. This test runs the branch's test 50 times
(the chance that all 50 pass on the branch is about 0.8^50, 1e-5). Fails on main: the test it
runs does not exist there (its measurement gives about 100 turns on main's code every time).

Suggested fix: allow for the last turn in that test (``ran >= 50 - 1``), or count the turns the
ticker ran up to the end of the last hit (set ``done`` and let the ticker finish before reading
``ticks``). S8-1's fixes keep one turn per hit, so this stays needed with them.
"""

from __future__ import annotations

import pytest
from tests.test_hit_turns import test_a_loop_of_short_hits_lets_other_tasks_run as branch_test

pytestmark = pytest.mark.anyio

REPEATS = 50


async def test_the_short_hits_turn_count_holds_every_time(
    anyio_backend: str, request: pytest.FixtureRequest
) -> None:
    if anyio_backend == "trio":
        request.applymarker(
            pytest.mark.xfail(strict=True, reason="S8-4: trio's random batch order: 49 < 50")
        )
    for _ in range(REPEATS):
        await branch_test()
