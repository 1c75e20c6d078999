"""Held (review s5): removals reach the cached SDK clients' calls in flight (the real openai
client over HTTP to the local demo server): a streamed call's stream and a whole call in
flight when ``invalidate`` runs are not stored after it; the next call is a miss."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import openai
import pytest

from chengeta_ai import CacheManager, cache_info_of, cached
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = [
    pytest.mark.filterwarnings(
        r"ignore:Async generator '(openai|anthropic|httpx2?|httpcore2?)\.:ResourceWarning"
    ),
]
MODEL = "gpt-4o-mini"


@pytest.fixture(scope="module")
def slow_server() -> Iterator[LocalOpenAIServer]:
    with LocalOpenAIServer(first_token_delay=0.05, token_interval=0.03, tokens=12) as srv:
        yield srv


def _messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_a_streamed_call_in_flight_during_invalidate_is_not_stored(
    slow_server: LocalOpenAIServer,
) -> None:
    cache = StreamingResponseCache(CacheManager())
    with openai.OpenAI(base_url=slow_server.base_url, api_key="sk", max_retries=0) as oai:
        client = cached(oai, cache)
        msgs = _messages("s5 streamed invalidate")
        with client.chat.completions.create(model=MODEL, messages=msgs, stream=True) as stream:
            chunks = []
            for i, chunk in enumerate(stream):
                chunks.append(chunk)
                if i == 0:
                    cache.manager.invalidate(f"model:{MODEL}")
        assert stream.cache_info.outcome == "invalidated"
        with client.chat.completions.create(model=MODEL, messages=msgs, stream=True) as again:
            assert len(list(again)) == len(chunks)
        assert again.cache_info.status == "miss"
        assert cache.stats().stores == 1
        assert cache.flights._stores == {}


def test_a_whole_call_in_flight_during_invalidate_is_not_stored(
    slow_server: LocalOpenAIServer,
) -> None:
    cache = StreamingResponseCache(CacheManager())
    with openai.OpenAI(base_url=slow_server.base_url, api_key="sk", max_retries=0) as oai:
        client = cached(oai, cache)
        msgs = _messages("s5 whole invalidate")
        got: list[Any] = []
        caller = threading.Thread(
            target=lambda: got.append(client.chat.completions.create(model=MODEL, messages=msgs))
        )
        caller.start()
        deadline = time.monotonic() + 10
        while cache.stats().in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        cache.manager.invalidate(f"model:{MODEL}")
        caller.join(10)
        info = cache_info_of(got[0])
        assert info is not None and info.outcome == "invalidated"
        again = client.chat.completions.create(model=MODEL, messages=msgs)
        info = cache_info_of(again)
        assert info is not None and info.status == "miss"


@pytest.mark.anyio
async def test_async_a_streamed_call_in_flight_during_ainvalidate_is_not_stored(
    slow_server: LocalOpenAIServer,
) -> None:
    cache = StreamingResponseCache(CacheManager())
    async with openai.AsyncOpenAI(
        base_url=slow_server.base_url, api_key="sk", max_retries=0
    ) as aoai:
        client = cached(aoai, cache)
        msgs = _messages("s5 async streamed invalidate")
        stream = await client.chat.completions.create(model=MODEL, messages=msgs, stream=True)
        async with stream:
            n = 0
            async for _chunk in stream:
                if n == 0:
                    await cache.manager.ainvalidate(f"model:{MODEL}")
                n += 1
        assert stream.cache_info.outcome == "invalidated"
        again = await client.chat.completions.create(model=MODEL, messages=msgs, stream=True)
        async with again:
            assert len([c async for c in again]) == n
        assert again.cache_info.status == "miss"
        await anyio.lowlevel.checkpoint()
        assert cache.flights._stores == {}
