"""Review s4, finding: on asyncio the sync-upstream reader threads are not bounded (HIGH).

README ("Async, on asyncio and trio"): a blocking sync upstream given to ``aget_or_stream`` is
read "one ``next()`` at a time in a worker thread (its own limiter, 128 threads per event
loop)"; `chengeta_ai.layers.upstream.UPSTREAM_READER_THREADS` documents the bound.

`ThreadedIterator.__anext__` runs ``next()`` with ``anyio.to_thread.run_sync(...,
abandon_on_cancel=True, limiter=...)``. On asyncio, anyio releases the limiter's token when the
waiting task is cancelled, while the abandoned thread keeps blocking in ``next()``. So every
caller that leaves (a client disconnecting, a timeout) while its upstream is stalled frees a
token and leaves one more thread (and the HTTP connection it holds) behind: with stalled
upstreams the number of threads blocked in upstream reads grows without bound (200 abandoned
calls: 200 threads, with the bound at 128). On trio the same code keeps the token until the
thread returns (the bound holds there).

Fix direction: hold the reader's own token (acquire it on the reader, not through
``run_sync``'s limiter) until the worker thread's ``next()`` returns, e.g. a
``threading``-side release in `ThreadedIterator._read`'s ``finally`` (``limiter`` released from
the thread via ``anyio.from_thread`` / a token-per-thread scheme), so that a bound means what
the README says on both backends.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from chengeta_ai import CacheManager
from chengeta_ai.layers import upstream
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

BOUND = 4


class StalledUpstream:
    """Sync upstreams whose first ``next()`` blocks until released; counts reads in progress."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.blocked = 0
        self.peak = 0

    def __call__(self, messages: Any) -> Iterator[str]:
        return self._gen()

    def _gen(self) -> Iterator[str]:
        with self._lock:
            self.blocked += 1
            self.peak = max(self.peak, self.blocked)
        try:
            self.release.wait(30)
        finally:
            with self._lock:
                self.blocked -= 1
        yield "late"


@pytest.mark.anyio
async def test_abandoned_stalled_reads_stay_within_the_reader_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream, "UPSTREAM_READER_THREADS", BOUND)
    cache = StreamingResponseCache(CacheManager())
    stalled = StalledUpstream()
    try:
        for i in range(3 * BOUND):
            # a caller that gives up (a client gone, a timeout) while its upstream stalls
            with anyio.move_on_after(0.05):
                async for _ in cache.aget_or_stream([f"prompt {i}"], stalled):
                    pass
        await anyio.sleep(0.1)
        peak = stalled.peak
    finally:
        stalled.release.set()
        while stalled.blocked:
            await anyio.sleep(0.01)
    # observed on main (asyncio): 12 reads blocked at once in 12 threads, bound 4
    assert peak <= BOUND, f"{peak} threads blocked in upstream reads; the bound is {BOUND}"
