"""In-flight fan-out: identical concurrent requests share one upstream stream.

Deterministic tests on asyncio, trio (real tasks) and threads, then a randomized schedule
checking the invariants.
"""

from __future__ import annotations

import os
import random
import threading
from contextlib import aclosing
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from tests.helpers import Boom, Upstream, collect

from chengeta_ai import CacheKeyBuilder, CacheManager, ConsumerLagged, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

MESSAGES = [{"role": "user", "content": "same prompt"}]

pytestmark = pytest.mark.anyio


def new_cache(**kwargs: Any) -> StreamingResponseCache:
    manager = CacheManager(backend=InMemoryBackend(), key_builder=CacheKeyBuilder())
    return StreamingResponseCache(manager, **kwargs)


def stored(cache: StreamingResponseCache, model_id: str = "default") -> Any:
    key = cache.manager.key_builder.build(MESSAGES, model_id, None)
    return cache.manager.get(key)


async def test_100_concurrent_callers_share_one_upstream() -> None:
    cache = new_cache()
    up = Upstream(list(range(200)), delay=0.0005)
    results: list[list[Any]] = []

    async def caller() -> None:
        results.append(await collect(cache.aget_or_stream(MESSAGES, up.asyncgen)))

    async with anyio.create_task_group() as tg:
        for _ in range(100):
            tg.start_soon(caller)
    assert up.calls == 1
    assert len(results) == 100
    assert all(r == list(range(200)) for r in results)
    stats = cache.stats()
    assert (stats["streams_led"], stats["joins"], stats["stores"]) == (1, 99, 1)
    assert stats["chunks_delivered"] == 100 * 200
    assert stored(cache) == list(range(200))
    assert stats["in_flight"] == 0


