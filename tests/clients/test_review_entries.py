"""Adversarial review: a stored entry of the wrong kind under a cached client's key (written by
another version, a bug, or planted in a shared backend). The rule: a wrong entry is never served
and a failure inside the cache never breaks the caller's call: step aside to the upstream.
The twin lookup checks the entry's head (`HttpHead.stream`); the direct lookup does not.
Each test fails today."""

from __future__ import annotations

import anyio
import openai
import pytest

from chengeta_ai import CacheManager, cache_info_of, cached
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

REQUEST = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "review planted"}]}


def _keys_and_entries(client: openai.OpenAI, cache: StreamingResponseCache) -> tuple[str, str]:
    wrapped = cached(client, cache)
    whole = wrapped.chat.completions.create(**REQUEST)
    stream = wrapped.chat.completions.create(**REQUEST, stream=True)
    list(stream)
    whole_info = cache_info_of(whole)
    assert whole_info is not None and stream.cache_info is not None
    return whole_info.key, stream.cache_info.key


def test_whole_call_over_a_streamed_entry_raises_into_the_caller(
    server: LocalOpenAIServer,
) -> None:
    """The whole call's key holds a streamed call's entry: ``RuntimeError: a non-streamed
    call's entry holds 14 objects, not 1`` escapes from ``create(...)``."""
    cache = StreamingResponseCache(CacheManager())
    with openai.OpenAI(base_url=server.base_url, api_key="sk", max_retries=0) as raw:
        whole_key, stream_key = _keys_and_entries(raw, cache)
        backend = cache.manager.backend
        backend.set(whole_key, backend.get(stream_key), None, ())
        answer = cached(raw, cache).chat.completions.create(**REQUEST)
        assert type(answer) is openai.types.chat.ChatCompletion


def test_streamed_call_over_a_whole_entry_replays_a_whole_object_as_a_chunk(
    server: LocalOpenAIServer,
) -> None:
    """The streamed call's key holds a whole call's entry: the stream yields one
    ``ChatCompletion`` (not ``ChatCompletionChunk``s), reported as a ``hit``."""
    cache = StreamingResponseCache(CacheManager())
    with openai.OpenAI(base_url=server.base_url, api_key="sk", max_retries=0) as raw:
        whole_key, stream_key = _keys_and_entries(raw, cache)
        backend = cache.manager.backend
        backend.set(stream_key, backend.get(whole_key), None, ())
        chunks = list(cached(raw, cache).chat.completions.create(**REQUEST, stream=True))
        assert all(type(c) is openai.types.chat.ChatCompletionChunk for c in chunks)


@pytest.mark.anyio
async def test_async_streamed_call_over_a_whole_entry(server: LocalOpenAIServer) -> None:
    cache = StreamingResponseCache(CacheManager())
    with openai.OpenAI(base_url=server.base_url, api_key="sk", max_retries=0) as raw:
        whole_key, stream_key = _keys_and_entries(raw, cache)
    backend = cache.manager.backend
    backend.set(stream_key, backend.get(whole_key), None, ())
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="sk", max_retries=0) as araw:
        stream = await cached(araw, cache).chat.completions.create(**REQUEST, stream=True)
        chunks = [c async for c in stream]
        await anyio.lowlevel.checkpoint()
        assert all(type(c) is openai.types.chat.ChatCompletionChunk for c in chunks)
