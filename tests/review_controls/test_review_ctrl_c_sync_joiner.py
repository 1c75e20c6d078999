"""Review: Ctrl-C in one sync caller of a shared in-flight stream.

A sync flight is pumped by whichever consumer thread needs the next chunk. When Ctrl-C
(KeyboardInterrupt) lands in the main thread while *it* is the one inside the upstream's
``next()``, `SyncFlight._pull_one` takes it for an upstream failure: the flight fails, and
every other caller of the key, in other threads, gets that ``KeyboardInterrupt`` re-raised
(`Flight.raise_error`) although nobody interrupted them and the upstream was fine (the
async flights wrap a read cancelled from outside in a `ChengetaError`; the sync ones pass the
KeyboardInterrupt itself to other threads, where it is neither expected nor clear). The
interrupted caller itself reports outcome ``error`` ("the upstream raised"), where its async
twin, cancelled the same way, reports ``abandoned``.

The interrupt is a real SIGINT delivered to the main thread (``signal.pthread_kill``).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import pytest
from tests.helpers import Upstream

from chengeta_ai import CacheManager, ChengetaError, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

M = [{"role": "user", "content": "ctrl-c"}]
CHUNKS = ["c1", "c2", "c3", "c4"]


def _ctrl_c_in(seconds: float) -> threading.Timer:
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread() is threading.main_thread()
    timer = threading.Timer(seconds, signal.pthread_kill, args=(main, signal.SIGINT))
    timer.start()
    return timer


def _shared_flight() -> tuple[StreamingResponseCache, Upstream, Any, threading.Event, list[Any]]:
    """A leader in a worker thread that read one chunk and will read the rest on ``go``;
    the upstream pauses before its second chunk."""
    cache = StreamingResponseCache(CacheManager(backend=InMemoryBackend()))
    up = Upstream(CHUNKS, pause_at=1)
    go = threading.Event()
    result: list[Any] = []
    ready = threading.Event()

    def leader() -> None:
        stream = cache.get_or_stream(M, up.sync)
        try:
            first = next(stream)
            ready.set()
            go.wait(10)
            result.append([first, *stream])
        except BaseException as exc:
            result.append(exc)
        result.append(stream.cache_info)

    t = threading.Thread(target=leader)
    t.start()
    assert ready.wait(10)
    return cache, up, t, go, result


def test_ctrl_c_in_one_caller_does_not_fail_the_other_callers_stream() -> None:
    cache, up, t, go, result = _shared_flight()
    joiner = cache.get_or_stream(M, up.sync)
    assert next(joiner) == "c1"
    timer = _ctrl_c_in(0.3)
    try:
        with pytest.raises(KeyboardInterrupt):
            next(joiner)  # this thread pulls the upstream, paused: Ctrl-C lands in next()
    finally:
        timer.cancel()
        up.thread_gate.set()
        go.set()
        t.join(10)
    got = result[0]
    assert not isinstance(got, KeyboardInterrupt), (
        "a Ctrl-C in the main thread was re-raised in another thread's stream"
    )
    # the interrupted read killed the upstream iterator: a clear error is fine, as the async
    # flights give for a read cancelled from outside ("the upstream read of ... was cancelled")
    assert got == CHUNKS or isinstance(got, ChengetaError)


def test_ctrl_c_in_a_joiner_reports_abandoned_not_error() -> None:
    cache, up, t, go, _result = _shared_flight()
    joiner = cache.get_or_stream(M, up.sync)
    assert next(joiner) == "c1"
    timer = _ctrl_c_in(0.3)
    try:
        with pytest.raises(KeyboardInterrupt):
            next(joiner)
    finally:
        timer.cancel()
        up.thread_gate.set()
        go.set()
        t.join(10)
    assert joiner.cache_info is not None
    assert joiner.cache_info.outcome == "abandoned"  # the caller left; the upstream never raised
