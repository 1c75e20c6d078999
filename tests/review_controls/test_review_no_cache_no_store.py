"""Review: a ``no_cache`` + ``no_store`` call discards another caller's stream.

A caller that says ``no_cache=True, no_store=True`` ("give me a fresh answer, keep nothing of
mine") supersedes the stream of the key already in flight for another caller
(`FlightTable.join_or_lead` supersedes on ``newer_than`` whatever ``store`` says), so that
stream is not stored ("superseded"), and its own stream is not stored either (``no_store``):
the plain caller's miss, which wanted storing, is lost, and the entry is neither replaced nor
written. One caller's "do not store *mine*" decides what is kept of another caller's call;
README: "no_store: ... *this call's* miss is not stored".
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest
from tests.helpers import Upstream

from chengeta_ai import CacheManager, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

M = [{"role": "user", "content": "fresh and private"}]
A = ["a1", "a2", "a3"]
B = ["b1", "b2", "b3"]
PRIVATE = {"no_cache": True, "no_store": True}


def new_cache() -> StreamingResponseCache:
    return StreamingResponseCache(CacheManager(backend=InMemoryBackend()))


def test_a_private_refresh_does_not_discard_another_callers_miss_threads() -> None:
    cache = new_cache()
    plain = Upstream(A, pause_at=1)
    leader = cache.get_or_stream(M, plain.sync)
    assert next(leader) == "a1"
    private = cache.get_or_stream(M, Upstream(B).sync, cache_control=PRIVATE)
    assert list(private) == B
    assert private.cache_info is not None and private.cache_info.outcome == "no_store"
    plain.thread_gate.set()
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(list(leader)))
    t.start()
    t.join(10)
    assert out == [A[1:]]
    assert leader.cache_info is not None
    assert leader.cache_info.outcome == "stored", "the plain caller's miss was thrown away"
    assert list(cache.get_or_stream(M, Upstream(["x"]).sync)) == A


@pytest.mark.anyio
async def test_a_private_refresh_does_not_discard_another_callers_miss_async() -> None:
    cache = new_cache()
    plain = Upstream(A, pause_at=1)
    plain.gate = anyio.Event()
    leader = cache.aget_or_stream(M, plain.asyncgen)
    assert await leader.__anext__() == "a1"
    private = cache.aget_or_stream(M, Upstream(B).asyncgen, cache_control=PRIVATE)
    assert [c async for c in private] == B
    assert private.cache_info is not None and private.cache_info.outcome == "no_store"
    plain.gate.set()
    assert [c async for c in leader] == A[1:]
    assert leader.cache_info is not None
    assert leader.cache_info.outcome == "stored", "the plain caller's miss was thrown away"
    assert [c async for c in cache.aget_or_stream(M, Upstream(["x"]).asyncgen)] == A
