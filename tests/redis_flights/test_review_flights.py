"""Adversarial review of RedisFlights (issue 10): each test is a finding that failed on main.

Several caches in one process stand for several processes (each its own flight table), on the
real redis-server of the ``flights_redis`` fixture; the Redis keys are planted or read with a
plain redis-py client, as another process (or a corrupt or hostile writer) would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import aclosing
from typing import Any

import anyio
import pytest
import redis
from tests.helpers import Upstream, collect
from tests.redis_flights.conftest import Fleet

from chengeta_ai import (
    CacheKeyBuilder,
    CacheManager,
    InMemoryBackend,
    RedisFlights,
)
from chengeta_ai.layers.streaming_cache import StreamingResponseCache
from redis_fixture import RedisServer

MESSAGES = [{"role": "user", "content": "reviewed across processes"}]


def flight_key(cache: StreamingResponseCache) -> str:
    return cache.manager.key_builder.build(MESSAGES, "default", None)


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


@pytest.fixture
def plain(flights_redis: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(flights_redis.url)
    yield client
    client.close()


def run_in_thread(fn: Any, timeout: float) -> tuple[bool, list[Any], list[BaseException]]:
    """Runs ``fn`` in a daemon thread; (finished within ``timeout``, [result], [error])."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive(), result, errors


# -- cancellation fleet-wide ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_review_cancel_spares_a_follower_that_joined_since_the_last_renewal(
    flights_redis: RedisServer,
) -> None:
    """on_abandon="cancel" must close the upstream only when no process has a consumer left.
    The producer learns of follower readers only at its appends and renewals (every
    lease / 3): a follower that joined and received chunks since then is not counted, and the
    producer's last local consumer leaving cancels the stream under it (UpstreamLost)."""
    fleet = Fleet(flights_redis.url, lease=6.0)  # renewals every 2 s, a chunk every 1 s
    try:
        producer, follower = fleet.cache(), fleet.cache()
        up = Upstream([f"c{i}" for i in range(4)], delay=1.0)
        follower_has_one = anyio.Event()
        followed: list[Any] = []
        errors: list[BaseException] = []

        async def follows() -> None:
            try:
                async with aclosing(follower.aget_or_stream(MESSAGES, up.asyncgen)) as stream:
                    async for chunk in stream:
                        followed.append(chunk)
                        follower_has_one.set()
            except Exception as exc:
                errors.append(exc)
                follower_has_one.set()

        async with anyio.create_task_group() as tg:
            async with aclosing(producer.aget_or_stream(MESSAGES, up.asyncgen)) as stream:
                async for _chunk in stream:  # c0, appended to the log: no reader registered
                    await anyio.sleep(0.1)
                    tg.start_soon(follows)
                    with anyio.fail_after(5):
                        await follower_has_one.wait()
                    break  # the producer's only local consumer leaves
        assert errors == []
        assert followed == up.chunks
        assert up.calls == 1
    finally:
        fleet.close()


# -- a follower whose local consumers are slow ----------------------------------------------------


@pytest.mark.anyio
async def test_review_a_follower_held_back_by_its_slow_consumer_still_gets_the_stream(
    flights_redis: RedisServer,
) -> None:
    """In-process, slow_consumer="wait" makes a slow consumer get the whole stream. Through
    Redis, a follower held back by its local consumer stops reading the log; the log expires
    ``log_ttl`` after the producer's last write and the follower gets UpstreamLost, although
    the stream ended normally and was stored."""
    fleet = Fleet(flights_redis.url, lease=1.0, log_ttl=1.0, done_ttl=0.5)
    try:
        producer = fleet.cache()
        follower = fleet.cache(max_lag=2, slow_consumer="wait")
        up = Upstream([f"c{i}" for i in range(150)], delay=0.002)
        got: list[Any] = []

        async def slow_consumer() -> None:
            async with aclosing(follower.aget_or_stream(MESSAGES, up.asyncgen)) as stream:
                async for chunk in stream:
                    got.append(chunk)
                    if len(got) == 1:
                        await anyio.sleep(2.5)  # a client that stalls for a moment

        async with anyio.create_task_group() as tg:
            tg.start_soon(collect, producer.aget_or_stream(MESSAGES, up.asyncgen))
            await anyio.sleep(0.01)
            tg.start_soon(slow_consumer)
        assert got == up.chunks
        assert up.calls == 1
        assert producer.stats()["stores"] == 1
    finally:
        fleet.close()


