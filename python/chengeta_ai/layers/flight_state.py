"""The lifecycle of one in-flight stream, as one state machine with no I/O.

Every transition is a method called with the flight table's lock held. It changes the state and
*returns* the actions the caller must perform once the lock is released (the way httpcore's
connection pool and anyio's memory-stream state work): the sync and async drivers in `fanout`
only carry those actions out, so they cannot disagree about what a flight is doing.

States::

    RUNNING ──ended(complete, storable)──▶ FINISHING ──stored()──▶ DONE
       │  └──ended(incomplete or not storable)───────────────────▶ DONE
       ├──failed(exc)────────────────────────────────────────────▶ FAILED
       └──last consumer left, on_abandon="cancel"──▶ CANCELLING ──upstream_closed()──▶ DONE

- RUNNING: the upstream is being read. Joinable while the log holds the whole stream.
- FINISHING: the upstream ended complete; the entry is being stored. Still joinable (the log is
  whole); consumers' streams end once it is stored, so a process that exits right after keeps it.
- CANCELLING: abandoned under ``on_abandon="cancel"``; its upstream is being closed. It keeps its
  key (a key never has two upstreams) but nobody may join it: callers wait for its release.
- FAILED: the upstream raised; every consumer re-raises the error. Nothing is stored.
- DONE: over; consumers drain what the log holds.

A flight occupies its key's slot in the table from its creation until an action ``RELEASE``,
or until a ``no_cache`` call supersedes it (`supersede`: the call leads a newer stream of the key
and takes the slot; the older stream goes on for its consumers and is not stored; the table
orders stores per key across scopes, so a newer stream of the key always wins), or a removal of
its key or tags invalidates it (`invalidate`: the same, reason ``invalidated``). ``storable``
is orthogonal: the first reason a stream cannot be stored is kept in ``not_stored``.

Per-call controls: ``wants_store`` is False while every caller attached so far asked
``no_store``; a caller that joins without it sets it (under the table lock, so before the end
can be decided). A stream that ends complete with ``wants_store`` False is not stored
(reason ``no_store``). Once ended, ``outcome`` tells every consumer what became of the stream.

Across processes (`RedisFlights`), a flight is either the fleet's *producer* of its key (it reads
the real upstream and stores) or a *follower* (its upstream is another process's stream, read
from Redis): a follower never stores, and that is its policy, not a failure (``follower``, set by
`follow`, is not a reason in ``not_stored``). ``publishing``: the flight is the fleet's producer
and other processes may read its stream, so under ``on_abandon="cancel"`` losing the last local
consumer does not cancel: the flight drains, and its Redis writer cancels in the same Lua
script that finds no follower reader registered (`abandoned_everywhere`). The upstream is closed
only when no process has a consumer left.
"""

from __future__ import annotations

import enum
from typing import Literal

__all__ = [
    "CANCEL",
    "CLOSE_LOG",
    "DRAIN",
    "RELEASE",
    "STORE",
    "WAKE",
    "FlightState",
    "Phase",
]

AbandonPolicy = Literal["cancel", "finish"]

# Actions, as bits of a plain int (cheap to combine and test; transitions are rare, the checks
# are not): the driver performs them in this order.
STORE = 1  #: build the entry and write it, then report `stored(ok)`
CANCEL = 2  #: stop reading the upstream and close it, then report `upstream_closed()`
DRAIN = 4  #: read the rest with nobody attached (on_abandon="finish")
CLOSE_LOG = 8  #: close the log: consumers drain it, then end or raise
RELEASE = 16  #: free the key's slot (new callers lead or hit), wake callers waiting for it
WAKE = 32  #: wake consumers waiting for data and a producer waiting for room


class Phase(enum.Enum):
    RUNNING = "running"
    FINISHING = "finishing"
    CANCELLING = "cancelling"
    FAILED = "failed"
    DONE = "done"


