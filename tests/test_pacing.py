"""Recorded-pace replay: how an async replay waits for each chunk's time (`layers/pacing.py`).

No timed assertion beyond lower bounds that hold by construction (a chunk is never handed over
before its recorded time); how close to it a chunk comes is measured in
benches/bench_call_controls.py.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest
from tests.helpers import Upstream

from chengeta_ai import CacheControl, CacheManager, InMemoryBackend
from chengeta_ai._core import decode_timing
from chengeta_ai.core.cache_manager import unframe_entry
from chengeta_ai.layers import pacing
from chengeta_ai.layers.pacing import GRANULARITY, approach
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

M = [{"role": "user", "content": "pace me"}]
CHUNKS = [f"c{i}" for i in range(6)]
PACED = CacheControl(replay="recorded")


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def new_cache() -> StreamingResponseCache:
    return StreamingResponseCache(CacheManager(backend=InMemoryBackend()))


def recorded(cache: StreamingResponseCache, delay: float, backend: str = "asyncio") -> list[float]:
    """Stores ``CHUNKS`` from an upstream sleeping ``delay`` before each; their offsets."""

    async def main() -> None:
        async for _ in cache.aget_or_stream(M, Upstream(CHUNKS, delay=delay).asyncgen):
            pass

    anyio.run(main, backend=backend)
    raw = cache.manager.backend.get(cache.manager.key_builder.build(M, "default"))
    assert raw is not None
    timing = unframe_entry(raw).timing
    assert timing is not None
    return decode_timing(bytes(timing), max_total_seconds=60)


def test_approach_aims_before_the_deadline_then_yields() -> None:
    # far: to 2 ms before (asyncio may wake up to 2 ms after it asked: still before the deadline)
    assert approach(0.05) == pytest.approx(0.048)
    # near: to 1 ms before (a sleep under 9 ms is rounded up once: at most 1 ms late)
    assert approach(0.0025) == pytest.approx(0.0015)
    # below the loop's granularity: no sleep, one turn of the loop
    assert approach(0.0009) == 0.0
    assert approach(GRANULARITY) == 0.0
    for i in range(1, 2000):
        left = i * 1e-5
        nap = approach(left)
        assert 0.0 <= nap < left
        if nap:
            # what a nap can overshoot by (2 ms over 9 ms on asyncio, else 1 ms) stays before
            assert left - nap >= (2 * GRANULARITY if nap >= 0.009 else GRANULARITY) - 1e-12


@pytest.mark.parametrize("crowded", [False, True], ids=["few", "crowded"])
def test_paced_chunks_are_never_handed_over_early(backend: str, crowded: bool) -> None:
    """Closing in (a few replays) or one sleep per chunk (more than PRECISE_MAX): each chunk
    comes at or after its recorded time, at speed 1 and 2."""
    cache = new_cache()
    if crowded:
        cache._pacer.limit = 0
    offsets = recorded(cache, 0.004, backend)

    async def main(speed: float) -> list[float]:
        got: list[float] = []
        start = time.perf_counter()  # before the replay's own start: a lower bound holds
        stream = cache.aget_or_stream(
            M, Upstream(["x"]).asyncgen, cache_control=CacheControl(replay="recorded", speed=speed)
        )
        async for chunk in stream:
            got.append(time.perf_counter() - start)
            assert chunk == CHUNKS[len(got) - 1]
        assert stream.cache_info is not None and stream.cache_info.outcome == "replayed"
        return got

    for speed in (1.0, 2.0):
        got = anyio.run(main, speed, backend=backend)
        assert len(got) == len(offsets)
        assert all(g >= o / speed for g, o in zip(got, offsets, strict=True))
    assert cache._pacer.active == 0


def test_a_crowded_cache_sleeps_on_the_loop_only(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above the pacer's limit, a replay waits in one sleep per chunk on the loop: no worker
    thread closes in."""
    finals = 0
    real = pacing._sleep_until

    def counted(deadline: float) -> None:
        nonlocal finals
        finals += 1
        real(deadline)

    monkeypatch.setattr(pacing, "_sleep_until", counted)
    cache = new_cache()
    cache._pacer.limit = 2
    recorded(cache, 0.003, backend)
    seen: list[int] = []

    async def replay(gate: anyio.Event) -> None:
        await gate.wait()  # all enter before any waits
        async for _ in cache.aget_or_stream(M, Upstream(["x"]).asyncgen, cache_control=PACED):
            seen.append(cache._pacer.active)

    async def main() -> None:
        gate = anyio.Event()
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(replay, gate)
            await anyio.lowlevel.checkpoint()
            gate.set()

    anyio.run(main, backend=backend)
    assert finals == 0
    assert len(seen) == 3 * len(CHUNKS) and seen[0] == 3
    assert cache._pacer.active == 0


