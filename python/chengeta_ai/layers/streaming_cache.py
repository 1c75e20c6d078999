"""`StreamingResponseCache`: cache streamed LLM responses and replay them as streams.

- Miss: each upstream chunk reaches the caller as soon as it arrives; the stream is stored once
  it ended normally. An upstream error reaches the caller unchanged and stores nothing; a caller
  that stops early (break, close, cancellation) stores nothing unless other callers share the
  stream or ``on_abandon="finish"``.
- Hit: the stored chunks are replayed, decoded lazily in batches, as equal objects of the same
  types.
- In flight: identical requests arriving while a stream runs join it (see `fanout`).
- The cache never breaks the stream: a backend that fails, a corrupt entry, a chunk that cannot
  be encoded are logged (logger ``chengeta_ai``), counted in `stats()`, and stepped around.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel

from chengeta_ai.core.cache_manager import CacheManager, _Counters, check_tags, unframe
from chengeta_ai.errors import DecodeError
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
from chengeta_ai.layers.flights import SYNC_SCOPE, FlightTable, current_loop_scope
from chengeta_ai.layers.upstream import check_sync_stream
from chengeta_ai.serializers import CompactSerializer, Serializer, decode_cap

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
            in the background and stores it.
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
        self.serializer: Serializer = serializer if serializer is not None else manager.serializer
        self.chunk_joiner = chunk_joiner
        self.max_lag = max_lag
        self.slow_consumer: SlowConsumerPolicy = slow_consumer
        self.on_abandon: AbandonPolicy = on_abandon
        self.max_entry_bytes = (
            max_entry_bytes if max_entry_bytes is not None else manager.max_entry_bytes
        )
        #: What one stored entry may decode to (planted or damaged bytes are refused).
        self._decode_cap = decode_cap(self.max_entry_bytes)
        #: In-flight streams by (sync or event loop, key), and where their pumps run.
        self.flights = FlightTable(task_group)
        #: Shares in-flight streams across processes, or None (in-process only).
        self.remote_flights = flights
        self._counters = _Counters(
            "hits",
            "misses",
            "joins",
            "streams_led",
            "bypasses",
            "stores",
            "stored_bytes",
            "stored_chunks",
            "chunks_replayed",
            "chunks_delivered",
            "corrupt_entries",
            "upstream_errors",
            "not_stored_unserializable",
            "not_stored_oversized",
            "not_stored_incomplete",
            "not_stored_backend_error",
            "not_stored_interrupted",
            "abandoned_cancelled",
            "abandoned_finished",
            "detaches",
            "lag_errors",
            # RedisFlights (see its module doc): local flights that followed another process's
            # stream / produced for the fleet, elections or streams that fell back to
            # in-process because Redis failed, followers that got UpstreamLost, producers that
            # lost their lease (fenced: they neither publish nor store)
            "remote_joins",
            "remote_leads",
            "redis_fallbacks",
            "upstream_lost",
            "fenced",
            # cached clients: whole (stream=False) calls answered from their streamed twin's
            # entry (`chengeta_ai.clients.assemble`)
            "cross_mode_hits",
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
            max_entry_bytes=self.max_entry_bytes,
            slow_consumer=slow_consumer,
            on_abandon=on_abandon,
            counters=self._counters,
        )

    def __repr__(self) -> str:
        return f"StreamingResponseCache(manager={self.manager!r}, max_lag={self.max_lag})"

    # -- bookkeeping -------------------------------------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        self._counters.add(name, n)

    def stats(self) -> dict[str, Any]:
        """Counters: hits, misses, joins, streams_led, stores, stored_bytes, stored_chunks,
        chunks_delivered, detaches, abandons, lag errors, ...; ``manager``: the manager's."""
        out: dict[str, Any] = dict(self._counters.snapshot())
        out["in_flight"] = len(self.flights)
        out["manager"] = self.manager.stats()
        return out

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
    ) -> tuple[str, float | None, tuple[str, ...]]:
        if not callable(stream_fn):
            raise TypeError(f"stream_fn must be callable, got {type(stream_fn).__name__}")
        if not isinstance(model_id, str) or not model_id:
            raise TypeError(f"model_id must be a non-empty str, got {model_id!r}")
        if params is not None and not isinstance(params, dict):
            raise TypeError(f"params must be a dict or None, got {type(params).__name__}")
        key = self.manager.key_builder.build(messages, model_id, params)
        tag_tuple = check_tags(tags) if tags is not None else (f"model:{model_id}",)
        return key, self.manager.resolve_ttl(ttl), tag_tuple

    def _replay_batches(self, raw: bytes, batch: int = REPLAY_BATCH) -> Iterator[list[Any]]:
        """Batches of a stored entry; raises `DecodeError` up front if it is corrupt: the
        frame's checksum, and (compact codec) the whole entry's structure, counts and class
        names, within the decode cap, are checked before anything is yielded."""
        batches = self.serializer.iter_batches(
            bytes(unframe(raw)), batch, max_decoded_bytes=self._decode_cap
        )
        first = next(batches, [])

        def chained() -> Iterator[list[Any]]:
            yield first
            yield from batches

        return chained()

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
    ) -> Iterator[Any]:
        """Yields the response's chunks: replayed on a hit, live (and stored) on a miss.

        ``stream_fn(messages)`` is called only on a miss and must return an iterable of chunks
        (e.g. ``client.chat.completions.create(..., stream=True)``). ``bypass=True`` neither
        joins nor stores: a fresh upstream call.
        """
        key, ttl, tag_tuple = self._prepare(messages, stream_fn, model_id, params, ttl, tags)
        return self._get_or_stream(key, messages, stream_fn, ttl, tag_tuple, bypass)

    def _get_or_stream(
        self,
        key: str,
        messages: Any,
        stream_fn: Callable[[Any], Iterable[Any]],
        ttl: float | None,
        tags: tuple[str, ...],
        bypass: bool,
    ) -> Iterator[Any]:
        if bypass:
            self.count("bypasses")
            upstream = check_sync_stream(stream_fn(messages))
            try:
                yield from upstream
            finally:
                # an HTTP stream (openai's Stream) is an iterator, not a generator: close it
                closer = getattr(upstream, "close", None)
                if closer is not None:
                    closer()
            return
        slot = (SYNC_SCOPE, key)
        if slot not in self.flights:
            raw = self.manager.get_raw(key)
            if raw is not None:
                try:
                    batches = self._replay_batches(raw)
                except DecodeError as exc:
                    self.count("corrupt_entries")
                    self.manager.drop_corrupt(key, exc)
                else:
                    self.count("hits")
                    yield from self._replay(key, batches)
                    return
        settings = self._flight_settings
        while True:
            flight, consumer, leads = self.flights.join_or_lead(
                slot, lambda: SyncFlight(settings, slot, ttl, tags)
            )
            assert isinstance(flight, SyncFlight)
            if consumer is not None:
                break
            flight.wait_released()
        if leads:
            self.count("misses")
            self.count("streams_led")
            remote = self.remote_flights
            flight.start(
                stream_fn if remote is None else remote.sync_upstream(flight, stream_fn), messages
            )
        else:
            self.count("joins")
        yield from flight.consume(consumer)

    def _replay(self, key: str, batches: Iterator[list[Any]]) -> Iterator[Any]:
        replayed = 0
        try:
            for batch in batches:
                replayed += len(batch)
                yield from batch
                # let go of the chunks now, not when the next batch has been decoded (the
                # serializer's generator still refers to this list while it decodes)
                batch.clear()
        except DecodeError as exc:
            # past the checked head of the entry (e.g. a model class this process never
            # registered): drop it so that the next call streams afresh
            self.count("corrupt_entries")
            self.manager.drop_corrupt(key, exc)
            raise
        finally:
            self.count("chunks_replayed", replayed)

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
    ) -> AsyncIterator[Any]:
        """Async twin of `get_or_stream`, on asyncio and trio.

        ``stream_fn(messages)`` may return an async iterator (an async generator), an awaitable
        resolving to one (``AsyncOpenAI().chat.completions.create(..., stream=True)``), or a
        sync iterable: a list or tuple is read inline, anything else (``openai.Stream``, a
        generator) one ``next()`` at a time in a worker thread, so the loop never blocks.
        """
        key, ttl, tag_tuple = self._prepare(messages, stream_fn, model_id, params, ttl, tags)
        return self._aget_or_stream(key, messages, stream_fn, ttl, tag_tuple, bypass)

    async def _aget_or_stream(
        self,
        key: str,
        messages: Any,
        stream_fn: Callable[[Any], Any],
        ttl: float | None,
        tag_tuple: tuple[str, ...],
        bypass: bool,
    ) -> AsyncIterator[Any]:
        if bypass:
            self.count("bypasses")
            upstream = await _open_upstream(stream_fn, messages)
            try:
                async for chunk in upstream:
                    yield chunk
            finally:
                await _aclose_upstream(upstream)
            return
        slot = (current_loop_scope(), key)
        if slot not in self.flights:
            raw = await self.manager.aget_raw(key)
            if raw is not None:
                try:
                    batches = self._replay_batches(raw)
                except DecodeError as exc:
                    self.count("corrupt_entries")
                    await self.manager.adrop_corrupt(key, exc)
                else:
                    self.count("hits")
                    replayed = 0
                    try:
                        for batch in batches:
                            replayed += len(batch)
                            for chunk in batch:
                                yield chunk
                            batch.clear()  # see _replay
                            # one batch per turn: the loop is never held for a whole stream
                            await anyio.lowlevel.checkpoint()
                    except DecodeError as exc:  # see _replay
                        self.count("corrupt_entries")
                        await self.manager.adrop_corrupt(key, exc)
                        raise
                    finally:
                        self.count("chunks_replayed", replayed)
                    return
        settings = self._flight_settings
        while True:
            flight, consumer, leads = self.flights.join_or_lead(
                slot, lambda: AsyncFlight(settings, slot, ttl, tag_tuple)
            )
            assert isinstance(flight, AsyncFlight)
            if consumer is not None:
                break
            await flight.wait_released()
        if leads:
            self.count("misses")
            self.count("streams_led")
            remote = self.remote_flights
            try:
                flight.start(
                    stream_fn if remote is None else remote.async_upstream(flight, stream_fn),
                    messages,
                )
            except BaseException as exc:  # a closed task group: nobody may join a dead flight
                flight.start_failed(exc, consumer)
                raise
        else:
            self.count("joins")
        consume = flight.consume(consumer)
        try:
            async for batch in consume:
                for chunk in batch:
                    yield chunk
        finally:
            # close the inner generator now (it detaches the consumer), not at garbage collection
            await consume.aclose()
