"""One entry, both modes: a whole call (``stream=False``) answered from its cached streamed twin,
assembled with the SDKs' own accumulators, equal to what the API returns for that request.
Through the real SDK clients over HTTP, sync and async (asyncio, trio)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest
from tests.clients.fidelity import assert_identical

from chengeta_ai import cached
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = pytest.mark.filterwarnings(
    r"ignore:Async generator '(openai|anthropic|httpx2?|httpcore2?)\.:ResourceWarning"
)


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


#: endpoint -> (resource path, whole-call arguments, the streamed twin's extra arguments)
TWINS: dict[str, tuple[tuple[str, ...], Callable[[str], dict[str, Any]], dict[str, Any]]] = {
    "chat": (
        ("chat", "completions"),
        lambda t: {"model": "gpt-4o-mini", "messages": _user(t)},
        {"stream_options": {"include_usage": True}},
    ),
    "responses": (("responses",), lambda t: {"model": "gpt-4o", "input": t}, {}),
    "messages": (
        ("messages",),
        lambda t: {"model": "claude-sonnet-4-6", "max_tokens": 256, "messages": _user(t)},
        {},
    ),
}


def _resource(client: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        client = getattr(client, part)
    return client


def _equal_to_api(assembled: Any, api: Any, twin_response: Any) -> None:
    """Field for field, all the way down: ``model_fields_set``, extras, JSON dump; and what
    the SDK sets on a whole reply (``_request_id``: the twin's, the request that made it)."""
    assert_identical(assembled, api)
    assert set(vars(assembled)) == set(vars(api))
    header = "request-id" if isinstance(api, anthropic.types.Message) else "x-request-id"
    assert assembled._request_id == twin_response.headers[header]
    assert api._request_id


@pytest.mark.parametrize("endpoint", list(TWINS))
def test_whole_call_served_from_streamed_twin(
    endpoint: str,
    server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    oai: openai.OpenAI,
    claude: anthropic.Anthropic,
    text: str,
) -> None:
    path, kwargs_of, twin_extra = TWINS[endpoint]
    raw = claude if endpoint == "messages" else oai
    client = _resource(cached(raw, cache), path)
    kwargs = kwargs_of(text)
    with client.create(**kwargs, **twin_extra, stream=True) as stream:
        assert list(stream)
    before = server.request_count
    whole = client.create(**kwargs)
    assert server.request_count == before  # no upstream call: assembled from the twin
    assert cache.stats()["cross_mode_hits"] == 1
    again = client.create(**kwargs)  # now a direct hit on the whole call's own entry
    assert again == whole and cache.stats()["cross_mode_hits"] == 1
    assert server.request_count == before
    _equal_to_api(whole, _resource(raw, path).create(**kwargs), stream.response)


@pytest.mark.anyio
@pytest.mark.parametrize("endpoint", list(TWINS))
async def test_async_whole_call_served_from_streamed_twin(
    endpoint: str,
    server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    aoai: openai.AsyncOpenAI,
    aclaude: anthropic.AsyncAnthropic,
    text: str,
) -> None:
    path, kwargs_of, twin_extra = TWINS[endpoint]
    raw = aclaude if endpoint == "messages" else aoai
    client = _resource(cached(raw, cache), path)
    kwargs = kwargs_of(text)
    async with await client.create(**kwargs, **twin_extra, stream=True) as stream:
        assert [e async for e in stream]
    before = server.request_count
    whole = await client.create(**kwargs)
    assert server.request_count == before
    assert cache.stats()["cross_mode_hits"] == 1
    _equal_to_api(whole, await _resource(raw, path).create(**kwargs), stream.response)


def test_no_usable_twin_goes_upstream(
    server: LocalOpenAIServer, cache: StreamingResponseCache, oai: openai.OpenAI, text: str
) -> None:
    """A chat stream without its usage chunk cannot make the whole reply (usage is part of
    it); an incomplete stream was never stored; legacy Completions have no accumulator."""
    client = cached(oai, cache)
    list(client.chat.completions.create(model="gpt-4o-mini", messages=_user(text), stream=True))
    with pytest.raises(openai.APIError):
        list(
            client.responses.create(
                model="gpt-4o",
                input=text,
                stream=True,
                extra_headers={"x-chengeta-fail-after": "4", "x-chengeta-fail-mode": "close"},
            )
        )
    list(client.completions.create(model="gpt-3.5-turbo-instruct", prompt=text, stream=True))
    before = server.request_count
    client.chat.completions.create(model="gpt-4o-mini", messages=_user(text))
    client.responses.create(model="gpt-4o", input=text)
    client.completions.create(model="gpt-3.5-turbo-instruct", prompt=text)
    assert server.request_count - before == 3
    assert cache.stats()["cross_mode_hits"] == 0


def test_a_streamed_call_is_never_made_from_a_whole_object(
    server: LocalOpenAIServer, cache: StreamingResponseCache, oai: openai.OpenAI, text: str
) -> None:
    client = cached(oai, cache)
    client.responses.create(model="gpt-4o", input=text)
    before = server.request_count
    with client.responses.create(model="gpt-4o", input=text, stream=True) as stream:
        assert list(stream)
    assert server.request_count - before == 1
