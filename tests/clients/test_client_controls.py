"""Per-call controls (``cache_control=``) and status (``cache_info`` / `cache_info_of`) on the
cached SDK clients, through the real ``openai`` and ``anthropic`` clients over HTTP to the local
server: streamed calls, whole calls and the SDKs' stream helpers, sync, asyncio and trio; the
races (``no_cache`` while others join, ``only_if_cached`` during an in-flight miss, a
``no_store`` leader with storing joiners) on threads, asyncio and trio.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import anyio
import openai
import pytest
from tests.clients.fidelity import assert_identical

from chengeta_ai import (
    CacheControl,
    CacheInfo,
    CacheMiss,
    cache_info_of,
    cached,
)
from chengeta_ai._core import decode_timing
from chengeta_ai.core.cache_manager import unframe_entry
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = [
    pytest.mark.filterwarnings(
        r"ignore:Async generator '(openai|anthropic|httpx2?|httpcore2?)\.:ResourceWarning"
    ),
]

MODES = ["sync", "asyncio", "trio"]
KINDS = ["stream", "whole", "helper"]
Result = tuple[Any, CacheInfo | None, CacheInfo | None]


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _request(provider: str, text: str) -> dict[str, Any]:
    if provider == "openai":
        return {"model": "gpt-4o-mini", "messages": _user(text)}
    return {"model": "claude-sonnet-4-6", "max_tokens": 256, "messages": _user(text)}


def _resource(client: Any, provider: str) -> Any:
    return client.chat.completions if provider == "openai" else client.messages


def _final(helper: Any, provider: str) -> Any:
    return helper.get_final_completion() if provider == "openai" else helper.get_final_message()


def _sync_call(client: Any, provider: str, kind: str, text: str, **extra: Any) -> Result:
    """One call: ``(value, cache_info when the call returned, cache_info at the end)``."""
    resource = _resource(client, provider)
    kwargs = {**_request(provider, text), **extra}
    if kind == "whole":
        obj = resource.create(**kwargs)
        return obj, cache_info_of(obj), cache_info_of(obj)
    if kind == "stream":
        with resource.create(**kwargs, stream=True) as stream:
            first = stream.cache_info
            assert cache_info_of(stream) is first
            chunks = list(stream)
        return chunks, first, stream.cache_info
    with resource.stream(**kwargs) as helper:
        first = cache_info_of(helper)
        final = _final(helper, provider)
    return final, first, cache_info_of(helper)


async def _async_call(client: Any, provider: str, kind: str, text: str, **extra: Any) -> Result:
    resource = _resource(client, provider)
    kwargs = {**_request(provider, text), **extra}
    if kind == "whole":
        obj = await resource.create(**kwargs)
        return obj, cache_info_of(obj), cache_info_of(obj)
    if kind == "stream":
        async with await resource.create(**kwargs, stream=True) as stream:
            first = stream.cache_info
            assert cache_info_of(stream) is first
            chunks = [chunk async for chunk in stream]
        return chunks, first, stream.cache_info
    async with resource.stream(**kwargs) as helper:
        first = cache_info_of(helper)
        final = await _final(helper, provider)
    return final, first, cache_info_of(helper)


def _sync_client(server: LocalOpenAIServer, provider: str) -> Any:
    if provider == "openai":
        return openai.OpenAI(base_url=server.base_url, api_key="sk-local", max_retries=0)
    return anthropic.Anthropic(
        base_url=server.anthropic_base_url, api_key="sk-ant-local", max_retries=0
    )


def _async_client(server: LocalOpenAIServer, provider: str) -> Any:
    if provider == "openai":
        return openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-local", max_retries=0)
    return anthropic.AsyncAnthropic(
        base_url=server.anthropic_base_url, api_key="sk-ant-local", max_retries=0
    )


class Driver:
    """Makes calls through a cached client of one provider, in one mode (sync, or one async
    backend: each call runs in its own ``anyio.run``, with an async client made in that loop)."""

    def __init__(
        self, mode: str, provider: str, server: LocalOpenAIServer, cache: StreamingResponseCache
    ) -> None:
        self.mode, self.provider, self.server, self.cache = mode, provider, server, cache
        self._sync = _sync_client(server, provider) if mode == "sync" else None

    def __call__(self, kind: str, text: str, **extra: Any) -> Result:
        if self._sync is not None:
            return _sync_call(cached(self._sync, self.cache), self.provider, kind, text, **extra)

        async def main() -> Result:
            async with _async_client(self.server, self.provider) as raw:
                return await _async_call(
                    cached(raw, self.cache), self.provider, kind, text, **extra
                )

        return anyio.run(main, backend=self.mode)

    def requests(self) -> int:
        counts = self.server.request_counts
        return counts.chat_completions if self.provider == "openai" else counts.messages

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["openai", "anthropic"])
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def drive(
    mode: str, provider: str, server: LocalOpenAIServer, cache: StreamingResponseCache
) -> Iterator[Driver]:
    driver = Driver(mode, provider, server, cache)
    yield driver
    driver.close()


# -- cache_info on every kind of call -----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_miss_then_hit_report_their_status(drive: Driver, kind: str, text: str) -> None:
    before = drive.requests()
    miss, first, last = drive(kind, text)
    assert first is not None and first.status == "miss"
    if kind != "whole":  # set before the first chunk, final at the end
        assert first.outcome is None
    assert last == CacheInfo("miss", first.key, None, "stored")
    hit, first, last = drive(kind, text)
    assert first is not None and first.status == "hit" and first.age is not None
    assert last is not None and last.outcome == "replayed" and last.key == first.key
    assert_identical(hit, miss)
    assert drive.requests() - before == 1


def test_joiners_of_a_whole_call_get_their_own_object_and_info(
    server: LocalOpenAIServer, cache: StreamingResponseCache, oai: openai.OpenAI, text: str
) -> None:
    """Whole calls in flight share one object in the cache: each caller gets its own (equal)
    object, so that each has its own info (one miss, the others join)."""
    client = cached(oai, cache)
    barrier = threading.Barrier(6)
    results: list[Any] = []

    def call() -> None:
        barrier.wait()
        results.append(client.chat.completions.create(**_request("openai", text)))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 6 and len({id(r) for r in results}) == 6
    for other in results[1:]:
        assert_identical(other, results[0])
    statuses = sorted(info.status for info in map(cache_info_of, results) if info is not None)
    assert statuses.count("miss") == 1
    assert set(statuses) <= {"miss", "join", "hit"} and len(statuses) == 6
    assert cache_info_of(results[0].model_copy()) is None  # a copy is not the returned object


def test_cache_info_of_what_is_not_a_cached_result(cache: StreamingResponseCache) -> None:
    assert cache_info_of(object()) is None
    assert cache_info_of({"cache_info": 1}) is None
    stream = cache.get_or_stream("hello", lambda _: iter(["a", "b"]))  # the seed API's too
    assert list(stream) == ["a", "b"]
    assert cache_info_of(stream) == CacheInfo("miss", stream.cache_info.key, None, "stored")


def test_cache_info_of_forgets_collected_objects(
    cache: StreamingResponseCache, oai: openai.OpenAI, text: str
) -> None:
    from chengeta_ai.clients import recorded

    client = cached(oai, cache)
    reply = client.chat.completions.create(**_request("openai", text))
    ident = id(reply)
    assert ident in recorded._infos
    del reply
    gc.collect()
    assert ident not in recorded._infos


# -- each control --------------------------------------------------------------------------------


def _written_at(cache: StreamingResponseCache, key: str) -> float | None:
    raw = cache.manager.backend.get(key)
    assert raw is not None
    return unframe_entry(raw).written_at


@pytest.mark.parametrize("kind", KINDS)
def test_no_cache_refreshes_the_entry(drive: Driver, kind: str, text: str) -> None:
    before = drive.requests()
    _, _, plain = drive(kind, text)
    assert plain is not None
    written = _written_at(drive.cache, plain.key)
    time.sleep(0.01)  # the entry's write time has millisecond resolution
    value, first, last = drive(kind, text, cache_control=CacheControl(no_cache=True))
    assert first is not None and first.status == "refresh" and first.key == plain.key
    assert last is not None and last.outcome == "stored"
    assert drive.requests() - before == 2
    written_again = _written_at(drive.cache, plain.key)
    assert written is not None and written_again is not None and written_again > written
    hit, first, _ = drive(kind, text)
    assert first is not None and first.status == "hit"
    assert_identical(hit, value)
    assert drive.cache.stats().refreshes == 1


@pytest.mark.parametrize("kind", KINDS)
def test_no_store_reads_but_does_not_store(drive: Driver, kind: str, text: str) -> None:
    before = drive.requests()
    _, first, last = drive(kind, text, cache_control={"no_store": True})
    assert first is not None and first.status == "miss"
    assert last is not None and last.outcome == "no_store"
    assert drive.cache.stats().stores == 0 and drive.cache.stats().not_stored_no_store == 1
    _, first, _ = drive(kind, text)  # still a miss: nothing was stored
    assert first is not None and first.status == "miss"
    _, first, _ = drive(kind, text, cache_control=CacheControl(no_store=True))
    assert first is not None and first.status == "hit"  # no_store still reads
    assert drive.requests() - before == 2


@pytest.mark.parametrize("kind", KINDS)
def test_only_if_cached_raises_at_the_call_then_hits(drive: Driver, kind: str, text: str) -> None:
    before = drive.requests()
    with pytest.raises(CacheMiss):
        drive(kind, text, cache_control={"only_if_cached": True})
    assert drive.requests() == before
    assert drive.cache.stats().only_if_cached_misses == 1
    miss, _, _ = drive(kind, text)
    hit, first, last = drive(kind, text, cache_control=CacheControl(only_if_cached=True))
    assert first is not None and first.status == "hit"
    assert last is not None and last.outcome == "replayed"
    assert_identical(hit, miss)
    assert drive.requests() - before == 1


def test_only_if_cached_stream_raises_before_any_chunk(
    server: LocalOpenAIServer, cache: StreamingResponseCache, oai: openai.OpenAI, text: str
) -> None:
    """The stream's head is read at the call: ``CacheMiss`` comes from ``create`` itself."""
    client = cached(oai, cache)
    with pytest.raises(CacheMiss):
        client.chat.completions.create(
            **_request("openai", text), stream=True, cache_control={"only_if_cached": True}
        )
    assert cache.stats().in_flight == 0


