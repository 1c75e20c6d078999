"""StreamingResponseCache: hit replay, miss overhead and event-loop stalls (pytest-benchmark).

Run for real: ``pytest benches/bench_streaming.py -q -s`` on a release build (``make bench``);
smoke: ``pytest benches --benchmark-disable`` (every path once, sizes scaled down).

Each comparison interleaves chengeta_ai rounds with rounds of its baseline in the same process
(and, for async, the same event loop), reports medians, and records the figures and ratios in
``benchmark.extra_info``; the ``summary`` fixture (benches/conftest.py) prints them as a table.

- hit: replay of a stored stream vs a dict of key -> ``pickle.dumps(list_of_chunks)`` (a hit
  is ``pickle.loads`` then iterate). Time to first chunk and full-replay throughput.
- miss: a fresh key per round through a 5,000-chunk in-memory upstream vs iterating the same
  upstream directly: overhead per chunk (logging into the flight's ChunkLog, encoding for the
  store, storing at the end).
- Every timed call starts after an untimed ``gc.collect()`` (GC stays enabled while timing).
- stall: the largest gap of a 1 ms heartbeat task during a 5,000-chunk async miss and hit, with
  and without ``gc.freeze()``. No assertions on time anywhere.
"""

from __future__ import annotations

import gc
import pickle
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
    sync_upstream,
)
from tests.helpers import Heartbeat

from chengeta_ai.layers.streaming_cache import StreamingResponseCache


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn: Callable[[], Any]) -> float:
    """Wall time of one call. A collection first, untimed: garbage left by the other side of
    an interleaved comparison must not be collected on this side's clock."""
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


async def atimed(fn: Callable[[], Any]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# (a) hit replay vs list + pickle


def _store_hit(cache: StreamingResponseCache, messages: Any, items: list[Any]) -> None:
    got = list(cache.get_or_stream(messages, sync_upstream(items), model_id=MODEL))
    assert len(got) == len(items) and cache.stats()["stores"] == 1


@pytest.mark.parametrize("mode", ["sync", "asyncio", "trio"])
@pytest.mark.parametrize("n", [500, 5000])
def test_hit_replay(
    benchmark: Any, smoke: bool, summary: Callable[..., None], n: int, mode: str
) -> None:
    n = 50 if smoke else n
    rounds = 1 if smoke else (60 if n <= 500 else 15)
    items = chunks(n)
    cache = new_cache()
    messages = fresh_messages()
    _store_hit(cache, messages, items)
    pickled = {"key": pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)}
    never = sync_upstream([])  # a hit never calls it

    def ours_first() -> None:
        next(iter(cache.get_or_stream(messages, never, model_id=MODEL))).id  # noqa: B018

    def ours_full() -> None:
        for _ in cache.get_or_stream(messages, never, model_id=MODEL):
            pass

    def base_first() -> None:
        next(iter(pickle.loads(pickled["key"]))).id  # noqa: B018

    def base_full() -> None:
        for _ in pickle.loads(pickled["key"]):
            pass

    async def aours_first() -> None:
        agen = cache.aget_or_stream(messages, never, model_id=MODEL)
        await agen.__anext__()
        await agen.aclose()

    async def aours_full() -> None:
        async for _ in cache.aget_or_stream(messages, never, model_id=MODEL):
            pass

    async def abase_gen() -> AsyncIterator[Any]:
        for chunk in pickle.loads(pickled["key"]):
            yield chunk

    async def abase_first() -> None:
        agen = abase_gen()
        await agen.__anext__()
        await agen.aclose()

    async def abase_full() -> None:
        async for _ in abase_gen():
            pass

    t: dict[str, list[float]] = {"of": [], "bf": [], "ou": [], "ba": []}

    def run() -> None:
        if mode == "sync":
            for _ in range(rounds):  # interleaved: machine noise hits both sides alike
                t["of"].append(timed(ours_first))
                t["bf"].append(timed(base_first))
                t["ou"].append(timed(ours_full))
                t["ba"].append(timed(base_full))
            return

        async def main() -> None:
            for _ in range(rounds):
                t["of"].append(await atimed(aours_first))
                t["bf"].append(await atimed(abase_first))
                t["ou"].append(await atimed(aours_full))
                t["ba"].append(await atimed(abase_full))

        anyio.run(main, backend=mode)

    benchmark.pedantic(run, rounds=1, iterations=1)
    of, bf, ou, ba = (med(t[k]) for k in ("of", "bf", "ou", "ba"))
    assert cache.stats()["hits"] == 2 * rounds  # the store above was a miss
    info = {
        "chunks": n,
        "ttfc_us": of * 1e6,
        "pickle_ttfc_us": bf * 1e6,
        "ttfc_ratio": of / bf,
        "chunks_per_s": n / ou,
        "pickle_chunks_per_s": n / ba,
        "throughput_ratio": (n / ou) / (n / ba),
    }
    benchmark.extra_info.update(info)
    name = f"hit {n} chunks, {mode}"
    summary(
        f"{name}: time to first chunk",
        f"{of * 1e6:.0f} us",
        f"{bf * 1e6:.0f} us",
        f"{bf / of:.1f}x faster",
    )
    summary(
        f"{name}: replay throughput",
        f"{n / ou / 1e3:.0f} k chunks/s",
        f"{n / ba / 1e3:.0f} k chunks/s",
        f"{ba / ou:.2f}x",
    )
    print(f"\n{name}: {info}")


