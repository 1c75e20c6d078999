"""`SoloPull` (Rust): a lone sync consumer's per-chunk step on a miss (issue 7, item 4).

First the iterator on its own, against a recording flight (the few members it calls), one test
per way it stops; then through the cache: a joiner arriving from another thread mid-stream, and
a real Ctrl-C (SIGINT) landing right after an upstream read.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from tests.helpers import held_in_another_thread

from chengeta_ai import CacheKeyBuilder, CacheManager, InMemoryBackend
from chengeta_ai._core import ChunkLog, PullLock, SoloPull, StreamEncoder
from chengeta_ai.layers.flight_state import FlightState, Phase
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

MESSAGES = [{"role": "user", "content": "solo pull"}]
UNENCODED_BYTES = 256
# `ChunkLog.record`'s bits
OVERFLOWED, TAKEN, UNENCODED = 1, 2, 4


class RecordingFlight:
    """The members of `SyncFlight` that `SoloPull` reads or calls, recording the calls."""

    def __init__(self) -> None:
        self.state = SimpleNamespace(phase=Phase.RUNNING)
        self.solo = True
        self._waiters = 0
        self.calls: list[tuple[str, Any]] = []
        self.lock = PullLock()
        #: what `_pull_failed` raises (a Ctrl-C it re-raises), or None
        self.reraise: BaseException | None = None
        self.after_record_raises: BaseException | None = None

    def wake(self) -> None:
        self.calls.append(("wake", None))

    def _after_record(self, bits: int) -> None:
        self.calls.append(("after_record", bits))
        if self.after_record_raises is not None:
            raise self.after_record_raises

    def _pull_failed(self, exc: BaseException) -> None:
        # the lock is held while the flight's own methods run, as in `SyncFlight._pull_one`
        assert self.lock._is_owned()
        self.calls.append(("pull_failed", exc))
        if self.reraise is not None:
            raise self.reraise


def make_pull(
    upstream: Iterator[Any], *, max_bytes: int | None = None, behind: int = 0
) -> tuple[SoloPull, RecordingFlight, ChunkLog, StreamEncoder]:
    flight = RecordingFlight()
    log = ChunkLog(64, max_bytes)
    consumer = log.attach()
    assert consumer is not None
    for i in range(behind):  # chunks the consumer has not read yet
        log.push(f"old{i}", 1)
    encoder = StreamEncoder()
    pull = SoloPull(
        flight, upstream, log, encoder, consumer, flight.lock, Phase.RUNNING, UNENCODED_BYTES
    )
    return pull, flight, log, encoder


def names(flight: RecordingFlight) -> list[str]:
    return [name for name, _ in flight.calls]


def test_plain_case_hands_out_every_chunk_and_records_it() -> None:
    chunks = [f"tok{i}" for i in range(5)]
    upstream = iter(chunks)
    pull, flight, log, encoder = make_pull(upstream)
    got = [next(pull) for _ in range(5)]
    assert got == chunks
    assert (pull.taken, pull.spent, log.end, log.snapshot()) == (5, False, 5, chunks)
    assert encoder.nbytes > 0
    assert flight.calls == []
    assert not flight.lock._is_owned()


def test_end_of_upstream_goes_to_pull_failed_with_stop_iteration() -> None:
    pull, flight, log, _ = make_pull(iter(["a", "b"]))
    assert list(pull) == ["a", "b"]
    assert log.end == 2
    assert names(flight) == ["pull_failed"]
    assert isinstance(flight.calls[0][1], StopIteration)
    assert pull.spent
    assert list(pull) == []  # spent: no second read, no second call
    assert names(flight) == ["pull_failed"]
    assert not flight.lock._is_owned()


class Halt(BaseException):
    """A `BaseException` that is not an `Exception`."""


@pytest.mark.parametrize("exc_type", [ValueError, Halt, KeyboardInterrupt, GeneratorExit])
def test_an_upstream_error_goes_to_pull_failed_with_its_traceback(
    exc_type: type[BaseException],
) -> None:
    def upstream() -> Iterator[Any]:
        yield "a"
        raise exc_type("upstream broke")

    pull, flight, log, _ = make_pull(upstream())
    assert list(pull) == ["a"]
    assert names(flight) == ["pull_failed"]
    exc = flight.calls[0][1]
    assert type(exc) is exc_type
    # the upstream's frame is in the traceback, as `except BaseException as exc` would see it
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "upstream" in frames
    assert pull.spent and log.end == 1


def test_an_exception_pull_failed_raises_propagates_after_the_lock_is_released() -> None:
    def upstream() -> Iterator[Any]:
        yield "a"
        raise KeyboardInterrupt

    pull, flight, _, _ = make_pull(upstream())
    flight.reraise = KeyboardInterrupt()  # a Ctrl-C of the reading thread is re-raised
    assert next(pull) == "a"
    with pytest.raises(KeyboardInterrupt):
        next(pull)
    assert not flight.lock._is_owned()
    assert pull.spent


def test_a_busy_pull_lock_stops_without_reading() -> None:
    upstream = iter(["a", "b"])
    pull, flight, log, _ = make_pull(upstream)
    with held_in_another_thread(flight.lock):
        assert list(pull) == []
        assert not pull.spent, "a busy lock is transient"
        assert log.end == 0
    assert next(pull) == "a"  # the lock is free again


@pytest.mark.parametrize("why", ["phase", "joined"])
def test_a_flight_not_running_or_not_solo_stops_for_good_without_reading(why: str) -> None:
    upstream = iter(["a", "b", "c"])
    pull, flight, log, _ = make_pull(upstream)
    assert next(pull) == "a"
    if why == "phase":
        flight.state.phase = Phase.CANCELLING
    else:
        flight.solo = False
    assert list(pull) == []
    assert pull.spent and log.end == 1
    assert next(upstream) == "b", "the upstream was not read"
    if why == "phase":
        flight.state.phase = Phase.RUNNING
    else:
        flight.solo = True
    assert list(pull) == [], "spent stays spent"
    assert flight.calls == []


def test_waiters_are_woken_after_each_chunk() -> None:
    pull, flight, _, _ = make_pull(iter(["a", "b"]))
    flight._waiters = 1
    assert next(pull) == "a"
    assert names(flight) == ["wake"]
    flight._waiters = 0
    assert next(pull) == "b"
    assert names(flight) == ["wake"]


def test_an_encoder_failure_delivers_the_chunk_then_hands_back() -> None:
    unencodable = object()
    pull, flight, log, encoder = make_pull(iter(["a", unencodable, "c"]))
    assert next(pull) == "a"
    assert next(pull) is unencodable  # appended and taken all the same
    assert names(flight) == ["after_record"]
    assert flight.calls[0][1] & UNENCODED and flight.calls[0][1] & TAKEN
    assert encoder.error
    assert pull.spent and log.end == 2
    assert list(pull) == [], "the Python path takes over (the flight dropped its encoder)"


def test_an_overflow_is_reported_and_the_pull_goes_on() -> None:
    pull, flight, log, _ = make_pull(iter(["x" * 100, "y" * 100, "z"]), max_bytes=50)
    assert next(pull) == "x" * 100
    assert names(flight) == ["after_record"]
    assert flight.calls[0][1] & OVERFLOWED
    assert not pull.spent and not log.retaining
    assert list(pull) == ["y" * 100, "z"]


def test_after_record_raising_fails_the_flight_through_pull_failed() -> None:
    pull, flight, log, _ = make_pull(iter([object(), "b"]))
    flight.after_record_raises = KeyboardInterrupt()
    assert list(pull) == []  # the chunk is in the log, but the step failed: not handed out
    assert names(flight) == ["after_record", "pull_failed"]
    assert isinstance(flight.calls[1][1], KeyboardInterrupt)
    assert log.end == 1 and pull.taken == 0 and pull.spent


def test_a_consumer_that_has_not_read_everything_does_not_take() -> None:
    pull, flight, log, _ = make_pull(iter(["new"]), behind=2)
    assert list(pull) == []  # appended for the consumer to read in order, not taken
    assert not pull.spent and pull.taken == 0
    assert log.end == 3 and flight.calls == []


def test_the_upstream_must_be_an_iterator() -> None:
    flight = RecordingFlight()
    log = ChunkLog()
    with pytest.raises(TypeError, match="iterator"):
        SoloPull(flight, [1, 2], log, StreamEncoder(), 0, flight.lock, Phase.RUNNING, 1)


# -- through the cache ------------------------------------------------------------------------


def new_cache(**kwargs: Any) -> StreamingResponseCache:
    manager = CacheManager(backend=InMemoryBackend(), key_builder=CacheKeyBuilder())
    return StreamingResponseCache(manager, **kwargs)


def test_a_joiner_from_another_thread_mid_stream_gets_every_chunk() -> None:
    cache = new_cache(max_lag=4)
    chunks = [f"tok{i}" for i in range(300)]
    inside = 0
    overlaps = 0
    reads = 0
    joined = threading.Event()

    def upstream(_: Any) -> Iterator[Any]:
        nonlocal inside, overlaps, reads
        for chunk in chunks:
            inside += 1
            if inside > 1:
                overlaps += 1
            reads += 1
            if reads % 7 == 0:
                time.sleep(0.0002)  # lets the other thread run mid-read (GIL released)
            inside -= 1
            yield chunk

    leader = cache.get_or_stream(MESSAGES, upstream)
    got = [next(leader) for _ in range(50)]  # the pump is running: solo so far
    joiner_got: list[Any] = []

    def join() -> None:
        stream = cache.get_or_stream(MESSAGES, upstream)
        joined.set()
        joiner_got.extend(stream)

    t = threading.Thread(target=join)
    t.start()
    joined.wait(5)
    got.extend(leader)
    t.join(10)
    assert not t.is_alive()
    assert got == chunks
    assert joiner_got == chunks
    assert overlaps == 0, "two next() on the upstream at once"
    stats = cache.stats()
    assert (stats["streams_led"], stats["joins"], stats["stores"]) == (1, 1, 1)
    assert stats["chunks_delivered"] == 600
    assert list(cache.get_or_stream(MESSAGES, upstream)) == chunks  # the stored entry


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to oneself")
@pytest.mark.parametrize("on_abandon", ["finish", "cancel"])
def test_ctrl_c_right_after_an_upstream_read_never_truncates(on_abandon: Any) -> None:
    # The upstream is a chain of C iterators, the middle one sending SIGINT to this process:
    # no Python frame runs until the read returns. SoloPull checks for signals right after the
    # read, before the record, as the Python step's next Python instruction would.
    cache = new_cache(on_abandon=on_abandon)
    head, tail = ["a", "b", "c"], ["d", "e", "f"]
    pid = os.getpid()

    # libc's kill through ctypes: unlike os.kill, nothing checks for the signal on the way
    # back, so it is still pending when the read returns; the chunk read is kill's result, 0
    kill = ctypes.CDLL(None, use_errno=True).kill

    def upstream(_: Any) -> Iterator[Any]:
        return itertools.chain(head, map(kill, [pid], [int(signal.SIGINT)]), tail)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    got: list[Any] = []
    try:
        stream = cache.get_or_stream(MESSAGES, upstream)
        with pytest.raises(KeyboardInterrupt):
            for chunk in stream:
                got.append(chunk)
        stream.close()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert got == [*head, 0][: len(got)]
    flight = next(iter(cache.flights.values()), None)
    if flight is not None:  # draining (on_abandon="finish"): wait for its end
        flight.wait_released()
    # never a truncated entry: the whole stream with its 0 chunk, or nothing
    entry = cache.manager.get(cache.manager.key_builder.build(MESSAGES, "default", None))
    assert entry in (None, [*head, 0, *tail]), entry
    # the interrupt landed between the read and the log: the flight failed (as the Python step
    # fails it), so not even the drain of on_abandon="finish" stores anything
    assert entry is None
    assert got == head


def test_a_cycle_through_the_pull_is_collected() -> None:
    pull, flight, _, _ = make_pull(iter(["a"]))
    flight.pull = pull  # type: ignore[attr-defined]  # a cycle the collector must see through
    ref = weakref.ref(flight)
    del pull, flight
    gc.collect()
    assert ref() is None


# -- the flags are read at every chunk, whatever wrote them ------------------------------------


def from_another_thread(fn: Any) -> None:
    t = threading.Thread(target=fn)
    t.start()
    t.join(10)
    assert not t.is_alive()


@pytest.mark.parametrize("flag", ["phase", "solo", "waiters"])
@pytest.mark.parametrize("state", ["slots", "dict"])
def test_a_flag_changed_by_another_thread_is_seen_at_the_next_chunk(flag: str, state: str) -> None:
    # `phase` lives on the flight's state (a `FlightState`, with __slots__, or a plain
    # object), `solo` and `_waiters` on the flight (its __dict__): read without the generic
    # lookup, they must still be read afresh at every chunk
    chunks = ["a", "b", "c", "d"]
    flight = RecordingFlight()
    if state == "slots":
        flight.state = FlightState("finish")  # type: ignore[assignment]
    log = ChunkLog(64, None)
    consumer = log.attach()
    assert consumer is not None
    pull = SoloPull(
        flight, iter(chunks), log, StreamEncoder(), consumer, flight.lock, Phase.RUNNING, 1
    )
    assert next(pull) == "a"
    assert next(pull) == "b"

    def change() -> None:
        if flag == "phase":
            flight.state.phase = Phase.CANCELLING
        elif flag == "solo":
            flight.solo = False
        else:
            flight._waiters = 1

    from_another_thread(change)
    if flag == "waiters":
        assert next(pull) == "c"
        assert names(flight) == ["wake"], "the waiter is woken after the very next chunk"
        from_another_thread(lambda: setattr(flight, "_waiters", 0))
        assert next(pull) == "d"
        assert names(flight) == ["wake"]
    else:
        assert list(pull) == [], "not running / not solo: stops at the very next chunk"
        assert pull.spent and log.end == 2


def test_a_flag_changed_during_the_read_is_seen_at_the_next_chunk() -> None:
    # the upstream itself (another consumer joining meanwhile, in effect) clears `solo`
    flight = RecordingFlight()

    def upstream() -> Iterator[str]:
        yield "a"
        flight.solo = False
        yield "b"
        yield "c"

    log = ChunkLog(64, None)
    consumer = log.attach()
    assert consumer is not None
    pull = SoloPull(
        flight, upstream(), log, StreamEncoder(), consumer, flight.lock, Phase.RUNNING, 1
    )
    assert list(pull) == ["a", "b"]
    assert pull.spent and log.end == 2


class PropertyFlight(RecordingFlight):
    """`solo` behind a property (a data descriptor): read with the generic lookup."""

    def __init__(self) -> None:
        self._solo = True
        super().__init__()

    @property  # type: ignore[override]
    def solo(self) -> bool:
        return self._solo

    @solo.setter
    def solo(self, value: bool) -> None:
        self._solo = value


class OtherFlight(RecordingFlight):
    """A class a flight is switched to (`__class__` assignment)."""

    def __getattribute__(self, name: str) -> Any:
        if name == "solo":
            return False
        return super().__getattribute__(name)


@pytest.mark.parametrize("how", ["property", "class_changed"])
def test_flags_outside_the_plain_layout_still_read_as_getattr(how: str) -> None:
    flight: RecordingFlight = PropertyFlight() if how == "property" else RecordingFlight()
    log = ChunkLog(64, None)
    consumer = log.attach()
    assert consumer is not None
    pull = SoloPull(
        flight, iter("abc"), log, StreamEncoder(), consumer, flight.lock, Phase.RUNNING, 1
    )
    assert next(pull) == "a"
    if how == "property":
        flight._solo = False  # type: ignore[attr-defined]  # only the property says so
    else:
        flight.__class__ = OtherFlight
    assert list(pull) == []
    assert pull.spent and log.end == 1
