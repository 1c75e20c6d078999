"""Adversarial review: a stored entry of the wrong kind under a cached client's key (written by
another version, a bug, or planted in a shared backend). The rule: a wrong entry is never served
and a failure inside the cache never breaks the caller's call: the head is checked before
anything is handed over, the entry is counted and dropped, and the call goes on (a miss, or a
whole call answered from its streamed twin). Each of the review's tests failed before the fix
(a whole call raised ``RuntimeError``; a streamed call replayed a whole object as a chunk).

Through the real SDK clients over HTTP, every endpoint, sync, asyncio and trio.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import anyio
import openai
import pytest
from tests.clients.fidelity import assert_identical
from tests.clients.test_cached_clients import API_IDS, APIS, Api, _kwargs, _requests, _resource

from chengeta_ai import CacheControl, CacheManager, CacheMiss, cache_info_of, cached
from chengeta_ai.backends.memory_backend import InMemoryBackend
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = pytest.mark.filterwarnings(
    r"ignore:Async generator '(openai|anthropic|httpx2?|httpcore2?)\.:ResourceWarning"
)

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
    call's entry holds 14 objects, not 1`` escaped from ``create(...)``."""
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
    """The streamed call's key holds a whole call's entry: the stream yielded one
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


# -- every endpoint, both swaps, sync and async ----------------------------------------------


@pytest.fixture
def clients(oai: openai.OpenAI, claude: anthropic.Anthropic) -> Callable[[Api], Any]:
    return lambda api: oai if api.provider == "openai" else claude


@pytest.fixture
def aclients(aoai: openai.AsyncOpenAI, aclaude: anthropic.AsyncAnthropic) -> Callable[[Api], Any]:
    return lambda api: aoai if api.provider == "openai" else aclaude


class Planted:
    """Both entries of one request (whole and streamed), as the API answered them, and a way to
    put one under the other's key."""

    def __init__(self, cache: StreamingResponseCache, whole: Any, chunks: list[Any]) -> None:
        self.cache = cache
        self.whole = whole
        self.chunks = chunks
        whole_info = cache_info_of(whole)
        assert whole_info is not None and whole_info.status == "miss"
        self.whole_key = whole_info.key

    def swap(self, stream_key: str, *, into_whole: bool) -> None:
        backend = self.cache.manager.backend
        whole_raw, stream_raw = backend.get(self.whole_key), backend.get(stream_key)
        assert whole_raw is not None and stream_raw is not None
        if into_whole:
            backend.set(self.whole_key, stream_raw, None, ())
        else:
            backend.set(stream_key, whole_raw, None, ())


def _check_whole(answer: Any, planted: Planted) -> None:
    """A whole call over a streamed entry: the API's object (from upstream, or assembled from
    its streamed twin), never an exception; the wrong entry counted and replaced."""
    assert_identical(answer, planted.whole)
    info = cache_info_of(answer)
    assert info is not None and info.status in ("miss", "hit")
    stats = planted.cache.stats()
    assert stats["corrupt_entries"] == 1
    assert stats["manager"]["corrupt_entries"] == 1


def _check_chunks(chunks: list[Any], planted: Planted) -> None:
    assert [type(c) for c in chunks] == [type(c) for c in planted.chunks]
    stats = planted.cache.stats()
    assert stats["corrupt_entries"] == 1
    assert stats["manager"]["corrupt_entries"] == 1


