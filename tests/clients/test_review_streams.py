"""Adversarial review of the cached clients' stream objects: ``stream.response`` must be what
SDK code reads from an ``openai.Stream``'s (or ``anthropic.Stream``'s) response. It was a
stand-in whose ``url`` was a ``str`` and that had no ``request`` or ``elapsed``; it is now the
SDK's own HTTP library ``Response`` class, rebuilt from the recorded head.

(The review's tiny-``speed`` tests of this file are in test_review_replay_speed.py.)
Every endpoint, on a miss and a hit, sync, asyncio and trio, through the real SDK clients.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest
from tests.clients.test_cached_clients import API_IDS, APIS, Api, _kwargs, _resource

from chengeta_ai import CacheManager, cached
from chengeta_ai.clients.recorded import head_of, recorded_response
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = pytest.mark.filterwarnings(
    r"ignore:Async generator '(openai|anthropic|httpx2?|httpcore2?)\.:ResourceWarning"
)

REQUEST = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "review stream response"}],
    "stream": True,
}


def test_stream_response_is_not_the_sdk_response_kind(server: LocalOpenAIServer) -> None:
    """``stream.response`` on a miss and a hit lacked what SDK code reads from an
    ``openai.Stream``'s ``httpx.Response``: ``.url`` was a ``str`` (not a URL: ``.url.path``
    failed), ``.request`` and ``.elapsed`` were missing."""
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


_NOT_RECORDED = {"connection", "keep-alive", "transfer-encoding", "set-cookie"}


def _like_the_sdks(cached_response: Any, sdk_response: Any) -> None:
    """What SDK code reads from ``stream.response``, the same as on the SDK's own stream."""
    assert type(cached_response) is type(sdk_response)
    assert cached_response.status_code == sdk_response.status_code == 200
    assert cached_response.reason_phrase == sdk_response.reason_phrase
    assert cached_response.http_version == sdk_response.http_version
    assert type(cached_response.url) is type(sdk_response.url)
    assert cached_response.url == sdk_response.url
    assert cached_response.request.method == sdk_response.request.method == "POST"
    assert cached_response.request.url == sdk_response.request.url
    assert isinstance(cached_response.elapsed, datetime.timedelta)
    assert type(cached_response.headers) is type(sdk_response.headers)
    # (the SDK's call and the cached miss are two requests: their ``date`` may differ by 1 s)
    recorded = [
        (k, v)
        for k, v in sdk_response.headers.multi_items()
        if k.lower() not in _NOT_RECORDED and k.lower() != "date"
    ]
    got = [(k, v) for k, v in cached_response.headers.multi_items() if k.lower() != "date"]
    assert got == recorded
    assert cached_response.headers["date"]
    assert cached_response.is_success and not cached_response.is_error
    assert cached_response.raise_for_status() is cached_response
    assert cached_response.headers.get("content-type", "").startswith("text/event-stream")


@pytest.fixture
def clients(oai: openai.OpenAI, claude: anthropic.Anthropic) -> Callable[[Api], Any]:
    return lambda api: oai if api.provider == "openai" else claude


@pytest.fixture
def aclients(aoai: openai.AsyncOpenAI, aclaude: anthropic.AsyncAnthropic) -> Callable[[Api], Any]:
    return lambda api: aoai if api.provider == "openai" else aclaude


@pytest.mark.parametrize("api", APIS, ids=API_IDS)
def test_stream_response_is_the_sdks_http_response(
    api: Api, server: LocalOpenAIServer, clients: Callable[[Api], Any], text: str
) -> None:
    cache = StreamingResponseCache(CacheManager())
    raw = clients(api)
    with _resource(raw, api).create(**_kwargs(api, text, stream=True)) as sdk:
        list(sdk)
    resource = _resource(cached(raw, cache), api)
    for status in ("miss", "hit"):
        stream = resource.create(**_kwargs(api, text, stream=True))
        assert stream.cache_info.status == status
        _like_the_sdks(stream.response, sdk.response)
        assert not stream.response.is_closed
        next(stream)
        if status == "miss":
            list(stream)  # stored
        stream.response.close()  # as the SDK's helpers close a stream: through its response
        assert stream.response.is_closed
        assert stream.cache_info.outcome == ("stored" if status == "miss" else "abandoned")
        with pytest.raises(StopIteration):
            next(stream)
    with resource.create(**_kwargs(api, text, stream=True)) as stream:
        list(stream)
    assert stream.response.is_closed  # closed by the with block, built after it


@pytest.mark.anyio
@pytest.mark.parametrize("api", APIS, ids=API_IDS)
async def test_async_stream_response_is_the_sdks_http_response(
    api: Api, server: LocalOpenAIServer, aclients: Callable[[Api], Any], text: str
) -> None:
    cache = StreamingResponseCache(CacheManager())
    raw = aclients(api)
    async with await _resource(raw, api).create(**_kwargs(api, text, stream=True)) as sdk:
        [c async for c in sdk]
    resource = _resource(cached(raw, cache), api)
    for status in ("miss", "hit"):
        stream = await resource.create(**_kwargs(api, text, stream=True))
        assert stream.cache_info.status == status
        _like_the_sdks(stream.response, sdk.response)
        await stream.__anext__()
        if status == "miss":
            [c async for c in stream]  # stored
        await stream.response.aclose()  # as the SDK's AsyncStream.close() does
        assert stream.response.is_closed
        assert stream.cache_info.outcome == ("stored" if status == "miss" else "abandoned")
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        with pytest.raises(RuntimeError, match="sync close on an async stream"):
            stream.response.close()  # as on the SDK's own async response


def test_a_header_outside_ascii_is_kept() -> None:
    """A header value the HTTP library decoded as UTF-8 or Latin-1 (a proxy's) is rebuilt as
    the same str (the HTTP library refuses such a str as a header value)."""
    import httpx2

    for raw in ("café".encode(), "café".encode("latin-1")):
        original = httpx2.Response(
            200,
            headers=[(b"x-proxy", raw), (b"x-request-id", b"r1")],
            request=httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions"),
        )
        head = head_of(original, stream=True, endpoint="openai.chat.completions")
        rebuilt = recorded_response(httpx2, head, elapsed=0.0, close=lambda: None, is_async=False)
        assert rebuilt.headers["x-proxy"] == original.headers["x-proxy"] == "café"
        assert rebuilt.headers["x-request-id"] == "r1"
