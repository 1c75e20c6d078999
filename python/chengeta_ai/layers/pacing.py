"""Recorded-pace replay (``replay="recorded"``): waiting for each chunk's time without blocking.

A sync replay sleeps with `time.sleep` (a nanosecond timer: on time within the scheduler's
jitter). An async replay sleeps through anyio, and there the event loop is the timer: asyncio
and trio wait in epoll, whose timeout is whole milliseconds rounded up, and asyncio's selector
rounds the seconds up to the millisecond before epoll rounds again, which for some values adds
a millisecond (9 ms waits 10). A sleep straight to a deadline wakes anywhere in the 1-2 ms after
it, and two chunks in a row can be handed over with their recorded gap off by more than 1 ms.

`Pacer.wait_until` aims before the deadline and closes in (see `approach`): it sleeps on the
loop to 2 ms before it, then to 1 ms before it; what is left, below the loop's timer granularity,
a worker thread sleeps with `time.sleep` (``anyio.to_thread``), and its return wakes the loop at
once. A chunk is never handed over early, and is late by the thread's and the loop's wake-ups
(a p99 gap error of 0.2-0.9 ms in most runs on a loaded 2-core machine). The loop itself never
polls: it sleeps in epoll all along. (A yield-spin, one checkpoint per loop turn for the last
millisecond, measured about as precise in interleaved runs, p99 0.2-2.7 ms against the thread's
0.3-5.3 ms, but keeps the loop polling and used 3-5 % of a core against 2-3 %: see
benches/bench_call_controls.py.)

The thread hop costs a few tens of microseconds a chunk and a worker thread from anyio's default
limiter while it sleeps (under 1 ms), so it is bounded by the number of replays: a cache's async
paced replays close in only while at most `PRECISE_MAX` of them run at once (a demo, a test, a
few users); beyond that each chunk waits on the loop until its deadline (0-2 ms late).

Those waits share one timer per event loop (`LoopTimer`): a chunk waits on the event of its
deadline's millisecond, and one task sleeps to the earliest millisecond due and sets its event.
A sleep of its own per chunk costs its wake-up each time (on trio ~20-35 µs of CPU: the deadline
raises and catches `Cancelled` through a cancel scope; ~8-10 µs on asyncio); an event's wake-up
is a reschedule, and the timer's own wake-ups are one per millisecond at most, however many
chunks are due in it.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import math
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import sniffio

__all__ = ["GRANULARITY", "PRECISE_MAX", "LoopTimer", "Pacer", "approach", "sleep_until"]

#: An event loop's timer granularity (epoll: whole milliseconds, rounded up).
GRANULARITY = 0.001
#: Where the first sleep towards a deadline aims: this far before it, so that asyncio's double
#: round-up (up to 2 ms late) still wakes before the deadline.
COARSE_AHEAD = 0.002
#: Most async paced replays of one cache that close in on their deadlines at once (above it
#: they sleep straight to each deadline on the loop).
PRECISE_MAX = 8

_perf = time.perf_counter


def approach(left: float) -> float:
    """How long to sleep on the loop with ``left`` seconds (> 0) to go before a deadline, aiming
    before it; 0.0: what is left is below the loop's timer granularity (a worker thread sleeps
    it)."""
    if left > COARSE_AHEAD + GRANULARITY:
        return left - COARSE_AHEAD
    if left > GRANULARITY:
        return left - GRANULARITY
    return 0.0


class Pacer:
    """How many async paced replays of a cache run now (thread-safe: a cache may serve
    several event loops), and how they wait for a chunk's deadline."""

    __slots__ = ("_lock", "active", "limit")

    def __init__(self) -> None:
        # only entering and leaving take the lock; `active` is read unlocked (an int)
        self._lock = threading.Lock()
        self.active = 0
        #: `PRECISE_MAX`, as of this pacer's making.
        self.limit = PRECISE_MAX

    def enter(self) -> None:
        with self._lock:
            self.active += 1

    def leave(self) -> None:
        with self._lock:
            self.active -= 1

    async def wait_until(self, deadline: float) -> None:
        """Returns once `time.perf_counter()` has passed ``deadline`` (at once if it has): by
        `approach`'s steps while at most `limit` replays run (asked at each step), else by
        the loop's shared timer (`sleep_until`)."""
        while (left := deadline - _perf()) > 0:
            if self.active > self.limit:
                await sleep_until(deadline)
            elif nap := approach(left):
                await anyio.sleep(nap)
            else:
                # abandoned on cancellation: the thread's sleep (under 1 ms) ends by itself
                await anyio.to_thread.run_sync(_sleep_until, deadline, abandon_on_cancel=True)


def _sleep_until(deadline: float) -> None:
    """In a worker thread: sleeps until ``deadline`` (`time.perf_counter`) with the OS's fine
    timer."""
    left = deadline - _perf()
    if left > 0:
        time.sleep(left)


