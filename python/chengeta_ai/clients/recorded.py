"""What a cached client hands back: SDK-like streams whose ``.response`` was recorded.

The first item of every entry a cached client writes is an `HttpHead`: the status line and
headers of the upstream HTTP response (request ids included), whether the entry is streamed or
whole, and the endpoint. It is stored with the entry and replayed with it, so a miss, a join
and a hit all expose the same ``.response``; `head_fits` tells whether an entry may serve a
call (an entry of the other kind or endpoint is corrupt). The wrappers strip it off:

- `CachedStream` / `AsyncCachedStream` behave like the SDK's ``Stream`` / ``AsyncStream``:
  iteration (the chunks, exactly as the cache yields them: no per-chunk wrapper), context
  manager, ``close()`` (``aclose()`` too, async), ``.response`` and ``cache_info`` (read from the
  cache's own stream object, once it has one);
- ``.response`` is a real ``Response`` of the HTTP library the SDK client uses (``httpx`` or
  its fork ``httpx2``: the class of the SDK stream's own ``.response``), rebuilt from the head
  on first use (`recorded_response`): ``status_code``, ``headers``, ``http_version``,
  ``reason_phrase``, ``url`` (a ``URL``), ``request`` (method and URL), ``elapsed``,
  ``is_success``, ``raise_for_status()``, ... Its body is empty (the chunks are the stream's);
  ``close()`` / ``aclose()`` close the stream, as closing the SDK's response does.

`cache_info_of(result)` is the `CacheInfo` of anything a cached client returned: a stream (its
``cache_info``), an SDK helper's stream (that of the cached stream under it), or a whole call's
model object, which cannot carry it without being changed (its fields, ``==`` and JSON dump are
the API's): the info is kept beside it, in a table keyed by the object's identity that forgets
it when the object is collected. Callers of one live whole call (a miss and its joiners) share
the object the upstream produced: each gets its own deep copy (`own_copy`), so no caller sees
another's edits and each object has one info.

Not recorded: hop-by-hop headers (``connection``, ``keep-alive``, ``transfer-encoding``) and
``set-cookie`` (a cookie is one client's, never a shared cache's).
"""

from __future__ import annotations

import copy
import datetime
import functools
import importlib
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from types import ModuleType, TracebackType
from typing import Any, ClassVar, Generic, TypeGuard, TypeVar

import anyio
from pydantic import BaseModel

from chengeta_ai.errors import DecodeError
from chengeta_ai.layers.call_controls import CacheInfo

__all__ = [
    "AsyncCachedStream",
    "CachedStream",
    "HttpHead",
    "achecked_items",
    "cache_info_of",
    "checked_items",
    "head_fits",
    "head_of",
    "http_library",
    "item_fits",
    "own_copy",
    "recorded_response",
    "register_head",
    "remember",
    "whole_object",
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
    #: The cached client's endpoint that wrote the entry (``"openai.chat.completions"``, ...);
    #: empty in entries written before it was recorded.
    endpoint: str = ""
    #: The request asked for a trailing usage chunk (``stream_options={"include_usage":
    #: True}``): the stream is complete only with it (`chengeta_ai.layers.completeness`).
    expects_usage: bool = False


_registered = False


def register_head() -> None:
    """Registers `HttpHead` with the compact codec (once)."""
    global _registered
    if not _registered:
        from chengeta_ai.models import register_model

        register_model(HttpHead, HEAD_MODEL_NAME)
        _registered = True


def head_of(response: Any, *, stream: bool, endpoint: str, expects_usage: bool = False) -> HttpHead:
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
        endpoint=endpoint,
        expects_usage=expects_usage,
    )


def asks_for_usage(kwargs: dict[str, Any]) -> bool:
    """The request asks for the trailing usage chunk (``stream_options.include_usage``)."""
    options = kwargs.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def head_fits(first: Any, endpoint: str, *, stream: bool) -> TypeGuard[HttpHead]:
    """Whether ``first``, an entry's first item, is the head of an entry this call may serve:
    an `HttpHead` of the call's kind (streamed or whole) and endpoint. Anything else (no head,
    a whole call's entry under a streamed call's key or the reverse, another endpoint's) is a
    corrupt entry: written by a bug, or planted in a shared backend."""
    return (
        isinstance(first, HttpHead)
        and first.stream is stream
        and first.endpoint in (endpoint, "")
        and head_is_sound(first)
    )


