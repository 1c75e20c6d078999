"""Review s4, finding: on a bounded SQLite cache a hit waits for any writer's lock (MEDIUM).

`SQLiteBackend` docs: "readers never block the writer nor each other, across threads and
processes" (WAL), and, for bounded caches, "Reads refresh ``accessed_at`` ... The touch is
best-effort: if the file is busy it is skipped, never raised." The touch is an ``UPDATE`` run
on the reading connection, whose ``busy_timeout`` is the backend's write ``timeout`` (5 s by
default): while another process holds the write lock (a store, an eviction, a ``clear``, a
maintenance job), every hit that wants to touch its entry waits for that lock, up to 5 s, before
the touch is "skipped". A hit that costs ~0.1 ms then costs up to the busy timeout (measured:
5.1 s for a hit while another connection held ``BEGIN IMMEDIATE``), and the caller's first chunk
waits with it.

The test is deterministic: another connection holds the write lock until the hit has returned
(or 8 s pass, the backend's ``timeout`` being 30 s); the hit must return while the lock is held.

Fix direction: run the touch without waiting (a ``busy_timeout`` of 0 around it, or
``BEGIN IMMEDIATE`` tried once), or defer touches to the next write.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from chengeta_ai import CacheManager, SQLiteBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

HOLD = 8.0


class WriteLockHolder:
    """Another connection (another process, in effect) holding the file's write lock until
    `release` or `HOLD` seconds; `released_by_timeout` says which."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("BEGIN IMMEDIATE")
        self._release = threading.Event()
        self.released_by_timeout = False
        self._thread = threading.Thread(target=self._hold, daemon=True)
        self._thread.start()

    def _hold(self) -> None:
        self.released_by_timeout = not self._release.wait(HOLD)
        self._conn.execute("COMMIT")
        self._conn.close()

    def release(self) -> None:
        self._release.set()
        self._thread.join()


def _answer(messages: Any) -> list[str]:
    return ["the", "answer"]


def _cache(tmp_path: Path) -> StreamingResponseCache:
    backend = SQLiteBackend(
        tmp_path / "cache.sqlite3", max_entries=1000, touch_interval=0.0, timeout=30.0
    )
    return StreamingResponseCache(CacheManager(backend=backend))


def test_a_hit_does_not_wait_for_another_writer(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    list(cache.get_or_stream(["review s4"], _answer))
    holder = WriteLockHolder(tmp_path / "cache.sqlite3")
    try:
        hit = cache.get_or_stream(["review s4"], _answer)
        chunks = list(hit)
    finally:
        holder.release()
    assert chunks == ["the", "answer"]
    assert hit.cache_info is not None and hit.cache_info.status == "hit"
    # observed on main: the hit returned only once the other connection let go of the lock
    assert not holder.released_by_timeout, "the hit waited for another connection's write lock"


@pytest.mark.anyio
async def test_async_a_hit_does_not_wait_for_another_writer(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    _ = [c async for c in cache.aget_or_stream(["review s4"], _answer)]
    holder = WriteLockHolder(tmp_path / "cache.sqlite3")
    try:
        hit = cache.aget_or_stream(["review s4"], _answer)
        chunks = [c async for c in hit]
    finally:
        await anyio.to_thread.run_sync(holder.release)
    assert chunks == ["the", "answer"]
    assert hit.cache_info is not None and hit.cache_info.status == "hit"
    assert not holder.released_by_timeout, "the hit waited for another connection's write lock"
