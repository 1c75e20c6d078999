"""A Ctrl-C (SIGINT) that arrives while the upstream's ``next()`` is returning its chunk is
lost when that chunk is the first to hold a nested model class not registered yet (the case
`chengeta_ai.models` documents for LiteLLM's ``Delta``/``Usage``: discovered by the encoder).

On main the pending signal is handled in `SyncFlight.consume` right after ``next(upstream)``
returns: the caller gets its KeyboardInterrupt, the flight fails, nothing is stored. With
`SoloPull` no Python frame runs between the read and the encoder, so the signal is handled
inside the encoder's discovery hook (`chengeta_ai.models._discover`, Python code called from
Rust): the KeyboardInterrupt is printed as "Exception ignored in: 'Inner'" and dropped, and the
stream goes on to its end and is stored as if nobody had pressed Ctrl-C.

Passes on main (98a6aba), fails on s6-pump (c3a02c2).
"""

from __future__ import annotations

import ctypes
import itertools
import operator
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import pydantic
import pytest

from chengeta_ai import CacheManager, register_model
from chengeta_ai.backends.memory_backend import InMemoryBackend
from chengeta_ai.layers.fanout import SyncFlight
from chengeta_ai.layers.streaming_cache import StreamingResponseCache


class S6Inner(pydantic.BaseModel):
    """Never registered: met inside a registered model, the encoder's hook discovers it."""

    x: int


class S6Outer(pydantic.BaseModel):
    """Registered; its ``payload`` holds run-time values of classes it does not declare."""

    i: int
    payload: Any = None


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to oneself")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_ctrl_c_after_a_read_reaches_the_caller_when_the_chunk_needs_discovery() -> None:
    register_model(S6Outer)
    cache = StreamingResponseCache(CacheManager(backend=InMemoryBackend()))
    messages = [{"role": "user", "content": "ctrl-c during discovery"}]
    head = [S6Outer(i=i) for i in range(3)]
    interrupted_chunk = S6Outer(i=3, payload=S6Inner(x=1))
    tail = [S6Outer(i=i) for i in range(4, 7)]
    pid = os.getpid()
    # libc's kill through ctypes: nothing checks for the signal on the way back, so it is
    # still pending when the read returns (see tests/test_solo_pull.py)
    kill = ctypes.CDLL(None, use_errno=True).kill

    def upstream(_: Any) -> Iterator[Any]:
        # C iterators only: the read of chunk 3 sends SIGINT, then returns the chunk
        sigint = map(kill, [pid], [int(signal.SIGINT)])
        read = map(operator.itemgetter(1), zip(sigint, [interrupted_chunk], strict=True))
        return itertools.chain(head, read, tail)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    got: list[Any] = []
    try:
        stream = cache.get_or_stream(messages, upstream)
        with pytest.raises(KeyboardInterrupt):
            for chunk in stream:
                got.append(chunk)
        stream.close()
    finally:
        signal.signal(signal.SIGINT, previous)
    # Ctrl-C reached the caller at the interrupted read (at the latest just after it)
    assert [c.i for c in got] in ([0, 1, 2], [0, 1, 2, 3])
    for flight in list(cache.flights.values()):
        assert isinstance(flight, SyncFlight)
        flight.wait_released()
    key = cache.manager.key_builder.build(messages, "default", None)
    assert cache.manager.get(key) is None  # on_abandon="cancel": the interrupted stream
    assert cache.stats()["stores"] == 0