class LoopTimer:
    """One event loop's timer for crowded paced replays (see the module's docstring). Used
    from its loop's thread only; its task runs while somebody waits and ends when nobody does.
    It keeps time on the loop's clock (`anyio.current_time`), as a sleep does, so a mocked or
    virtual loop clock paces it too."""

    __slots__ = ("_armed", "_due", "_scope", "_stale", "_task", "_ticks")

    def __init__(self) -> None:
        #: Each millisecond of the loop's clock somebody waits for (rounded up): its event and
        #: how many wait on it; those milliseconds in a heap, with `_stale` ones nobody waits
        #: for any more (skipped; the heap is rebuilt when they are half of it).
        self._due: dict[int, _Tick] = {}
        self._ticks: list[int] = []
        self._stale = 0
        #: The timer task's sleep, and the millisecond it sleeps to.
        self._scope: anyio.CancelScope | None = None
        self._armed = 0
        #: The timer task while it runs: an asyncio `Task`, or True (a trio system task).
        self._task: asyncio.Task[None] | bool | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    async def sleep_until(self, deadline: float) -> None:
        """Returns at the timer's first wake-up at or after ``deadline`` (the loop's clock);
        early only if the timer task ended under it (then callers look at the time again)."""
        tick = math.ceil(deadline * 1000.0)
        due = self._due.get(tick)
        if due is None:
            due = self._due[tick] = _Tick()
            heapq.heappush(self._ticks, tick)
            if self._task is None:
                self._task = _spawn(self._run, self._task_done)
            elif self._scope is not None and tick < self._armed:
                # due before the millisecond the timer sleeps to: it wakes for this one first
                self._armed = tick
                self._scope.deadline = tick / 1000.0
        due.waiters += 1
        try:
            await due.event.wait()
        finally:
            due.waiters -= 1
            if not due.waiters and not due.event.is_set() and self._due.get(tick) is due:
                # the last one waiting for this millisecond left (cancelled): nobody needs it
                del self._due[tick]
                self._stale += 1
                if self._stale * 2 > len(self._ticks):
                    self._ticks[:] = [t for t in self._ticks if t in self._due]
                    heapq.heapify(self._ticks)
                    self._stale = 0
                if tick == self._armed and self._scope is not None:
                    self._scope.cancel()  # the timer looks again at what is left

    async def _run(self) -> None:
        ticks, due = self._ticks, self._due
        try:
            while True:
                while ticks and ticks[0] not in due:
                    heapq.heappop(ticks)  # nobody waits for it any more
                    self._stale = max(0, self._stale - 1)
                if not ticks:
                    return
                tick = ticks[0]
                if anyio.current_time() * 1000.0 < tick:
                    with anyio.CancelScope(deadline=tick / 1000.0) as scope:
                        self._scope, self._armed = scope, tick
                        await anyio.sleep_forever()
                    self._scope = None
                now = anyio.current_time() * 1000.0
                while ticks and ticks[0] <= now:
                    woken = due.pop(heapq.heappop(ticks), None)
                    if woken is None:
                        self._stale = max(0, self._stale - 1)
                    else:
                        woken.event.set()
        finally:
            self._ended()

    def _ended(self) -> None:
        """The timer task is over (ended, or cancelled: the loop is closing): whoever still
        waits is woken, looks at the time and waits anew (on a new task)."""
        self._task = None
        self._scope = None
        self._ticks.clear()
        self._stale = 0
        for woken in self._due.values():
            woken.event.set()
        self._due.clear()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """An asyncio timer task's done callback: also when it was cancelled before its first
        step (its ``finally`` never ran)."""
        if self._task is task:
            self._ended()


class _Tick:
    """A millisecond waited for: its event and how many wait on it."""

    __slots__ = ("event", "waiters")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.waiters = 0


_timers: anyio.lowlevel.RunVar[LoopTimer] = anyio.lowlevel.RunVar("chengeta_ai_loop_timer")
#: The asyncio loops' timers, on the loop (a cycle the collector frees with a loop closed while
#: a replay waited, where a map from loops to timers would keep the loop alive).
_LOOP_ATTR = "_chengeta_ai_loop_timer"


def loop_timer(*, make: bool = True) -> LoopTimer | None:
    """The running event loop's timer (made at first use; None if there is none and not
    ``make``)."""
    loop = asyncio._get_running_loop()
    if loop is not None:
        timer: LoopTimer | None = getattr(loop, _LOOP_ATTR, None)
        if timer is not None or not make:
            return timer or _run_var_timer(make=False)
        timer = LoopTimer()
        try:
            setattr(loop, _LOOP_ATTR, timer)
        except AttributeError:  # a loop type without instance attributes (uvloop)
            return _run_var_timer(make=True)
        return timer
    return _run_var_timer(make=make)


def _run_var_timer(*, make: bool) -> LoopTimer | None:
    try:
        return _timers.get()
    except LookupError:
        if not make:
            return None
        timer = LoopTimer()
        _timers.set(timer)
        return timer


async def sleep_until(deadline: float) -> None:
    """Waits on this event loop's `LoopTimer` until ``deadline`` (`time.perf_counter`) has
    passed (at once, after a checkpoint, if it has). The deadline is taken onto the loop's
    clock once, 10 µs later (the two clocks are the same monotonic clock on a real loop; the
    margin keeps a chunk from coming before its time by a conversion's rounding)."""
    left = deadline - _perf()
    if left <= 0:
        await anyio.lowlevel.checkpoint()
        return
    timer = loop_timer()
    assert timer is not None
    at = anyio.current_time() + left + 1e-5
    while anyio.current_time() < at:
        await timer.sleep_until(at)


def _spawn(
    fn: Callable[[], Coroutine[Any, Any, None]],
    done: Callable[[asyncio.Task[None]], None],
) -> asyncio.Task[None] | bool:
    """Starts ``fn()`` as a task of the running loop, outside any task group: a loop-level task
    on asyncio (``done`` is its done callback; the task is returned), a system task on trio
    (which ends with ``trio.run``; True is returned)."""
    if sniffio.current_async_library() == "trio":
        import trio

        trio.lowlevel.spawn_system_task(fn, context=contextvars.copy_context())
        return True
    task = asyncio.get_running_loop().create_task(fn())
    task.add_done_callback(done)
    return task
