"""In-flight streams shared by every concurrent caller of one key: the sync and async drivers.

A *flight* is one upstream stream being read, with a Rust `ChunkLog` holding its chunks and one
cursor per attached consumer. The first caller of a key leads (it starts the flight); callers
that arrive while it runs join it and replay the log from the first chunk, then follow live.

What a flight *is* (running, finishing, cancelling, failed, done) lives in one state machine,
`flight_state.FlightState`, changed under the flight table's lock; its transitions return the
actions to perform, which the drivers here carry out after releasing the lock:

- `AsyncFlight` is pumped by a background task, so that any consumer (the leader included) can
  be cancelled at any moment without disturbing the upstream read the others depend on.
- `SyncFlight` is pumped cooperatively: whichever thread needs the next chunk and finds nobody
  pulling pulls it; a sync consumer leaves only between chunks.

Both share `Flight`: the log, the encoder, the store decision, the consumer's next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterator
from dataclasses import dataclass
from operator import length_hint
from types import TracebackType
from typing import Any, ClassVar, Literal

import anyio
import anyio.lowlevel
import anyio.to_thread

from chengeta_ai._core import (
    AsyncPump,
    ChunkLog,
    PullLock,
    SoloPull,
    StreamEncoder,
    thread_ident,
)
from chengeta_ai.core.cache_manager import CacheManager, frame
from chengeta_ai.core.stats import Counters
from chengeta_ai.errors import ChengetaError, ConsumerLagged, EncodeError
from chengeta_ai.layers.flight_state import (
    CANCEL,
    CLOSE_LOG,
    DRAIN,
    RELEASE,
    STORE,
    WAKE,
    AbandonPolicy,
    FlightState,
    Phase,
)
from chengeta_ai.layers.flights import FlightTable, Slot, next_sequence
from chengeta_ai.layers.upstream import (
    aiter_sync,
    call_in_reader_thread,
    check_sync_stream,
    not_a_stream,
)
from chengeta_ai.logs import warn
from chengeta_ai.models import report_unregistered
from chengeta_ai.serializers import ChunkSink, Serializer

__all__ = ["AsyncFlight", "Flight", "FlightSettings", "SyncFlight"]

logger = logging.getLogger("chengeta_ai")

SlowConsumerPolicy = Literal["wait", "detach"]

#: Chunks handed to a consumer per read of the log (one Rust call).
READ_BATCH = 256
#: A pump that was never held back yields to the event loop at least this often.
CHECKPOINT_EVERY = 64
#: Streams longer than this are finished (checked, encoded, framed) in a worker thread.
ENTRY_IN_THREAD_ABOVE = 1000
#: Seconds the end-of-stream store may take before it is abandoned (consumers wait for it).
STORE_TIMEOUT = 10.0
#: Size accounted for a chunk the serializer could not encode.
UNENCODED_CHUNK_BYTES = 256
# `ChunkLog.record`'s bits: the push exceeded the byte budget; the consumer took the chunk;
# the core encoder failed on it; the producer has no headroom left.
_OVERFLOWED, _TAKEN, _UNENCODED, _NO_HEADROOM = 1, 2, 4, 8
#: Reasons a stream is not stored that are counted as ``not_stored_<reason>`` and logged
#: (an upstream error and an abandoned stream have counters of their own) ...
_RUNNING = Phase.RUNNING  # looked up once per pulled chunk
#: `SyncFlight._pull_one` found no chunk for its taker (it pulled for the others, or the stream
#: ended, or failed).
_NOT_TAKEN: Any = object()
_LOGGED_REASONS = frozenset(
    {"unserializable", "oversized", "incomplete", "backend_error", "interrupted"}
)
#: ... and those counted without a warning: what a call asked for, not a failure.
_COUNTED_REASONS = _LOGGED_REASONS | {"no_store", "superseded", "invalidated"}


@dataclass(frozen=True, slots=True)
class FlightSettings:
    """Everything a flight needs from the cache that owns it (so it never reaches back)."""

    table: FlightTable
    manager: CacheManager
    serializer: Serializer
    #: Encodes a pristine copy of the chunks for a `chunk_joiner` (None: no joiner).
    copy_serializer: Serializer | None
    chunk_joiner: Callable[[list[Any]], Any] | None
    is_complete: Callable[[list[Any]], bool]
    max_lag: int
    max_entry_bytes: int | None
    slow_consumer: SlowConsumerPolicy
    on_abandon: AbandonPolicy
    counters: Counters
    #: Called with the size of each stored entry (the OpenTelemetry histogram), or None.
    on_stored: Callable[[int], None] | None = None


class Flight:
    """What sync and async flights share: the log, the encoder, the store decision."""

    def __init__(
        self, settings: FlightSettings, slot: Slot, ttl: float | None, tags: tuple[str, ...]
    ) -> None:
        self.settings = settings
        self.count = settings.counters.add
        self.slot = slot
        self.key = slot[1]
        self.ttl = ttl
        self.tags = tags
        #: Orders this flight after the requests made before it (see `FlightTable.join_or_lead`).
        self.seq = next_sequence()
        self.state = FlightState(settings.on_abandon)
        #: See `TableFlight.solo`.
        self.solo = True
        self.log = ChunkLog(settings.max_lag, settings.max_entry_bytes)
        # The stored bytes are encoded as each chunk arrives, before any consumer sees it, so
        # a consumer that edits its chunk objects never changes what is stored. With a joiner,
        # a compact copy is kept instead and the joiner is given objects decoded from it.
        copy = settings.copy_serializer
        self.encoder: ChunkSink | None = (
            copy.stream_encoder() if copy is not None else settings.serializer.stream_encoder()
        )
        #: The encoder when it is the core's: `ChunkLog.record` runs it (one call per chunk).
        #: None for a sink written in Python, which `append` pushes to first.
        self._core_encoder = self.encoder if isinstance(self.encoder, StreamEncoder) else None
        #: encoder.nbytes after the last push (one read of it per chunk, not two)
        self._encoded_bytes = self.encoder.nbytes
        self._record = self.log.record
        self._error_tb: TracebackType | None = None
        self._stored_chunks = 0
        #: Items before the chunks (a cached client's HTTP head): not counted as chunks.
        self.head_items = 0
        #: Called (without the lock) once the flight has ended, after its store: the Redis
        #: producer writes the stream's final record here (`redis_flights`).
        self.on_end: Callable[[Flight], None] | None = None
        #: Called (without the lock) when the flight is abandoned and drained: the Redis
        #: producer's writer asks Redis whether another process still reads the stream.
        self.on_drain: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.key} {self.state!r} chunks={self.log.end}>"

    # -- the state machine: transitions under the table lock, actions after it --------------

    def transition(self, step: Callable[[], int], detail: str = "", *, quiet: bool = False) -> int:
        """Runs one `FlightState` transition under the table lock; counts and logs a new
        reason not to store (at debug level if ``quiet``: already reported once); returns the
        actions the caller must perform."""
        state = self.state
        with self.settings.table.lock:
            before = state.not_stored
            actions = step()
            reason = state.not_stored if before is None else None
        if reason in _COUNTED_REASONS:
            self.count(f"not_stored_{reason}")
            if reason in _LOGGED_REASONS:
                if quiet:
                    logger.debug(
                        "chengeta_ai: stream %s will not be cached (%s)%s",
                        self.key,
                        reason,
                        f": {detail}" if detail else "",
                    )
                else:
                    warn(
                        "chengeta_ai: stream %s will not be cached (%s)%s",
                        self.key,
                        reason,
                        f": {detail}" if detail else "",
                        cause=reason,
                    )
        if actions & CANCEL:
            self.count("abandoned_cancelled")
        elif actions & DRAIN:
            self.count("abandoned_finished")
        return actions

    def perform(self, actions: int) -> None:
        """Carries out the actions that need no waiting (``STORE`` is the pump's own step)."""
        if actions & CANCEL:
            self.cancel_upstream()
        if actions & DRAIN:
            self.drain()
            if self.on_drain is not None:
                self.on_drain()
        if actions & CLOSE_LOG:
            self.log.close()
            self.settings.table.flight_ended(self)
        if actions & RELEASE:
            self.settings.table.release(self)
        if actions & WAKE:
            self.wake()
        if actions & CLOSE_LOG and self.on_end is not None:
            self.on_end(self)

    def on_superseded(self) -> None:
        """A ``no_cache`` call took this flight's key (`FlightTable.join_or_lead`)."""
        if self.state.not_stored == "superseded":
            self.count("not_stored_superseded")

    def on_invalidated(self) -> None:
        """A removal of this flight's key or tags started (`FlightTable.begin_removal`, in
        whichever thread removes): a flight draining for its entry (``on_abandon="finish"``)
        with nobody attached has nothing left to read for, and is cancelled."""
        self.count("not_stored_invalidated")
        log = self.log
        actions = self.transition(lambda: self.state.unstorable_now(log.consumers))
        if actions:
            self.perform_elsewhere(actions)

    def perform_elsewhere(self, actions: int) -> None:
        """`perform`, from a thread that is not this flight's driver."""
        raise NotImplementedError

    def cancel_upstream(self) -> None:
        raise NotImplementedError

    def drain(self) -> None:
        raise NotImplementedError

    def wake(self) -> None:
        raise NotImplementedError

    def on_released(self) -> None:
        raise NotImplementedError

    def start(self, stream_fn: Callable[[Any], Any], messages: Any) -> None:
        """Arranges for the upstream to be read (the leader calls this once)."""
        raise NotImplementedError

    def fail(self, exc: BaseException) -> int:
        """The upstream raised ``exc`` (any `BaseException`) or its read was interrupted:
        every consumer will re-raise it. Returns the actions to perform."""
        if isinstance(exc, GeneratorExit):
            # re-raised in another frame it would read as that generator being closed
            wrapped = ChengetaError(f"the upstream of {self.key} raised GeneratorExit")
            wrapped.__cause__ = exc
            exc = wrapped
        self._error_tb = exc.__traceback__
        actions = self.transition(lambda: self.state.upstream_failed(exc))
        if actions:
            self.count("upstream_errors")
        return actions

    def start_failed(self, exc: BaseException, consumer: int) -> None:
        """The leader could not start the flight (a closed task group): nobody may join it."""
        self.perform(self.fail(exc))
        self.log.detach(consumer)

    def raise_error(self) -> None:
        """Re-raises the upstream's exception in a consumer, with the upstream's traceback:
        not one grown by every consumer that re-raised the same object before."""
        error = self.state.error
        assert error is not None
        raise error.with_traceback(self._error_tb)

    # -- per chunk ----------------------------------------------------------------------------

    def append(self, chunk: Any, taker: int | None = None) -> int:
        """Encodes (for the store) and appends one upstream chunk to the log. With ``taker``
        (a consumer that has read everything before it), hands it the chunk as a read would.
        Returns `ChunkLog.record`'s bits: `TAKEN` if the taker took it, `NO_HEADROOM` if the
        producer must now wait for a slow consumer."""
        if self._core_encoder is not None or self.encoder is None:
            # the common case: encode, append and take in one call into the core
            bits: int = self._record(chunk, self._core_encoder, UNENCODED_CHUNK_BYTES, taker)
        else:
            bits = self._record(chunk, None, self._push_in_python(chunk), taker)
        if bits & (_OVERFLOWED | _UNENCODED):
            self._after_record(bits)
        return bits

    def _push_in_python(self, chunk: Any) -> int:
        """Pushes ``chunk`` to an encoder written in Python; returns the bytes it added."""
        encoder = self.encoder
        assert encoder is not None
        try:
            total = encoder.push(chunk)
            if total is None:  # a sink that does not return its size
                total = encoder.nbytes
        except Exception as exc:  # a cache failure: the chunk is still delivered
            self.encoder = None
            self._cannot_encode(exc)
            return UNENCODED_CHUNK_BYTES
        nbytes = total - self._encoded_bytes
        self._encoded_bytes = total
        return nbytes

    def _after_record(self, bits: int) -> None:
        """The rare outcomes of a `ChunkLog.record`: the core encoder failed on the chunk (it
        was appended all the same), or the log outgrew its byte budget."""
        if bits & _UNENCODED:
            encoder = self._core_encoder
            assert encoder is not None
            self.encoder = self._core_encoder = None
            # the chunk counted in the message is the one that failed (it is in the log now)
            self._cannot_encode(EncodeError(encoder.error or "cannot encode"), self.log.end - 1)
        if bits & _OVERFLOWED:
            self.perform(
                self.transition(
                    self.state.overflowed,
                    f"stream exceeded max_entry_bytes={self.settings.max_entry_bytes}",
                )
            )
        # a flight draining for its entry (on_abandon="finish") with nobody attached has
        # nothing left to read for
        log = self.log
        self.perform(self.transition(lambda: self.state.unstorable_now(log.consumers)))

    def _cannot_encode(self, exc: Exception, index: int | None = None) -> None:
        """Chunk ``index`` (default: the next one) cannot be encoded: the stream is not stored
        (with a `chunk_joiner`, the joiner gets live objects instead of a pristine copy)."""
        if self.settings.copy_serializer is not None:
            # the joiner gets the live objects instead of a pristine copy
            logger.debug("chengeta_ai: no pristine copy of %s for the joiner: %s", self.key, exc)
            return
        self.transition(
            lambda: self.state.keep_from_store("unserializable"),
            f"chunk {self.log.end if index is None else index} cannot be encoded: {exc}",
            # an unregistered class is reported once per class, with the fix
            quiet=report_unregistered(str(exc)),
        )

    # -- per consumer -------------------------------------------------------------------------

    def next_batch(self, consumer: int) -> list[Any] | None:
        """The consumer's next chunks; ``[]`` at the end of the stream, None when it must wait
        for more. Raises the upstream's error after the last chunk, `ConsumerLagged` if the
        consumer's next chunk was dropped."""
        try:
            batch = self.log.read(consumer, READ_BATCH)
        except ConsumerLagged:
            self.count("lag_errors")
            raise
        return batch if batch else self.after_empty_read(consumer)

    def after_empty_read(self, consumer: int) -> list[Any] | None:
        """`next_batch` once a read returned nothing: None while the stream goes on, else what
        the close left (``[]`` at the end; the upstream's error after the last chunk)."""
        log = self.log
        if not log.closed:
            return None
        try:
            # closed after the read: what was pushed before the close is still there
            batch = log.read(consumer, READ_BATCH)
        except ConsumerLagged:
            self.count("lag_errors")
            raise
        if batch:
            return batch
        if self.state.error is not None:
            self.raise_error()
        return batch

    def consumer_left(self, consumer: int, delivered: int) -> int:
        """Detaches a consumer; returns the actions (abandoning the flight if it was the last)."""
        self.count("chunks_delivered", delivered - min(delivered, self.head_items))
        log = self.log
        log.detach(consumer)
        # the count is read under the lock joiners attach under: a caller that joined just now
        # keeps the flight going
        return self.transition(lambda: self.state.consumer_left(log.consumers))

    def release_laggards(self) -> bool:
        """Under the "detach" policy, stops the slowest consumers from holding the upstream
        back; True if any were released."""
        if self.settings.slow_consumer != "detach":
            return False
        released = self.log.release_slowest()
        if released:
            self.count("detaches", released)
        return released > 0

    # -- end of stream ------------------------------------------------------------------------

    def prepare_entry(self) -> tuple[bool, bytes | None]:
        """At the upstream's end: ``(complete, framed entry or None)``. Pure computation (the
        async driver runs it in a worker thread for long streams)."""
        settings = self.settings
        chunks = self.log.snapshot()
        if chunks is None:  # the log no longer holds the stream's start: not stored anyway
            return True, None
        try:
            complete = bool(settings.is_complete(chunks))
        except Exception as exc:
            warn("chengeta_ai: is_complete raised for %s: %r", self.key, exc)
            complete = False
        if not complete or self.state.not_stored is not None:
            return complete, None
        try:
            encoder = self.encoder
            joiner = settings.chunk_joiner
            if joiner is None:
                assert encoder is not None  # storable: every chunk was encoded
                payload = encoder.finish()
            else:
                copy = settings.copy_serializer
                if encoder is not None and copy is not None:
                    pristine = copy.loads(encoder.finish())
                else:
                    pristine = list(chunks)
                payload = settings.serializer.dumps(joiner(pristine))
        except Exception as exc:
            self.transition(
                lambda: self.state.keep_from_store("unserializable"),
                f"cannot encode the stream: {exc}",
            )
            return complete, None
        # the recorded arrival times go with the chunks, not with a joiner's value
        timing = self.log.timing() if joiner is None else None
        data = settings.manager.fit(self.key, frame(payload, written_at=time.time(), timing=timing))
        if data is None:
            self.transition(lambda: self.state.keep_from_store("oversized"))
        self._stored_chunks = len(chunks) - min(len(chunks), self.head_items)
        return complete, data

    def store_outcome(self, ok: bool, data: bytes, superseded: str | None = None) -> int:
        """The write returned ``ok``; ``superseded``: a newer stream of the key was stored
        meanwhile (the entry is not this one)."""
        if ok and superseded is None:
            self.count("stores")
            self.count("stored_bytes", len(data))
            self.count("stored_chunks", self._stored_chunks)
            on_stored = self.settings.on_stored
            if on_stored is not None:
                on_stored(len(data))
        # a failed write is counted (not_stored_backend_error) by the transition
        return self.transition(lambda: self.state.stored(ok, superseded))

    def give_up_store(self, reason: str) -> int:
        """The end-of-stream step was interrupted or timed out: end without storing."""
        return self.transition(lambda: self.state.store_aborted(reason))


# ---------------------------------------------------------------------------------------------
# async


def _known_async(stream_fn: Callable[[Any], Any]) -> bool:
    """``stream_fn`` is an ``async def`` or an async generator function (also through a
    `functools.partial`, a bound method, or an object whose ``__call__`` is one): calling it
    only creates a coroutine or generator, it cannot block."""
    if inspect.iscoroutinefunction(stream_fn) or inspect.isasyncgenfunction(stream_fn):
        return True
    call = getattr(type(stream_fn), "__call__", None)  # noqa: B004 - the class's, not callable()
    return inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)


