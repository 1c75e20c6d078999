"""Review s4, finding: SDK helper event streams cut half way are stored as complete (HIGH).

README ("Every SDK stream type, out of the box"): the events of the SDK helpers (``ChunkEvent``,
``ContentDeltaEvent``, ... of ``chat.completions.stream``; the ``responses.stream`` events) are
cached "through the cached clients or through ``get_or_stream`` with a ``stream_fn`` of your
own"; and ("Complete streams") "for the SDK types we know", a stream is stored only when it
carries its terminal event.

The rule in `chengeta_ai.layers.completeness` recognises Chat Completions by a ``choices``
attribute on the *last* item and Responses events by the module ``openai.types.responses``.
The helpers' own event classes live in ``openai.lib.streaming.chat._events`` (no ``choices``)
and ``openai.lib.streaming.responses._events`` (``ResponseTextDeltaEvent`` with its snapshot),
so they fall through to "any other chunk type: complete when the upstream ends without error".
A body that the server or a proxy ends cleanly half way (the demo server's ``fail_mode="end"``)
is therefore stored, truncated, and replayed as the answer from then on: outcome ``stored``
with the stream ending on a ``ContentDeltaEvent`` / ``ResponseTextDeltaEvent``.

Fix direction: recognise the helper event families (``openai.lib.streaming.*``: complete only
with ``content.done``/``chunk`` carrying every choice's finish_reason, or
``response.completed``/``response.incomplete`` last) and any other ``openai.`` class without a
rule as *not* known-complete; the Anthropic helper events are already handled by their type.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import openai
import pytest

from chengeta_ai import CacheManager
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = pytest.mark.filterwarnings(
    r"ignore:Async generator '(openai|anthropic|httpx2?|httpcore2?)\.:ResourceWarning"
)

MESSAGES = [{"role": "user", "content": "review s4: helper events cut off"}]


@pytest.fixture
def cut_server() -> Iterator[LocalOpenAIServer]:
    """Every body ends cleanly after 6 events, without its terminal event."""
    with LocalOpenAIServer(
        first_token_delay=0.001, token_interval=0.0005, tokens=8, fail_after=6, fail_mode="end"
    ) as srv:
        yield srv


def test_chat_helper_events_cut_half_way_are_stored(cut_server: LocalOpenAIServer) -> None:
    cache = StreamingResponseCache(CacheManager())
    with openai.OpenAI(base_url=cut_server.base_url, api_key="sk", max_retries=0) as raw:

        def helper_events(messages: Any) -> Iterator[Any]:
            with raw.chat.completions.stream(model="gpt-4o-mini", messages=messages) as s:
                yield from s

        stream = cache.get_or_stream(MESSAGES, helper_events, model_id="gpt-4o-mini")
        events = list(stream)
    assert not any(e.type == "content.done" for e in events)  # the cut stream has no end
    assert stream.cache_info is not None
    # observed on main: 'stored' (the last event a ContentDeltaEvent)
    assert stream.cache_info.outcome == "incomplete"


def test_responses_helper_events_cut_half_way_are_stored(cut_server: LocalOpenAIServer) -> None:
    cache = StreamingResponseCache(CacheManager())
    with openai.OpenAI(base_url=cut_server.base_url, api_key="sk", max_retries=0) as raw:

        def helper_events(messages: Any) -> Iterator[Any]:
            with raw.responses.stream(model="gpt-4o-mini", input=messages) as s:
                yield from s

        stream = cache.get_or_stream(MESSAGES, helper_events, model_id="gpt-4o-mini")
        events = list(stream)
    assert events[-1].type == "response.output_text.delta"  # cut in the middle of the text
    assert stream.cache_info is not None
    # observed on main: 'stored'
    assert stream.cache_info.outcome == "incomplete"


@pytest.mark.anyio
async def test_async_chat_helper_events_cut_half_way_are_stored(
    cut_server: LocalOpenAIServer,
) -> None:
    cache = StreamingResponseCache(CacheManager())
    async with openai.AsyncOpenAI(base_url=cut_server.base_url, api_key="sk", max_retries=0) as raw:

        async def helper_events(messages: Any) -> AsyncIterator[Any]:
            async with raw.chat.completions.stream(model="gpt-4o-mini", messages=messages) as s:
                async for event in s:
                    yield event

        stream = cache.aget_or_stream(MESSAGES, helper_events, model_id="gpt-4o-mini")
        events = [e async for e in stream]
    await anyio.lowlevel.checkpoint()
    assert not any(e.type == "content.done" for e in events)
    assert stream.cache_info is not None
    assert stream.cache_info.outcome == "incomplete"
