"""Review: ``chengeta_ai.time_to_first_chunk`` of a paced hit leaves out the pacing.

The histogram is "Time from the call to its first chunk, by cache status" (metrics.py). A hit
with ``replay="recorded"`` hands its first chunk out after sleeping the recorded time to first
chunk (divided by ``speed``), but `_replay` / the async hit path record the histogram *before*
that sleep, when the first batch is decoded: a paced hit whose caller waited 0.3 s for its
first chunk is recorded as ~0 s. (Read with the OpenTelemetry SDK's in-memory reader.)
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from chengeta_ai import CacheManager, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

M = [{"role": "user", "content": "slow to start"}]
TTFC = 0.3
PACED = {"replay": "recorded"}


def slow_start(messages: Any) -> Iterator[str]:
    time.sleep(TTFC)
    yield "a1"
    yield "a2"


async def aslow_start(messages: Any) -> AsyncIterator[str]:
    await anyio.sleep(TTFC)
    yield "a1"
    yield "a2"


def hit_ttfc_sum(reader: InMemoryMetricReader) -> float:
    data = reader.get_metrics_data()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name != "chengeta_ai.time_to_first_chunk":
                    continue
                for point in metric.data.data_points:
                    if dict(point.attributes or {}).get("cache.status") == "hit":
                        return float(point.sum)  # type: ignore[union-attr]
    raise AssertionError("no time_to_first_chunk recorded for the hit")


def new_cache() -> tuple[StreamingResponseCache, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    cache = StreamingResponseCache(
        CacheManager(backend=InMemoryBackend()),
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    return cache, reader


def test_a_paced_hit_records_the_time_its_first_chunk_was_handed_out_sync() -> None:
    cache, reader = new_cache()
    assert list(cache.get_or_stream(M, slow_start)) == ["a1", "a2"]
    start = time.perf_counter()
    stream = cache.get_or_stream(M, slow_start, cache_control=PACED)
    assert next(stream) == "a1"
    waited = time.perf_counter() - start
    assert stream.cache_info is not None and stream.cache_info.status == "hit"
    assert list(stream) == ["a2"]
    assert waited >= TTFC / 2  # the pacing itself works
    assert hit_ttfc_sum(reader) >= TTFC / 2, "the paced wait is missing from the histogram"


@pytest.mark.anyio
async def test_a_paced_hit_records_the_time_its_first_chunk_was_handed_out_async() -> None:
    cache, reader = new_cache()
    assert [c async for c in cache.aget_or_stream(M, aslow_start)] == ["a1", "a2"]
    start = time.perf_counter()
    stream = cache.aget_or_stream(M, aslow_start, cache_control=PACED)
    assert await stream.__anext__() == "a1"
    waited = time.perf_counter() - start
    assert [c async for c in stream] == ["a2"]
    assert waited >= TTFC / 2
    assert hit_ttfc_sum(reader) >= TTFC / 2, "the paced wait is missing from the histogram"
