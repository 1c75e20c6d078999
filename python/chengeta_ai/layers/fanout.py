"""In-flight streams shared by every concurrent caller of one key.

A *flight* is one upstream stream being read, with a Rust `ChunkLog` holding its chunks and one
cursor per attached consumer. The first caller of a key leads (it starts the flight); callers
that arrive while it runs join it and replay the log from the first chunk, then follow live.

Async flights (`AsyncFlight`) are pumped by a background task, so that any consumer (the
leader included) can be cancelled at any moment without disturbing the upstream read the
others depend on. Sync flights (`SyncFlight`) are pumped cooperatively: whichever thread needs
the next chunk and finds nobody pulling pulls it; a sync consumer leaves only between chunks.

Flights belong to one event loop (async) or to the threads of the process (sync): an async
caller never joins a sync flight or a flight of another loop, because waiting across them
would need a thread per waiter. Both kinds share the bookkeeping in `FlightCore`.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.lowlevel
import anyio.to_thread

from chengeta_ai._core import ChunkLog
from chengeta_ai.core.cache_manager import frame
from chengeta_ai.errors import ChengetaError, ConsumerLagged

if TYPE_CHECKING:
    from chengeta_ai.layers.streaming_cache import StreamingResponseCache

__all__ = ["AsyncFlight", "FlightCore", "SyncFlight"]

logger = logging.getLogger("chengeta_ai")

SlowConsumerPolicy = Literal["wait", "detach"]
AbandonPolicy = Literal["cancel", "finish"]

#: Chunks handed to a consumer per read of the log (one Rust call).
READ_BATCH = 256
#: A pump that was never held back yields to the event loop at least this often.
CHECKPOINT_EVERY = 64
#: Streams longer than this are finished (encoded, framed) in a worker thread, off the loop.
ENTRY_IN_THREAD_ABOVE = 1000
#: Seconds the end-of-stream store may take before it is abandoned (consumers wait for it).
STORE_TIMEOUT = 10.0
#: Size accounted for a chunk the serializer could not encode.
UNENCODED_CHUNK_BYTES = 256


class FlightCore:
    """What sync and async flights share: the log, the encoder, the store decision, stats."""

    def __init__(
        self,
        cache: StreamingResponseCache,
        slot: tuple[object, str],
        ttl: float | None,
        tags: tuple[str, ...],
    ) -> None:
        self.cache = cache
        self.slot = slot
        self.key = slot[1]
        self.ttl = ttl
        self.tags = tags
        self.log = ChunkLog(cache.max_lag, cache.max_entry_bytes)
        self.encoder: Any = None
        self.storable = True
        self.error: BaseException | None = None
        self._error_tb: TracebackType | None = None
        self.finished = False
        self.abandoned = False
        #: False once abandoned under on_abandon="cancel": callers wait for it to wind down
        #: (its upstream closed) and then lead their own, so that a key never has two.
        self.joinable = True
        if cache.chunk_joiner is None:
            self.encoder = cache.serializer.stream_encoder()

    # -- per chunk ----------------------------------------------------------------------------

    def append(self, chunk: Any) -> None:
        """Encodes (when storing chunk by chunk) and appends one upstream chunk to the log."""
        nbytes = UNENCODED_CHUNK_BYTES
        encoder = self.encoder
        if encoder is not None:
            try:
                before = encoder.nbytes
                encoder.push(chunk)
                nbytes = encoder.nbytes - before
            except Exception as exc:  # a cache failure: the chunk is still delivered
                self.encoder = None
                self.not_stored("unserializable", f"chunk {self.log.end} cannot be encoded: {exc}")
        if self.log.push(chunk, nbytes):
            # Over max_entry_bytes: no longer retained whole, so never stored; new callers of
            # the key start their own upstream instead of joining a stream they cannot replay.
            self.not_stored(
                "oversized", f"stream exceeded max_entry_bytes={self.cache.max_entry_bytes}"
            )
            self.cache.release_slot(self)

    def try_abandon(self) -> bool:
        """After a consumer left: True if none remain and the flight is now abandoned.

        Decided under the cache's flight lock, the lock joiners attach under, so a caller
        either joined before (and the flight goes on) or sees it abandoned.
        """
        with self.cache.flights_lock:
            if self.log.consumers or self.log.closed or self.abandoned or self.finished:
                return False
            self.abandoned = True
            if self.cache.on_abandon == "cancel":
                self.joinable = False
            return True

    def mark_released(self) -> None:
        """Called once the flight no longer occupies its key's slot."""
        raise NotImplementedError

    def start(self, stream_fn: Callable[[Any], Any], messages: Any) -> None:
        """Arranges for the upstream to be read (the leader calls this once)."""
        raise NotImplementedError

    def release_laggards(self) -> bool:
        """Under the "detach" policy, stops the slowest consumers from holding the upstream
        back; True if any were released."""
        if self.cache.slow_consumer != "detach":
            return False
        released = self.log.release_slowest()
        if released:
            self.cache.count("detaches", released)
        return released > 0

    def _read(self, consumer: int) -> list[Any]:
        """The consumer's next batch from the log; counts a `ConsumerLagged` on its way out."""
        try:
            return self.log.read(consumer, READ_BATCH)
        except ConsumerLagged:
            self.cache.count("lag_errors")
            raise

    def not_stored(self, reason: str, detail: str) -> None:
        if self.storable:
            self.storable = False
            self.cache.count(f"not_stored_{reason}")
            logger.warning("chengeta_ai: stream %s will not be cached: %s", self.key, detail)

    # -- end of stream ------------------------------------------------------------------------

    def entry(self) -> bytes | None:
        """The framed entry to store for a stream that ended normally, or None."""
        if not self.storable or (self.abandoned and self.cache.on_abandon == "cancel"):
            return None
        try:
            if self.encoder is not None:
                payload = self.encoder.finish()
                chunks = self.log.end
            else:
                snapshot = self.log.snapshot()
                if snapshot is None:
                    return None
                chunks = len(snapshot)
                joiner = self.cache.chunk_joiner
                value = joiner(list(snapshot)) if joiner is not None else list(snapshot)
                payload = self.cache.serializer.dumps(value)
        except Exception as exc:
            self.not_stored("unserializable", f"cannot encode the stream: {exc}")
            return None
        data = self.cache.manager.fit(self.key, frame(payload))
        if data is not None:
            self.stored_chunks = chunks
        return data

    def stored(self, ok: bool, data: bytes) -> None:
        if ok:
            self.cache.count("stores")
            self.cache.count("stored_bytes", len(data))
            self.cache.count("stored_chunks", self.stored_chunks)
        else:
            self.cache.count("not_stored_backend_error")

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self._error_tb = exc.__traceback__
        self.cache.count("upstream_errors")

    def raise_error(self) -> None:
        """Re-raises the upstream's exception in a consumer, with the upstream's traceback:
        not one grown by every consumer that re-raised the same object before."""
        assert self.error is not None
        raise self.error.with_traceback(self._error_tb)


