"""`StreamingResponseCache` end to end: the real ``openai`` clients over HTTP to a local server.

Most tests have one body for both twins: ``twin`` is ``sync`` (``openai.OpenAI`` +
``get_or_stream``, driven in a worker thread) or ``async`` (``openai.AsyncOpenAI`` +
``aget_or_stream`` with the page's ``async_stream_fn`` pattern); every test runs on asyncio and
on trio. Upstream calls are counted by the server (`LocalOpenAIServer.request_count`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from chengeta_ai import CacheKeyBuilder, CacheManager, InMemoryBackend
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = pytest.mark.anyio

MODEL = "gpt-4o-mini"
Messages = list[dict[str, str]]


def _new_cache(**kwargs: Any) -> StreamingResponseCache:
    manager = CacheManager(backend=InMemoryBackend(), key_builder=CacheKeyBuilder())
    return StreamingResponseCache(manager, **kwargs)


@pytest.fixture
def cache() -> StreamingResponseCache:
    return _new_cache()


def _text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def assert_same_chunks(replayed: list[Any], live: list[Any]) -> None:
    """A replay must be indistinguishable from the live stream, chunk for chunk."""
    assert len(replayed) == len(live)
    assert [type(c) for c in replayed] == [type(c) for c in live]
    assert all(type(c) is ChatCompletionChunk for c in live)
    assert replayed == live
    assert [c.model_dump(exclude_unset=True) for c in replayed] == [
        c.model_dump(exclude_unset=True) for c in live
    ]
    obfuscation = [getattr(c, "obfuscation", None) for c in live]
    assert all(isinstance(o, str) and o for o in obfuscation)
    assert [getattr(c, "obfuscation", None) for c in replayed] == obfuscation
    # The SDK's attribute access works on replayed chunks as on live ones.
    assert [c.choices[0].delta.content for c in replayed if c.choices] == [
        c.choices[0].delta.content for c in live if c.choices
    ]


# -- the two twins -------------------------------------------------------------------------


@dataclass
class SyncTwin:
    """``openai.OpenAI`` + ``get_or_stream``, consumed in a worker thread."""

    client: openai.OpenAI
    name: str = "sync"

    async def collect(
        self,
        cache: StreamingResponseCache,
        messages: Messages,
        *,
        got: list[Any] | None = None,
        headers: dict[str, str] | None = None,
        limit: int | None = None,
        model: str = MODEL,
        stream_options: dict[str, Any] | None = None,
    ) -> list[Any]:
        got = [] if got is None else got
        extra: dict[str, Any] = {"extra_headers": headers}
        if stream_options is not None:
            extra["stream_options"] = stream_options

        def stream_fn(messages: Messages) -> Any:
            return self.client.chat.completions.create(
                model=model, messages=messages, stream=True, **extra
            )

        def run() -> None:
            gen = cache.get_or_stream(messages, stream_fn, model_id=model)
            with contextlib.closing(gen):
                for chunk in gen:
                    got.append(chunk)
                    if limit is not None and len(got) >= limit:
                        break

        await anyio.to_thread.run_sync(run)
        return got


@dataclass
class AsyncTwin:
    """``openai.AsyncOpenAI`` + ``aget_or_stream`` with the page's async generator pattern."""

    client: openai.AsyncOpenAI
    name: str = "async"

    async def collect(
        self,
        cache: StreamingResponseCache,
        messages: Messages,
        *,
        got: list[Any] | None = None,
        headers: dict[str, str] | None = None,
        limit: int | None = None,
        model: str = MODEL,
        stream_options: dict[str, Any] | None = None,
    ) -> list[Any]:
        got = [] if got is None else got
        extra: dict[str, Any] = {"extra_headers": headers}
        if stream_options is not None:
            extra["stream_options"] = stream_options

        async def async_stream_fn(messages: Messages) -> AsyncIterator[Any]:
            async for chunk in await self.client.chat.completions.create(
                model=model, messages=messages, stream=True, **extra
            ):
                yield chunk

        agen = cache.aget_or_stream(messages, async_stream_fn, model_id=model)
        async with contextlib.aclosing(agen):
            async for chunk in agen:
                got.append(chunk)
                if limit is not None and len(got) >= limit:
                    break
        return got


Twin = SyncTwin | AsyncTwin