#: HTTP versions a recorded head may name (what httpx / the SDKs report).
_HTTP_VERSIONS = frozenset({"HTTP/0.9", "HTTP/1.0", "HTTP/1.1", "HTTP/2", "HTTP/3"})


def head_is_sound(head: HttpHead) -> bool:
    """Whether the HTTP response rebuilt from ``head`` can be built: the compact codec rebuilds
    a stored head without validating it, so a planted or damaged head (a URL that does not
    parse, headers that are not pairs of strings, a status outside 100-599) is refused here,
    before anything is handed out, rather than raising in the caller at ``.response`` or in
    the SDK's helpers (which read ``.response`` on entry). Cheap: a few type checks and one
    URL parse per hit."""
    try:
        status, method = getattr(head, "status_code", 200), getattr(head, "method", "POST")
        url, headers = getattr(head, "url", ""), getattr(head, "headers", [])
        if not (
            type(status) is int
            and 100 <= status <= 599
            and type(getattr(head, "stream", True)) is bool
            and type(getattr(head, "expects_usage", False)) is bool
            and type(getattr(head, "reason_phrase", "")) is str
            and getattr(head, "http_version", "HTTP/1.1") in _HTTP_VERSIONS
            and type(method) is str
            and method.isascii()
            and method.isalpha()
            and type(url) is str
            and type(headers) is list
        ):
            return False
        for pair in headers:
            if not (
                type(pair) is tuple
                and len(pair) == 2
                and type(pair[0]) is str
                and type(pair[1]) is str
                and pair[0].isascii()
            ):
                return False
        if url:
            _url_parser()(url)
    except Exception:
        return False
    return True


@functools.cache
def _url_parser() -> Callable[[str], Any]:
    """The URL parser of the HTTP library the SDKs use (``httpx.URL``; its fork ``httpx2`` parses
    alike); the standard library's if neither is installed."""
    for name in ("httpx", "httpx2"):
        try:
            return importlib.import_module(name).URL  # type: ignore[no-any-return]
        except ImportError:
            continue
    import urllib.parse

    return urllib.parse.urlsplit


# -- `.response`: a real HTTP response of the SDK's HTTP library, rebuilt from the head --------


def http_library(client: Any) -> ModuleType:
    """The HTTP library the client uses (``httpx``, or the SDK's fork of it, ``httpx2``)."""
    http_client = getattr(client, "_client", None)
    module = type(http_client).__module__.partition(".")[0] if http_client is not None else ""
    for name in (module, "httpx2", "httpx"):
        if not name:
            continue
        try:
            found = importlib.import_module(name)
        except ImportError:
            continue
        if all(hasattr(found, n) for n in ("Response", "Request", "SyncByteStream")):
            return found
    raise ModuleNotFoundError("a cached client needs httpx (the SDKs depend on it)")


@functools.cache
def _body_types(lib: ModuleType) -> tuple[type, type]:
    """The empty bodies of a recorded response, for ``lib``: closing one closes the cached
    stream the response belongs to (sync, async)."""

    class SyncBody(lib.SyncByteStream):  # type: ignore[name-defined, misc]
        def __init__(self, close: Callable[[], Any]) -> None:
            self._close = close

        def __iter__(self) -> Iterator[bytes]:
            return iter(())

        def close(self) -> None:
            self._close()

    class AsyncBody(lib.AsyncByteStream):  # type: ignore[name-defined, misc]
        def __init__(self, close: Callable[[], Any]) -> None:
            self._close = close

        async def __aiter__(self) -> AsyncIterator[bytes]:
            return
            yield b""

        async def aclose(self) -> None:
            result = self._close()
            if result is not None:
                await result

    return SyncBody, AsyncBody


