"""Fan-out: one upstream to K consumers through `aget_or_stream` (pytest-benchmark).

Run for real: ``pytest benches/bench_fanout.py -q -s`` on a release build (``make bench``);
smoke: ``pytest benches --benchmark-disable`` (every path once, sizes scaled down).

- throughput: K concurrent tasks call ``aget_or_stream`` with the same messages (the first
  leads, the rest join its flight) over a 1,000-chunk upstream; chunk deliveries per second
  (K * 1,000 / wall time), on asyncio and trio. Baseline, measured in the same event loop,
  interleaved: a producer task sending every chunk to K anyio memory object streams
  (``max_buffer_size=64``), each drained by its own receiver task. Issue #3's target: >= 10x
  the baseline at K = 1,000. chengeta_ai also encodes and stores the stream; the baseline
  does not.
- latency: a paced upstream (one chunk per ~1 ms) stamps each chunk when it yields it; every
  consumer stamps it on receipt; p50 / p99 of the difference over all deliveries.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest
from benches.streams import (
    MODEL,
    async_upstream,
    chunks,
    fresh_messages,
    new_cache,
)

from chengeta_ai.layers.streaming_cache import StreamingResponseCache


async def fan_out_cache(cache: StreamingResponseCache, items: list[Any], k: int) -> float:
    """K concurrent callers of one key; returns the wall time until every one has all chunks."""
    messages = fresh_messages()
    stream_fn = async_upstream(items)
    counts = [0] * k

    async def consumer(i: int) -> None:
        n = 0
        async for _ in cache.aget_or_stream(messages, stream_fn, model_id=MODEL):
            n += 1
        counts[i] = n

    gc.collect()  # untimed: the other side's garbage is not collected on this side's clock
    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(k):
            tg.start_soon(consumer, i)
    elapsed = time.perf_counter() - t0
    assert counts == [len(items)] * k
    return elapsed


async def fan_out_streams(items: list[Any], k: int) -> float:
    """The baseline: one memory object stream per consumer, fed by one producer task."""
    pairs = [anyio.create_memory_object_stream[Any](max_buffer_size=64) for _ in range(k)]
    counts = [0] * k

    async def producer() -> None:
        sends = [s for s, _ in pairs]
        try:
            for item in items:
                for s in sends:
                    await s.send(item)
        finally:
            for s in sends:
                s.close()

    async def consumer(i: int) -> None:
        n = 0
        async with pairs[i][1] as recv:
            async for _ in recv:
                n += 1
        counts[i] = n

    gc.collect()  # untimed: the other side's garbage is not collected on this side's clock
    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(k):
            tg.start_soon(consumer, i)
        tg.start_soon(producer)
    elapsed = time.perf_counter() - t0
    assert counts == [len(items)] * k
    return elapsed


@pytest.mark.parametrize("mode", ["asyncio", "trio"])
@pytest.mark.parametrize("k", [1, 10, 100, 1000])
def test_fanout_throughput(
    benchmark: Any, smoke: bool, summary: Callable[..., None], k: int, mode: str
) -> None:
    n = 20 if smoke else 1000
    rounds = 1 if smoke else (7 if k <= 100 else 3)
    items = chunks(n)
    cache = new_cache()
    t: dict[str, list[float]] = {"ours": [], "base": []}

    async def main() -> None:
        for _ in range(rounds):  # interleaved: machine noise hits both sides alike
            t["ours"].append(await fan_out_cache(cache, items, k))
            t["base"].append(await fan_out_streams(items, k))

    benchmark.pedantic(lambda: anyio.run(main, backend=mode), rounds=1, iterations=1)
    stats = cache.stats()
    assert stats["streams_led"] == rounds and stats["misses"] == rounds, stats
    ours, base = statistics.median(t["ours"]), statistics.median(t["base"])
    rate, base_rate = k * n / ours, k * n / base
    info = {
        "k": k,
        "chunks": n,
        "deliveries_per_s": rate,
        "baseline_deliveries_per_s": base_rate,
        "ratio": rate / base_rate,
        "joins": stats["joins"],
        "hits": stats["hits"],
    }
    benchmark.extra_info.update(info)
    summary(
        f"fan-out K={k}, {n} chunks, {mode}: deliveries/s",
        f"{rate / 1e6:.2f} M/s",
        f"{base_rate / 1e6:.3f} M/s",
        f"{rate / base_rate:.1f}x",
    )
    print(f"\nfan-out K={k} {mode}: {info}")


# ---------------------------------------------------------------------------------------------
# latency: upstream yield -> consumer receipt, paced upstream


def paced_upstream(items: list[Any], stamps: list[float], pace: float) -> Callable[[Any], Any]:
    async def stream_fn(messages: Any) -> AsyncIterator[Any]:
        for item in items:
            await anyio.sleep(pace)
            stamps.append(time.perf_counter())
            yield item

    return stream_fn


async def latency_cache(
    cache: StreamingResponseCache, items: list[Any], k: int, pace: float
) -> list[float]:
    messages = fresh_messages()
    stamps: list[float] = []
    stream_fn = paced_upstream(items, stamps, pace)
    lat: list[float] = []

    async def consumer() -> None:
        i = 0
        async for _ in cache.aget_or_stream(messages, stream_fn, model_id=MODEL):
            lat.append(time.perf_counter() - stamps[i])
            i += 1

    async with anyio.create_task_group() as tg:
        for _ in range(k):
            tg.start_soon(consumer)
    assert len(lat) == k * len(items)
    return lat


async def latency_streams(items: list[Any], k: int, pace: float) -> list[float]:
    pairs = [anyio.create_memory_object_stream[Any](max_buffer_size=64) for _ in range(k)]
    stamps: list[float] = []
    lat: list[float] = []

    async def producer() -> None:
        sends = [s for s, _ in pairs]
        try:
            async for item in paced_upstream(items, stamps, pace)(None):
                for s in sends:
                    await s.send(item)
        finally:
            for s in sends:
                s.close()

    async def consumer(recv: Any) -> None:
        i = 0
        async with recv:
            async for _ in recv:
                lat.append(time.perf_counter() - stamps[i])
                i += 1

    async with anyio.create_task_group() as tg:
        for _, recv in pairs:
            tg.start_soon(consumer, recv)
        tg.start_soon(producer)
    assert len(lat) == k * len(items)
    return lat


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


@pytest.mark.parametrize("mode", ["asyncio", "trio"])
@pytest.mark.parametrize("k", [1, 100, 1000])
def test_fanout_latency(
    benchmark: Any, smoke: bool, summary: Callable[..., None], k: int, mode: str
) -> None:
    n = 10 if smoke else 300
    pace = 0.001
    items = chunks(n)
    cache = new_cache()
    lat: dict[str, list[float]] = {}

    async def main() -> None:
        gc.collect()
        lat["ours"] = await latency_cache(cache, items, k, pace)
        gc.collect()
        lat["base"] = await latency_streams(items, k, pace)

    benchmark.pedantic(lambda: anyio.run(main, backend=mode), rounds=1, iterations=1)
    o50, o99 = pct(lat["ours"], 0.5), pct(lat["ours"], 0.99)
    b50, b99 = pct(lat["base"], 0.5), pct(lat["base"], 0.99)
    info = {
        "k": k,
        "chunks": n,
        "pace_ms": pace * 1e3,
        "p50_us": o50 * 1e6,
        "p99_us": o99 * 1e6,
        "baseline_p50_us": b50 * 1e6,
        "baseline_p99_us": b99 * 1e6,
    }
    benchmark.extra_info.update(info)
    summary(
        f"latency yield->receipt K={k}, 1 chunk/ms, {mode}: p50 / p99",
        f"{o50 * 1e6:.0f} / {o99 * 1e6:.0f} us",
        f"{b50 * 1e6:.0f} / {b99 * 1e6:.0f} us",
        f"{b99 / o99:.1f}x (p99)",
    )
    print(f"\nlatency K={k} {mode}: {info}")
