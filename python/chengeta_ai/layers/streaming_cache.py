"""`StreamingResponseCache`: cache streamed LLM responses and replay them as streams.

- Miss: each upstream chunk reaches the caller as soon as it arrives; the stream is stored once
  it ended normally. An upstream error reaches the caller unchanged and stores nothing; a caller
  that stops early (break, close, cancellation) stores nothing unless other callers share the
  stream or ``on_abandon="finish"``.
- Hit: the stored chunks are replayed, decoded lazily in batches, as equal objects of the same
  types.
- In flight: identical requests arriving while a stream runs join it (see `fanout`).
- The cache never breaks the stream: a backend that fails, a corrupt entry, a chunk that cannot
  be encoded are logged (logger ``chengeta_ai``, rate-limited), counted in `stats()`, and stepped
  around.
- Per call: ``cache_control=`` (`CacheControl`) says what to do; the returned stream's
  ``cache_info`` (`CacheInfo`) says what was done (see `call_controls`).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import (
    AsyncGenerator,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from functools import partial
from itertools import chain
from operator import length_hint
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel

from chengeta_ai._core import decode_timing
from chengeta_ai.core.cache_manager import CacheManager, Entry, check_tags, unframe_entry
from chengeta_ai.core.key_builder import build_key
from chengeta_ai.core.stats import CacheStats, Counters, counter_names
from chengeta_ai.errors import CacheMiss, DecodeError
from chengeta_ai.layers.call_controls import (
    AsyncCacheStream,
    CacheControl,
    CacheInfo,
    CacheStream,
    InfoBox,
)
from chengeta_ai.layers.completeness import sdk_stream_complete
from chengeta_ai.layers.fanout import (
    AsyncFlight,
    FlightSettings,
    SlowConsumerPolicy,
    SyncFlight,
    _aclose_upstream,
    _open_upstream,
)
from chengeta_ai.layers.flight_state import AbandonPolicy
from chengeta_ai.layers.flights import (
    SYNC_SCOPE,
    FlightTable,
    Slot,
    TableFlight,
    current_loop_scope,
    next_sequence,
)
from chengeta_ai.layers.pacing import Pacer, sleep_until
from chengeta_ai.layers.upstream import check_sync_stream
from chengeta_ai.metrics import StreamMetrics, otel_metrics
from chengeta_ai.serializers import CompactSerializer, Serializer, check_serializer, decode_cap

if TYPE_CHECKING:
    from chengeta_ai.layers.redis_flights import RedisFlights

__all__ = ["StreamingResponseCache"]

#: Chunks decoded per Rust call on a hit, and per turn of the event loop on an async hit
#: (~0.1 ms of work). Small on purpose: an OpenAI chunk is 6-9 objects the garbage collector
#: tracks, and CPython runs a young collection every 700 net allocations of such objects. With
#: 64 chunks (~580 objects) per batch, and each batch let go of before the next is decoded, a
#: consumer that does not keep the chunks frees as many objects as the next batch allocates,
#: and the replay triggers almost no collection at all; with 256 it triggered three per batch,
#: each promoting the live batch towards the old generations (see benches/RESULTS.md).
REPLAY_BATCH = 64
#: An unpaced async hit gives the event loop a turn after its first chunk, then at the end
#: of every batch after which another task is ready to run, and otherwise at the end of the
#: first batch that ends this long after its last turn (a task waiting for I/O is only seen
#: ready once the loop polls; see `ready_elsewhere`: on trio, every batch). A turn costs a task
#: switch (on an idle loop ~5 us on asyncio here): once per batch was 6-9 % of a lone fast
#: replay, once per 0.25 ms is ~2 %; with other tasks ready, turns come as often as before.
REPLAY_SLICE = 0.00025


def ready_elsewhere() -> Callable[[], int]:
    """How many other tasks of the running event loop are ready to run now (an unpaced async
    hit gives the loop a turn at the end of a batch when any is): the length of asyncio's
    ready queue (`_ready`, a private attribute of the standard loops). Elsewhere the answer is
    always 1 (a turn per batch): on a loop without that queue (e.g. uvloop), and on trio,
    whose `tasks_runnable` does not count the tasks of the batch it is running, which run
    only once this one yields."""
    loop = asyncio._get_running_loop()
    ready = getattr(loop, "_ready", None) if loop is not None else None
    if isinstance(ready, collections.deque):
        return ready.__len__
    return _one


def _one() -> int:
    return 1


#: Longest recorded timing a paced replay honours (an entry claiming more is refused as corrupt,
#: so that a planted entry cannot make a replay sleep for hours).
MAX_RECORDED_SECONDS = 3600.0
_perf = time.perf_counter


class _Call:
    """One call's resolved arguments and controls."""

    __slots__ = (
        "accept",
        "bypass",
        "head",
        "key",
        "no_cache",
        "no_store",
        "only_if_cached",
        "paced",
        "seq",
        "speed",
        "tags",
        "ttl",
    )

    def __init__(
        self,
        key: str,
        ttl: float | None,
        tags: tuple[str, ...],
        bypass: bool,
        control: CacheControl | None,
    ) -> None:
        self.key = key
        self.ttl = ttl
        self.tags = tags
        self.bypass = bypass
        self.no_cache = control is not None and control.no_cache
        self.no_store = control is not None and control.no_store
        self.only_if_cached = control is not None and control.only_if_cached
        self.paced = control is not None and control.replay == "recorded"
        self.speed = control.speed if control is not None else 1.0
        #: Orders this request before the flights created after it (``no_cache``).
        self.seq = next_sequence()
        #: Items before the chunks (a cached client's HTTP head: 1), not counted as chunks.
        self.head = 0
        #: Whether a stored entry may serve this call, given its first item (None: any);
        #: asked before the hit is counted: a refused entry is corrupt (see `client_stream`).
        self.accept: Callable[[Any], bool] | None = None


