"""What ``stream_fn`` returned: checked at the call, and read without blocking an event loop.

- `not_a_stream`: the objects that are iterable but are not a stream of chunks, which a cache
  would otherwise store quietly: a pydantic model (``client.chat.completions.create(...)``
  without ``stream=True`` returns a ``ChatCompletion``, which iterates as ``(field, value)``
  pairs), a mapping (iterates its keys), a ``str`` (characters), ``bytes`` (ints).
- `check_sync_stream`: the check of `get_or_stream` (sync callers).
- `aiter_sync`: a sync iterable as an async iterator for `aget_or_stream`. Lists, tuples and
  ranges (and iterators over them) are in memory and read inline. Anything else (an
  ``openai.Stream``, a generator, any iterator) may block on I/O in ``next()``, so each
  ``next()`` runs in a worker thread (`ThreadedIterator`) and the event loop never waits on it.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
import threading
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

__all__ = [
    "UPSTREAM_READER_THREADS",
    "ThreadedIterator",
    "aiter_sync",
    "call_in_reader_thread",
    "check_sync_stream",
    "in_memory",
    "not_a_stream",
]

logger = logging.getLogger("chengeta_ai")

#: Worker threads that may read blocking sync upstreams at once, per event loop. A separate
#: limiter from anyio's default one (40 threads, shared with file backends and RedisFlights):
#: streams waiting for their next token must not starve a SQLite read. A stream beyond this
#: bound waits for a reader to be free (every reader progresses as its upstream does).
UPSTREAM_READER_THREADS = 128


class _Readers:
    """The reader threads of one event loop: ``bound`` holds one token per ``next()`` in a
    worker thread *until that ``next()`` returns*, even when its caller was cancelled and
    abandoned the thread (anyio's own limiter gives the token back at the cancel on asyncio,
    while the thread still blocks: the bound would not hold). ``threads``: the limiter the
    reads run under (unbounded: ``bound`` is the bound). ``call_soon``: runs a function on the
    loop from any thread (how an abandoned read gives its token back)."""

    __slots__ = ("bound", "call_soon", "threads")

    def __init__(self) -> None:
        self.bound = anyio.CapacityLimiter(UPSTREAM_READER_THREADS)
        self.threads = anyio.CapacityLimiter(math.inf)
        self.call_soon = _loop_call_soon()


def _loop_call_soon() -> Any:
    """The running loop's thread-safe "call this soon" (asyncio or trio)."""
    import sniffio

    if sniffio.current_async_library() == "trio":
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    import asyncio

    return asyncio.get_running_loop().call_soon_threadsafe


