"""A blocking sync upstream inside ``aget_or_stream`` (issue 8, §3): read in a worker thread.

Two figures, each against a same-run reference, on asyncio and trio:

- loop gap: the largest gap seen by a task sleeping 1 ms in a loop while a miss reads a sync
  iterator whose every ``next()`` blocks for ``BLOCK`` seconds (``time.sleep``, as a socket read
  does). Ours: the iterator as ``stream_fn`` returns it (read in a worker thread). Reference:
  the same iterator read inline on the loop (what ``aget_or_stream`` did before: an async
  generator iterating it), and an idle loop.
- per-chunk cost of the thread hop, for a sync generator that does *not* block (in memory, but
  a generator cannot be told apart from one that does I/O): the miss's time per chunk, against
  the same chunks returned as a list (read inline) and as an async generator.

Run: ``pytest benches/bench_threaded_upstream.py -q -s``; smoke: ``--benchmark-disable``.
No assertions on time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import pytest
from benches.streams import MODEL, chunks, fresh_messages, new_cache
from tests.helpers import Heartbeat

BLOCK = 0.005


class Blocking:
    """A sync iterator whose ``next()`` blocks for ``BLOCK`` seconds, like a socket read."""

    def __init__(self, items: list[Any]) -> None:
        self.items = iter(items)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        time.sleep(BLOCK)
        return next(self.items)


@pytest.mark.parametrize("mode", ["asyncio", "trio"])
def test_loop_gap_with_a_blocking_sync_upstream(
    benchmark: Any, smoke: bool, summary: Callable[..., None], mode: str
) -> None:
    n = 5 if smoke else 40
    rounds = 1 if smoke else 3
    items = chunks(n)
    gaps: dict[str, list[float]] = {"threaded": [], "inline": [], "idle": []}

    async def inline(source: Blocking) -> AsyncIterator[Any]:
        for item in source:  # the old way: next() on the event loop
            yield item

    async def one(side: str) -> None:
        cache = new_cache()
        beat = Heartbeat()
        async with anyio.create_task_group() as tg:
            tg.start_soon(beat.run)
            await anyio.sleep(0.005)
            if side == "idle":
                await anyio.sleep(n * BLOCK)
            else:
                fn: Any = (lambda m: Blocking(items)) if side == "threaded" else None
                if side == "inline":
                    fn = lambda m: inline(Blocking(items))  # noqa: E731
                got = [c async for c in cache.aget_or_stream(fresh_messages(), fn, model_id=MODEL)]
                assert len(got) == n
            beat.stop()
        gaps[side].append(beat.max_gap * 1e3)

    async def main() -> None:
        for _ in range(rounds):
            for side in gaps:
                await one(side)

    benchmark.pedantic(lambda: anyio.run(main, backend=mode), rounds=1, iterations=1)
    med = {side: statistics.median(v) for side, v in gaps.items()}
    benchmark.extra_info.update({f"{side}_gap_ms": v for side, v in med.items()})
    print(
        f"\nloop gap, {n} chunks each blocking {BLOCK * 1e3:.0f} ms, {mode}: threaded "
        f"{med['threaded']:.2f} ms, inline {med['inline']:.2f} ms, idle {med['idle']:.2f} ms"
    )
    summary(
        f"loop gap, sync upstream blocking {BLOCK * 1e3:.0f} ms/chunk, {mode}",
        f"{med['threaded']:.2f} ms",
        f"inline {med['inline']:.2f} ms; idle {med['idle']:.2f} ms",
        f"{med['inline'] / med['threaded']:.1f}x smaller",
    )


@pytest.mark.parametrize("mode", ["asyncio", "trio"])
def test_thread_hop_per_chunk(
    benchmark: Any, smoke: bool, summary: Callable[..., None], mode: str
) -> None:
    n = 50 if smoke else 2000
    rounds = 1 if smoke else 5
    items = chunks(n)
    per_chunk: dict[str, list[float]] = {"generator": [], "list": [], "async generator": []}

    async def agen() -> AsyncIterator[Any]:
        for item in items:
            yield item

    makers: dict[str, Callable[[Any], Any]] = {
        "generator": lambda m: (c for c in items),
        "list": lambda m: items,
        "async generator": lambda m: agen(),
    }

    async def main() -> None:
        for _ in range(rounds):
            for side, make in makers.items():
                cache = new_cache()
                t0 = time.perf_counter()
                count = 0
                async for _ in cache.aget_or_stream(fresh_messages(), make, model_id=MODEL):
                    count += 1
                per_chunk[side].append((time.perf_counter() - t0) / n * 1e6)
                assert count == n

    benchmark.pedantic(lambda: anyio.run(main, backend=mode), rounds=1, iterations=1)
    med = {side: statistics.median(v) for side, v in per_chunk.items()}
    benchmark.extra_info.update({f"{side}_us_per_chunk": v for side, v in med.items()})
    print(
        f"\nmiss per chunk, {n} chunks, {mode}: sync generator (worker thread) "
        f"{med['generator']:.1f} us, list (inline) {med['list']:.1f} us, async generator "
        f"{med['async generator']:.1f} us"
    )
    summary(
        f"miss per chunk, sync generator read in a thread, {mode}",
        f"{med['generator']:.1f} us",
        f"list {med['list']:.1f} us; async gen {med['async generator']:.1f} us",
        f"+{med['generator'] - med['list']:.1f} us",
    )
