"""Review: ``stats().in_flight`` (and the Prometheus gauge ``chengeta_ai_in_flight``) leaves out
streams still reading their upstream once they gave up their key's slot.

`CacheStats.in_flight` is "Streams in flight in this process now"; it is ``len(self.flights)``,
the table of *slots*. A stream superseded by a ``no_cache`` refresh leaves the table at once but
goes on reading its upstream for its consumers (README), so a server scraping the gauge sees 0
while an upstream call is open.
"""

from __future__ import annotations

from tests.helpers import Upstream

from chengeta_ai import CacheManager, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

M = [{"role": "user", "content": "still streaming"}]
A = ["a1", "a2", "a3"]


def test_a_superseded_stream_still_reading_counts_as_in_flight_sync() -> None:
    cache = StreamingResponseCache(CacheManager(backend=InMemoryBackend()))
    old = Upstream(A, pause_at=1)
    leader = cache.get_or_stream(M, old.sync)
    assert next(leader) == "a1"
    assert cache.stats().in_flight == 1
    refresh = cache.get_or_stream(M, Upstream(["b1"]).sync, cache_control={"no_cache": True})
    assert list(refresh) == ["b1"]
    try:
        # the old upstream is open and will be read for the leader
        assert old.closed == 0 and old.completed == 0
        assert cache.stats().in_flight == 1, "an open upstream stream is not counted"
    finally:
        old.thread_gate.set()
        assert list(leader) == A[1:]