class _Handed:
    """A replay's progress: chunks in the batches begun, and the batch being handed out (what
    it still holds was not handed out: counted once, at the end)."""

    __slots__ = ("handing", "replayed")

    def __init__(self) -> None:
        self.replayed = 0
        self.handing: Iterator[Any] = iter(())

    def track(self, batches: Iterator[list[Any]]) -> Iterator[Iterator[Any]]:
        """Each batch's iterator, noted; a batch is emptied once handed out (its chunks are
        let go now, not when the next batch has been decoded)."""
        for batch in batches:
            self.replayed += len(batch)
            self.handing = handing = iter(batch)
            yield handing
            batch.clear()


def _min_bound(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _async_flight(settings: Any, scoped: Any, call: _Call) -> AsyncFlight:
    flight = AsyncFlight(settings, scoped, call.ttl, call.tags)
    flight.head_items = call.head
    return flight


class StreamingResponseCache:
    """Caches streamed responses through a `CacheManager`.

    Args:
        manager: the cache manager (backend, key builder, default TTL).
        serializer: encodes stored streams; the manager's serializer (the compact Rust codec by
            default) if None.
        chunk_joiner: if given, the stored value is ``chunk_joiner(chunks)`` and a hit replays it
            (a list item by item, anything else as a single item); None stores the chunks.
        max_lag: how many chunks the upstream may be read ahead of the slowest consumer that
            holds it back (default 64).
        slow_consumer: ``"detach"`` (default): a consumer ``max_lag`` behind stops holding the
            upstream back and catches up from the retained log at its own pace; ``"wait"``: the
            upstream is read no faster than the slowest consumer.
        on_abandon: when the last consumer of an unfinished stream leaves: ``"cancel"``
            (default) closes the upstream and stores nothing; ``"finish"`` reads it to the end
            in the background and stores it (a stream that will not be stored: ``no_store``,
            superseded by a refresh, oversized, ... is closed as under ``"cancel"``).
        max_entry_bytes: bound on an in-flight stream's retained log and on stored entries;
            defaults to the manager's (16 MiB).
        task_group: an anyio task group to run background pumps in (see ``async with``).
        is_complete: ``is_complete(chunks) -> bool``, whether a stream that ended without error
            is whole and may be stored; the default knows the OpenAI and Anthropic SDK stream
            types (their terminal events) and takes any other stream as complete (see
            `chengeta_ai.layers.completeness`).
        flights: where in-flight streams are shared: None (default) within this process;
            a `RedisFlights` shares them with every process pointed at the same Redis (one
            upstream call per key across the fleet; see `chengeta_ai.layers.redis_flights`).
        meter_provider: an OpenTelemetry ``MeterProvider`` to record metrics with; None (default)
            uses the global one when ``opentelemetry-api`` is installed (a no-op until an SDK is
            configured), else records nothing; False records nothing (see `chengeta_ai.metrics`).
    """

    def __init__(
        self,
        manager: CacheManager,
        serializer: Serializer | None = None,
        chunk_joiner: Callable[[list[Any]], Any] | None = None,
        *,
        max_lag: int = 64,
        slow_consumer: SlowConsumerPolicy = "detach",
        on_abandon: AbandonPolicy = "cancel",
        max_entry_bytes: int | None = None,
        task_group: anyio.abc.TaskGroup | None = None,
        is_complete: Callable[[list[Any]], bool] | None = None,
        flights: RedisFlights | None = None,
        meter_provider: Any = None,
    ) -> None:
        if not isinstance(manager, CacheManager):
            raise TypeError(f"manager must be a CacheManager, got {type(manager).__name__}")
        if chunk_joiner is not None and not callable(chunk_joiner):
            raise TypeError("chunk_joiner must be callable or None")
        if is_complete is not None and not callable(is_complete):
            raise TypeError("is_complete must be callable or None")
        if isinstance(max_lag, bool) or not isinstance(max_lag, int) or max_lag < 1:
            raise ValueError(f"max_lag must be an int >= 1, got {max_lag!r}")
        if slow_consumer not in ("wait", "detach"):
            raise ValueError(f"slow_consumer must be 'wait' or 'detach', got {slow_consumer!r}")
        if flights is not None:
            from chengeta_ai.layers.redis_flights import RedisFlights  # needs redis

            if not isinstance(flights, RedisFlights):
                raise TypeError(
                    f"flights must be a RedisFlights or None, got {type(flights).__name__}"
                )
        if on_abandon not in ("cancel", "finish"):
            raise ValueError(f"on_abandon must be 'cancel' or 'finish', got {on_abandon!r}")
        self.manager = manager
        self.serializer: Serializer = check_serializer(
            serializer if serializer is not None else manager.serializer, streams=True
        )
        self.chunk_joiner = chunk_joiner
        self.max_lag = max_lag
        self.slow_consumer: SlowConsumerPolicy = slow_consumer
        self.on_abandon: AbandonPolicy = on_abandon
        if max_entry_bytes is not None and (
            type(max_entry_bytes) is not int or max_entry_bytes < 1
        ):
            raise ValueError(
                f"max_entry_bytes must be a positive int or None, got {max_entry_bytes!r}"
            )
        self.max_entry_bytes = (
            max_entry_bytes if max_entry_bytes is not None else manager.max_entry_bytes
        )
        #: What one stored entry may decode to (planted or damaged bytes are refused).
        self._decode_cap = decode_cap(self.max_entry_bytes)
        #: The backend hands back the very ``bytes`` object it stored (in-process): a hit
        #: remembers the checked, opened entry by that object's identity, so the next hit of
        #: it skips the checksum, the decompression and the validation.
        self._remember_opened = bool(getattr(manager.backend, "returns_stored_bytes", False))
        #: In-flight streams by (sync or event loop, key), and where their pumps run.
        self.flights = FlightTable(task_group)
        manager.watch_removals(self.flights)
        #: Shares in-flight streams across processes, or None (in-process only).
        self.remote_flights = flights
        #: Tells every process of the removals made here (kept while this cache lives: the
        #: manager holds its listeners weakly).
        self._fleet_removals = None
        if flights is not None:
            self._fleet_removals = flights.removal_listener(
                getattr(manager.key_builder, "namespace", "")
            )
            manager.watch_removals(self._fleet_removals)
        self._counters = Counters(counter_names(CacheStats))
        #: The async paced replays running now, and how they wait (see `pacing`).
        self._pacer = Pacer()
        #: OpenTelemetry instruments, or None.
        self._metrics: StreamMetrics | None = (
            None if meter_provider is False else otel_metrics(meter_provider)
        )
        self._flight_settings = FlightSettings(
            table=self.flights,
            manager=manager,
            serializer=self.serializer,
            # a joiner is given objects decoded from a compact copy taken before any consumer
            # could edit them (see Flight.prepare_entry)
            copy_serializer=CompactSerializer() if chunk_joiner is not None else None,
            chunk_joiner=chunk_joiner,
            is_complete=is_complete if is_complete is not None else sdk_stream_complete,
            max_lag=max_lag,
            # the log retains no more than a store could write: a stream beyond the backend's
            # own max_bytes is known unstorable at once (and an abandoned one stops draining)
            max_entry_bytes=_min_bound(self.max_entry_bytes, manager.store_bound()),
            slow_consumer=slow_consumer,
            on_abandon=on_abandon,
            counters=self._counters,
            on_stored=self._metrics.stored if self._metrics is not None else None,
        )

    def __repr__(self) -> str:
        return f"StreamingResponseCache(manager={self.manager!r}, max_lag={self.max_lag})"

    # -- bookkeeping -------------------------------------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        self._counters.add(name, n)

    def stats(self) -> CacheStats:
        """A typed, frozen snapshot of the counters (see `CacheStats` for each field), with
        ``in_flight`` and the manager's (``manager``). Also a read-only mapping:
        ``stats()["hits"]`` works, and an unknown name is a ``KeyError``."""
        return self._counters.snapshot(
            CacheStats, in_flight=self.flights.live, manager=self.manager.stats()
        )

    # -- background tasks --------------------------------------------------------------------

    async def __aenter__(self) -> StreamingResponseCache:
        """Runs background pumps in a task group owned by this block (structured concurrency)."""
        await self.flights.open_task_group()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        # the body's own exception propagates unchanged (not wrapped in an ExceptionGroup)
        await self.flights.close_task_group()
        return None

    # -- the public twins --------------------------------------------------------------------

    def _prepare(
        self,
        messages: Any,
        stream_fn: Callable[[Any], Any],
        model_id: str,
        params: Any,
        ttl: float | None,
        tags: Iterable[str] | None,
        bypass: bool,
        cache_control: CacheControl | Mapping[str, Any] | None,
        key: str | None = None,
    ) -> _Call:
        if not callable(stream_fn):
            raise TypeError(f"stream_fn must be callable, got {type(stream_fn).__name__}")
        if not isinstance(model_id, str) or not model_id:
            raise TypeError(f"model_id must be a non-empty str, got {model_id!r}")
        if params is not None and not isinstance(params, dict):
            raise TypeError(f"params must be a dict or None, got {type(params).__name__}")
        control = CacheControl.coerce(cache_control)
        partition = None
        if control is not None:
            if bypass and control.only_if_cached:
                raise ValueError("bypass=True and only_if_cached contradict each other")
            if control.ttl is not None:
                if ttl is not None:
                    raise TypeError("ttl given twice (argument and cache_control)")
                ttl = control.ttl
            if control.tags is not None:
                if tags is not None:
                    raise TypeError("tags given twice (argument and cache_control)")
                tags = control.tags
            partition = control.namespace
        if key is None or partition is not None:  # (a key made beforehand has no partition)
            key = build_key(self.manager.key_builder, messages, model_id, params, partition)
        tag_tuple = check_tags(tags) if tags is not None else (f"model:{model_id}",)
        return _Call(key, self.manager.resolve_ttl(ttl), tag_tuple, bypass, control)

    def _open_entry(self, raw: bytes, call: _Call) -> tuple[Entry, Iterator[list[Any]], Any]:
        """``(entry, batches, offsets or None)``; raises `DecodeError` up front if the entry is
        corrupt: the frame's checksum, the timing a paced replay will use, and (compact codec)
        the whole entry's structure, counts and class names, within the decode cap, are checked
        before anything is yielded."""
        remember = self._remember_opened
        entry = unframe_entry(raw, remember=remember)
        offsets = None
        if call.paced and entry.timing is not None:
            offsets = decode_timing(bytes(entry.timing), max_total_seconds=MAX_RECORDED_SECONDS)
        return entry, self._replay_batches(raw, entry, remember, call.accept), offsets

    def _replay_batches(
        self,
        raw: bytes,
        entry: Entry,
        remember: bool,
        accept: Callable[[Any], bool] | None = None,
        batch: int = REPLAY_BATCH,
    ) -> Iterator[list[Any]]:
        """Batches of a stored entry's payload (see `_open_entry`)."""
        serializer = self.serializer
        if isinstance(serializer, CompactSerializer) and type(raw) is bytes:
            # the payload where it lies in the stored bytes: no copy, and an entry the
            # backend hands back again is opened once (see `_remember_opened`)
            batches = serializer.iter_batches_at(
                raw, entry.start, batch, max_decoded_bytes=self._decode_cap, remember=remember
            )
        else:
            batches = serializer.iter_batches(
                bytes(entry.payload), batch, max_decoded_bytes=self._decode_cap
            )
        first = next(batches, [])
        if accept is not None and not (first and accept(first[0])):
            raise DecodeError(
                "not an entry this call can serve (another kind or endpoint, or empty): "
                "not served, the call goes on without it"
            )

        return chain((first,), batches)

    def _started(self, box: InfoBox, info: CacheInfo) -> None:
        box.info = info
        metrics = self._metrics
        if metrics is not None:
            metrics.started(info.status)

    def _first_chunk(self, status: str, t0: float) -> None:
        metrics = self._metrics
        if metrics is not None:
            metrics.first_chunk(status, _perf() - t0)

    def _ended(self, box: InfoBox, info: CacheInfo, outcome: str) -> None:
        box.info = info.ended(outcome)
        metrics = self._metrics
        if metrics is not None:
            metrics.ended(info.status, outcome)

    def _cache_miss(self, call: _Call) -> CacheMiss:
        self.count("only_if_cached_misses")
        return CacheMiss(
            f"{call.key}: not cached and not in flight in this scope (only_if_cached; a stream "
            "of the key on another event loop, or in threads for an async call, is not joined)"
        )

    def client_stream(
        self,
        messages: Any,
        stream_fn: Callable[[Any], Any],
        model_id: str,
        params: dict[str, Any],
        cache_control: CacheControl | None,
        *,
        accept: Callable[[Any], bool],
        is_async: bool,
        key: str | None = None,
    ) -> CacheStream | AsyncCacheStream:
        """`get_or_stream` / `aget_or_stream` for a cached SDK client (`chengeta_ai.clients`):
        its streams start with the HTTP head, which is not a chunk (not counted in
        ``stored_chunks``, ``chunks_delivered``, ``chunks_replayed``), and ``accept(head)``
        says whether a stored entry may serve the call, asked before the hit is counted: a
        refused entry is a corrupt entry (dropped, counted) and the call goes on as a miss.
        ``messages`` is read only to make the key, and handed to ``stream_fn`` (which, for a
        cached client, ignores it: a call with its key made beforehand passes None).
        ``key``: the call's key when the caller made it already (the key `build_key` gives
        ``(messages, model_id, params)`` with no partition: see `ClientCache.split`)."""
        call = self._prepare(
            messages, stream_fn, model_id, params, None, None, False, cache_control, key
        )
        call.head = 1
        call.accept = accept
        box = InfoBox()
        if is_async:
            return AsyncCacheStream(self._aget_or_stream(call, messages, stream_fn, box), box)
        return CacheStream(self._get_or_stream(call, messages, stream_fn, box), box)

    def get_or_stream(
        self,
        messages: Any,
        stream_fn: Callable[[Any], Iterable[Any]],
        model_id: str = "default",
        params: dict[str, Any] | None = None,
        ttl: float | None = None,
        tags: Iterable[str] | None = None,
        *,
        bypass: bool = False,
        cache_control: CacheControl | Mapping[str, Any] | None = None,
    ) -> CacheStream:
        """Yields the response's chunks: replayed on a hit, live (and stored) on a miss.

        ``stream_fn(messages)`` is called only on a miss and must return an iterable of chunks
        (e.g. ``client.chat.completions.create(..., stream=True)``). ``bypass=True`` neither
        joins nor stores: a fresh upstream call. ``cache_control``: per-call directives
        (`CacheControl` or a mapping of its fields). The returned iterator's ``cache_info``
        tells what the cache did (`CacheInfo`). Nothing happens until iteration starts; with
        ``only_if_cached``, the first ``next()`` raises `CacheMiss` if nothing can answer.
        """
        call = self._prepare(
            messages, stream_fn, model_id, params, ttl, tags, bypass, cache_control
        )
        box = InfoBox()
        return CacheStream(self._get_or_stream(call, messages, stream_fn, box), box)

    def _get_or_stream(
        self,
        call: _Call,
        messages: Any,
        stream_fn: Callable[[Any], Iterable[Any]],
        box: InfoBox,
    ) -> Generator[Any, None, None]:
        t0 = _perf()
        key = call.key
        if call.bypass:
            self.count("bypasses")
            info = CacheInfo("bypass", key)
            self._started(box, info)
            outcome = "abandoned"
            upstream = check_sync_stream(stream_fn(messages))
            try:
                yield from upstream
                outcome = "bypass"
            except GeneratorExit:
                raise
            except BaseException as exc:  # any upstream failure, as on a miss
                if not (
                    isinstance(exc, KeyboardInterrupt)
                    and threading.current_thread() is threading.main_thread()
                ):  # not Ctrl-C: this caller did not leave (see SyncFlight._pull_one)
                    outcome = "error"
                raise
            finally:
                # an HTTP stream (openai's Stream) is an iterator, not a generator: close it
                closer = getattr(upstream, "close", None)
                if closer is not None:
                    closer()
                self._ended(box, info, outcome)
            return
        slot = (SYNC_SCOPE, key)
        settings = self._flight_settings
        remote = self.remote_flights

        def new_flight() -> SyncFlight:
            # Started before it enters the table (under its lock): a joiner may pull the
            # upstream as soon as it can see the flight. A refresh reads its own upstream: it
            # must not follow a stream another process started before it (see RedisFlights).
            flight = SyncFlight(settings, slot, call.ttl, call.tags)
            flight.head_items = call.head
            flight.start(
                stream_fn
                if remote is None or call.no_cache
                else remote.sync_upstream(flight, stream_fn),
                messages,
            )
            return flight

        while True:
            found = None
            if not call.no_cache and slot not in self.flights:
                found = self._lookup(key, call)
            if found is None:
                joined = self._join_or_lead(slot, call, new_flight)
                if joined is None:  # only_if_cached found nothing to join
                    # a flight that stored its stream may have ended since the lookup
                    if not call.no_cache:
                        found = self._lookup(key, call)
                    if found is None:
                        raise self._cache_miss(call)
                else:
                    flight, consumer, leads = joined
                    assert isinstance(flight, SyncFlight)
                    if consumer is not None:
                        break
                    flight.wait_released()
                    continue  # the key's flight is gone: its entry may be stored now
            entry, batches, offsets = found
            self.count("hits")
            info = CacheInfo("hit", key, entry.age())
            del found, entry  # see _aget_or_stream
            self._started(box, info)
            if offsets is not None:
                yield from self._replay(key, batches, offsets, call, box, info, t0)
                return
            # Chained in C (`chain.from_iterable` over each batch's iterator): a caller's
            # `next()` resumes this frame only, not a replay generator's as well.
            handed = _Handed()
            outcome = "abandoned"
            try:
                self._first_chunk("hit", t0)  # the first batch is decoded: its chunk is ready
                yield from chain.from_iterable(handed.track(batches))
                outcome = "replayed"
            except DecodeError as exc:  # see _replay
                outcome = "error"
                self.count("corrupt_entries")
                self.manager.drop_corrupt(key, exc)
                raise
            finally:
                replayed = handed.replayed - length_hint(handed.handing)
                self.count("chunks_replayed", replayed - min(replayed, call.head))
                self._ended(box, info, outcome)
            return
        if leads:
            self._count_lead(call)
        else:
            self.count("joins")
        info = CacheInfo("refresh" if leads and call.no_cache else "miss" if leads else "join", key)
        self._started(box, info)
        outcome = "abandoned"
        consume = flight.consume(consumer)
        try:
            # the first chunk apart (time to first chunk), then the rest as before
            for first in consume:
                self._first_chunk(info.status, t0)
                yield first
                yield from consume
                break
            outcome = flight.state.outcome or "stored"
        except GeneratorExit:
            raise
        except BaseException as exc:
            # a Ctrl-C of this caller (not the flight's error: see SyncFlight._pull_one)
            # means it left; anything else is the upstream's error
            interrupted = isinstance(exc, KeyboardInterrupt) and flight.state.error is not exc
            outcome = "abandoned" if interrupted else "error"
            raise
        finally:
            consume.close()
            self._ended(box, info, outcome)

    def _join_or_lead(
        self, slot: Slot, call: _Call, make: Callable[[], TableFlight]
    ) -> tuple[TableFlight, int | None, bool] | None:
        """One attempt at the flight table for ``call``: join the key's flight or lead a new
        one (a flight, the consumer id or None when it must wait for the flight's release,
        whether it leads). ``only_if_cached`` never leads: None when it has nothing to join."""
        flight, consumer, leads = self.flights.join_or_lead(
            slot,
            make,
            store=not call.no_store,
            store_as=(call.ttl, call.tags),
            newer_than=call.seq if call.no_cache else None,
            may_lead=not call.only_if_cached,
        )
        if flight is None or (consumer is None and call.only_if_cached):
            return None
        return flight, consumer, leads

    def _lookup(self, key: str, call: _Call) -> tuple[Entry, Iterator[list[Any]], Any] | None:
        """The stored entry of ``key``, opened and checked (see `_open_entry`), or None; a
        corrupt entry is counted, dropped and None."""
        raw = self.manager.get_raw(key)
        if raw is None:
            return None
        try:
            return self._open_entry(raw, call)
        except DecodeError as exc:
            self.count("corrupt_entries")
            self.manager.drop_corrupt(key, exc)
            return None

    async def _alookup(
        self, key: str, call: _Call
    ) -> tuple[Entry, Iterator[list[Any]], Any] | None:
        """`_lookup` through the backend's async methods."""
        raw = await self.manager.aget_raw(key)
        if raw is None:
            return None
        try:
            return self._open_entry(raw, call)
        except DecodeError as exc:
            self.count("corrupt_entries")
            await self.manager.adrop_corrupt(key, exc)
            return None

    def _count_lead(self, call: _Call) -> None:
        self.count("refreshes" if call.no_cache else "misses")
        self.count("streams_led")

    def _replay(
        self,
        key: str,
        batches: Iterator[list[Any]],
        offsets: list[float],
        call: _Call,
        box: InfoBox,
        info: CacheInfo,
        t0: float,
    ) -> Iterator[Any]:
        """A paced hit (``replay="recorded"``); `_get_or_stream` chains an unpaced one itself."""
        replayed = 0
        # the batch being handed out: what it still holds was not (counted once, at the end)
        handing: Iterator[Any] = iter(())
        outcome = "abandoned"
        try:
            self.count("paced_replays")
            n = len(offsets)
            speed = call.speed
            sleep = time.sleep
            for batch in batches:
                for chunk in batch:
                    if replayed < n:
                        delay = t0 + offsets[replayed] / speed - _perf()
                        if delay > 0:
                            sleep(delay)
                    if not replayed:
                        self._first_chunk("hit", t0)  # after the recorded wait
                    replayed += 1
                    yield chunk
                batch.clear()
            outcome = "replayed"
        except DecodeError as exc:
            # past the checked head of the entry (e.g. a model class this process never
            # registered): drop it so that the next call streams afresh
            outcome = "error"
            self.count("corrupt_entries")
            self.manager.drop_corrupt(key, exc)
            raise
        finally:
            replayed -= length_hint(handing)
            self.count("chunks_replayed", replayed - min(replayed, call.head))
            self._ended(box, info, outcome)

    def aget_or_stream(
        self,
        messages: Any,
        stream_fn: Callable[[Any], Any],
        model_id: str = "default",
        params: dict[str, Any] | None = None,
        ttl: float | None = None,
        tags: Iterable[str] | None = None,
        *,
        bypass: bool = False,
        cache_control: CacheControl | Mapping[str, Any] | None = None,
    ) -> AsyncCacheStream:
        """Async twin of `get_or_stream`, on asyncio and trio.

        ``stream_fn(messages)`` may return an async iterator (an async generator), an awaitable
        resolving to one (``AsyncOpenAI().chat.completions.create(..., stream=True)``), or a
        sync iterable: a list or tuple is read inline, anything else (``openai.Stream``, a
        generator) one ``next()`` at a time in a worker thread, so the loop never blocks. With
        ``only_if_cached``, the first ``__anext__`` raises `CacheMiss` if nothing can answer. A
        paced replay (``replay="recorded"``) sleeps through anyio: the event loop is never
        blocked.
        """
        call = self._prepare(
            messages, stream_fn, model_id, params, ttl, tags, bypass, cache_control
        )
        box = InfoBox()
        return AsyncCacheStream(self._aget_or_stream(call, messages, stream_fn, box), box)

    async def _aget_or_stream(
        self,
        call: _Call,
        messages: Any,
        stream_fn: Callable[[Any], Any],
        box: InfoBox,
    ) -> AsyncGenerator[Any, None]:
        t0 = _perf()
        key = call.key
        if call.bypass:
            self.count("bypasses")
            info = CacheInfo("bypass", key)
            self._started(box, info)
            outcome = "abandoned"
            upstream = await _open_upstream(stream_fn, messages)
            try:
                async for chunk in upstream:
                    yield chunk
                outcome = "bypass"
            except BaseException as exc:  # any upstream failure, as on a miss
                if not isinstance(exc, (GeneratorExit, anyio.get_cancelled_exc_class())):
                    outcome = "error"
                raise
            finally:
                await _aclose_upstream(upstream)
                self._ended(box, info, outcome)
            return
        # (this event loop, key), found out once a flight may be in the table or is needed:
        # `current_loop_scope` asks sniffio, a cost every hit would pay for nothing
        scoped: Slot | None = None
        settings = self._flight_settings
        while True:
            found = None
            if not call.no_cache:
                if scoped is None and len(self.flights):
                    scoped = (current_loop_scope(), key)
                if scoped is None or scoped not in self.flights:
                    found = await self._alookup(key, call)
            if found is None:
                scoped = scoped or (current_loop_scope(), key)
                make = partial(_async_flight, settings, scoped, call)
                joined = self._join_or_lead(scoped, call, make)
                if joined is None:  # see _get_or_stream
                    if not call.no_cache:
                        found = await self._alookup(key, call)
                    if found is None:
                        raise self._cache_miss(call)
                else:
                    flight, consumer, leads = joined
                    assert isinstance(flight, AsyncFlight)
                    if consumer is not None:
                        break
                    await flight.wait_released()
                    continue
            entry, batches, offsets = found
            self.count("hits")
            info = CacheInfo("hit", key, entry.age())
            # the entry and its views are not needed past here (the batches hold the bytes):
            # a sleeping paced replay keeps fewer objects for the garbage collector to walk
            del found, entry
            self._started(box, info)
            replayed = 0
            handing: Iterator[Any] = iter(())  # see _replay
            outcome = "abandoned"
            paced = False
            try:
                if offsets is None:
                    self._first_chunk("hit", t0)
                    # a turn after the first batch (its first chunk: a turn or a cancel check
                    # before it would delay the first chunk by 10-100 us), then:
                    turn = 0.0
                    others: Callable[[], int] | None = None
                    for batch in batches:
                        replayed += len(batch)
                        handing = iter(batch)
                        for chunk in handing:
                            yield chunk
                        batch.clear()  # see _replay
                        # a turn at a batch's end when another task is ready to run (as
                        # often as before), else every REPLAY_SLICE (I/O is polled then)
                        if others is None:
                            others = ready_elsewhere()
                        if others() or _perf() - turn >= REPLAY_SLICE:
                            await anyio.lowlevel.checkpoint()
                            turn = _perf()
                else:
                    self.count("paced_replays")
                    pacer = self._pacer
                    pacer.enter()
                    paced = True
                    n = len(offsets)
                    speed = call.speed
                    for batch in batches:
                        for chunk in batch:
                            if replayed < n:
                                deadline = t0 + offsets[replayed] / speed
                                left = deadline - _perf()
                                if left > 0:
                                    # crowded: the loop's shared timer (pacing.LoopTimer)
                                    if pacer.active > pacer.limit:
                                        await sleep_until(deadline)
                                    else:
                                        await pacer.wait_until(deadline)
                            if not replayed:
                                self._first_chunk("hit", t0)  # after the recorded wait
                            replayed += 1
                            yield chunk
                        batch.clear()
                        await anyio.lowlevel.checkpoint()
                outcome = "replayed"
            except DecodeError as exc:  # see _replay
                outcome = "error"
                self.count("corrupt_entries")
                await self.manager.adrop_corrupt(key, exc)
                raise
            finally:
                if paced:
                    self._pacer.leave()
                replayed -= length_hint(handing)
                self.count("chunks_replayed", replayed - min(replayed, call.head))
                self._ended(box, info, outcome)
            return
        if leads:
            self._count_lead(call)
            remote = self.remote_flights
            try:
                flight.start(
                    stream_fn
                    if remote is None or call.no_cache
                    else remote.async_upstream(flight, stream_fn),
                    messages,
                )
            except BaseException as exc:  # a closed task group: nobody may join a dead flight
                flight.start_failed(exc, consumer)
                raise
        else:
            self.count("joins")
        info = CacheInfo("refresh" if leads and call.no_cache else "miss" if leads else "join", key)
        self._started(box, info)
        outcome = "abandoned"
        consume = flight.consume(consumer)
        # the batch being handed out: the flight counted it whole (see _replay)
        handing = iter(())
        try:
            async for batch in consume:
                if t0:
                    self._first_chunk(info.status, t0)
                    t0 = 0.0
                handing = iter(batch)
                for chunk in handing:
                    yield chunk
            outcome = flight.state.outcome or "stored"
        except GeneratorExit:
            raise
        except BaseException as exc:
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                outcome = "error"
            raise
        finally:
            # close the inner generator now (it detaches the consumer), not at garbage collection
            await consume.aclose()
            undelivered = length_hint(handing)
            if undelivered:
                self.count("chunks_delivered", -undelivered)
            self._ended(box, info, outcome)
