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
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import anyio

from chengeta_ai.clients.assemble import assemble, twin_request
from chengeta_ai.clients.recorded import (
    AsyncCachedStream,
    CachedStream,
    HttpHead,
    head_of,
    headers_type,
    only_object,
    register_head,
    remember,
)
from chengeta_ai.clients.request_key import (
    Request,
    check_isolatable,
    client_identity,
    split_request,
)
from chengeta_ai.core.cache_manager import unframe_entry
from chengeta_ai.errors import CacheMiss
from chengeta_ai.layers.call_controls import CacheControl, CacheInfo
from chengeta_ai.layers.streaming_cache import StreamingResponseCache
from chengeta_ai.serializers import decode_cap

__all__ = ["ClientCache", "pop_cache_control"]

logger = logging.getLogger("chengeta_ai")


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


def _cannot_hash(exc: TypeError) -> bool:
    return str(exc).startswith("cannot hash")


def _stream_upstream(create: Callable[..., Any], kwargs: dict[str, Any]) -> Iterator[Any]:
    stream = create(**kwargs)
    try:
        yield head_of(stream.response, stream=True)
        yield from stream
    finally:
        stream.close()


def _object_upstream(raw_create: Callable[..., Any], kwargs: dict[str, Any]) -> Iterator[Any]:
    raw = raw_create(**kwargs)
    obj = raw.parse()
    yield head_of(raw, stream=False)
    yield obj


async def _astream_upstream(
    create: Callable[..., Any], kwargs: dict[str, Any]
) -> AsyncIterator[Any]:
    stream = await create(**kwargs)
    try:
        yield head_of(stream.response, stream=True)
        async for chunk in stream:
            yield chunk
    finally:
        with anyio.CancelScope(shield=True):
            await stream.close()


async def _aobject_upstream(
    raw_create: Callable[..., Any], kwargs: dict[str, Any]
) -> AsyncIterator[Any]:
    raw = await raw_create(**kwargs)
    obj = raw.parse()
    if hasattr(obj, "__await__"):  # anthropic's AsyncAPIResponse.parse is a coroutine
        obj = await obj
    yield head_of(raw, stream=False)
    yield obj


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
        self.make_headers = headers_type(client)
        self._warned: set[str] = set()

    def call(self, endpoint: str, resource: Any, kwargs: dict[str, Any], cache_control: Any) -> Any:
        """``resource.create(**kwargs)`` through the cache: the SDK's result kind (a stream
        like the SDK's, or its model object); a coroutine for an async client."""
        req = split_request(kwargs)
        control = CacheControl.coerce(cache_control)
        identity = client_identity(self.client, isolate_api_keys=self.isolate_api_keys)
        params = {"endpoint": endpoint, "stream": req.stream, **identity}
        if self.is_async:
            return self._acall(endpoint, resource, req, params, control)
        upstream: Callable[[Any], Iterator[Any]]
        answer = _TwinAnswer()
        try:
            if req.stream:
                create = resource.create

                def upstream(_: Any) -> Iterator[Any]:
                    return _stream_upstream(create, req.sdk_kwargs)
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
                    return _object_upstream(raw_create, req.sdk_kwargs)

            inner = self.cache.get_or_stream(
                req.request, upstream, req.model_id, params, cache_control=control
            )
        except TypeError as exc:
            if not _cannot_hash(exc):
                raise
            self._uncacheable(endpoint, exc, control)
            return remember(resource.create(**req.sdk_kwargs), _UNCACHEABLE)
        if req.stream:
            return CachedStream(inner, self.make_headers)
        obj = only_object(inner)
        return remember(obj, answer.info(inner.cache_info))

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
        if self.cache.manager.get_raw(self._key(req, params, control)) is None:
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
        if await self.cache.manager.aget_raw(self._key(req, params, control)) is None:
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
    ) -> Any:
        upstream: Callable[[Any], AsyncIterator[Any]]
        answer = _TwinAnswer()
        try:
            if req.stream:
                create = resource.create

                def upstream(_: Any) -> AsyncIterator[Any]:
                    return _astream_upstream(create, req.sdk_kwargs)
            elif control is not None and control.only_if_cached:
                control, upstream = await self._aonly_if_cached(
                    endpoint, req, params, control, answer
                )
            else:
                raw_create = resource.with_raw_response.create
                twin_key = self._twin_key(endpoint, req, params, control)

                async def upstream(_: Any) -> AsyncIterator[Any]:
                    if twin_key is not None:
                        found = self._from_twin(
                            endpoint, await self.cache.manager.aget_raw(twin_key)
                        )
                        if found is not None:
                            answer.set(found[0])
                            for item in found[1]:
                                yield item
                            return
                    async for item in _aobject_upstream(raw_create, req.sdk_kwargs):
                        yield item

            inner = self.cache.aget_or_stream(
                req.request, upstream, req.model_id, params, cache_control=control
            )
        except TypeError as exc:
            if not _cannot_hash(exc):
                raise
            self._uncacheable(endpoint, exc, control)
            return remember(await resource.create(**req.sdk_kwargs), _UNCACHEABLE)
        if req.stream:
            return await AsyncCachedStream.open(inner, self.make_headers)
        items: list[Any] = []
        try:
            async for item in inner:
                items.append(item)
        finally:
            closer = getattr(inner, "aclose", None)
            if closer is not None:
                with anyio.CancelScope(shield=True):
                    await closer()
        return remember(only_object(items), answer.info(inner.cache_info))

    def _key(self, req: Request, params: dict[str, Any], control: CacheControl | None) -> str:
        """The key `StreamingResponseCache` gives the call (see its ``_prepare``)."""
        partition = control.namespace if control is not None else None
        return self.cache.manager.key_builder.build(
            req.request, req.model_id, params, partition=partition
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
        return self.cache.manager.key_builder.build(
            twin, req.model_id, {**params, "stream": True}, partition=partition
        )

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
            if not isinstance(head, HttpHead) or not head.stream:
                return None
            whole = assemble(endpoint, items[1:])
        except Exception as exc:
            logger.debug("chengeta_ai: streamed twin not used for a whole call: %r", exc)
            return None
        if whole is None:
            return None
        self.cache.count("cross_mode_hits")
        return entry.age(), [head.model_copy(update={"stream": False}), whole]

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
