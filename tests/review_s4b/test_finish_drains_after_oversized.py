"""Review s4b, finding: ``on_abandon="finish"`` still reads to the end a stream that becomes
unstorable after its last caller left (MEDIUM).

Fix b34b1a8 decides in `FlightState.consumer_left`, once, at the moment the last consumer
leaves: DRAIN if the stream will be stored (``not_stored is None``), else CANCEL. A caller who
leaves early (a client disconnecting after the first tokens: the usual case) leaves a stream
that is still storable, so it is drained; when the drained stream then exceeds
``max_entry_bytes`` (`FlightState.overflowed`: ``keep_from_store("oversized")``, it returns
only RELEASE) or meets an unserializable chunk, nothing revisits the decision: the upstream is
read to its end, tokens billed, for no consumer and no entry, which is exactly what the fix
meant to stop. The new backend bound (a53e7c3: ``CacheManager.store_bound``, the backend's own
``max_bytes``) is never told to the flight at all: a stream larger than
``InMemoryBackend(max_bytes=...)`` / ``SQLiteBackend(max_bytes=...)`` but within
``max_entry_bytes`` is drained to the end and only then refused as ``oversized``.

Observed on main: ``up.completed == 1`` (all 60 chunks read after the caller left), no store.

Fix direction: when ``keep_from_store`` runs on an abandoned, draining flight (no consumer
left, not publishing), turn the drain into a cancel (return CANCEL from the transition); and
give the flight's log the store bound (``min(max_entry_bytes, manager.store_bound())``) so that
a stream the backend cannot hold is known oversized while it runs.
"""

from __future__ import annotations

import random
import time

import anyio
import pytest
from tests.helpers import Upstream

from chengeta_ai import CacheManager, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

M = [{"role": "user", "content": "left early, grows too big"}]
#: ~12 KB in all, incompressible (the compact codec compresses: repeated text would fit)
CHUNKS = [random.Random(i).randbytes(100).hex() for i in range(60)]
BOUND = 2000


def over_max_entry_bytes() -> StreamingResponseCache:
    return StreamingResponseCache(
        CacheManager(backend=InMemoryBackend()), on_abandon="finish", max_entry_bytes=BOUND
    )


def over_backend_bound() -> StreamingResponseCache:
    return StreamingResponseCache(
        CacheManager(backend=InMemoryBackend(max_bytes=BOUND)), on_abandon="finish"
    )


CACHES = pytest.mark.parametrize(
    "new_cache", [over_max_entry_bytes, over_backend_bound], ids=["max_entry_bytes", "max_bytes"]
)


@CACHES
def test_a_drained_stream_that_grows_too_big_is_cancelled_threads(new_cache: object) -> None:
    cache = new_cache()  # type: ignore[operator]
    up = Upstream(CHUNKS, pause_at=1)
    stream = cache.get_or_stream(M, up.sync)
    assert next(stream) == CHUNKS[0]
    stream.close()  # the caller leaves: the stream is still small (storable): drained
    up.thread_gate.set()
    deadline = time.monotonic() + 10
    while (cache.stats().in_flight or up.closed == 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.stats().stores == 0
    # observed on main: 1 (every chunk read for nobody after the stream became unstorable)
    assert up.completed == 0, f"read {up.produced} chunks to the end for no consumer, no entry"


@CACHES
@pytest.mark.anyio
async def test_a_drained_stream_that_grows_too_big_is_cancelled_async(new_cache: object) -> None:
    cache = new_cache()  # type: ignore[operator]
    up = Upstream(CHUNKS, pause_at=1)
    up.gate = anyio.Event()
    stream = cache.aget_or_stream(M, up.asyncgen)
    assert await stream.__anext__() == CHUNKS[0]
    await stream.aclose()
    up.gate.set()
    with anyio.fail_after(10):
        while cache.stats().in_flight or up.closed == 0:
            await anyio.sleep(0.01)
    assert cache.stats().stores == 0
    assert up.completed == 0, f"read {up.produced} chunks to the end for no consumer, no entry"
