"""Fleet-wide cancellation and follower keep-alive (follow-up of the review of issue 10).

Under ``on_abandon="cancel"`` the upstream is closed only when no process has a consumer left:
the producer's writer decides in Redis, in the same Lua script that counts the registered
follower readers and writes the ``cancel`` record; a follower's first registration is a Lua
script that checks the lease. Several caches in one process stand for several processes (see
conftest.py), on the real redis-server of the ``flights_redis`` fixture.
"""

from __future__ import annotations

import threading
import time
from contextlib import aclosing
from typing import Any

import anyio
import anyio.to_thread
import pytest
import redis
from tests.helpers import Upstream
from tests.redis_flights.conftest import Fleet

from chengeta_ai import CacheKeyBuilder, CacheManager, RedisFlights, UpstreamLost
from chengeta_ai.layers.streaming_cache import StreamingResponseCache
from redis_fixture import RedisServer

MESSAGES = [{"role": "user", "content": "cancelled across processes"}]


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def final_records(plain: redis.Redis, rf: RedisFlights, key: str) -> list[bytes]:
    """The final-record kinds of every log of ``key`` in Redis."""
    kinds = []
    for log in plain.scan_iter(match=rf.base(key) + ":log:*"):  # braces are not glob syntax
        kinds += [fields[b"f"] for _id, fields in plain.xrange(log) if b"f" in fields]
    return kinds


@pytest.fixture
def plain(flights_redis: RedisServer) -> Any:
    client = redis.Redis.from_url(flights_redis.url)
    yield client
    client.close()


class _HookedFlights(RedisFlights):
    """Real RedisFlights whose first follower registration runs ``hook`` first (in the
    reader's thread): it holds a follower between its election and its registration."""

    hook: Any = None

    def watch(self, key: str, token: str, rid: str) -> int:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return super().watch(key, token, rid)


@pytest.mark.anyio
async def test_a_follower_registering_after_the_cancel_elects_again_instead_of_losing_it(
    flights_redis: RedisServer, plain: redis.Redis
) -> None:
    """The cancel decision and a follower's registration are serialised by Redis: a follower
    elected before the producer cancelled (no reader registered yet) but registering after
    it finds the lease gone before it has read anything, elects again and produces. Had it
    registered blindly, it would read the chunks and then the ``cancel``: UpstreamLost."""
    fleet = Fleet(flights_redis.url)
    try:
        producer = fleet.cache(on_abandon="cancel")
        rf = _HookedFlights(fleet.url, prefix=fleet.prefix, lease=1.0, block=0.1)
        follower = StreamingResponseCache(
            CacheManager(backend=fleet.backend, key_builder=CacheKeyBuilder()), flights=rf
        )
        key = follower.manager.key_builder.build(MESSAGES, "default", None)
        up = Upstream([f"c{i}" for i in range(6)], delay=0.05)
        elected = threading.Event()
        cancelled = threading.Event()

        def between_election_and_registration() -> None:
            elected.set()
            cancelled.wait(10)

        rf.hook = between_election_and_registration
        followed: list[Any] = []
        errors: list[BaseException] = []

        async def follows() -> None:
            try:
                async with aclosing(follower.aget_or_stream(MESSAGES, up.asyncgen)) as stream:
                    async for chunk in stream:
                        followed.append(chunk)
            except Exception as exc:
                errors.append(exc)

        try:
            async with anyio.create_task_group() as tg:
                async with aclosing(producer.aget_or_stream(MESSAGES, up.asyncgen)) as stream:
                    async for _chunk in stream:
                        tg.start_soon(follows)
                        with anyio.fail_after(10):
                            await anyio.to_thread.run_sync(elected.wait)
                        break  # the producer's only consumer leaves; nobody is registered
                await anyio.to_thread.run_sync(
                    wait_for, lambda: b"cancel" in final_records(plain, rf, key)
                )
                cancelled.set()
        finally:
            cancelled.set()
            rf.close()
        assert errors == []
        assert followed == up.chunks
        assert up.calls == 2  # the follower elected again and produced
        assert producer.stats()["abandoned_cancelled"] == 1
    finally:
        fleet.close()


