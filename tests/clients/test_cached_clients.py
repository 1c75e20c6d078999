"""`chengeta_ai.cached(client, cache)` through the real SDK clients over HTTP.

Every endpoint (Chat Completions, legacy Completions, Responses, Anthropic Messages), streamed
and not, sync (threads), asyncio and trio: a hit equals the miss object for object and carries
the same ``.response``; the SDKs' own stream helpers work over cached events; identical calls in
flight make one upstream request; errors and early closes store nothing.
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import anthropic
import anyio
import openai
import pytest
from tests.clients.fidelity import assert_identical

from chengeta_ai import CacheManager, cached
from chengeta_ai.clients import AsyncCachedStream, CachedStream
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = [
    # openai's and anthropic's AsyncStream leave their SSE decoder generators to the garbage
    # collector, which trio reports (see pyproject.toml): the SDKs' leak, not ours
    pytest.mark.filterwarnings(
        r"ignore:Async generator '(openai|anthropic|httpx2?|httpcore2?)\.:ResourceWarning"
    ),
]


class Api(NamedTuple):
    name: str
    provider: str  # "openai" or "anthropic"
    path: tuple[str, ...]  # the resource, from the client
    kwargs: Callable[[str], dict[str, Any]]
    counter: str  # RequestCounts field


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


APIS = [
    Api(
        "chat",
        "openai",
        ("chat", "completions"),
        lambda t: {
            "model": "gpt-4o-mini",
            "messages": _user(t),
            "stream_options": {"include_usage": True},
        },
        "chat_completions",
    ),
    Api(
        "completions",
        "openai",
        ("completions",),
        lambda t: {"model": "gpt-3.5-turbo-instruct", "prompt": t},
        "completions",
    ),
    Api(
        "responses",
        "openai",
        ("responses",),
        lambda t: {"model": "gpt-4o", "input": t},
        "responses",
    ),
    Api(
        "messages",
        "anthropic",
        ("messages",),
        lambda t: {"model": "claude-sonnet-4-6", "max_tokens": 256, "messages": _user(t)},
        "messages",
    ),
]
API_IDS = [api.name for api in APIS]


def _resource(client: Any, api: Api) -> Any:
    for part in api.path:
        client = getattr(client, part)
    return client


def _kwargs(api: Api, text: str, **extra: Any) -> dict[str, Any]:
    kwargs = api.kwargs(text)
    if api.name == "chat" and not extra.get("stream"):
        kwargs.pop("stream_options")
    return {**kwargs, **extra}


def _requests(server: LocalOpenAIServer, api: Api) -> int:
    return int(getattr(server.request_counts, api.counter))


def _same_response(a: Any, b: Any) -> None:
    assert a.status_code == b.status_code == 200
    assert list(a.headers.multi_items()) == list(b.headers.multi_items())
    request_id = "request-id" if a.headers.get("request-id") else "x-request-id"
    assert a.headers.get(request_id)
    assert a.http_version == b.http_version


@pytest.fixture
def clients(oai: openai.OpenAI, claude: anthropic.Anthropic) -> Callable[[Api], Any]:
    return lambda api: oai if api.provider == "openai" else claude


@pytest.fixture
def aclients(aoai: openai.AsyncOpenAI, aclaude: anthropic.AsyncAnthropic) -> Callable[[Api], Any]:
    return lambda api: aoai if api.provider == "openai" else aclaude


# -- streamed calls ------------------------------------------------------------------------------


@pytest.mark.parametrize("api", APIS, ids=API_IDS)
def test_stream_hit_equals_miss(
    api: Api,
    server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    clients: Callable[[Api], Any],
    text: str,
) -> None:
    resource = _resource(cached(clients(api), cache), api)
    before = _requests(server, api)
    with resource.create(**_kwargs(api, text, stream=True)) as first:
        assert isinstance(first, CachedStream)
        miss = list(first)
    with resource.create(**_kwargs(api, text, stream=True)) as second:
        hit = list(second)
    assert _requests(server, api) - before == 1
    assert len(miss) > 5
    assert_identical(hit, miss)
    _same_response(second.response, first.response)
    stats = cache.stats()
    assert (stats["misses"], stats["hits"], stats["stores"]) == (1, 1, 1)


@pytest.mark.anyio
@pytest.mark.parametrize("api", APIS, ids=API_IDS)
async def test_async_stream_hit_equals_miss(
    api: Api,
    server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    aclients: Callable[[Api], Any],
    text: str,
) -> None:
    resource = _resource(cached(aclients(api), cache), api)
    before = _requests(server, api)
    async with await resource.create(**_kwargs(api, text, stream=True)) as first:
        assert isinstance(first, AsyncCachedStream)
        miss = [chunk async for chunk in first]
    second = await resource.create(**_kwargs(api, text, stream=True))
    hit = [chunk async for chunk in second]
    await second.aclose()
    assert _requests(server, api) - before == 1
    assert_identical(hit, miss)
    _same_response(second.response, first.response)


def test_stream_is_the_sdks_shape(
    server: LocalOpenAIServer, cache: StreamingResponseCache, oai: openai.OpenAI, text: str
) -> None:
    """What code written for the SDK's Stream uses: iteration, next(), close(), .response."""
    client = cached(oai, cache)
    raw = oai.chat.completions.create(model="gpt-4o-mini", messages=_user(text), stream=True)
    for _ in range(2):  # miss, then hit
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=_user(text), stream=True
        )
        first = next(stream)
        assert type(first) is type(next(raw))
        assert stream.response.status_code == raw.response.status_code
        assert stream.response.headers["content-type"] == raw.response.headers["content-type"]
        assert stream.response.is_success and not stream.response.is_error
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason == "stop"
        stream.close()
        assert stream.response.is_closed
    raw.close()


