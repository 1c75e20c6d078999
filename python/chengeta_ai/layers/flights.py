"""The table of in-flight streams: which flight a key's callers join, and where pumps run.

One lock guards the table *and* every flight's `FlightState`, so that "join this flight" and
"this flight is abandoned / ended" can never interleave: a caller either attached before the
transition (and the flight goes on for it) or sees its outcome.

Flights are keyed by ``(scope, key)``: the scope is ``"sync"`` for threads, or the running event
loop (flights never cross loops, because waiting across them would need a thread per waiter).

Stores are ordered per key across every scope (`begin_store`, `end_store`): the newest stream
wins. A flight never stores once a newer flight of its key began storing or a newer ``no_cache``
refresh of its key started, in any scope; and a write already under way when a newer one is made
cannot be recalled, so when two writes of a key overlap, the last to return writes the newest
entry again. O(1) per flight and per store, nothing per chunk.

Removals through the manager (`CacheManager.delete`, ``invalidate``, ``clear``) take part in the
same order (`begin_removal`): a stream of a removed key or tag that is in flight when the
removal starts is not stored after it (reason ``invalidated``; its callers still get every
chunk) and is joined by nobody (later callers lead a fresh stream). A write of such a stream
already under way cannot be recalled: the removal marks the key so that the last write of it to
return removes it again (or writes the entry of a newer stream, begun after the removal), and
the removal waits for that (`wait_writes`, bounded) before it returns. O(live flights) per
removal, nothing per store or chunk.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import anyio
import anyio.abc
import sniffio

from chengeta_ai._core import ChunkLog
from chengeta_ai.layers.flight_state import FlightState

__all__ = [
    "SYNC_SCOPE",
    "FlightTable",
    "StoreEntry",
    "TableFlight",
    "current_loop_scope",
    "next_sequence",
]

SYNC_SCOPE = "sync"

#: Orders requests and flights: a flight started after a request has a larger number
#: (``no_cache`` joins only those). ``next()`` on a count is atomic under the GIL.
next_sequence = itertools.count(1).__next__

Slot = tuple[object, str]
#: What a store writes: ``(framed entry, ttl, tags)``; empty bytes for a removal (`removal`).
StoreEntry = tuple[bytes, float | None, tuple[str, ...]]


def removal(tags: tuple[str, ...]) -> StoreEntry:
    """The "entry" a removal writes (the last of the writes it raced removes the key again);
    ``tags``: those of the entry it removes, so that a later removal matching them waits too."""
    return (b"", None, tags)


#: Whether a removal covers the entry of a key stored with these (caller's) tags.
RemovalMatch = Callable[[str, tuple[str, ...]], bool]


class _KeyStores:
    """The store order of one key, across scopes (see the module docstring)."""

    __slots__ = ("entry", "flights", "newest", "overlapped", "removed", "writers")

    def __init__(self) -> None:
        #: Flights of the key that have not ended, in every scope (the record lives as long).
        self.flights = 0
        #: The sequence of the newest refresh started or store begun: older flights never store.
        self.newest = 0
        #: Writes of the key under way.
        self.writers = 0
        #: What the newest store begun writes, kept while writes are under way.
        self.entry: StoreEntry | None = None
        #: Two writes were under way at once: the last to return writes `entry` again.
        self.overlapped = False
        #: The sequence of the newest removal of the key: flights older than it were
        #: invalidated (their outcome), not superseded.
        self.removed = 0


class TableFlight(Protocol):
    """What the table needs of a flight."""

    slot: Slot
    state: FlightState
    log: ChunkLog
    #: `next_sequence()` when the flight was created.
    seq: int
    #: What the entry is stored with: the first caller that wanted it stored gives them.
    ttl: float | None
    tags: tuple[str, ...]
    #: No caller has joined the flight (its leader is its only consumer): cleared, under the
    #: table lock, by the first join. The sync driver's leader then skips a readiness check
    #: per chunk (`SyncFlight.consume`).
    solo: bool

    def on_released(self) -> None: ...

    def on_superseded(self) -> None: ...

    def on_invalidated(self) -> None: ...

    def count(self, name: str, n: int = 1) -> None: ...


def current_loop_scope() -> object:
    """Identifies the running event loop."""
    if sniffio.current_async_library() == "trio":
        import trio

        return trio.lowlevel.current_trio_token()
    return asyncio.get_running_loop()


class FlightTable:
    """In-flight streams by slot, the lock of their states, and the task group pumps run in."""

    #: A local removal listener (`CacheManager.watch_removals`), not a remote announcer.
    remote = False

    def __init__(self, task_group: anyio.abc.TaskGroup | None = None) -> None:
        #: Guards the table and every flight's state (see the module docstring).
        self.lock = threading.Lock()
        self._flights: dict[Slot, TableFlight] = {}
        self._task_group = task_group
        self._own_task_group: anyio.abc.TaskGroup | None = None
        self._asyncio_tasks: set[asyncio.Task[Any]] = set()
        #: The store order of each key with a flight alive, in any scope.
        self._stores: dict[str, _KeyStores] = {}
        #: Signalled when a write ends while a removal waits for the writes it raced.
        self._writes_done = threading.Condition(self.lock)
        self._removals_waiting = 0
        #: The sequence of the newest removal (`begin_removal`).
        self._last_removal = 0
        #: Keys whose last write after a removal was interrupted before undoing itself.
        self._orphaned_undos: set[str] = set()
        #: Flights created and not ended: in a slot or not (superseded, private), they hold an
        #: upstream open (``stats().in_flight``).
        self.live = 0

    def __len__(self) -> int:
        return len(self._flights)

    def __contains__(self, slot: Slot) -> bool:
        return slot in self._flights

    def values(self) -> Iterator[TableFlight]:
        with self.lock:
            return iter(list(self._flights.values()))

    def join_or_lead(
        self,
        slot: Slot,
        make: Callable[[], TableFlight],
        *,
        store: bool = True,
        store_as: tuple[float | None, tuple[str, ...]] | None = None,
        newer_than: int | None = None,
        may_lead: bool = True,
    ) -> tuple[TableFlight | None, int | None, bool]:
        """Attaches to the slot's flight, or creates one and attaches as its leader.

        Returns ``(flight, consumer, leads)``; ``consumer`` is None when the slot's flight is
        winding down (being cancelled): wait for its release, then call again. Per-call
        controls: ``store`` False (``no_store``) does not make the flight want storing; a
        caller that makes a ``no_store`` leader's flight want storing gives it its
        ``store_as`` (ttl, tags);
        ``newer_than`` (``no_cache``: the request's sequence number) joins only a flight created
        after it, and supersedes an older one (`FlightState.supersede`) to lead a new one; with
        ``store`` False too it supersedes nothing and leads a flight outside the table;
        ``may_lead`` False (``only_if_cached``) returns ``(None, None, False)`` instead of
        leading.
        """
        superseded: TableFlight | None = None
        invalidated: TableFlight | None = None
        private = False
        try:
            with self.lock:
                flight = self._flights.get(slot)
                if flight is not None:
                    if not flight.state.joinable:
                        return flight, None, False
                    if newer_than is not None and flight.seq < newer_than:
                        if store:
                            flight.state.supersede()
                            superseded = flight
                        else:
                            # no_cache + no_store stores nothing: superseding would only lose
                            # the other callers' stream. It reads its own, which nobody joins.
                            private = True
                    else:
                        consumer = flight.log.attach()
                        if consumer is not None:
                            flight.solo = False
                            if store and not flight.state.wants_store:
                                flight.state.wants_store = True
                                if store_as is not None:
                                    flight.ttl, flight.tags = store_as
                                if flight.seq < self._last_removal:
                                    # a removal ran since this stream began, matched against
                                    # the tags it had then: it may cover the ones it takes now
                                    if flight.state.keep_from_store("invalidated"):
                                        invalidated = flight
                            return flight, consumer, False
                    # the log stopped retaining the stream's start: lead a new one
                if not may_lead:
                    return None, None, False
                flight = make()
                consumer = flight.log.attach()
                assert consumer is not None
                flight.state.wants_store = store
                if private:
                    flight.state.in_slot = False
                else:
                    self._flights[slot] = flight
                order = self._stores.get(slot[1])
                if order is None:
                    order = self._stores[slot[1]] = _KeyStores()
                order.flights += 1
                self.live += 1
                if newer_than is not None and store:
                    # a refresh: no older stream of the key stores, in any scope
                    order.newest = max(order.newest, flight.seq)
                return flight, consumer, True
        finally:
            if superseded is not None:
                superseded.on_superseded()
            if invalidated is not None:
                invalidated.count("not_stored_invalidated")

    def release(self, flight: TableFlight) -> None:
        """Frees the flight's slot (action RELEASE): new callers of its key lead or hit."""
        with self.lock:
            if self._flights.get(flight.slot) is flight:
                del self._flights[flight.slot]
        flight.on_released()

    def flight_ended(self, flight: TableFlight) -> None:
        """The flight ended (action ``CLOSE_LOG``): it will not store any more."""
        key = flight.slot[1]
        with self.lock:
            self.live -= 1
            order = self._stores.get(key)
            if order is not None:
                order.flights -= 1
                if order.flights <= 0 and not order.writers:
                    del self._stores[key]

    def begin_store(self, flight: TableFlight, entry: StoreEntry) -> str | None:
        """The flight is about to write ``entry``: None if it may, else why it must not:
        ``"superseded"`` (a newer flight of its key began storing or a newer refresh of it
        started, in any scope) or ``"invalidated"`` (a removal of its key or tags started
        after the flight)."""
        key = flight.slot[1]
        with self.lock:
            order = self._stores.get(key)
            if order is None:  # pragma: no cover - a flight is counted from its creation
                order = self._stores[key] = _KeyStores()
                order.flights = 1
            if flight.seq < order.newest:
                return "invalidated" if flight.seq < order.removed else "superseded"
            order.newest = flight.seq
            # a newer entry is written over whatever an interrupted write left
            self._orphaned_undos.discard(key)
            order.entry = entry
            order.writers += 1
            if order.writers > 1:
                order.overlapped = True
            return None

    def end_store(
        self, flight: TableFlight, *, may_rewrite: bool = True
    ) -> tuple[str | None, StoreEntry | None]:
        """The flight's write (begun by `begin_store`) returned: ``(superseded, rewrite)``.
        ``superseded``: None if the entry written is still the key's newest, else
        ``"superseded"`` (a newer flight of the key began storing meanwhile, or a newer
        refresh started) or ``"invalidated"`` (a removal of the key started meanwhile).
        ``rewrite``: this was the last of overlapping writes (or of writes a removal raced);
        the caller must write this newest entry again (empty bytes: remove the key), since an
        older write may have landed after it, then call `end_rewrite`. ``may_rewrite`` False
        (interrupted): the next write of the key does it."""
        key = flight.slot[1]
        with self.lock:
            order = self._stores[key]
            superseded = None
            if flight.seq < order.newest:
                superseded = "invalidated" if flight.seq < order.removed else "superseded"
            return superseded, self._end_write(key, order, may_rewrite)

    def _end_write(self, key: str, order: _KeyStores, may_rewrite: bool) -> StoreEntry | None:
        """One write of ``key`` returned (lock held): what the caller must write again."""
        order.writers -= 1
        rewrite = None
        if not order.writers:
            if order.overlapped and may_rewrite:
                order.overlapped = False
                order.writers = 1
                rewrite = order.entry
            elif not order.overlapped:
                order.entry = None
                if order.flights <= 0:
                    del self._stores[key]
            elif order.entry is not None and not order.entry[0]:
                # the last write was interrupted (cancelled, timed out) before it could undo
                # itself after a removal: the removal waiting for it does (`undo_orphans`)
                order.overlapped = False
                order.entry = None
                self._orphaned_undos.add(key)
                if order.flights <= 0:
                    del self._stores[key]
            if self._removals_waiting:
                self._writes_done.notify_all()
        return rewrite

    def end_rewrite(self, key: str, *, may_rewrite: bool = True) -> StoreEntry | None:
        """A write `end_store` or this returned as ``rewrite`` is done: what must be written
        next, if another write overlapped it."""
        with self.lock:
            return self._end_write(key, self._stores[key], may_rewrite)

    # -- removals (CacheManager.delete / invalidate / clear) ----------------------------------

    def begin_removal(self, matches: RemovalMatch, key: str | None = None) -> list[str]:
        """A removal of the entries ``matches`` covers is about to start: flights of those
        keys (by key and caller's tags) are invalidated: not stored, joined by nobody (see the
        module docstring). Returns the keys with a write under way that the removal raced:
        the last of those writes to return removes the key again (`removal`), and
        `wait_writes` waits for that. The removal holds nothing: interrupted anywhere, it
        leaves the table consistent."""
        seq = next_sequence()
        invalidated: list[TableFlight] = []
        racing: list[str] = []
        with self.lock:
            self._last_removal = seq
            for slot, flight in list(self._flights.items()):
                if flight.state.joinable and matches(slot[1], flight.tags):
                    del self._flights[slot]
                    if flight.state.invalidate():
                        invalidated.append(flight)
                    self._invalidate_key(slot[1], seq)
            for key, order in self._stores.items():
                entry = order.entry
                if not order.writers or entry is None:
                    continue
                if order.newest == seq or (entry[0] and matches(key, entry[2])):
                    # a write under way of a stream this removal covers (in its slot above, or
                    # out of it: superseded)
                    self._invalidate_key(key, seq)
                    order.overlapped = True
                    order.entry = removal(entry[2])
                    racing.append(key)
                elif not entry[0] and matches(key, entry[2]):
                    # an earlier removal's undo is pending: nothing to add, but this removal
                    # too returns only once it is done
                    racing.append(key)
        for flight in invalidated:
            flight.on_invalidated()
        return racing

    def _invalidate_key(self, key: str, seq: int) -> None:
        order = self._stores.get(key)
        if order is not None and order.newest < seq:
            order.newest = order.removed = seq

    def writes_under_way(self, racing: list[str]) -> bool:
        """Whether a write of one of the keys `begin_removal` returned is still under way
        (its undo included)."""
        with self.lock:
            return any(self._writing(key) for key in racing)

    def _writing(self, key: str) -> bool:
        order = self._stores.get(key)
        return order is not None and order.writers > 0

    def undo_orphans(self, racing: list[str]) -> list[str]:
        """Of the keys a removal raced, those whose last write was interrupted before it could
        remove the key again (`_end_write`): the removal removes them itself."""
        with self.lock:
            orphans = [key for key in racing if key in self._orphaned_undos]
            self._orphaned_undos.difference_update(orphans)
        return orphans

    def wait_writes(self, racing: list[str], timeout: float) -> bool:
        """Blocks until no write of the ``racing`` keys is under way (the last one has undone
        itself), at most ``timeout`` seconds; True if none is left."""
        deadline = time.monotonic() + timeout
        with self._writes_done:
            self._removals_waiting += 1
            try:
                while any(self._writing(key) for key in racing):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._writes_done.wait(left)
                return True
            finally:
                self._removals_waiting -= 1

    # -- where pumps run ----------------------------------------------------------------------

    async def open_task_group(self) -> None:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._own_task_group = tg

    async def close_task_group(self) -> None:
        tg, self._own_task_group = self._own_task_group, None
        assert tg is not None
        tg.cancel_scope.cancel()
        # pumps never raise anything but the cancellation this scope catches
        await tg.__aexit__(None, None, None)

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        """Starts a pump: in the given or owned task group, else as a loop-level task
        (asyncio) or a trio system task, which ends with ``trio.run``."""
        tg = self._task_group or self._own_task_group
        if tg is not None:
            tg.start_soon(fn, *args)
            return
        library = sniffio.current_async_library()
        if library == "asyncio":
            task = asyncio.get_running_loop().create_task(fn(*args))
            self._asyncio_tasks.add(task)
            task.add_done_callback(self._asyncio_tasks.discard)
        elif library == "trio":
            import trio

            trio.lowlevel.spawn_system_task(fn, *args, context=contextvars.copy_context())
        else:  # pragma: no cover - anyio supports only these two
            raise RuntimeError(f"unsupported async library {library!r}")