def _close_quietly(result: Any) -> None:
    """Closes what a ``stream_fn`` returned after its caller was cancelled (its HTTP response,
    a coroutine never awaited); never raises."""
    closer = getattr(result, "close", None)
    if closer is None:
        return
    try:
        closed = closer()
        if inspect.iscoroutine(closed):
            closed.close()
    except Exception as exc:
        logger.debug("chengeta_ai: closing an abandoned upstream raised %r", exc)


async def _call_in_thread(stream_fn: Callable[[Any], Any], messages: Any) -> Any:
    """``stream_fn(messages)`` in a worker thread, within the upstream readers' bound (see
    `call_in_reader_thread`): a sync function may block until the response head (the sync
    SDKs' ``create(..., stream=True)``), which must not freeze the loop. A caller cancelled
    meanwhile leaves at once; what the call returns later is closed, never leaked."""
    return await call_in_reader_thread(functools.partial(stream_fn, messages), _close_quietly)


async def _open_upstream(stream_fn: Callable[[Any], Any], messages: Any) -> Any:
    """Calls ``stream_fn`` and returns the async iterator to read.

    Accepts what users hand us: an async iterator or async generator, an awaitable resolving to
    one (``AsyncOpenAI().chat.completions.create(..., stream=True)``), or a sync iterable: read
    inline if it is in memory (a list), else one ``next()`` at a time in a worker thread (an
    ``openai.Stream`` must not block the loop; see `chengeta_ai.layers.upstream`). A response
    object rather than a stream (``stream=True`` forgotten) raises `TypeError`.

    A ``stream_fn`` that is not known to be async (`_known_async`: a plain function or lambda)
    is called in a worker thread too: it may be the sync SDK's ``create``, which blocks until
    the response head. An ``async def`` / async generator function is called on the loop.
    """
    if _known_async(stream_fn):
        result = stream_fn(messages)
    else:
        result = await _call_in_thread(stream_fn, messages)
    if inspect.isawaitable(result) and not hasattr(result, "__anext__"):
        result = await result
    reason = not_a_stream(result)
    if reason is not None:
        raise TypeError(reason)
    if hasattr(result, "__anext__"):
        return result
    if hasattr(result, "__aiter__"):
        return result.__aiter__()
    if hasattr(result, "__iter__"):
        return aiter_sync(result)
    raise TypeError(
        "stream_fn must return an async iterator, an awaitable of one, or an iterable; "
        f"got {type(result).__name__}"
    )


