"""`StreamingResponseCache` on every backend: 5,000-chunk miss then hit without stalling the
event loop, and fail-open when Redis dies or the SQLite file is locked, read-only or corrupt."""

from __future__ import annotations

import gc
import multiprocessing
import os
import shutil
import sqlite3
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from chengeta_ai.backends.redis_backend import RedisBackend
from chengeta_ai.backends.sqlite_backend import SQLiteBackend
from chengeta_ai.core.cache_manager import CacheManager
from chengeta_ai.layers.streaming_cache import StreamingResponseCache
from chengeta_ai.testing import openai_chunks
from redis_fixture import RedisServer

N_CHUNKS = 5000
#: A whole 500-chunk stream (role, 497 tokens, finish, usage): a stream cut short is not stored.
SHORT = openai_chunks(497)
#: The loop thread's own work in one heartbeat wait (CPU, not wall time: see `Heartbeat`);
#: generous: the figures themselves are in benches/ and printed below.
STALL_LIMIT = 0.050
MESSAGES = [{"role": "user", "content": "Explain caching."}]


@pytest.fixture(scope="module")
def chunks() -> list[Any]:
    return list(openai_chunks(N_CHUNKS))


class Source:
    """An upstream that counts its calls; the async one awaits between chunks, like a socket."""

    def __init__(self, chunks: list[Any], on_chunk: Any = None) -> None:
        self.chunks, self.calls, self.on_chunk = chunks, 0, on_chunk

    def sync(self, messages: Any) -> Iterator[Any]:
        self.calls += 1
        for i, chunk in enumerate(self.chunks):
            if self.on_chunk is not None:
                self.on_chunk(i)
            yield chunk

    async def aio(self, messages: Any) -> AsyncIterator[Any]:
        self.calls += 1
        for i, chunk in enumerate(self.chunks):
            if self.on_chunk is not None:
                self.on_chunk(i)
            await anyio.lowlevel.checkpoint()
            yield chunk


async def wait_for_store(cache: StreamingResponseCache, n: int = 1) -> None:
    """Poll the counter: the store happens after the stream ends, with no event to wait on."""
    with anyio.fail_after(10):
        while cache.stats()["stores"] < n:
            await anyio.sleep(0.005)


