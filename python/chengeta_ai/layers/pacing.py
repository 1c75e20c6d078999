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
few users); beyond that each chunk sleeps straight to its deadline on the loop (0-2 ms late),
and a thousand paced replays cost the loop what a thousand sleeping tasks do.
"""

from __future__ import annotations

import threading
import time

import anyio
import anyio.to_thread

__all__ = ["GRANULARITY", "PRECISE_MAX", "Pacer", "approach"]

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
        `approach`'s steps while at most `limit` replays run (asked at each step), else by one
        sleep on the loop."""
        while (left := deadline - _perf()) > 0:
            if self.active > self.limit:
                await anyio.sleep(left)
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