async def _aclose_upstream(upstream: Any) -> None:
    """Closes an upstream iterator (HTTP response, generator) without letting errors escape."""
    for name in ("aclose", "close"):
        closer = getattr(upstream, name, None)
        if closer is None:
            continue
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                result = closer()
                if inspect.isawaitable(result):
                    await result
        except Exception as exc:
            logger.debug("chengeta_ai: closing upstream raised %r", exc)
        return


class AsyncFlight(Flight):
    """A flight on one event loop, pumped by a background task."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._data: anyio.Event | None = None
        self._space: anyio.Event | None = None
        self._scope = anyio.CancelScope()
        self._released = anyio.Event()

    def on_released(self) -> None:
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

    def wake(self) -> None:
        self._wake_data()
        self._wake_space()

    def cancel_upstream(self) -> None:
        # the pump closes the upstream on its way out, then reports upstream_closed()
        self._scope.cancel()

    def perform_elsewhere(self, actions: int) -> None:
        """On the flight's event loop: at once if this thread runs it, else handed to it."""
        loop = self.slot[0]
        if isinstance(loop, asyncio.AbstractEventLoop):
            if asyncio._get_running_loop() is loop:
                self.perform(actions)
            else:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nothing runs
                    loop.call_soon_threadsafe(self.perform, actions)
            return
        import trio

        try:
            here = trio.lowlevel.current_trio_token() is loop
        except RuntimeError:
            here = False
        if here:
            self.perform(actions)
        else:
            with contextlib.suppress(trio.RunFinishedError):
                loop.run_sync_soon(self.perform, actions)  # type: ignore[attr-defined]

    def drain(self) -> None:
        self._wake_space()  # nobody holds the pump back any more

    async def _wait_data(self) -> None:
        if self._data is None:
            self._data = anyio.Event()
        await self._data.wait()

    async def _wait_space(self) -> None:
        if self._space is None:
            self._space = anyio.Event()
        await self._space.wait()

    def start(self, stream_fn: Callable[[Any], Any], messages: Any) -> None:
        self.settings.table.spawn(self._run, stream_fn, messages)

    async def _run(self, stream_fn: Callable[[Any], Any], messages: Any) -> None:
        # A background task: upstream errors of every kind go to the consumers, never out of
        # this task (a trio system task must not raise); only an outside cancellation
        # propagates, after the consumers were told.
        upstream: Any = None
        ended = False
        cancelled_from_outside: BaseException | None = None
        try:
            with self._scope:
                upstream = await _open_upstream(stream_fn, messages)
                await self._pump(upstream)
                # An upstream that swallowed the cancellation of its read "ends" here: it did
                # not end on its own, so it is not complete.
                await anyio.lowlevel.checkpoint_if_cancelled()
                ended = True
        except anyio.get_cancelled_exc_class() as exc:
            # Cancelled from outside (the cache's task group closing, the run ending).
            cancelled_from_outside = exc
            self.perform(self.fail(ChengetaError(f"the upstream read of {self.key} was cancelled")))
        except BaseException as exc:  # any upstream failure: every consumer re-raises it
            self.perform(self.fail(exc))
        if ended:
            await self._finish()
        else:
            if upstream is not None:
                await _aclose_upstream(upstream)
            # a flight cancelled because it was abandoned frees its key only now
            self.perform(self.transition(self.state.upstream_closed))
        if cancelled_from_outside is not None:
            raise cancelled_from_outside

    async def _finish(self) -> None:
        """Checks and stores a stream that ended; consumers' streams end once it is stored,
        so that a loop shut down right after still keeps it."""
        actions = 0
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + STORE_TIMEOUT
            if self.log.end > ENTRY_IN_THREAD_ABOVE:
                # checking and encoding a long stream takes milliseconds: off the loop
                complete, data = await anyio.to_thread.run_sync(self.prepare_entry)
            else:
                complete, data = self.prepare_entry()
            actions = self.transition(lambda: self.state.upstream_ended(complete))
            if actions & STORE:
                assert data is not None
                actions = await self._store(data)
        if scope.cancelled_caught:
            actions |= self.give_up_store("backend_error")
        self.perform(actions)

    async def _store(self, data: bytes) -> int:
        """`SyncFlight._store`, through the backend's async methods."""
        table = self.settings.table
        refused = table.begin_store(self, (data, self.ttl, self.tags))
        if refused is not None:
            return self.give_up_store(refused)
        manager = self.settings.manager
        writing = True
        try:
            ok = await manager.aset_raw(self.key, data, self.ttl, self.tags)
            superseded, rewrite = table.end_store(self)
            writing = False
            while rewrite is not None:  # overlapping writes: the newest entry lands last
                writing = True
                await manager.arewrite_raw(self.key, rewrite)
                rewrite = table.end_rewrite(self.key)
                writing = False
        finally:
            if writing:
                table.end_rewrite(self.key, may_rewrite=False)
        return self.store_outcome(ok, data, superseded)

    async def _pump(self, upstream: Any) -> None:
        # Per chunk, only what must happen per chunk: the read, one call into the log (encode,
        # append; its bits say whether headroom is left), a wake-up if somebody waits. (No
        # coroutine per chunk: `_hold` is awaited only when the slowest holding consumer is
        # max_lag behind.)
        read = upstream.__anext__
        if self._core_encoder is not None:
            # The loop below, but each chunk read, recorded and announced in Rust (`AsyncPump`
            # drives the upstream's awaitables as `await` does); back here only for what needs
            # this loop's attention, with `ChunkLog.record`'s bits.
            pump = AsyncPump(
                self, read, self.log, self._core_encoder, UNENCODED_CHUNK_BYTES, CHECKPOINT_EVERY
            )
            while True:
                bits = await pump
                if bits < 0:  # the upstream ended
                    if pump.since_checkpoint:
                        await anyio.lowlevel.checkpoint()  # see below
                    return
                if bits & (_OVERFLOWED | _UNENCODED):
                    self._after_record(bits)
                    await anyio.lowlevel.checkpoint_if_cancelled()  # see below
                since = pump.since_checkpoint
                if (bits & _NO_HEADROOM and await self._hold()) or since >= CHECKPOINT_EVERY:
                    if since >= CHECKPOINT_EVERY:
                        await anyio.lowlevel.checkpoint()
                    pump.checkpointed()
        append = self.append
        record = self._record
        since_checkpoint = 0
        while True:
            try:
                chunk = await read()
            except StopAsyncIteration:
                if since_checkpoint:
                    # the consumers take the stream's tail now, not after the store (which
                    # may be a backend round trip): an upstream that never suspends would
                    # otherwise hold up to CHECKPOINT_EVERY chunks back until it is stored
                    await anyio.lowlevel.checkpoint()
                return
            # `append`, inlined for the core encoder (one Python call less per chunk)
            encoder = self._core_encoder
            if encoder is not None:
                bits = record(chunk, encoder, UNENCODED_CHUNK_BYTES)
                if bits & (_OVERFLOWED | _UNENCODED):
                    self._after_record(bits)
                    # cancelled by it (a drain with nothing left to read for): stop now, not
                    # at the next checkpoint an upstream that never suspends may not reach
                    await anyio.lowlevel.checkpoint_if_cancelled()
            else:
                bits = append(chunk)
            if self._data is not None:
                self._wake_data()
            since_checkpoint += 1
            # no task ran since the append: its headroom bit is current
            if (bits & _NO_HEADROOM and await self._hold()) or since_checkpoint >= CHECKPOINT_EVERY:
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

    async def consume(self, consumer: int) -> AsyncGenerator[list[Any], None]:
        """Yields every chunk from the first, in batches, following the pump; raises the
        upstream's error at the end. (Batches: one async-generator hop per batch, not per
        chunk; the caller's generator yields the chunks.)"""
        delivered = 0
        acked = False
        try:
            while True:
                batch = self.next_batch(consumer)
                if acked:  # this read acknowledged the previous batch: maybe room now
                    self._wake_space()
                if batch is None:
                    acked = False
                    await self._wait_data()
                    continue
                if not batch:
                    return
                acked = True
                delivered += len(batch)
                yield batch
        finally:
            actions = self.consumer_left(consumer, delivered)
            self._wake_space()
            self.perform(actions)