@pytest.mark.parametrize("kind", KINDS)
def test_ttl_tags_and_namespace(drive: Driver, kind: str, text: str) -> None:
    before = drive.requests()
    control = CacheControl(namespace="tenant-a", tags=("tenant-a",), ttl=600)
    _, _, plain = drive(kind, text)
    _, first, tenant_a = drive(kind, text, cache_control=control)
    assert first is not None and first.status == "miss"  # not the plain entry
    assert plain is not None and tenant_a is not None and tenant_a.key != plain.key
    assert tenant_a.key.startswith("chengeta:stream:tenant-a:")
    _, first, _ = drive(kind, text, cache_control={"namespace": "tenant-b"})
    assert first is not None and first.status == "miss"
    _, first, _ = drive(kind, text, cache_control={"namespace": "tenant-a"})
    assert first is not None and first.status == "hit"
    assert drive.requests() - before == 3
    assert drive.cache.manager.invalidate("tenant-a") == 1
    _, first, _ = drive(kind, text, cache_control={"namespace": "tenant-a", "ttl": 0.05})
    assert first is not None and first.status == "miss"
    time.sleep(0.2)  # past the entry's ttl
    _, first, _ = drive(kind, text, cache_control={"namespace": "tenant-a"})
    assert first is not None and first.status == "miss"
    assert drive.requests() - before == 5