@pytest.fixture(params=["sync", "async"])
async def twin(request: pytest.FixtureRequest, server: LocalOpenAIServer) -> AsyncIterator[Twin]:
    if request.param == "sync":
        with openai.OpenAI(base_url=server.base_url, api_key="local", max_retries=0) as client:
            yield SyncTwin(client)
    else:
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key="local", max_retries=0
        ) as aclient:
            yield AsyncTwin(aclient)


@pytest.fixture
def upstream_calls(server: LocalOpenAIServer) -> Callable[[], int]:
    """Completion requests the server has served since the test started."""
    start = server.request_count
    return lambda: server.request_count - start


def _direct(server: LocalOpenAIServer, messages: Messages, **kwargs: Any) -> list[Any]:
    """The stream as the SDK returns it without any cache (one upstream call)."""
    with openai.OpenAI(base_url=server.base_url, api_key="local", max_retries=0) as client:
        return list(
            client.chat.completions.create(model=MODEL, messages=messages, stream=True, **kwargs)  # type: ignore[arg-type]
        )


# -- both twins ------------------------------------------------------------------------------


async def test_miss_then_hit(
    twin: Twin,
    cache: StreamingResponseCache,
    prompt: Messages,
    server: LocalOpenAIServer,
    upstream_calls: Callable[[], int],
) -> None:
    live = await twin.collect(cache, prompt)
    assert upstream_calls() == 1
    replayed = await twin.collect(cache, prompt)
    assert upstream_calls() == 1  # the hit never reached the server
    assert len(live) == server.tokens + 2
    assert_same_chunks(replayed, live)
    assert _text(replayed).strip()

    stats = cache.stats()
    assert stats["misses"] == 1
    # A hit: from the stored entry, or (if the store is still being written when the second
    # call arrives) by joining the finished in-flight stream; never upstream.
    assert stats["hits"] + stats.get("joins", 0) == 1
    assert stats["stores"] == 1
    assert stats["stored_chunks"] == len(live)
    assert stats["stored_bytes"] > 0


async def test_live_stream_matches_the_uncached_sdk_stream(
    twin: Twin, cache: StreamingResponseCache, prompt: Messages, server: LocalOpenAIServer
) -> None:
    """A miss forwards the upstream chunks unchanged (the server is deterministic per prompt)."""
    direct = _direct(server, prompt)
    live = await twin.collect(cache, prompt)
    assert_same_chunks(live, direct)


async def test_usage_chunk_is_replayed(
    twin: Twin,
    cache: StreamingResponseCache,
    prompt: Messages,
    upstream_calls: Callable[[], int],
) -> None:
    opts = {"include_usage": True}
    live = await twin.collect(cache, prompt, stream_options=opts)
    replayed = await twin.collect(cache, prompt, stream_options=opts)
    assert upstream_calls() == 1
    assert live[-1].choices == []
    assert live[-1].usage is not None
    assert_same_chunks(replayed, live)
    assert replayed[-1].usage == live[-1].usage


async def test_model_id_is_part_of_the_key(
    twin: Twin, cache: StreamingResponseCache, prompt: Messages, upstream_calls: Callable[[], int]
) -> None:
    a = await twin.collect(cache, prompt, model="gpt-4o-mini")
    b = await twin.collect(cache, prompt, model="gpt-4o")
    assert upstream_calls() == 2
    assert {c.model for c in a} == {"gpt-4o-mini"}
    assert {c.model for c in b} == {"gpt-4o"}
    assert await twin.collect(cache, prompt, model="gpt-4o") == b
    assert upstream_calls() == 2


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        pytest.param("close", openai.APIConnectionError, id="connection-dropped"),
        pytest.param("error", openai.APIError, id="error-event"),
    ],
)
async def test_upstream_failure_mid_stream_reaches_caller_and_stores_nothing(
    twin: Twin,
    cache: StreamingResponseCache,
    prompt: Messages,
    server: LocalOpenAIServer,
    upstream_calls: Callable[[], int],
    mode: str,
    error: type[Exception],
) -> None:
    got: list[Any] = []
    headers = {"x-chengeta-fail-after": "5", "x-chengeta-fail-mode": mode}
    with pytest.raises(error):
        await twin.collect(cache, prompt, got=got, headers=headers)
    assert len(got) == 5  # the chunks before the failure were forwarded live
    assert upstream_calls() == 1
    assert cache.stats()["stores"] == 0

    # Nothing was stored: the next identical request goes upstream again, and is then cached.
    full = await twin.collect(cache, prompt)
    assert upstream_calls() == 2
    assert len(full) == server.tokens + 2
    assert full[:5] == got
    assert await twin.collect(cache, prompt) == full
    assert upstream_calls() == 2
    assert cache.stats()["stores"] == 1


