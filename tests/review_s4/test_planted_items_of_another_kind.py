"""Review s4, finding: an entry with a fitting head but items of another SDK is served (HIGH).

`head_fits` checks only the entry's *head* (class, ``stream``, ``endpoint``); the items after it
are handed out whatever they are. So an entry under an OpenAI Chat Completions key whose head
says "streamed, openai.chat.completions" but whose items are Anthropic events (or, for a whole
call, an Anthropic ``Message``) is served as a ``hit``:

- ``chat.completions.create(...)`` (whole) returns an ``anthropic.types.Message``;
- ``chat.completions.create(..., stream=True)`` yields ``RawMessageStartEvent``, ...;
- ``chat.completions.stream(...)`` crashes in the SDK's accumulator
  (``AttributeError: 'RawMessageStartEvent' object has no attribute 'object'``).

README ("Cached SDK clients"): an entry "of another endpoint ... (a bug, another program, an
entry planted in a shared backend) is a corrupt entry ... The caller never gets an exception or
an object of the wrong kind from it". The head alone does not make that true: the same wrong
entry, with its own head rewritten, goes straight through.

Fix direction: check the item classes against the endpoint (a whole call: exactly the SDK's
result class, e.g. ``ChatCompletion``/``Response``/``Message``/``Completion``; a stream: the
endpoint's chunk/event union) at the same place the head is checked (once per call, the items
are already decoded in batches), and treat a mismatch as a corrupt entry.
"""

from __future__ import annotations

from typing import Any

import anthropic
import anyio
import openai
import pytest

from chengeta_ai import CacheManager, cache_info_of, cached
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = pytest.mark.filterwarnings(
    r"ignore:Async generator '(openai|anthropic|httpx2?|httpcore2?)\.:ResourceWarning"
)


def _openai_request(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}


def _anthropic_request(text: str) -> dict[str, Any]:
    return {"model": "claude-x", "max_tokens": 64, "messages": [{"role": "user", "content": text}]}


class Planted:
    """An OpenAI chat request's whole and streamed entries, rewritten to hold the items of the
    Anthropic answer to the same prompt under their own (fitting) heads."""

    def __init__(self, oai: openai.OpenAI, claude: anthropic.Anthropic, text: str) -> None:
        self.cache = StreamingResponseCache(CacheManager())
        ours = cached(oai, self.cache)
        theirs = cached(claude, self.cache)
        whole = ours.chat.completions.create(**_openai_request(text))
        stream = ours.chat.completions.create(**_openai_request(text), stream=True)
        self.want_text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        whole_info = cache_info_of(whole)
        assert whole_info is not None and stream.cache_info is not None
        self.whole_key, self.stream_key = whole_info.key, stream.cache_info.key
        message = theirs.messages.create(**_anthropic_request(text))
        events = theirs.messages.create(**_anthropic_request(text), stream=True)
        list(events)
        message_info = cache_info_of(message)
        assert message_info is not None and events.cache_info is not None
        manager = self.cache.manager
        whole_items, stream_items = manager.get(self.whole_key), manager.get(self.stream_key)
        their_whole = manager.get(message_info.key)
        their_stream = manager.get(events.cache_info.key)
        # the OpenAI heads (fitting), the Anthropic items
        manager.set(self.whole_key, [whole_items[0], *their_whole[1:]])
        manager.set(self.stream_key, [stream_items[0], *their_stream[1:]])


def test_whole_call_is_served_an_anthropic_message(
    server: LocalOpenAIServer, oai: openai.OpenAI, claude: anthropic.Anthropic, text: str
) -> None:
    planted = Planted(oai, claude, text)
    answer = cached(oai, planted.cache).chat.completions.create(**_openai_request(text))
    # observed on main: anthropic.types.message.Message, reported as a hit
    assert type(answer) is openai.types.chat.ChatCompletion


def test_streamed_call_yields_anthropic_events(
    server: LocalOpenAIServer, oai: openai.OpenAI, claude: anthropic.Anthropic, text: str
) -> None:
    planted = Planted(oai, claude, text)
    stream = cached(oai, planted.cache).chat.completions.create(
        **_openai_request(text), stream=True
    )
    kinds = {type(c).__name__ for c in stream}
    # observed on main: {'RawMessageStartEvent', 'RawContentBlockDeltaEvent', ...}
    assert kinds == {"ChatCompletionChunk"}


