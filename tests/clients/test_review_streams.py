"""Adversarial review of the cached clients' stream objects and per-call replay controls
(issues 8 and 9). Each test fails today."""

from __future__ import annotations

import openai
import pytest

from chengeta_ai import CacheControl, CacheManager, cached
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

REQUEST = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "review stream response"}],
    "stream": True,
}


def test_stream_response_is_not_the_sdk_response_kind(server: LocalOpenAIServer) -> None:
    """``stream.response`` on a miss and a hit lacks what SDK code reads from an
    ``openai.Stream``'s ``httpx.Response``: ``.url`` is a ``str`` (not a URL: ``.url.path``
    fails), ``.request`` and ``.elapsed`` are missing."""
    cache = StreamingResponseCache(CacheManager())
    with openai.OpenAI(base_url=server.base_url, api_key="sk", max_retries=0) as raw:
        client = cached(raw, cache)
        sdk = raw.chat.completions.create(**REQUEST)
        list(sdk)
        for _ in ("miss", "hit"):
            stream = client.chat.completions.create(**REQUEST)
            list(stream)
            assert isinstance(stream.response.url, type(sdk.response.url))
            assert stream.response.url.path == sdk.response.url.path
            assert stream.response.request.method == sdk.response.request.method


@pytest.mark.parametrize("speed", [5e-324, 1e-300])
def test_tiny_replay_speed_raises_overflow_from_inside_the_cache(
    server: LocalOpenAIServer, speed: float
) -> None:
    """``CacheControl`` accepts any positive finite ``speed``; a recorded replay then divides
    the recorded offset by it and ``time.sleep`` raises ``OverflowError`` out of the cache
    into the caller (the call itself fails, on a hit). Either refuse the value at
    ``CacheControl`` or clamp the delay."""
    cache = StreamingResponseCache(CacheManager())
    with openai.OpenAI(base_url=server.base_url, api_key="sk", max_retries=0) as raw:
        client = cached(raw, cache)
        list(client.chat.completions.create(**REQUEST))
        try:
            control = CacheControl(replay="recorded", speed=speed)
        except ValueError:
            return  # refused up front: fine
        client.chat.completions.create(**REQUEST, cache_control=control)


@pytest.mark.anyio
async def test_tiny_replay_speed_hangs_an_async_hit() -> None:
    """Async twin of the above: ``anyio.sleep(1e297)`` never returns (asyncio and trio)."""
    import anyio
    import anyio.lowlevel

    from chengeta_ai import CacheManager as Manager

    cache = StreamingResponseCache(Manager())
    messages = [{"role": "user", "content": "review tiny speed"}]

    def upstream(_: object) -> object:
        yield "a"
        yield "b"

    list(cache.get_or_stream(messages, upstream))
    try:
        control = CacheControl(replay="recorded", speed=1e-300)
    except ValueError:
        return
    with anyio.move_on_after(2) as scope:
        chunks = [c async for c in cache.aget_or_stream(messages, upstream, cache_control=control)]
    assert not scope.cancelled_caught, "the paced hit was still sleeping after 2 s"
    assert chunks == ["a", "b"]
