"""One cached SDK call, sync or async: the request split and keyed, the upstream wrapped, the
cache's stream turned back into what the SDK returns.

A streaming call's upstream yields the response's `HttpHead`, then the SDK's chunks; a
non-streaming call's upstream yields the head, then the one model object (read through the
SDK's ``with_raw_response`` so that its status and headers are known). Both go through
`StreamingResponseCache.get_or_stream` / ``aget_or_stream``, so identical calls in flight share
one upstream request whether they stream or not, and every rule of the cache (fail open, store
only complete streams, ...) holds. The head is what `chengeta_ai.layers.completeness` uses to
tell a complete entry: for a non-streamed call, exactly one object after it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, NamedTuple

import anyio

from chengeta_ai._core import ClientKeyer, EncodedParams
from chengeta_ai.clients.assemble import assemble, twin_request
from chengeta_ai.clients.recorded import (
    AsyncCachedStream,
    CachedStream,
    HttpHead,
    achecked_items,
    aclose_quietly,
    asks_for_usage,
    checked_items,
    head_fits,
    head_of,
    http_library,
    item_fits,
    own_copy,
    recorded_response,
    register_head,
    remember,
    whole_object,
)
from chengeta_ai.clients.request_key import (
    SOURCES,
    ClientIdentity,
    Request,
    check_isolatable,
    settle_omitted_headers,
    split_request,
)
from chengeta_ai.core.cache_manager import unframe_entry
from chengeta_ai.core.key_builder import CacheKeyBuilder, build_key
from chengeta_ai.errors import CacheMiss, DecodeError
from chengeta_ai.layers.call_controls import CacheControl, CacheInfo
from chengeta_ai.layers.streaming_cache import StreamingResponseCache
from chengeta_ai.serializers import decode_cap

__all__ = ["ClientCache", "pop_cache_control"]

logger = logging.getLogger("chengeta_ai")
_perf = time.perf_counter


def pop_cache_control(kwargs: dict[str, Any], *, sdk_has_param: bool) -> Any:
    """Takes chengeta_ai's ``cache_control`` out of a call's arguments (never sent upstream).

    Anthropic's Messages API has a ``cache_control`` parameter of its own (prompt caching,
    ``{"type": "ephemeral", ...}``): there (``sdk_has_param``), only a ``chengeta_ai``
    ``CacheControl`` object or a mapping without a ``"type"`` key is ours; anything else is
    left for the SDK.
    """
    if "cache_control" not in kwargs:
        return None
    value = kwargs["cache_control"]
    if sdk_has_param:
        ours = isinstance(value, CacheControl) or (
            isinstance(value, Mapping) and "type" not in value
        )
        if not ours:
            return None
    del kwargs["cache_control"]
    return value


#: What `cache_info_of` says of a call sent upstream uncached (its request cannot be hashed).
_UNCACHEABLE = CacheInfo("bypass", "", None, "bypass")


def _never_called(_: Any) -> Iterator[Any]:
    """The upstream of an ``only_if_cached`` call (the cache never calls it)."""
    raise AssertionError("only_if_cached: the upstream is never called")


def _anever_called(_: Any) -> AsyncIterator[Any]:
    raise AssertionError("only_if_cached: the upstream is never called")


#: What `next` returns for a hit with no item after its head (an entry never stored whole).
_NO_ITEM: Any = object()


def _accepts(endpoint: str, stream: bool, first: Any) -> bool:
    """A stored entry may serve the call: its head fits (checked before the hit counts)."""
    return head_fits(first, endpoint, stream=stream)


def _paced(control: CacheControl | None) -> bool:
    return control is not None and control.replay == "recorded"


def _cannot_hash(exc: TypeError) -> bool:
    return str(exc).startswith("cannot hash")


def _stream_upstream(
    create: Callable[..., Any], kwargs: dict[str, Any], endpoint: str
) -> Iterator[Any]:
    stream = create(**kwargs)
    try:
        yield head_of(
            stream.response,
            stream=True,
            endpoint=endpoint,
            expects_usage=asks_for_usage(kwargs),
        )
        yield from stream
    finally:
        stream.close()


def _object_upstream(
    raw_create: Callable[..., Any], kwargs: dict[str, Any], endpoint: str
) -> Iterator[Any]:
    raw = raw_create(**kwargs)
    obj = raw.parse()
    yield head_of(raw, stream=False, endpoint=endpoint)
    yield obj


async def _astream_upstream(
    create: Callable[..., Any], kwargs: dict[str, Any], endpoint: str, _messages: Any = None
) -> AsyncIterator[Any]:
    stream = await create(**kwargs)
    try:
        yield head_of(
            stream.response,
            stream=True,
            endpoint=endpoint,
            expects_usage=asks_for_usage(kwargs),
        )
        async for chunk in stream:
            yield chunk
    finally:
        with anyio.CancelScope(shield=True):
            await stream.close()


async def _aobject_upstream(
    raw_create: Callable[..., Any], kwargs: dict[str, Any], endpoint: str
) -> AsyncIterator[Any]:
    raw = await raw_create(**kwargs)
    obj = raw.parse()
    if hasattr(obj, "__await__"):  # anthropic's AsyncAPIResponse.parse is a coroutine
        obj = await obj
    yield head_of(raw, stream=False, endpoint=endpoint)
    yield obj


def _tries(control: CacheControl | None) -> tuple[CacheControl | None, ...]:
    """The controls a call is tried with, one after another while it meets an entry it cannot
    serve (each such entry is dropped): as asked; as asked again (a miss, or a whole call
    answered from its streamed twin); then ``no_cache`` (a refresh, whose entry replaces one
    the backend would not delete). ``only_if_cached`` is tried twice (it never goes upstream).
    """
    if control is not None and control.only_if_cached:
        return (control, control)
    refresh = dataclasses.replace(control or CacheControl(), no_cache=True)
    return (control, control, refresh)


def _add_response_ids(whole: Any, headers: Any) -> None:
    """What the SDK sets on a whole reply it parsed (``_request_id``; Anthropic's
    ``_workspace_id`` too), from the response's headers, with the SDK's own helper."""
    if type(whole).__module__.startswith("anthropic."):
        from anthropic._models import (  # type: ignore[import-not-found, unused-ignore]
            add_response_ids,
        )

        add_response_ids(
            whole,
            request_id=headers.get("request-id"),
            workspace_id=headers.get("anthropic-workspace-id"),
        )
    elif type(whole).__module__.startswith("openai."):
        from openai._models import add_request_id

        add_request_id(whole, headers.get("x-request-id"))


def _nothing() -> None:
    """The close of a response nobody reads a body from."""


class _TwinAnswer:
    """Set by a whole call's upstream when its streamed twin answered it (the call then reports
    status ``hit``, with the twin's age)."""

    __slots__ = ("age", "used")

    def __init__(self) -> None:
        self.used = False
        self.age: float | None = None

    def set(self, age: float | None) -> None:
        self.used = True
        self.age = age

    def info(self, info: CacheInfo | None) -> CacheInfo | None:
        """The caller's `CacheInfo`: the cache's, as a ``hit`` if the twin answered this call."""
        if info is None or not self.used or info.status != "miss":  # (a join's leader answered)
            return info
        return CacheInfo("hit", info.key, self.age, info.outcome)