def recorded_response(
    lib: ModuleType,
    head: HttpHead,
    *,
    elapsed: float,
    close: Callable[[], Any],
    is_async: bool,
) -> Any:
    """The ``.response`` of a cached stream: ``lib.Response`` (the class of the SDK stream's own
    ``.response``) with the recorded status, reason phrase, HTTP version and headers, a
    ``request`` with the recorded method and URL, and ``elapsed``: the time this call took to
    its head. Its body is empty and never read (the chunks are the stream's); ``close()`` /
    ``aclose()`` close the stream."""
    sync_body, async_body = _body_types(lib)
    response = lib.Response(
        head.status_code,
        # as bytes: a str value outside ASCII (decoded by the HTTP library as UTF-8 or
        # Latin-1) is refused as a str; its UTF-8 bytes decode back to the same str
        headers=[(name.encode(), value.encode()) for name, value in head.headers],
        stream=(async_body if is_async else sync_body)(close),
        request=lib.Request(head.method, head.url or "http://cached.invalid/"),
        extensions={
            "http_version": head.http_version.encode("ascii", "replace"),
            "reason_phrase": head.reason_phrase.encode("ascii", "replace"),
        },
    )
    response.elapsed = datetime.timedelta(seconds=elapsed)
    return response


_NONE: Any = object()


class _RecordedStream:
    """What the sync and async cached streams share: the cache's stream, the recorded HTTP
    head, and ``.response`` built from it on first use (see `recorded_response`)."""

    _is_async = False

    def __init__(
        self, inner: Any, head: HttpHead, lib: ModuleType, elapsed: float, items: Any = None
    ) -> None:
        """``inner``: the cache's stream, its head already read (by `ClientCache.call`, which
        raises upstream errors, as the SDK raises them from ``create``); ``items``: what to
        iterate instead of ``inner`` (a hit's items, checked as they go: `checked_items`)."""
        self._source = inner
        self._iter = inner if items is None else items
        self._head = head
        self._lib = lib
        self._elapsed = elapsed
        self._response: Any = None
        self._closed = False

    @property
    def response(self) -> Any:
        """The upstream response's recorded head as the SDK's HTTP response class."""
        if self._response is None:
            self._response = recorded_response(
                self._lib,
                self._head,
                elapsed=self._elapsed,
                close=self.close,  # type: ignore[attr-defined]
                is_async=self._is_async,
            )
            self._response.is_closed = self._closed
        return self._response

    @property
    def cache_info(self) -> Any:
        """What the cache did for this call (None before the cache reports it)."""
        return getattr(self._source, "cache_info", None)


class CachedStream(_RecordedStream, Generic[T]):
    """A cached client's stream: behaves like the SDK's ``Stream`` on a miss, join or hit.

    ``.response`` is built on first use (see `recorded_response`)."""

    _iter: Iterator[Any]

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
        self._closed = True
        if self._response is not None:
            self._response.is_closed = True
        closer = getattr(self._source, "close", None)
        if closer is not None:
            closer()

    def __repr__(self) -> str:
        return f"<CachedStream [{self._head.status_code} {self._head.reason_phrase}]>"


class AsyncCachedStream(_RecordedStream, Generic[T]):
    """A cached async client's stream: behaves like the SDK's ``AsyncStream``."""

    _is_async = True
    _iter: AsyncIterator[Any]

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
        self._closed = True
        if self._response is not None:
            self._response.is_closed = True
        await aclose_quietly(self._source)

    async def aclose(self) -> None:
        """Alias of `close`."""
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncCachedStream [{self._head.status_code} {self._head.reason_phrase}]>"


async def aclose_quietly(it: Any) -> None:
    """Closes an async iterator (if it can be closed), shielded from cancellation."""
    closer = getattr(it, "aclose", None)
    if closer is not None:
        with anyio.CancelScope(shield=True):
            await closer()


def whole_object(head: HttpHead, rest: list[Any], endpoint: str) -> Any | None:
    """The object of a whole call's entry (the items after its head: exactly one, of the
    endpoint's result class: `item_fits`), or None."""
    if len(rest) != 1 or head.stream or not item_fits(endpoint, False, rest[0]):
        return None
    return rest[0]


# -- what an entry's items may be, per endpoint -------------------------------------------------

