"""Finding (medium): ``CacheManager.invalidate`` / ``delete`` / ``clear`` raise
``RuntimeError: Set changed size during iteration`` when another thread creates a streaming
cache over the same manager (or drops one) while the removal lists the manager's flight tables.

`CacheManager._begin_removal` iterates the `weakref.WeakSet` of listeners
(``list(self._removal_listeners)``: a Python-level generator over a set, with thread switches
between items) while `watch_removals` adds to it from another thread without a lock (and
`WeakSet.add` also commits pending removals). A cached SDK client or a cache made per request
in a threaded server races every removal. The removal fails with an error that is not a
`BackendError`, after some tables were told of it and others not.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

from chengeta_ai import CacheManager
from chengeta_ai.layers.streaming_cache import StreamingResponseCache


@pytest.fixture
def _fast_switches() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


@pytest.mark.usefixtures("_fast_switches")
def test_removals_while_another_thread_makes_caches_over_the_manager() -> None:
    manager = CacheManager()
    keep = [StreamingResponseCache(manager) for _ in range(300)]
    stop = threading.Event()

    def make_caches() -> None:
        made: list[StreamingResponseCache] = []
        while not stop.is_set():
            made.append(StreamingResponseCache(manager))
            if len(made) > 50:
                made.clear()  # dropped caches leave the weak set too

    maker = threading.Thread(target=make_caches)
    maker.start()
    errors: list[BaseException] = []
    try:
        for _ in range(300):
            try:
                manager.invalidate("model:gpt-4o")
            except RuntimeError as exc:
                errors.append(exc)
                break
    finally:
        stop.set()
        maker.join(10)
    assert keep
    assert errors == []


@pytest.mark.anyio
@pytest.mark.usefixtures("_fast_switches")
async def test_async_removals_while_another_thread_makes_caches_over_the_manager() -> None:
    manager = CacheManager()
    keep = [StreamingResponseCache(manager) for _ in range(300)]
    stop = threading.Event()

    def make_caches() -> None:
        made: list[StreamingResponseCache] = []
        while not stop.is_set():
            made.append(StreamingResponseCache(manager))
            if len(made) > 50:
                made.clear()

    maker = threading.Thread(target=make_caches)
    maker.start()
    errors: list[BaseException] = []
    try:
        for _ in range(300):
            try:
                await manager.ainvalidate("model:gpt-4o")
            except RuntimeError as exc:
                errors.append(exc)
                break
    finally:
        stop.set()
        maker.join(10)
    assert keep
    assert errors == []