class _EndpointParams(NamedTuple):
    """The params of one endpoint's calls for one identity of the client (`ClientCache.split`):
    the dicts (a call that does not stream, one that does) and their encodings (None: params
    the key cannot hash, which the cache then reports for each call)."""

    identity: dict[str, Any]
    params: tuple[dict[str, Any], dict[str, Any]]
    encoded: tuple[EncodedParams, EncodedParams] | None

    @classmethod
    def of(cls, endpoint: str, identity: dict[str, Any]) -> _EndpointParams:
        params = (
            {"endpoint": endpoint, "stream": False, **identity},
            {"endpoint": endpoint, "stream": True, **identity},
        )
        try:
            encoded = (EncodedParams(params[0]), EncodedParams(params[1]))
        except (TypeError, ValueError):
            return cls(identity, params, None)
        return cls(identity, params, encoded)


class ClientCache:
    """What the cached resources of one SDK client share: the cache, the client's identity,
    and the two drivers (`call` picks the sync or async one by the client's kind)."""

    def __init__(
        self,
        client: Any,
        cache: StreamingResponseCache,
        *,
        isolate_api_keys: bool,
        is_async: bool,
    ) -> None:
        if not isinstance(cache, StreamingResponseCache):
            raise TypeError(f"cache must be a StreamingResponseCache, got {type(cache).__name__}")
        if cache.chunk_joiner is not None:
            raise ValueError(
                "a cached client needs a StreamingResponseCache without chunk_joiner (it "
                "replays the SDK's own chunks)"
            )
        register_head()
        self.client = client
        self.cache = cache
        self.isolate_api_keys = isolate_api_keys
        self.is_async = is_async
        if isolate_api_keys:
            check_isolatable(client)
        #: The HTTP library of the SDK client (``httpx`` or ``httpx2``): its ``Response``.
        self.http = http_library(client)
        self._warned: set[str] = set()
        self._identity = ClientIdentity(client, isolate_api_keys=isolate_api_keys)
        #: Per endpoint, the params of its calls for the client's current identity.
        self._params: dict[str, _EndpointParams] = {}
        #: The common calls split and keyed whole in the extension (None: the identity is not
        #: made of the client's instance dict alone).
        self._keyer = (
            ClientKeyer(self._identity.attrs, list(SOURCES))
            if self._identity.keyable and isinstance(self._identity.attrs, dict)
            else None
        )

    def split(
        self, endpoint: str, kwargs: dict[str, Any], control: CacheControl | None
    ) -> tuple[Request, dict[str, Any], str | None]:
        """A call's keyword arguments split for the cache (`split_request`), its params
        (endpoint, stream, the client's identity) and, for the common call, its key: the
        key the cache would give ``(req.request, req.model_id, params)`` (None: the cache
        makes it).

        The common call (`split_plain_kwargs` takes it, the cache's key builder is a
        `CacheKeyBuilder`, no ``namespace``) is split and keyed in one call into the extension
        (`ClientKeyer.split`: the client's identity checked, the endpoint's params hashed as
        their encoding, made once per identity, `EncodedParams`), or failing that (another
        identity or endpoint than the keyer knows, which it is then told) in two
        (`ClientIdentity`, `KeyDeriver.client_key`). The params dicts returned are shared by
        the calls: read them, never change them."""
        keyer = self._keyer
        builder = self.cache.manager.key_builder
        if keyer is not None and (control is None or control.namespace is None):
            try:
                keyed = keyer.split(builder, endpoint, kwargs)
            except (TypeError, ValueError):
                keyed = None  # a value the key refuses: raised by the cache, as for any call
            if keyed is not None:
                return keyed
        return self._split_slow(endpoint, kwargs, control, builder)

    def _split_slow(
        self, endpoint: str, kwargs: dict[str, Any], control: CacheControl | None, builder: Any
    ) -> tuple[Request, dict[str, Any], str | None]:
        """`split` without the keyer (which it tells what it did not know)."""
        sources, identity = self._identity.current()
        memo = self._params.get(endpoint)
        if memo is None or memo.identity is not identity:
            memo = self._params[endpoint] = _EndpointParams.of(endpoint, identity)
        if memo.encoded is not None:
            deriver = builder._deriver if type(builder) is CacheKeyBuilder else None
            if self._keyer is not None:
                known = None if deriver is None else (builder, deriver)
                self._keyer.remember(known, sources, endpoint, memo.params, memo.encoded)
            if deriver is not None and (control is None or control.namespace is None):
                try:
                    keyed = deriver.client_key(kwargs, memo.encoded)
                except (TypeError, ValueError):
                    keyed = None
                if keyed is not None:
                    req, key = keyed
                    return req, memo.params[req.stream], key
        req = split_request(kwargs)
        settle_omitted_headers(req.request, self.client)
        return req, memo.params[req.stream], None

    def call(self, endpoint: str, resource: Any, kwargs: dict[str, Any], cache_control: Any) -> Any:
        """``resource.create(**kwargs)`` through the cache: the SDK's result kind (a stream
        like the SDK's, or its model object); a coroutine for an async client.

        The entry's head is checked before anything is handed over (`head_fits`, once per
        call): an entry of the other kind (streamed under a whole call's key, or the reverse)
        or endpoint is corrupt: logged, counted (``corrupt_entries``), dropped, and the call
        tried again (see `_tries`)."""
        control = CacheControl.coerce(cache_control)
        req, params, key = self.split(endpoint, kwargs, control)
        if self.is_async:
            return self._acall(endpoint, resource, req, params, control, key)
        t0 = _perf()
        for tried in _tries(control):
            answer = _TwinAnswer()
            try:
                inner = self._open(endpoint, resource, req, params, tried, answer, key)
            except TypeError as exc:
                if not _cannot_hash(exc):
                    raise
                self._uncacheable(endpoint, exc, control)
                return remember(resource.create(**req.sdk_kwargs), _UNCACHEABLE)
            # the head: upstream errors, CacheMiss are raised here, as the SDK raises them
            first = next(inner, None)
            if head_fits(first, endpoint, stream=req.stream):
                if req.stream:
                    info = inner.cache_info
                    if info is None or info.status != "hit":
                        return CachedStream(inner, first, self.http, _perf() - t0)
                    # a hit's items were written by someone: the first is checked before the
                    # stream is handed out, the others as they go (`checked_items`)
                    key = info.key

                    def wrong(exc: DecodeError, key: str = key) -> None:
                        self.cache.manager.drop_corrupt(key, exc)

                    if _paced(tried):  # its first item waits its recorded time: not here
                        items = checked_items(None, inner, endpoint, wrong, has_first=False)
                        return CachedStream(inner, first, self.http, _perf() - t0, items)
                    peeked = next(inner, _NO_ITEM)
                    if peeked is not _NO_ITEM and item_fits(endpoint, True, peeked):
                        items = checked_items(peeked, inner, endpoint, wrong)
                        return CachedStream(inner, first, self.http, _perf() - t0, items)
                else:
                    obj = whole_object(first, list(inner), endpoint)
                    if obj is not None:
                        return self._whole(obj, inner.cache_info, answer)
            inner.close()
            drop = self._wrong_entry(endpoint, req.stream, inner.cache_info)
            if drop is not None:
                self.cache.manager.drop_corrupt(*drop)
        return self._last_resort(endpoint, req, control, resource.create)

    def _open(
        self,
        endpoint: str,
        resource: Any,
        req: Request,
        params: dict[str, Any],
        control: CacheControl | None,
        answer: _TwinAnswer,
        key: str | None,
    ) -> Any:
        """The cache's stream of one try of a sync call (nothing read yet)."""
        upstream: Callable[[Any], Iterator[Any]]
        if req.stream:
            create = resource.create

            def upstream(_: Any) -> Iterator[Any]:
                return _stream_upstream(create, req.sdk_kwargs, endpoint)
        elif control is not None and control.only_if_cached:
            control, upstream = self._only_if_cached(endpoint, req, params, control, answer)
        else:
            raw_create = resource.with_raw_response.create
            twin_key = self._twin_key(endpoint, req, params, control)

            def upstream(_: Any) -> Iterator[Any]:
                if twin_key is not None:
                    found = self._from_twin(endpoint, self.cache.manager.get_raw(twin_key))
                    if found is not None:
                        answer.set(found[0])
                        return iter(found[1])
                return _object_upstream(raw_create, req.sdk_kwargs, endpoint)

        return self._cached_stream(endpoint, req, params, control, upstream, key, is_async=False)

    def _cached_stream(
        self,
        endpoint: str,
        req: Request,
        params: dict[str, Any],
        control: CacheControl | None,
        upstream: Callable[[Any], Any],
        key: str | None,
        *,
        is_async: bool,
    ) -> Any:
        """The cache's stream of one try (sync or async): the entry's head is checked by the
        cache before it counts a hit (`StreamingResponseCache.client_stream`). ``key``: the
        call's key if `split` made it."""
        return self.cache.client_stream(
            # (only read to make the key: a streamed call split fast never copies its request)
            req.request if key is None else None,
            upstream,
            req.model_id,
            params,
            control,
            accept=functools.partial(_accepts, endpoint, req.stream),
            is_async=is_async,
            key=key,
        )

    def _whole(self, obj: Any, info: CacheInfo | None, answer: _TwinAnswer) -> Any:
        """A whole call's object for its caller: a live call's object is shared by every caller
        of that call (the miss and its joiners): each gets its own deep copy (a hit decoded
        its own)."""
        if info is None or info.status != "hit":
            obj = own_copy(obj)
        return remember(obj, answer.info(info))

    def _wrong_entry(
        self, endpoint: str, stream: bool, info: CacheInfo | None
    ) -> tuple[str, DecodeError] | None:
        """Counts an entry that cannot serve the call (see `head_fits`). Returns what to drop
        it with (a hit's key and error; the manager logs it), or None (logged here)."""
        self.cache.count("corrupt_entries")
        error = DecodeError(
            f"not a {'streamed' if stream else 'whole'} {endpoint} response (an entry of "
            "another kind or endpoint): not served, the call goes on without it"
        )
        if info is not None and info.status == "hit":
            return info.key, error
        logger.warning("chengeta_ai: %s: %s", info.key if info is not None else "?", error)
        return None

    def _last_resort(
        self, endpoint: str, req: Request, control: CacheControl | None, create: Any
    ) -> Any:
        """Every try met an entry it could not serve: ``only_if_cached`` raises `CacheMiss`
        (nothing can answer); any other call is sent upstream uncached (status ``bypass``).
        A coroutine for an async ``create``."""
        if control is not None and control.only_if_cached:
            self.cache.count("only_if_cached_misses")
            raise CacheMiss(f"{endpoint}: no usable entry (only_if_cached)")
        self.cache.count("bypasses")
        if self.is_async:
            return self._abypass(create, req)
        return remember(create(**req.sdk_kwargs), _UNCACHEABLE)

    async def _abypass(self, create: Any, req: Request) -> Any:
        return remember(await create(**req.sdk_kwargs), _UNCACHEABLE)

    def _only_if_cached(
        self,
        endpoint: str,
        req: Request,
        params: dict[str, Any],
        control: CacheControl,
        answer: _TwinAnswer,
    ) -> tuple[CacheControl, Callable[[Any], Iterator[Any]]]:
        """A whole ``only_if_cached`` call: when its own entry is missing but its streamed twin
        can answer it, the call goes on without ``only_if_cached``, with the twin's assembled
        object as its upstream (no upstream call either way)."""
        found = None
        own = self.cache.manager.get_raw(self._key(req, params, control))
        if own is None or not self._serves(own, endpoint):
            twin_key = self._twin_key(endpoint, req, params, control)
            if twin_key is not None:
                found = self._from_twin(endpoint, self.cache.manager.get_raw(twin_key))
        if found is None:
            return control, _never_called
        age, items = found

        def upstream(_: Any) -> Iterator[Any]:
            answer.set(age)
            return iter(items)

        return dataclasses.replace(control, only_if_cached=False), upstream

    async def _aonly_if_cached(
        self,
        endpoint: str,
        req: Request,
        params: dict[str, Any],
        control: CacheControl,
        answer: _TwinAnswer,
    ) -> tuple[CacheControl, Callable[[Any], AsyncIterator[Any]]]:
        """Async twin of `_only_if_cached`."""
        found = None
        own = await self.cache.manager.aget_raw(self._key(req, params, control))
        if own is None or not self._serves(own, endpoint):
            twin_key = self._twin_key(endpoint, req, params, control)
            if twin_key is not None:
                found = self._from_twin(endpoint, await self.cache.manager.aget_raw(twin_key))
        if found is None:
            return control, _anever_called
        age, items = found

        async def upstream(_: Any) -> AsyncIterator[Any]:
            answer.set(age)
            for item in items:
                yield item

        return dataclasses.replace(control, only_if_cached=False), upstream

    async def _acall(
        self,
        endpoint: str,
        resource: Any,
        req: Request,
        params: dict[str, Any],
        control: CacheControl | None,
        key: str | None,
    ) -> Any:
        """Async twin of `call`."""
        t0 = _perf()
        for tried in _tries(control):
            answer = _TwinAnswer()
            try:
                inner = await self._aopen(endpoint, resource, req, params, tried, answer, key)
            except TypeError as exc:
                if not _cannot_hash(exc):
                    raise
                self._uncacheable(endpoint, exc, control)
                return remember(await resource.create(**req.sdk_kwargs), _UNCACHEABLE)
            try:
                first = await anext(inner, None)
                if head_fits(first, endpoint, stream=req.stream):
                    if req.stream:
                        info = inner.cache_info
                        if info is None or info.status != "hit":
                            return AsyncCachedStream(inner, first, self.http, _perf() - t0)
                        key = info.key

                        def awrong(exc: DecodeError, key: str = key) -> Any:
                            return self.cache.manager.adrop_corrupt(key, exc)

                        elapsed = _perf() - t0
                        if _paced(tried):  # see `call`
                            items = achecked_items(None, inner, endpoint, awrong, has_first=False)
                            return AsyncCachedStream(inner, first, self.http, elapsed, items)
                        peeked = await anext(inner, _NO_ITEM)  # see `call`
                        if peeked is not _NO_ITEM and item_fits(endpoint, True, peeked):
                            items = achecked_items(peeked, inner, endpoint, awrong)
                            return AsyncCachedStream(inner, first, self.http, elapsed, items)
                    else:
                        rest = [item async for item in inner]
                        obj = whole_object(first, rest, endpoint)
                        if obj is not None:
                            return self._whole(obj, inner.cache_info, answer)
            except BaseException:
                await aclose_quietly(inner)
                raise
            await aclose_quietly(inner)
            drop = self._wrong_entry(endpoint, req.stream, inner.cache_info)
            if drop is not None:
                await self.cache.manager.adrop_corrupt(*drop)
        return await self._last_resort(endpoint, req, control, resource.create)

    async def _aopen(
        self,
        endpoint: str,
        resource: Any,
        req: Request,
        params: dict[str, Any],
        control: CacheControl | None,
        answer: _TwinAnswer,
        key: str | None,
    ) -> Any:
        """Async twin of `_open`."""
        upstream: Callable[[Any], AsyncIterator[Any]]
        if req.stream:
            # an async generator function (through a partial): called on the loop, not in a
            # worker thread like a plain function (see `fanout._open_upstream`)
            upstream = functools.partial(
                _astream_upstream, resource.create, req.sdk_kwargs, endpoint
            )
        elif control is not None and control.only_if_cached:
            control, upstream = await self._aonly_if_cached(endpoint, req, params, control, answer)
        else:
            raw_create = resource.with_raw_response.create
            twin_key = self._twin_key(endpoint, req, params, control)

            async def upstream(_: Any) -> AsyncIterator[Any]:
                if twin_key is not None:
                    found = self._from_twin(endpoint, await self.cache.manager.aget_raw(twin_key))
                    if found is not None:
                        answer.set(found[0])
                        for item in found[1]:
                            yield item
                        return
                async for item in _aobject_upstream(raw_create, req.sdk_kwargs, endpoint):
                    yield item

        return self._cached_stream(endpoint, req, params, control, upstream, key, is_async=True)

    def _key(self, req: Request, params: dict[str, Any], control: CacheControl | None) -> str:
        """The key `StreamingResponseCache` gives the call (see its ``_prepare``)."""
        partition = control.namespace if control is not None else None
        return build_key(
            self.cache.manager.key_builder, req.request, req.model_id, params, partition
        )

    # -- one entry, both modes (see `chengeta_ai.clients.assemble`) ----------------------------

    def _twin_key(
        self, endpoint: str, req: Request, params: dict[str, Any], control: CacheControl | None
    ) -> str | None:
        """The key of the streamed call whose entry can answer the whole call ``req`` (in the
        call's ``namespace``: a tenant's whole call is never answered from another's stream),
        or None: no twin, or ``no_cache`` (which reads no stored entry, the twin's neither)."""
        twin = twin_request(endpoint, req.request)
        if twin is None or (control is not None and control.no_cache):
            return None
        partition = control.namespace if control is not None else None
        return build_key(
            self.cache.manager.key_builder,
            twin,
            req.model_id,
            {**params, "stream": True},
            partition,
        )

    def _serves(self, raw: bytes, endpoint: str) -> bool:
        """Whether a whole call's stored entry can answer it (its head fits: the cache refuses
        one that does not, so an ``only_if_cached`` call looks for its streamed twin then)."""
        try:
            entry = unframe_entry(raw)
            batches = self.cache.serializer.iter_batches(
                bytes(entry.payload), 1, max_decoded_bytes=decode_cap(self.cache.max_entry_bytes)
            )
            first = next(batches, [])
        except Exception:
            return False
        return bool(first) and head_fits(first[0], endpoint, stream=False)

    def _from_twin(self, endpoint: str, raw: bytes | None) -> tuple[float | None, list[Any]] | None:
        """``(the twin's age, [head, object])`` assembled from a streamed twin's stored entry,
        or None. Never raises: a twin that cannot be read or assembled is a miss (the call goes
        upstream, or ``only_if_cached`` raises `CacheMiss`)."""
        if raw is None:
            return None
        try:
            entry = unframe_entry(raw)
            items = self.cache.serializer.loads(
                bytes(entry.payload), max_decoded_bytes=decode_cap(self.cache.max_entry_bytes)
            )
            head = items[0] if isinstance(items, list) and items else None
            if not head_fits(head, endpoint, stream=True):
                return None
            body = assemble(endpoint, items[1:])
            if body is None:
                return None
            head = head.model_copy(update={"stream": False, "endpoint": endpoint})
            whole = self._parse_whole(head, *body)
        except Exception as exc:
            logger.debug("chengeta_ai: streamed twin not used for a whole call: %r", exc)
            return None
        self.cache.count("cross_mode_hits")
        return entry.age(), [head, whole]

    def _parse_whole(self, head: HttpHead, cast_to: type, data: dict[str, Any]) -> Any:
        """The whole reply ``data`` (its JSON body) as the SDK client parses one (its
        ``_process_response_data``: the SDK's own construction, or validation with
        ``_strict_response_validation``)."""
        process = getattr(self.client, "_process_response_data", None)
        if process is None:  # (an SDK without it: validated)
            return cast_to.model_validate(data)  # type: ignore[attr-defined]
        response = recorded_response(
            self.http, head, elapsed=0.0, close=_nothing, is_async=self.is_async
        )
        whole = process(data=data, cast_to=cast_to, response=response)
        _add_response_ids(whole, response.headers)
        return whole

    def _uncacheable(self, endpoint: str, exc: TypeError, control: CacheControl | None) -> None:
        """A request holding a value the key cannot hash: sent upstream uncached (status
        ``bypass``); with ``only_if_cached``, `CacheMiss` (nothing can answer it)."""
        if control is not None and control.only_if_cached:
            self.cache.count("only_if_cached_misses")
            raise CacheMiss(f"{endpoint}: request cannot be cached ({exc}); only_if_cached")
        self.cache.count("bypasses")
        if endpoint not in self._warned:
            self._warned.add(endpoint)
            logger.warning(
                "chengeta_ai: %s call not cached (its arguments cannot be hashed: %s); sent "
                "upstream as is (logged once per endpoint)",
                endpoint,
                exc,
            )