# -- non-streamed calls ----------------------------------------------------------------------


@pytest.mark.parametrize("api", APIS, ids=API_IDS)
def test_object_hit_equals_miss(
    api: Api,
    server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    clients: Callable[[Api], Any],
    text: str,
) -> None:
    client = clients(api)
    resource = _resource(cached(client, cache), api)
    before = _requests(server, api)
    miss = resource.create(**_kwargs(api, text))
    hit = resource.create(**_kwargs(api, text))
    assert _requests(server, api) - before == 1
    assert_identical(hit, miss)
    direct = _resource(client, api).create(**_kwargs(api, text))
    assert type(direct) is type(miss)
    assert direct.model_fields_set == miss.model_fields_set


@pytest.mark.anyio
@pytest.mark.parametrize("api", APIS, ids=API_IDS)
async def test_async_object_hit_equals_miss(
    api: Api,
    server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    aclients: Callable[[Api], Any],
    text: str,
) -> None:
    resource = _resource(cached(aclients(api), cache), api)
    before = _requests(server, api)
    miss = await resource.create(**_kwargs(api, text))
    hit = await resource.create(**_kwargs(api, text))
    assert _requests(server, api) - before == 1
    assert_identical(hit, miss)


def test_streamed_and_whole_are_separate_entries(
    server: LocalOpenAIServer, cache: StreamingResponseCache, oai: openai.OpenAI, text: str
) -> None:
    client = cached(oai, cache)
    before = server.request_counts.chat_completions
    list(client.chat.completions.create(model="gpt-4o-mini", messages=_user(text), stream=True))
    client.chat.completions.create(model="gpt-4o-mini", messages=_user(text))
    client.chat.completions.create(model="gpt-4o-mini", messages=_user(text), stream=False)
    assert server.request_counts.chat_completions - before == 2


# -- the SDKs' stream helpers ------------------------------------------------------------------


def test_chat_stream_helper(
    server: LocalOpenAIServer, cache: StreamingResponseCache, oai: openai.OpenAI, text: str
) -> None:
    client = cached(oai, cache)
    before = server.request_counts.chat_completions
    runs = []
    for _ in range(2):
        with client.chat.completions.stream(model="gpt-4o-mini", messages=_user(text)) as stream:
            events = list(stream)
            runs.append((events, stream.get_final_completion()))
    assert server.request_counts.chat_completions - before == 1
    (miss_events, miss_final), (hit_events, hit_final) = runs
    assert {e.type for e in miss_events} >= {"chunk", "content.delta", "content.done"}
    assert_identical(hit_events, miss_events)
    assert_identical(hit_final, miss_final)
    assert miss_final.choices[0].message.content
    # the helper and create(stream=True) send the same request: one entry
    list(client.chat.completions.create(model="gpt-4o-mini", messages=_user(text), stream=True))
    assert server.request_counts.chat_completions - before == 1


def test_responses_stream_helper(
    server: LocalOpenAIServer, cache: StreamingResponseCache, oai: openai.OpenAI, text: str
) -> None:
    client = cached(oai, cache)
    before = server.request_counts.responses
    finals = []
    for _ in range(2):
        with client.responses.stream(model="gpt-4o", input=text) as stream:
            texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
            finals.append((texts, stream.get_final_response()))
    assert server.request_counts.responses - before == 1
    assert_identical(finals[1], finals[0])
    assert "".join(finals[0][0]) == finals[0][1].output_text


