"""The key of a cached client's call is the whole request: argument by argument, two requests
that differ in anything that can change the response never share an entry; transport-only
arguments do not split entries; tenants (API keys) are isolated unless asked otherwise.

Counted through the real SDK clients over HTTP: every request the local server sees is a miss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

from chengeta_ai import CacheManager, cached
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = pytest.mark.filterwarnings(
    r"ignore:Async generator '(openai|anthropic|httpx2?|httpcore2?)\.:ResourceWarning"
)

TOOL = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
}
RESPONSES_TOOL = {"type": "function", "name": "lookup", "parameters": {"type": "object"}}
CLAUDE_TOOL = {"name": "lookup", "input_schema": {"type": "object", "properties": {}}}

#: endpoint -> (resource path, base arguments (a function of the prompt), server counter,
#: variants: each differs from the base in one response-shaping argument)
CASES: dict[str, tuple[tuple[str, ...], Callable[[str], dict[str, Any]], str, dict[str, Any]]] = {
    "chat": (
        ("chat", "completions"),
        lambda t: {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": t}]},
        "chat_completions",
        {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": "another prompt"}],
            "system message": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "SAME"},
            ],
            "temperature": 0.2,
            "temperature given as its default": 1.0,
            "top_p": 0.5,
            "seed": 7,
            "max_tokens": 40,
            "max_completion_tokens": 40,
            "n": 2,
            "stop": ["\n"],
            "tools": [TOOL],
            "tool_choice": "none",
            "parallel_tool_calls": False,
            "response_format": {"type": "json_object"},
            "reasoning_effort": "low",
            "verbosity": "low",
            "logprobs": True,
            "top_logprobs": 2,
            "logit_bias": {"50256": -100},
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
            "metadata": {"tag": "a"},
            "user": "user-1",
            "service_tier": "flex",
            "store": True,
            "modalities": ["text"],
            "prediction": {"type": "content", "content": "x"},
            "stream_options": {"include_usage": True},
            "extra_body": {"custom": 1},
            "extra_query": {"api-version": "2"},
            "extra_headers": {"x-custom-feature": "on"},
        },
    ),
    "completions": (
        ("completions",),
        lambda t: {"model": "gpt-3.5-turbo-instruct", "prompt": t},
        "completions",
        {
            "model": "davinci-002",
            "prompt": "another prompt",
            "suffix": "!",
            "echo": True,
            "best_of": 2,
            "logprobs": 1,
            "max_tokens": 40,
            "n": 2,
            "seed": 7,
            "stop": ["\n"],
            "temperature": 0.2,
            "top_p": 0.5,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
            "logit_bias": {"50256": -100},
            "user": "user-1",
            "extra_body": {"custom": 1},
        },
    ),
    "responses": (
        ("responses",),
        lambda t: {"model": "gpt-4o", "input": t},
        "responses",
        {
            "model": "gpt-4o-mini",
            "input": "another prompt",
            "input as items": [{"role": "user", "content": "SAME"}],
            "instructions": "Be terse.",
            "temperature": 0.2,
            "top_p": 0.5,
            "max_output_tokens": 40,
            "reasoning": {"effort": "low"},
            "text": {"format": {"type": "json_object"}},
            "tools": [RESPONSES_TOOL],
            "tool_choice": "none",
            "parallel_tool_calls": False,
            "max_tool_calls": 2,
            "metadata": {"tag": "a"},
            "previous_response_id": "resp_123",
            "truncation": "auto",
            "store": False,
            "include": ["message.output_text.logprobs"],
            "top_logprobs": 2,
            "user": "user-1",
            "service_tier": "flex",
            "extra_body": {"custom": 1},
        },
    ),
    "messages": (
        ("messages",),
        lambda t: {
            "model": "claude-sonnet-4-6",
            "max_tokens": 256,
            "messages": [{"role": "user", "content": t}],
        },
        "messages",
        {
            "model": "claude-haiku-4-5",
            "max_tokens": 100,
            "messages": [{"role": "user", "content": "another prompt"}],
            "system": "Be terse.",
            "stop_sequences": ["\n"],
            "tools": [CLAUDE_TOOL],
            "tool_choice": {"type": "any"},
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "metadata": {"user_id": "u1"},
            "cache_control": {"type": "ephemeral"},  # Anthropic's own prompt caching
            "output_config": {"effort": "low"},
            "service_tier": "standard_only",
            "speed": "fast",
            "extra_body": {"custom": 1},
            "extra_headers": {"anthropic-beta": "some-beta-2026"},
        },
    ),
}


def _resource(client: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        client = getattr(client, part)
    return client


@pytest.fixture
def client_for(oai: openai.OpenAI, claude: anthropic.Anthropic) -> Callable[[str], Any]:
    return lambda endpoint: claude if endpoint == "messages" else oai


def _variant(base: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    arg = name.split(" ")[0]
    if name in ("system message", "input as items"):
        # the prompt stays the same text, only its shape changes
        value = [
            dict(m, content=base.get("input") or base["messages"][0]["content"])
            if m.get("content") == "SAME"
            else m
            for m in value
        ]
        arg = "messages" if name == "system message" else "input"
    return {**base, arg: value}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "object"])
@pytest.mark.parametrize("endpoint", list(CASES))
def test_every_argument_is_in_the_key(
    endpoint: str,
    stream: bool,
    server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    client_for: Callable[[str], Any],
    text: str,
) -> None:
    path, base_of, counter, variants = CASES[endpoint]
    resource = _resource(cached(client_for(endpoint), cache), path)
    base = base_of(text)
    if endpoint == "chat" and not stream:
        variants = {k: v for k, v in variants.items() if k != "stream_options"}

    def call(kwargs: dict[str, Any]) -> int:
        before = getattr(server.request_counts, counter)
        if stream:
            with resource.create(**kwargs, stream=True) as s:
                assert list(s)
        else:
            resource.create(**kwargs)
        return int(getattr(server.request_counts, counter) - before)

    assert call(base) == 1
    shared = [name for name, value in variants.items() if call(_variant(base, name, value)) != 1]
    assert shared == [], f"these arguments did not change the key: {shared}"
    # and every one of them is found again
    assert call(base) == 0
    again = [name for name, value in variants.items() if call(_variant(base, name, value)) != 0]
    assert again == []


@pytest.mark.parametrize("endpoint", list(CASES))
def test_transport_arguments_share_the_entry(
    endpoint: str,
    server: LocalOpenAIServer,
    cache: StreamingResponseCache,
    client_for: Callable[[str], Any],
    text: str,
) -> None:
    path, base_of, counter, _ = CASES[endpoint]
    resource = _resource(cached(client_for(endpoint), cache), path)
    base = base_of(text)
    before = getattr(server.request_counts, counter)
    for extra in (
        {},
        {"timeout": 30.0},
        {"extra_headers": {"Idempotency-Key": "k-1", "X-Stainless-Helper-Method": "x"}},
        {
            "extra_headers": {
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            }
        },
        {"extra_headers": None, "extra_body": None, "extra_query": None},
        {"extra_headers": {"User-Agent": "mine/1.0", "x-client-request-id": "r-9"}},
    ):
        with resource.create(**base, **extra, stream=True) as s:
            assert list(s)
    assert getattr(server.request_counts, counter) - before == 1


def test_dict_order_and_generators_do_not_split_entries(
    server: LocalOpenAIServer, cache: StreamingResponseCache, oai: openai.OpenAI, text: str
) -> None:
    client = cached(oai, cache)
    before = server.request_counts.chat_completions
    message = {"role": "user", "content": text}
    calls: list[dict[str, Any]] = [
        {"model": "gpt-4o-mini", "messages": [message], "metadata": {"a": "1", "b": "2"}},
        {
            "metadata": {"b": "2", "a": "1"},
            "messages": [dict(reversed(message.items()))],
            "model": "gpt-4o-mini",
        },
        {
            "model": "gpt-4o-mini",
            "messages": (m for m in [message]),
            "metadata": {"a": "1", "b": "2"},
        },
    ]
    for kwargs in calls:
        with client.chat.completions.create(**kwargs, stream=True) as s:
            assert list(s)
    assert server.request_counts.chat_completions - before == 1
    assert server.last_request is not None and server.last_request["messages"] == [message]


def test_api_keys_are_isolated_unless_shared(
    server: LocalOpenAIServer, cache: StreamingResponseCache, text: str
) -> None:
    def client(key: str, **kwargs: Any) -> Any:
        return cached(
            openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0), cache, **kwargs
        )

    def call(c: Any) -> int:
        before = server.request_counts.chat_completions
        with c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": text}], stream=True
        ) as s:
            assert list(s)
        return int(server.request_counts.chat_completions - before)

    assert call(client("sk-tenant-a")) == 1
    assert call(client("sk-tenant-b")) == 1  # another key: its own entry
    assert call(client("sk-tenant-a")) == 0
    # a deliberately shared cache: one entry for every key
    assert call(client("sk-tenant-a", isolate_api_keys=False)) == 1
    assert call(client("sk-tenant-c", isolate_api_keys=False)) == 0
    # OpenAI's organization and project select another account
    org = cached(
        openai.OpenAI(
            base_url=server.base_url, api_key="sk-tenant-a", organization="org-2", max_retries=0
        ),
        cache,
    )
    assert call(org) == 1


def test_base_url_is_in_the_key(
    server: LocalOpenAIServer, cache: StreamingResponseCache, text: str
) -> None:
    other_host = server.base_url.replace("127.0.0.1", "localhost")
    before = server.request_counts.chat_completions
    for base_url in (server.base_url, other_host, server.base_url):
        c = cached(openai.OpenAI(base_url=base_url, api_key="k", max_retries=0), cache)
        list(
            c.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": text}], stream=True
            )
        )
    assert server.request_counts.chat_completions - before == 2


def test_openai_and_anthropic_never_share(server: LocalOpenAIServer, text: str) -> None:
    """Same cache, same prompt, clients of two providers: two entries (the endpoint and the
    base URL are in the key)."""
    cache = StreamingResponseCache(CacheManager())
    before = server.request_count
    oai = cached(openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0), cache)
    claude = cached(
        anthropic.Anthropic(base_url=server.anthropic_base_url, api_key="k", max_retries=0), cache
    )
    messages = [{"role": "user", "content": text}]
    list(oai.chat.completions.create(model="m", messages=messages, stream=True))
    list(claude.messages.create(model="m", max_tokens=9, messages=messages, stream=True))
    assert server.request_count - before == 2


def test_a_header_removed_with_omit_is_keyed_apart_from_absent_and_sent() -> None:
    """Review s4: ``extra_headers={"anthropic-beta": omit}`` removes the client's default beta
    header from the request: it must not share a key with the call that sends it."""
    import anthropic

    from chengeta_ai.clients.request_key import split_request

    def request(**extra: Any) -> Any:
        kwargs: dict[str, Any] = {"model": "m", "messages": [], "max_tokens": 5, **extra}
        return split_request(kwargs).request

    plain = request()
    omitted = request(extra_headers={"anthropic-beta": anthropic.omit})
    not_given = request(extra_headers={"anthropic-beta": anthropic.NOT_GIVEN})
    sent = request(extra_headers={"anthropic-beta": "b1"})
    assert omitted != plain and omitted != sent
    assert not_given == plain  # "not given" sends nothing
    assert request(extra_headers={"x-stainless-helper": anthropic.omit}) == plain  # transport


def test_an_omit_that_changes_nothing_is_not_keyed() -> None:
    """An ``omit`` matters only for a header the client sends by default: the anthropic
    helpers pass its client-level params as omit on every call (the SDK keeps the client's
    value anyway), and they must share entries with ``create(stream=True)``."""
    import anthropic

    from chengeta_ai.clients.request_key import settle_omitted_headers, split_request

    def settled(client: Any, **extra: Any) -> Any:
        kwargs: dict[str, Any] = {"model": "m", "messages": [], "max_tokens": 5, **extra}
        request = split_request(kwargs).request
        settle_omitted_headers(request, client)
        return request

    plain_client = anthropic.Anthropic(api_key="k", base_url="http://127.0.0.1:9")
    beta_client = anthropic.Anthropic(
        api_key="k", base_url="http://127.0.0.1:9", default_headers={"anthropic-beta": "b1"}
    )
    plain = settled(plain_client)
    helper_like = {"anthropic-workspace-id": anthropic.omit, "x-stainless-helper": "stream"}
    assert settled(plain_client, extra_headers=helper_like) == plain
    assert settled(beta_client, extra_headers=helper_like) == settled(beta_client)
    # removing a default the client does send is a different request
    omit_beta = {"anthropic-beta": anthropic.omit}
    assert settled(beta_client, extra_headers=omit_beta) != settled(beta_client)
    # removing one it does not send changes nothing
    assert settled(plain_client, extra_headers=omit_beta) == plain
