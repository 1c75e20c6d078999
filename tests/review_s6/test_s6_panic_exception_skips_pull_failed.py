"""An upstream that raises `pyo3_runtime.PanicException` of chengeta_ai's own core (an
upstream that is itself driven by chengeta_ai's Rust code, e.g. a second cache layer's stream
or a `StreamDecoder`, in which a panic surfaced as that exception) is not failed by `SoloPull`.

`SoloPull.__next__` fetches the upstream's exception with PyO3's ``PyErr::take``, which
*resumes* a PanicException of its own crate as a Rust panic instead of returning it: the panic
unwinds out of ``__next__`` past ``_pull_failed`` (and past the pull lock's release, which only
`consume`'s ``_is_owned`` clean-up gives back). The flight is never failed, only abandoned by
its caller leaving: with ``on_abandon="finish"`` the drain reads the broken upstream on, sees
its end, and stores the truncated stream as a complete entry (then served as a hit); with
``"cancel"`` the failure is counted as ``abandoned_cancelled`` instead of ``upstream_errors``.

On main (98a6aba) the Python step catches it as any `BaseException` (``_pull_failed``: the
flight fails, nothing is stored, ``upstream_errors`` 1): passes there, fails on s6-pump
(c3a02c2). Every ``PanicException`` class loaded in the process is tried (one per PyO3
extension; which one is chengeta_ai's cannot be told apart by name).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from chengeta_ai import CacheManager
from chengeta_ai.backends.memory_backend import InMemoryBackend
from chengeta_ai.layers.fanout import SyncFlight
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

CHUNKS = [f"tok{i}" for i in range(6)]


def _cache(on_abandon: Any) -> StreamingResponseCache:
    return StreamingResponseCache(CacheManager(backend=InMemoryBackend()), on_abandon=on_abandon)


def _panic_exception_types() -> list[type[BaseException]]:
    # An upstream error fetched by the core first: PyO3 creates its PanicException class then.
    cache = _cache("cancel")

    def failing(_: Any) -> Iterator[str]:
        yield "a"
        yield "b"
        raise ValueError("warm-up")

    with pytest.raises(ValueError):
        list(cache.get_or_stream([{"role": "user", "content": "warm-up"}], failing))
    return [t for t in BaseException.__subclasses__() if t.__name__ == "PanicException"]


@pytest.mark.parametrize("on_abandon", ["cancel", "finish"])
def test_an_upstream_raising_a_core_panic_exception_fails_the_flight(on_abandon: Any) -> None:
    panic_types = _panic_exception_types()
    assert panic_types
    for panic in panic_types:
        cache = _cache(on_abandon)
        messages = [{"role": "user", "content": f"panic {on_abandon}"}]

        def upstream(_: Any, panic: type[BaseException] = panic) -> Iterator[str]:
            for i, chunk in enumerate(CHUNKS):
                if i == 3:
                    raise panic("the upstream's core panicked")
                yield chunk

        got: list[str] = []
        with pytest.raises(BaseException, match="panicked") as raised:
            for chunk in cache.get_or_stream(messages, upstream):
                got.append(chunk)
        assert type(raised.value).__name__ == "PanicException"
        assert got == CHUNKS[:3]
        for flight in list(cache.flights.values()):
            assert isinstance(flight, SyncFlight)
            flight.wait_released()
        key = cache.manager.key_builder.build(messages, "default", None)
        assert cache.manager.get(key) is None, f"truncated entry stored ({panic!r})"
        stats = cache.stats()
        assert stats["stores"] == 0
        assert stats["upstream_errors"] == 1, f"not counted as an upstream error ({panic!r})"
        assert stats["abandoned_cancelled"] == stats["abandoned_finished"] == 0