def _offsets(cache: StreamingResponseCache, key: str) -> list[float]:
    raw = cache.manager.backend.get(key)
    assert raw is not None
    timing = unframe_entry(raw).timing
    assert timing is not None
    return list(decode_timing(bytes(timing), max_total_seconds=3600.0))


@pytest.fixture(scope="module")
def slow_server() -> Iterator[LocalOpenAIServer]:
    """A server whose streams last about a second: long enough for the races below to happen
    while a stream is in flight, on a loaded machine too."""
    with LocalOpenAIServer(first_token_delay=0.05, token_interval=0.05, tokens=24) as srv:
        yield srv


@pytest.mark.parametrize("kind", KINDS)
def test_recorded_replay_keeps_the_recorded_pace(
    mode: str, kind: str, slow_server: LocalOpenAIServer, cache: StreamingResponseCache, text: str
) -> None:
    """A paced hit takes at least the recorded duration divided by ``speed`` (a lower bound:
    sleeps never end early; no upper bound is asserted on a shared machine)."""
    drive = Driver(mode, "openai", slow_server, cache)
    try:
        miss, _, info = drive(kind, text)
        assert info is not None
        offsets = _offsets(cache, info.key)
        if kind != "helper":  # the head, then the chunks or the object
            assert len(offsets) == (2 if kind == "whole" else len(miss) + 1)
        start = time.perf_counter()
        hit, first, last = drive(
            kind, text, cache_control=CacheControl(replay="recorded", speed=2.0)
        )
        took = time.perf_counter() - start
        assert first is not None and first.status == "hit"
        assert last is not None and last.outcome == "replayed"
        assert_identical(hit, miss)
        assert took >= offsets[-1] / 2.0 * 0.95
        assert cache.stats().paced_replays == 1
    finally:
        drive.close()