# -- planted or corrupt Redis data --------------------------------------------------------------


def _started_producer(fleet: Fleet, plain: redis.Redis, up: Upstream) -> tuple[Any, str, str]:
    """A sync producer in a thread, paused before its first chunk; (thread, lease key, log
    key) once it holds the lease."""
    producer = fleet.cache()
    rf = producer.remote_flights
    assert rf is not None
    key = flight_key(producer)
    thread = threading.Thread(
        target=lambda: list(producer.get_or_stream(MESSAGES, up.sync)), daemon=True
    )
    thread.start()
    wait_for(lambda: plain.get(rf.lease_key(key)) is not None)
    token = plain.get(rf.lease_key(key)).decode()
    return thread, rf.lease_key(key), rf.log_key(key, token)


@pytest.mark.parametrize(
    "fields",
    [
        {b"d": b"\x00garbage that is not the compact codec"},
        {b"f": b"\xff\xfe not utf-8", b"m": b"\xff"},
        {b"x": b"an entry with neither a batch nor a final record"},
    ],
    ids=["undecodable-batch", "non-utf8-final", "unknown-field"],
)
def test_review_a_corrupt_log_entry_never_reaches_the_caller(
    fleet: Fleet, plain: redis.Redis, fields: dict[bytes, bytes]
) -> None:
    """A corrupt (or planted) entry in a producer's log must not crash a follower's caller
    (DecodeError, UnicodeDecodeError) nor send it into a busy loop of elections and reads:
    the cache steps aside (the follower reads the upstream itself)."""
    up = Upstream([f"c{i}" for i in range(10)], pause_at=0)
    thread, _lease, log = _started_producer(fleet, plain, up)
    plain.xadd(log, fields)  # before the producer's first batch
    follower = fleet.cache()
    rf = follower.remote_flights
    assert rf is not None
    threading.Timer(0.3, up.thread_gate.set).start()
    finished, result, errors = run_in_thread(
        lambda: list(follower.get_or_stream(MESSAGES, up.sync)), 15
    )
    thread.join(15)
    assert finished
    assert errors == []
    assert result == [up.chunks]
    assert rf.stats()["reader_round_trips"] < 100  # no busy loop on the bad entry


def test_review_a_non_utf8_lease_value_never_reaches_the_caller(
    fleet: Fleet, plain: redis.Redis
) -> None:
    cache = fleet.cache()
    rf = cache.remote_flights
    assert rf is not None
    plain.set(rf.lease_key(flight_key(cache)), b"\xff\xfe", px=60_000)
    up = Upstream([f"c{i}" for i in range(5)])
    finished, result, errors = run_in_thread(
        lambda: list(cache.get_or_stream(MESSAGES, up.sync)), 10
    )
    assert finished
    assert errors == []
    assert result == [up.chunks]


def test_review_a_lease_without_a_ttl_does_not_hang_callers_forever(
    fleet: Fleet, plain: redis.Redis
) -> None:
    """A lease key without a TTL (planted, or left by a PERSIST) is never renewed by anybody:
    followers of its token wait for a log that never comes, forever."""
    cache = fleet.cache()
    rf = cache.remote_flights
    assert rf is not None
    lease = rf.lease_key(flight_key(cache))
    plain.set(lease, "7.feedfacefeedface")  # no PX
    up = Upstream([f"c{i}" for i in range(5)])
    try:
        finished, result, errors = run_in_thread(
            lambda: list(cache.get_or_stream(MESSAGES, up.sync)), 10
        )
        assert finished, "the caller is still waiting for a lease that never lapses"
        assert errors == []
        assert result == [up.chunks]
    finally:
        plain.delete(lease)  # lets a hung caller go


