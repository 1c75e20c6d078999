"""Review: ``only_if_cached`` raises `CacheMiss` for a stored key as a plain miss of it ends.

`_get_or_stream` skips the lookup when the key's slot is occupied (``slot not in
self.flights``, read without the table lock) and then asks the table to join; a flight that
stored its entry and frees its slot between the two (or is ended but not yet released) leaves
``only_if_cached`` with nothing to join and no lookup done: `CacheMiss` although the entry was
stored *before the call started*. No test hook: real threads spinning on one key while an
ordinary miss of it ends; each `CacheMiss` counted here had the entry in the backend before
the call. (Before the fix: 4 of 4 runs failed within ~6 s on the 2-core machine; the loop
stops after the key where the first one happened, or after `BUDGET_SECONDS`.)
"""

from __future__ import annotations

import threading
import time
from typing import Any

from chengeta_ai import CacheManager, CacheMiss, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

#: Keys tried at most, and for at most this long (the loop stops at the first wrong miss).
KEYS = 400
BUDGET_SECONDS = 10.0
SPINNERS = 6


def test_only_if_cached_never_misses_an_entry_stored_before_the_call_threads() -> None:
    backend = InMemoryBackend()
    cache = StreamingResponseCache(CacheManager(backend=backend))
    wrong: list[str] = []

    def upstream(messages: Any) -> Any:
        return iter(["a", "b"])

    deadline = time.monotonic() + BUDGET_SECONDS
    _spin_keys(cache, backend, upstream, wrong, deadline)
    assert not wrong, (
        f"{len(wrong)} only_if_cached calls raised CacheMiss for an entry stored before they "
        f"started, e.g. {wrong[0]}"
    )


def _spin_keys(
    cache: StreamingResponseCache,
    backend: InMemoryBackend,
    upstream: Any,
    wrong: list[str],
    deadline: float,
) -> None:
    for i in range(KEYS):
        if wrong or time.monotonic() > deadline:
            return
        messages = [{"role": "user", "content": f"key {i}"}]
        key = cache.manager.key_builder.build(messages, "default")
        stop = threading.Event()

        def spin(messages: Any = messages, key: str = key, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                stored_before = backend.get(key) is not None
                try:
                    got = list(
                        cache.get_or_stream(
                            messages, upstream, cache_control={"only_if_cached": True}
                        )
                    )
                except CacheMiss as exc:
                    if stored_before:
                        wrong.append(str(exc))
                except AssertionError:
                    pass  # the join-before-start race (test_review_join_before_start.py)
                else:
                    assert got == ["a", "b"]

        threads = [threading.Thread(target=spin) for _ in range(SPINNERS)]
        for t in threads:
            t.start()
        try:
            list(cache.get_or_stream(messages, upstream))
        except AssertionError:
            pass  # the join-before-start race (test_review_join_before_start.py)
        time.sleep(0.002)
        stop.set()
        for t in threads:
            t.join(10)