async def test_stream_the_server_ends_cleanly_half_way_is_delivered_not_stored(
    twin: Twin,
    cache: StreamingResponseCache,
    prompt: Messages,
    server: LocalOpenAIServer,
    upstream_calls: Callable[[], int],
) -> None:
    # the body ends properly after 5 events: no finish_reason, no [DONE]; the SDK sees a
    # normal end, and so would a cache that stored on any normal end
    headers = {"x-chengeta-fail-after": "5", "x-chengeta-fail-mode": "end"}
    cut = await twin.collect(cache, prompt, headers=headers)
    assert len(cut) == 5
    assert all(c.choices[0].finish_reason is None for c in cut)
    assert cache.stats()["stores"] == 0
    assert cache.stats()["not_stored_incomplete"] == 1
    full = await twin.collect(cache, prompt)
    assert upstream_calls() == 2  # not a hit of the cut stream
    assert full[:5] == cut and full[-1].choices[0].finish_reason == "stop"
    assert cache.stats()["stores"] == 1


async def test_caller_breaking_early_stores_nothing(
    twin: Twin,
    cache: StreamingResponseCache,
    prompt: Messages,
    server: LocalOpenAIServer,
    upstream_calls: Callable[[], int],
) -> None:
    partial = await twin.collect(cache, prompt, limit=3)
    assert len(partial) == 3
    assert upstream_calls() == 1
    assert cache.stats()["stores"] == 0

    full = await twin.collect(cache, prompt)
    assert upstream_calls() == 2
    assert len(full) == server.tokens + 2
    assert full[:3] == partial
    assert await twin.collect(cache, prompt) == full
    assert upstream_calls() == 2


# -- async specifics -------------------------------------------------------------------------


@pytest.fixture
async def aclient(server: LocalOpenAIServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=server.base_url, api_key="local", max_retries=0
    ) as client:
        yield client


async def _acollect(cache: StreamingResponseCache, messages: Messages, stream_fn: Any) -> list[Any]:
    return [c async for c in cache.aget_or_stream(messages, stream_fn, model_id=MODEL)]


async def test_async_create_coroutine_passed_directly(
    aclient: openai.AsyncOpenAI,
    cache: StreamingResponseCache,
    prompt: Messages,
    server: LocalOpenAIServer,
    upstream_calls: Callable[[], int],
) -> None:
    """``stream_fn`` may return the ``create(stream=True)`` coroutine itself."""

    def stream_fn(messages: Messages) -> Any:
        return aclient.chat.completions.create(model=MODEL, messages=messages, stream=True)  # type: ignore[arg-type]

    live = await _acollect(cache, prompt, stream_fn)
    replayed = await _acollect(cache, prompt, stream_fn)
    assert upstream_calls() == 1
    assert_same_chunks(replayed, live)
    assert_same_chunks(live, _direct(server, prompt))


async def test_async_stream_fn_returning_the_awaited_stream(
    aclient: openai.AsyncOpenAI,
    cache: StreamingResponseCache,
    prompt: Messages,
    upstream_calls: Callable[[], int],
) -> None:
    """``async def stream_fn`` that returns the SDK's ``AsyncStream`` (an awaitable of one)."""

    async def stream_fn(messages: Messages) -> Any:
        return await aclient.chat.completions.create(model=MODEL, messages=messages, stream=True)  # type: ignore[arg-type]

    live = await _acollect(cache, prompt, stream_fn)
    replayed = await _acollect(cache, prompt, stream_fn)
    assert upstream_calls() == 1
    assert_same_chunks(replayed, live)


