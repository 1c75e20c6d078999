"""Review s4, finding: a wrong entry the cached client refuses is counted as a hit (MEDIUM).

When a cached client meets an entry it cannot serve (an entry of the other kind or endpoint:
`head_fits` fails), it drops it and tries again (`ClientCache.call` / ``_tries``). The first
try went through ``get_or_stream`` as a hit, and its counters stay: one call that was answered
by the upstream counts ``hits`` +1 *and* ``misses`` +1, and ``chunks_replayed`` +1 (the refused
head). ``stats().hits`` (and the OpenTelemetry ``chengeta_ai.streams{cache.status="hit"}`` /
Prometheus ``chengeta_ai_streams_total{status="hit"}`` fed by the same path) thus report hits
that never served anything: with a backend full of wrong entries (another version, a shared
backend) the hit ratio looks healthy while every call goes upstream.

Fix direction: count a refused entry as what it is (``corrupt_entries``) and not as a hit, e.g.
let the client check the head before the cache counts the hit (a head predicate handed to the
cache), or undo the hit's counters when the entry is refused.
"""

from __future__ import annotations

import anyio
import openai
import pytest

from chengeta_ai import CacheManager, cache_info_of, cached
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = pytest.mark.filterwarnings(
    r"ignore:Async generator '(openai|anthropic|httpx2?|httpcore2?)\.:ResourceWarning"
)


def _plant_whole_under_stream_key(
    oai: openai.OpenAI, cache: StreamingResponseCache, text: str
) -> None:
    client = cached(oai, cache)
    request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    whole = client.chat.completions.create(**request)
    stream = client.chat.completions.create(**request, stream=True)
    list(stream)
    info = cache_info_of(whole)
    assert info is not None and stream.cache_info is not None
    backend = cache.manager.backend
    whole_raw = backend.get(info.key)
    assert whole_raw is not None
    backend.set(stream.cache_info.key, whole_raw, None, ())


def test_refused_entry_is_not_a_hit(
    server: LocalOpenAIServer, oai: openai.OpenAI, text: str
) -> None:
    cache = StreamingResponseCache(CacheManager())
    _plant_whole_under_stream_key(oai, cache, text)
    before = cache.stats()
    request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    stream = cached(oai, cache).chat.completions.create(**request, stream=True)
    list(stream)
    after = cache.stats()
    assert stream.cache_info is not None and stream.cache_info.status == "miss"
    assert after.corrupt_entries - before.corrupt_entries == 1
    # observed on main: hits +1 (and chunks_replayed +1) for a call that was a miss
    assert (after.hits - before.hits, after.misses - before.misses) == (0, 1)
    assert after.chunks_replayed == before.chunks_replayed


@pytest.mark.anyio
async def test_async_refused_entry_is_not_a_hit(
    server: LocalOpenAIServer, aoai: openai.AsyncOpenAI, text: str
) -> None:
    cache = StreamingResponseCache(CacheManager())
    with openai.OpenAI(base_url=server.base_url, api_key="sk-local", max_retries=0) as oai:
        _plant_whole_under_stream_key(oai, cache, text)
    before = cache.stats()
    request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    stream = await cached(aoai, cache).chat.completions.create(**request, stream=True)
    _ = [c async for c in stream]
    await anyio.lowlevel.checkpoint()
    after = cache.stats()
    assert stream.cache_info is not None and stream.cache_info.status == "miss"
    assert (after.hits - before.hits, after.misses - before.misses) == (0, 1)
