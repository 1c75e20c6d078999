"""Every stream type the OpenAI and Anthropic SDKs produce is cached out of the box through the
seed API (`get_or_stream` / `aget_or_stream` with a ``stream_fn``), with no `register_model`
call: the raw events of every endpoint and the events of the SDKs' stream helpers. The hit
equals the miss object for object, through the real SDK clients over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anthropic
import openai
import pytest
from tests.clients.fidelity import assert_identical

from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = pytest.mark.filterwarnings(
    r"ignore:Async generator '(openai|anthropic|httpx2?|httpcore2?)\.:ResourceWarning"
)


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _sources(
    oai: openai.OpenAI, claude: anthropic.Anthropic
) -> dict[str, Callable[[str], Iterator[Any]]]:
    def chat_helper(text: str) -> Iterator[Any]:
        with oai.chat.completions.stream(model="gpt-4o-mini", messages=_user(text)) as s:
            yield from s

    def responses_helper(text: str) -> Iterator[Any]:
        with oai.responses.stream(model="gpt-4o", input=text) as s:
            yield from s

    def messages_helper(text: str) -> Iterator[Any]:
        with claude.messages.stream(
            model="claude-sonnet-4-6", max_tokens=256, messages=_user(text)
        ) as s:
            yield from s

    return {
        "responses-events": lambda t: iter(
            oai.responses.create(model="gpt-4o", input=t, stream=True)
        ),
        "chat-chunks": lambda t: iter(
            oai.chat.completions.create(model="gpt-4o-mini", messages=_user(t), stream=True)
        ),
        "anthropic-events": lambda t: iter(
            claude.messages.create(
                model="claude-sonnet-4-6", max_tokens=256, messages=_user(t), stream=True
            )
        ),
        "chat-helper-events": chat_helper,
        "responses-helper-events": responses_helper,
        "anthropic-helper-events": messages_helper,
    }


KINDS = [
    "responses-events",
    "chat-chunks",
    "anthropic-events",
    "chat-helper-events",
    "responses-helper-events",
    "anthropic-helper-events",
]


@pytest.mark.parametrize("kind", KINDS)
def test_sdk_stream_type_replays_identically(
    kind: str,
    server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    oai: openai.OpenAI,
    claude: anthropic.Anthropic,
    text: str,
) -> None:
    source = _sources(oai, claude)[kind]
    before = server.request_count
    messages = _user(text)
    # Each event as it was when handed over: the helpers mutate one snapshot object in place
    # (every live ChunkEvent of a stream shares it), the cache stores each event as it was.
    miss = [
        e.model_copy(deep=True)
        for e in cache.get_or_stream(messages, lambda m: source(m[0]["content"]), model_id=kind)
    ]
    hit = [
        e.model_copy(deep=True)
        for e in cache.get_or_stream(messages, lambda m: source(m[0]["content"]), model_id=kind)
    ]
    assert server.request_count - before == 1
    stats = cache.stats()
    assert (stats["stores"], stats["not_stored_unserializable"]) == (1, 0)
    assert len(miss) > 5
    if kind != "chat-chunks":
        assert len({type(e) for e in miss}) >= 3  # the union's members, each registered
    assert_identical(hit, miss)


@pytest.mark.anyio
async def test_async_responses_and_helper_events(
    server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    aoai: openai.AsyncOpenAI,
    aclaude: anthropic.AsyncAnthropic,
    text: str,
) -> None:
    async def responses(messages: Any) -> AsyncIterator[Any]:
        async with aoai.responses.stream(model="gpt-4o", input=messages[0]["content"]) as s:
            async for event in s:
                yield event

    async def anthropic_events(messages: Any) -> AsyncIterator[Any]:
        async with aclaude.messages.stream(
            model="claude-sonnet-4-6", max_tokens=256, messages=messages
        ) as s:
            async for event in s:
                yield event

    before = server.request_count
    for fn in (responses, anthropic_events):
        runs = []
        for _ in range(2):
            stream = cache.aget_or_stream(_user(text), fn, model_id=fn.__name__)
            runs.append([e.model_copy(deep=True) async for e in stream])
        assert_identical(runs[1], runs[0])
    assert server.request_count - before == 2
    assert cache.stats()["stores"] == 2
