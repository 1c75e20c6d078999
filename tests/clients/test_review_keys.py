"""Adversarial review of the cached clients' keys (issues 8 and 9): requests that differ in who
makes them or in a response-shaping setting must never share an entry. Each failed before
the fix."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest

from chengeta_ai import CacheManager, cache_info_of, cached
from chengeta_ai.clients.request_key import client_identity, split_request
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache


def _key(client: Any, cache: StreamingResponseCache, **kwargs: Any) -> str:
    """The key the cached client gives ``chat.completions.create(**kwargs)``."""
    core = cached(client, cache)._core
    req = split_request(dict(kwargs))
    identity = client_identity(core.client, isolate_api_keys=core.isolate_api_keys)
    params = {"endpoint": "openai.chat.completions", "stream": req.stream, **identity}
    return core._key(req, params, None)


REQUEST = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def test_callable_api_keys_are_refused_under_tenant_isolation(server: LocalOpenAIServer) -> None:
    """The openai SDK takes ``api_key=`` as a callable (a key provider): ``client.api_key`` is
    then empty and there is no stable secret to key tenants by (before the fix: tenant B was
    served tenant A's answer). Under isolation the client is refused, with the way out; with
    ``isolate_api_keys=False`` and a namespace per tenant, tenants stay apart."""
    cache = StreamingResponseCache(CacheManager())
    with (
        openai.OpenAI(base_url=server.base_url, api_key=lambda: "sk-tenant-a", max_retries=0) as a,
        openai.OpenAI(base_url=server.base_url, api_key=lambda: "sk-tenant-b", max_retries=0) as b,
    ):
        with pytest.raises(TypeError, match="isolate_api_keys=False"):
            cached(a, cache)
        shared_a = cached(a, cache, isolate_api_keys=False)
        shared_b = cached(b, cache, isolate_api_keys=False)
        list(
            shared_a.chat.completions.create(
                **REQUEST, stream=True, cache_control={"namespace": "a"}
            )
        )
        second = shared_b.chat.completions.create(
            **REQUEST, stream=True, cache_control={"namespace": "b"}
        )
        list(second)
        info = cache_info_of(second)
        assert info is not None
        assert info.status == "miss", "tenant B was answered from tenant A's entry"


def test_azure_ad_tokens_of_two_tenants_share_a_key() -> None:
    """AzureOpenAI with ``azure_ad_token`` (no API key): both tenants get the same key."""
    cache = StreamingResponseCache(CacheManager())
    a = openai.AzureOpenAI(azure_endpoint="http://x", azure_ad_token="tenant-a", api_version="v1")
    b = openai.AzureOpenAI(azure_endpoint="http://x", azure_ad_token="tenant-b", api_version="v1")
    assert _key(a, cache, **REQUEST) != _key(b, cache, **REQUEST)


def test_azure_api_version_is_not_in_the_key() -> None:
    """Azure's ``api_version`` (sent as the ``api-version`` query) changes the response shape;
    two api versions share an entry."""
    cache = StreamingResponseCache(CacheManager())
    a = openai.AzureOpenAI(azure_endpoint="http://x", api_key="k", api_version="2024-02-01")
    b = openai.AzureOpenAI(azure_endpoint="http://x", api_key="k", api_version="2025-04-01")
    assert _key(a, cache, **REQUEST) != _key(b, cache, **REQUEST)


def test_client_default_query_is_not_in_the_key() -> None:
    """``default_query`` is sent with every call exactly like ``extra_query`` (which is keyed)."""
    cache = StreamingResponseCache(CacheManager())
    a = openai.OpenAI(base_url="http://x/v1", api_key="k", default_query={"variant": "b"})
    b = openai.OpenAI(base_url="http://x/v1", api_key="k")
    assert _key(a, cache, **REQUEST) != _key(b, cache, **REQUEST)


def test_client_default_anthropic_beta_header_is_not_in_the_key(server: LocalOpenAIServer) -> None:
    """``anthropic-beta`` per call (``extra_headers``) is keyed, but the usual way to set it,
    ``Anthropic(default_headers={"anthropic-beta": ...})``, is not: the beta client is served
    the non-beta client's answer."""
    cache = StreamingResponseCache(CacheManager())
    request = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "beta review"}],
    }
    with (
        anthropic.Anthropic(
            base_url=server.anthropic_base_url, api_key="sk-ant", max_retries=0
        ) as plain,
        anthropic.Anthropic(
            base_url=server.anthropic_base_url,
            api_key="sk-ant",
            max_retries=0,
            default_headers={"anthropic-beta": "context-1m-2025-08-07"},
        ) as beta,
    ):
        cached(plain, cache).messages.create(**request)
        answer = cached(beta, cache).messages.create(**request)
        info = cache_info_of(answer)
        assert info is not None
        assert info.status == "miss", "the beta client got the non-beta client's entry"


def test_api_key_changed_after_wrapping_keeps_the_old_tenant(server: LocalOpenAIServer) -> None:
    """The identity is read once at ``cached(...)``; ``client.api_key = ...`` (a public,
    settable attribute) afterwards keeps the old tenant's digest in the key."""
    cache = StreamingResponseCache(CacheManager())
    with openai.OpenAI(base_url=server.base_url, api_key="sk-a", max_retries=0) as client:
        wrapped = cached(client, cache)
        list(wrapped.chat.completions.create(**REQUEST, stream=True))
        client.api_key = "sk-b"
        second = wrapped.chat.completions.create(**REQUEST, stream=True)
        list(second)
        info = cache_info_of(second)
        assert info is not None
        assert info.status == "miss", "the new key was answered from the old key's entry"
