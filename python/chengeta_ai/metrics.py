"""Metrics a server can export: OpenTelemetry instruments and a Prometheus collector.

OpenTelemetry (``pip install chengeta_ai[otel]``, i.e. ``opentelemetry-api``): every
`StreamingResponseCache` records, through the global ``MeterProvider`` (or the one given as
``meter_provider=``), on the meter ``chengeta_ai``:

================================  =========  ===============================================
instrument                        kind       attributes
================================  =========  ===============================================
``chengeta_ai.streams``           counter    ``cache.status``: hit, miss, join, bypass, refresh
``chengeta_ai.stream.outcomes``   counter    ``cache.status``, ``cache.outcome`` (`CacheOutcome`)
``chengeta_ai.time_to_first_chunk``  histogram (s)  ``cache.status``
``chengeta_ai.stored_bytes``      histogram (By)  (none): size of each stored entry
================================  =========  ===============================================

Without ``opentelemetry-api`` nothing is recorded and nothing is imported. Instruments are
touched once per stream (never per chunk).

Prometheus (``pip install chengeta_ai[prometheus]``): `PrometheusCollector` exposes a cache's
`stats()` on a ``prometheus_client`` registry at scrape time (no work per request)::

    from prometheus_client import REGISTRY
    REGISTRY.register(PrometheusCollector(cache))
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chengeta_ai.layers.streaming_cache import StreamingResponseCache

__all__ = ["PrometheusCollector", "StreamMetrics", "otel_metrics"]

_METER = "chengeta_ai"


class StreamMetrics:
    """The OpenTelemetry instruments of one cache."""

    __slots__ = ("_outcomes", "_stored", "_streams", "_ttfc")

    def __init__(self, meter: Any) -> None:
        self._streams = meter.create_counter(
            "chengeta_ai.streams", unit="{stream}", description="Calls, by cache status"
        )
        self._outcomes = meter.create_counter(
            "chengeta_ai.stream.outcomes",
            unit="{stream}",
            description="Ended calls, by cache status and outcome (stored, or why not)",
        )
        self._ttfc = meter.create_histogram(
            "chengeta_ai.time_to_first_chunk",
            unit="s",
            description="Time from the call to its first chunk, by cache status",
        )
        self._stored = meter.create_histogram(
            "chengeta_ai.stored_bytes", unit="By", description="Size of each stored entry"
        )

    def started(self, status: str) -> None:
        self._streams.add(1, {"cache.status": status})

    def first_chunk(self, status: str, seconds: float) -> None:
        self._ttfc.record(seconds, {"cache.status": status})

    def ended(self, status: str, outcome: str) -> None:
        self._outcomes.add(1, {"cache.status": status, "cache.outcome": outcome})

    def stored(self, nbytes: int) -> None:
        self._stored.record(nbytes)


def otel_metrics(meter_provider: Any = None) -> StreamMetrics | None:
    """Instruments on ``meter_provider`` (None: the global provider), or None when
    ``opentelemetry-api`` is not installed."""
    try:
        from opentelemetry import metrics
    except ImportError:
        return None
    from chengeta_ai import __version__

    if meter_provider is None:
        meter = metrics.get_meter(_METER, __version__)
    else:
        meter = meter_provider.get_meter(_METER, __version__)
    return StreamMetrics(meter)


#: Counters exposed per label rather than as metrics of their own.
_STATUS_COUNTERS = {
    "hits": "hit",
    "misses": "miss",
    "joins": "join",
    "bypasses": "bypass",
    "refreshes": "refresh",
}


class PrometheusCollector:
    """A ``prometheus_client`` collector of one cache's `stats()` (a custom collector: read at
    scrape time). Metrics, with ``prefix`` (default ``chengeta_ai``):

    - ``{prefix}_streams_total{status}``: calls by cache status;
    - ``{prefix}_not_stored_total{reason}``: streams not stored, by reason;
    - ``{prefix}_<counter>_total`` for every other counter of `CacheStats`
      (``stores``, ``stored_bytes``, ``chunks_replayed``, ...);
    - ``{prefix}_manager_<counter>_total`` for the manager's counters;
    - ``{prefix}_in_flight``: a gauge.
    """

    def __init__(self, cache: StreamingResponseCache, prefix: str = "chengeta_ai") -> None:
        self.cache = cache
        self.prefix = prefix

    def describe(self) -> list[Any]:
        return list(self.collect())

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from chengeta_ai.core.stats import CacheStats, ManagerStats, counter_names

        p = self.prefix
        stats = self.cache.stats()
        streams = CounterMetricFamily(f"{p}_streams", "Calls by cache status", labels=["status"])
        not_stored = CounterMetricFamily(
            f"{p}_not_stored", "Streams not stored, by reason", labels=["reason"]
        )
        others = []
        for name in counter_names(CacheStats):
            value = getattr(stats, name)
            if name in _STATUS_COUNTERS:
                streams.add_metric([_STATUS_COUNTERS[name]], value)
            elif name.startswith("not_stored_"):
                not_stored.add_metric([name.removeprefix("not_stored_")], value)
            else:
                others.append(CounterMetricFamily(f"{p}_{name}", f"CacheStats.{name}", value))
        yield streams
        yield not_stored
        yield from others
        for name in counter_names(ManagerStats):
            yield CounterMetricFamily(
                f"{p}_manager_{name}", f"ManagerStats.{name}", getattr(stats.manager, name)
            )
        yield GaugeMetricFamily(f"{p}_in_flight", "Streams in flight now", stats.in_flight)
