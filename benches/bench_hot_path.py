"""The hot path (issue 7, item 4): per-chunk cost on the caller's path, hit time to first chunk,
and event-loop gaps with a consumer that keeps every chunk, against same-run references.

Run for real: ``pytest benches/bench_hot_path.py -q -s`` on a release build (``make bench``);
smoke: ``pytest benches --benchmark-disable`` (every path once, sizes scaled down). Against an
earlier commit: ``scripts/compare_commits.sh BASE`` runs this file there and here and prints
both side by side (set ``HOT_PATH_JSON=path`` to have a run write its figures as JSON).

References, all measured in the same process (and, for async, the same event loop), rounds
interleaved with ours, an untimed ``gc.collect()`` before each timed round, GC on while timing:

- ``upstream``: iterating the in-memory upstream directly (what any cache adds is on top).
- ``list``: a pickle-and-list cache written here (`ListPickleCache`): a miss appends each chunk
  to a list and pickles it at the end; a hit unpickles the list and replays it.
- ``cashews``: cashews' ``@cache.iterator`` on its in-memory backend (asyncio only: its memory
  backend schedules expiry with ``asyncio.create_task``, so it cannot run on trio): it stores a
  shallow copy of each chunk and hands the same live objects back on every hit.
- ``sdk``: reading the same stream through the openai SDK's own parsing path (``json.loads``
  of each SSE payload, then ``openai._models.construct_type``), which creates as many objects
  per chunk as a hit does: the yardstick for the garbage collector's share of a loop gap.

Figures (medians over rounds):

- caller's path, per chunk: ``(t_last - t_call) / n``, from the call to the last chunk in hand,
  per chunk (a miss: minus the same figure for the bare upstream); what happens after the last
  chunk (our store, the list's pickle) is reported apart as ``end`` (the store stall). Fixed
  per-call costs (key hashing, the backend read) are included, amortised over ``n``.
- time to first chunk: from the call to the first chunk in hand.
- loop gap: the largest gap seen by a task sleeping 1 ms in a loop while a consumer reads a
  hit, keeps every chunk, and awaits ``anyio.lowlevel.checkpoint()`` after each.
- full collections: generation-2 collections counted by ``gc.callbacks`` during the round.

No assertions on time anywhere.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import pickle
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from benches.streams import MODEL, async_upstream, chunks, fresh_messages, new_cache, sync_upstream

from chengeta_ai.testing import openai_chunk_dicts, openai_chunks, tokenize

MODES = ["sync", "asyncio", "trio"]
SIZES = [500, 5000]


# ---------------------------------------------------------------------------------------------
# plumbing


def med(xs: list[float]) -> float:
    return statistics.median(xs)


class FullCollections:
    """Counts generation-2 collections while installed (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and info["generation"] == 2:
            self.count += 1

    def __enter__(self) -> FullCollections:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


class Stamps:
    """Times of one round: call, first chunk, last chunk, end of iteration."""

    __slots__ = ("count", "end", "first", "full_gcs", "last", "start")

    def __init__(self) -> None:
        self.start = self.first = self.last = self.end = 0.0
        self.count = 0
        self.full_gcs = 0

    def per_chunk_us(self) -> float:
        return (self.last - self.start) / self.count * 1e6

    def ttfc_us(self) -> float:
        return (self.first - self.start) * 1e6

    def end_us(self) -> float:
        return (self.end - self.last) * 1e6


async def run_async(make: Callable[[], AsyncIterator[Any]]) -> Stamps:
    gc.collect()
    s = Stamps()
    clock = time.perf_counter
    with FullCollections() as fc:
        s.start = clock()
        agen = make()
        await agen.__anext__()
        s.first = clock()
        n = 1
        last = s.first
        async for _ in agen:
            n += 1
            last = clock()
        s.last = last
        s.end = clock()
    s.count, s.full_gcs = n, fc.count
    return s


def run_sync(make: Callable[[], Iterable[Any]]) -> Stamps:
    """One sync round; the end of iteration (where a sync miss stores) is timed apart."""
    gc.collect()
    s = Stamps()
    clock = time.perf_counter
    with FullCollections() as fc:
        s.start = clock()
        it = iter(make())
        next(it)
        s.first = clock()
        n = 1
        last = s.first
        for _ in it:
            n += 1
            last = clock()
        s.last = last
        s.end = clock()
    s.count, s.full_gcs = n, fc.count
    return s


_RESULTS: dict[str, float] = {}


def record(summary: Callable[..., None], name: str, ours: float, base: float, unit: str) -> None:
    """A summary row (ours vs a same-run reference) and the JSON figures."""
    _RESULTS[f"{name} | ours"] = ours
    _RESULTS[f"{name} | ref"] = base
    ratio = f"{ours / base:.2f}x" if base else "-"
    summary(name, f"{ours:.3f} {unit}", f"{base:.3f} {unit}", ratio)
    out = os.environ.get("HOT_PATH_JSON")
    if out:
        with open(out, "w") as f:
            json.dump(_RESULTS, f, indent=1, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# the references


class ListPickleCache:
    """The previous implementation's shape: collect the chunks in a list, pickle it at the end
    (the store stall), replay the unpickled list on a hit."""

    def __init__(self) -> None:
        self.store: dict[str, bytes] = {}

    def get_or_stream(self, key: str, stream_fn: Callable[[Any], Iterable[Any]]) -> Iterator[Any]:
        raw = self.store.get(key)
        if raw is not None:
            yield from pickle.loads(raw)
            return
        kept: list[Any] = []
        append = kept.append
        for chunk in stream_fn(key):
            append(chunk)
            yield chunk
        self.store[key] = pickle.dumps(kept, protocol=pickle.HIGHEST_PROTOCOL)

    async def aget_or_stream(
        self, key: str, stream_fn: Callable[[Any], AsyncIterator[Any]]
    ) -> AsyncIterator[Any]:
        raw = self.store.get(key)
        if raw is not None:
            for chunk in pickle.loads(raw):
                yield chunk
            return
        kept: list[Any] = []
        append = kept.append
        async for chunk in stream_fn(key):
            append(chunk)
            yield chunk
        self.store[key] = pickle.dumps(kept, protocol=pickle.HIGHEST_PROTOCOL)


def cashews_stream(items: list[Any]) -> Callable[[str], AsyncIterator[Any]]:
    """cashews' ``@cache.iterator`` over the in-memory backend, wrapping the async upstream."""
    from cashews import Cache

    cache = Cache()
    # size: the default (1,000 keys) evicts a long stream. check_interval=0: no sweeper task.
    # Its default one walks every key once a second (milliseconds for a 5,000-chunk stream),
    # one per cache left alive, and lands inside whichever round yields to the loop next: ours
    # (the list reference never yields), which inflated our asyncio figures several times over.
    # Expiry is still honoured on read.
    cache.setup("mem://", size=1_000_000, check_interval=0)

    @cache.iterator(ttl="1h", key="hot:{key}")
    async def stream(key: str) -> AsyncIterator[Any]:
        for item in items:
            yield item

    return stream


def sse_payloads(n: int) -> list[str]:
    """The SSE ``data:`` payloads of the same stream as `chunks` (n chunks)."""
    return [json.dumps(d) for d in openai_chunk_dicts(n - 2)]


def sdk_parse() -> Callable[[str], Any]:
    """What the openai SDK does per SSE event: ``json.loads``, then ``construct_type``."""
    from openai.types.chat import ChatCompletionChunk

    try:
        from openai._models import construct_type
    except ImportError:  # pragma: no cover - older SDKs

        def parse(line: str) -> Any:
            return ChatCompletionChunk.construct(**json.loads(line))

        return parse

    def parse(line: str) -> Any:
        return construct_type(type_=ChatCompletionChunk, value=json.loads(line))

    return parse


def str_chunks(n: int) -> list[str]:
    base = tokenize(
        "Caching stores the result of an expensive computation so that the next identical "
        "request can be answered without repeating the work."
    )
    return [base[i % len(base)] + ("" if i % 7 else " ") for i in range(n)]


def workload(kind: str, n: int) -> list[Any]:
    return chunks(n) if kind == "openai" else str_chunks(n)


# ---------------------------------------------------------------------------------------------
# miss: per-chunk cost on the caller's path


@pytest.mark.parametrize("kind", ["openai", "str"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mode", MODES)
def test_hot_miss(
    benchmark: Any, smoke: bool, summary: Callable[..., None], mode: str, n: int, kind: str
) -> None:
    n = 50 if smoke else n
    rounds = 1 if smoke else (15 if n <= 500 else 7)
    items = workload(kind, n)
    cache = new_cache()
    ref = ListPickleCache()
    sync_fn, async_fn = sync_upstream(items), async_upstream(items)
    stamps: dict[str, list[Stamps]] = {"upstream": [], "ours": [], "list": [], "cashews": []}

    def run() -> None:
        if mode == "sync":
            for _ in range(rounds):
                stamps["upstream"].append(run_sync(lambda: sync_fn(None)))
                stamps["ours"].append(
                    run_sync(lambda: cache.get_or_stream(fresh_messages(), sync_fn, model_id=MODEL))
                )
                key = str(fresh_messages())
                stamps["list"].append(run_sync(lambda k=key: ref.get_or_stream(k, sync_fn)))
            return

        async def main() -> None:
            for _ in range(rounds):
                stamps["upstream"].append(await run_async(lambda: async_fn(None)))
                stamps["ours"].append(
                    await run_async(
                        lambda: cache.aget_or_stream(fresh_messages(), async_fn, model_id=MODEL)
                    )
                )
                key = str(fresh_messages())
                stamps["list"].append(
                    await run_async(lambda k=key: ref.aget_or_stream(k, async_fn))
                )
                if mode != "asyncio":
                    continue
                cashews = cashews_stream(items)
                key = str(fresh_messages())
                stamps["cashews"].append(await run_async(lambda c=cashews, k=key: c(k)))

        anyio.run(main, backend=mode)

    benchmark.pedantic(run, rounds=1, iterations=1)
    stats = cache.stats()
    assert stats["misses"] == rounds and stats["stores"] == rounds, stats
    assert all(s.count == n for ss in stamps.values() for s in ss)
    up = med([s.per_chunk_us() for s in stamps["upstream"]])
    name = f"miss {n} {kind}, {mode}"
    for side in ("ours", "list", "cashews"):
        if stamps[side]:
            pc = med([s.per_chunk_us() for s in stamps[side]])
            benchmark.extra_info[f"{side}_us_per_chunk"] = pc - up
            benchmark.extra_info[f"{side}_end_us"] = med([s.end_us() for s in stamps[side]])
    ours = med([s.per_chunk_us() for s in stamps["ours"]]) - up
    lst = med([s.per_chunk_us() for s in stamps["list"]]) - up
    record(summary, f"{name}: caller's path, us/chunk over upstream (vs list)", ours, lst, "us")
    if stamps["cashews"]:
        cw = med([s.per_chunk_us() for s in stamps["cashews"]]) - up
        label = f"{name}: caller's path, us/chunk over upstream (vs cashews)"
        record(summary, label, ours, cw, "us")
    ours_end = med([s.end_us() for s in stamps["ours"]]) / 1e3
    list_end = med([s.end_us() for s in stamps["list"]]) / 1e3
    record(summary, f"{name}: end of stream (store), ms (vs list)", ours_end, list_end, "ms")
    print(f"\n{name}: {benchmark.extra_info} upstream {up:.3f} us/chunk")


# ---------------------------------------------------------------------------------------------
# hit: per-chunk replay cost, time to first chunk, full collections


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mode", MODES)
def test_hot_hit(
    benchmark: Any, smoke: bool, summary: Callable[..., None], mode: str, n: int
) -> None:
    n = 50 if smoke else n
    rounds = 1 if smoke else (25 if n <= 500 else 9)
    items = chunks(n)
    cache = new_cache()
    messages = fresh_messages()
    list(cache.get_or_stream(messages, sync_upstream(items), model_id=MODEL))
    assert cache.stats()["stores"] == 1
    never = sync_upstream([])
    ref = ListPickleCache()
    list(ref.get_or_stream("k", sync_upstream(items)))
    stamps: dict[str, list[Stamps]] = {"ours": [], "list": [], "cashews": []}
    # first hits (asyncio): of an entry this process has just stored, and of one it has never
    # validated (a class registered in between changes the registry generation, as for an
    # entry written by another process); each round's stream differs (seed), so its bytes do.
    cold: dict[str, list[Stamps]] = {"stored_here": [], "not_validated": []}
    fresh = [
        (chunks_seeded(n, seed), fresh_messages(), fresh_messages())
        for seed in range(1, (rounds if mode == "asyncio" else 0) + 1)
    ]

    def run() -> None:
        if mode == "sync":
            for _ in range(rounds):
                stamps["ours"].append(
                    run_sync(lambda: cache.get_or_stream(messages, never, model_id=MODEL))
                )
                stamps["list"].append(run_sync(lambda: ref.get_or_stream("k", never)))
            return

        async def main() -> None:
            cashews = cashews_stream(items) if mode == "asyncio" else None
            if cashews is not None:
                async for _ in cashews("k"):  # the miss that stores it
                    pass
            for _ in range(rounds):
                stamps["ours"].append(
                    await run_async(lambda: cache.aget_or_stream(messages, never, model_id=MODEL))
                )
                stamps["list"].append(await run_async(lambda: ref.aget_or_stream("k", never)))
                if cashews is not None:
                    stamps["cashews"].append(await run_async(lambda: cashews("k")))
            for items_i, here, other in fresh:
                for side, msgs in (("stored_here", here), ("not_validated", other)):
                    up = sync_upstream(items_i)
                    list(cache.get_or_stream(msgs, up, model_id=MODEL))  # the miss that stores
                    if side == "not_validated":
                        forget_validations()
                    cold[side].append(
                        await run_async(
                            lambda m=msgs: cache.aget_or_stream(m, never, model_id=MODEL)
                        )
                    )

        anyio.run(main, backend=mode)

    benchmark.pedantic(run, rounds=1, iterations=1)
    assert cache.stats()["hits"] == rounds + 2 * len(fresh)
    assert all(s.count == n for ss in (*stamps.values(), *cold.values()) for s in ss)
    name = f"hit {n} openai, {mode}"
    ours = stamps["ours"]
    for side, ss in stamps.items():
        if ss:
            benchmark.extra_info[f"{side}_us_per_chunk"] = med([s.per_chunk_us() for s in ss])
            benchmark.extra_info[f"{side}_us_per_chunk_min"] = min(s.per_chunk_us() for s in ss)
            benchmark.extra_info[f"{side}_ttfc_us"] = med([s.ttfc_us() for s in ss])
            benchmark.extra_info[f"{side}_full_gcs"] = med([float(s.full_gcs) for s in ss])
    pc = med([s.per_chunk_us() for s in ours])
    record(
        summary,
        f"{name}: us/chunk (vs list)",
        pc,
        med([s.per_chunk_us() for s in stamps["list"]]),
        "us",
    )
    record(
        summary,
        f"{name}: us/chunk, min over rounds (vs list)",
        min(s.per_chunk_us() for s in ours),
        min(s.per_chunk_us() for s in stamps["list"]),
        "us",
    )
    record(
        summary,
        f"{name}: full collections per replay (vs list)",
        med([float(s.full_gcs) for s in ours]),
        med([float(s.full_gcs) for s in stamps["list"]]),
        "",
    )
    if stamps["cashews"]:
        record(
            summary,
            f"{name}: us/chunk (vs cashews)",
            pc,
            med([s.per_chunk_us() for s in stamps["cashews"]]),
            "us",
        )
        record(
            summary,
            f"{name}: time to first chunk, ms (vs cashews)",
            med([s.ttfc_us() for s in ours]) / 1e3,
            med([s.ttfc_us() for s in stamps["cashews"]]) / 1e3,
            "ms",
        )
    for side, label in (
        ("stored_here", "first hit of an entry stored by this process"),
        ("not_validated", "first hit of an entry not validated in this process"),
    ):
        if cold[side] and stamps["cashews"]:
            ttfc = med([s.ttfc_us() for s in cold[side]]) / 1e3
            benchmark.extra_info[f"{side}_ttfc_us"] = ttfc * 1e3
            record(
                summary,
                f"{name}: time to first chunk, {label}, ms (vs cashews)",
                ttfc,
                med([s.ttfc_us() for s in stamps["cashews"]]) / 1e3,
                "ms",
            )
    print(f"\n{name}: {benchmark.extra_info}")


def chunks_seeded(n: int, seed: int) -> list[Any]:
    """``n`` chunks like `chunks` with another random stream (other ids and padding)."""
    return openai_chunks(n - 2, seed=seed)


_forgets = itertools.count()


def forget_validations() -> None:
    """Makes every entry unvalidated in this process, as one written by another process is:
    registering a class changes the registry generation the validation memo is keyed by."""
    from pydantic import BaseModel

    from chengeta_ai import register_model

    name = f"BenchCold{next(_forgets)}"
    register_model(type(name, (BaseModel,), {"__module__": __name__}))


# ---------------------------------------------------------------------------------------------
# loop gap: a consumer that keeps every chunk and awaits after each


class Heartbeat:
    """Sleeps 1 ms in a loop and records the largest gap between wake-ups."""

    def __init__(self) -> None:
        self.max_gap = 0.0
        self._stop = False

    async def run(self) -> None:
        clock = time.perf_counter
        last = clock()
        while not self._stop:
            await anyio.sleep(0.001)
            now = clock()
            self.max_gap = max(self.max_gap, now - last)
            last = now

    def stop(self) -> None:
        self._stop = True


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mode", ["asyncio", "trio"])
def test_hot_loop_gap(
    benchmark: Any, smoke: bool, summary: Callable[..., None], mode: str, n: int
) -> None:
    n = 50 if smoke else n
    rounds = 1 if smoke else 5
    items = chunks(n)
    payloads = sse_payloads(n)
    parse = sdk_parse()
    cache = new_cache()
    messages = fresh_messages()
    list(cache.get_or_stream(messages, sync_upstream(items), model_id=MODEL))
    never = sync_upstream([])
    ref = ListPickleCache()
    list(ref.get_or_stream("k", sync_upstream(items)))
    sides = ["idle", "ours", "ours_not_keeping", "list", "sdk"]
    if mode == "asyncio":
        sides.append("cashews")
    gaps: dict[str, list[float]] = {k: [] for k in sides}
    fulls: dict[str, list[float]] = {k: [] for k in sides}

    async def sdk_stream() -> AsyncIterator[Any]:
        for line in payloads:
            yield parse(line)

    async def one(side: str, cashews: Callable[[str], AsyncIterator[Any]] | None) -> None:
        gc.collect()
        beat = Heartbeat()
        kept: list[Any] = []
        keep = side != "ours_not_keeping"
        with FullCollections() as fc:
            async with anyio.create_task_group() as tg:
                tg.start_soon(beat.run)
                await anyio.sleep(0.005)
                if side == "idle":
                    await anyio.sleep(0.02)
                else:
                    if side in ("ours", "ours_not_keeping"):
                        agen = cache.aget_or_stream(messages, never, model_id=MODEL)
                    elif side == "list":
                        agen = ref.aget_or_stream("k", never)
                    elif side == "cashews":
                        assert cashews is not None
                        agen = cashews("k")
                    else:
                        agen = sdk_stream()
                    async for chunk in agen:
                        if keep:
                            kept.append(chunk)
                        await anyio.lowlevel.checkpoint()
                    assert not keep or len(kept) == n
                await anyio.sleep(0.003)
                beat.stop()
        gaps[side].append(beat.max_gap * 1e3)
        fulls[side].append(float(fc.count))

    async def main() -> None:
        cashews = cashews_stream(items) if mode == "asyncio" else None
        if cashews is not None:
            async for _ in cashews("k"):
                pass
        for _ in range(rounds):
            for side in sides:
                await one(side, cashews)

    benchmark.pedantic(lambda: anyio.run(main, backend=mode), rounds=1, iterations=1)
    name = f"loop gap {n} openai hit, {mode}, keeping consumer"
    for side in sides:
        benchmark.extra_info[f"{side}_gap_ms"] = med(gaps[side])
        benchmark.extra_info[f"{side}_worst_gap_ms"] = max(gaps[side])
        benchmark.extra_info[f"{side}_full_gcs"] = med(fulls[side])
    ours = med(gaps["ours"])
    for ref_side in ("idle", "cashews", "sdk", "list"):
        if ref_side not in gaps:
            continue
        record(summary, f"{name}: max gap ms (vs {ref_side})", ours, med(gaps[ref_side]), "ms")
    record(
        summary,
        f"{name}: max gap ms, not keeping (vs idle)",
        med(gaps["ours_not_keeping"]),
        med(gaps["idle"]),
        "ms",
    )
    record(
        summary,
        f"{name}: full collections (vs sdk)",
        med(fulls["ours"]),
        med(fulls["sdk"]),
        "",
    )
    print(f"\n{name}: {benchmark.extra_info}")