def test_the_pacer_counts_running_replays_and_forgets_ended_ones(backend: str) -> None:
    """Async paced replays are counted while they run; one that ends whole, one closed after
    its first chunk and one cancelled while it waits are all let go. Sync replays and instant
    ones are not counted."""
    cache = new_cache()
    recorded(cache, 0.02, backend)
    counts: list[int] = []

    async def whole() -> None:
        async for _ in cache.aget_or_stream(M, Upstream(["x"]).asyncgen, cache_control=PACED):
            counts.append(cache._pacer.active)

    async def closed_early() -> None:
        stream = cache.aget_or_stream(M, Upstream(["x"]).asyncgen, cache_control=PACED)
        async for _ in stream:
            counts.append(cache._pacer.active)
            break
        await stream.aclose()

    async def cancelled() -> None:
        with anyio.CancelScope() as scope:
            async for _ in cache.aget_or_stream(M, Upstream(["x"]).asyncgen, cache_control=PACED):
                counts.append(cache._pacer.active)
                scope.cancel()  # raised in the replay's next wait
        assert scope.cancelled_caught

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(whole)
            tg.start_soon(closed_early)
            tg.start_soon(cancelled)

    anyio.run(main, backend=backend)
    assert counts[0] == 3
    assert cache._pacer.active == 0
    for chunk in cache.get_or_stream(M, Upstream(["x"]).sync, cache_control=PACED):
        assert cache._pacer.active == 0, chunk
    assert cache.stats().paced_replays == 4


def test_closing_in_sleeps_the_last_millisecond_in_a_thread(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone replay's last step towards a chunk's time is slept in a worker thread (the loop's
    own timers are whole milliseconds), and the loop turns meanwhile."""
    import threading

    threads: set[int] = set()
    real = pacing._sleep_until

    def noted(deadline: float) -> None:
        threads.add(threading.get_ident())
        real(deadline)

    monkeypatch.setattr(pacing, "_sleep_until", noted)
    # every wait straight to the thread (not only its last millisecond): each of them is seen
    monkeypatch.setattr(pacing, "approach", lambda left: 0.0)
    cache = new_cache()
    recorded(cache, 0.02, backend)
    turns = 0
    done = False

    async def ticker() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await anyio.sleep(0.0005)

    async def main() -> Any:
        nonlocal done
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            stream = cache.aget_or_stream(M, Upstream(["x"]).asyncgen, cache_control=PACED)
            got = [c async for c in stream]
            done = True
        return got

    assert anyio.run(main, backend=backend) == CHUNKS
    assert threads and threading.get_ident() not in threads
    assert turns > len(CHUNKS)


def test_a_cancelled_final_wait_returns_at_once(backend: str) -> None:
    """Cancelled while a worker thread sleeps its last millisecond, a replay ends without
    waiting for the thread, and the pacer lets it go."""
    cache = new_cache()
    recorded(cache, 0.02, backend)

    async def main() -> None:
        with anyio.move_on_after(0.03):
            async for _ in cache.aget_or_stream(M, Upstream(["x"]).asyncgen, cache_control=PACED):
                pass
        assert cache._pacer.active == 0

    anyio.run(main, backend=backend)
