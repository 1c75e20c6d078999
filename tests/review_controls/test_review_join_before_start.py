"""Review: concurrent sync callers of one key can all fail with a bare ``AssertionError``.

`_get_or_stream` puts the leader's new `SyncFlight` in the table (`_join_or_lead`) and only
then gives it its upstream (``flight.start(stream_fn, messages)``, after counting the lead
under the counters' lock). A thread that joins in between and finds nobody pulling pulls
itself: `SyncFlight._pull_one` hits ``assert self._stream_fn is not None`` (under ``-O``:
``None(messages)``, a ``TypeError``), the flight fails with that error, and the leader and
every joiner get it instead of their stream; nothing is stored. No hook: plain calls from
threads released together by a barrier; a small switch interval makes the thread switch that
lands in the window frequent (on a loaded server it is rarer, not impossible: the leader
blocks on the counters' lock whenever another thread holds it). Before the fix: the first
failure within ~100 keys (0.3 s).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from chengeta_ai import CacheManager, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

CALLERS = 4
KEYS = 3000
BUDGET_SECONDS = 6.0


def test_concurrent_plain_callers_of_a_key_all_get_the_stream_threads() -> None:
    cache = StreamingResponseCache(CacheManager(backend=InMemoryBackend()))
    failures: list[BaseException] = []
    deadline = time.monotonic() + BUDGET_SECONDS
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for i in range(KEYS):
            if failures or time.monotonic() > deadline:
                break
            messages = [{"role": "user", "content": f"key {i}"}]
            barrier = threading.Barrier(CALLERS)

            def call(messages: Any = messages, barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                try:
                    got = list(cache.get_or_stream(messages, lambda m: iter(["a", "b"])))
                    if got != ["a", "b"]:
                        failures.append(AssertionError(f"wrong stream {got}"))
                except BaseException as exc:
                    failures.append(exc)

            threads = [threading.Thread(target=call) for _ in range(CALLERS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
    finally:
        sys.setswitchinterval(switch)
    assert not failures, f"{len(failures)} callers failed, e.g. {failures[0]!r}"
