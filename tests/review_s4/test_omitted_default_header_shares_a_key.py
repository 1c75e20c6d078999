"""Review s4, finding: a default header removed with ``omit`` still keys the call (HIGH).

The SDKs let a call remove a client-level default header: ``extra_headers={"anthropic-beta":
anthropic.omit}`` sends the request *without* the ``anthropic-beta`` the client was built with
(``default_headers=``). The cached client's key (`chengeta_ai.clients.request_key`) drops a
header whose value is the "omit" sentinel as if it were transport-only, and still hashes the
client's ``default_headers`` (``client_identity``). So the call that omits the beta and the call
that sends it share one key: whichever runs first is stored, the other is served from it as a
``hit``. ``anthropic-beta`` changes the response (README: "response-shaping ``extra_headers``
such as ``anthropic-beta``"), so a caller gets an answer to a request it did not make.

Shown through the real ``anthropic`` client over HTTP, with an httpx event hook recording what
is actually sent: one request went out without the header, and the call that would have sent it
was answered from that request's entry.

Fix direction: compute the *effective* headers (the client's defaults merged with the call's
``extra_headers``, an ``omit`` removing a default) and key those, rather than the defaults and
the extras separately with omits dropped.
"""

from __future__ import annotations

from typing import Any

import anthropic
import anyio
import httpx2
import pytest

from chengeta_ai import CacheManager, cached
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = pytest.mark.filterwarnings(
    r"ignore:Async generator '(openai|anthropic|httpx2?|httpcore2?)\.:ResourceWarning"
)

BETA = "context-1m-2025-08-07"


def _request(text: str) -> dict[str, Any]:
    return {"model": "claude-x", "max_tokens": 64, "messages": [{"role": "user", "content": text}]}


def test_omitting_a_default_beta_header_shares_the_entry(
    server: LocalOpenAIServer, text: str
) -> None:
    sent: list[str | None] = []
    http = httpx2.Client(
        event_hooks={"request": [lambda r: sent.append(r.headers.get("anthropic-beta"))]}
    )
    cache = StreamingResponseCache(CacheManager())
    with anthropic.Anthropic(
        base_url=server.anthropic_base_url,
        api_key="sk-ant-local",
        max_retries=0,
        default_headers={"anthropic-beta": BETA},
        http_client=http,
    ) as raw:
        client = cached(raw, cache)
        without = client.messages.create(
            **_request(text), stream=True, extra_headers={"anthropic-beta": anthropic.omit}
        )
        list(without)
        with_beta = client.messages.create(**_request(text), stream=True)
        list(with_beta)
    assert sent[0] is None  # the first request really went out without the beta
    assert with_beta.cache_info is not None
    # observed on main: 'hit' (same key), answered from the request sent without the beta
    assert with_beta.cache_info.status == "miss"
    assert sent == [None, BETA]


@pytest.mark.anyio
async def test_async_omitting_a_default_beta_header_shares_the_entry(
    server: LocalOpenAIServer, text: str
) -> None:
    sent: list[str | None] = []

    async def record(request: Any) -> None:
        sent.append(request.headers.get("anthropic-beta"))

    cache = StreamingResponseCache(CacheManager())
    async with anthropic.AsyncAnthropic(
        base_url=server.anthropic_base_url,
        api_key="sk-ant-local",
        max_retries=0,
        default_headers={"anthropic-beta": BETA},
        http_client=httpx2.AsyncClient(event_hooks={"request": [record]}),
    ) as raw:
        client = cached(raw, cache)
        with_beta = await client.messages.create(**_request(text), stream=True)
        _ = [e async for e in with_beta]
        without = await client.messages.create(
            **_request(text), stream=True, extra_headers={"anthropic-beta": anthropic.omit}
        )
        _ = [e async for e in without]
    await anyio.lowlevel.checkpoint()
    assert sent[0] == BETA
    assert without.cache_info is not None
    # observed on main: 'hit': the call without the beta is answered with the beta's reply
    assert without.cache_info.status == "miss"
    assert sent == [BETA, None]