@pytest.mark.parametrize(
    "into_whole", [True, False], ids=["stream-under-whole", "whole-under-stream"]
)
@pytest.mark.parametrize("api", APIS, ids=API_IDS)
def test_an_entry_of_the_other_kind_is_never_served(
    api: Api,
    into_whole: bool,
    server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    clients: Callable[[Api], Any],
    text: str,
) -> None:
    resource = _resource(cached(clients(api), cache), api)
    whole = resource.create(**_kwargs(api, text))
    with resource.create(**_kwargs(api, text, stream=True)) as stream:
        chunks = list(stream)
    planted = Planted(cache, whole, chunks)
    assert stream.cache_info is not None
    planted.swap(stream.cache_info.key, into_whole=into_whole)
    if into_whole:
        _check_whole(resource.create(**_kwargs(api, text)), planted)
        again = resource.create(**_kwargs(api, text))  # the entry is the right kind now
        assert_identical(again, whole)
        assert cache_info_of(again).status == "hit"  # type: ignore[union-attr]
    else:
        before = _requests(server, api)
        with resource.create(**_kwargs(api, text, stream=True)) as second:
            assert second.cache_info is not None and second.cache_info.status == "miss"
            fresh = list(second)
        _check_chunks(fresh, planted)
        assert _requests(server, api) - before == 1
        with resource.create(**_kwargs(api, text, stream=True)) as third:
            assert third.cache_info is not None and third.cache_info.status == "hit"
            assert_identical(list(third), fresh)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "into_whole", [True, False], ids=["stream-under-whole", "whole-under-stream"]
)
@pytest.mark.parametrize("api", APIS, ids=API_IDS)
async def test_async_an_entry_of_the_other_kind_is_never_served(
    api: Api,
    into_whole: bool,
    server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    aclients: Callable[[Api], Any],
    text: str,
) -> None:
    resource = _resource(cached(aclients(api), cache), api)
    whole = await resource.create(**_kwargs(api, text))
    async with await resource.create(**_kwargs(api, text, stream=True)) as stream:
        chunks = [c async for c in stream]
    planted = Planted(cache, whole, chunks)
    assert stream.cache_info is not None
    planted.swap(stream.cache_info.key, into_whole=into_whole)
    if into_whole:
        _check_whole(await resource.create(**_kwargs(api, text)), planted)
        again = await resource.create(**_kwargs(api, text))
        assert_identical(again, whole)
        assert cache_info_of(again).status == "hit"  # type: ignore[union-attr]
    else:
        async with await resource.create(**_kwargs(api, text, stream=True)) as second:
            assert second.cache_info is not None and second.cache_info.status == "miss"
            fresh = [c async for c in second]
        _check_chunks(fresh, planted)
        async with await resource.create(**_kwargs(api, text, stream=True)) as third:
            assert third.cache_info is not None and third.cache_info.status == "hit"
            assert_identical([c async for c in third], fresh)


# -- another endpoint's entry, an entry without a head, only_if_cached, a failing delete -------


def test_another_endpoints_entry_is_never_served(
    server: LocalOpenAIServer, cache: StreamingResponseCache, oai: openai.OpenAI, text: str
) -> None:
    """A streamed Responses entry under a streamed chat call's key: both streamed, but of
    another endpoint (its head says so)."""
    client = cached(oai, cache)
    with client.responses.create(model="gpt-4o", input=text, stream=True) as events:
        list(events)
    request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    with client.chat.completions.create(**request, stream=True) as chunks:
        list(chunks)
    assert events.cache_info is not None and chunks.cache_info is not None
    backend = cache.manager.backend
    backend.set(chunks.cache_info.key, backend.get(events.cache_info.key), None, ())
    with client.chat.completions.create(**request, stream=True) as again:
        assert again.cache_info is not None and again.cache_info.status == "miss"
        assert all(type(c) is openai.types.chat.ChatCompletionChunk for c in again)
    assert cache.stats()["corrupt_entries"] == 1


