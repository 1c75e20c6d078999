"""Review s8 (the async hit's time-sliced turns): how long one unpaced hit holds the event loop.

Two schedules of the same replay, measured in the same process and event loop, rounds
interleaved: ``slice`` (the shipped one: a turn after the first chunk, then at a batch's end
when another task is ready to run, else once `REPLAY_SLICE` has passed) against ``per batch``
(`REPLAY_SLICE` set to 0: a turn after every decoded batch, the schedule before 2026-12-01).
Consumers never await anything of their own (the case the turns exist for). Figures (medians
over rounds):

- largest loop gap: the longest wait between two turns of a task that only awaits
  ``anyio.lowlevel.checkpoint()`` in a loop (what another request on a server would see);
- wall time of the whole round (what the turns cost);
- the other task's turns while the hits replay.

Scenarios: 100 concurrent hits of a 5,000-chunk OpenAI entry (fairness), and one hit of an
entry of large chunks (16 KB of text each: a decoded batch of 64 takes a millisecond or more).

Run for real: ``pytest benches/bench_hit_fairness.py -q -s`` (``make bench``); smoke mode
(``--benchmark-disable``) runs every path once on small sizes. No assertions on time.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from benches.streams import MODEL, async_upstream, chunks, fresh_messages, new_cache

from chengeta_ai.layers import streaming_cache

SCHEDULES = {"slice": streaming_cache.REPLAY_SLICE, "per batch": 0.0}


class Ticker:
    """Awaits a checkpoint in a loop and records the longest wait between two of its turns."""

    def __init__(self) -> None:
        self.max_gap = 0.0
        self.turns = 0
        self._stop = False

    async def run(self) -> None:
        clock = time.perf_counter
        last = clock()
        while not self._stop:
            await anyio.lowlevel.checkpoint()
            now = clock()
            self.max_gap = max(self.max_gap, now - last)
            self.turns += 1
            last = now

    def stop(self) -> None:
        self._stop = True


def row(summary: Callable[..., None], name: str, ours: float, base: float, unit: str) -> None:
    ratio = f"{ours / base:.2f}x" if base else "-"
    summary(name, f"{ours:.3f} {unit}", f"{base:.3f} {unit}", ratio)


def big_chunks(n: int, size: int) -> list[dict[str, Any]]:
    return [{"i": i, "text": f"{i:08d}" * (size // 8)} for i in range(n)]


def measure(
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    items: list[Any],
    hits: int,
    rounds: int,
) -> dict[str, dict[str, list[float]]]:
    cache = new_cache()
    messages = fresh_messages()
    never = async_upstream([])
    out: dict[str, dict[str, list[float]]] = {
        s: {"gap": [], "wall": [], "turns": []} for s in SCHEDULES
    }

    async def reader() -> None:
        got = 0
        async for _ in cache.aget_or_stream(messages, never, model_id=MODEL):
            got += 1  # never awaits anything of its own
        assert got == len(items)

    async def one(schedule: str) -> None:
        monkeypatch.setattr(streaming_cache, "REPLAY_SLICE", SCHEDULES[schedule])
        gc.collect()
        ticker = Ticker()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker.run)
            await anyio.sleep(0.002)
            t, turns = time.perf_counter(), ticker.turns
            async with anyio.create_task_group() as readers:
                for _ in range(hits):
                    readers.start_soon(reader)
            wall = time.perf_counter() - t
            turns = ticker.turns - turns
            ticker.stop()
        out[schedule]["gap"].append(ticker.max_gap * 1e3)
        out[schedule]["wall"].append(wall * 1e3)
        out[schedule]["turns"].append(float(turns))

    async def main() -> None:
        async for _ in cache.aget_or_stream(messages, async_upstream(items), model_id=MODEL):
            pass
        for _ in range(rounds):
            for schedule in SCHEDULES:
                await one(schedule)

    anyio.run(main, backend=mode)
    return out


def report(summary: Callable[..., None], name: str, out: dict[str, dict[str, list[float]]]) -> None:
    med = statistics.median
    s, b = out["slice"], out["per batch"]
    row(summary, f"{name}: largest loop gap (vs per batch)", med(s["gap"]), med(b["gap"]), "ms")
    row(summary, f"{name}: wall (vs per batch)", med(s["wall"]), med(b["wall"]), "ms")
    row(summary, f"{name}: ticker turns (vs per batch)", med(s["turns"]), med(b["turns"]), "")
    print(f"\n{name}: " + ", ".join(f"{k} {v}" for k, v in out.items()))


@pytest.mark.parametrize("mode", ["asyncio", "trio"])
def test_concurrent_hits_loop_gap(
    benchmark: Any,
    smoke: bool,
    summary: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    n, hits, rounds = (200, 5, 1) if smoke else (5000, 100, 5)
    items = chunks(n)
    result: dict[str, dict[str, list[float]]] = {}

    def run() -> None:
        result.update(measure(monkeypatch, mode, items, hits, rounds))

    benchmark.pedantic(run, rounds=1, iterations=1)
    report(summary, f"{hits} concurrent {n}-chunk openai hits, {mode}", result)


@pytest.mark.parametrize("mode", ["asyncio", "trio"])
def test_large_chunk_hit_loop_gap(
    benchmark: Any,
    smoke: bool,
    summary: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    n, size, rounds = (70, 1024, 1) if smoke else (320, 16 * 1024, 5)
    items = big_chunks(n, size)
    result: dict[str, dict[str, list[float]]] = {}

    def run() -> None:
        result.update(measure(monkeypatch, mode, items, 1, rounds))

    benchmark.pedantic(run, rounds=1, iterations=1)
    report(summary, f"one hit of {n} x {size // 1024} KB chunks, {mode}", result)