# ---------------------------------------------------------------------------------------------
# async


async def _open_upstream(stream_fn: Callable[[Any], Any], messages: Any) -> Any:
    """Calls ``stream_fn`` and returns something to iterate: async iterator or plain iterable.

    Accepts what users hand us: an async iterator or async generator, an awaitable resolving to
    one (``AsyncOpenAI().chat.completions.create(..., stream=True)``), or a sync iterable.
    """
    result = stream_fn(messages)
    if inspect.isawaitable(result) and not hasattr(result, "__anext__"):
        result = await result
    if hasattr(result, "__anext__"):
        return result
    if hasattr(result, "__aiter__"):
        return result.__aiter__()
    if hasattr(result, "__iter__"):
        return result  # closed through `_aiter_plain`, the object itself (it may hold a socket)
    raise TypeError(
        "stream_fn must return an async iterator, an awaitable of one, or an iterable; "
        f"got {type(result).__name__}"
    )


async def _aiter_plain(iterable: Iterable[Any]) -> AsyncGenerator[Any, None]:
    try:
        for item in iterable:
            yield item
    finally:
        closer = getattr(iterable, "close", None)
        if closer is not None:
            closer()


async def _aclose_upstream(upstream: Any) -> None:
    """Closes an upstream iterator (HTTP response, generator) without letting errors escape."""
    for name in ("aclose", "close"):
        closer = getattr(upstream, name, None)
        if closer is None:
            continue
        try:
            result = closer()
            if inspect.isawaitable(result):
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await result
        except Exception as exc:
            logger.debug("chengeta_ai: closing upstream raised %r", exc)
        return