#: ``(endpoint, stream)`` -> (module prefix, class names; None: any class of the prefix): the
#: class of each item after the head, or one of its bases. An entry holding anything else
#: (another SDK's objects, another endpoint's, planted or written by a bug) is not served.
_ITEM_KINDS: dict[tuple[str, bool], tuple[str, frozenset[str] | None]] = {
    ("openai.chat.completions", True): ("openai.", frozenset({"ChatCompletionChunk"})),
    ("openai.chat.completions", False): ("openai.", frozenset({"ChatCompletion"})),
    ("openai.completions", True): ("openai.", frozenset({"Completion"})),
    ("openai.completions", False): ("openai.", frozenset({"Completion"})),
    ("openai.responses", True): ("openai.types.responses.", None),
    ("openai.responses", False): ("openai.", frozenset({"Response"})),
    ("anthropic.messages", True): (
        "anthropic.",
        frozenset(
            {
                "RawMessageStartEvent",
                "RawMessageDeltaEvent",
                "RawMessageStopEvent",
                "RawContentBlockStartEvent",
                "RawContentBlockDeltaEvent",
                "RawContentBlockStopEvent",
            }
        ),
    ),
    ("anthropic.messages", False): ("anthropic.", frozenset({"Message"})),
}

#: Verdicts of `item_fits` by (endpoint, stream, class); bounded (classes are few).
_item_verdicts: dict[tuple[str, bool, type], bool] = {}


def item_fits(endpoint: str, stream: bool, item: Any) -> bool:
    """Whether ``item`` may follow the head of an ``endpoint`` entry (see `_ITEM_KINDS`); an
    endpoint without a rule takes anything."""
    cls = type(item)
    verdict = _item_verdicts.get((endpoint, stream, cls))
    if verdict is None:
        spec = _ITEM_KINDS.get((endpoint, stream))
        if spec is None:
            verdict = True
        else:
            prefix, names = spec
            verdict = any(
                base.__module__.startswith(prefix) and (names is None or base.__name__ in names)
                for base in cls.__mro__
            )
        if len(_item_verdicts) < 1024:
            _item_verdicts[(endpoint, stream, cls)] = verdict
    return verdict


def wrong_item(endpoint: str, item: Any) -> DecodeError:
    return DecodeError(
        f"an item of class {type(item).__module__}.{type(item).__qualname__} in a streamed "
        f"{endpoint} entry (planted, or written by a bug): the entry is dropped"
    )


def checked_items(
    first: Any,
    rest: Iterator[Any],
    endpoint: str,
    wrong: Callable[[DecodeError], None],
    *,
    has_first: bool = True,
) -> Iterator[Any]:
    """A hit's items: ``first`` (checked by the caller before the stream was handed out), then
    ``rest``, each checked (`item_fits`); one that does not fit reports to ``wrong`` (the entry
    is dropped) and raises `DecodeError` (a clear error, never an object of the wrong kind).
    ``has_first`` False: there is no ``first``, every item of ``rest`` is checked."""
    fitting: set[type] = set()  # classes seen to fit: one set lookup per item
    if has_first:
        yield first
        fitting.add(type(first))
    for item in rest:
        if type(item) not in fitting:
            if not item_fits(endpoint, True, item):
                error = wrong_item(endpoint, item)
                wrong(error)
                raise error
            fitting.add(type(item))
        yield item


async def achecked_items(
    first: Any,
    rest: AsyncIterator[Any],
    endpoint: str,
    wrong: Callable[[DecodeError], Any],
    *,
    has_first: bool = True,
) -> AsyncIterator[Any]:
    """Async twin of `checked_items` (``wrong`` may return an awaitable)."""
    fitting: set[type] = set()
    if has_first:
        yield first
        fitting.add(type(first))
    async for item in rest:
        if type(item) not in fitting:
            if not item_fits(endpoint, True, item):
                error = wrong_item(endpoint, item)
                result = wrong(error)
                if result is not None:
                    await result
                raise error
            fitting.add(type(item))
        yield item


def own_copy(obj: T) -> T:
    """A deep copy of a whole call's object, for one caller: the object a live call (miss,
    join) yields is shared by every caller of that call, and nested models are mutable."""
    if isinstance(obj, BaseModel):
        return obj.model_copy(deep=True)
    try:
        return copy.deepcopy(obj)
    except Exception:
        return obj


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
    info (the calls give each caller its own object: a safety net), a deep copy of it
    instead. An object that cannot be weakly referenced is returned as is, without an info."""
    if info is None:
        return obj
    with _infos_lock:  # check and insert at once: two callers never end up with one object
        entry = _infos.get(id(obj))
        if entry is not None and entry[0]() is obj:
            if not isinstance(obj, BaseModel):
                return obj  # cannot be copied: it keeps the first caller's info
            obj = obj.model_copy(deep=True)
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
