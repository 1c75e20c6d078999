"""Finding S8-4 (medium for the gate, a test of s8-hit; RESOLVED on s8-hit by 46589ca, found
independently there): ``tests/test_hit_turns.py::test_a_loop_of_short_hits_lets_other_tasks_run
[trio]`` as first written (``assert ran >= 50``) failed about one run in five (8 of 40 runs
at 244695f: ``assert 49 >= 50``), so ``make test`` went red at random. With one turn per
3-chunk hit, the ticker runs once per hit, but trio runs each batch of ready tasks in a random
order: when the main task comes first after the last hit's turn, it reads the count before the
ticker's last increment and sees 49 of 50 (asyncio, FIFO, always sees 50). On main the same
loop had two turns per 3-chunk hit, so the measurement had a margin of 50. 46589ca asserts
``ran >= 25``. This test keeps it honest: it runs that test 50 times in a row on both backends
(on 244695f the chance that all 50 passed on trio was about 0.8^50, 1e-5). Fails on main: the
test it runs does not exist there.
"""

from __future__ import annotations

import pytest
from tests.test_hit_turns import test_a_loop_of_short_hits_lets_other_tasks_run as branch_test

pytestmark = pytest.mark.anyio

REPEATS = 50


async def test_the_short_hits_turn_count_holds_every_time() -> None:
    for _ in range(REPEATS):
        await branch_test()
