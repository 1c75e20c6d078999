"""A cached client's common call is split and keyed in one call into the extension
(`ClientCache.split`: `ClientKeyer`, `KeyDeriver.client_key`, `EncodedParams`): the key is
always the one the cache makes of the split call (`build_key` of its request, model and
params), whichever path made it, and it follows every change to the client's identity."""

from __future__ import annotations

import threading
from typing import Any

import anthropic
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.clients.test_split_request import identity_changes, plain_kwargs, same

from chengeta_ai import CacheManager
from chengeta_ai._core import EncodedParams, hash_request
from chengeta_ai.clients.calls import ClientCache
from chengeta_ai.clients.request_key import _split_slow, client_identity
from chengeta_ai.core.key_builder import CacheKeyBuilder, build_key
from chengeta_ai.layers.call_controls import CacheControl
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

ENDPOINTS = ("openai.responses", "openai.chat.completions", "openai.completions")


def expected_key(client: Any, endpoint: str, kwargs: dict[str, Any], *, isolate: bool) -> str:
    """The key `StreamingResponseCache` makes of the call split the slow way."""
    req = _split_slow(dict(kwargs))
    params = {
        "endpoint": endpoint,
        "stream": req.stream,
        **client_identity(client, isolate_api_keys=isolate),
    }
    return build_key(CacheKeyBuilder(), req.request, req.model_id, params, None)


def calls_of(client: Any, *, isolate: bool = True, builder: Any = None) -> ClientCache:
    manager = CacheManager() if builder is None else CacheManager(key_builder=builder)
    return ClientCache(
        client, StreamingResponseCache(manager), isolate_api_keys=isolate, is_async=False
    )


@pytest.fixture(scope="module")
def client() -> Any:
    with openai.OpenAI(base_url="http://127.0.0.1:1/v1", api_key="sk-a", max_retries=0) as c:
        yield c


@settings(max_examples=200)
@given(kwargs=plain_kwargs, endpoint=st.sampled_from(ENDPOINTS), isolate=st.booleans())
def test_the_key_made_in_one_call_is_the_cache_s_key(
    client: Any, kwargs: dict[str, Any], endpoint: str, isolate: bool
) -> None:
    calls = calls_of(client, isolate=isolate)
    want = expected_key(client, endpoint, kwargs, isolate=isolate)
    # the first call teaches the keyer the identity and endpoint; the second is made whole
    # in the extension
    for _ in range(2):
        req, params, key = calls.split(endpoint, dict(kwargs), None)
        assert key == want
        slow = _split_slow(dict(kwargs))
        assert same(req.request, slow.request)
        assert (req.stream, req.model_id) == (slow.stream, slow.model_id)
        assert params == {
            "endpoint": endpoint,
            "stream": req.stream,
            **client_identity(client, isolate_api_keys=isolate),
        }
    builder = calls.cache.manager.key_builder
    assert calls._keyer is not None
    assert calls._keyer.split(builder, endpoint, dict(kwargs)) is not None


def test_a_streamed_call_split_fast_copies_no_request(client: Any) -> None:
    calls = calls_of(client)
    kwargs = {"model": "m", "input": "hi", "stream": True}
    calls.split("openai.responses", kwargs, None)
    req, _, key = calls.split("openai.responses", kwargs, None)
    assert key is not None and req.sdk_kwargs is kwargs
    assert req.request == {"model": "m", "input": "hi"}  # made when read, once
    assert req.request is req.request
    assert "stream" in kwargs


def test_the_key_follows_every_change_to_the_client() -> None:
    with openai.OpenAI(base_url="http://127.0.0.1:1/v1", api_key="sk-a", max_retries=0) as c:
        calls = calls_of(c)
        kwargs = {"model": "m", "input": "hi", "stream": True}
        seen = set()

        def check() -> None:
            for endpoint in ("openai.responses", "openai.chat.completions"):
                for _ in range(2):
                    key = calls.split(endpoint, dict(kwargs), None)[2]
                    assert key == expected_key(c, endpoint, kwargs, isolate=True)
                    seen.add(key)

        for _ in identity_changes(c):
            check()
        c.api_key = "sk-a"  # the first key again, with the other changes: another identity
        check()
        assert len(seen) == 8 * 2