def test_messages_stream_helper(
    server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    claude: anthropic.Anthropic,
    text: str,
) -> None:
    client = cached(claude, cache)
    before = server.request_counts.messages
    runs = []
    for _ in range(2):
        with client.messages.stream(
            model="claude-sonnet-4-6", max_tokens=256, messages=_user(text)
        ) as stream:
            pieces = list(stream.text_stream)
            runs.append((pieces, stream.get_final_message(), stream.request_id))
    assert server.request_counts.messages - before == 1
    (miss_text, miss_final, miss_id), (hit_text, hit_final, hit_id) = runs
    assert hit_text == miss_text and "".join(miss_text) == miss_final.content[0].text
    assert_identical(hit_final, miss_final)
    assert miss_id and hit_id == miss_id
    # stream() and create(stream=True) share the entry
    with client.messages.create(
        model="claude-sonnet-4-6", max_tokens=256, messages=_user(text), stream=True
    ) as raw:
        assert [e.type for e in raw][-1] == "message_stop"
    assert server.request_counts.messages - before == 1


@pytest.mark.anyio
async def test_async_stream_helpers(
    server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    aoai: openai.AsyncOpenAI,
    aclaude: anthropic.AsyncAnthropic,
    text: str,
) -> None:
    client, claude = cached(aoai, cache), cached(aclaude, cache)
    before = server.request_counts
    chats, responses, messages = [], [], []
    for _ in range(2):
        async with client.chat.completions.stream(
            model="gpt-4o-mini", messages=_user(text)
        ) as chat:
            chats.append(await chat.get_final_completion())
        async with client.responses.stream(model="gpt-4o", input=text) as resp:
            responses.append(await resp.get_final_response())
        async with claude.messages.stream(
            model="claude-sonnet-4-6", max_tokens=256, messages=_user(text)
        ) as msg:
            pieces = [piece async for piece in msg.text_stream]
            messages.append((pieces, await msg.get_final_message()))
    after = server.request_counts
    assert (
        after.chat_completions - before.chat_completions,
        after.responses - before.responses,
        after.messages - before.messages,
    ) == (1, 1, 1)
    for runs in (chats, responses, messages):
        assert_identical(runs[1], runs[0])


# -- in-flight sharing ---------------------------------------------------------------------------


@pytest.mark.parametrize("api", APIS, ids=API_IDS)
def test_threads_share_one_upstream(
    api: Api,
    server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    clients: Callable[[Api], Any],
    text: str,
) -> None:
    resource = _resource(cached(clients(api), cache), api)
    before = _requests(server, api)
    barrier = threading.Barrier(8)
    results: list[list[Any]] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            barrier.wait()
            with resource.create(**_kwargs(api, text, stream=True)) as stream:
                results.append(list(stream))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert _requests(server, api) - before == 1
    for other in results[1:]:
        assert_identical(other, results[0])
    assert cache.stats()["joins"] + cache.stats()["hits"] == 7


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "object"])
@pytest.mark.parametrize("api", APIS, ids=API_IDS)
async def test_tasks_share_one_upstream(
    api: Api,
    stream: bool,
    server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    aclients: Callable[[Api], Any],
    text: str,
) -> None:
    resource = _resource(cached(aclients(api), cache), api)
    before = _requests(server, api)
    results: list[Any] = []

    async def call() -> None:
        result = await resource.create(**_kwargs(api, text, stream=stream))
        if stream:
            async with result:
                results.append([chunk async for chunk in result])
        else:
            results.append(result)

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(call)
    assert _requests(server, api) - before == 1
    assert cache.stats()["joins"] == 7
    for other in results[1:]:
        assert_identical(other, results[0])


# -- failures and early exits ------------------------------------------------------------------


def _fail(after: int, mode: str) -> dict[str, str]:
    return {"x-chengeta-fail-after": str(after), "x-chengeta-fail-mode": mode}


@pytest.mark.parametrize("api", APIS, ids=API_IDS)
def test_upstream_error_mid_stream_stores_nothing(
    api: Api,
    server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    clients: Callable[[Api], Any],
    text: str,
) -> None:
    client = clients(api)
    resource = _resource(cached(client, cache), api)
    kwargs = _kwargs(api, text, stream=True, extra_headers=_fail(4, "error"))

    def outcome(resource: Any) -> tuple[str, int]:
        """The exception the stream raised (or its last event's type), and its length."""
        seen: list[Any] = []
        try:
            with resource.create(**kwargs) as stream:
                seen.extend(stream)
        except (openai.APIError, anthropic.APIError) as exc:
            return type(exc).__name__, len(seen)
        return seen[-1].type, len(seen)  # Responses: the SDK yields the error events

    direct = outcome(_resource(client, api))
    before = _requests(server, api)
    assert outcome(resource) == direct
    assert outcome(resource) == direct
    assert _requests(server, api) - before == 2  # nothing was stored
    assert cache.stats()["stores"] == 0


def test_http_error_raised_at_the_call(
    cache: StreamingResponseCache, oai: openai.OpenAI, text: str
) -> None:
    client = cached(oai, cache)
    for stream in (True, False):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=_user(text), n=99, stream=stream
            )
    assert cache.stats()["stores"] == 0


