"""Review: a key builder written against the pre-issue-9 ``build()`` breaks every call.

`CacheManager` accepts "a CacheKeyBuilder (or [anything that has] its build() method)". Before
the per-call controls, the cache called ``key_builder.build(messages, model_id, params)``; it
now always calls ``build(messages, model_id, params, partition=partition)``, ``partition=None``
included, so a builder with the old signature (a subclass that overrides ``build`` to drop a
field before hashing, or a duck-typed one) fails with ``TypeError: ... unexpected keyword
argument 'partition'`` on *every* call, not only on calls that ask for a ``namespace``.
"""

from __future__ import annotations

from typing import Any

import pytest
from tests.helpers import Upstream

from chengeta_ai import CacheKeyBuilder, CacheManager, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

M = [{"role": "user", "content": "hello", "request_id": "r-1"}]
A = ["a1", "a2"]


class DropRequestIds(CacheKeyBuilder):
    """A builder of the documented kind: the seed's ``build(messages, model_id, params)``."""

    def build(  # type: ignore[override]
        self, messages: Any, model_id: str = "default", params: Any = None
    ) -> str:
        cleaned = [{k: v for k, v in m.items() if k != "request_id"} for m in messages]
        return super().build(cleaned, model_id, params)


def new_cache() -> StreamingResponseCache:
    return StreamingResponseCache(
        CacheManager(backend=InMemoryBackend(), key_builder=DropRequestIds())
    )


def test_a_seed_style_key_builder_still_works_without_a_namespace_sync() -> None:
    cache = new_cache()
    assert list(cache.get_or_stream(M, Upstream(A).sync)) == A
    other = [{"role": "user", "content": "hello", "request_id": "r-2"}]
    stream = cache.get_or_stream(other, Upstream(["x"]).sync)
    assert list(stream) == A
    assert stream.cache_info is not None and stream.cache_info.status == "hit"


@pytest.mark.anyio
async def test_a_seed_style_key_builder_still_works_without_a_namespace_async() -> None:
    cache = new_cache()
    assert [c async for c in cache.aget_or_stream(M, Upstream(A).asyncgen)] == A