# ---------------------------------------------------------------------------------------------
# sync


class SyncFlight(Flight):
    """A flight shared by threads, pumped by whichever consumer needs the next chunk.

    The pull lock makes one thread at a time read the upstream. Threads with nothing to do
    wait on a condition; every change (a chunk, the end, an acknowledged batch, a consumer
    leaving) is signalled to it, and only when someone waits, so a lone caller never touches
    the condition.
    """

    #: A lone consumer's chunks come from `SoloPull` (Rust) when True; False runs the Python
    #: step for every chunk (same behaviour, slower: for tests that watch its Python calls).
    solo_pull: ClassVar[bool] = True

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        # Reentrant, and owned: Ctrl-C (a KeyboardInterrupt raised where CPython runs signal
        # handlers) can land between a non-blocking acquire() returning True and the try that
        # releases it. The consumer leaving then closes the upstream under this same lock
        # (`cancel_upstream`, on this thread: reentrant, so no deadlock), and `consume`'s
        # finally gives back the hold it leaked (`_is_owned`), so no other thread waits forever.
        # A `PullLock` (Rust) has an RLock's semantics, and `SoloPull` takes it without a call
        # into Python. It is owned by an OS thread: where `threading` is monkey-patched (gevent,
        # eventlet: many greenlets on one OS thread), the patched RLock (owned by a greenlet)
        # is taken instead, and every chunk goes through the Python step.
        self._pull_lock: PullLock | threading.RLock = (
            PullLock() if threading.get_ident() == thread_ident() else threading.RLock()
        )
        self._cond = threading.Condition(threading.Lock())
        self._waiters = 0
        self._upstream: Iterator[Any] | None = None
        self._source: Any = None
        self._stream_fn: Callable[[Any], Any] | None = None
        self._messages: Any = None
        self._released = threading.Event()

    def on_released(self) -> None:
        self._released.set()

    def wait_released(self) -> None:
        self._released.wait()

    def start(self, stream_fn: Callable[[Any], Any], messages: Any) -> None:
        self._stream_fn = stream_fn
        self._messages = messages

    def wake(self) -> None:
        if self._waiters:
            with self._cond:
                self._cond.notify_all()

    def cancel_upstream(self) -> None:
        try:
            with self._pull_lock:
                self._close_upstream()
        finally:
            self.perform(self.transition(self.state.upstream_closed))

    def perform_elsewhere(self, actions: int) -> None:
        """In a thread of its own: closing the upstream waits for a read in progress."""
        threading.Thread(
            target=self.perform, args=(actions,), name="chengeta-cancel", daemon=True
        ).start()

    def drain(self) -> None:
        ctx = contextvars.copy_context()
        threading.Thread(
            target=ctx.run, args=(self._drain,), name="chengeta-drain", daemon=True
        ).start()

    def _pull_one(self, taker: int | None = None) -> Any:
        """Reads one upstream chunk (or the end, or an error) into the log. Pull lock held.
        Returns the chunk if consumer ``taker`` took it in hand (see `Flight.append`), else
        `_NOT_TAKEN`.

        The read and the append are one step: whatever interrupts it (an upstream error, a
        KeyboardInterrupt landing after ``next()`` returned) fails the flight, so that no
        consumer and no stored entry silently misses the chunk in between.
        """
        try:
            upstream = self._upstream
            if upstream is None:
                assert self._stream_fn is not None
                result = check_sync_stream(self._stream_fn(self._messages))
                self._source = result
                upstream = self._upstream = iter(result)
            chunk = next(upstream)
            # `append`, inlined for the core encoder (one Python call less per chunk)
            if self._core_encoder is not None:
                bits = self._record(chunk, self._core_encoder, UNENCODED_CHUNK_BYTES, taker)
                if bits & (_OVERFLOWED | _UNENCODED):
                    self._after_record(bits)
            else:
                bits = self.append(chunk, taker)
            if bits & _TAKEN:
                return chunk
        except BaseException as exc:
            self._pull_failed(exc)
        return _NOT_TAKEN

    def _pull_failed(self, exc: BaseException) -> None:
        """`_pull_one`'s read or append raised ``exc``: the end of the stream (`StopIteration`:
        check and store it) or a failure of the flight. Re-raises a Ctrl-C of this thread."""
        if isinstance(exc, StopIteration):
            self._finish()
            return
        interrupted = isinstance(exc, KeyboardInterrupt) and (
            threading.current_thread() is threading.main_thread()
        )
        if interrupted:
            # Ctrl-C landed in the thread that was reading for everyone: the upstream is
            # broken for all, but only this caller was interrupted. The others get a clear
            # error (as an async read cancelled from outside does); this one its Ctrl-C.
            error = ChengetaError(f"the upstream read of {self.key} was interrupted (Ctrl-C)")
            error.__cause__ = exc
            actions = self.fail(error)
        else:
            actions = self.fail(exc)
        try:
            self._close_upstream()
        finally:
            self.perform(actions)
        if interrupted:
            raise exc

    def _finish(self) -> None:
        actions = 0
        try:
            complete, data = self.prepare_entry()
            actions = self.transition(lambda: self.state.upstream_ended(complete))
            if actions & STORE:
                assert data is not None
                actions = self._store(data)
        except BaseException:
            # interrupted while checking or storing (KeyboardInterrupt): the consumers have
            # every chunk; the flight still ends and frees its key
            actions |= self.give_up_store("interrupted")
            raise
        finally:
            self.perform(actions)

    def _store(self, data: bytes) -> int:
        """Writes the entry in its turn (`FlightTable.begin_store`); returns the actions."""
        table = self.settings.table
        refused = table.begin_store(self, (data, self.ttl, self.tags))
        if refused is not None:
            return self.give_up_store(refused)
        manager = self.settings.manager
        writing = True
        try:
            ok = manager.set_raw(self.key, data, self.ttl, self.tags)
            superseded, rewrite = table.end_store(self)
            writing = False
            while rewrite is not None:  # overlapping writes: the newest entry lands last
                writing = True
                manager.rewrite_raw(self.key, rewrite)
                rewrite = table.end_rewrite(self.key)
                writing = False
        finally:
            if writing:
                table.end_rewrite(self.key, may_rewrite=False)
        return self.store_outcome(ok, data, superseded)

    def _pull_if_room(self, consumer: int) -> bool:
        """With the pull lock held: reads the next chunk unless there is one already or the
        stream ended. False if the upstream must wait for a slow consumer."""
        log = self.log
        # the phase first: a Python attribute, where the other two are calls into the log
        if self.state.phase is not _RUNNING or log.available(consumer) or log.closed:
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
                if self._pull_free() and log.headroom() > 0:
                    return
                self._cond.wait()
            finally:
                self._waiters -= 1

    def _pull_free(self) -> bool:
        """Nobody else holds the pull lock (this thread may: it is reentrant)."""
        lock = self._pull_lock
        if lock.acquire(False):
            lock.release()
            return True
        return False

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

    def consume(self, consumer: int) -> Generator[Any, None, None]:
        # A lone caller's miss is handed its chunks by `SoloPull` (Rust): per chunk, one C call
        # runs the pulling branch below (pull lock, checks, upstream read, `ChunkLog.record`),
        # and this frame only delegates to it (`yield from`). It stops wherever that branch
        # would not be the plain case, and the loop below carries on.
        # The loop: a consumer that has read everything pulls the next chunk itself and keeps
        # it in hand: per chunk, the upstream read and one call into the log that encodes,
        # appends and hands it over (`ChunkLog.record`), plus a readiness check unless the
        # flight is solo. Otherwise it reads what the log has for it (`next_batch`, inlined),
        # or pulls, or waits.
        log = self.log
        read = log.read
        ready_to_pull = log.ready_to_pull
        pull_one = self._pull_one
        pull_lock = self._pull_lock
        # positional, bound once: `acquire(blocking=False)` parses a keyword on every chunk
        try_pull, end_pull = pull_lock.acquire, pull_lock.release
        state = self.state
        delivered = 0
        # the batch being handed out: what it still holds was not (counted once, at the end)
        handing: Iterator[Any] = iter(())
        acked = False
        pump: SoloPull | None = None
        # False once the pump is spent or the flight not solo: neither comes back.
        pumping = self.solo_pull
        # True when this generator was closed at a yield (GeneratorExit: `close()`, or the
        # garbage collector finalizing it, possibly in another consumer's thread during that
        # one's upstream read). At a yield this consumer holds no pull lock: a hold of this
        # thread seen then is someone else's, never to be released here.
        closed_at_yield = False
        try:
            while True:
                if pumping:
                    if pump is None and self._upstream is not None:
                        if (
                            self._core_encoder is None
                            or not self.solo
                            or not isinstance(pull_lock, PullLock)  # monkey-patched threading
                        ):
                            pumping = False
                        else:
                            pump = SoloPull(
                                self,
                                self._upstream,
                                log,
                                self._core_encoder,
                                consumer,
                                pull_lock,
                                _RUNNING,
                                UNENCODED_CHUNK_BYTES,
                            )
                    if pump is not None:
                        taken = pump.taken
                        yield from pump
                        if pump.taken != taken:
                            acked = True  # the take acknowledged the previous batch
                        pumping = not pump.spent
                if try_pull(False):
                    try:
                        # Solo (nobody ever joined), this consumer took every chunk it pulled
                        # (`ChunkLog.record`): it has read everything, nobody else is held
                        # back, and the log is open while the phase is RUNNING. (The log
                        # counts the chunk in hand as unacknowledged until the next take: the
                        # only consumer it could hold back is this one.) A caller that joins
                        # after this check joins after this pull, as one that joins between
                        # `ready_to_pull` and the append does.
                        if state.phase is not _RUNNING or not (
                            self.solo or ready_to_pull(consumer)
                        ):
                            chunk = _NOT_TAKEN
                        elif self._upstream is None or self._core_encoder is None:
                            chunk = pull_one(consumer)
                        else:
                            # `_pull_one`'s read-and-append step, inlined for the common case
                            # (an open upstream, the core encoder): one Python call less per
                            # chunk. Whatever interrupts it fails the flight, as there.
                            try:
                                chunk = next(self._upstream)
                                bits = self._record(
                                    chunk, self._core_encoder, UNENCODED_CHUNK_BYTES, consumer
                                )
                                if bits & (_OVERFLOWED | _UNENCODED):
                                    self._after_record(bits)
                                if not bits & _TAKEN:
                                    chunk = _NOT_TAKEN
                            except BaseException as exc:
                                self._pull_failed(exc)
                                chunk = _NOT_TAKEN
                    finally:
                        end_pull()
                    if chunk is not _NOT_TAKEN:
                        if self._waiters:
                            self.wake()
                        acked = True  # the take acknowledged the previous batch
                        delivered += 1
                        yield chunk
                        continue
                batch: list[Any] | None
                try:
                    batch = read(consumer, READ_BATCH)
                except ConsumerLagged:
                    self.count("lag_errors")
                    raise
                if acked and self._waiters:  # this read acknowledged the previous batch
                    self.wake()
                if not batch:
                    batch = self.after_empty_read(consumer)
                    if batch is None:
                        acked = False
                        if pull_lock.acquire(blocking=False):
                            try:
                                pulled = self._pull_if_room(consumer)
                            finally:
                                pull_lock.release()
                            if self._waiters:
                                self.wake()
                            if pulled:
                                continue
                        self._wait(consumer)
                        continue
                    if not batch:
                        return
                acked = True
                delivered += len(batch)
                handing = iter(batch)
                yield from handing
        except GeneratorExit:
            closed_at_yield = True
            raise
        finally:
            if pump is not None:
                delivered += pump.taken
            try:
                actions = self.consumer_left(consumer, delivered - length_hint(handing))
                self.wake()
                self.perform(actions)
            finally:
                # a hold leaked by a Ctrl-C between acquire() and its try (see __init__):
                # at most one, as the loop leaves at the first interruption (an exception
                # raised while this generator runs, never a GeneratorExit at a yield)
                if not closed_at_yield and pull_lock._is_owned():  # type: ignore[union-attr]
                    pull_lock.release()

    def _drain(self) -> None:
        """Reads the rest of an abandoned stream (on_abandon="finish"), honouring any consumer
        that joined meanwhile."""
        log = self.log
        while not log.closed and self.state.phase is Phase.RUNNING:
            with self._pull_lock:
                if log.closed or self.state.phase is not Phase.RUNNING:
                    break
                pulled = log.headroom() > 0 or self.release_laggards()
                if pulled:
                    self._pull_one()
            self.wake()
            if not pulled:
                self._wait(None)
