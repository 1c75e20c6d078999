"""`AsyncPump` (Rust): an async flight's pump loop as one awaitable (issue 7, item 4).

It must drive the upstream's ``__anext__()`` awaitables exactly as ``await`` does. Each
scenario is run twice, through ``await anext()`` in Python and through `AsyncPump`, and what the
upstream and the awaiting code observe must be the same: by hand (send, throw, close of the
awaiting coroutine, no event loop), then on asyncio and trio (cancellation, an upstream that
swallows it, a `BaseException`). Then each way the pump returns to the Python loop.
"""

from __future__ import annotations

import gc
import types
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from chengeta_ai._core import AsyncPump, ChunkLog, StreamEncoder

pytestmark = pytest.mark.anyio

ENDED = -1
OVERFLOWED, UNENCODED, NO_HEADROOM = 1, 4, 8
BIG = 1 << 30


class RecordingFlight:
    """The members of `AsyncFlight` that `AsyncPump` reads or calls."""

    def __init__(self) -> None:
        self._data: object | None = None
        self.wakes = 0

    def _wake_data(self) -> None:
        self.wakes += 1
        self._data = None


def make_pump(
    upstream: AsyncIterator[Any],
    *,
    every: int = BIG,
    max_lag: int = 1 << 20,
    max_bytes: int | None = None,
) -> tuple[AsyncPump, RecordingFlight, ChunkLog, StreamEncoder]:
    flight = RecordingFlight()
    log = ChunkLog(max_lag, max_bytes)
    encoder = StreamEncoder()
    return AsyncPump(flight, upstream.__anext__, log, encoder, 256, every), flight, log, encoder


async def read_in_python(upstream: AsyncIterator[Any]) -> list[Any]:
    """The reference: what ``await anext()`` in a Python loop reads."""
    out = []
    while True:
        try:
            out.append(await upstream.__anext__())
        except StopAsyncIteration:
            return out


async def read_with_pump(upstream: AsyncIterator[Any]) -> list[Any]:
    pump, _, log, _ = make_pump(upstream)
    assert await pump == ENDED
    chunks = log.snapshot()
    assert chunks is not None
    return chunks


READERS: dict[str, Callable[[AsyncIterator[Any]], Coroutine[Any, Any, list[Any]]]] = {
    "await": read_in_python,
    "pump": read_with_pump,
}


@types.coroutine
def suspend(value: Any) -> Generator[Any, Any, Any]:
    """Yields ``value`` to whoever drives the coroutine (the event loop); returns its answer."""
    return (yield value)


def by_hand(
    reader: str, script: Callable[[Coroutine[Any, Any, list[Any]]], Any]
) -> tuple[list[str], Any]:
    """Runs a reader over an upstream that suspends twice, driven by ``script``; returns what
    the upstream saw and what the script got."""
    seen: list[str] = []

    async def upstream() -> AsyncIterator[Any]:
        try:
            try:
                answer = await suspend("first")
                seen.append(f"answer {answer!r}")
            except ValueError as exc:
                seen.append(f"caught {exc}")
            yield "a"
            answer = await suspend("second")
            seen.append(f"answer {answer!r}")
            yield "b"
        except BaseException as exc:
            seen.append(f"raised {type(exc).__name__}")
            raise
        finally:
            seen.append("finally")

    coro = READERS[reader](upstream())
    try:
        got = script(coro)
    finally:
        coro.close()
    return seen, got


def outcome(step: Callable[[], Any]) -> Any:
    try:
        return ("value", step())
    except StopIteration as stop:
        return ("returned", stop.value)
    except BaseException as exc:
        return ("raised", type(exc).__name__, str(exc))


