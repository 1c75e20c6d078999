"""Races of the per-call controls on the cached SDK clients, through the real ``openai`` client
over HTTP to a local server whose replies take about a second (so that the calls below happen
while a stream is in flight): real threads for the sync client, real tasks on asyncio and trio
for the async one.

- ``no_cache`` while others join: the refresh leads its own upstream call (it never joins a
  stream started before it); the older stream goes on for its leader and joiners and is not
  stored (``superseded``); later calls are answered by the refresh's entry.
- ``only_if_cached`` during an in-flight miss: it joins (no upstream call; status ``join``),
  streamed and whole.
- a ``no_store`` leader with storing joiners: the stream is stored (any caller that wants it
  stored wins); all ``no_store``: nothing stored.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import openai
import pytest
from tests.clients.fidelity import assert_identical

from chengeta_ai import CacheControl, CacheInfo, cache_info_of, cached
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = [
    pytest.mark.filterwarnings(
        r"ignore:Async generator '(openai|anthropic|httpx2?|httpcore2?)\.:ResourceWarning"
    ),
]


@pytest.fixture(scope="module")
def slow_server() -> Iterator[LocalOpenAIServer]:
    with LocalOpenAIServer(first_token_delay=0.05, token_interval=0.05, tokens=24) as srv:
        yield srv


@pytest.fixture
def slow(slow_server: LocalOpenAIServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=slow_server.base_url, api_key="sk-local", max_retries=0) as c:
        yield c


@pytest.fixture
async def aslow(slow_server: LocalOpenAIServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=slow_server.base_url, api_key="sk-local", max_retries=0
    ) as c:
        yield c


def _request(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # reported by the test
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def _joined(*threads: threading.Thread) -> None:
    for t in threads:
        t.join(30)
        assert not t.is_alive()


def _status(result: Any) -> tuple[str, str | None]:
    info = cache_info_of(result)
    assert info is not None
    return info.status, info.outcome


# -- threads (the sync client) ------------------------------------------------------------------


def test_no_cache_while_others_join_threads(
    slow_server: LocalOpenAIServer, cache: StreamingResponseCache, slow: openai.OpenAI, text: str
) -> None:
    client = cached(slow, cache)
    before = slow_server.request_count
    leader = client.chat.completions.create(**_request(text), stream=True)
    head = [next(leader)]
    joiner = client.chat.completions.create(**_request(text), stream=True)
    assert joiner.cache_info is not None and joiner.cache_info.status == "join"

    def refresh() -> tuple[list[Any], CacheInfo | None]:
        with client.chat.completions.create(
            **_request(text), stream=True, cache_control={"no_cache": True}
        ) as stream:
            return list(stream), stream.cache_info

    t, out = _in_thread(refresh)
    t1, rest = _in_thread(lambda: list(leader))
    t2, joined = _in_thread(lambda: list(joiner))
    _joined(t, t1, t2)
    fresh, info = out[0]
    assert info is not None and (info.status, info.outcome) == ("refresh", "stored")
    assert_identical(joined[0], head + rest[0])
    assert_identical(fresh, joined[0])  # the same reply (the server is deterministic)
    assert leader.cache_info is not None and leader.cache_info.outcome == "superseded"
    assert joiner.cache_info is not None and joiner.cache_info.outcome == "superseded"
    assert slow_server.request_count - before == 2  # the refresh never joined the old stream
    with client.chat.completions.create(**_request(text), stream=True) as later:
        assert later.cache_info is not None and later.cache_info.status == "hit"
        assert_identical(list(later), fresh)
    stats = cache.stats()
    assert (stats.refreshes, stats.not_stored_superseded, stats.stores) == (1, 1, 1)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_only_if_cached_joins_an_in_flight_miss_threads(
    stream: bool,
    slow_server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    slow: openai.OpenAI,
    text: str,
) -> None:
    client = cached(slow, cache)
    before = slow_server.request_count

    def plain() -> Any:
        result = client.chat.completions.create(**_request(text), stream=stream)
        return list(result) if stream else result

    t, out = _in_thread(plain)
    deadline = time.monotonic() + 10
    while cache.stats().in_flight == 0:  # the plain call is in flight
        assert time.monotonic() < deadline
        time.sleep(0.005)
    result = client.chat.completions.create(
        **_request(text), stream=stream, cache_control=CacheControl(only_if_cached=True)
    )
    got = list(result) if stream else result
    _joined(t)
    assert _status(result) == ("join", "stored")
    assert_identical(got, out[0])
    assert slow_server.request_count - before == 1


async def _until_in_flight(cache: StreamingResponseCache) -> None:
    with anyio.fail_after(10):
        while cache.stats().in_flight == 0:
            await anyio.sleep(0.005)


@pytest.mark.parametrize("leader_no_store", [True, False])
def test_no_store_leader_with_storing_joiners_threads(
    leader_no_store: bool,
    slow_server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    slow: openai.OpenAI,
    text: str,
) -> None:
    client = cached(slow, cache)
    leader = client.chat.completions.create(
        **_request(text), stream=True, cache_control={"no_store": leader_no_store}
    )
    next(leader)
    joiners = [
        client.chat.completions.create(
            **_request(text), stream=True, cache_control={"no_store": not leader_no_store}
        )
        for _ in range(3)
    ]
    threads = [_in_thread(lambda s=s: list(s))[0] for s in (leader, *joiners)]
    _joined(*threads)
    for stream in (leader, *joiners):
        assert stream.cache_info is not None and stream.cache_info.outcome == "stored"
    assert [s.cache_info.status for s in joiners if s.cache_info] == ["join"] * 3
    assert cache.stats().stores == 1
    again = client.chat.completions.create(
        **_request(text), stream=True, cache_control={"only_if_cached": True}
    )
    assert _status(again) == ("hit", None)
    again.close()


def test_all_no_store_callers_store_nothing_threads(
    slow_server: LocalOpenAIServer, cache: StreamingResponseCache, slow: openai.OpenAI, text: str
) -> None:
    client = cached(slow, cache)
    control = CacheControl(no_store=True)
    calls = [
        _in_thread(lambda: client.chat.completions.create(**_request(text), cache_control=control))
        for _ in range(4)
    ]
    _joined(*(t for t, _ in calls))
    results = [out[0] for _, out in calls]
    assert sorted(_status(r)[0] for r in results).count("miss") >= 1
    assert {_status(r)[1] for r in results} == {"no_store"}
    assert cache.stats().stores == 0


# -- asyncio and trio (the async client) --------------------------------------------------------


@pytest.mark.anyio
async def test_no_cache_while_others_join_async(
    slow_server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    aslow: openai.AsyncOpenAI,
    text: str,
) -> None:
    client = cached(aslow, cache)
    before = slow_server.request_count
    leader = await client.chat.completions.create(**_request(text), stream=True)
    head = [await leader.__anext__()]
    joiner = await client.chat.completions.create(**_request(text), stream=True)
    assert joiner.cache_info is not None and joiner.cache_info.status == "join"
    results: dict[str, Any] = {}

    async def read(name: str, stream: Any) -> None:
        async with stream:
            results[name] = [chunk async for chunk in stream]

    async def refresh() -> None:
        stream = await client.chat.completions.create(
            **_request(text), stream=True, cache_control={"no_cache": True}
        )
        await read("fresh", stream)
        results["info"] = stream.cache_info

    async with anyio.create_task_group() as tg:
        tg.start_soon(refresh)
        tg.start_soon(read, "leader", leader)
        tg.start_soon(read, "joiner", joiner)
    info = results["info"]
    assert info is not None and (info.status, info.outcome) == ("refresh", "stored")
    assert_identical(results["joiner"], head + results["leader"])
    assert_identical(results["fresh"], results["joiner"])
    assert leader.cache_info is not None and leader.cache_info.outcome == "superseded"
    assert joiner.cache_info is not None and joiner.cache_info.outcome == "superseded"
    assert slow_server.request_count - before == 2
    later = await client.chat.completions.create(**_request(text), stream=True)
    async with later:
        assert later.cache_info is not None and later.cache_info.status == "hit"
        assert_identical([c async for c in later], results["fresh"])


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_only_if_cached_joins_an_in_flight_miss_async(
    stream: bool,
    slow_server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    aslow: openai.AsyncOpenAI,
    text: str,
) -> None:
    client = cached(aslow, cache)
    before = slow_server.request_count
    results: dict[str, Any] = {}

    async def call(name: str, control: Any = None) -> None:
        extra = {} if control is None else {"cache_control": control}
        result = await client.chat.completions.create(**_request(text), stream=stream, **extra)
        if stream:
            async with result:
                results[name] = [chunk async for chunk in result]
        else:
            results[name] = result
        results[name + "_info"] = cache_info_of(result)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, "plain")
        await _until_in_flight(cache)
        tg.start_soon(call, "only", {"only_if_cached": True})
    only = results["only_info"]
    assert only is not None and (only.status, only.outcome) == ("join", "stored")
    assert_identical(results["only"], results["plain"])
    assert slow_server.request_count - before == 1


@pytest.mark.anyio
@pytest.mark.parametrize("leader_no_store", [True, False])
async def test_no_store_leader_with_storing_joiners_async(
    leader_no_store: bool,
    slow_server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    aslow: openai.AsyncOpenAI,
    text: str,
) -> None:
    client = cached(aslow, cache)
    leader = await client.chat.completions.create(
        **_request(text), stream=True, cache_control={"no_store": leader_no_store}
    )
    await leader.__anext__()
    joiners = [
        await client.chat.completions.create(
            **_request(text), stream=True, cache_control={"no_store": not leader_no_store}
        )
        for _ in range(3)
    ]

    async def read(stream: Any) -> None:
        async with stream:
            async for _ in stream:
                pass

    async with anyio.create_task_group() as tg:
        for stream in (leader, *joiners):
            tg.start_soon(read, stream)
    for stream in (leader, *joiners):
        assert stream.cache_info is not None and stream.cache_info.outcome == "stored"
    assert cache.stats().stores == 1
    again = await client.chat.completions.create(
        **_request(text), stream=True, cache_control={"only_if_cached": True}
    )
    assert _status(again) == ("hit", None)
    await again.aclose()
