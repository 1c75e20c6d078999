"""Typed, frozen snapshots of the counters behind ``stats()``.

A snapshot is a frozen dataclass: ``stats().hits``, with every field documented here, and a
misspelt name is an ``AttributeError`` (``KeyError`` through the mapping view). It is also a
read-only ``Mapping`` (``stats()["hits"]``, ``dict(stats())``), so code written when ``stats()``
returned a dict keeps working, except that an unknown name is now an error, not a new counter.

The live counters (`Counters`) are made from the same field list: incrementing a counter the
snapshot does not declare raises ``KeyError`` instead of silently creating it.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

__all__ = ["CacheStats", "Counters", "ManagerStats", "counter_names"]

_S = TypeVar("_S", bound="_Snapshot")


class _Snapshot(Mapping[str, Any]):
    """The read-only mapping view every snapshot shares."""

    __slots__ = ()

    def __getitem__(self, name: str) -> Any:
        if name not in self.__dataclass_fields__:  # type: ignore[attr-defined]
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)  # type: ignore[attr-defined]

    def as_dict(self) -> dict[str, Any]:
        """A plain dict (nested snapshots too), e.g. for ``json.dumps``."""
        return {
            name: value.as_dict() if isinstance(value, _Snapshot) else value
            for name, value in ((n, getattr(self, n)) for n in self)
        }


@dataclasses.dataclass(frozen=True, eq=False, slots=True)
class ManagerStats(_Snapshot):
    """`CacheManager.stats()`: value-level reads and writes of one manager."""

    #: `get`/`aget` that found a value.
    hits: int = 0
    #: `get`/`aget` that found nothing (or a corrupt entry).
    misses: int = 0
    #: Entries written (values and streams).
    sets: int = 0
    #: Backend operations that failed (each logged, rate-limited).
    backend_errors: int = 0
    #: Entries that failed their frame or decode checks and were dropped.
    corrupt_entries: int = 0
    #: Values `set` could not encode.
    encode_errors: int = 0
    #: Entries larger than ``max_entry_bytes``, not written.
    oversized_entries: int = 0
    #: The backend's own ``stats()`` (a dict whose keys depend on the backend), or
    #: ``{"error": ...}`` if it failed.
    backend: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, eq=False, slots=True)
class CacheStats(_Snapshot):
    """`StreamingResponseCache.stats()`: what its calls did since it was created."""

    #: Calls answered from a stored entry (status ``hit``).
    hits: int = 0
    #: Calls that led a new upstream stream (status ``miss``; ``refresh`` is counted apart).
    misses: int = 0
    #: Calls that joined a stream already in flight in this process (status ``join``).
    joins: int = 0
    #: Upstream streams started (misses and refreshes).
    streams_led: int = 0
    #: Calls with ``bypass=True`` (status ``bypass``).
    bypasses: int = 0
    #: Calls with ``no_cache`` that led a new stream replacing the entry (status ``refresh``).
    refreshes: int = 0
    #: ``only_if_cached`` calls that raised `CacheMiss`.
    only_if_cached_misses: int = 0
    #: Hits replayed at the recorded pace (``replay="recorded"`` on an entry with timing).
    paced_replays: int = 0
    #: Streams written to the backend.
    stores: int = 0
    #: Bytes of those entries (framed, as stored).
    stored_bytes: int = 0
    #: Chunks of those entries.
    stored_chunks: int = 0
    #: Chunks handed out by hits.
    chunks_replayed: int = 0
    #: Chunks handed out by in-flight streams (to leaders and joiners).
    chunks_delivered: int = 0
    #: Entries that failed their checks on a hit and were dropped (the call streamed afresh).
    corrupt_entries: int = 0
    #: Upstream streams that raised.
    upstream_errors: int = 0
    #: Streams not stored: a chunk could not be encoded.
    not_stored_unserializable: int = 0
    #: Streams not stored: larger than ``max_entry_bytes``.
    not_stored_oversized: int = 0
    #: Streams not stored: ended without their terminal event (see ``is_complete``).
    not_stored_incomplete: int = 0
    #: Streams not stored: the backend write failed or timed out.
    not_stored_backend_error: int = 0
    #: Streams not stored: the end-of-stream step was interrupted.
    not_stored_interrupted: int = 0
    #: Streams not stored: every caller of the stream asked ``no_store``.
    not_stored_no_store: int = 0
    #: Streams not stored: a ``no_cache`` call started a newer stream of the key meanwhile.
    not_stored_superseded: int = 0
    #: Streams not stored: ``delete``/``invalidate``/``clear`` removed their key or tags while
    #: they streamed (a stream begun before a removal is not stored after it).
    not_stored_invalidated: int = 0
    #: Streams whose last consumer left early and that were cancelled.
    abandoned_cancelled: int = 0
    #: Streams whose last consumer left early and that were read to the end (policy).
    abandoned_finished: int = 0
    #: Slow consumers released from holding the upstream back ("detach" policy).
    detaches: int = 0
    #: Consumers that fell behind the retained part of a stream (`ConsumerLagged`).
    lag_errors: int = 0
    #: `RedisFlights`: local flights that followed another process's stream.
    remote_joins: int = 0
    #: `RedisFlights`: streams this process produced for the fleet.
    remote_leads: int = 0
    #: `RedisFlights`: elections or streams that fell back to in-process (Redis failed).
    redis_fallbacks: int = 0
    #: `RedisFlights`: followers that got `UpstreamLost`.
    upstream_lost: int = 0
    #: `RedisFlights`: producers that lost their lease (they neither publish nor store).
    fenced: int = 0
    #: Cached clients: whole (``stream=False``) calls answered from their streamed twin's
    #: entry (`chengeta_ai.clients.assemble`).
    cross_mode_hits: int = 0
    #: Streams in flight in this process now, each reading its upstream (a superseded one
    #: included), not a counter.
    in_flight: int = 0
    #: The manager's counters.
    manager: ManagerStats = dataclasses.field(default_factory=ManagerStats)


def counter_names(snapshot: type[_Snapshot]) -> tuple[str, ...]:
    """The counters of a snapshot type: its int fields except ``in_flight``."""
    return tuple(
        f.name
        for f in dataclasses.fields(snapshot)  # type: ignore[arg-type]
        if f.type in (int, "int") and f.name != "in_flight"
    )


class Counters:
    """Thread-safe counters, exactly those a snapshot type declares."""

    __slots__ = ("_lock", "_values")

    def __init__(self, names: tuple[str, ...]) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(names, 0)

    def add(self, name: str, n: int = 1) -> None:
        """Adds ``n`` to counter ``name``; ``KeyError`` if there is no such counter."""
        with self._lock:
            self._values[name] += n

    def snapshot(self, cls: type[_S], **extra: Any) -> _S:
        with self._lock:
            values = dict(self._values)
        return cls(**values, **extra)

    def get(self, name: str) -> int:
        with self._lock:
            return self._values[name]