# ---------------------------------------------------------------------------------------------
# (b) miss overhead per chunk vs iterating the upstream directly


@pytest.mark.parametrize("mode", ["sync", "asyncio", "trio"])
def test_miss_overhead(
    benchmark: Any, smoke: bool, summary: Callable[..., None], mode: str
) -> None:
    n = 100 if smoke else 5000
    rounds = 1 if smoke else 15
    items = chunks(n)
    cache = new_cache()
    sync_fn, async_fn = sync_upstream(items), async_upstream(items)

    def ours() -> None:
        for _ in cache.get_or_stream(fresh_messages(), sync_fn, model_id=MODEL):
            pass

    def base() -> None:
        for _ in sync_fn(fresh_messages()):
            pass

    async def aours() -> None:
        async for _ in cache.aget_or_stream(fresh_messages(), async_fn, model_id=MODEL):
            pass

    async def abase() -> None:
        async for _ in async_fn(fresh_messages()):
            pass

    t: dict[str, list[float]] = {"ou": [], "ba": []}

    def run() -> None:
        if mode == "sync":
            for _ in range(rounds):
                t["ou"].append(timed(ours))
                t["ba"].append(timed(base))
            return

        async def main() -> None:
            for _ in range(rounds):
                t["ou"].append(await atimed(aours))
                t["ba"].append(await atimed(abase))

        anyio.run(main, backend=mode)

    benchmark.pedantic(run, rounds=1, iterations=1)
    ou, ba = med(t["ou"]), med(t["ba"])
    stats = cache.stats()
    assert stats["misses"] == rounds and stats["stores"] == rounds, stats
    per_chunk = (ou - ba) / n
    info = {
        "chunks": n,
        "ms": ou * 1e3,
        "upstream_ms": ba * 1e3,
        "overhead_us_per_chunk": per_chunk * 1e6,
        "ratio": ou / ba,
    }
    benchmark.extra_info.update(info)
    summary(
        f"miss {n} chunks, {mode}: per chunk (overhead {per_chunk * 1e6:.2f} us)",
        f"{ou / n * 1e6:.2f} us",
        f"{ba / n * 1e6:.2f} us",
        f"{ou / ba:.1f}x slower",
    )
    print(f"\nmiss {n}, {mode}: {info}")


# ---------------------------------------------------------------------------------------------
# (c) event-loop stalls: largest heartbeat gap during a 5,000-chunk async miss and hit


def _ballast(n: int) -> list[Any]:
    """Live objects standing in for a loaded application's heap (config, ORM rows, modules):
    a full (generation 2) collection walks every one of them."""
    return [{"id": i, "name": f"row{i}", "tags": [i]} for i in range(n)]


@pytest.mark.parametrize("mode", ["asyncio", "trio"])
@pytest.mark.parametrize("freeze", [False, True], ids=["no-freeze", "gc-freeze"])
def test_loop_stall(
    benchmark: Any, smoke: bool, summary: Callable[..., None], mode: str, freeze: bool
) -> None:
    n = 100 if smoke else 5000
    rounds = 1 if smoke else 7
    items = chunks(n)
    ballast = _ballast(10_000 if smoke else 300_000)
    cache = new_cache()
    async_fn = async_upstream(items)
    gaps: dict[str, list[float]] = {"miss": [], "hit": [], "idle": []}

    async def one(kind: str, messages: Any) -> None:
        beat = Heartbeat()
        kept: list[Any] = []  # the caller keeps the response, as an app assembling it would
        async with anyio.create_task_group() as tg:
            tg.start_soon(beat.run)
            await anyio.sleep(0.005)
            if kind == "idle":
                await anyio.sleep(0.02)
            else:
                async for chunk in cache.aget_or_stream(messages, async_fn, model_id=MODEL):
                    kept.append(chunk)
                assert len(kept) == n
            await anyio.sleep(0.003)
            beat.stop()
        gaps[kind].append(beat.max_gap)

    async def main() -> None:
        for _ in range(rounds):
            messages = fresh_messages()
            await one("idle", messages)
            await one("miss", messages)
            await one("hit", messages)

    def run() -> None:
        gc.collect()
        if freeze:
            gc.freeze()  # pre-existing objects move to the permanent generation
        try:
            anyio.run(main, backend=mode)
        finally:
            if freeze:
                gc.unfreeze()

    benchmark.pedantic(run, rounds=1, iterations=1)
    del ballast
    stats = cache.stats()
    assert stats["misses"] == rounds and stats["hits"] == rounds, stats
    info = {f"{k}_max_gap_ms": med(v) * 1e3 for k, v in gaps.items()}
    info.update({f"{k}_worst_gap_ms": max(v) * 1e3 for k, v in gaps.items()})
    benchmark.extra_info.update(info)
    label = "gc.freeze()" if freeze else "no freeze"
    for kind in ("miss", "hit"):
        summary(
            f"stall {n}-chunk {kind}, {mode}, {label}: max heartbeat gap (median; worst)",
            f"{med(gaps[kind]) * 1e3:.1f} ms; {max(gaps[kind]) * 1e3:.1f} ms",
            f"idle {med(gaps['idle']) * 1e3:.1f} ms",
            "-",
        )
    print(f"\nstall {mode} {label}: {info}")
