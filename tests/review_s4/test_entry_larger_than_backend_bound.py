"""Review s4, finding: an entry larger than the backend's ``max_bytes`` is reported ``stored``,
and on SQLite it evicts every other entry on its way out (MEDIUM).

`StreamingResponseCache` bounds an entry by the manager's ``max_entry_bytes`` (16 MiB by
default); the backends have their own bounds (``InMemoryBackend(max_bytes=...)``,
``SQLiteBackend(path, max_bytes=...)``). Nothing reconciles the two. An entry between the
backend's ``max_bytes`` and ``max_entry_bytes`` (a 12 MiB answer in a ``max_bytes=10 MiB``
SQLite file, at the default ``max_entry_bytes``):

- is written, then evicted by the write's own bound, so it is never there to be read;
- is reported as stored: outcome ``stored``, ``stats().stores`` counted, ``.stored is True``;
  the next identical call is a ``miss`` again (and reports ``stored`` again), forever;
- on SQLite, the eviction runs oldest-first until the file is under ``max_bytes``, so it first
  drops *every other entry* of the file (a cache shared by processes loses everything each time
  such an answer is stored).

Fix direction: refuse an entry above the backend's bound before writing (the manager can take
``min(max_entry_bytes, backend.max_bytes)`` as its bound, counted as ``not_stored_oversized``),
or have the backend's eviction never evict others for an entry that cannot fit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from chengeta_ai import CacheManager, InMemoryBackend, SQLiteBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

BOUND = 4096
#: random text (does not compress) of about 3 x BOUND once encoded
BIG = [os.urandom(512).hex() for _ in range(12)]


def _backend(kind: str, tmp_path: Path) -> Any:
    if kind == "memory":
        return InMemoryBackend(max_bytes=BOUND)
    return SQLiteBackend(tmp_path / "cache.sqlite3", max_bytes=BOUND)


def _small(messages: Any) -> list[str]:
    return ["a small", "answer"]


def _big(messages: Any) -> list[str]:
    return BIG


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_an_entry_that_cannot_fit_is_reported_stored(kind: str, tmp_path: Path) -> None:
    cache = StreamingResponseCache(CacheManager(backend=_backend(kind, tmp_path)))
    stream = cache.get_or_stream(["big"], _big)
    assert list(stream) == BIG
    again = cache.get_or_stream(["big"], _big)
    list(again)
    assert stream.cache_info is not None and again.cache_info is not None
    # observed on main: outcome 'stored', then the next call a 'miss' (stored again, ...)
    assert (stream.cache_info.outcome == "stored") == (again.cache_info.status == "hit"), (
        f"reported {stream.cache_info.outcome!r}, next call {again.cache_info.status!r}"
    )


def test_sqlite_entry_that_cannot_fit_evicts_every_other_entry(tmp_path: Path) -> None:
    cache = StreamingResponseCache(CacheManager(backend=_backend("sqlite", tmp_path)))
    list(cache.get_or_stream(["small"], _small))
    list(cache.get_or_stream(["big"], _big))
    later = cache.get_or_stream(["small"], _small)
    list(later)
    assert later.cache_info is not None
    # observed on main: 'miss': the small entry was evicted to make room for one that never fit
    assert later.cache_info.status == "hit"


@pytest.mark.anyio
async def test_async_sqlite_entry_that_cannot_fit(tmp_path: Path) -> None:
    cache = StreamingResponseCache(CacheManager(backend=_backend("sqlite", tmp_path)))
    _ = [c async for c in cache.aget_or_stream(["small"], _small)]
    big = cache.aget_or_stream(["big"], _big)
    _ = [c async for c in big]
    later = cache.aget_or_stream(["small"], _small)
    _ = [c async for c in later]
    await anyio.lowlevel.checkpoint()
    assert big.cache_info is not None and later.cache_info is not None
    assert later.cache_info.status == "hit", "the small entry was evicted by one that never fit"
    assert big.cache_info.outcome != "stored"