@pytest.mark.anyio
@pytest.mark.parametrize("follower_policy", ["cancel", "finish"])
async def test_the_producer_cancels_once_the_last_remote_reader_leaves(
    flights_redis: RedisServer, plain: redis.Redis, follower_policy: Any
) -> None:
    """The producer's last local consumer leaves while a follower in another process reads:
    the producer keeps reading for it; once the follower's consumer leaves too, no process
    has a consumer and the upstream is closed (at the producer's next append), not read to
    the end for nobody. A follower flight never stores, so whatever its own policy, it stops
    reading when its consumers are gone."""
    fleet = Fleet(flights_redis.url)
    try:
        producer = fleet.cache(on_abandon="cancel")
        follower = fleet.cache(on_abandon=follower_policy)
        up = Upstream([f"c{i}" for i in range(200)], delay=0.02)
        follower_has_one = anyio.Event()
        producer_left = anyio.Event()
        followed: list[Any] = []

        async def follows() -> None:
            async with aclosing(follower.aget_or_stream(MESSAGES, up.asyncgen)) as stream:
                async for chunk in stream:
                    followed.append(chunk)
                    follower_has_one.set()
                    if producer_left.is_set() and len(followed) >= 5:
                        break

        async with anyio.create_task_group() as tg:
            async with aclosing(producer.aget_or_stream(MESSAGES, up.asyncgen)) as stream:
                async for _chunk in stream:
                    tg.start_soon(follows)
                    with anyio.fail_after(10):
                        await follower_has_one.wait()
                    break
            producer_left.set()
        with anyio.fail_after(10):
            while up.closed == 0:
                await anyio.sleep(0.01)
        assert followed == up.chunks[: len(followed)]
        assert len(followed) >= 5  # the follower was spared after the producer's consumer left
        assert up.calls == 1
        assert up.completed == 0 and up.produced < 100  # cancelled, not read to the end
        assert producer.stats()["stores"] == 0
        assert producer.stats()["abandoned_cancelled"] == 1
    finally:
        fleet.close()


def test_a_sync_producer_cancels_once_the_last_remote_reader_leaves(fleet: Fleet) -> None:
    """The same with sync producer and follower (threads): the producer's writer thread
    cancels the drained upstream itself."""
    producer = fleet.cache(on_abandon="cancel")
    follower = fleet.cache(on_abandon="cancel")
    up = Upstream([f"c{i}" for i in range(200)], delay=0.02)
    follower_has_one = threading.Event()
    producer_left = threading.Event()
    followed: list[Any] = []
    errors: list[BaseException] = []

    def follows() -> None:
        try:
            stream = follower.get_or_stream(MESSAGES, up.sync)
            for chunk in stream:
                followed.append(chunk)
                follower_has_one.set()
                if producer_left.is_set() and len(followed) >= 5:
                    break
            stream.close()
        except BaseException as exc:
            errors.append(exc)
            follower_has_one.set()

    stream = producer.get_or_stream(MESSAGES, up.sync)
    next(stream)
    thread = threading.Thread(target=follows, daemon=True)
    thread.start()
    assert follower_has_one.wait(10)
    stream.close()  # the producer's only consumer leaves: the flight drains for the follower
    producer_left.set()
    thread.join(10)
    wait_for(lambda: up.closed > 0)
    assert errors == []
    assert len(followed) >= 5
    assert followed == up.chunks[: len(followed)]
    assert up.calls == 1
    assert up.completed == 0 and up.produced < 100
    assert producer.stats()["stores"] == 0
    assert producer.stats()["abandoned_cancelled"] == 1


def test_done_ttl_longer_than_log_ttl_is_refused() -> None:
    """Callers that missed the store follow the log for ``done_ttl``: past ``log_ttl`` the log
    is gone and they would wait for a lease to lapse and then produce again."""
    with pytest.raises(ValueError, match="done_ttl"):
        RedisFlights("redis://127.0.0.1:1/0", lease=1.0, log_ttl=2.0, done_ttl=3.0)


# -- a producer lost between its store and its final record ------------------------------------


class _DiesBeforeDone(RedisFlights):
    """A producer that stores and then writes nothing more (its process killed right after
    the store): its final record never comes and its lease lapses."""

    released = threading.Event()

    def finish(self, key: str, token: str, kind: str, message: str, keep: bool) -> bool:
        self.released.wait(20)
        return False


