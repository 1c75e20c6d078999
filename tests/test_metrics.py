"""Typed stats, OpenTelemetry instruments, the Prometheus collector, rate-limited warnings."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest
from tests.helpers import Upstream, collect

from chengeta_ai import CacheManager, CacheStats, InMemoryBackend, ManagerStats
from chengeta_ai.core.stats import Counters, counter_names
from chengeta_ai.layers.streaming_cache import StreamingResponseCache
from chengeta_ai.logs import WARN_INTERVAL, warn
from chengeta_ai.metrics import PrometheusCollector

M = [{"role": "user", "content": "hi"}]
A = ["a1", "a2", "a3"]


def test_stats_are_a_typed_frozen_snapshot_that_reads_like_the_old_dict() -> None:
    cache = StreamingResponseCache(CacheManager(backend=InMemoryBackend()))
    list(cache.get_or_stream(M, Upstream(A).sync))
    list(cache.get_or_stream(M, Upstream(A).sync))
    stats = cache.stats()
    assert isinstance(stats, CacheStats) and isinstance(stats.manager, ManagerStats)
    assert (stats.hits, stats.misses, stats.stores, stats.in_flight) == (1, 1, 1, 0)
    assert stats["hits"] == 1 and stats["manager"]["sets"] == 1
    assert dict(stats)["stores"] == 1 and "hits" in stats and len(stats) == len(dict(stats))
    with pytest.raises(AttributeError):
        stats.hitz  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(KeyError):
        stats["hitz"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.hits = 5  # type: ignore[misc]
    assert json.loads(json.dumps(stats.as_dict()))["manager"]["sets"] == 1


def test_a_misspelt_counter_is_an_error_not_a_new_counter() -> None:
    counters = Counters(counter_names(CacheStats))
    counters.add("hits")
    with pytest.raises(KeyError):
        counters.add("hitz")
    cache = StreamingResponseCache(CacheManager())
    with pytest.raises(KeyError):
        cache.count("stores_")
    with pytest.raises(KeyError):
        cache.manager.count("set")
    assert "in_flight" not in counter_names(CacheStats)
    assert "backend" not in counter_names(ManagerStats)


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            assert sm.scope.name == "chengeta_ai"
            for metric in sm.metrics:
                out[metric.name] = list(metric.data.data_points)
    return out


@pytest.mark.anyio
async def test_opentelemetry_counters_and_histograms() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    cache = StreamingResponseCache(CacheManager(backend=InMemoryBackend()), meter_provider=provider)
    up = Upstream(A)
    assert await collect(cache.aget_or_stream(M, up.asyncgen)) == A  # miss, stored
    assert await collect(cache.aget_or_stream(M, up.asyncgen)) == A  # hit
    await collect(cache.aget_or_stream(M, up.asyncgen, cache_control={"no_store": True}))
    await collect(cache.aget_or_stream(M, up.asyncgen, bypass=True))
    points = _points(reader)
    streams = {p.attributes["cache.status"]: p.value for p in points["chengeta_ai.streams"]}
    assert streams == {"miss": 1, "hit": 2, "bypass": 1}
    outcomes = {
        (p.attributes["cache.status"], p.attributes["cache.outcome"]): p.value
        for p in points["chengeta_ai.stream.outcomes"]
    }
    assert outcomes == {("miss", "stored"): 1, ("hit", "replayed"): 2, ("bypass", "bypass"): 1}
    ttfc = {
        p.attributes["cache.status"]: p.count for p in points["chengeta_ai.time_to_first_chunk"]
    }
    assert ttfc == {"miss": 1, "hit": 2}
    (stored,) = points["chengeta_ai.stored_bytes"]
    assert stored.count == 1 and stored.sum == cache.stats().stored_bytes
    provider.shutdown()


def test_no_meter_provider_means_the_global_one_and_false_means_none() -> None:
    assert StreamingResponseCache(CacheManager())._metrics is not None
    assert StreamingResponseCache(CacheManager(), meter_provider=False)._metrics is None


def test_prometheus_collector_exposes_stats() -> None:
    cache = StreamingResponseCache(CacheManager(backend=InMemoryBackend()))
    up = Upstream(A)
    list(cache.get_or_stream(M, up.sync))
    list(cache.get_or_stream(M, up.sync))
    list(cache.get_or_stream(M, up.sync, model_id="x", cache_control={"no_store": True}))
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(cache))
    value = registry.get_sample_value
    assert value("chengeta_ai_streams_total", {"status": "hit"}) == 1
    assert value("chengeta_ai_streams_total", {"status": "miss"}) == 2
    assert value("chengeta_ai_not_stored_total", {"reason": "no_store"}) == 1
    assert value("chengeta_ai_stores_total") == 1
    assert value("chengeta_ai_stored_bytes_total") == cache.stats().stored_bytes
    assert value("chengeta_ai_manager_sets_total") == 1
    assert value("chengeta_ai_in_flight") == 0
    assert b"chengeta_ai_chunks_replayed_total 3.0" in generate_latest(registry)


def test_warnings_are_rate_limited_per_cause(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="chengeta_ai"):
        for i in range(5):
            warn("chengeta_ai: backend %s failed for %s", "get", f"k{i}", cause="get")
        warn("chengeta_ai: backend %s failed for %s", "set", "k", cause="set")
        warn("chengeta_ai: corrupt entry %s", "k")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "chengeta_ai: backend get failed for k0",
        "chengeta_ai: backend set failed for k",
        "chengeta_ai: corrupt entry k",
    ]


def test_a_rate_limited_cause_reports_what_it_suppressed(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import chengeta_ai.logs as logs

    clock = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="chengeta_ai"):
        for _ in range(4):
            warn("chengeta_ai: boom %s", 1)
        clock[0] += WARN_INTERVAL + 1
        warn("chengeta_ai: boom %s", 2)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "chengeta_ai: boom 1"
    assert messages[1].startswith("chengeta_ai: boom 2 (3 similar warnings suppressed")
    assert len(messages) == 2


def test_a_failing_backend_warns_once_per_cause_but_counts_every_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Down(InMemoryBackend):
        def get(self, key: str) -> bytes | None:
            raise ConnectionError("down")

    cache = StreamingResponseCache(CacheManager(backend=Down()))
    with caplog.at_level(logging.WARNING, logger="chengeta_ai"):
        for _ in range(10):
            assert list(cache.get_or_stream(M, Upstream(A).sync)) == A
    assert cache.stats().manager.backend_errors == 10
    assert sum("backend get failed" in r.getMessage() for r in caplog.records) == 1