async def test_sync_store_async_hit(
    aclient: openai.AsyncOpenAI,
    cache: StreamingResponseCache,
    prompt: Messages,
    server: LocalOpenAIServer,
    upstream_calls: Callable[[], int],
) -> None:
    """Both twins share one cache: a stream stored by ``get_or_stream`` replays asynchronously."""
    with openai.OpenAI(base_url=server.base_url, api_key="local", max_retries=0) as client:
        live = await SyncTwin(client).collect(cache, prompt)
    replayed = await AsyncTwin(aclient).collect(cache, prompt)
    assert upstream_calls() == 1
    assert_same_chunks(replayed, live)


# -- chunk_joiner (the page's snippet) ---------------------------------------------------------


async def test_chunk_joiner_from_the_page(
    twin: Twin, prompt: Messages, server: LocalOpenAIServer, upstream_calls: Callable[[], int]
) -> None:
    stream_cache = _new_cache(
        chunk_joiner=lambda chunks: "".join(c.choices[0].delta.content or "" for c in chunks),
    )
    live = await twin.collect(stream_cache, prompt)
    assert_same_chunks(live, _direct(server, prompt))  # the live stream is untouched
    assert upstream_calls() == 2  # (one for the reference stream above)

    replayed = await twin.collect(stream_cache, prompt)
    assert upstream_calls() == 2
    # The stored value is the joined text; what a hit yields carries exactly that text.
    pieces = [r if isinstance(r, str) else _text([r]) for r in replayed]
    assert "".join(pieces) == _text(live)
    assert stream_cache.stats()["stores"] == 1


# -- concurrent identical requests ---------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_server() -> Iterator[LocalOpenAIServer]:
    """First token after 0.2 s: identical callers started together all arrive in flight."""
    with LocalOpenAIServer(first_token_delay=0.2, token_interval=0.001, tokens=20) as srv:
        yield srv


@pytest.mark.parametrize("kind", ["threads", "tasks"])
async def test_concurrent_identical_requests_share_one_upstream_call(
    slow_server: LocalOpenAIServer, prompt: Messages, kind: str
) -> None:
    """8 callers at once (real threads with ``openai.OpenAI``, or real tasks with
    ``openai.AsyncOpenAI``): one upstream request, everyone gets the whole stream."""
    callers = 8
    cache = _new_cache()
    before = slow_server.request_count
    results: list[list[Any]] = []
    with openai.OpenAI(base_url=slow_server.base_url, api_key="local", max_retries=0) as client:
        async with openai.AsyncOpenAI(
            base_url=slow_server.base_url, api_key="local", max_retries=0
        ) as aclient:
            twin: Twin = SyncTwin(client) if kind == "threads" else AsyncTwin(aclient)

            async def one() -> None:
                results.append(await twin.collect(cache, prompt))

            async with anyio.create_task_group() as tg:
                for _ in range(callers):
                    tg.start_soon(one)
    assert slow_server.request_count - before == 1
    assert len(results) == callers
    reference = _direct(slow_server, prompt)
    for chunks in results:
        assert_same_chunks(chunks, reference)
    stats = cache.stats()
    assert stats["misses"] + stats["joins"] + stats["hits"] == callers
    assert stats["misses"] == 1


async def test_cancelled_async_consumer_stores_nothing(
    aclient: openai.AsyncOpenAI,
    cache: StreamingResponseCache,
    prompt: Messages,
    server: LocalOpenAIServer,
    upstream_calls: Callable[[], int],
) -> None:
    """A consumer cancelled mid-stream (a cancel scope, as a timeout would) leaves no entry.

    The generator is closed with ``aclosing``: until an abandoned async generator is closed
    (explicitly, or whenever the event loop finalizes it), it still counts as a consumer.
    """
    twin = AsyncTwin(aclient)
    got: list[Any] = []
    agen = cache.aget_or_stream(
        prompt,
        lambda m: aclient.chat.completions.create(model=MODEL, messages=m, stream=True),
        model_id=MODEL,
    )
    with anyio.CancelScope() as scope:
        async with contextlib.aclosing(agen):
            async for chunk in agen:
                got.append(chunk)
                if len(got) == 5:
                    scope.cancel()
                    await anyio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    assert len(got) == 5
    assert cache.stats()["stores"] == 0

    full = await twin.collect(cache, prompt)
    assert upstream_calls() == 2
    assert full[:5] == got
    assert len(full) == server.tokens + 2
