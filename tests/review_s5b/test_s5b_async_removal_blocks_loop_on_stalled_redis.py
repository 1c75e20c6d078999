"""Finding (medium-low): an async removal (``adelete``/``ainvalidate``/``aclear``) through a
cache with `RedisFlights` makes its Redis round trip (the removal epoch INCR,
`_FleetRemovals.begin_removal` -> `RedisFlights.bump_epoch`) synchronously on the event loop's
thread. While Redis stalls (a frozen VM, a dropped path: here a real redis-server stopped with
SIGSTOP), every async removal freezes the whole event loop for the client's socket timeout
(1.1 s with the defaults, whatever the user's client says otherwise), and `bump_epoch` does not
consult or set the flights' ``down`` backoff, so every removal pays it again. The flights'
other Redis calls from async code go through a worker thread (`_async_stream.call`).

Fix direction: in `_aremoval`, run the listeners that do I/O in a worker thread
(``anyio.to_thread.run_sync``), and make `bump_epoch` skip Redis while ``down`` and set
``_down_until`` when it fails.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from chengeta_ai import (
    BackendError,
    CacheKeyBuilder,
    CacheManager,
    InMemoryBackend,
    RedisFlights,
)
from chengeta_ai.layers.streaming_cache import StreamingResponseCache
from redis_fixture import RedisServer


@pytest.fixture
def stalled(tmp_path: Path) -> Iterator[tuple[RedisServer, StreamingResponseCache]]:
    server = RedisServer(tmp_path)
    server.start()
    rf = RedisFlights(server.url, lease=1.0, block=0.1)
    cache = StreamingResponseCache(
        CacheManager(backend=InMemoryBackend(), key_builder=CacheKeyBuilder()), flights=rf
    )
    cache.manager.delete("warm-up")  # the client's connection is open
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        yield server, cache
    finally:
        server.proc.send_signal(signal.SIGCONT)
        rf.close()
        server.stop()


@pytest.mark.anyio
async def test_async_removal_gives_the_loop_back_while_redis_stalls(
    stalled: tuple[RedisServer, StreamingResponseCache],
) -> None:
    _, cache = stalled
    began = anyio.Event()
    other_ran = anyio.Event()
    seen: list[bool] = []

    async def remove() -> None:
        began.set()
        # (fixed: the announcement runs in a worker thread; it fails, and the removal says so)
        with pytest.raises(BackendError, match="could not be told"):
            await cache.manager.adelete("some-key")
        seen.append(other_ran.is_set())

    async def other_task() -> None:
        await began.wait()
        other_ran.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(remove)
        tg.start_soon(other_task)
    assert seen == [True], "the event loop ran nothing else during the removal's Redis call"
