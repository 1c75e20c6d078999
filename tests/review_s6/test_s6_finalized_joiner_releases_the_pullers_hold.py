"""Pre-existing on main (98a6aba) as well as on s6-pump (c3a02c2): not a SoloPull regression.

`SyncFlight.consume`'s ``finally`` gives back "a hold leaked by a Ctrl-C between acquire() and
its try" with ``if pull_lock._is_owned(): pull_lock.release()``. The pull lock is an RLock
owned by a *thread*, not by a consumer: when a consumer of the flight is finalized in the
thread that is reading the upstream for another consumer (the garbage collector runs during
the read and collects a dropped stream of the same key held in a reference cycle), that
``finally`` releases the reader's hold in the middle of its read. The upstream is then
unguarded (another thread may read it at the same time), and the reader's own release raises
``RuntimeError: cannot release un-acquired lock``: its caller's healthy stream is cut after
4 of 8 chunks with an error that is not the upstream's, and nothing is stored.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

from chengeta_ai import CacheManager
from chengeta_ai.backends.memory_backend import InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

CHUNKS = [f"tok{i}" for i in range(8)]


def test_a_joiner_collected_during_the_leaders_read_does_not_break_the_leader() -> None:
    cache = StreamingResponseCache(CacheManager(backend=InMemoryBackend()))
    messages = [{"role": "user", "content": "collected joiner"}]

    def upstream(_: Any) -> Iterator[str]:
        for i, chunk in enumerate(CHUNKS):
            if i == 4:
                gc.collect()  # an automatic collection that happens to run during this read
            yield chunk

    leader = cache.get_or_stream(messages, upstream)
    got = [next(leader), next(leader)]
    joiner = cache.get_or_stream(messages, upstream)  # same key, same thread: joins
    assert next(joiner) == CHUNKS[0]
    cycle: list[Any] = [joiner]
    cycle.append(cycle)  # dropped inside a reference cycle: only the collector frees it
    del joiner, cycle
    for chunk in leader:  # raised RuntimeError('cannot release un-acquired lock') at tok4
        got.append(chunk)
    assert got == CHUNKS
    stats = cache.stats()
    assert stats["stores"] == 1
    assert stats["chunks_delivered"] == len(CHUNKS) + 1
    key = cache.manager.key_builder.build(messages, "default", None)
    assert cache.manager.get(key) == CHUNKS
