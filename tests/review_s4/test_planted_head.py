"""Review s4, finding: a planted HTTP head crashes the cached clients (HIGH).

The first item of every cached-client entry is an `HttpHead`. The compact codec rebuilds model
instances *without validation* (chengeta_ai/models.py), and `head_fits` only checks the head's
class, its ``stream`` flag and its ``endpoint``. So an entry whose bytes are well formed (frame
and checksum good, structure good) but whose head carries a value the HTTP library refuses (a
URL that does not parse, ``headers`` that are not pairs) is accepted as fitting, served as a
``hit``, and then blows up in the caller when ``.response`` is built from it:

- ``client.chat.completions.stream(...)`` (and ``responses.stream``, ``messages.stream``): the
  SDK's helper reads ``raw_stream.response`` on construction, so entering the helper raises
  ``httpx.InvalidURL`` / ``TypeError`` / ``ValueError``;
- ``create(stream=True).response`` raises the same.

README ("Cached SDK clients"): a wrong entry "is a corrupt entry: logged, counted
(``corrupt_entries``), dropped, and the call goes on as a miss ... The caller never gets an
exception ... from it." And the project's rule: a failure inside the cache never breaks the
caller's call. Such an entry can come from a bug, another program or another version sharing
the backend, or anyone who can write to a shared Redis/SQLite.

Fix direction: validate the head before it is accepted (e.g. ``HttpHead.model_validate`` of its
fields inside `head_fits`, plus building the recorded response once in a ``try``), and treat a
head that fails as a corrupt entry (drop, count, go on as a miss).
"""

from __future__ import annotations

from typing import Any

import anyio
import openai
import pytest

from chengeta_ai import CacheManager, cached
from chengeta_ai.clients.recorded import HttpHead
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = pytest.mark.filterwarnings(
    r"ignore:Async generator '(openai|anthropic|httpx2?|httpcore2?)\.:ResourceWarning"
)

#: Head fields a planted entry may carry: each decodes fine (no validation) and each breaks
#: the HTTP response built from it.
BAD_HEADS = {
    "unparsable-url": {"url": "http://[::1"},
    "headers-not-a-list": {"headers": 5},
    "header-not-a-pair": {"headers": [("x-request-id",)]},
}


def _plant(cache: StreamingResponseCache, key: str, bad: dict[str, Any]) -> None:
    """Rewrites the streamed entry under ``key`` with its head's fields replaced by ``bad``
    (the chunks unchanged): well-formed bytes, as another writer could leave them."""
    items = cache.manager.get(key)
    assert isinstance(items, list) and isinstance(items[0], HttpHead)
    cache.manager.set(key, [items[0].model_copy(update=bad), *items[1:]])


def _request(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}


@pytest.mark.parametrize("bad", list(BAD_HEADS.values()), ids=list(BAD_HEADS))
def test_sync_helper_over_a_planted_head(
    server: LocalOpenAIServer, oai: openai.OpenAI, text: str, bad: dict[str, Any]
) -> None:
    cache = StreamingResponseCache(CacheManager())
    client = cached(oai, cache)
    first = client.chat.completions.create(**_request(text), stream=True)
    want = "".join(c.choices[0].delta.content or "" for c in first if c.choices)
    assert first.cache_info is not None
    _plant(cache, first.cache_info.key, bad)

    # observed on main: httpx.InvalidURL / TypeError / ValueError raised by entering the helper
    with client.chat.completions.stream(**_request(text)) as helper:
        completion = helper.get_final_completion()
    assert completion.choices[0].message.content == want
    assert cache.stats().corrupt_entries == 1


@pytest.mark.parametrize("bad", list(BAD_HEADS.values()), ids=list(BAD_HEADS))
def test_sync_create_response_over_a_planted_head(
    server: LocalOpenAIServer, oai: openai.OpenAI, text: str, bad: dict[str, Any]
) -> None:
    cache = StreamingResponseCache(CacheManager())
    client = cached(oai, cache)
    first = client.chat.completions.create(**_request(text), stream=True)
    list(first)
    assert first.cache_info is not None
    _plant(cache, first.cache_info.key, bad)

    with client.chat.completions.create(**_request(text), stream=True) as stream:
        list(stream)
        # observed on main: the call is served as a hit and `.response` raises
        response = stream.response
    assert response.status_code == 200
    assert str(response.request.url).endswith("/chat/completions")


@pytest.mark.anyio
@pytest.mark.parametrize("bad", list(BAD_HEADS.values()), ids=list(BAD_HEADS))
async def test_async_helper_over_a_planted_head(
    server: LocalOpenAIServer, aoai: openai.AsyncOpenAI, text: str, bad: dict[str, Any]
) -> None:
    cache = StreamingResponseCache(CacheManager())
    client = cached(aoai, cache)
    first = await client.chat.completions.create(**_request(text), stream=True)
    want = "".join([c.choices[0].delta.content or "" async for c in first if c.choices])
    assert first.cache_info is not None
    _plant(cache, first.cache_info.key, bad)

    async with client.chat.completions.stream(**_request(text)) as helper:
        completion = await helper.get_final_completion()
    await anyio.lowlevel.checkpoint()
    assert completion.choices[0].message.content == want
    assert cache.stats().corrupt_entries == 1
