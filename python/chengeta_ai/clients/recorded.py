"""What a cached client hands back: SDK-like streams whose ``.response`` was recorded.

The first item of every entry a cached client writes is an `HttpHead`: the status line and
headers of the upstream HTTP response (request ids included). It is stored with the entry and
replayed with it, so a miss, a join and a hit all expose the same ``.response``. The wrappers
strip it off:

- `CachedStream` / `AsyncCachedStream` behave like the SDK's ``Stream`` / ``AsyncStream``:
  iteration (the chunks, exactly as the cache yields them: no per-chunk wrapper), context
  manager, ``close()`` (``aclose()`` too, async), ``.response`` and ``cache_info`` (read from the
  cache's own stream object, once it has one);
- `RecordedResponse` is that ``.response``: ``status_code``, ``headers`` (the HTTP library's
  case-insensitive ``Headers``), ``http_version``, ``reason_phrase``, ``url``, ``is_success``,
  ``close()`` / ``aclose()`` (which close the stream, as closing the SDK's response does).

`cache_info_of(result)` is the `CacheInfo` of anything a cached client returned: a stream (its
``cache_info``), an SDK helper's stream (that of the cached stream under it), or a whole call's
model object, which cannot carry it without being changed (its fields, ``==`` and JSON dump are
the API's): the info is kept beside it, in a table keyed by the object's identity that forgets
it when the object is collected. Callers that joined one whole call share its object, so each
caller after the first gets its own (shallow) ``model_copy``: each object has one info.

Not recorded: hop-by-hop headers (``connection``, ``keep-alive``, ``transfer-encoding``) and
``set-cookie`` (a cookie is one client's, never a shared cache's).
"""

from __future__ import annotations

import importlib
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, ClassVar, Generic, TypeVar

import anyio
from pydantic import BaseModel

from chengeta_ai.layers.call_controls import CacheInfo

__all__ = [
    "AsyncCachedStream",
    "CachedStream",
    "HttpHead",
    "RecordedResponse",
    "cache_info_of",
    "head_of",
    "register_head",
    "remember",
]

T = TypeVar("T")

#: The name `HttpHead` is stored under (stable across versions of this package).
HEAD_MODEL_NAME = "chengeta_ai.HttpHead"
_NOT_RECORDED = frozenset({"connection", "keep-alive", "transfer-encoding", "set-cookie"})


class HttpHead(BaseModel):
    """The HTTP status line and headers of a cached response: the first item of its entry."""

    #: Marks the head for `chengeta_ai.layers.completeness` (which never imports this module).
    chengeta_http_head: ClassVar[bool] = True

    #: Whether the entry is a stream (chunks follow) or one whole object (``stream=False``).
    stream: bool = True
    status_code: int = 200
    reason_phrase: str = ""
    http_version: str = "HTTP/1.1"
    method: str = "POST"
    url: str = ""
    headers: list[tuple[str, str]] = []


_registered = False


def register_head() -> None:
    """Registers `HttpHead` with the compact codec (once)."""
    global _registered
    if not _registered:
        from chengeta_ai.models import register_model

        register_model(HttpHead, HEAD_MODEL_NAME)
        _registered = True


def head_of(response: Any, *, stream: bool) -> HttpHead:
    """The head of an HTTP response (``httpx.Response`` or the SDK's raw-response wrapper)."""
    http = getattr(response, "http_response", response)
    request = getattr(http, "request", None)
    return HttpHead.model_construct(
        stream=stream,
        status_code=int(http.status_code),
        reason_phrase=str(getattr(http, "reason_phrase", "") or ""),
        http_version=str(getattr(http, "http_version", "HTTP/1.1")),
        method=str(getattr(request, "method", "POST")),
        url=str(getattr(http, "url", "")),
        headers=[
            (name, value)
            for name, value in http.headers.multi_items()
            if name.lower() not in _NOT_RECORDED
        ],
    )


def headers_type(client: Any) -> Callable[[list[tuple[str, str]]], Any]:
    """The ``Headers`` class of the HTTP library the client uses (``httpx`` or its fork)."""
    http_client = getattr(client, "_client", None)
    module = type(http_client).__module__.partition(".")[0] if http_client is not None else ""
    for name in (module, "httpx2", "httpx"):
        if not name:
            continue
        try:
            found = getattr(importlib.import_module(name), "Headers", None)
        except ImportError:
            continue
        if found is not None:
            return found  # type: ignore[no-any-return]
    return dict


