"""Per-call controls and status (issue 9): what they cost, and how faithful a paced replay is.

Run for real: ``pytest benches/bench_call_controls.py -q -s`` on a release build (``make
bench``); smoke: ``pytest benches --benchmark-disable``. Against the commit before this feature:
``scripts/compare_commits.sh BASE`` (bench_hot_path: the default path, which now returns a
`CacheStream` and fills ``cache_info``).

- ``control cost``: a 500-chunk hit (and miss) through ``get_or_stream`` / ``aget_or_stream``
  with ``cache_control=CacheControl(...)`` and ``cache_info`` read at the first chunk and at
  the end, against the same call without them; rounds interleaved; per chunk, the minimum
  over rounds of each, and the median of the per-round ratios (each round runs both back to back).
- ``pace fidelity``: an entry recorded from an upstream with known gaps (0-30 ms, 50 ms to the
  first chunk), replayed with ``replay="recorded"`` at ``speed=1.0``: the error on the total
  duration (target < 2 %) and the largest error on one gap (target < 1 ms), against the
  timing the cache recorded, and the CPU the replay used (share of one core); baseline: a bare
  loop sleeping to the same deadlines (what an event loop's millisecond timers allow; on a
  loaded machine its worst gap error is milliseconds too); async, also the same replay with one
  sleep per chunk (what a crowded cache does, and what every replay did before closing in).
- ``1,000 paced replays``: the largest event-loop gap (a task sleeping 1 ms in a loop) while
  1,000 paced replays of one 20-chunk entry run on one loop, started together (one turn starts
  all) and spread over one second (each started at its time), against a baseline of 1,000 plain
  async generators sleeping the same offsets; beside each, the most CPU the loop's thread used
  within one gap (a gap far longer than its CPU is the process waiting for a core).

No assertions on time anywhere.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.abc
import pytest
from benches.streams import MODEL, async_upstream, chunks, fresh_messages, new_cache, sync_upstream

from chengeta_ai import CacheControl
from chengeta_ai._core import decode_timing
from chengeta_ai.core.cache_manager import unframe_entry
from chengeta_ai.layers.pacing import PRECISE_MAX

MODES = ["sync", "asyncio", "trio"]
CONTROL = CacheControl(ttl=3600.0, tags=("bench",), replay="instant")


def _run(mode: str, fn: Callable[[], Any]) -> Any:
    return fn() if mode == "sync" else anyio.run(fn, backend=mode)


# ---------------------------------------------------------------------------------------------
# control cost


def _one_call(mode: str, cache: Any, messages: Any, items: list[Any], control: bool) -> float:
    """Seconds from the call to the last chunk in hand."""
    kwargs: dict[str, Any] = {"model_id": MODEL}
    if control:
        kwargs["cache_control"] = CONTROL
    if mode == "sync":
        t0 = time.perf_counter()
        stream = cache.get_or_stream(messages, sync_upstream(items), **kwargs)
        n = 0
        for _ in stream:
            if control and not n:
                assert stream.cache_info is not None
            n += 1
        elapsed = time.perf_counter() - t0
        if control:
            assert stream.cache_info is not None and stream.cache_info.done
        return elapsed

    async def main() -> float:
        t0 = time.perf_counter()
        stream = cache.aget_or_stream(messages, async_upstream(items), **kwargs)
        n = 0
        async for _ in stream:
            if control and not n:
                assert stream.cache_info is not None
            n += 1
        elapsed = time.perf_counter() - t0
        if control:
            assert stream.cache_info is not None and stream.cache_info.done
        return elapsed

    return float(anyio.run(main, backend=mode))


@pytest.mark.parametrize("path", ["hit", "miss"])
@pytest.mark.parametrize("mode", MODES)
def test_control_cost_per_chunk(mode: str, path: str, smoke: bool, summary: Any) -> None:
    n = 50 if smoke else 500
    rounds = 2 if smoke else (200 if path == "hit" else 40)
    items = chunks(n)
    cache = new_cache()
    hit_messages = fresh_messages()
    if path == "hit":
        # two entries: one per key (the control's tags do not change the key)
        _one_call(mode, cache, hit_messages, items, False)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for control in (False, True):
            messages = hit_messages if path == "hit" else fresh_messages()
            gc.collect()
            times[control].append(_one_call(mode, cache, messages, items, control))
    plain = min(times[False]) / n * 1e6
    ours = min(times[True]) / n * 1e6
    # each round runs both calls back to back: the median of the per-round ratios cancels
    # the machine's slow drifts that medians of each side taken apart do not
    paired = statistics.median(c / p for c, p in zip(times[True], times[False], strict=True))
    print(
        f"\n{path} {n} chunks, {mode}: {plain:.3f} us/chunk plain, {ours:.3f} with control "
        f"(min over {rounds} rounds); median paired ratio {(paired - 1) * 100:+.2f} %"
    )
    summary(
        f"{path} {n}, {mode}: cache_control + cache_info, us/chunk (min)",
        f"{ours:.3f}",
        f"{plain:.3f}",
        f"{(ours / plain - 1) * 100:+.1f} % (paired median {(paired - 1) * 100:+.1f} %)",
    )


# ---------------------------------------------------------------------------------------------
# pace fidelity


def _gapped_upstream(n: int, seed: int) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    rng = random.Random(seed)
    gaps = [0.05] + [rng.choice([0.0, 0.0, 0.002, 0.008, 0.015, 0.03]) for _ in range(n - 1)]
    items = [f"t{i}" for i in range(n)]

    def sync_fn(messages: Any) -> Any:
        for gap, item in zip(gaps, items, strict=True):
            time.sleep(gap)
            yield item

    async def async_fn(messages: Any) -> AsyncIterator[Any]:
        for gap, item in zip(gaps, items, strict=True):
            await anyio.sleep(gap)
            yield item

    return sync_fn, async_fn


@pytest.mark.parametrize("mode", MODES)
def test_pace_fidelity(mode: str, smoke: bool, summary: Any) -> None:
    n = 20 if smoke else 120
    cache = new_cache()
    messages = fresh_messages()
    sync_fn, async_fn = _gapped_upstream(n, seed=9)
    control = CacheControl(replay="recorded", speed=1.0)

    def record() -> None:
        list(cache.get_or_stream(messages, sync_fn, model_id=MODEL))

    async def arecord() -> None:
        async for _ in cache.aget_or_stream(messages, async_fn, model_id=MODEL):
            pass

    _run(mode, record if mode == "sync" else arecord)
    key = cache.manager.key_builder.build(messages, MODEL)
    raw = cache.manager.backend.get(key)
    assert raw is not None
    timing = unframe_entry(raw).timing
    assert timing is not None
    recorded = decode_timing(bytes(timing), max_total_seconds=3600)

    def replay() -> list[float]:
        t0 = time.perf_counter()
        return [
            time.perf_counter() - t0
            for _ in cache.get_or_stream(messages, sync_fn, model_id=MODEL, cache_control=control)
        ]

    async def areplay() -> list[float]:
        t0 = time.perf_counter()
        out = []
        async for _ in cache.aget_or_stream(
            messages, async_fn, model_id=MODEL, cache_control=control
        ):
            out.append(time.perf_counter() - t0)
        return out

    def baseline() -> list[float]:
        """The same deadlines slept by a bare loop (what this machine's timers allow)."""
        t0 = time.perf_counter()
        out = []
        for offset in recorded:
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            out.append(time.perf_counter() - t0)
        return out

    async def abaseline() -> list[float]:
        t0 = time.perf_counter()
        out = []
        for offset in recorded:
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            out.append(time.perf_counter() - t0)
        return out

    def errors(got: list[float]) -> tuple[float, float, float]:
        assert len(got) == len(recorded) == n
        total_err = abs(got[-1] - recorded[-1]) / recorded[-1] * 100
        gap_errs = [
            abs((got[i] - got[i - 1]) - (recorded[i] - recorded[i - 1])) * 1000 for i in range(1, n)
        ]
        worst = max([abs(got[0] - recorded[0]) * 1000, *gap_errs])
        return total_err, worst, sorted(gap_errs)[int(0.99 * (len(gap_errs) - 1))]

    def timed(fn: Callable[[], Any]) -> tuple[list[float], float]:
        """``fn``'s offsets, and the CPU it used as a share of the wall time (one core: 100)."""
        cpu, wall = time.thread_time(), time.perf_counter()
        got = _run(mode, fn)
        return got, (time.thread_time() - cpu) / (time.perf_counter() - wall) * 100

    got, cpu = timed(replay if mode == "sync" else areplay)
    b_got, b_cpu = timed(baseline if mode == "sync" else abaseline)
    total_err, worst, p99 = errors(got)
    b_total, b_worst, b_p99 = errors(b_got)
    crowded = ""
    if mode != "sync":
        # the same replay as a crowded cache runs it (one sleep per chunk, as before closing in)
        cache._pacer.limit = -1
        c_got, c_cpu = timed(areplay)
        cache._pacer.limit = PRECISE_MAX
        _, c_worst, c_p99 = errors(c_got)
        crowded = f"; one sleep per chunk {c_worst:.2f} ({c_p99:.2f}) ms / {c_cpu:.0f} %"
    print(
        f"\npace fidelity {mode}: recorded {recorded[-1] * 1000:.1f} ms; total error "
        f"{total_err:.2f} %, worst gap error {worst:.3f} ms (p99 {p99:.3f}), CPU {cpu:.1f} % "
        f"of a core; bare sleep loop: {b_total:.2f} %, {b_worst:.3f} ms (p99 {b_p99:.3f}), "
        f"CPU {b_cpu:.1f} %{crowded}"
    )
    summary(
        f"paced replay {n} chunks, {mode}: total error / worst (p99) gap error / CPU",
        f"{total_err:.2f} % / {worst:.2f} ({p99:.2f}) ms / {cpu:.0f} %",
        f"{b_total:.2f} % / {b_worst:.2f} ({b_p99:.2f}) ms / {b_cpu:.0f} %",
        f"target 2 % / 1 ms{crowded}",
    )


# ---------------------------------------------------------------------------------------------
# 1,000 paced replays on one loop


class _Beat:
    """A task sleeping 1 ms in a loop: each gap between its wake-ups (wall time), and the CPU
    time the loop's thread used in it (the work done on the loop then: a gap much longer than
    its CPU time is the process waiting for a core that other processes held)."""

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self.cpu: list[float] = []
        self.stop = False

    async def run(self) -> None:
        last, last_cpu = time.perf_counter(), time.thread_time()
        while not self.stop:
            await anyio.sleep(0.001)
            now, now_cpu = time.perf_counter(), time.thread_time()
            self.gaps.append(now - last)
            self.cpu.append(now_cpu - last_cpu)
            last, last_cpu = now, now_cpu


async def _baseline_replay(items: list[Any], offsets: list[float]) -> AsyncIterator[Any]:
    """What a paced replay must at least cost: sleep to each recorded offset, yield."""
    t0 = time.perf_counter()
    for item, offset in zip(items, offsets, strict=True):
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            await anyio.sleep(delay)
        yield item


@pytest.mark.parametrize("start", ["together", "spread over 1 s"])
@pytest.mark.parametrize("mode", ["asyncio", "trio"])
def test_thousand_paced_replays_loop_gap(mode: str, start: str, smoke: bool, summary: Any) -> None:
    k = 50 if smoke else 1000
    spread = 0.0 if start == "together" else (0.05 if smoke else 1.0)
    items = [f"c{i}" for i in range(20)]
    cache = new_cache()
    messages = fresh_messages()
    control = CacheControl(replay="recorded")

    async def main() -> list[float]:
        async for _ in cache.aget_or_stream(
            messages, _gapped_upstream(20, seed=3)[1], model_id=MODEL
        ):
            pass
        raw = cache.manager.backend.get(cache.manager.key_builder.build(messages, MODEL))
        assert raw is not None
        timing = unframe_entry(raw).timing
        assert timing is not None
        offsets = decode_timing(bytes(timing), max_total_seconds=60)

        async def ours() -> None:
            async for _ in cache.aget_or_stream(
                messages, async_upstream(items), model_id=MODEL, cache_control=control
            ):
                pass

        async def base() -> None:
            async for _ in _baseline_replay(items, offsets):
                pass

        async def spawn(tg: anyio.abc.TaskGroup, fn: Callable[[], Any]) -> None:
            """Each replay started at its time: spread, one loop turn starts the few due then
            (the harness's own task starts are not all paid in one turn)."""
            t0 = anyio.current_time()
            for i in range(k):
                if spread:
                    await anyio.sleep_until(t0 + spread * i / k)
                tg.start_soon(fn)

        figures = []
        for fn in (ours, base):
            beat = _Beat()
            gc.collect()
            gc.freeze()  # as a server does after start-up: the gaps measured are this run's
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(beat.run)
                    async with anyio.create_task_group() as replays:
                        replays.start_soon(spawn, replays, fn)
                    beat.stop = True
            finally:
                gc.unfreeze()
            gaps = sorted(beat.gaps)
            figures += [
                gaps[-1] * 1000,
                gaps[int(0.99 * (len(gaps) - 1))] * 1000,
                max(beat.cpu) * 1000,
            ]
        return figures

    o_max, o_p99, o_cpu, b_max, b_p99, b_cpu = anyio.run(main, backend=mode)
    print(
        f"\n{k} paced replays {start}, {mode}: loop gap max {o_max:.1f} ms (p99 {o_p99:.1f}; "
        f"most CPU in one gap {o_cpu:.1f}), baseline max {b_max:.1f} ms (p99 {b_p99:.1f}; "
        f"most CPU in one gap {b_cpu:.1f})"
    )
    summary(
        f"{k} paced replays {start}, {mode}: loop gap max (p99) [CPU in a gap], ms",
        f"{o_max:.1f} ({o_p99:.1f}) [{o_cpu:.1f}]",
        f"{b_max:.1f} ({b_p99:.1f}) [{b_cpu:.1f}]",
        f"{o_max / b_max:.2f}x" if b_max else "-",
    )