class AsyncFlight(FlightCore):
    """A flight on one event loop, pumped by a background task."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._data: anyio.Event | None = None
        self._space: anyio.Event | None = None
        self._scope: anyio.CancelScope | None = None
        self._released = anyio.Event()

    def mark_released(self) -> None:
        self._released.set()

    async def wait_released(self) -> None:
        await self._released.wait()

    # wake-ups are batched: an event exists only while somebody waits on it

    def _wake_data(self) -> None:
        ev, self._data = self._data, None
        if ev is not None:
            ev.set()

    def _wake_space(self) -> None:
        ev, self._space = self._space, None
        if ev is not None:
            ev.set()

    async def _wait_data(self) -> None:
        if self._data is None:
            self._data = anyio.Event()
        await self._data.wait()

    async def _wait_space(self) -> None:
        if self._space is None:
            self._space = anyio.Event()
        await self._space.wait()

    def start(self, stream_fn: Callable[[Any], Any], messages: Any) -> None:
        self._scope = anyio.CancelScope()
        self.cache.spawn(self._run, stream_fn, messages)

    async def _run(self, stream_fn: Callable[[Any], Any], messages: Any) -> None:
        # A background task: upstream errors go to the consumers, never out of this task (a
        # trio system task must not raise); only an outside cancellation propagates.
        upstream: Any = None
        assert self._scope is not None
        try:
            with self._scope:
                upstream = await _open_upstream(stream_fn, messages)
                if not hasattr(upstream, "__anext__"):
                    upstream = _aiter_plain(upstream)
                await self._pump(upstream)
                self.finished = True
            if self.finished:
                # Consumers already have every chunk; their stream ends once the entry is
                # stored, so that a loop shut down right after still keeps it.
                with anyio.CancelScope(shield=True) as store_scope:
                    store_scope.deadline = anyio.current_time() + STORE_TIMEOUT
                    if self.log.end > ENTRY_IN_THREAD_ABOVE:
                        # finishing a long stream (zstd, checksum, a joiner) takes milliseconds
                        data = await anyio.to_thread.run_sync(self.entry)
                    else:
                        data = self.entry()
                    if data is not None:
                        ok = await self.cache.manager.aset_raw(self.key, data, self.ttl, self.tags)
                        self.stored(ok, data)
                if store_scope.cancelled_caught:
                    self.cache.count("not_stored_backend_error")
                    logger.warning(
                        "chengeta_ai: storing %s took over %s s; skipped", self.key, STORE_TIMEOUT
                    )
            elif self.abandoned:
                self.cache.count("abandoned_cancelled")
        except anyio.get_cancelled_exc_class():
            # Cancelled from outside (the cache's task group closing, the run ending): the
            # consumers get a clear error, the cancellation goes on.
            self.fail(ChengetaError(f"the upstream read for {self.key} was cancelled"))
            raise
        except Exception as exc:  # upstream failure: every consumer re-raises it
            self.fail(exc)
        finally:
            if upstream is not None and not self.finished:
                await _aclose_upstream(upstream)
            self.log.close()
            self.cache.release_slot(self)
            self._wake_data()

    async def _pump(self, upstream: Any) -> None:
        since_checkpoint = 0
        while True:
            try:
                chunk = await upstream.__anext__()
            except StopAsyncIteration:
                return
            self.append(chunk)
            self._wake_data()
            since_checkpoint += 1
            if await self._hold() or since_checkpoint >= CHECKPOINT_EVERY:
                if since_checkpoint >= CHECKPOINT_EVERY:
                    await anyio.lowlevel.checkpoint()
                since_checkpoint = 0

    async def _hold(self) -> bool:
        """Backpressure: waits while the slowest holding consumer is ``max_lag`` behind.

        Returns True if it waited (the loop got control). Under the "detach" policy the
        laggards are released instead of waited for.
        """
        waited = False
        log = self.log
        while log.headroom() == 0:
            if self.release_laggards():
                continue
            waited = True
            await self._wait_space()
        return waited

    def abandon(self) -> None:
        """The last consumer left before the end: cancel the pump, or let it finish."""
        if self.cache.on_abandon == "cancel":
            if self._scope is not None:
                self._scope.cancel()
        else:
            self.cache.count("abandoned_finished")
            self._wake_space()

    async def consume(self, consumer: int) -> AsyncGenerator[list[Any], None]:
        """Yields every chunk from the first, in batches, following the pump; raises the
        upstream's error at the end. (Batches: one async-generator hop per batch, not per
        chunk; the caller's generator yields the chunks.)"""
        log = self.log
        acked_batch = False
        delivered = 0
        try:
            while True:
                batch = self._read(consumer)
                if acked_batch:  # this read acknowledged the previous batch: maybe room now
                    self._wake_space()
                acked_batch = bool(batch)
                if batch:
                    delivered += len(batch)
                    yield batch
                    continue
                if log.closed:
                    if log.available(consumer):
                        continue
                    if self.error is not None:
                        self.raise_error()
                    return
                await self._wait_data()
        finally:
            self.cache.count("chunks_delivered", delivered)
            remaining = log.detach(consumer)
            self._wake_space()
            if remaining == 0 and self.try_abandon():
                self.abandon()


# ---------------------------------------------------------------------------------------------
# sync