def test_review_a_decode_responses_client_is_refused_or_works(flights_redis: RedisServer) -> None:
    """``url_or_client`` takes any redis.Redis; one made with decode_responses=True (a common
    setting) gives str where the code expects bytes: a follower took every entry for an empty
    final record, elected again in a busy loop (about a thousand XREADs for a 0.3 s stream)
    and finally called the upstream itself (two upstream calls)."""
    client = redis.Redis.from_url(flights_redis.url, decode_responses=True, socket_timeout=2.0)
    try:
        try:
            flights = [RedisFlights(client, prefix="t-decoded:", lease=1.0) for _ in range(2)]
        except (TypeError, ValueError):
            return  # refused up front: fine
        backend = InMemoryBackend()
        caches = [
            StreamingResponseCache(
                CacheManager(backend=backend, key_builder=CacheKeyBuilder()), flights=rf
            )
            for rf in flights
        ]
        up = Upstream([f"c{i}" for i in range(30)], delay=0.01)
        results: list[Any] = []
        errors: list[BaseException] = []

        def caller(cache: StreamingResponseCache) -> None:
            try:
                results.append(list(cache.get_or_stream(MESSAGES, up.sync)))
            except BaseException as exc:
                errors.append(exc)

        first = threading.Thread(target=caller, args=(caches[0],))
        first.start()
        time.sleep(0.05)
        second = threading.Thread(target=caller, args=(caches[1],))
        second.start()
        first.join(20)
        second.join(20)
        assert errors == []
        assert results == [up.chunks, up.chunks]
        assert up.calls == 1
        assert sum(rf.stats()["reader_round_trips"] for rf in flights) < 100
    finally:
        client.close()