class _ReadGate:
    """Who gives a read's token back: the loop when the read returns to it, the worker thread
    when its caller abandoned it (decided once, under a lock)."""

    __slots__ = ("abandoned", "done", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = False
        self.abandoned = False

    def finish(self) -> bool:
        """The thread's ``next()`` returned: True if the thread must give the token back."""
        with self.lock:
            self.done = True
            return self.abandoned

    def abandon(self) -> bool:
        """The caller left before the read returned: True if the thread will give it back."""
        with self.lock:
            self.abandoned = not self.done
            return self.abandoned


_readers: anyio.lowlevel.RunVar[_Readers] = anyio.lowlevel.RunVar("chengeta_upstream_readers")

#: Sync iterables whose ``next()`` never does I/O: read on the event loop.
_IN_MEMORY: frozenset[type] = frozenset(
    {
        list,
        tuple,
        range,
        type(iter([])),
        type(iter(())),
        type(iter(range(0))),
        type(iter(range(2**64))),  # longrange_iterator
        type(reversed([])),
    }
)

_HINT = "did you pass stream=True?"


def not_a_stream(result: object) -> str | None:
    """Why ``result`` is not a stream of chunks (an iterable a cache must refuse), or None."""
    kind: str | None = None
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(result, pydantic.BaseModel):
        kind = "a pydantic model (a whole response, which iterates as (field, value) pairs)"
    elif isinstance(result, Mapping):
        kind = "a mapping (which iterates as its keys)"
    elif isinstance(result, str):
        kind = "a str (which iterates as characters)"
    elif isinstance(result, (bytes, bytearray, memoryview)):
        kind = "bytes (which iterate as ints)"
    if kind is None:
        return None
    return (
        f"stream_fn returned {type(result).__module__}.{type(result).__qualname__}, {kind}, "
        f"not a stream of chunks: {_HINT} (stream_fn must return the SDK's stream, e.g. "
        "client.chat.completions.create(..., stream=True), or an iterable of chunks; to cache "
        "one whole object, return [obj])"
    )


def check_sync_stream(result: Any) -> Iterable[Any]:
    """``result`` if `get_or_stream` can read it as chunks; else `TypeError` with the fix."""
    reason = not_a_stream(result)
    if reason is not None:
        raise TypeError(reason)
    if not hasattr(result, "__iter__"):
        hint = (
            "use aget_or_stream for async streams and coroutines"
            if hasattr(result, "__aiter__") or hasattr(result, "__await__")
            else _HINT
        )
        if inspect.iscoroutine(result):
            result.close()  # refused: no "never awaited" warning on top of this error
        raise TypeError(
            "get_or_stream needs stream_fn to return an iterable of chunks; got "
            f"{type(result).__name__} ({hint})"
        )
    return result  # type: ignore[no-any-return]


def in_memory(iterable: object) -> bool:
    """True for the sync iterables read inline on an event loop (lists, tuples, ranges and
    their iterators); anything else may block in ``next()``."""
    return type(iterable) in _IN_MEMORY


def aiter_sync(iterable: Iterable[Any]) -> Any:
    """``iterable`` as an async iterator: inline if `in_memory`, else a `ThreadedIterator`."""
    if in_memory(iterable):
        return _aiter_in_memory(iterable)
    return ThreadedIterator(iterable)


async def _aiter_in_memory(iterable: Iterable[Any]) -> AsyncGenerator[Any, None]:
    for item in iterable:
        yield item


_END = object()
_NOTHING: Any = object()


async def call_in_reader_thread(
    fn: Callable[[], Any], discard: Callable[[Any], None] | None = None
) -> Any:
    """``fn()`` in a worker thread, within the upstream readers' bound of this event loop
    (`UPSTREAM_READER_THREADS`): its token is held until ``fn`` returns, also when the caller
    is cancelled and abandons the thread (anyio's own limiter gives it back at the cancel on
    asyncio while the thread still blocks). What ``fn`` returns to a caller that is gone is
    passed to ``discard`` (e.g. closing an HTTP stream), never leaked."""
    readers = _readers.get(None)
    if readers is None:
        readers = _Readers()
        _readers.set(readers)
    bound, call_soon = readers.bound, readers.call_soon
    borrower = object()
    await bound.acquire_on_behalf_of(borrower)
    gate = _ReadGate()
    returned: list[Any] = []

    def run() -> list[Any]:
        result = _NOTHING
        try:
            result = fn()
            returned.append(result)
            return returned  # boxed: trio refuses a worker function returning a coroutine
        finally:
            if gate.finish():  # abandoned by its caller: the thread cleans up
                if discard is not None and result is not _NOTHING:
                    discard(result)
                try:
                    call_soon(bound.release_on_behalf_of, borrower)
                except Exception:  # the loop is gone, and its limiter with it
                    pass

    try:
        boxed = await anyio.to_thread.run_sync(run, abandon_on_cancel=True, limiter=readers.threads)
    except BaseException:
        if not gate.abandon():  # the thread had returned: its result never reached us
            bound.release_on_behalf_of(borrower)
            if discard is not None and returned:
                discard(returned[0])
        raise
    bound.release_on_behalf_of(borrower)
    return boxed[0]


class ThreadedIterator:
    """An async iterator over a sync iterable whose ``next()`` may block (an HTTP stream): each
    ``next()`` runs in a worker thread, one at a time, only when asked for (so the reader's
    backpressure holds: nothing is read ahead).

    Closing (`aclose`, called when the flight is cancelled or fails) never waits for a read
    in progress: a cancelled ``__anext__`` abandons its worker thread at once, and that thread
    closes the iterator (and the object it came from, e.g. the ``openai.Stream`` holding the
    socket) as soon as its ``next()`` returns; no further ``next()`` is started. With no read
    in progress, `aclose` closes them itself, in a worker thread. Closing is done once.

    The state (reading, close requested, closed) changes under a lock; ``next()`` and
    ``close()`` run outside it (a close from another thread while a read blocks would race
    the HTTP client's own state).
    """

    __slots__ = ("_closed", "_closing", "_iterator", "_lock", "_reading", "_source")

    def __init__(self, source: Iterable[Any]) -> None:
        self._source = source
        self._iterator: Iterator[Any] | None = None
        self._lock = threading.Lock()
        self._reading = False
        self._closing = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<ThreadedIterator over {type(self._source).__name__}>"

    def __aiter__(self) -> ThreadedIterator:
        return self

    async def __anext__(self) -> Any:
        item = await call_in_reader_thread(self._read)
        if item is _END:
            raise StopAsyncIteration
        return item

    def _read(self) -> Any:
        """One ``next()``, in a worker thread."""
        with self._lock:
            if self._closing:
                return _END
            self._reading = True
        close = True
        try:
            if self._iterator is None:
                self._iterator = iter(self._source)
            item = next(self._iterator, _END)
            close = item is _END
            return item
        finally:
            # an exception also closes: the stream is over either way
            with self._lock:
                self._reading = False
                close = close or self._closing
                self._closing = self._closing or close
            if close:
                self._close_once()

    async def aclose(self) -> None:
        with self._lock:
            self._closing = True
            busy = self._reading
        if not busy:
            await anyio.to_thread.run_sync(self._close_once)
        # else: the reading thread closes once its next() returns (see the class doc)

    def _close_once(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        objs: list[Any] = [self._iterator, self._source]
        if self._iterator is self._source or self._iterator is None:
            objs = [self._source]
        for obj in objs:
            closer = getattr(obj, "close", None)
            if closer is None:
                continue
            try:
                closer()
            except Exception as exc:
                logger.debug("chengeta_ai: closing upstream raised %r", exc)
