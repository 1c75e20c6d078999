"""`pacing.LoopTimer`: one timer per event loop for crowded paced replays, on asyncio and trio.

A waiter is never woken before its deadline, an earlier deadline arriving while the timer
sleeps to a later one is served first, cancelled waiters disturb nobody, the timer's task ends
when nobody waits (and with the loop), and each loop (thread) has its own timer.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from chengeta_ai.layers import pacing
from chengeta_ai.layers.pacing import LoopTimer, sleep_until

pytestmark = pytest.mark.anyio

_perf = time.perf_counter


def timer_here() -> LoopTimer:
    timer = pacing.loop_timer(make=False)
    if timer is None:
        raise LookupError("no timer on this loop")
    return timer


async def test_many_waiters_wake_at_or_after_their_deadlines() -> None:
    rng = random.Random(7)
    base = _perf()
    deadlines = [base + rng.uniform(0.0, 0.06) for _ in range(300)]
    woke: list[tuple[float, float]] = []

    async def wait(deadline: float) -> None:
        await sleep_until(deadline)
        woke.append((deadline, _perf()))

    async with anyio.create_task_group() as tg:
        for d in deadlines:
            tg.start_soon(wait, d)
    assert len(woke) == len(deadlines)
    assert all(t >= d for d, t in woke)
    await anyio.lowlevel.checkpoint()
    assert not timer_here().running  # nobody waits: its task has ended


async def test_an_earlier_deadline_is_served_before_the_one_the_timer_sleeps_to() -> None:
    far = _perf() + 30.0
    order: list[str] = []

    async def wait_far() -> None:
        await sleep_until(far)
        order.append("far")

    with anyio.move_on_after(5.0):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_far)
            await anyio.sleep(0.01)  # the timer now sleeps to `far`
            assert timer_here().running
            soon = _perf() + 0.005
            await sleep_until(soon)
            assert _perf() >= soon
            order.append("soon")
            tg.cancel_scope.cancel()
    assert order == ["soon"]  # woken long before `far` (or the 5 s bound)


async def test_cancelled_waiters_disturb_nobody_and_the_timer_ends() -> None:
    start = _perf()
    done: list[float] = []

    async def wait(deadline: float, cancel_after: float | None) -> None:
        if cancel_after is None:
            await sleep_until(deadline)
            done.append(deadline)
        else:
            with anyio.move_on_after(cancel_after):
                await sleep_until(deadline)
                raise AssertionError("woken although cancelled first")

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(wait, start + 0.02 + i * 0.0005, 0.005 if i % 2 else None)
    assert sorted(done) == sorted(start + 0.02 + i * 0.0005 for i in range(0, 50, 2))
    await anyio.lowlevel.checkpoint()
    assert not timer_here().running


async def test_the_timer_ends_when_its_last_waiter_is_cancelled() -> None:
    """A far deadline nobody waits for any more does not keep the timer's task asleep."""
    with anyio.move_on_after(0.01):
        await sleep_until(_perf() + 60.0)
    timer = timer_here()
    for _ in range(10):
        if not timer.running:
            break
        await anyio.sleep(0.001)
    assert not timer.running


async def test_a_deadline_already_passed_returns_after_a_checkpoint() -> None:
    reached = False
    with anyio.CancelScope() as scope:
        scope.cancel()
        await sleep_until(_perf() - 1.0)  # a checkpoint: a cancelled scope stops it here
        reached = True
    assert not reached
    await sleep_until(_perf() - 1.0)
    with pytest.raises(LookupError):
        timer_here()  # and no timer was made for it


def test_a_run_that_ends_with_a_cancelled_far_waiter_ends_at_once(anyio_backend: str) -> None:
    """The timer's task still sleeps to a deadline nobody waits for when the run ends: it is
    cancelled with the loop (asyncio.run / trio's system tasks), without an error or a hang."""

    async def main() -> None:
        with anyio.move_on_after(0.01):
            await sleep_until(_perf() + 60.0)
        assert timer_here().running

    t0 = _perf()
    anyio.run(main, backend=anyio_backend)
    assert _perf() - t0 < 30.0


def test_each_event_loop_has_its_own_timer(anyio_backend: str) -> None:
    timers: list[LoopTimer] = []
    errors: list[BaseException] = []

    async def main() -> None:
        deadline = _perf() + 0.02
        await sleep_until(deadline)
        assert _perf() >= deadline
        timers.append(timer_here())

    def in_thread() -> None:
        try:
            anyio.run(main, backend=anyio_backend)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=in_thread) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len({id(t) for t in timers}) == 4


async def test_a_waiter_outlives_a_timer_task_that_dies(monkeypatch: pytest.MonkeyPatch) -> None:
    """The timer's task cancelled under a waiter (the first one is started in a task group of
    another task, which the test cancels): the waiter is woken, finds its time not come and
    waits on a new timer task (started as usual)."""
    real = pacing._spawn
    spawned: list[str] = []

    async def owner(*, task_status: anyio.abc.TaskStatus[anyio.abc.TaskGroup]) -> None:
        async with anyio.create_task_group() as group:
            task_status.started(group)
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        owned = await tg.start(owner)

        def spawn(fn: Any, done: Any) -> Any:
            spawned.append("owned" if not spawned else "loop")
            if len(spawned) == 1:
                owned.start_soon(fn)
                return True
            return real(fn, done)

        monkeypatch.setattr(pacing, "_spawn", spawn)
        deadline = _perf() + 0.05
        with anyio.fail_after(10):  # a waiter left asleep by the dead task: fails, not hangs
            async with anyio.create_task_group() as waiters:
                waiters.start_soon(sleep_until, deadline)
                await anyio.sleep(0.01)
                assert timer_here().running
                owned.cancel_scope.cancel()  # the first timer task dies now
        assert _perf() >= deadline
    assert spawned == ["owned", "loop"]