def test_an_entry_without_a_head_is_never_served(
    server: LocalOpenAIServer, cache: StreamingResponseCache, oai: openai.OpenAI, text: str
) -> None:
    """An entry written by `get_or_stream` itself (no HTTP head) under a cached call's key."""
    plain = cache.get_or_stream([text], lambda _: iter(["not", "a", "chunk"]))
    assert list(plain) == ["not", "a", "chunk"]
    request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    client = cached(oai, cache)
    whole = client.chat.completions.create(**request)
    with client.chat.completions.create(**request, stream=True) as stream:
        chunks = list(stream)
    backend = cache.manager.backend
    assert plain.cache_info is not None and stream.cache_info is not None
    headless = backend.get(plain.cache_info.key)
    backend.set(stream.cache_info.key, headless, None, ())
    backend.set(cache_info_of(whole).key, headless, None, ())  # type: ignore[union-attr]
    with client.chat.completions.create(**request, stream=True) as again:
        assert [type(c) for c in again] == [type(c) for c in chunks]
    assert_identical(client.chat.completions.create(**request), whole)
    assert cache.stats()["corrupt_entries"] == 2


def test_only_if_cached_over_a_wrong_entry(
    server: LocalOpenAIServer, cache: StreamingResponseCache, oai: openai.OpenAI, text: str
) -> None:
    """``only_if_cached`` never goes upstream: a streamed call over a wrong entry raises
    `CacheMiss` (nothing can answer it) from ``create``; a whole call is answered from its
    streamed twin (which is there)."""
    client = cached(oai, cache)
    request = {"model": "gpt-4o", "input": text}
    whole = client.responses.create(**request)
    with client.responses.create(**request, stream=True) as stream:
        list(stream)
    assert stream.cache_info is not None
    planted = Planted(cache, whole, [])
    backend = cache.manager.backend
    stream_raw, whole_raw = backend.get(stream.cache_info.key), backend.get(planted.whole_key)
    backend.set(stream.cache_info.key, whole_raw, None, ())
    before = server.request_count
    only = CacheControl(only_if_cached=True)
    with pytest.raises(CacheMiss):
        client.responses.create(**request, stream=True, cache_control=only)
    backend.set(stream.cache_info.key, stream_raw, None, ())
    backend.set(planted.whole_key, stream_raw, None, ())
    answer = client.responses.create(**request, cache_control=only)
    assert_identical(answer, whole)
    assert cache_info_of(answer).status == "hit"  # type: ignore[union-attr]
    assert server.request_count == before
    assert cache.stats()["cross_mode_hits"] == 1


class _UndeletableBackend(InMemoryBackend):
    """A backend that reads and writes but cannot delete (a read-only replica, a failing
    ``DEL``): a wrong entry cannot be dropped."""

    def delete(self, key: str) -> bool:
        raise ConnectionError("delete refused")

    async def adelete(self, key: str) -> bool:
        raise ConnectionError("delete refused")


@pytest.mark.anyio
async def test_a_wrong_entry_that_cannot_be_deleted_is_replaced(
    server: LocalOpenAIServer, text: str
) -> None:
    """The cache refuses the entry before it counts a hit (its head does not fit): the call
    is a miss whose store replaces the entry (before that refusal moved into the cache, the
    call was tried again as a ``no_cache`` refresh)."""
    cache = StreamingResponseCache(CacheManager(backend=_UndeletableBackend()))
    request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="sk", max_retries=0) as raw:
        client = cached(raw, cache)
        whole = await client.chat.completions.create(**request)
        async with await client.chat.completions.create(**request, stream=True) as stream:
            chunks = [c async for c in stream]
        planted = Planted(cache, whole, chunks)
        assert stream.cache_info is not None
        planted.swap(stream.cache_info.key, into_whole=False)
        async with await client.chat.completions.create(**request, stream=True) as second:
            assert second.cache_info is not None and second.cache_info.status == "miss"
            assert [type(c) for c in [c async for c in second]] == [type(c) for c in chunks]
        assert cache.stats()["corrupt_entries"] == 1  # refused once, replaced by the miss
        async with await client.chat.completions.create(**request, stream=True) as third:
            assert third.cache_info is not None and third.cache_info.status == "hit"
            assert [type(c) for c in [c async for c in third]] == [type(c) for c in chunks]