def test_an_anthropic_client_s_token_is_in_the_key() -> None:
    with anthropic.Anthropic(base_url="http://127.0.0.1:1", api_key="sk-a", max_retries=0) as c:
        calls = calls_of(c)
        kwargs = {"model": "claude", "max_tokens": 5, "messages": [], "stream": True}
        first = [calls.split("anthropic.messages", dict(kwargs), None)[2] for _ in range(2)]
        c.auth_token = "token"
        second = calls.split("anthropic.messages", dict(kwargs), None)[2]
        assert first[0] == first[1] != second
        assert second == expected_key(c, "anthropic.messages", kwargs, isolate=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"model": "m", "input": "x", "timeout": 5},  # off the fast path
        {
            "model": "m",
            "input": "x",
            "extra_headers": {"anthropic-beta": "b", "x-stainless-a": "1"},
        },
        {"model": "m", "input": "x", "n": openai.NOT_GIVEN},
    ],
    ids=["timeout", "headers", "not-given"],
)
def test_calls_off_the_fast_path_keep_their_key(client: Any, kwargs: dict[str, Any]) -> None:
    calls = calls_of(client)
    for _ in range(2):
        req, params, key = calls.split("openai.responses", dict(kwargs), None)
        assert key is None  # made by the cache
        assert build_key(
            CacheKeyBuilder(), req.request, req.model_id, params, None
        ) == expected_key(client, "openai.responses", kwargs, isolate=True)


def test_a_value_the_key_refuses_is_left_to_the_cache(client: Any) -> None:
    calls = calls_of(client)
    kwargs = {"model": "m", "input": [{"content": {"a set"}}]}
    for _ in range(2):
        req, _, key = calls.split("openai.responses", kwargs, None)
        assert key is None  # the cache raises the TypeError, and the call goes uncached
    with pytest.raises(TypeError, match="'set' at messages\\['input'\\]\\[0\\]\\['content'\\]"):
        build_key(CacheKeyBuilder(), req.request, req.model_id, {}, None)


def test_a_namespace_or_another_key_builder_keys_in_the_cache(client: Any) -> None:
    kwargs = {"model": "m", "input": "x"}
    calls = calls_of(client)
    assert calls.split("openai.responses", kwargs, CacheControl(namespace="t"))[2] is None

    class Builder(CacheKeyBuilder):
        __slots__ = ()

    calls = calls_of(client, builder=Builder())
    for _ in range(2):
        assert calls.split("openai.responses", kwargs, None)[2] is None


def test_params_the_key_cannot_hash_leave_every_call_to_the_cache() -> None:
    with openai.OpenAI(
        base_url="http://127.0.0.1:1/v1",
        api_key="sk-a",
        max_retries=0,
        default_query={"q": frozenset({"x"})},  # no encoding: a TypeError for each call
    ) as c:
        calls = calls_of(c)
        for _ in range(2):
            assert calls.split("openai.responses", {"model": "m"}, None)[2] is None


def test_encoded_params_hash_as_the_dict_they_encode() -> None:
    params = {"endpoint": "e", "stream": True, "base_url": "http://x", "api_key": "ab"}
    deriver = CacheKeyBuilder()._deriver
    kwargs = {"model": "m", "input": "x", "stream": True}
    keyed = deriver.client_key(kwargs, (EncodedParams({}), EncodedParams(params)))
    assert keyed is not None
    assert keyed[1] == deriver.key("m", {"model": "m", "input": "x"}, params)
    assert len(EncodedParams(None)) == len(EncodedParams({})) == 2  # `d 00`
    assert hash_request(params) != hash_request({})
    with pytest.raises(TypeError, match="'set' at params\\['a'\\]"):
        EncodedParams({"a": {1}})


def test_threads_share_one_keyer(client: Any) -> None:
    calls = calls_of(client)
    kwargs = {"model": "m", "input": [{"role": "user", "content": "hi"}], "stream": True}
    want = {e: expected_key(client, e, kwargs, isolate=True) for e in ENDPOINTS}
    wrong: list[tuple[str, str | None]] = []

    def work(i: int) -> None:
        for n in range(300):
            endpoint = ENDPOINTS[(i + n) % len(ENDPOINTS)]
            key = calls.split(endpoint, dict(kwargs), None)[2]
            if key != want[endpoint] and not (n == 0 and key is None):
                wrong.append((endpoint, key))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
