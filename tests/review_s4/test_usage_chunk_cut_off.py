"""Review s4, finding: a Chat Completions stream cut before its usage chunk is stored (HIGH).

With ``stream_options={"include_usage": True}`` the API sends, after the chunk carrying the
``finish_reason``, one more chunk: ``choices=[]`` and the ``usage``, then ``[DONE]``. The
completeness rule (`chengeta_ai.layers.completeness`) for Chat Completions is "every choice
seen has a finish_reason": a body that a server or proxy ends cleanly right after the
finish_reason chunk (no usage chunk, no ``[DONE]``; the SDK sees a normal end) passes it. The
truncated stream is stored and every later call replays it without its usage: outcome
``stored``, then ``hit`` with ``chunks[-1].usage is None`` although the request asked for it
(the same request answered live ends with the usage chunk).

README ("Complete streams"): "a stream is stored only when it is complete ... An HTTP stream
that the server or a proxy ends cleanly half way looks to the SDK like a normal end"; the
project's rule: a truncated entry is never stored. Usage is what callers bill and meter with.

Reproduced with the demo server's own fault injection (``fail_after`` = every event but the
last, ``fail_mode="end"``: the body ends cleanly), through the real ``openai`` clients.

Fix direction: when the request asked for ``include_usage`` (the cached clients know the
request; `twin_request` already builds it), a Chat Completions or legacy Completions stream is
complete only with its trailing usage chunk; for ``get_or_stream`` callers, document it or let
the rule see the request (e.g. a completeness hint in ``params``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import openai
import pytest

from chengeta_ai import CacheManager, cached
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = pytest.mark.filterwarnings(
    r"ignore:Async generator '(openai|anthropic|httpx2?|httpcore2?)\.:ResourceWarning"
)

REQUEST: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "review s4: usage cut off"}],
    "stream_options": {"include_usage": True},
}


@pytest.fixture
def cut_server() -> Iterator[LocalOpenAIServer]:
    """A server of the test's own (its failure settings are changed by the test)."""
    with LocalOpenAIServer(first_token_delay=0.001, token_interval=0.0005, tokens=6) as srv:
        yield srv


def _cut_before_usage(srv: LocalOpenAIServer) -> int:
    """Makes the server end every body cleanly just before its usage chunk; returns the
    number of chunks of a whole answer."""
    with openai.OpenAI(base_url=srv.base_url, api_key="sk", max_retries=0) as raw:
        whole = list(raw.chat.completions.create(**REQUEST, stream=True))
    assert whole[-1].choices == [] and whole[-1].usage is not None
    assert whole[-2].choices[0].finish_reason == "stop"
    srv.fail_after, srv.fail_mode = len(whole) - 1, "end"
    return len(whole)


def test_stream_without_its_usage_chunk_is_stored(cut_server: LocalOpenAIServer) -> None:
    n = _cut_before_usage(cut_server)
    cache = StreamingResponseCache(CacheManager())
    with openai.OpenAI(base_url=cut_server.base_url, api_key="sk", max_retries=0) as raw:
        client = cached(raw, cache)
        cut = client.chat.completions.create(**REQUEST, stream=True)
        assert len(list(cut)) == n - 1  # delivered whole to the caller, as the server sent it
        cut_server.fail_after = None  # the server is healthy again
        later = client.chat.completions.create(**REQUEST, stream=True)
        chunks = list(later)
    assert cut.cache_info is not None and later.cache_info is not None
    # observed on main: outcome 'stored'; then a 'hit' of n - 1 chunks, the last without usage
    assert cut.cache_info.outcome == "incomplete"
    assert chunks[-1].usage is not None, f"{later.cache_info.status}: served without usage"


@pytest.mark.anyio
async def test_async_stream_without_its_usage_chunk_is_stored(
    cut_server: LocalOpenAIServer,
) -> None:
    n = await anyio.to_thread.run_sync(_cut_before_usage, cut_server)
    cache = StreamingResponseCache(CacheManager())
    async with openai.AsyncOpenAI(base_url=cut_server.base_url, api_key="sk", max_retries=0) as raw:
        client = cached(raw, cache)
        cut = await client.chat.completions.create(**REQUEST, stream=True)
        assert len([c async for c in cut]) == n - 1
        cut_server.fail_after = None
        later = await client.chat.completions.create(**REQUEST, stream=True)
        chunks = [c async for c in later]
    await anyio.lowlevel.checkpoint()
    assert cut.cache_info is not None and later.cache_info is not None
    assert cut.cache_info.outcome == "incomplete"
    assert chunks[-1].usage is not None, f"{later.cache_info.status}: served without usage"


def test_legacy_completions_without_their_usage_chunk_are_stored(
    cut_server: LocalOpenAIServer,
) -> None:
    """The same rule, the same gap, for legacy Completions (``stream_options`` works there too)."""
    request: dict[str, Any] = {
        "model": "gpt-3.5-turbo-instruct",
        "prompt": "review s4: usage cut off",
        "stream_options": {"include_usage": True},
    }
    with openai.OpenAI(base_url=cut_server.base_url, api_key="sk", max_retries=0) as raw:
        whole = list(raw.completions.create(**request, stream=True))
        assert whole[-1].choices == [] and whole[-1].usage is not None
        cut_server.fail_after, cut_server.fail_mode = len(whole) - 1, "end"
        cache = StreamingResponseCache(CacheManager())
        cut = cached(raw, cache).completions.create(**request, stream=True)
        assert len(list(cut)) == len(whole) - 1
    assert cut.cache_info is not None
    # observed on main: 'stored'
    assert cut.cache_info.outcome == "incomplete"