class GCClock:
    """Total time spent in the garbage collector (a gen-2 pass over a heap of 10,000 pydantic
    chunks takes 100-200 ms here, whatever the backend: not what these tests measure)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._t0

    def __enter__(self) -> GCClock:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


class Heartbeat:
    """Wakes every millisecond and records the longest time the loop kept it waiting, with
    and without the garbage collector's pauses, and the longest the loop's own thread *worked*
    in one of those waits (its CPU time, GC pauses excluded): what the cache's code can hold
    the loop for. The wall-clock stall also counts the process waiting for a core on a loaded
    machine; the CPU figure does not, so it is the one the test checks (not a timing of the
    machine: a blocking step on the loop, such as encoding a 5,000-chunk entry there, shows
    as tens of milliseconds of CPU on any machine)."""

    def __init__(self, gc_clock: GCClock) -> None:
        self.gc_clock = gc_clock
        self.max_stall = 0.0
        self.max_stall_with_gc = 0.0
        self.max_busy = 0.0

    async def run(self) -> None:
        while True:
            t0, cpu0, gc0 = time.perf_counter(), time.thread_time(), self.gc_clock.total
            await anyio.sleep(0.001)
            stall = time.perf_counter() - t0 - 0.001
            gc_pauses = self.gc_clock.total - gc0
            self.max_stall_with_gc = max(self.max_stall_with_gc, stall)
            self.max_stall = max(self.max_stall, stall - gc_pauses)
            self.max_busy = max(self.max_busy, time.thread_time() - cpu0 - gc_pauses)


@pytest.mark.anyio
async def test_5000_chunk_miss_then_hit_never_stalls_the_loop(
    abackend: Any, backend_kind: str, chunks: list[Any]
) -> None:
    backend = abackend
    cache = StreamingResponseCache(CacheManager(backend=backend))
    source = Source(chunks)
    stalls, with_gc, busy = {}, {}, {}
    for phase in ("miss", "hit"):
        with GCClock() as gc_clock:
            beat = Heartbeat(gc_clock)
            got: list[Any] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(beat.run)
                await anyio.sleep(0.005)
                async for chunk in cache.aget_or_stream(
                    MESSAGES, source.aio, model_id="gpt-4o", tags=["model:gpt-4o"]
                ):
                    got.append(chunk)
                if phase == "miss":
                    await wait_for_store(cache)
                tg.cancel_scope.cancel()
        assert got == chunks
        stalls[phase], with_gc[phase] = beat.max_stall, beat.max_stall_with_gc
        busy[phase] = beat.max_busy
    print(
        f"\n{backend_kind}: max loop stall miss {stalls['miss'] * 1e3:.1f} ms, hit "
        f"{stalls['hit'] * 1e3:.1f} ms (GC pauses included: {with_gc['miss'] * 1e3:.1f}, "
        f"{with_gc['hit'] * 1e3:.1f} ms); the loop thread's work in one: miss "
        f"{busy['miss'] * 1e3:.1f} ms, hit {busy['hit'] * 1e3:.1f} ms"
    )
    assert source.calls == 1
    stats = cache.stats()
    assert stats["hits"] == 1 and stats["misses"] == 1 and stats["chunks_replayed"] == N_CHUNKS + 2
    assert max(busy.values()) < STALL_LIMIT, (busy, stalls)
    assert await cache.manager.ainvalidate("model:gpt-4o") == 1


def test_sync_miss_then_hit(backend: Any, chunks: list[Any]) -> None:
    cache = StreamingResponseCache(CacheManager(backend=backend))
    source = Source(SHORT)
    assert list(cache.get_or_stream(MESSAGES, source.sync, model_id="m", ttl=60)) == SHORT
    deadline = time.monotonic() + 10
    while cache.stats()["stores"] < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert list(cache.get_or_stream(MESSAGES, source.sync, model_id="m", ttl=60)) == SHORT
    assert source.calls == 1 and cache.stats()["hits"] == 1


# -- fail-open ---------------------------------------------------------------------------------


def test_redis_killed_mid_stream_sync(restartable_redis: RedisServer, chunks: list[Any]) -> None:
    backend = RedisBackend(restartable_redis.url, prefix="fo:", down_backoff=0.1)
    manager = CacheManager(backend=backend)
    cache = StreamingResponseCache(manager)

    def kill_at(i: int) -> None:
        if i == 1000:
            restartable_redis.kill()

    source = Source(chunks, on_chunk=kill_at)
    # miss, Redis dies mid-stream: every chunk still arrives, the store fails quietly
    assert list(cache.get_or_stream(MESSAGES, source.sync, model_id="m")) == chunks
    time.sleep(0.2)
    source.on_chunk = None
    # Redis down: lookups fail fast, pass-through
    assert list(cache.get_or_stream(MESSAGES, source.sync, model_id="m")) == chunks
    assert source.calls == 2
    assert manager.stats()["backend_errors"] >= 2
    assert backend.stats()["errors"] >= 2
    # back: caching resumes (--save '' : the server restarts empty)
    restartable_redis.start()
    time.sleep(0.15)
    assert list(cache.get_or_stream(MESSAGES, source.sync, model_id="m")) == chunks
    deadline = time.monotonic() + 10
    while cache.stats()["stores"] < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert list(cache.get_or_stream(MESSAGES, source.sync, model_id="m")) == chunks
    assert source.calls == 3 and cache.stats()["hits"] == 1
    backend.close()


@pytest.mark.anyio
async def test_redis_killed_mid_stream_async(
    restartable_redis: RedisServer, chunks: list[Any]
) -> None:
    backend = RedisBackend(restartable_redis.url, prefix="afo:", down_backoff=0.1)
    manager = CacheManager(backend=backend)
    cache = StreamingResponseCache(manager)

    def kill_at(i: int) -> None:
        if i == 1000:
            restartable_redis.kill()

    source = Source(chunks, on_chunk=kill_at)
    got = [c async for c in cache.aget_or_stream(MESSAGES, source.aio, model_id="m")]
    assert got == chunks
    await anyio.sleep(0.2)
    source.on_chunk = None
    with anyio.fail_after(5):  # down: no caller waits on a dead server
        got = [c async for c in cache.aget_or_stream(MESSAGES, source.aio, model_id="m")]
    assert got == chunks and source.calls == 2
    assert manager.stats()["backend_errors"] >= 2
    restartable_redis.start()
    await anyio.sleep(0.15)
    got = [c async for c in cache.aget_or_stream(MESSAGES, source.aio, model_id="m")]
    await wait_for_store(cache)
    got2 = [c async for c in cache.aget_or_stream(MESSAGES, source.aio, model_id="m")]
    assert got == got2 == chunks
    assert source.calls == 3 and cache.stats()["hits"] == 1
    await backend.aclose()


def test_locked_sqlite_file_passes_through(tmp_path: Path, chunks: list[Any]) -> None:
    path = tmp_path / "c.db"
    backend = SQLiteBackend(path, timeout=0.1)
    manager = CacheManager(backend=backend)
    cache = StreamingResponseCache(manager)
    backend.set("warm", b"x")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("UPDATE meta SET entries = entries WHERE id = 0")
    source = Source(SHORT)
    try:
        for _ in range(2):
            assert list(cache.get_or_stream(MESSAGES, source.sync, model_id="m")) == SHORT
            time.sleep(0.3)
        assert source.calls == 2 and manager.stats()["backend_errors"] >= 2
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    backend.close()


@pytest.mark.anyio
async def test_corrupt_sqlite_file_passes_through(tmp_path: Path, chunks: list[Any]) -> None:
    path = tmp_path / "c.db"
    path.write_bytes(b"\x00garbage" * 1000)
    manager = CacheManager(backend=SQLiteBackend(path))
    cache = StreamingResponseCache(manager)
    source = Source(SHORT)
    for _ in range(2):
        got = [c async for c in cache.aget_or_stream(MESSAGES, source.aio, model_id="m")]
        assert got == SHORT
    assert source.calls == 2 and manager.stats()["backend_errors"] >= 2


def _read_only_child(path: str, as_uid: int | None, out: Any) -> None:
    try:
        if as_uid is not None:
            os.setgid(as_uid)
            os.setuid(as_uid)
        manager = CacheManager(backend=SQLiteBackend(path, timeout=0.1))
        cache = StreamingResponseCache(manager)
        source = Source(list(openai_chunks(300)))
        same = [
            list(cache.get_or_stream(MESSAGES, source.sync, model_id="m")) == source.chunks
            for _ in range(2)
        ]
        time.sleep(0.2)
        out.send((same, source.calls, manager.stats()["backend_errors"]))
    except BaseException as exc:
        out.send(repr(exc))


def test_read_only_sqlite_file_passes_through() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="chengeta-ro-"))
    try:
        path = tmp / "c.db"
        SQLiteBackend(path).set("warm", b"x")
        for p in tmp.iterdir():
            p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        tmp.chmod(0o555)
        recv, send = multiprocessing.Pipe(duplex=False)
        proc = multiprocessing.get_context("fork").Process(
            target=_read_only_child,
            args=(str(path), 65534 if os.geteuid() == 0 else None, send),
        )
        proc.start()
        result = recv.recv()
        proc.join(30)
        assert result[:2] == ([True, True], 2), result
        assert result[2] >= 2, result
    finally:
        tmp.chmod(0o755)
        shutil.rmtree(tmp)