def test_threads_share_one_upstream() -> None:
    cache = new_cache()
    up = Upstream(list(range(300)), delay=0.0002)
    results: list[list[Any]] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def caller() -> None:
        start.wait()
        got = list(cache.get_or_stream(MESSAGES, up.sync))
        with lock:
            results.append(got)

    threads = [threading.Thread(target=caller) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert up.calls == 1
    assert len(results) == 16
    assert all(r == list(range(300)) for r in results)
    assert stored(cache) == list(range(300))


async def test_late_joiner_gets_the_whole_sequence() -> None:
    cache = new_cache()
    up = Upstream(list(range(50)), pause_at=20)
    up.gate = anyio.Event()
    results: dict[str, list[Any]] = {}

    async def first() -> None:
        results["first"] = await collect(cache.aget_or_stream(MESSAGES, up.asyncgen))

    async def late() -> None:
        results["late"] = await collect(cache.aget_or_stream(MESSAGES, up.asyncgen))

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        with anyio.fail_after(5):
            while up.produced < 20:
                await anyio.sleep(0.001)
        tg.start_soon(late)
        await anyio.sleep(0.01)
        up.gate.set()
    assert up.calls == 1
    assert results["first"] == results["late"] == list(range(50))


def test_late_joiner_thread_gets_the_whole_sequence() -> None:
    cache = new_cache()
    up = Upstream(list(range(50)), pause_at=20)
    results: dict[str, list[Any]] = {}
    t = threading.Thread(
        target=lambda: results.setdefault("first", list(cache.get_or_stream(MESSAGES, up.sync)))
    )
    t.start()
    while up.produced < 20:
        threading.Event().wait(0.001)
    joiner = threading.Thread(
        target=lambda: results.setdefault("late", list(cache.get_or_stream(MESSAGES, up.sync)))
    )
    joiner.start()
    threading.Event().wait(0.02)
    up.thread_gate.set()
    t.join(10)
    joiner.join(10)
    assert up.calls == 1
    assert results["first"] == results["late"] == list(range(50))


async def test_first_caller_cancelled_mid_stream_others_continue_and_store() -> None:
    cache = new_cache()
    up = Upstream(list(range(100)), pause_at=30)
    up.gate = anyio.Event()
    results: list[list[Any]] = []
    first_got: list[Any] = []

    async def first(scope_holder: list[anyio.CancelScope]) -> None:
        with anyio.CancelScope() as scope:
            scope_holder.append(scope)
            async for chunk in cache.aget_or_stream(MESSAGES, up.asyncgen):
                first_got.append(chunk)

    async def other() -> None:
        results.append(await collect(cache.aget_or_stream(MESSAGES, up.asyncgen)))

    holder: list[anyio.CancelScope] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(first, holder)
        await anyio.sleep(0.01)
        for _ in range(3):
            tg.start_soon(other)
        with anyio.fail_after(5):
            while len(first_got) < 30 or cache.stats()["joins"] < 3:
                await anyio.sleep(0.001)
        # the leader waits for chunk 30, which is seconds away: cancelling it returns at once
        t0 = anyio.current_time()
        holder[0].cancel()
        await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()
        assert anyio.current_time() - t0 < 0.5
        up.gate.set()
    assert first_got == list(range(30))
    assert results == [list(range(100))] * 3
    assert up.calls == 1
    assert stored(cache) == list(range(100))


async def test_consumer_that_never_reads_is_detached_by_default() -> None:
    cache = new_cache(max_lag=8)
    up = Upstream(list(range(100)))
    stuck = cache.aget_or_stream(MESSAGES, up.asyncgen)
    assert await stuck.__anext__() == 0  # attached, then never reads again
    with anyio.fail_after(5):
        got = await collect(cache.aget_or_stream(MESSAGES, up.asyncgen))
    assert got == list(range(100))
    assert cache.stats()["detaches"] >= 1
    # the laggard catches up from the retained log at its own pace
    assert [0] + await collect(stuck) == list(range(100))
    assert up.calls == 1
    assert stored(cache) == list(range(100))


async def test_wait_policy_holds_the_upstream_for_the_slowest_consumer() -> None:
    cache = new_cache(max_lag=8, slow_consumer="wait")
    up = Upstream(list(range(100)))
    slow = cache.aget_or_stream(MESSAGES, up.asyncgen)
    assert await slow.__anext__() == 0
    fast_got: list[Any] = []

    async def fast() -> None:
        async for chunk in cache.aget_or_stream(MESSAGES, up.asyncgen):
            fast_got.append(chunk)

    async with anyio.create_task_group() as tg:
        tg.start_soon(fast)
        await anyio.sleep(0.05)
        # the upstream is at most max_lag chunks ahead of the slow consumer (which read 1)
        assert up.produced <= 1 + 8
        assert len(fast_got) <= up.produced
        rest = await collect(slow)
    assert [0, *rest] == fast_got == list(range(100))
    assert cache.stats()["detaches"] == 0


def test_wait_policy_in_threads() -> None:
    cache = new_cache(max_lag=4, slow_consumer="wait")
    up = Upstream(list(range(40)))
    slow = cache.get_or_stream(MESSAGES, up.sync)
    assert next(slow) == 0
    fast_got: list[Any] = []
    t = threading.Thread(target=lambda: fast_got.extend(cache.get_or_stream(MESSAGES, up.sync)))
    t.start()
    threading.Event().wait(0.1)
    assert up.produced <= 1 + 4
    rest = list(slow)
    t.join(10)
    assert [0, *rest] == fast_got == list(range(40))
    assert up.calls == 1


async def test_upstream_error_reaches_every_consumer_and_the_next_call_retries() -> None:
    cache = new_cache()
    up = Upstream(list(range(50)), fail_at=25, delay=0.001)
    outcomes: list[Any] = []

    async def caller() -> None:
        got: list[Any] = []
        try:
            async for chunk in cache.aget_or_stream(MESSAGES, up.asyncgen):
                got.append(chunk)
        except Boom as exc:
            outcomes.append((got, type(exc)))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(caller)
    assert outcomes == [(list(range(25)), Boom)] * 5
    assert up.calls == 1
    assert cache.stats()["in_flight"] == 0
    assert stored(cache) is None
    up.fail_at = None
    assert await collect(cache.aget_or_stream(MESSAGES, up.asyncgen)) == list(range(50))
    assert up.calls == 2


def test_upstream_error_reaches_every_thread() -> None:
    cache = new_cache()
    up = Upstream(list(range(50)), fail_at=25, delay=0.001)
    outcomes: list[Any] = []
    barrier = threading.Barrier(4)

    def caller() -> None:
        got: list[Any] = []
        barrier.wait()
        try:
            for chunk in cache.get_or_stream(MESSAGES, up.sync):
                got.append(chunk)
        except Boom:
            outcomes.append(got)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert outcomes == [list(range(25))] * 4
    assert up.calls == 1


async def test_abandon_cancel_closes_the_upstream_and_stores_nothing() -> None:
    cache = new_cache(on_abandon="cancel")
    up = Upstream(list(range(100)), pause_at=10)
    up.gate = anyio.Event()
    agen = cache.aget_or_stream(MESSAGES, up.asyncgen)
    got = [await agen.__anext__() for _ in range(10)]
    await agen.aclose()
    with anyio.fail_after(5):
        while up.closed == 0:
            await anyio.sleep(0.001)
    assert got == list(range(10))
    assert up.completed == 0
    assert stored(cache) is None
    assert cache.stats()["abandoned_cancelled"] == 1
    assert cache.stats()["in_flight"] == 0


async def test_abandon_finish_reads_to_the_end_and_stores() -> None:
    cache = new_cache(on_abandon="finish")
    up = Upstream(list(range(100)), delay=0.0005)
    agen = cache.aget_or_stream(MESSAGES, up.asyncgen)
    assert await agen.__anext__() == 0
    await agen.aclose()
    with anyio.fail_after(5):
        while stored(cache) is None:
            await anyio.sleep(0.005)
    assert stored(cache) == list(range(100))
    assert cache.stats()["abandoned_finished"] == 1


def test_abandon_finish_in_threads() -> None:
    cache = new_cache(on_abandon="finish")
    up = Upstream(list(range(100)))
    gen = cache.get_or_stream(MESSAGES, up.sync)
    assert next(gen) == 0
    gen.close()
    for _ in range(500):
        if stored(cache) is not None:
            break
        threading.Event().wait(0.01)
    assert stored(cache) == list(range(100))


def test_abandon_cancel_in_threads() -> None:
    cache = new_cache()
    up = Upstream(list(range(100)))
    gen = cache.get_or_stream(MESSAGES, up.sync)
    assert next(gen) == 0
    gen.close()
    assert up.closed == 1
    assert stored(cache) is None
    assert cache.stats()["abandoned_cancelled"] == 1


async def test_oversized_stream_passes_through_and_new_callers_start_their_own() -> None:
    cache = new_cache(max_entry_bytes=500)
    up = Upstream([f"chunk-{i:04d}" for i in range(200)], pause_at=150)
    up.gate = anyio.Event()
    first: list[Any] = []

    async def leader() -> None:
        first.extend(await collect(cache.aget_or_stream(MESSAGES, up.asyncgen)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(leader)
        with anyio.fail_after(5):
            while up.produced < 150:
                await anyio.sleep(0.001)
        # over budget: not joinable any more, a new caller gets its own upstream
        up2 = Upstream(["x"])
        assert await collect(cache.aget_or_stream(MESSAGES, up2.asyncgen)) == ["x"]
        assert up2.calls == 1
        up.gate.set()
    assert first == [f"chunk-{i:04d}" for i in range(200)]
    assert cache.stats()["not_stored_oversized"] == 1
    assert cache.stats()["stores"] == 1, "only the small second stream"


async def test_laggard_behind_the_dropped_part_gets_consumer_lagged() -> None:
    cache = new_cache(max_entry_bytes=200, max_lag=4)
    up = Upstream([f"chunk-{i:04d}" for i in range(100)])
    laggard = cache.aget_or_stream(MESSAGES, up.asyncgen)
    assert await laggard.__anext__() == "chunk-0000"
    got = await collect(cache.aget_or_stream(MESSAGES, up.asyncgen))
    assert len(got) == 100
    with pytest.raises(ConsumerLagged, match="lagged"):
        await collect(laggard)
    assert cache.stats()["lag_errors"] == 1
    assert cache.manager.stats()["backend"]["entries"] == 0


async def test_bypass_does_not_join() -> None:
    cache = new_cache()
    up = Upstream(list(range(20)), delay=0.001)
    results: list[list[Any]] = []

    async def caller(bypass: bool) -> None:
        results.append(await collect(cache.aget_or_stream(MESSAGES, up.asyncgen, bypass=bypass)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller, False)
        await anyio.sleep(0.003)
        tg.start_soon(caller, True)
    assert up.calls == 2
    assert results == [list(range(20))] * 2


async def test_task_group_from_async_with() -> None:
    up = Upstream(list(range(30)))
    async with new_cache() as cache:
        assert await collect(cache.aget_or_stream(MESSAGES, up.asyncgen)) == list(range(30))
    assert stored(cache) == list(range(30))


@pytest.mark.parametrize("seed", range(int(os.environ.get("CHENGETA_RANDOM_SCHEDULES", "12"))))
async def test_random_schedules_keep_the_invariants(seed: int) -> None:
    """Random joins, reads, cancellations and upstream errors: every consumer that finishes saw
    the exact upstream sequence, one upstream at a time, the stored entry is the full stream."""
    rng = random.Random(seed)
    cache = new_cache(
        max_lag=rng.choice([1, 2, 8, 64]), slow_consumer=rng.choice(["wait", "detach"])
    )
    n = rng.randint(1, 120)
    fail_at = rng.choice([None, None, rng.randrange(n)])
    up = Upstream(list(range(n)), fail_at=fail_at)
    live = 0
    peak_live = 0

    class CountingUpstream:
        async def __call__(self, messages: Any) -> Any:
            nonlocal live, peak_live
            live += 1
            peak_live = max(peak_live, live)
            try:
                # aclosing: closing this generator must close the inner one too, not leave it
                # to the garbage collector
                async with aclosing(up.asyncgen(messages)) as inner:
                    async for chunk in inner:
                        await anyio.lowlevel.checkpoint()
                        yield chunk
            finally:
                live -= 1

    stream_fn = CountingUpstream()
    finished: list[list[Any]] = []

    async def consumer(stop_after: int | None, pause: float) -> None:
        got: list[Any] = []
        try:
            # aclosing: an async generator left early is otherwise closed only when collected
            async with aclosing(cache.aget_or_stream(MESSAGES, stream_fn)) as chunks:
                async for chunk in chunks:
                    got.append(chunk)
                    if pause:
                        await anyio.sleep(pause)
                    if stop_after is not None and len(got) >= stop_after:
                        return
        except Boom:
            assert got == list(range(len(got)))
            return
        finished.append(got)

    async with anyio.create_task_group() as tg:
        for _ in range(rng.randint(1, 30)):
            stop = rng.choice([None, None, rng.randint(1, n)])
            tg.start_soon(consumer, stop, rng.choice([0, 0, 0.0005]))
            if rng.random() < 0.5:
                await anyio.sleep(rng.choice([0, 0.0005, 0.002]))
        if rng.random() < 0.3:
            tg.cancel_scope.cancel()
    assert peak_live <= 1
    for got in finished:
        assert got == list(range(n))
    entry = stored(cache)
    assert entry is None or entry == list(range(n))
    # an abandoned flight holds its key until its upstream is closed, a moment later
    with anyio.fail_after(2):
        while cache.stats()["in_flight"]:
            await anyio.sleep(0.001)


@pytest.mark.parametrize("seed", range(int(os.environ.get("CHENGETA_RANDOM_SCHEDULES", "12"))))
def test_random_thread_schedules_keep_the_invariants(seed: int) -> None:
    """The same invariants with real threads: random joins, pauses, early exits, errors."""
    rng = random.Random(seed)
    cache = new_cache(
        max_lag=rng.choice([1, 2, 8, 64]),
        slow_consumer=rng.choice(["wait", "detach"]),
        on_abandon=rng.choice(["cancel", "finish"]),
    )
    n = rng.randint(1, 150)
    up = Upstream(list(range(n)), fail_at=rng.choice([None, None, rng.randrange(n)]))
    live = 0
    peak_live = 0
    live_lock = threading.Lock()

    def stream_fn(messages: Any) -> Any:
        nonlocal live, peak_live
        with live_lock:
            live += 1
            peak_live = max(peak_live, live)
        try:
            yield from up.sync(messages)
        finally:
            with live_lock:
                live -= 1

    finished: list[list[Any]] = []
    failures: list[BaseException] = []

    def consumer(stop_after: int | None, pause: float, start_delay: float) -> None:
        threading.Event().wait(start_delay)
        got: list[Any] = []
        gen = cache.get_or_stream(MESSAGES, stream_fn)
        try:
            for chunk in gen:
                got.append(chunk)
                if pause:
                    threading.Event().wait(pause)
                if stop_after is not None and len(got) >= stop_after:
                    gen.close()
                    return
        except Boom:
            if got != list(range(len(got))):
                failures.append(AssertionError(got))
            return
        except BaseException as exc:
            failures.append(exc)
            return
        finished.append(got)

    threads = [
        threading.Thread(
            target=consumer,
            args=(
                rng.choice([None, None, rng.randint(1, n)]),
                rng.choice([0, 0, 0.0002]),
                rng.choice([0, 0.0005, 0.002]),
            ),
        )
        for _ in range(rng.randint(1, 12))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
        assert not t.is_alive(), "a consumer thread is stuck (lost wake-up?)"
    assert not failures, failures
    assert peak_live <= 1
    for got in finished:
        assert got == list(range(n))
    for _ in range(2000):  # an abandoned "finish" stream is drained by a background thread
        if not cache.stats()["in_flight"]:
            break
        threading.Event().wait(0.001)
    assert cache.stats()["in_flight"] == 0
    entry = stored(cache)
    assert entry is None or entry == list(range(n))


async def test_a_pump_that_cannot_start_fails_its_caller_and_frees_the_key() -> None:
    async with anyio.create_task_group() as closed_group:
        pass  # exited: start_soon now raises
    manager = CacheManager()
    cache = StreamingResponseCache(manager, task_group=closed_group)
    up = Upstream([1, 2])
    for _ in range(2):  # the second caller must fail the same way, not join a dead flight
        with anyio.fail_after(2), pytest.raises(RuntimeError):
            await collect(cache.aget_or_stream(MESSAGES, up.asyncgen))
        assert cache.stats()["in_flight"] == 0


async def test_every_consumer_gets_the_upstream_traceback_not_a_growing_one() -> None:
    import traceback

    cache = new_cache()
    up = Upstream(list(range(10)), fail_at=5, delay=0.001)
    depths: list[int] = []

    async def caller() -> None:
        try:
            await collect(cache.aget_or_stream(MESSAGES, up.asyncgen))
        except Boom as exc:
            depths.append(len(traceback.extract_tb(exc.__traceback__)))

    async with anyio.create_task_group() as tg:
        for _ in range(30):
            tg.start_soon(caller)
    assert len(depths) == 30
    assert max(depths) < 15, depths


async def test_async_with_lets_the_body_exception_through_unwrapped() -> None:
    with pytest.raises(ValueError, match="mine"):
        async with new_cache():
            raise ValueError("mine")


async def test_abandoned_plain_iterable_upstream_is_closed() -> None:
    closed: list[bool] = []

    class SDKLikeStream:
        def __iter__(self) -> Any:
            return iter(range(100))

        def close(self) -> None:
            closed.append(True)

    cache = new_cache()
    agen = cache.aget_or_stream(MESSAGES, lambda m: SDKLikeStream())
    assert await agen.__anext__() == 0
    await agen.aclose()
    with anyio.fail_after(2):
        while not closed:
            await anyio.sleep(0.001)
    assert cache.stats()["abandoned_cancelled"] == 1


def test_chunk_log_record_encodes_appends_and_hands_over() -> None:
    """`ChunkLog.record`, a flight's whole per-chunk step: the bytes accounted are the ones
    the encoder added; the bits say taken / no headroom / encoder failed (the chunk is
    appended all the same, accounted as ``nbytes``, and the encoder says why)."""
    from chengeta_ai._core import ChunkLog, StreamEncoder

    log = ChunkLog(2, None)
    enc = StreamEncoder()
    leader = log.attach()
    assert leader is not None
    before = enc.nbytes
    assert log.record("hello", enc, 999, leader) == 2  # taken, headroom left
    assert log.retained_bytes == enc.nbytes - before
    assert enc.count == 1
    joiner = log.attach()
    assert joiner is not None
    # the joiner has read nothing: the leader takes the chunk, and the producer is now
    # max_lag (2) ahead of the joiner
    assert log.record("world", enc, 999, leader) == 2 | 8
    assert log.read(joiner, 10) == ["hello", "world"]
    # not encoded: accounted as given; nobody takes it; the joiner's read acknowledges only
    # its previous batch, so there is still no headroom
    assert log.record(3, None, 7, None) == 8
    retained = log.retained_bytes
    bad = object()
    assert log.record(bad, enc, 256, leader) == 4 | 8  # the leader had not read 3: not taken
    assert log.retained_bytes == retained + 256
    assert enc.error is not None and "unsupported type 'object'" in enc.error
    assert log.read(leader, 10) == [3, bad]
    assert log.end == 4
