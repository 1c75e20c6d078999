"""Adversarial review of "one entry, both modes" (issue 9 §4): a whole call answered from its
streamed twin must equal what the API returns for the same content, ``model_fields_set``
included (the project's fidelity bar). The review's two tests failed before the fix (the twin
is now the JSON body the API sends, parsed by the SDK client as it parses a whole reply); the
field-for-field comparison of every endpoint, sync, asyncio and trio, is in test_cross_mode.py."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest
from tests.clients.fidelity import assert_identical

from chengeta_ai import CacheManager, cache_info_of, cached
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache


def test_anthropic_twin_message_has_fields_the_api_did_not_send(
    server: LocalOpenAIServer,
) -> None:
    """The assembled ``Message`` has ``stop_details`` in ``model_fields_set`` (the SDK's stream
    accumulator sets it); the API's own whole reply does not: the JSON dumps differ."""
    cache = StreamingResponseCache(CacheManager())
    request = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "review twin anthropic"}],
    }
    with anthropic.Anthropic(
        base_url=server.anthropic_base_url, api_key="sk-ant", max_retries=0
    ) as raw:
        client = cached(raw, cache)
        list(client.messages.create(**request, stream=True))
        from_twin = client.messages.create(**request)
        info = cache_info_of(from_twin)
        assert info is not None and info.status == "hit"
        direct = raw.messages.create(**request)
        assert from_twin.model_fields_set == direct.model_fields_set
        assert from_twin.model_dump_json(exclude_unset=True) == direct.model_dump_json(
            exclude_unset=True
        )


def test_responses_twin_has_other_fields_set_than_the_api(server: LocalOpenAIServer) -> None:
    """The ``Response`` taken from ``response.completed`` differs from the API's whole reply in
    ``model_fields_set`` (``store``)."""
    cache = StreamingResponseCache(CacheManager())
    request = {"model": "gpt-4o-mini", "input": "review twin responses"}
    with openai.OpenAI(base_url=server.base_url, api_key="sk", max_retries=0) as raw:
        client = cached(raw, cache)
        list(client.responses.create(**request, stream=True))
        from_twin = client.responses.create(**request)
        info = cache_info_of(from_twin)
        assert info is not None and info.status == "hit"
        direct = raw.responses.create(**request)
        assert from_twin.model_fields_set == direct.model_fields_set


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_twin_of_a_strict_client_is_validated_as_its_whole_replies(
    server: LocalOpenAIServer, provider: str
) -> None:
    """A client made with ``_strict_response_validation=True`` validates its whole replies
    (extras then count as set): the twin is built the same way, so it is that reply still."""
    cache = StreamingResponseCache(CacheManager())
    raw: Any
    if provider == "openai":
        raw = openai.OpenAI(
            base_url=server.base_url, api_key="sk", max_retries=0, _strict_response_validation=True
        )
        request: dict[str, Any] = {"model": "gpt-4o-mini", "input": "review twin strict"}
        resource, direct = cached(raw, cache).responses, raw.responses
    else:
        raw = anthropic.Anthropic(
            base_url=server.anthropic_base_url,
            api_key="sk-ant",
            max_retries=0,
            _strict_response_validation=True,
        )
        request = {
            "model": "claude-sonnet-4-6",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "review twin strict"}],
        }
        resource, direct = cached(raw, cache).messages, raw.messages
    with raw:
        list(resource.create(**request, stream=True))
        from_twin = resource.create(**request)
        assert cache.stats()["cross_mode_hits"] == 1
        assert_identical(from_twin, direct.create(**request))
