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
)
from chengeta_ai.clients.request_key import Request, client_identity, split_request
from chengeta_ai.core.cache_manager import unframe
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
        ours = type(value).__module__.startswith("chengeta_ai") or (
            isinstance(value, Mapping) and "type" not in value
        )
        if not ours:
            return None
    del kwargs["cache_control"]
    return value


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
        self.identity = client_identity(client, isolate_api_keys=isolate_api_keys)
        self.make_headers = headers_type(client)
        self._warned: set[str] = set()

    def call(self, endpoint: str, resource: Any, kwargs: dict[str, Any], cache_control: Any) -> Any:
        """``resource.create(**kwargs)`` through the cache: the SDK's result kind (a stream
        like the SDK's, or its model object); a coroutine for an async client."""
        req = split_request(kwargs)
        params = {"endpoint": endpoint, "stream": req.stream, **self.identity}
        extra: dict[str, Any] = {} if cache_control is None else {"cache_control": cache_control}
        if self.is_async:
            return self._acall(endpoint, resource, req, params, extra)
        upstream: Callable[[Any], Iterator[Any]]
        if req.stream:
            create = resource.create

            def upstream(_: Any) -> Iterator[Any]:
                return _stream_upstream(create, req.sdk_kwargs)
        else:
            raw_create = resource.with_raw_response.create

            def upstream(_: Any) -> Iterator[Any]:
                twin = self._twin_key(endpoint, req, params)
                if twin is not None:
                    found = self._from_twin(endpoint, self.cache.manager.get_raw(twin))
                    if found is not None:
                        return iter(found)
                return _object_upstream(raw_create, req.sdk_kwargs)

        try:
            inner = self.cache.get_or_stream(req.request, upstream, req.model_id, params, **extra)
        except TypeError as exc:
            if not _cannot_hash(exc):
                raise
            self._uncacheable(endpoint, exc)
            return resource.create(**req.sdk_kwargs)
        if req.stream:
            return CachedStream(inner, self.make_headers)
        return only_object(inner)

    async def _acall(
        self,
        endpoint: str,
        resource: Any,
        req: Request,
        params: dict[str, Any],
        extra: dict[str, Any],
    ) -> Any:
        upstream: Callable[[Any], AsyncIterator[Any]]
        if req.stream:
            create = resource.create

            def upstream(_: Any) -> AsyncIterator[Any]:
                return _astream_upstream(create, req.sdk_kwargs)
        else:
            raw_create = resource.with_raw_response.create

            async def upstream(_: Any) -> AsyncIterator[Any]:
                twin = self._twin_key(endpoint, req, params)
                if twin is not None:
                    found = self._from_twin(endpoint, await self.cache.manager.aget_raw(twin))
                    if found is not None:
                        for item in found:
                            yield item
                        return
                async for item in _aobject_upstream(raw_create, req.sdk_kwargs):
                    yield item

        try:
            inner = self.cache.aget_or_stream(req.request, upstream, req.model_id, params, **extra)
        except TypeError as exc:
            if not _cannot_hash(exc):
                raise
            self._uncacheable(endpoint, exc)
            return await resource.create(**req.sdk_kwargs)
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
        return only_object(items)

    # -- one entry, both modes (see `chengeta_ai.clients.assemble`) ----------------------------

    def _twin_key(self, endpoint: str, req: Request, params: dict[str, Any]) -> str | None:
        """The key of the streamed call whose entry can answer the whole call ``req``."""
        twin = twin_request(endpoint, req.request)
        if twin is None:
            return None
        return self.cache.manager.key_builder.build(twin, req.model_id, {**params, "stream": True})

    def _from_twin(self, endpoint: str, raw: bytes | None) -> list[Any] | None:
        """``[head, object]`` assembled from a streamed twin's stored entry, or None. Never
        raises: a twin that cannot be read or assembled is a miss (the call goes upstream)."""
        if raw is None:
            return None
        try:
            items = self.cache.serializer.loads(
                bytes(unframe(raw)), max_decoded_bytes=decode_cap(self.cache.max_entry_bytes)
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
        return [head.model_copy(update={"stream": False}), whole]

    def _uncacheable(self, endpoint: str, exc: TypeError) -> None:
        """A request holding a value the key cannot hash: sent upstream uncached."""
        self.cache.count("bypasses")
        if endpoint not in self._warned:
            self._warned.add(endpoint)
            logger.warning(
                "chengeta_ai: %s call not cached (its arguments cannot be hashed: %s); sent "
                "upstream as is (logged once per endpoint)",
                endpoint,
                exc,
            )