class FlightState:
    """The state of one flight. Every method must be called with the table lock held."""

    __slots__ = (
        "abandoned",
        "error",
        "follower",
        "in_slot",
        "not_stored",
        "on_abandon",
        "phase",
        "publishing",
        "wants_store",
    )

    def __init__(self, on_abandon: AbandonPolicy, wants_store: bool = True) -> None:
        self.phase = Phase.RUNNING
        self.on_abandon: AbandonPolicy = on_abandon
        #: True until the flight gives its key's slot back (action RELEASE).
        self.in_slot = True
        #: Why the stream will not be stored (the first reason), or None while it may be.
        self.not_stored: str | None = None
        #: The upstream's exception, once FAILED.
        self.error: BaseException | None = None
        #: The last consumer left before the end (either policy).
        self.abandoned = False
        #: Store policy: a follower reads another process's stream and never stores it.
        self.follower = False
        #: The fleet's producer, publishing to Redis: the cancel decision is the writer's.
        self.publishing = False
        #: Some caller attached to this flight wants it stored (not every one said no_store).
        self.wants_store = wants_store

    def __repr__(self) -> str:
        return (
            f"FlightState({self.phase.value}, in_slot={self.in_slot}, "
            f"not_stored={self.not_stored!r}, abandoned={self.abandoned}, "
            f"follower={self.follower})"
        )

    # -- queries ----------------------------------------------------------------------------

    @property
    def joinable(self) -> bool:
        """A new caller may attach: the stream is live or storing and the log holds it whole."""
        return self.in_slot and self.phase in (Phase.RUNNING, Phase.FINISHING)

    @property
    def ended(self) -> bool:
        return self.phase in (Phase.FAILED, Phase.DONE)

    @property
    def outcome(self) -> str | None:
        """What became of the stream, once it ended: ``"stored"``, ``"follower"`` (another
        process produced and stores it), or the reason it was not stored; None before."""
        if not self.ended:
            return None
        if self.not_stored is not None:
            return self.not_stored
        return "follower" if self.follower else "stored"

    # -- transitions ------------------------------------------------------------------------

    def keep_from_store(self, reason: str) -> bool:
        """The stream cannot be stored (``reason``: unserializable, oversized, incomplete, ...).
        True if this is the first reason (the caller counts and logs it)."""
        if self.not_stored is not None:
            return False
        self.not_stored = reason
        return True

    def follow(self, follower: bool = True) -> None:
        """Sets the store policy: a follower (True) reads another process's stream and does
        not store it; a producer (False, after winning a new election) stores as usual."""
        self.follower = follower

    def supersede(self) -> None:
        """A ``no_cache`` call leads a newer stream of this key and takes the slot: this one
        goes on for its consumers, joinable by nobody, and is not stored if still running (a
        finishing one's store is skipped or written over: `FlightTable.begin_store`)."""
        if self.phase is Phase.RUNNING:
            self.keep_from_store("superseded")
        self.in_slot = False

    def invalidate(self) -> bool:
        """A removal of this flight's key or tags started (`FlightTable.begin_removal`): the
        stream goes on for its consumers, joinable by nobody, and is not stored (a finishing
        one's store is refused or undone by the table). True if this is the first reason it
        is not stored (the caller counts it)."""
        self.in_slot = False
        if self.phase is Phase.RUNNING:
            return self.keep_from_store("invalidated")
        return False

    def overflowed(self) -> int:
        """The log stopped retaining the whole stream: it is no longer stored and new callers
        of the key lead their own upstream instead of joining one they cannot replay."""
        self.keep_from_store("oversized")
        if self.in_slot and self.phase is Phase.RUNNING:
            self.in_slot = False
            return RELEASE
        return 0

    def consumer_left(self, remaining: int) -> int:
        """A consumer detached and ``remaining`` are attached: with none left before the end,
        the flight is abandoned: drained under ``on_abandon="finish"`` when the stream will be
        stored, cancelled otherwise (a stream that cannot or need not be stored is not read to
        its end for nobody)."""
        if remaining or self.phase is not Phase.RUNNING or self.abandoned:
            return 0
        self.abandoned = True
        # "finish" reads the rest only for the entry it will store: not for a follower (its
        # producer stores), a stream nobody attached wants stored (no_store), or one that can
        # no longer be stored (superseded, oversized, ...). A publishing producer drains for
        # the other processes reading it (its Redis writer decides when to cancel).
        if not self.follower and (
            self.publishing
            or (self.on_abandon == "finish" and self.wants_store and self.not_stored is None)
        ):
            return DRAIN
        self.phase = Phase.CANCELLING
        self.keep_from_store("abandoned")
        return CANCEL

    def unstorable_now(self, remaining: int) -> int:
        """The stream just became unstorable (oversized, unserializable) while it runs: an
        abandoned flight that was draining for its entry (``on_abandon="finish"``) and that
        ``remaining`` consumers did not rejoin is cancelled now (nothing left to read it for;
        a publishing producer drains for the other processes, as in `consumer_left`)."""
        if (
            not self.abandoned
            or remaining
            or self.phase is not Phase.RUNNING
            or self.not_stored is None
            or self.publishing
            or self.follower
        ):
            return 0
        self.phase = Phase.CANCELLING
        return CANCEL

    def abandoned_everywhere(self, remaining: int) -> int:
        """A publishing flight found no consumer left in any process (its writer wrote the
        cancel record), or stopped publishing (``publishing`` was cleared): under "cancel", an
        abandoned flight that ``remaining`` local consumers did not rejoin is cancelled now."""
        if (
            self.on_abandon != "cancel"
            or not self.abandoned
            or remaining
            or self.phase is not Phase.RUNNING
        ):
            return 0
        self.phase = Phase.CANCELLING
        self.keep_from_store("abandoned")
        return CANCEL

    def upstream_ended(self, complete: bool) -> int:
        """The upstream ended without error; ``complete``: it carried its terminal event."""
        if self.phase is Phase.CANCELLING:
            return self.upstream_closed()
        if self.phase is not Phase.RUNNING:
            return 0
        if not complete:
            self.keep_from_store("incomplete")
        elif not self.wants_store:
            self.keep_from_store("no_store")
        if self.not_stored is None and not self.follower:
            self.phase = Phase.FINISHING
            return STORE
        return self._end(Phase.DONE)

    def upstream_failed(self, error: BaseException) -> int:
        """The upstream raised, or its read was interrupted: every consumer re-raises
        ``error``; returns 0 if the flight had already ended (the error is not theirs)."""
        if self.phase is not Phase.RUNNING and self.phase is not Phase.FINISHING:
            return 0  # a cancelling flight ends when its upstream is closed, as usual
        self.error = error
        self.keep_from_store("error")
        return self._end(Phase.FAILED)

    def stored(self, ok: bool = True, superseded: str | None = None) -> int:
        """The entry was written; ``ok`` False: the write failed (fail-open: the stream ends,
        not stored, reason ``backend_error``); ``superseded``: why the entry written is not
        the key's any more (``superseded``: a newer stream of the key was stored over it;
        ``invalidated``: a removal of the key started during the write)."""
        if self.phase is not Phase.FINISHING:
            return 0
        if not ok:
            self.keep_from_store("backend_error")
        elif superseded is not None:
            self.keep_from_store(superseded)
        return self._end(Phase.DONE)

    def store_aborted(self, reason: str) -> int:
        """The end-of-stream check or store was interrupted or timed out: end, not stored
        (the consumers have every chunk)."""
        if self.phase is not Phase.RUNNING and self.phase is not Phase.FINISHING:
            return 0
        self.keep_from_store(reason)
        return self._end(Phase.DONE)

    def upstream_closed(self) -> int:
        """A cancelled flight's upstream is closed: the key is free."""
        if self.phase is not Phase.CANCELLING:
            return 0
        return self._end(Phase.DONE)

    def _end(self, phase: Phase) -> int:
        self.phase = phase
        actions = CLOSE_LOG | WAKE
        if self.in_slot:
            self.in_slot = False
            actions |= RELEASE
        return actions
