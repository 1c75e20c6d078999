"""Review: a ``no_store`` leader's stream stored because a joiner wants it is stored with the
*leader's* ``ttl``/``tags``, and the joiner's own are dropped.

README: "a ``no_store`` leader's stream is stored if a caller without ``no_store`` joins it".
The flight is created with the leader's ``ttl`` and ``tags`` (`SyncFlight(settings, slot,
call.ttl, call.tags)`), and `FlightTable.join_or_lead` only flips ``wants_store``: the entry the
joiner caused is written with the ttl and tags of a caller that asked for nothing to be kept,
and without the joiner's. Tags are what ``invalidate`` removes by (a tenant's or a user's
entries): ``invalidate("user:42")`` misses the entry user 42's call stored.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest
from tests.helpers import Upstream

from chengeta_ai import CacheManager, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

M = [{"role": "user", "content": "tagged"}]
A = ["a1", "a2", "a3"]
LEADER = {"no_store": True, "tags": ["anonymous"]}
JOINER = {"tags": ["user:42"]}


def test_the_storing_joiners_tags_reach_the_entry_threads() -> None:
    cache = StreamingResponseCache(CacheManager(backend=InMemoryBackend()))
    up = Upstream(A, pause_at=1)
    leader = cache.get_or_stream(M, up.sync, cache_control=LEADER)
    assert next(leader) == "a1"
    joiner = cache.get_or_stream(M, up.sync, cache_control=JOINER)
    assert next(joiner) == "a1"
    up.thread_gate.set()
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(list(joiner)))
    t.start()
    assert list(leader) == A[1:]
    t.join(10)
    assert joiner.cache_info is not None and joiner.cache_info.outcome == "stored"
    assert cache.manager.invalidate("user:42") == 1, "the joiner's tags are not on its entry"


@pytest.mark.anyio
async def test_the_storing_joiners_tags_reach_the_entry_async() -> None:
    cache = StreamingResponseCache(CacheManager(backend=InMemoryBackend()))
    up = Upstream(A, pause_at=1)
    up.gate = anyio.Event()
    leader = cache.aget_or_stream(M, up.asyncgen, cache_control=LEADER)
    assert await leader.__anext__() == "a1"
    joiner = cache.aget_or_stream(M, up.asyncgen, cache_control=JOINER)
    assert await joiner.__anext__() == "a1"
    up.gate.set()
    assert [c async for c in leader] == A[1:]
    assert [c async for c in joiner] == A[1:]
    assert joiner.cache_info is not None and joiner.cache_info.outcome == "stored"
    assert await cache.manager.ainvalidate("user:42") == 1, "the joiner's tags are not on its entry"