# -- one entry, both modes, under the controls -------------------------------------------------


TWINS: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("openai", {"stream_options": {"include_usage": True}}),
    "responses": ("openai", {}),
    "messages": ("anthropic", {}),
}


def _twin_resource(client: Any, endpoint: str) -> Any:
    return {
        "chat": lambda: client.chat.completions,
        "responses": lambda: client.responses,
        "messages": lambda: client.messages,
    }[endpoint]()


def _twin_kwargs(endpoint: str, text: str) -> dict[str, Any]:
    if endpoint == "responses":
        return {"model": "gpt-4o", "input": text}
    return _request(TWINS[endpoint][0], text)


@pytest.mark.parametrize("endpoint", list(TWINS))
def test_only_if_cached_whole_call_is_answered_from_its_streamed_twin(
    mode: str, endpoint: str, server: LocalOpenAIServer, cache: StreamingResponseCache, text: str
) -> None:
    provider, twin_extra = TWINS[endpoint]
    kwargs = _twin_kwargs(endpoint, text)
    only = {"cache_control": {"only_if_cached": True}}

    def run(raw: Any) -> tuple[Any, Any]:
        """(the whole object answered from the twin, a later only_if_cached hit)"""
        resource = _twin_resource(cached(raw, cache), endpoint)
        with resource.create(**kwargs, **twin_extra, stream=True) as stream:
            assert list(stream)
        with pytest.raises(CacheMiss):  # another namespace's twin does not answer
            resource.create(
                **kwargs, cache_control=CacheControl(only_if_cached=True, namespace="x")
            )
        return resource.create(**kwargs, **only), resource.create(**kwargs, **only)

    async def arun() -> tuple[Any, Any]:
        async with _async_client(server, provider) as raw:
            resource = _twin_resource(cached(raw, cache), endpoint)
            async with await resource.create(**kwargs, **twin_extra, stream=True) as stream:
                assert [e async for e in stream]
            with pytest.raises(CacheMiss):
                await resource.create(
                    **kwargs, cache_control=CacheControl(only_if_cached=True, namespace="x")
                )
            return await resource.create(**kwargs, **only), await resource.create(**kwargs, **only)

    before = server.request_count
    if mode == "sync":
        with _sync_client(server, provider) as raw:
            whole, again = run(raw)
    else:
        whole, again = anyio.run(arun, backend=mode)
    assert server.request_count - before == 1  # the twin's call only
    info, again_info = cache_info_of(whole), cache_info_of(again)
    assert info is not None and info.status == "hit" and info.age is not None
    assert info.outcome == "stored"  # now stored under the whole call's own key too
    assert again_info is not None and again_info.status == "hit" and again_info.key == info.key
    assert_identical(again, whole)
    stats = cache.stats()
    assert stats.cross_mode_hits == 1 and stats["cross_mode_hits"] == 1
    assert stats.only_if_cached_misses == 1  # the other namespace's
    assert stats.as_dict()["cross_mode_hits"] == 1


def test_a_whole_call_is_never_answered_from_another_namespaces_twin(
    server: LocalOpenAIServer, cache: StreamingResponseCache, oai: openai.OpenAI, text: str
) -> None:
    client = cached(oai, cache)
    with client.responses.create(
        model="gpt-4o", input=text, stream=True, cache_control={"namespace": "tenant-a"}
    ) as stream:
        assert list(stream)
    before = server.request_count
    other = client.responses.create(
        model="gpt-4o", input=text, cache_control={"namespace": "tenant-b"}
    )
    assert server.request_count - before == 1
    assert cache.stats().cross_mode_hits == 0
    info = cache_info_of(other)
    assert info is not None and info.status == "miss"
    same = client.responses.create(
        model="gpt-4o", input=text, cache_control={"namespace": "tenant-a"}
    )
    assert server.request_count - before == 1
    info = cache_info_of(same)
    assert info is not None and info.status == "hit" and cache.stats().cross_mode_hits == 1