class RecordedResponse:
    """``.response`` of a cached client's stream: the upstream response's recorded head.

    ``close()`` / ``aclose()`` close the stream it belongs to (as the SDK's helpers expect of
    ``stream.response``).
    """

    def __init__(
        self,
        head: HttpHead,
        make_headers: Callable[[list[tuple[str, str]]], Any],
        close: Callable[[], Any],
    ) -> None:
        self.head = head
        self.status_code = head.status_code
        self.reason_phrase = head.reason_phrase
        self.http_version = head.http_version
        self.method = head.method
        self.url = head.url
        self.headers = make_headers(list(head.headers))
        self.is_closed = False
        self._close = close

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def is_error(self) -> bool:
        return self.status_code >= 400

    def close(self) -> None:
        """Closes the stream (sync streams)."""
        self.is_closed = True
        self._close()

    async def aclose(self) -> None:
        """Closes the stream (async streams)."""
        self.is_closed = True
        result = self._close()
        if result is not None:
            await result

    def __repr__(self) -> str:
        return f"<RecordedResponse [{self.status_code} {self.reason_phrase}]>"


def _split_head(first: Any) -> tuple[HttpHead, Any]:
    """``(head, pending chunk or _NONE)`` from an entry's first item."""
    if isinstance(first, HttpHead):
        return first, _NONE
    # an entry without a head (never written by a cached client): keep the item
    return HttpHead.model_construct(), first


_NONE: Any = object()