@pytest.mark.anyio
async def test_async_http_error_raised_at_the_call(
    cache: StreamingResponseCache, aclaude: anthropic.AsyncAnthropic, text: str
) -> None:
    client = cached(aclaude, cache)
    for stream in (True, False):
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.create(
                model="claude-sonnet-4-6", max_tokens=64, messages=[], stream=stream
            )
    assert cache.stats()["stores"] == 0


def test_close_on_a_miss_stores_nothing(
    server: LocalOpenAIServer, cache: StreamingResponseCache, oai: openai.OpenAI, text: str
) -> None:
    client = cached(oai, cache)
    before = server.request_counts.chat_completions
    with client.chat.completions.create(
        model="gpt-4o-mini", messages=_user(text), stream=True
    ) as stream:
        next(stream)
        next(stream)
    assert cache.stats()["abandoned_cancelled"] == 1
    assert (
        len(
            list(
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=_user(text), stream=True
                )
            )
        )
        > 5
    )
    assert server.request_counts.chat_completions - before == 2
    assert cache.stats()["stores"] == 1


@pytest.mark.anyio
async def test_async_close_on_a_miss_stores_nothing(
    server: LocalOpenAIServer, cache: StreamingResponseCache, aoai: openai.AsyncOpenAI, text: str
) -> None:
    client = cached(aoai, cache)
    before = server.request_counts.responses
    async with await client.responses.create(model="gpt-4o", input=text, stream=True) as stream:
        await stream.__anext__()
    with anyio.fail_after(5):
        while cache.stats()["in_flight"]:
            await anyio.sleep(0.01)
    assert cache.stats()["stores"] == 0
    async with await client.responses.create(model="gpt-4o", input=text, stream=True) as stream:
        assert [e async for e in stream][-1].type == "response.completed"
    assert server.request_counts.responses - before == 2


# -- the rest of the client ------------------------------------------------------------------


def test_everything_else_passes_through(
    server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    oai: openai.OpenAI,
    claude: anthropic.Anthropic,
    text: str,
) -> None:
    client = cached(oai, cache)
    assert [m.id for m in client.models.list()] == server.models
    assert client.api_key == oai.api_key and client.wrapped is oai
    assert client.chat.completions.with_raw_response is not None
    other = client.with_options(timeout=30)
    assert other.wrapped is not oai and other.cache is cache
    before = server.request_counts.chat_completions
    for c in (client, other, client.copy()):  # timeout is transport: one entry
        list(c.chat.completions.create(model="gpt-4o-mini", messages=_user(text), stream=True))
    assert server.request_counts.chat_completions - before == 1
    assert [m.id for m in cached(claude, cache).models.list()] == server.anthropic_models


def test_cached_refuses_what_it_cannot_wrap(oai: openai.OpenAI) -> None:
    cache = StreamingResponseCache(CacheManager())
    with pytest.raises(TypeError, match=r"cached\(\) takes an openai\.OpenAI"):
        cached(object(), cache)
    with pytest.raises(TypeError, match="StreamingResponseCache"):
        cached(oai, CacheManager())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_joiner"):
        cached(oai, StreamingResponseCache(CacheManager(), chunk_joiner=list))


def test_unhashable_request_goes_upstream_uncached(
    server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    oai: openai.OpenAI,
    text: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = cached(oai, cache)
    before = server.request_counts.chat_completions
    with caplog.at_level(logging.WARNING, logger="chengeta_ai"):
        for _ in range(2):
            chunks = list(
                client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=_user(text),
                    stream=True,
                    # the SDK's JSON encoder writes datetimes; the key does not hash them
                    extra_body={"at": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)},
                )
            )
            assert chunks
    assert server.request_counts.chat_completions - before == 2
    assert sum("not cached" in r.getMessage() for r in caplog.records) == 1


# -- fail open -----------------------------------------------------------------------------------


def test_a_backend_that_is_down_never_breaks_the_call(
    server: LocalOpenAIServer, oai: openai.OpenAI, claude: anthropic.Anthropic, text: str
) -> None:
    from tests.test_cache_manager import DownBackend

    cache = StreamingResponseCache(CacheManager(DownBackend()))
    client, messages = cached(oai, cache), cached(claude, cache)
    for _ in range(2):  # every call a miss, every call whole
        with client.chat.completions.create(
            model="gpt-4o-mini", messages=_user(text), stream=True
        ) as stream:
            chunks = list(stream)
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert stream.response.status_code == 200
        assert client.responses.create(model="gpt-4o", input=text).output_text
        with messages.messages.stream(
            model="claude-sonnet-4-6", max_tokens=64, messages=_user(text)
        ) as s:
            assert s.get_final_text()
    stats = cache.stats()
    assert stats["stores"] == 0 and stats["not_stored_backend_error"] == 6