def test_a_whole_call_answered_from_its_twin_reports_a_hit(
    server: LocalOpenAIServer, cache: StreamingResponseCache, claude: anthropic.Anthropic, text: str
) -> None:
    client = cached(claude, cache)
    with client.messages.stream(**_request("anthropic", text)) as helper:
        helper.until_done()
    whole = client.messages.create(**_request("anthropic", text))
    info = cache_info_of(whole)
    assert info is not None and (info.status, info.outcome) == ("hit", "stored")
    assert info.age is not None and cache.stats().cross_mode_hits == 1
    from prometheus_client import CollectorRegistry

    from chengeta_ai.metrics import PrometheusCollector

    registry = CollectorRegistry()
    registry.register(PrometheusCollector(cache))
    assert registry.get_sample_value("chengeta_ai_cross_mode_hits_total") == 1
    refreshed = client.messages.create(
        **_request("anthropic", text), cache_control={"no_cache": True}
    )
    info = cache_info_of(refreshed)
    assert info is not None and info.status == "refresh"


# -- Anthropic's own cache_control --------------------------------------------------------------


def test_anthropic_prompt_caching_parameter_and_ours(
    server: LocalOpenAIServer, cache: StreamingResponseCache, claude: anthropic.Anthropic, text: str
) -> None:
    """On ``messages``, a mapping with ``"type"`` is Anthropic's ``cache_control`` (sent, and
    part of the key); a `CacheControl` or a mapping without ``"type"`` is ours (never sent)."""
    client = cached(claude, cache)
    request = _request("anthropic", text)
    for theirs in ({"type": "ephemeral"}, {"type": "ephemeral", "ttl": "1h"}):
        reply = client.messages.create(**request, cache_control=theirs)
        assert (server.last_request or {}).get("cache_control") == theirs
        info = cache_info_of(reply)
        assert info is not None and info.status == "miss"  # its own entry: a different request
    assert cache.stats().stores == 2
    for ours in (CacheControl(no_store=True), {"no_store": True}):
        reply = client.messages.create(**request, cache_control=ours)
        assert "cache_control" not in (server.last_request or {})
        info = cache_info_of(reply)
        assert info is not None and info.outcome == "no_store"
    with client.messages.stream(**request, cache_control={"no_store": True}) as helper:
        helper.until_done()
    assert "cache_control" not in (server.last_request or {})
    helper_info = cache_info_of(helper)
    assert helper_info is not None and (helper_info.status, helper_info.outcome) == (
        "miss",
        "no_store",
    )
    with client.messages.stream(**request, cache_control={"type": "ephemeral"}) as helper:
        helper.until_done()
    assert (server.last_request or {}).get("cache_control") == {"type": "ephemeral"}
    assert cache.stats().stores == 3


def test_openai_has_no_cache_control_of_its_own(
    server: LocalOpenAIServer, cache: StreamingResponseCache, oai: openai.OpenAI, text: str
) -> None:
    """On OpenAI every ``cache_control`` is ours: never sent; an unknown key is a TypeError."""
    client = cached(oai, cache)
    list(
        client.chat.completions.create(
            **_request("openai", text), stream=True, cache_control={"no_store": True}
        )
    )
    assert "cache_control" not in (server.last_request or {})
    with pytest.raises(TypeError, match="unknown cache_control keys"):
        client.chat.completions.create(**_request("openai", text), cache_control={"type": "x"})
    with pytest.raises(ValueError, match="contradict"):
        client.responses.create(
            model="gpt-4o", input=text, cache_control={"no_cache": True, "only_if_cached": True}
        )


def test_an_uncacheable_request_with_only_if_cached_raises(
    server: LocalOpenAIServer, cache: StreamingResponseCache, oai: openai.OpenAI, text: str
) -> None:
    import datetime

    client = cached(oai, cache)
    odd = {"extra_body": {"at": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)}}
    before = server.request_count
    with pytest.raises(CacheMiss):
        client.chat.completions.create(
            **_request("openai", text), **odd, cache_control={"only_if_cached": True}
        )
    assert server.request_count == before
    reply = client.chat.completions.create(**_request("openai", text), **odd)
    assert cache_info_of(reply) == CacheInfo("bypass", "", None, "bypass")


def test_the_readme_block_runs_as_written(
    server: LocalOpenAIServer, cache: StreamingResponseCache, oai: openai.OpenAI, text: str
) -> None:
    from tests.test_readme_snippets import _readme_block

    code = _readme_block("Per call on the cached clients")
    client = cached(oai, cache)
    with client.responses.stream(model="gpt-4o", input="Explain caching") as warm:
        warm.until_done()  # what the block's only_if_cached helper call answers from
    scope: dict[str, Any] = {"client": client, "messages": _user(text)}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["stream"].cache_info.outcome == "stored" and scope["text"]
    reply_info = cache_info_of(scope["reply"])
    assert reply_info is not None and reply_info.status == "miss"
    helper_info = cache_info_of(scope["helper"])
    assert helper_info is not None and helper_info.status == "hit"
