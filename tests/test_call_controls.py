"""Per-call controls (`CacheControl`) and status (`cache_info`), on sync, threads, asyncio, trio.

Simple behaviours run one body on every twin through `drive`; the races (``no_cache`` while
others join, ``only_if_cached`` during an in-flight miss, a ``no_store`` leader with storing
joiners) have a sync body on real threads and an async body run on asyncio and trio.
"""

from __future__ import annotations

import gc
import itertools
import threading
import time
from typing import Any

import anyio
import pytest
from tests.helpers import Boom, Upstream, collect

from chengeta_ai import (
    CacheControl,
    CacheInfo,
    CacheManager,
    CacheMiss,
    ChengetaError,
    InMemoryBackend,
    PickleSerializer,
)
from chengeta_ai.core.cache_manager import frame, unframe_entry
from chengeta_ai.layers.call_controls import AsyncCacheStream, CacheStream
from chengeta_ai.layers.streaming_cache import StreamingResponseCache
from chengeta_ai.testing import openai_chunks

M = [{"role": "user", "content": "hello"}]
A = ["a1", "a2", "a3", "a4"]
B = ["b1", "b2", "b3", "b4"]


@pytest.fixture(params=["sync", "asyncio", "trio"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def new_cache(**kwargs: Any) -> StreamingResponseCache:
    return StreamingResponseCache(CacheManager(backend=InMemoryBackend()), **kwargs)


def drive(
    mode: str,
    cache: StreamingResponseCache,
    upstream: Upstream,
    *,
    stop_after: int | None = None,
    **kwargs: Any,
) -> tuple[list[Any], CacheInfo | None, CacheInfo | None]:
    """One call: ``(chunks, cache_info after the first chunk, cache_info at the end)``."""
    first_info: list[CacheInfo | None] = []
    if mode == "sync":
        out: list[Any] = []
        stream = cache.get_or_stream(M, upstream.sync, **kwargs)
        assert isinstance(stream, CacheStream)
        assert stream.cache_info is None  # nothing happens before iteration
        for chunk in stream:
            if not out:
                first_info.append(stream.cache_info)
            out.append(chunk)
            if stop_after is not None and len(out) >= stop_after:
                stream.close()
                break
        return out, (first_info or [None])[0], stream.cache_info

    async def main() -> tuple[list[Any], CacheInfo | None, CacheInfo | None]:
        stream = cache.aget_or_stream(M, upstream.asyncgen, **kwargs)
        assert isinstance(stream, AsyncCacheStream)
        assert stream.cache_info is None
        got: list[Any] = []
        async for chunk in stream:
            if not got:
                first_info.append(stream.cache_info)
            got.append(chunk)
            if stop_after is not None and len(got) >= stop_after:
                await stream.aclose()
                break
        return got, (first_info or [None])[0], stream.cache_info

    return anyio.run(main, backend=mode)


# -- cache_info ------------------------------------------------------------------------------


def test_miss_then_hit_report_status_key_age_and_outcome(mode: str) -> None:
    cache = new_cache()
    up = Upstream(A)
    got, first, last = drive(mode, cache, up)
    assert got == A
    assert first is not None and first.status == "miss" and first.outcome is None
    assert first.stored is None and not first.done
    assert last == CacheInfo("miss", first.key, None, "stored")
    assert last.stored is True and last.done
    assert first.key == cache.manager.key_builder.build(M, "default")

    got, first, last = drive(mode, cache, up)
    assert got == A and up.calls == 1
    assert first is not None and first.status == "hit" and first.outcome is None
    assert first.age is not None and 0 <= first.age < 60
    assert last is not None and last.outcome == "replayed" and last.stored is False


def test_bypass_and_errors_and_early_exit_outcomes(mode: str) -> None:
    cache = new_cache()
    _, first, last = drive(mode, cache, Upstream(A), bypass=True)
    assert first is not None and first.status == "bypass"
    assert last is not None and last.outcome == "bypass"

    _, _, last = drive(mode, cache, Upstream(A), stop_after=1)
    assert last is not None and last.status == "miss" and last.outcome == "abandoned"

    failing = Upstream(A, fail_at=2)
    info: list[CacheInfo | None] = []
    with pytest.raises(Boom):
        if mode == "sync":
            stream = cache.get_or_stream(M, failing.sync, model_id="failing")
            try:
                for _ in stream:
                    pass
            finally:
                info.append(stream.cache_info)
        else:

            async def main() -> None:
                stream = cache.aget_or_stream(M, failing.asyncgen, model_id="failing")
                try:
                    await collect(stream)
                finally:
                    info.append(stream.cache_info)

            anyio.run(main, backend=mode)
    assert info[0] is not None and info[0].outcome == "error"
    assert cache.stats().upstream_errors == 1


def test_not_stored_reasons_reach_cache_info(mode: str) -> None:
    cache = new_cache(max_entry_bytes=200)
    _, _, last = drive(mode, cache, Upstream([str(i) * 60 for i in range(10)]))
    assert last is not None and last.outcome == "oversized"
    cache = new_cache(is_complete=lambda chunks: False)
    _, _, last = drive(mode, cache, Upstream(A))
    assert last is not None and last.outcome == "incomplete"


def test_the_stream_is_still_a_plain_iterator_and_hands_out_its_generator() -> None:
    cache = new_cache()
    up = Upstream(A)
    stream = cache.get_or_stream(M, up.sync)
    inner = iter(stream)
    assert inner is iter(stream) and inner is not stream
    assert next(stream) == "a1"  # __next__ works too
    assert list(inner) == A[1:]
    assert stream.cache_info is not None and stream.cache_info.outcome == "stored"


def test_dropping_the_stream_after_break_closes_the_upstream_at_once() -> None:
    """The wrapper adds no reference cycle: leaving the loop and dropping the stream detaches
    the consumer and cancels the upstream exactly as dropping the bare generator did."""
    cache = new_cache()
    up = Upstream(A)
    gc.disable()  # only reference counting may close it
    try:
        for chunk in cache.get_or_stream(M, up.sync):
            assert chunk == "a1"
            break
        assert up.closed == 1
        assert len(cache.flights) == 0
        stream = cache.get_or_stream(M, up.sync)
        next(stream)
        del stream
        assert up.closed == 2
    finally:
        gc.enable()
    assert cache.stats().abandoned_cancelled == 2 and cache.stats().stores == 0


@pytest.mark.anyio
async def test_async_stream_aclose_and_anext_work_on_the_inner_generator() -> None:
    cache = new_cache()
    up = Upstream(A)
    stream = cache.aget_or_stream(M, up.asyncgen)
    assert await stream.__anext__() == "a1"
    assert stream.cache_info is not None and stream.cache_info.status == "miss"
    await stream.aclose()
    assert stream.cache_info is not None and stream.cache_info.outcome == "abandoned"
    await anyio.sleep(0.01)
    assert up.closed == 1 and len(cache.flights) == 0


# -- CacheControl ----------------------------------------------------------------------------


def test_cache_control_accepts_a_mapping_and_refuses_unknown_keys() -> None:
    assert CacheControl.coerce({"no_store": True}) == CacheControl(no_store=True)
    with pytest.raises(TypeError, match="unknown cache_control keys \\['no_stor'\\]"):
        CacheControl.coerce({"no_stor": True})
    with pytest.raises(TypeError, match="cache_control must be"):
        CacheControl.coerce(["no_store"])  # type: ignore[arg-type]
    cache = new_cache()
    with pytest.raises(TypeError, match="unknown cache_control keys"):
        cache.get_or_stream(M, Upstream(A).sync, cache_control={"nocache": True})
    with pytest.raises(TypeError, match="unknown cache_control keys"):
        cache.aget_or_stream(M, Upstream(A).asyncgen, cache_control={"nocache": True})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"no_cache": True, "only_if_cached": True}, ValueError, "contradict"),
        ({"no_store": 1}, TypeError, "must be a bool"),
        ({"ttl": -1}, ValueError, "ttl"),
        ({"tags": "one"}, TypeError, "tags"),
        ({"namespace": "a:b"}, ValueError, "namespace"),
        ({"namespace": ""}, TypeError, "namespace"),
        ({"replay": "fast"}, ValueError, "replay"),
        ({"speed": 0}, ValueError, "speed"),
        ({"speed": float("inf")}, ValueError, "speed"),
        # review: huge ints overflowed float conversion (OverflowError, not a clear error)
        ({"speed": 10**400}, ValueError, "speed"),
        ({"ttl": 10**400}, ValueError, "ttl"),
        ({"ttl": 1e300}, ValueError, "ttl"),  # beyond what a backend can expire
        # review: a mapping was taken as its keys, silently
        ({"tags": {"x": 1}}, TypeError, "tags"),
        # review: control characters and unbounded labels went into keys and logs
        ({"namespace": "a\nb"}, ValueError, "namespace"),
        ({"namespace": "a\x00b"}, ValueError, "namespace"),
        ({"namespace": "t" * 257}, ValueError, "namespace"),
    ],
)
def test_bad_controls_raise_at_construction(
    kwargs: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        CacheControl(**kwargs)


def test_edge_controls_that_are_fine() -> None:
    assert CacheControl(namespace="tenant-\u00e9\u4e2d 42").namespace == "tenant-\u00e9\u4e2d 42"
    assert CacheControl(namespace="t" * 256).namespace == "t" * 256
    assert CacheControl(ttl=10**9).ttl == 1e9  # about 32 years
    assert CacheControl(tags={"b"}).tags == ("b",)  # a set of tags is a collection of tags
    assert CacheControl(speed=10**6).speed == 1e6


def test_controls_conflicting_with_arguments_raise_at_the_call() -> None:
    cache = new_cache()
    up = Upstream(A)
    with pytest.raises(ValueError, match="contradict"):
        cache.get_or_stream(M, up.sync, bypass=True, cache_control={"only_if_cached": True})
    with pytest.raises(TypeError, match="ttl given twice"):
        cache.get_or_stream(M, up.sync, ttl=5, cache_control={"ttl": 6})
    with pytest.raises(TypeError, match="tags given twice"):
        cache.get_or_stream(M, up.sync, tags=["a"], cache_control={"tags": ["b"]})
    assert up.calls == 0


def test_ttl_tags_and_namespace_from_the_control(mode: str) -> None:
    cache = new_cache()
    up = Upstream(A)
    _, _, plain = drive(mode, cache, up)
    control = CacheControl(namespace="tenant-1", tags=("t1",), ttl=30)
    _, first, tenant = drive(mode, cache, up, cache_control=control)
    assert first is not None and first.status == "miss"  # a different key: not the plain one
    assert plain is not None and tenant is not None and tenant.key != plain.key
    assert tenant.key.startswith("chengeta:stream:tenant-1:")
    assert up.calls == 2
    _, first, _ = drive(mode, cache, up, cache_control={"namespace": "tenant-1"})
    assert first is not None and first.status == "hit"
    assert cache.manager.invalidate("t1") == 1
    _, first, _ = drive(mode, cache, up, cache_control={"namespace": "tenant-2"})
    assert first is not None and first.status == "miss"


def test_no_store_reads_but_does_not_store(mode: str) -> None:
    cache = new_cache()
    up = Upstream(A)
    got, first, last = drive(mode, cache, up, cache_control={"no_store": True})
    assert got == A and first is not None and first.status == "miss"
    assert last is not None and last.outcome == "no_store"
    assert cache.stats().stores == 0 and cache.stats().not_stored_no_store == 1
    drive(mode, cache, up)  # stored now
    _, first, _ = drive(mode, cache, up, cache_control=CacheControl(no_store=True))
    assert first is not None and first.status == "hit"  # no_store still reads
    assert up.calls == 2


def test_no_cache_refreshes_the_entry(mode: str) -> None:
    cache = new_cache()
    drive(mode, cache, Upstream(A))
    fresh = Upstream(B)
    got, first, last = drive(mode, cache, fresh, cache_control={"no_cache": True})
    assert got == B and fresh.calls == 1
    assert first is not None and first.status == "refresh"
    assert last is not None and last.outcome == "stored"
    got, first, _ = drive(mode, cache, Upstream(A))
    assert got == B and first is not None and first.status == "hit"
    stats = cache.stats()
    assert (stats.refreshes, stats.misses, stats.streams_led, stats.stores) == (1, 1, 2, 2)


def test_only_if_cached_raises_cache_miss_before_any_chunk(mode: str) -> None:
    cache = new_cache()
    up = Upstream(A)
    with pytest.raises(CacheMiss) as caught:
        drive(mode, cache, up, cache_control={"only_if_cached": True})
    assert isinstance(caught.value, ChengetaError) and isinstance(caught.value, LookupError)
    assert up.calls == 0 and cache.stats().only_if_cached_misses == 1
    drive(mode, cache, up)
    got, first, _ = drive(mode, cache, up, cache_control=CacheControl(only_if_cached=True))
    assert got == A and first is not None and first.status == "hit" and up.calls == 1


# -- races: sync threads ---------------------------------------------------------------------


def _in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_no_cache_while_others_join_threads() -> None:
    """A refresh never joins a stream started before it: it leads its own and takes the key;
    the older stream goes on for its consumers and is not stored (superseded)."""
    cache = new_cache()
    old = Upstream(A, pause_at=2)
    fresh = Upstream(B)
    leader = cache.get_or_stream(M, old.sync)
    joiner = cache.get_or_stream(M, old.sync)
    assert [next(leader), next(leader)] == A[:2]
    assert next(joiner) == "a1"
    assert joiner.cache_info is not None and joiner.cache_info.status == "join"

    def refresh() -> tuple[list[Any], CacheInfo | None]:
        stream = cache.get_or_stream(M, fresh.sync, cache_control={"no_cache": True})
        return list(stream), stream.cache_info

    t, out = _in_thread(refresh)
    t.join(10)
    got, info = out[0]
    assert got == B and info == CacheInfo("refresh", info.key, None, "stored")
    # a plain caller arriving now joins or hits the fresh stream, never the old one
    assert list(cache.get_or_stream(M, old.sync)) == B
    old.thread_gate.set()
    t1, rest_leader = _in_thread(lambda: list(leader))
    t2, rest_joiner = _in_thread(lambda: list(joiner))
    t1.join(10)
    t2.join(10)
    assert rest_leader == [A[2:]] and rest_joiner == [A[1:]]
    assert leader.cache_info is not None and leader.cache_info.outcome == "superseded"
    assert joiner.cache_info is not None and joiner.cache_info.outcome == "superseded"
    assert list(cache.get_or_stream(M, old.sync)) == B  # the refresh's entry stayed
    assert old.calls == 1 and fresh.calls == 1
    assert cache.stats().not_stored_superseded == 1


def test_only_if_cached_joins_an_in_flight_miss_threads() -> None:
    cache = new_cache()
    up = Upstream(A, pause_at=1)
    leader = cache.get_or_stream(M, up.sync)
    assert next(leader) == "a1"

    def only() -> tuple[list[Any], CacheInfo | None]:
        stream = cache.get_or_stream(M, up.sync, cache_control={"only_if_cached": True})
        return list(stream), stream.cache_info

    t, out = _in_thread(only)
    time.sleep(0.05)
    up.thread_gate.set()
    assert list(leader) == A[1:]
    t.join(10)
    got, info = out[0]
    assert got == A and info.status == "join" and info.outcome == "stored"
    assert up.calls == 1


@pytest.mark.parametrize("leader_no_store", [True, False])
def test_no_store_leader_with_storing_joiner_threads(leader_no_store: bool) -> None:
    """A stream is stored when any of its callers wants it stored."""
    cache = new_cache()
    up = Upstream(A, pause_at=1)
    lead_ctl = {"no_store": leader_no_store}
    join_ctl = {"no_store": not leader_no_store}
    leader = cache.get_or_stream(M, up.sync, cache_control=lead_ctl)
    assert next(leader) == "a1"
    joiner = cache.get_or_stream(M, up.sync, cache_control=join_ctl)
    assert next(joiner) == "a1"
    up.thread_gate.set()
    t, out = _in_thread(lambda: list(joiner))
    assert list(leader) == A[1:]
    t.join(10)
    assert out == [A[1:]]
    assert leader.cache_info is not None and leader.cache_info.outcome == "stored"
    assert joiner.cache_info is not None and joiner.cache_info.outcome == "stored"
    assert cache.stats().stores == 1


def test_all_no_store_callers_store_nothing_threads() -> None:
    cache = new_cache()
    up = Upstream(A, pause_at=1)
    ctl = CacheControl(no_store=True)
    leader = cache.get_or_stream(M, up.sync, cache_control=ctl)
    assert next(leader) == "a1"
    joiner = cache.get_or_stream(M, up.sync, cache_control=ctl)
    assert next(joiner) == "a1"
    up.thread_gate.set()
    t, _out = _in_thread(lambda: list(joiner))
    assert list(leader) == A[1:]
    t.join(10)
    assert leader.cache_info is not None and leader.cache_info.outcome == "no_store"
    assert cache.stats().stores == 0


# -- races: asyncio and trio ------------------------------------------------------------------


@pytest.mark.anyio
async def test_no_cache_while_others_join_async() -> None:
    cache = new_cache()
    old = Upstream(A, pause_at=2)
    old.gate = anyio.Event()
    fresh = Upstream(B)
    leader = cache.aget_or_stream(M, old.asyncgen)
    joiner = cache.aget_or_stream(M, old.asyncgen)
    assert await leader.__anext__() == "a1"
    assert await joiner.__anext__() == "a1"
    assert joiner.cache_info is not None and joiner.cache_info.status == "join"
    refresh = cache.aget_or_stream(M, fresh.asyncgen, cache_control={"no_cache": True})
    assert await collect(refresh) == B
    assert refresh.cache_info is not None
    assert (refresh.cache_info.status, refresh.cache_info.outcome) == ("refresh", "stored")
    assert await collect(cache.aget_or_stream(M, old.asyncgen)) == B
    old.gate.set()
    assert await collect(leader) == A[1:]
    assert await collect(joiner) == A[1:]
    assert leader.cache_info is not None and leader.cache_info.outcome == "superseded"
    assert joiner.cache_info is not None and joiner.cache_info.outcome == "superseded"
    assert await collect(cache.aget_or_stream(M, old.asyncgen)) == B
    assert old.calls == 1 and fresh.calls == 1


@pytest.mark.anyio
async def test_concurrent_refreshes_share_one_newer_stream() -> None:
    """Two no_cache calls made while an old stream runs: the first supersedes it, the second
    (made before the first's stream started) supersedes that one in turn; each is whole."""
    cache = new_cache()
    old = Upstream(A, pause_at=1)
    old.gate = anyio.Event()
    first = cache.aget_or_stream(M, old.asyncgen)
    assert await first.__anext__() == "a1"
    r1 = cache.aget_or_stream(M, Upstream(B).asyncgen, cache_control={"no_cache": True})
    r2 = cache.aget_or_stream(M, Upstream(B).asyncgen, cache_control={"no_cache": True})
    results: list[list[Any]] = []
    async with anyio.create_task_group() as tg:

        async def run(stream: Any) -> None:
            results.append(await collect(stream))

        tg.start_soon(run, r1)
        tg.start_soon(run, r2)
    old.gate.set()
    assert await collect(first) == A[1:]
    assert results == [B, B]
    assert await collect(cache.aget_or_stream(M, old.asyncgen)) == B


@pytest.mark.anyio
async def test_only_if_cached_joins_an_in_flight_miss_async() -> None:
    cache = new_cache()
    up = Upstream(A, pause_at=1)
    up.gate = anyio.Event()
    leader = cache.aget_or_stream(M, up.asyncgen)
    assert await leader.__anext__() == "a1"
    only = cache.aget_or_stream(M, up.asyncgen, cache_control={"only_if_cached": True})
    assert await only.__anext__() == "a1"
    assert only.cache_info is not None and only.cache_info.status == "join"
    up.gate.set()
    assert await collect(only) == A[1:]
    assert await collect(leader) == A[1:]
    assert only.cache_info.outcome == "stored" and up.calls == 1


@pytest.mark.anyio
async def test_only_if_cached_raises_on_first_anext_with_nothing_in_flight() -> None:
    cache = new_cache()
    up = Upstream(A)
    stream = cache.aget_or_stream(M, up.asyncgen, cache_control={"only_if_cached": True})
    with pytest.raises(CacheMiss):
        await stream.__anext__()
    assert up.calls == 0 and len(cache.flights) == 0


@pytest.mark.anyio
@pytest.mark.parametrize("leader_no_store", [True, False])
async def test_no_store_leader_with_storing_joiner_async(leader_no_store: bool) -> None:
    cache = new_cache()
    up = Upstream(A, pause_at=1)
    up.gate = anyio.Event()
    leader = cache.aget_or_stream(M, up.asyncgen, cache_control={"no_store": leader_no_store})
    assert await leader.__anext__() == "a1"
    joiner = cache.aget_or_stream(M, up.asyncgen, cache_control={"no_store": not leader_no_store})
    assert await joiner.__anext__() == "a1"
    up.gate.set()
    assert await collect(leader) == A[1:]
    assert await collect(joiner) == A[1:]
    assert leader.cache_info is not None and leader.cache_info.outcome == "stored"
    assert cache.stats().stores == 1


# -- recorded timing and paced replay ----------------------------------------------------------


def _stored_entry(cache: StreamingResponseCache, key: str) -> Any:
    raw = cache.manager.backend.get(key)
    assert raw is not None
    return unframe_entry(raw)


def test_a_miss_records_its_timing_compactly(mode: str) -> None:
    from chengeta_ai._core import decode_timing

    cache = new_cache()
    chunks = openai_chunks(40)
    _, _, last = drive(mode, cache, Upstream(chunks, delay=0.002))
    assert last is not None and last.outcome == "stored"
    entry = _stored_entry(cache, last.key)
    assert entry.written_at is not None and entry.timing is not None
    offsets = decode_timing(bytes(entry.timing), max_total_seconds=60)
    assert len(offsets) == len(chunks)
    assert offsets == sorted(offsets)
    # each chunk came at least 2 ms after the previous (the upstream slept): recorded so
    assert all(b - a >= 0.0019 for a, b in itertools.pairwise(offsets))
    # 2-3 ms gaps at 10 us per unit: two bytes per chunk, plus a few for the header
    assert len(entry.timing) <= 2 * len(chunks) + 8


def test_recorded_replay_paces_and_instant_does_not(mode: str) -> None:
    cache = new_cache()
    up = Upstream(A, delay=0.03)
    drive(mode, cache, up)
    start = time.perf_counter()
    _, first, last = drive(mode, cache, up, cache_control={"replay": "recorded"})
    paced = time.perf_counter() - start
    assert first is not None and first.status == "hit" and last is not None
    assert last.outcome == "replayed"
    # lower bounds only (sleeps never return early): four 30 ms gaps, replayed at 2x >= 60 ms
    assert paced >= 0.11
    start = time.perf_counter()
    drive(mode, cache, up, cache_control={"replay": "recorded", "speed": 2.0})
    assert time.perf_counter() - start >= 0.055
    assert cache.stats().paced_replays == 2
    assert up.calls == 1


def test_entries_without_timing_replay_instantly_and_have_no_age(mode: str) -> None:
    """Entries written before timing existed (v1 frames) still replay, instantly."""
    cache = new_cache()
    key = cache.manager.key_builder.build(M, "default")
    cache.manager.backend.set(key, frame(cache.serializer.dumps(A)), None, ())
    got, first, _last = drive(mode, cache, Upstream(B), cache_control={"replay": "recorded"})
    assert got == A and first is not None and first.status == "hit" and first.age is None
    assert cache.stats().paced_replays == 0


def test_corrupt_timing_is_refused_before_the_first_chunk(mode: str) -> None:
    cache = new_cache()
    key = cache.manager.key_builder.build(M, "default")
    # a timing section whose count runs past its bytes, under a valid checksum
    cache.manager.backend.set(
        key, frame(cache.serializer.dumps(A), written_at=1.0, timing=b"\x0a\x09\x01"), None, ()
    )
    got, first, _ = drive(mode, cache, Upstream(B), cache_control={"replay": "recorded"})
    assert got == B and first is not None and first.status == "miss"
    assert cache.stats().corrupt_entries == 1


def test_a_joiner_value_is_stored_without_timing(mode: str) -> None:
    cache = new_cache(chunk_joiner="".join)
    _, _, last = drive(mode, cache, Upstream(A))
    assert last is not None
    assert _stored_entry(cache, last.key).timing is None
    got, _, _ = drive(mode, cache, Upstream(A), cache_control={"replay": "recorded"})
    assert got == ["a1a2a3a4"]


def test_pickle_entries_carry_timing_too(mode: str) -> None:
    cache = StreamingResponseCache(CacheManager(serializer=PickleSerializer()))
    _, _, last = drive(mode, cache, Upstream(A, delay=0.01))
    assert last is not None and _stored_entry(cache, last.key).timing is not None
    got, first, _ = drive(mode, cache, Upstream(B), cache_control={"replay": "recorded"})
    assert got == A and first is not None and first.status == "hit"


@pytest.mark.anyio
async def test_paced_replays_sleep_without_blocking_the_loop() -> None:
    """Two paced replays of one entry on one loop interleave: each sleeps through anyio, so the
    other runs meanwhile (a blocking sleep would replay one whole stream, then the other)."""
    cache = new_cache()
    chunks = [f"c{i}" for i in range(5)]
    await collect(cache.aget_or_stream(M, Upstream(chunks, delay=0.02).asyncgen))
    order: list[tuple[int, str]] = []

    async def replay(who: int) -> None:
        stream = cache.aget_or_stream(M, Upstream(B).asyncgen, cache_control={"replay": "recorded"})
        async for chunk in stream:
            order.append((who, chunk))

    async with anyio.create_task_group() as tg:
        tg.start_soon(replay, 1)
        tg.start_soon(replay, 2)
    assert sorted(order) == sorted((w, c) for w in (1, 2) for c in chunks)
    first_end = min(order.index((1, "c4")), order.index((2, "c4")))
    assert {(1, "c1"), (2, "c1")} <= set(order[:first_end])


@pytest.mark.anyio
async def test_a_thousand_paced_replays_share_one_loop() -> None:
    """1,000 recorded-pace replays at once on one loop all finish whole, and the loop keeps
    turning. The bound is loose on purpose (a loaded 2-core machine, full garbage collections
    over 1,000 sleeping tasks): benches/bench_call_controls.py measures the gaps against a
    baseline of plain sleeping generators."""
    from tests.helpers import Heartbeat

    cache = new_cache()
    chunks = [f"c{i}" for i in range(20)]
    await collect(cache.aget_or_stream(M, Upstream(chunks, delay=0.005).asyncgen))
    beat = Heartbeat()
    done: list[int] = []
    never = Upstream(chunks)

    async def replay() -> None:
        got = await collect(
            cache.aget_or_stream(M, never.asyncgen, cache_control={"replay": "recorded"})
        )
        assert got == chunks
        done.append(1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(beat.run)
        async with anyio.create_task_group() as replays:
            for _ in range(1000):
                replays.start_soon(replay)
        beat.stop()
    assert len(done) == 1000 and never.calls == 0
    assert cache.stats().paced_replays == 1000
    assert beat.max_gap < 2.0, f"event loop stalled for {beat.max_gap * 1000:.1f} ms"