class SyncFlight(FlightCore):
    """A flight shared by threads, pumped by whichever consumer needs the next chunk.

    The pull lock makes one thread at a time read the upstream. Threads with nothing to do
    wait on a condition; every change (a chunk, the end, an acknowledged batch, a consumer
    leaving) is signalled to it, and only when someone waits, so a lone caller never touches
    the condition.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._pull_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._waiters = 0
        self._upstream: Iterator[Any] | None = None
        self._source: Any = None
        self._stream_fn: Callable[[Any], Any] | None = None
        self._messages: Any = None
        self._released = threading.Event()

    def mark_released(self) -> None:
        self._released.set()

    def wait_released(self) -> None:
        self._released.wait()

    def start(self, stream_fn: Callable[[Any], Any], messages: Any) -> None:
        self._stream_fn = stream_fn
        self._messages = messages

    def _signal(self) -> None:
        if self._waiters:
            with self._cond:
                self._cond.notify_all()

    def _pull_one(self) -> None:
        """Reads one upstream chunk (or the end, or an error) into the log. Pull lock held."""
        try:
            if self._upstream is None:
                assert self._stream_fn is not None
                result = self._stream_fn(self._messages)
                if not hasattr(result, "__iter__"):
                    raise TypeError(
                        "get_or_stream needs stream_fn to return an iterable; got "
                        f"{type(result).__name__} (use aget_or_stream for async streams)"
                    )
                self._source = result
                self._upstream = iter(result)
            chunk = next(self._upstream)
        except StopIteration:
            self.finished = True
            self.log.close()
            self._signal()
            try:
                data = self.entry()
                if data is not None:
                    ok = self.cache.manager.set_raw(self.key, data, self.ttl, self.tags)
                    self.stored(ok, data)
            finally:  # even on KeyboardInterrupt: a finished flight must not keep its key
                self.cache.release_slot(self)
            return
        except BaseException as exc:
            self.fail(exc)
            try:
                self._close_upstream()
            finally:
                self.log.close()
                self.cache.release_slot(self)
            return
        self.append(chunk)

    def _pull_if_room(self, consumer: int) -> bool:
        """With the pull lock held: reads the next chunk unless there is one already or the
        stream ended. False if the upstream must wait for a slow consumer."""
        log = self.log
        if log.available(consumer) or log.closed:
            return True
        while log.headroom() == 0:
            if not self.release_laggards():
                return False
        self._pull_one()
        return True

    def _wait(self, consumer: int | None) -> None:
        """Sleeps until something changes; returns at once if it already has."""
        log = self.log
        with self._cond:
            self._waiters += 1
            try:
                # re-checked under the condition's lock: a change signalled before this point
                # is seen here, one signalled after it wakes the wait
                if log.closed or (consumer is not None and log.available(consumer)):
                    return
                if not self._pull_lock.locked() and log.headroom() > 0:
                    return
                self._cond.wait()
            finally:
                self._waiters -= 1

    def _close_upstream(self) -> None:
        """Closes the iterator and the object it came from (an SDK stream holding a socket)."""
        objs = (
            [self._upstream] if self._source is self._upstream else [self._upstream, self._source]
        )
        for obj in objs:
            closer = getattr(obj, "close", None)
            if closer is not None:
                try:
                    closer()
                except Exception as exc:
                    logger.debug("chengeta_ai: closing upstream raised %r", exc)

    def consume(self, consumer: int) -> Iterator[Any]:
        log = self.log
        acked_batch = False
        delivered = 0
        try:
            while True:
                batch = self._read(consumer)
                if acked_batch:  # this read acknowledged the previous batch: maybe room now
                    self._signal()
                acked_batch = bool(batch)
                if batch:
                    delivered += len(batch)
                    yield from batch
                    continue
                if log.closed:
                    if log.available(consumer):
                        continue
                    if self.error is not None:
                        self.raise_error()
                    return
                if self._pull_lock.acquire(blocking=False):
                    try:
                        pulled = self._pull_if_room(consumer)
                    finally:
                        self._pull_lock.release()
                    self._signal()
                    if pulled:
                        continue
                self._wait(consumer)
        finally:
            self.cache.count("chunks_delivered", delivered)
            remaining = log.detach(consumer)
            self._signal()
            if remaining == 0 and self.try_abandon():
                self._abandon()

    def _abandon(self) -> None:
        if self.cache.on_abandon == "cancel":
            self.cache.count("abandoned_cancelled")
            try:
                with self._pull_lock:
                    try:
                        self._close_upstream()
                    finally:
                        self.log.close()
            finally:
                self.cache.release_slot(self)
            return
        self.cache.count("abandoned_finished")
        ctx = contextvars.copy_context()
        threading.Thread(
            target=ctx.run, args=(self._drain,), name="chengeta-drain", daemon=True
        ).start()

    def _drain(self) -> None:
        """Reads the rest of an abandoned stream (on_abandon="finish"), honouring any consumer
        that joined meanwhile."""
        log = self.log
        while not log.closed:
            with self._pull_lock:
                if log.closed:
                    break
                pulled = log.headroom() > 0 or self.release_laggards()
                if pulled:
                    self._pull_one()
            self._signal()
            if not pulled:
                self._wait(None)
