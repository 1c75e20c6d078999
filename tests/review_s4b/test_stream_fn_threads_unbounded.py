"""Review s4b, finding: the new stream_fn thread hop is not bounded on asyncio (MEDIUM).

Fix c17434a made ``aget_or_stream`` call a plain (not known-async) ``stream_fn`` in a worker
thread (`chengeta_ai.layers.fanout._call_in_thread`), so that the sync SDK's ``create(...,
stream=True)``, which blocks until the response head, does not freeze the loop. It calls
``anyio.to_thread.run_sync(call, abandon_on_cancel=True)`` with anyio's *default* limiter. On
asyncio anyio gives that token back at the cancel, while the abandoned thread keeps blocking in
``stream_fn``: exactly the defect fd64d93 fixed for the upstream reader threads
(`upstream._Readers` / `_ReadGate`), left open in the new hop. Every caller that leaves (a
client disconnecting, ``fail_after`` around a call to an upstream that hangs before its head,
a retry loop) while ``stream_fn`` blocks leaves one more thread (and the HTTP connection it
holds, for up to the SDK's 600 s default timeout) behind: the threads grow without bound. With
the default limiter at 4 for the test, 12 abandoned calls leave 12 threads blocked in
``stream_fn`` on asyncio (trio keeps the token until the thread returns: 4).

The hop also draws from the application-wide default limiter (40 tokens) that anyio users, and
chengeta_ai itself (SQLiteBackend's async twins, joiners), share: misses stuck before their
head starve unrelated ``to_thread`` work.

Fix direction: give the stream_fn hop its own bound held until the thread's call returns (the
`_Readers` / `_ReadGate` scheme of `chengeta_ai.layers.upstream`, or the same bound), not
anyio's default limiter.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import anyio.to_thread
import pytest

from chengeta_ai import CacheManager
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

BOUND = 4


class HangingCreate:
    """A plain stream_fn that blocks like the sync SDK's ``create(stream=True)`` against an
    upstream that never sends its head; counts the calls blocked at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.blocked = 0
        self.peak = 0

    def __call__(self, messages: Any) -> list[str]:
        with self._lock:
            self.blocked += 1
            self.peak = max(self.peak, self.blocked)
        try:
            self.release.wait(30)
        finally:
            with self._lock:
                self.blocked -= 1
        return ["late"]


@pytest.mark.anyio
async def test_abandoned_stream_fn_calls_stay_within_a_thread_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the fix gives the hop the upstream readers' own bound (not anyio's default limiter,
    # which the version of this test on main lowered to 4)
    from chengeta_ai.layers import upstream

    monkeypatch.setattr(upstream, "UPSTREAM_READER_THREADS", BOUND)
    cache = StreamingResponseCache(CacheManager())
    create = HangingCreate()
    try:
        for i in range(3 * BOUND):
            # a caller that gives up (a timeout, a client gone) while the upstream hangs
            with anyio.move_on_after(0.05):
                async for _ in cache.aget_or_stream([f"prompt {i}"], create):
                    pass
        await anyio.sleep(0.1)
        peak = create.peak
    finally:
        create.release.set()
        while create.blocked:
            await anyio.sleep(0.01)
    # observed on main (asyncio): 12 threads blocked in stream_fn at once, the bound 4
    assert peak <= BOUND, f"{peak} threads blocked in stream_fn; the thread bound is {BOUND}"


@pytest.mark.anyio
async def test_misses_waiting_for_their_head_do_not_hold_up_hits(tmp_path: Any) -> None:
    """The hop shares anyio's default limiter with the backends' async twins (SQLiteBackend's
    ``aget`` runs ``get`` through it) and with the flight's store (``prepare_entry``): misses
    whose sync ``create`` waits for a slow head (a loaded server queueing requests) take every
    token, and a hit on another key, already stored, waits for them. 2 tokens here (40 by
    default: 40 slow misses do the same). Observed on main: the hit is not served while the
    misses wait (it gets its token only when a miss returns)."""
    from chengeta_ai import SQLiteBackend

    anyio.to_thread.current_default_thread_limiter().total_tokens = 2
    backend = SQLiteBackend(str(tmp_path / "cache.db"))
    cache = StreamingResponseCache(CacheManager(backend=backend))
    assert [c async for c in cache.aget_or_stream(["stored"], lambda m: ["s"])] == ["s"]
    create = HangingCreate()
    served: list[str] = []
    try:
        async with anyio.create_task_group() as tg:
            for i in range(2):

                async def miss(i: int = i) -> None:
                    async for _ in cache.aget_or_stream([f"slow {i}"], create):
                        pass

                tg.start_soon(miss)
            while create.blocked < 2:
                await anyio.sleep(0.01)
            with anyio.move_on_after(5):  # a liveness bound, far above a hit's cost
                served = [c async for c in cache.aget_or_stream(["stored"], lambda m: ["x"])]
            create.release.set()
    finally:
        create.release.set()
        backend.close()
    assert served == ["s"], "a hit waited for misses blocked before their head"
