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
    from its loop's thread only; its task runs while somebody waits and ends when nobody does."""

    __slots__ = ("_armed", "_due", "_scope", "_ticks", "running")

    def __init__(self) -> None:
        #: Each millisecond somebody waits for (`time.perf_counter` ms, rounded up): its event
        #: and how many wait on it; those milliseconds in a heap (with ones nobody waits for
        #: any more, skipped).
        self._due: dict[int, _Tick] = {}
        self._ticks: list[int] = []
        #: The timer task's sleep, and the millisecond it sleeps to.
        self._scope: anyio.CancelScope | None = None
        self._armed = 0
        self.running = False

    async def sleep_until(self, deadline: float) -> None:
        """Returns at the first wake-up of the timer at or after ``deadline``
        (`time.perf_counter`), or earlier if the timer task ends (the loop shutting down:
        callers re-check the time)."""
        tick = math.ceil(deadline * 1000.0)
        due = self._due.get(tick)
        if due is None:
            due = self._due[tick] = _Tick()
            heapq.heappush(self._ticks, tick)
            if not self.running:
                self.running = True
                _spawn(self._run)
            elif self._scope is not None and tick < self._armed:
                # due before the millisecond the timer sleeps to: it wakes for this one first
                self._armed = tick
                self._scope.deadline = anyio.current_time() + (tick / 1000.0 - _perf())
        due.waiters += 1
        try:
            await due.event.wait()
        finally:
            due.waiters -= 1
            if not due.waiters and not due.event.is_set() and self._due.get(tick) is due:
                # the last one waiting for this millisecond left (cancelled): nobody needs it
                del self._due[tick]
                if tick == self._armed and self._scope is not None:
                    self._scope.cancel()  # the timer looks again at what is left

    async def _run(self) -> None:
        ticks, due = self._ticks, self._due
        try:
            while True:
                while ticks and ticks[0] not in due:
                    heapq.heappop(ticks)  # nobody waits for it any more
                if not ticks:
                    return
                tick = ticks[0]
                left = tick / 1000.0 - _perf()
                if left > 0:
                    with anyio.CancelScope(deadline=anyio.current_time() + left) as scope:
                        self._scope, self._armed = scope, tick
                        await anyio.sleep_forever()
                    self._scope = None
                now = _perf() * 1000.0
                while ticks and ticks[0] <= now:
                    woken = due.pop(heapq.heappop(ticks), None)
                    if woken is not None:
                        woken.event.set()
        finally:
            # ended (nobody waits) or cancelled (the loop is closing): whoever still waits is
            # woken, re-checks the time and waits anew
            self.running = False
            self._scope = None
            ticks.clear()
            for woken in due.values():
                woken.event.set()
            due.clear()


class _Tick:
    """A millisecond waited for: its event and how many wait on it."""

    __slots__ = ("event", "waiters")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.waiters = 0


_timers: anyio.lowlevel.RunVar[LoopTimer] = anyio.lowlevel.RunVar("chengeta_ai_loop_timer")


async def sleep_until(deadline: float) -> None:
    """Waits on this event loop's `LoopTimer` until ``deadline`` (`time.perf_counter`) has
    passed (at once, after a checkpoint, if it has)."""
    if _perf() >= deadline:
        await anyio.lowlevel.checkpoint()
        return
    try:
        timer = _timers.get()
    except LookupError:
        timer = LoopTimer()
        _timers.set(timer)
    while _perf() < deadline:
        await timer.sleep_until(deadline)


def _spawn(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Starts ``fn()`` as a task of the running loop, outside any task group: a loop-level task
    on asyncio, a system task on trio (which ends with ``trio.run``)."""
    if sniffio.current_async_library() == "trio":
        import trio

        trio.lowlevel.spawn_system_task(fn, context=contextvars.copy_context())
    else:
        task = asyncio.get_running_loop().create_task(fn())
        _asyncio_tasks.add(task)
        task.add_done_callback(_asyncio_tasks.discard)


#: Running timer tasks on asyncio (the loop keeps only a weak reference to a task).
_asyncio_tasks: set[asyncio.Task[None]] = set()
