"""What a cached client's call is keyed by, made fast: `split_request`'s fast path
(`split_plain_kwargs`, in the extension) splits every call it takes exactly as the Python slow
path does, and leaves every other call to it; `ClientIdentity` (the client's identity, made
again only when what it is made of changed) always equals `client_identity`."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chengeta_ai._core import Request, split_plain_kwargs
from chengeta_ai.clients.request_key import (
    ClientIdentity,
    _split_slow,
    client_identity,
    split_request,
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=4),
)
plain_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=4), inner, max_size=3),
    ),
    max_leaves=12,
)
names = st.sampled_from(["model", "stream", "messages", "input", "temperature", "tools", "n"])
plain_kwargs = st.dictionaries(names | st.text(min_size=1, max_size=6), plain_values, max_size=8)


def fields(req: Request) -> tuple[Any, ...]:
    return (req.request, req.sdk_kwargs, req.stream, req.model_id)


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (``1 == 1.0 == True`` is not enough)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@given(plain_kwargs)
def test_the_fast_path_splits_like_the_slow_path(kwargs: dict[str, Any]) -> None:
    fast = split_plain_kwargs(kwargs)
    assert fast is not None
    slow = _split_slow(dict(kwargs))
    assert same(fields(fast)[0], fields(slow)[0])
    assert fast.sdk_kwargs is kwargs
    assert fast.request is not kwargs and "stream" not in fast.request
    assert (fast.stream, fast.model_id) == (slow.stream, slow.model_id)
    assert type(fast.stream) is bool and type(fast.model_id) is str


@pytest.mark.parametrize(
    "kwargs",
    [
        {"model": "m", "timeout": None},
        {"model": "m", "extra_headers": None},
        {"model": "m", "extra_query": {"a": "b"}},
        {"model": "m", "extra_body": {}},
        {"model": "m", "messages": iter([])},
        {"model": "m", "n": openai.NOT_GIVEN},
        {"model": "m", "metadata": OrderedDict(a="b")},
        {"model": "m", "stop": {"x"}},
        {"model": "m", "b": bytearray(b"x")},
        {"model": "m", "lone\udc80": 1},
    ],
    ids=repr,
)
def test_calls_off_the_fast_path_take_the_slow_one(kwargs: dict[str, Any]) -> None:
    assert split_plain_kwargs(kwargs) is None
    assert fields(split_request(dict(kwargs))) == fields(_split_slow(dict(kwargs)))


@pytest.mark.parametrize(
    ("kwargs", "stream", "model_id"),
    [
        ({}, False, "default"),
        ({"model": "", "stream": 1}, True, "default"),
        ({"model": 5, "stream": []}, False, "default"),
        ({"model": "gpt-4o", "stream": "yes"}, True, "gpt-4o"),
        ({"model": "gpt-4o", "stream": None}, False, "gpt-4o"),
    ],
)
def test_stream_and_model_id(kwargs: dict[str, Any], stream: bool, model_id: str) -> None:
    for req in (split_plain_kwargs(dict(kwargs)), _split_slow(dict(kwargs))):
        assert req is not None
        assert (req.stream, req.model_id) == (stream, model_id)
        assert "stream" not in req.request


def test_a_request_is_immutable() -> None:
    req = split_request({"model": "m"})
    with pytest.raises(AttributeError):
        req.stream = True  # type: ignore[misc]


def identity_changes(c: openai.OpenAI) -> Iterator[int]:
    """Yields 0 with the client as made, then 1-6 after each change of what its identity is
    made of (API key, base URL, organization, project, a default header and a default query
    parameter changed in place): the steps the identity and key tests walk through."""
    yield 0
    c.api_key = "sk-b"
    yield 1
    c.base_url = "http://127.0.0.1:2/v1"  # type: ignore[assignment]
    yield 2
    c.organization = "org-x"
    yield 3
    c.project = "proj-y"
    yield 4
    c._custom_headers["anthropic-beta"] = "x"  # changed in place
    yield 5
    c._custom_query["api-version"] = "1"
    yield 6


@pytest.mark.parametrize("isolate", [True, False])
def test_client_identity_follows_every_change_to_the_client(isolate: bool) -> None:
    with openai.OpenAI(base_url="http://127.0.0.1:1/v1", api_key="sk-a", max_retries=0) as c:
        identity = ClientIdentity(c, isolate_api_keys=isolate)
        seen = []

        def check() -> None:
            got = identity()
            assert got == client_identity(c, isolate_api_keys=isolate)
            seen.append(got)

        for step in identity_changes(c):
            check()
            if step == 0:
                assert identity() is seen[0]  # unchanged: the same dict, not made again
        distinct = {tuple(sorted(map(str, d.items()))) for d in seen}
        # without isolation the key, organization and project are not part of the identity
        assert len(distinct) == (7 if isolate else 4)


def test_client_identity_of_an_anthropic_client_follows_its_token() -> None:
    with anthropic.Anthropic(base_url="http://127.0.0.1:1", api_key="sk-a", max_retries=0) as c:
        identity = ClientIdentity(c, isolate_api_keys=True)
        first = identity()
        c.auth_token = "token"
        assert identity() != first
        assert identity() == client_identity(c, isolate_api_keys=True)


def test_client_identity_reads_computed_attributes_at_every_call() -> None:
    # An SDK (or a subclass) whose key is a property over another attribute: the identity must
    # follow it, not the instance dict (where `api_key` is absent).
    class KeyedElsewhere(openai.OpenAI):
        @property  # type: ignore[override]
        def api_key(self) -> str:
            return str(self.__dict__["_the_key"])

        @api_key.setter
        def api_key(self, value: str) -> None:
            self.__dict__["_the_key"] = value

    with KeyedElsewhere(base_url="http://127.0.0.1:1/v1", api_key="sk-a", max_retries=0) as c:
        identity = ClientIdentity(c, isolate_api_keys=True)
        first = identity()
        c.__dict__["_the_key"] = "sk-b"
        assert identity() != first
        assert identity() == client_identity(c, isolate_api_keys=True)
