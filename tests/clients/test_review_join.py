"""Adversarial review: callers that join one whole (non-streamed) call. `remember` gave a
joiner a *shallow* ``model_copy`` so each caller had its own object for `cache_info_of`, but the
nested models (``choices``, ``message``) stayed shared: one caller's edit of its reply was seen
in another caller's reply. The README's "treat chunks as read-only" speaks of stream chunks; a
whole call's object is the SDK's model object, which the SDK never shares. Now every caller of
a live whole call (the miss and its joiners) gets its own deep copy, taken from an object no
caller holds, so even a joiner that reads after another caller edited its reply gets the API's.

Sync (threads), asyncio and trio (tasks), through the real SDK clients over HTTP.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import anyio
import openai
import pytest
from tests.clients.fidelity import assert_identical

from chengeta_ai import CacheManager, cache_info_of, cached
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = pytest.mark.filterwarnings(
    r"ignore:Async generator '(openai|anthropic|httpx2?|httpcore2?)\.:ResourceWarning"
)

CALLERS = 4


@pytest.fixture(scope="module")
def slow_server() -> Iterator[LocalOpenAIServer]:
    """Slow to answer: the callers all join the first one's call."""
    with LocalOpenAIServer(first_token_delay=0.5, token_interval=0.01, tokens=12) as server:
        yield server


def test_joined_whole_call_objects_share_nested_models(slow_server: LocalOpenAIServer) -> None:
    server = slow_server
    cache = StreamingResponseCache(CacheManager())
    with openai.OpenAI(base_url=server.base_url, api_key="sk", max_retries=0) as raw:
        client = cached(raw, cache)
        request = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "review joined whole call"}],
        }
        results: dict[int, Any] = {}
        barrier = threading.Barrier(2)

        def call(i: int) -> None:
            barrier.wait()
            results[i] = client.chat.completions.create(**request)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(cache_info_of(results[i]).status for i in range(2))  # type: ignore[union-attr]
        assert statuses == ["join", "miss"]  # one upstream call, two callers
        results[0].choices[0].message.content = "edited by caller 0"
        assert results[1].choices[0].message.content != "edited by caller 0"


def _edit(reply: Any, who: int) -> None:
    """What a caller may do to its own reply: edit nested objects in place."""
    if isinstance(reply, anthropic.types.Message):
        reply.content[0].text = f"edited by caller {who}"  # type: ignore[union-attr]
        reply.usage.output_tokens = -who
    else:
        reply.choices[0].message.content = f"edited by caller {who}"
        reply.usage.completion_tokens = -who


def _text(reply: Any) -> str:
    if isinstance(reply, anthropic.types.Message):
        return reply.content[0].text  # type: ignore[union-attr,no-any-return]
    return reply.choices[0].message.content  # type: ignore[no-any-return]


def _nested(reply: Any) -> list[Any]:
    if isinstance(reply, anthropic.types.Message):
        return [reply.content, reply.content[0], reply.usage]
    return [reply.choices, reply.choices[0], reply.choices[0].message, reply.usage]


def _check(replies: list[Any], seen: list[str], api_reply: Any, hit: Any) -> None:
    """Each caller saw the API's reply (even one that read after another edited its own), has
    objects of its own all the way down, and the stored entry is the API's."""
    infos = [cache_info_of(r) for r in replies]
    assert sorted(i.status for i in infos if i is not None) == ["join"] * (CALLERS - 1) + ["miss"]
    assert seen == [api_reply.model_dump_json()] * CALLERS
    assert [r._request_id for r in replies] == [api_reply._request_id] * CALLERS
    for i, reply in enumerate(replies):
        for j, other in enumerate(replies):
            if i != j:
                assert all(a is not b for a, b in zip(_nested(reply), _nested(other), strict=True))
    for i, reply in enumerate(replies):
        assert _text(reply) == f"edited by caller {i}"  # its own edit, nobody else's
    assert_identical(hit, api_reply)
    assert cache_info_of(hit).status == "hit"  # type: ignore[union-attr]


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_each_caller_of_a_joined_whole_call_has_its_own_objects_threads(
    slow_server: LocalOpenAIServer, provider: str
) -> None:
    cache = StreamingResponseCache(CacheManager())
    raw: Any
    if provider == "openai":
        raw = openai.OpenAI(base_url=slow_server.base_url, api_key="sk", max_retries=0)
        request: dict[str, Any] = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "joined whole call, threads"}],
        }
        resource = cached(raw, cache).chat.completions
        direct = raw.chat.completions
    else:
        raw = anthropic.Anthropic(
            base_url=slow_server.anthropic_base_url, api_key="sk-ant", max_retries=0
        )
        request = {
            "model": "claude-sonnet-4-6",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "joined whole call, threads"}],
        }
        resource = cached(raw, cache).messages
        direct = raw.messages
    with raw:
        replies: list[Any] = [None] * CALLERS
        seen: list[str] = [""] * CALLERS
        barrier = threading.Barrier(CALLERS)

        def call(i: int) -> None:
            barrier.wait()
            reply = resource.create(**request)
            seen[i] = reply.model_dump_json()
            _edit(reply, i)  # at once: a joiner still reading must not see it
            replies[i] = reply

        threads = [threading.Thread(target=call, args=(i,)) for i in range(CALLERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        _check(replies, seen, direct.create(**request), resource.create(**request))


@pytest.fixture
async def aclients(slow_server: LocalOpenAIServer) -> AsyncIterator[tuple[Any, Any]]:
    async with (
        openai.AsyncOpenAI(base_url=slow_server.base_url, api_key="sk", max_retries=0) as a,
        anthropic.AsyncAnthropic(
            base_url=slow_server.anthropic_base_url, api_key="sk-ant", max_retries=0
        ) as b,
    ):
        yield a, b


@pytest.mark.anyio
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_each_caller_of_a_joined_whole_call_has_its_own_objects_tasks(
    aclients: tuple[Any, Any], provider: str
) -> None:
    cache = StreamingResponseCache(CacheManager())
    aoai, aclaude = aclients
    if provider == "openai":
        request: dict[str, Any] = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "joined whole call, tasks"}],
        }
        resource, direct = cached(aoai, cache).chat.completions, aoai.chat.completions
    else:
        request = {
            "model": "claude-sonnet-4-6",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "joined whole call, tasks"}],
        }
        resource, direct = cached(aclaude, cache).messages, aclaude.messages
    replies: list[Any] = [None] * CALLERS
    seen: list[str] = [""] * CALLERS

    async def call(i: int) -> None:
        reply = await resource.create(**request)
        seen[i] = reply.model_dump_json()
        _edit(reply, i)
        replies[i] = reply

    async with anyio.create_task_group() as tg:
        for i in range(CALLERS):
            tg.start_soon(call, i)
    _check(replies, seen, await direct.create(**request), await resource.create(**request))