# -- the producer interrupted ------------------------------------------------------------------


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_review_an_interrupted_producer_is_a_lost_producer_not_an_upstream_error(
    fleet: Fleet, plain: redis.Redis, interrupt: type[BaseException]
) -> None:
    """Ctrl-C (KeyboardInterrupt) or a worker's sys.exit (gunicorn's quit and abort handlers)
    in the producer is the producing process going away, as with kill -9: a follower that has
    received nothing must elect a new producer and start over transparently. It got
    UpstreamLost ("the upstream failed in the producing process: KeyboardInterrupt()")."""
    gate = threading.Event()
    calls: list[int] = []
    chunks = [f"c{i}" for i in range(5)]

    def stream_fn(messages: Any) -> Iterator[Any]:
        calls.append(1)
        first = len(calls) == 1

        def gen() -> Iterator[Any]:
            if first:
                gate.wait(10)
                raise interrupt()
            yield from chunks

        return gen()

    producer, follower = fleet.cache(), fleet.cache()
    rf = producer.remote_flights
    assert rf is not None
    interrupted: list[BaseException] = []

    def produce() -> None:
        try:
            list(producer.get_or_stream(MESSAGES, stream_fn))
        except BaseException as exc:
            interrupted.append(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    wait_for(lambda: plain.get(rf.lease_key(flight_key(producer))) is not None)
    threading.Timer(0.3, gate.set).start()  # the follower is registered and has nothing
    finished, result, errors = run_in_thread(
        lambda: list(follower.get_or_stream(MESSAGES, stream_fn)), 15
    )
    thread.join(10)
    assert [type(e) for e in interrupted] == [interrupt]
    assert finished
    assert errors == []
    assert result == [chunks]


# -- the end of a stream read between an empty XREAD and the lease check -----------------------


class _GetHook(redis.Redis):
    """A real client whose GET of a lease key runs ``hook`` first (once): it widens the moment
    between a follower's empty XREAD and its lease check, which is otherwise ~100 µs."""

    hook: Any = None

    def get(self, name: Any) -> Any:
        hook, self.hook = self.hook, None
        if hook is not None and str(name).endswith(":lease"):
            hook()
        return super().get(name)


def test_review_a_final_record_written_just_after_an_empty_read_is_not_a_loss(
    fleet: Fleet, plain: redis.Redis
) -> None:
    """The follower decides "lost" from an empty XREAD followed by GET lease. A producer that
    writes its final record in between (and drops its lease: a stream that ends not stored,
    here incomplete) looks lost: a follower holding chunks got UpstreamLost for a stream that
    ended normally."""
    resume = threading.Event()
    chunks = [f"c{i}" for i in range(5)]

    def stream_fn(messages: Any) -> Iterator[Any]:
        yield chunks[0]
        resume.wait(10)
        yield from chunks[1:]

    producer = fleet.cache(is_complete=lambda chunks: False)  # ends "done", lease dropped
    prf = producer.remote_flights
    assert prf is not None
    key = flight_key(producer)
    thread = threading.Thread(
        target=lambda: list(producer.get_or_stream(MESSAGES, stream_fn)), daemon=True
    )
    thread.start()
    wait_for(lambda: plain.get(prf.lease_key(key)) is not None)
    token = plain.get(prf.lease_key(key)).decode()
    log = prf.log_key(key, token)
    wait_for(lambda: plain.xlen(log) >= 1)

    client = _GetHook.from_url(fleet.url, socket_timeout=2.0)
    rf = RedisFlights(client, prefix=fleet.prefix, lease=1.0, block=0.1)
    follower = StreamingResponseCache(
        CacheManager(backend=fleet.backend, key_builder=CacheKeyBuilder()), flights=rf
    )

    def has_final() -> bool:
        return any(b"f" in fields for _id, fields in plain.xrange(log))

    def producer_ends_now() -> None:
        resume.set()
        wait_for(has_final)

    got: list[Any] = []

    def follow() -> list[Any]:
        for chunk in follower.get_or_stream(MESSAGES, stream_fn):
            got.append(chunk)
            if len(got) == 1:
                client.hook = producer_ends_now  # armed once c0 is delivered
        return got

    try:
        finished, result, errors = run_in_thread(follow, 15)
        thread.join(10)
        assert finished
        assert errors == []
        assert result == [chunks]
    finally:
        rf.close()
        client.close()


# -- bounds and timeouts ------------------------------------------------------------------------


def test_review_a_planted_batch_larger_than_max_entry_bytes_is_refused(
    fleet: Fleet, plain: redis.Redis
) -> None:
    """A producer never writes more than ``max_entry_bytes`` to its log; a follower read any
    size: a planted (well-formed) batch of ~1 MB in a log bounded to 64 KiB was decoded and
    its chunks served to the caller ahead of the real ones."""
    import os

    from chengeta_ai import CompactSerializer

    up = Upstream([f"c{i}" for i in range(10)], pause_at=0)
    thread, _lease, log = _started_producer(fleet, plain, up)
    planted = CompactSerializer().dumps([os.urandom(500).hex() for _ in range(1000)])
    assert len(planted) > 256 * 1024
    plain.xadd(log, {b"d": planted})
    follower = fleet.cache(max_entry_bytes=64 * 1024)
    threading.Timer(0.3, up.thread_gate.set).start()
    finished, result, errors = run_in_thread(
        lambda: list(follower.get_or_stream(MESSAGES, up.sync)), 15
    )
    thread.join(15)
    assert finished
    assert errors == []
    assert result == [up.chunks]


def test_review_a_stalled_redis_never_hangs_a_caller_with_a_client_passed_in(
    tmp_path: Any,
) -> None:
    """Fail-open needs every Redis call to end. With a URL, RedisFlights sets socket timeouts;
    a client passed in (what the README shows for Redis Cluster) is used as it is, and a
    redis.Redis made without a socket timeout (redis-py 5 to 7's default, which
    ``redis>=5`` allows; 8 defaults to 5 s) made a stalled Redis (SIGSTOP here; a frozen VM, a
    dropped network path) hold the caller's election forever.

    Such a client is now refused up front (ValueError naming socket_timeout: the client is the
    user's, and rebuilding it would drop settings we cannot copy faithfully); the stall itself
    is still exercised with a client passed in *with* a socket timeout, which must let the
    caller go (a regression to unbounded calls on passed-in clients fails here)."""
    import signal

    server = RedisServer(tmp_path)
    server.start()
    untimed = redis.Redis.from_url(server.url, socket_timeout=None, socket_connect_timeout=None)
    client = redis.Redis.from_url(server.url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        with pytest.raises(ValueError, match="socket_timeout"):
            RedisFlights(untimed, prefix="t-stall:", lease=1.0, block=0.1)
        rf = RedisFlights(client, prefix="t-stall:", lease=1.0, block=0.1)
        cache = StreamingResponseCache(
            CacheManager(backend=InMemoryBackend(), key_builder=CacheKeyBuilder()), flights=rf
        )
        client.ping()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        up = Upstream([f"c{i}" for i in range(5)])
        try:
            finished, result, errors = run_in_thread(
                lambda: list(cache.get_or_stream(MESSAGES, up.sync)), 10
            )
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert finished, "the caller still waits for a stalled Redis"
        assert errors == []
        assert result == [up.chunks]
    finally:
        untimed.close()
        client.close()
        server.stop()


# -- a producer process that exits as soon as its stream is delivered ---------------------------

_EXITING_PRODUCER = """
import os, sys, time
from chengeta_ai import CacheKeyBuilder, CacheManager, InMemoryBackend, RedisFlights
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

url, prefix, how = sys.argv[1], sys.argv[2], sys.argv[3]
flights = RedisFlights(url, prefix=prefix, lease=1.0, block=0.1)
cache = StreamingResponseCache(
    CacheManager(backend=InMemoryBackend(), key_builder=CacheKeyBuilder()), flights=flights
)

def upstream(messages):
    for i in range(30):
        time.sleep(0.02)
        yield f"c{i}"

got = list(cache.get_or_stream({messages!r}, upstream))
assert len(got) == 30
if how == "os._exit":
    os._exit(0)  # how multiprocessing's fork workers end
"""


@pytest.mark.parametrize("how", ["os._exit", "return"])
def test_review_a_producer_that_exits_right_after_its_stream_leaves_a_final_record(
    flights_redis: RedisServer, plain: redis.Redis, how: str
) -> None:
    """The final ``done`` record is written by the producer's daemon writer thread after the
    producer's own callers have their whole stream: a producer process that exits then (a
    script, a multiprocessing worker, a server worker recycled after its last request) dies
    with the record unwritten, and followers that had chunks got UpstreamLost for a stream
    that ended normally (every time with os._exit, about 1 in 5 with a normal exit)."""
    import subprocess
    import sys
    import uuid

    script = _EXITING_PRODUCER.replace("{messages!r}", repr(MESSAGES))
    outcomes: list[Any] = []
    for _ in range(1 if how == "os._exit" else 8):
        prefix = f"t-exit-{uuid.uuid4().hex[:8]}:"
        proc = subprocess.Popen([sys.executable, "-c", script, flights_redis.url, prefix, how])
        rf = RedisFlights(flights_redis.url, prefix=prefix, lease=1.0, block=0.1)
        try:
            cache = StreamingResponseCache(
                CacheManager(backend=InMemoryBackend(), key_builder=CacheKeyBuilder()),
                flights=rf,
            )
            lease = rf.lease_key(flight_key(cache))
            wait_for(lambda lease=lease: plain.get(lease) is not None, 30)

            def never(messages: Any) -> Iterator[Any]:
                raise AssertionError("the follower called the upstream")

            try:
                outcomes.append(len(list(cache.get_or_stream(MESSAGES, never))))
            except Exception as exc:
                outcomes.append(exc)
            assert proc.wait(30) == 0
        finally:
            rf.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(o == 30 for o in outcomes), outcomes
