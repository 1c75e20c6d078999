"""The cache key of an SDK call: the whole request, and who makes it.

A cached client's call is looked up through `StreamingResponseCache.get_or_stream` with

- ``messages`` = every keyword argument of the call that can change the response (model,
  messages / input / prompt, tools, tool_choice, temperature, top_p, seed, response_format /
  text, max tokens, reasoning, metadata, stop, n, user, ``extra_body``, ``extra_query``, the
  response-shaping ``extra_headers``, ...): all of them except the SDK's "not given" sentinels,
  ``stream`` (it goes to ``params``) and the transport-only ones below;
- ``model_id`` = the ``model`` argument (``"default"`` without one): entries are tagged
  ``model:<model>``, so ``manager.invalidate("model:gpt-4o")`` reaches them;
- ``params`` = the endpoint (``"openai.chat.completions"``, ...), whether the call streams, the
  client's base URL and, unless the cached client was made with ``isolate_api_keys=False``,
  a digest of its API key (Anthropic: of its API key and auth token; OpenAI: also its
  organization and project): two tenants never share an entry.

Transport only, so not in the key: ``timeout``; the ``extra_headers`` ``x-stainless-*`` (the
SDKs' own bookkeeping, e.g. which helper made the call), ``idempotency-key``, ``user-agent``,
``traceparent``, ``tracestate``, ``baggage``, ``x-client-request-id``, ``accept-encoding``,
``connection``, ``keep-alive``; headers given as the SDK's "not given" sentinel (a header
given as ``omit`` removes the client's default of that name: keyed as removed). Every other
header is part of the request (``anthropic-beta`` changes the response). Client-level
``max_retries`` and ``timeout`` never reach a call's arguments.

One-shot iterables (a generator of messages) are read into a list once, and that list is both
hashed and sent. The key is `CacheKeyBuilder.build` (BLAKE3 over a canonical encoding, in Rust):
dict order never matters, ``1`` and ``1.0`` differ, pydantic models hash as their class and
fields.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from chengeta_ai._core import Request, hash_request, split_plain_kwargs

__all__ = ["ClientIdentity", "Request", "check_isolatable", "client_identity", "split_request"]

#: Call arguments that never change the response.
TRANSPORT_ARGS = frozenset({"timeout"})
#: Request headers that never change the response (lower case); plus every ``x-stainless-*``.
TRANSPORT_HEADERS = frozenset(
    {
        "idempotency-key",
        "user-agent",
        "traceparent",
        "tracestate",
        "baggage",
        "x-client-request-id",
        "accept-encoding",
        "connection",
        "keep-alive",
    }
)
_SENTINELS = frozenset({"Omit", "NotGiven"})
_KEEP_AS_IS = (str, bytes, bytearray, dict, list, tuple, BaseModel, Mapping)
#: Exact types hashed as given (no look at them beyond their type).
_PLAIN = frozenset({str, int, float, bool, type(None), dict, list, tuple, bytes})
#: Arguments that are looked at whatever their type.
_SPECIAL = frozenset({"timeout", "extra_headers", "extra_query", "extra_body"})


def _is_sentinel(value: object) -> bool:
    return type(value).__name__ in _SENTINELS


#: How a header removed with the SDK's ``omit`` is keyed: not a value a header can have (a
#: str), so the call that removes a default header and the one that sends it never share a key.
_OMITTED = ("omitted",)


def _headers(value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, header in (value or {}).items():
        lower = str(name).lower()
        if lower in TRANSPORT_HEADERS or lower.startswith("x-stainless-"):
            continue
        if _is_sentinel(header):
            # "not given" sends nothing; ``omit`` removes the client's default header of
            # that name from this request: a different request when the default exists
            if type(header).__name__ == "Omit":
                out[lower] = _OMITTED
            continue
        out[lower] = header
    return out


#: Headers the SDK keeps from the client even when a call gives them as ``omit`` (anthropic's
#: client-level header params: its helpers pass them so on every call).
_OMIT_KEEPS = frozenset({"anthropic-workspace-id", "anthropic-user-profile-id"})


def settle_omitted_headers(request: dict[str, Any], client: Any) -> None:
    """Keeps in the key only the ``omit`` headers that change the request: those removing a
    header the client sends by default (its ``default_headers``, the SDK's own and the
    ``default_headers=`` given). An ``omit`` of a header the client does not send, or of one
    the SDK keeps anyway, changes nothing and is dropped, so such a call (the SDKs' helpers
    pass some) shares its entry with the same call without it. Only looked at when the
    request holds an ``omit`` header."""
    headers = request.get("extra_headers")
    if not headers or not any(value is _OMITTED for value in headers.values()):
        return
    try:
        defaults = {str(name).lower() for name in client.default_headers}
    except Exception:
        defaults = {str(name).lower() for name in getattr(client, "_custom_headers", None) or {}}
    kept = {
        name: value
        for name, value in headers.items()
        if value is not _OMITTED or (name in defaults and name not in _OMIT_KEEPS)
    }
    if kept:
        request["extra_headers"] = kept
    else:
        del request["extra_headers"]


def split_request(kwargs: dict[str, Any]) -> Request:
    """Splits a call's keyword arguments into the hashed request and the SDK's arguments
    (a `Request`: ``request``, ``sdk_kwargs``, ``stream``, ``model_id``).

    ``kwargs`` (the call's own ``**kwargs`` dict) becomes the SDK's arguments (one-shot
    iterables in it replaced by lists). The common call (every argument a JSON-like value of an
    exact built-in type, none looked at by name) is split in one call into the extension
    (`split_plain_kwargs`); any other takes `_split_slow`, which gives the same result for the
    calls both take."""
    return split_plain_kwargs(kwargs) or _split_slow(kwargs)


def _split_slow(kwargs: dict[str, Any]) -> Request:
    request = dict(kwargs)
    _drop_and_read(kwargs, request)
    stream = bool(request.pop("stream", False))
    model = request.get("model")
    model_id = model if isinstance(model, str) and model else "default"
    return Request(request, kwargs, stream, model_id)


def _drop_and_read(kwargs: dict[str, Any], request: dict[str, Any]) -> None:
    """`split_request`'s slow path: drops sentinels and transport-only arguments from
    `request`, keeps only the response-shaping headers, reads one-shot iterables into lists
    (in both dicts)."""
    for name, value in kwargs.items():
        cls = type(value)
        if cls in _PLAIN and name not in _SPECIAL:
            continue  # the common case: a JSON-like value, hashed as given
        if cls.__name__ in _SENTINELS or name in TRANSPORT_ARGS:
            del request[name]
        elif name == "extra_headers":
            headers = _headers(value)
            if headers:
                request[name] = headers
            else:
                del request[name]
        elif value is None and name in ("extra_query", "extra_body"):
            del request[name]
        elif not isinstance(value, _KEEP_AS_IS) and hasattr(value, "__iter__"):
            value = list(value)  # a generator: read once, hashed and sent alike
            request[name] = kwargs[name] = value


def _digest(*secrets: object) -> str | None:
    present = tuple(s for s in secrets if isinstance(s, str) and s)
    if not present:
        return None
    return hash_request(("chengeta-api-key/1", present))[:16].hex()


def check_isolatable(client: Any) -> None:
    """Refuses, under tenant isolation, a client whose credentials come from a provider (a
    callable API key, an Azure AD token provider): there is no stable secret to key them by,
    and keying without one would let two tenants share entries."""
    providers = [
        name
        for name in ("_api_key_provider", "_azure_ad_token_provider")
        if getattr(client, name, None) is not None
    ]
    if providers:
        raise TypeError(
            f"cached({type(client).__name__}): this client's credentials come from a provider "
            f"({', '.join(n.lstrip('_') for n in providers)}), which cannot be keyed per tenant; "
            "pass isolate_api_keys=False and partition tenants yourself "
            "(cache_control={'namespace': tenant}), or give the client a plain key"
        )


def client_identity(client: Any, *, isolate_api_keys: bool) -> dict[str, Any]:
    """Who makes the calls and how: base URL, the client's own default headers and query
    (``default_headers=``, Azure's ``api-version``), and (tenant isolation) digests of the
    credentials. Read at every call: a key changed on the client after wrapping counts."""
    identity: dict[str, Any] = {"base_url": str(client.base_url)}
    headers = _headers(getattr(client, "_custom_headers", None))
    if headers:
        identity["default_headers"] = headers
    query = getattr(client, "_custom_query", None)
    if query:
        identity["default_query"] = dict(query)
    if isolate_api_keys:
        identity["api_key"] = _digest(
            getattr(client, "api_key", None),
            getattr(client, "auth_token", None),
            getattr(client, "_azure_ad_token", None),
        )
        for name in ("organization", "project"):  # OpenAI's account selectors
            value = getattr(client, name, None)
            if isinstance(value, str) and value:
                identity[name] = value
    return identity


#: The instance attributes `ClientIdentity` reads at every call, in order (the base URL as the
#: SDKs keep it: their ``base_url`` property returns ``_base_url``).
SOURCES = (
    "_base_url",
    "_custom_headers",
    "_custom_query",
    "api_key",
    "auth_token",
    "_azure_ad_token",
    "organization",
    "project",
)

#: What `client_identity` reads besides the base URL.
_IDENTITY_SOURCES = SOURCES[1:]


def _is_computed(cls: type, name: str) -> bool:
    """Whether ``name`` on instances of ``cls`` is computed at every read (a data descriptor:
    a property; not a plain or ``cached_property`` attribute, which lives in the instance
    dict once read)."""
    attr = inspect.getattr_static(cls, name, None)
    return hasattr(type(attr), "__get__") and hasattr(type(attr), "__set__")


class ClientIdentity:
    """`client_identity` of one client, for every call: made again only when one of the
    attributes it is made of changed (compared by value; the client's header and query dicts
    are kept as copies), so that a key, URL or header changed on the client after wrapping
    counts from the next call on, without reading the URL through the SDK's property (an
    import per read in openai), rendering it and hashing the credentials at every call
    (several microseconds: more than the key of a 2 KB request).

    The attributes are read from the instance's ``__dict__`` (no exception for a missing one);
    those the client's class computes (a property, such as ``base_url``) through ``getattr``,
    except the base URL, read from ``_base_url`` when the instance has it (the SDKs'
    ``base_url`` property returns it and its setter writes it). The returned dict is shared
    by the calls: read it, never change it."""

    __slots__ = ("_client", "_computed", "_get", "_isolate_api_keys", "_memo", "attrs")

    def __init__(self, client: Any, *, isolate_api_keys: bool) -> None:
        attrs = getattr(client, "__dict__", {})
        #: The client's instance dict (where `SOURCES` are read).
        self.attrs: dict[str, Any] = attrs
        self._client = client
        self._get = attrs.get
        #: Read through `getattr` at every call: what the class computes at every read (a
        #: data descriptor, such as a property) rather than keeps in the instance dict.
        self._computed = tuple(
            name
            for name in ("base_url", *_IDENTITY_SOURCES)
            if (name != "base_url" or "_base_url" not in attrs) and _is_computed(type(client), name)
        )
        self._isolate_api_keys = isolate_api_keys
        # (the attributes read, the identity made of them): one attribute, replaced whole, so
        # that a thread never pairs one call's attributes with another call's identity.
        self._memo: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    @property
    def keyable(self) -> bool:
        """Whether the identity is made of the instance dict's `SOURCES` alone (nothing read
        through ``getattr``): then a `ClientKeyer` can check it."""
        return not self._computed

    def __call__(self) -> dict[str, Any]:
        return self.current()[1]

    def current(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(sources, identity)``: the attributes the identity is made of as read (mappings as
        copies), and the identity (see the class)."""
        get = self._get
        sources: tuple[Any, ...] = (  # `SOURCES`, in order
            get("_base_url"),
            get("_custom_headers"),
            get("_custom_query"),
            get("api_key"),
            get("auth_token"),
            get("_azure_ad_token"),
            get("organization"),
            get("project"),
        )
        if self._computed:
            client = self._client
            sources += tuple(getattr(client, name, None) for name in self._computed)
        memo = self._memo
        # Tuple equality tries `is` first: the unchanged attributes cost no comparison.
        if memo is not None and sources == memo[0]:
            return memo
        identity = client_identity(self._client, isolate_api_keys=self._isolate_api_keys)
        kept = tuple(dict(value) if isinstance(value, Mapping) else value for value in sources)
        memo = self._memo = (kept, identity)
        return memo