def test_followers_of_a_producer_lost_after_its_store_finish_from_the_stored_entry(
    fleet: Fleet, plain: redis.Redis
) -> None:
    """Followers see a lapsed lease without a final record. One that has every chunk but the
    ``done`` must not get UpstreamLost, and one that has nothing must get the stored entry
    rather than electing itself and calling the upstream a second time."""
    manager = CacheManager(backend=fleet.backend, key_builder=CacheKeyBuilder())
    prf = _DiesBeforeDone(fleet.url, prefix=fleet.prefix, lease=1.0, block=0.1)
    producer = StreamingResponseCache(manager, flights=prf)
    key = manager.key_builder.build(MESSAGES, "default", None)
    lease = prf.lease_key(key)
    hooked = _HookedFlights(fleet.url, prefix=fleet.prefix, lease=1.0, block=0.1)
    late = StreamingResponseCache(
        CacheManager(backend=fleet.backend, key_builder=CacheKeyBuilder()), flights=hooked
    )
    follower = fleet.cache()
    up = Upstream([f"c{i}" for i in range(20)], delay=0.01)
    results: dict[str, Any] = {}

    def run(name: str, cache: StreamingResponseCache) -> None:
        try:
            results[name] = list(cache.get_or_stream(MESSAGES, up.sync))
        except BaseException as exc:
            results[name] = exc

    def after_the_store_and_the_lapse() -> None:  # elected before, registers after
        wait_for(lambda: fleet.backend.get(key) is not None and plain.get(lease) is None)

    hooked.hook = after_the_store_and_the_lapse
    threads = [threading.Thread(target=run, args=("producer", producer), daemon=True)]
    threads[0].start()
    wait_for(lambda: plain.get(lease) is not None)
    for name, cache in (("follower", follower), ("late", late)):
        threads.append(threading.Thread(target=run, args=(name, cache), daemon=True))
        threads[-1].start()
    try:
        for thread in threads:
            thread.join(20)
    finally:
        _DiesBeforeDone.released.set()
        prf.close()
        hooked.close()
    assert results == {"producer": up.chunks, "follower": up.chunks, "late": up.chunks}
    assert up.calls == 1


def test_a_stored_entry_that_does_not_repeat_the_delivered_chunks_is_not_spliced(
    fleet: Fleet, plain: redis.Redis
) -> None:
    """The stored entry continues a follower's stream only if it starts with exactly the chunks
    the follower delivered: another answer stored under the key (a second producer after a
    race, a nondeterministic model) gives UpstreamLost, never a spliced stream."""
    manager = CacheManager(backend=fleet.backend, key_builder=CacheKeyBuilder())
    prf = _DiesBeforeDone(fleet.url, prefix=fleet.prefix, lease=1.0, block=0.1)
    producer = StreamingResponseCache(manager, flights=prf)
    key = manager.key_builder.build(MESSAGES, "default", None)
    lease = prf.lease_key(key)
    follower = fleet.cache()
    up = Upstream([f"c{i}" for i in range(20)], delay=0.01)
    other = Upstream([f"other{i}" for i in range(20)])
    results: dict[str, Any] = {}

    def run(name: str, cache: StreamingResponseCache) -> None:
        try:
            results[name] = list(cache.get_or_stream(MESSAGES, up.sync))
        except BaseException as exc:
            results[name] = exc

    threads = [threading.Thread(target=run, args=("producer", producer), daemon=True)]
    threads[0].start()
    wait_for(lambda: plain.get(lease) is not None)
    threads.append(threading.Thread(target=run, args=("follower", follower), daemon=True))
    threads[1].start()
    try:
        wait_for(lambda: fleet.backend.get(key) is not None)
        fleet.backend.delete(key)  # another answer replaces the entry before the lease lapses
        plain_cache = StreamingResponseCache(manager)
        assert list(plain_cache.get_or_stream(MESSAGES, other.sync)) == other.chunks
        for thread in threads:
            thread.join(20)
    finally:
        _DiesBeforeDone.released.set()
        prf.close()
    assert results["producer"] == up.chunks
    assert isinstance(results["follower"], UpstreamLost)