def test_helper_crashes_on_anthropic_events(
    server: LocalOpenAIServer, oai: openai.OpenAI, claude: anthropic.Anthropic, text: str
) -> None:
    planted = Planted(oai, claude, text)
    # observed on main: AttributeError: 'RawMessageStartEvent' object has no attribute 'object'
    with cached(oai, planted.cache).chat.completions.stream(**_openai_request(text)) as helper:
        completion = helper.get_final_completion()
    assert completion.choices[0].message.content == planted.want_text


@pytest.mark.anyio
async def test_async_streamed_call_yields_anthropic_events(
    server: LocalOpenAIServer, aoai: openai.AsyncOpenAI, text: str
) -> None:
    with (
        openai.OpenAI(base_url=server.base_url, api_key="sk-local", max_retries=0) as oai,
        anthropic.Anthropic(
            base_url=server.anthropic_base_url, api_key="sk-ant-local", max_retries=0
        ) as claude,
    ):
        planted = Planted(oai, claude, text)
    stream = await cached(aoai, planted.cache).chat.completions.create(
        **_openai_request(text), stream=True
    )
    kinds = {type(c).__name__ async for c in stream}
    await anyio.lowlevel.checkpoint()
    assert kinds == {"ChatCompletionChunk"}


def test_a_head_without_chunks_is_served_as_an_empty_answer(
    server: LocalOpenAIServer, oai: openai.OpenAI, text: str
) -> None:
    """The same gap from the other side: an entry the completeness rule would never store (its
    head and nothing after it: "an entry with nothing after it is never complete") is served
    when it is found, as a ``hit`` yielding no chunk at all; the helper then fails in the SDK.
    A hit is not checked against the rule that guards the store (an entry of an older version,
    another writer, or planted)."""
    cache = StreamingResponseCache(CacheManager())
    client = cached(oai, cache)
    stream = client.chat.completions.create(**_openai_request(text), stream=True)
    want = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert stream.cache_info is not None
    items = cache.manager.get(stream.cache_info.key)
    cache.manager.set(stream.cache_info.key, items[:1])  # the head alone
    again = client.chat.completions.create(**_openai_request(text), stream=True)
    chunks = list(again)
    # observed on main: [] served as a 'hit'
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want


# -- added with the fix: an entry whose first items fit and a later one does not ------------


def _mixed_entry(oai: openai.OpenAI, text: str) -> tuple[StreamingResponseCache, str]:
    """A streamed chat entry with the call's own whole `ChatCompletion` planted after its
    second chunk (an OpenAI object, of the wrong kind for a stream)."""
    cache = StreamingResponseCache(CacheManager())
    client = cached(oai, cache)
    whole = client.chat.completions.create(**_openai_request(text))
    stream = client.chat.completions.create(**_openai_request(text), stream=True)
    list(stream)
    assert stream.cache_info is not None
    key = stream.cache_info.key
    items = cache.manager.get(key)
    cache.manager.set(key, [*items[:3], whole, *items[3:]])
    return cache, key


def test_a_later_item_of_another_kind_is_a_clear_error_and_the_entry_is_dropped(
    server: LocalOpenAIServer, oai: openai.OpenAI, text: str
) -> None:
    from chengeta_ai.errors import DecodeError

    cache, key = _mixed_entry(oai, text)
    client = cached(oai, cache)
    stream = client.chat.completions.create(**_openai_request(text), stream=True)
    got = []
    with pytest.raises(DecodeError, match="ChatCompletion"):
        for chunk in stream:
            got.append(chunk)
    assert {type(c).__name__ for c in got} == {"ChatCompletionChunk"} and len(got) == 2
    assert cache.manager.get(key) is None  # dropped
    again = client.chat.completions.create(**_openai_request(text), stream=True)
    assert {type(c).__name__ for c in again} == {"ChatCompletionChunk"}


@pytest.mark.anyio
async def test_async_a_later_item_of_another_kind_is_a_clear_error(
    server: LocalOpenAIServer, oai: openai.OpenAI, aoai: openai.AsyncOpenAI, text: str
) -> None:
    from chengeta_ai.errors import DecodeError

    cache, key = _mixed_entry(oai, text)
    stream = await cached(aoai, cache).chat.completions.create(**_openai_request(text), stream=True)
    got = []
    with pytest.raises(DecodeError, match="ChatCompletion"):
        async for chunk in stream:
            got.append(chunk)
    await anyio.lowlevel.checkpoint()
    assert len(got) == 2
    assert cache.manager.get(key) is None