SCRIPTS: dict[str, Callable[[Any], Any]] = {
    "send": lambda c: [
        outcome(lambda: c.send(None)),
        outcome(lambda: c.send(1)),
        outcome(lambda: c.send(2)),
    ],
    "throw caught": lambda c: [
        outcome(lambda: c.send(None)),
        outcome(lambda: c.throw(ValueError("boom"))),
        outcome(lambda: c.send(3)),
    ],
    "throw uncaught": lambda c: [
        outcome(lambda: c.send(None)),
        outcome(lambda: c.send(1)),
        outcome(lambda: c.throw(KeyError("k"))),
    ],
    "close": lambda c: [outcome(lambda: c.send(None)), outcome(c.close)],
    "close later": lambda c: [
        outcome(lambda: c.send(None)),
        outcome(lambda: c.send(1)),
        outcome(c.close),
    ],
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_send_throw_close_are_forwarded_as_await_forwards_them(script: str) -> None:
    expected = by_hand("await", SCRIPTS[script])
    assert by_hand("pump", SCRIPTS[script]) == expected
    if script == "send":  # the scenario is what it claims to be
        assert expected[1][-1] == ("returned", ["a", "b"])
        assert expected[1][0] == ("value", "first")


# -- on asyncio and trio ----------------------------------------------------------------------


@pytest.mark.parametrize("reader", list(READERS))
async def test_cancellation_reaches_the_suspended_upstream(reader: str) -> None:
    seen: list[str] = []
    cancelled = anyio.get_cancelled_exc_class()

    async def upstream() -> AsyncIterator[Any]:
        yield "a"
        try:
            await anyio.sleep_forever()
        except cancelled:
            seen.append("cancelled")
            raise
        yield "never"

    with anyio.move_on_after(0.05) as scope:
        await READERS[reader](upstream())
    assert scope.cancelled_caught
    assert seen == ["cancelled"]


async def test_cancellation_is_forwarded_the_same_way_by_both() -> None:
    results = {}
    for reader in READERS:
        seen: list[str] = []

        async def upstream(seen: list[str] = seen) -> AsyncIterator[Any]:
            for i in range(3):
                await anyio.lowlevel.checkpoint()  # suspends: trio's and asyncio's own traps
                yield i
            try:
                await anyio.sleep_forever()
            except BaseException as exc:
                seen.append(type(exc).__name__)
                raise

        async with anyio.create_task_group() as tg:
            got: list[Any] = []

            async def run(reader: str = reader, got: list[Any] = got) -> None:
                got.extend(await READERS[reader](upstream()))

            tg.start_soon(run)
            await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        results[reader] = (seen, got)
    assert results["pump"] == results["await"]
    assert results["pump"][0], "the upstream saw the cancellation"


@pytest.mark.parametrize("reader", list(READERS))
async def test_an_upstream_swallowing_cancellation_ends_and_the_scope_stays_cancelled(
    reader: str,
) -> None:
    cancelled = anyio.get_cancelled_exc_class()

    async def upstream() -> AsyncIterator[Any]:
        yield "a"
        try:
            await anyio.sleep_forever()
        except cancelled:
            return  # swallowed: the stream "ends"
        yield "never"

    ended = None
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def cancel_soon() -> None:
                await anyio.sleep(0.02)
                scope.cancel()

            tg.start_soon(cancel_soon)
            ended = await READERS[reader](upstream())
            # what `AsyncFlight._run` checks next: it did not end on its own
            with pytest.raises(cancelled):
                await anyio.lowlevel.checkpoint_if_cancelled()
    assert ended == ["a"]


class Halt(BaseException):
    pass


@pytest.mark.parametrize("exc_type", [Halt, KeyboardInterrupt, SystemExit, GeneratorExit])
async def test_a_base_exception_from_the_upstream_propagates_unchanged(
    exc_type: type[BaseException],
) -> None:
    error = exc_type("upstream stopped")

    async def upstream() -> AsyncIterator[Any]:
        yield "a"
        await anyio.lowlevel.checkpoint()
        raise error

    pump, _, log, _ = make_pump(upstream())
    with pytest.raises(exc_type) as info:
        await pump
    assert info.value is error
    assert log.snapshot() == ["a"]


async def test_an_error_raised_by_anext_itself_propagates() -> None:
    class Broken:
        def __anext__(self) -> Any:
            raise RuntimeError("no awaitable")

    pump = AsyncPump(RecordingFlight(), Broken().__anext__, ChunkLog(), StreamEncoder(), 1, 8)
    with pytest.raises(RuntimeError, match="no awaitable"):
        await pump


# -- each way back to the Python loop ---------------------------------------------------------


async def agen(items: list[Any], *, suspend_every: int = 0) -> AsyncIterator[Any]:
    for i, item in enumerate(items):
        if suspend_every and i % suspend_every == 0:
            await anyio.lowlevel.checkpoint()
        yield item


@pytest.mark.parametrize("suspend_every", [0, 3])
async def test_back_every_checkpoint_then_at_the_end(suspend_every: int) -> None:
    items = [f"t{i}" for i in range(10)]
    pump, flight, log, encoder = make_pump(agen(items, suspend_every=suspend_every), every=4)
    assert await pump == 0
    assert (pump.since_checkpoint, log.end) == (4, 4)
    assert await pump == 0, "not checkpointed: back after the next chunk"
    assert (pump.since_checkpoint, log.end) == (5, 5)
    pump.checkpointed()
    assert await pump == 0
    assert (pump.since_checkpoint, log.end) == (4, 9)
    pump.checkpointed()
    assert await pump == ENDED
    assert (pump.since_checkpoint, log.snapshot()) == (1, items)
    assert encoder.nbytes > 0
    assert flight.wakes == 0


async def test_waiting_consumers_are_woken_per_chunk() -> None:
    pump, flight, _, _ = make_pump(agen(["a", "b", "c"]))
    flight._data = object()
    assert await pump == ENDED
    assert flight.wakes == 1  # `_wake_data` clears `_data`: one waiter, one wake-up


async def test_back_when_no_headroom_is_left() -> None:
    upstream = agen(list(range(10)))
    pump, _, log, _ = make_pump(upstream, max_lag=3)
    slow = log.attach()
    assert slow is not None
    assert await pump == NO_HEADROOM
    assert log.end == 3 and log.headroom() == 0
    await upstream.aclose()  # type: ignore[attr-defined]


async def test_back_when_the_log_overflows() -> None:
    pump, _, log, _ = make_pump(agen(["x" * 100, "y"]), max_bytes=50)
    assert await pump & OVERFLOWED
    assert log.end == 1 and not log.retaining
    assert await pump == ENDED


async def test_back_when_the_encoder_fails_then_on_unencoded() -> None:
    odd = object()
    pump, _, log, encoder = make_pump(agen(["a", odd, "c", "d"]))
    assert await pump & UNENCODED
    assert encoder.error
    assert log.end == 2
    assert await pump == ENDED, "the rest is appended unencoded, as the flight does"
    assert log.snapshot() == ["a", odd, "c", "d"]
    assert log.retained_bytes >= 3 * 256  # odd, c and d accounted as unencoded


async def test_an_await_that_is_not_awaitable_is_a_type_error() -> None:
    class NotAwaitable:
        def __anext__(self) -> Any:
            return 42

    pump = AsyncPump(RecordingFlight(), NotAwaitable().__anext__, ChunkLog(), StreamEncoder(), 1, 8)
    with pytest.raises(TypeError, match="await"):
        await pump


def test_a_cycle_through_the_pump_is_collected() -> None:
    async def upstream() -> AsyncIterator[Any]:
        yield "a"

    pump, flight, _, _ = make_pump(upstream())
    flight.pump = pump  # type: ignore[attr-defined]  # a cycle the collector must see through
    ref = weakref.ref(flight)
    del pump, flight
    gc.collect()
    assert ref() is None
