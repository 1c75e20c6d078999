"""`SoloPull` holds the flight, the upstream, the log and the encoder, but does not support the
cyclic garbage collector (no ``__traverse__``/``__clear__``: the type is not GC-tracked). A
reference cycle that runs through it can never be collected, where the same cycle without it
(main's Python step, or this branch under a profile hook, `sys.setprofile`) is.

Such a cycle forms on its own on every sync miss whose upstream fails after its first chunk:
the error is stored on the flight (``state.error``), re-raised from ``SyncFlight.consume``
(its traceback now holds that frame, whose locals hold the pump, which holds the flight). So
each failed stream leaks its flight, its log of chunks, its encoder buffer and the upstream
object (an SDK ``Stream`` with its HTTP response): memory grows without bound with the
number of upstream errors.

Each test passes on main (98a6aba) and fails on s6-pump (c3a02c2). Measured: 2,000 solo
misses of 500 small chunks each failing at the end take RSS from 96 MB to 850 MB on s6-pump,
to 105 MB on main.
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from chengeta_ai import CacheManager
from chengeta_ai.backends.memory_backend import InMemoryBackend
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache


class Halt(BaseException):
    """A custom `BaseException` (not an `Exception`)."""


def _cache() -> StreamingResponseCache:
    return StreamingResponseCache(CacheManager(backend=InMemoryBackend()))


def _collect() -> None:
    for _ in range(3):
        gc.collect()


def test_a_failed_openai_stream_is_freed_with_its_flight(
    oai: openai.OpenAI, server: LocalOpenAIServer, text: str
) -> None:
    """A real OpenAI stream that fails mid-way (the server sends an error event after 5 chunks):
    once the caller has handled the error, the SDK `Stream` (and its HTTP response) and the
    flight are garbage. With SoloPull they stay alive for the life of the process."""
    cache = _cache()
    streams: list[weakref.ref[Any]] = []
    flights: list[weakref.ref[Any]] = []
    headers = {"x-chengeta-fail-after": "5", "x-chengeta-fail-mode": "error"}

    def stream_fn(messages: Any) -> Any:
        flights.extend(weakref.ref(f) for f in cache.flights.values())
        stream = oai.chat.completions.create(
            model="gpt-4o", messages=messages, stream=True, extra_headers=headers
        )
        streams.append(weakref.ref(stream))
        return stream

    got: list[Any] = []
    for attempt in range(3):
        messages = [{"role": "user", "content": f"{text} {attempt}"}]
        with pytest.raises(openai.APIError):
            for chunk in cache.get_or_stream(messages, stream_fn):
                got.append(chunk)
    assert len(got) == 15  # the chunks before each failure were forwarded live
    assert cache.stats()["upstream_errors"] == 3
    del got
    _collect()
    assert len(streams) == len(flights) == 3
    assert [r() for r in streams] == [None] * 3, "the SDK streams of failed misses leaked"
    assert [r() for r in flights] == [None] * 3, "the flights of failed misses leaked"


@pytest.mark.parametrize(
    "make_error",
    [
        pytest.param(lambda: ValueError("boom"), id="ValueError"),
        pytest.param(lambda: Halt("halt"), id="custom-BaseException"),
        pytest.param(lambda: SystemExit(3), id="SystemExit"),
        pytest.param(lambda: KeyboardInterrupt(), id="Ctrl-C-in-the-read"),
    ],
)
def test_memory_of_failed_misses_is_bounded(make_error: Any) -> None:
    """An upstream failing after a few chunks, 30 times: what each failed stream held (here a
    1 MB buffer owned by the upstream generator, standing for an HTTP response) is freed once
    the caller has handled the error. With SoloPull all 30 MB stay reachable."""
    cache = _cache()
    held: list[weakref.ref[Any]] = []

    class Buffer:
        def __init__(self) -> None:
            self.data = bytearray(1 << 20)

    def stream_fn(messages: Any) -> Iterator[str]:
        buffer = Buffer()
        held.append(weakref.ref(buffer))
        for i in range(4):
            yield f"{messages[0]['content']}-{i}-{len(buffer.data)}"
        raise make_error()

    for attempt in range(30):
        try:
            messages = [{"role": "user", "content": f"q{attempt}"}]
            for _chunk in cache.get_or_stream(messages, stream_fn):
                pass
        except BaseException as exc:
            assert type(exc) is type(make_error())
    assert cache.stats()["upstream_errors"] == 30
    _collect()
    alive = sum(r() is not None for r in held)
    assert alive == 0, f"{alive} of 30 failed streams' upstream buffers are still alive"


def test_a_failed_shared_stream_read_by_two_threads_is_freed() -> None:
    """The leader's pump was created while it was alone; a joiner from another thread arrives
    mid-stream, then the upstream fails: both threads get the error. Once both have handled
    it, the flight and the upstream are garbage (on main); with SoloPull in the leader's frame
    they stay alive."""
    cache = _cache()
    flights: list[weakref.ref[Any]] = []
    upstreams: list[weakref.ref[Any]] = []
    joined = threading.Event()
    errors: list[BaseException] = []
    counts: dict[str, int] = {}

    class Upstream:
        def __init__(self) -> None:
            self.i = 0

        def __iter__(self) -> Upstream:
            return self

        def __next__(self) -> str:
            self.i += 1
            if self.i == 20:
                joined.wait(10)  # the joiner is in before the failure
            if self.i == 40:
                raise ConnectionError("upstream dropped")
            return f"tok{self.i}"

    def stream_fn(_messages: Any) -> Upstream:
        flights.extend(weakref.ref(f) for f in cache.flights.values())
        upstream = Upstream()
        upstreams.append(weakref.ref(upstream))
        return upstream

    messages = [{"role": "user", "content": "shared failure"}]

    def read(name: str, signal_join: bool) -> None:
        n = 0
        try:
            stream = cache.get_or_stream(messages, stream_fn)
            if signal_join:
                joined.set()
            for _chunk in stream:
                n += 1
                if not signal_join and n == 5:
                    joiner.start()
        except ConnectionError as exc:
            errors.append(exc)
        counts[name] = n

    joiner = threading.Thread(target=read, args=("joiner", True))
    leader = threading.Thread(target=read, args=("leader", False))
    leader.start()
    leader.join(20)
    joiner.join(20)
    assert not leader.is_alive() and not joiner.is_alive()
    assert len(errors) == 2 and counts == {"leader": 39, "joiner": 39}
    assert cache.stats()["joins"] == 1
    errors.clear()
    _collect()
    assert [r() for r in upstreams] == [None], "the failed upstream leaked"
    assert [r() for r in flights] == [None], "the failed flight leaked"