def _prepend(item: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield item
    yield from rest


async def _aprepend(item: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield item
    async for chunk in rest:
        yield chunk


class CachedStream(Generic[T]):
    """A cached client's stream: behaves like the SDK's ``Stream`` on a miss, join or hit."""

    response: RecordedResponse

    def __init__(
        self,
        inner: Iterator[Any],
        make_headers: Callable[[list[tuple[str, str]]], Any],
    ) -> None:
        """Reads the head from ``inner`` (the cache's stream) at once: upstream errors (HTTP
        status errors, connection errors) are raised here, as the SDK raises them from
        ``create``."""
        self._source = inner
        try:
            head, pending = _split_head(next(inner))
        except StopIteration:
            head, pending = HttpHead.model_construct(), _NONE
        self._iter: Iterator[Any] = inner if pending is _NONE else _prepend(pending, inner)
        self.response = RecordedResponse(head, make_headers, self.close)

    @property
    def cache_info(self) -> Any:
        """What the cache did for this call (None before the cache reports it)."""
        return getattr(self._source, "cache_info", None)

    def __iter__(self) -> Iterator[T]:
        return self._iter

    def __next__(self) -> T:
        return next(self._iter)  # type: ignore[no-any-return]

    def __enter__(self) -> CachedStream[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stops reading: detaches from the shared stream (the upstream is closed if nobody
        else reads it; see `StreamingResponseCache`)."""
        self.response.is_closed = True
        for it in (self._iter, self._source):
            closer = getattr(it, "close", None)
            if closer is not None:
                closer()

    def __repr__(self) -> str:
        return f"<CachedStream {self.response!r}>"


class AsyncCachedStream(Generic[T]):
    """A cached async client's stream: behaves like the SDK's ``AsyncStream``."""

    response: RecordedResponse

    def __init__(
        self,
        inner: AsyncIterator[Any],
        head: HttpHead,
        pending: Any,
        make_headers: Callable[[list[tuple[str, str]]], Any],
    ) -> None:
        self._source = inner
        self._iter: AsyncIterator[Any] = inner if pending is _NONE else _aprepend(pending, inner)
        self.response = RecordedResponse(head, make_headers, self.close)

    @classmethod
    async def open(
        cls, inner: AsyncIterator[Any], make_headers: Callable[[list[tuple[str, str]]], Any]
    ) -> AsyncCachedStream[Any]:
        """Reads the head from ``inner`` (upstream errors are raised here, as the SDK raises
        them from ``await create(...)``); closes ``inner`` if that fails or is cancelled."""
        try:
            first = await inner.__anext__()
        except StopAsyncIteration:
            return cls(inner, HttpHead.model_construct(), _NONE, make_headers)
        except BaseException:
            await _aclose_quietly(inner)
            raise
        head, pending = _split_head(first)
        return cls(inner, head, pending, make_headers)

    @property
    def cache_info(self) -> Any:
        """What the cache did for this call (None before the cache reports it)."""
        return getattr(self._source, "cache_info", None)

    def __aiter__(self) -> AsyncIterator[T]:
        return self._iter

    async def __anext__(self) -> T:
        return await self._iter.__anext__()  # type: ignore[no-any-return]

    async def __aenter__(self) -> AsyncCachedStream[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stops reading (see `CachedStream.close`)."""
        self.response.is_closed = True
        for it in (self._iter, self._source):
            await _aclose_quietly(it)

    async def aclose(self) -> None:
        """Alias of `close`."""
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncCachedStream {self.response!r}>"


async def _aclose_quietly(it: Any) -> None:
    closer = getattr(it, "aclose", None)
    if closer is not None:
        with anyio.CancelScope(shield=True):
            await closer()


def only_object(items: Iterable[Any]) -> Any:
    """The object of a non-streamed entry (the items after the head)."""
    rest = [item for item in items if not isinstance(item, HttpHead)]
    if len(rest) != 1:
        raise RuntimeError(f"a non-streamed call's entry holds {len(rest)} objects, not 1")
    return rest[0]


# -- the cache_info of a whole call's object ----------------------------------------------------

#: id(object) -> (a weak reference to it, its info). Guarded by `_infos_lock` (reentrant: a
#: collection inside the locked region may run `_forget` on this thread); an entry is dropped
#: by its reference's callback when the object is collected (before its id can be reused), and
#: only if it is still that reference's entry.
_infos: dict[int, tuple[weakref.ref[Any], CacheInfo]] = {}
_infos_lock = threading.RLock()


def _forget(ident: int, ref: weakref.ref[Any]) -> None:
    with _infos_lock:
        entry = _infos.get(ident)
        if entry is not None and entry[0] is ref:
            del _infos[ident]


def remember(obj: T, info: CacheInfo | None) -> T:
    """``obj`` with ``info`` kept for `cache_info_of`; if ``obj`` already has another caller's
    info (callers that joined one whole call share its object), a shallow ``model_copy`` of it
    instead. An object that cannot be weakly referenced is returned as is, without an info."""
    if info is None:
        return obj
    with _infos_lock:  # check and insert at once: two callers never end up with one object
        entry = _infos.get(id(obj))
        if entry is not None and entry[0]() is obj:
            if not isinstance(obj, BaseModel):
                return obj  # cannot be copied: it keeps the first caller's info
            obj = obj.model_copy()
        ident = id(obj)
        try:
            ref = weakref.ref(obj, lambda r: _forget(ident, r))
        except TypeError:
            return obj
        _infos[ident] = (ref, info)
    return obj


def cache_info_of(result: Any) -> CacheInfo | None:
    """What the cache did for the call that returned ``result``: a `CacheInfo`, or None.

    ``result``: anything a cached client's call returned. A stream (``create(stream=True)``):
    its ``cache_info`` (set when the call returns, final once the stream ended). An SDK helper's
    stream (what ``with client.chat.completions.stream(...) as s`` gives): that of the cached
    stream it reads. A whole call's model object (``ChatCompletion``, ``Response``,
    ``Message``, ...): the call's final info (a request the key cannot hash was sent upstream
    uncached: status ``bypass``, key ``""``). Also works on the streams of ``get_or_stream`` /
    ``aget_or_stream``. None for anything else (a copy of a returned object, a value that did
    not come from a cached client).
    """
    with _infos_lock:
        entry = _infos.get(id(result))
    if entry is not None and entry[0]() is result:
        return entry[1]
    if isinstance(result, BaseModel):  # (a model's own field or extra named cache_info is not)
        return None
    info = getattr(result, "cache_info", _NONE)
    if info is not _NONE:
        return info  # type: ignore[no-any-return]
    raw = getattr(result, "_raw_stream", None)  # the SDK helpers' streams keep the stream they read
    if raw is not None and raw is not result:
        return cache_info_of(raw)
    return None
