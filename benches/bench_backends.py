"""Backends under a realistic load: encoded 500- and 5,000-chunk OpenAI streams.

Per backend (memory = the baseline, measured in the same run; sqlite on a real file; redis on
a real loopback server started here): raw fetch of the encoded bytes, hit time to first
chunk (fetch + decode the first batch), full replay (fetch + decode every chunk), store
latency (one entry with 2 tags), and Redis round trips per hit and per store. Ratios to the
memory baseline are printed at the end.

    make bench                                       # for real
    pytest benches/bench_backends.py --benchmark-disable   # smoke: each body once
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # redis_fixture

from chengeta_ai.backends.memory_backend import InMemoryBackend
from chengeta_ai.backends.redis_backend import RedisBackend
from chengeta_ai.backends.sqlite_backend import SQLiteBackend
from chengeta_ai.core.cache_manager import CacheManager
from chengeta_ai.layers.streaming_cache import StreamingResponseCache
from chengeta_ai.serializers import CompactSerializer
from chengeta_ai.testing import openai_chunks
from redis_fixture import RedisServer

BACKENDS = ["memory", "sqlite", "redis"]
SIZES = [500, 5000]
TAGS = ("model:gpt-4o", "user:42")
SERIALIZER = CompactSerializer()
_results: dict[tuple[str, str, int], float] = {}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def encoded() -> dict[int, bytes]:
    out = {}
    for n in SIZES:
        sink = SERIALIZER.stream_encoder()
        for chunk in openai_chunks(n):
            sink.push(chunk)
        out[n] = sink.finish()
    return out


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend(kind: str, tmp_path: Path, redis_server: RedisServer) -> Iterator[Any]:
    if kind == "memory":
        b: Any = InMemoryBackend()
    elif kind == "sqlite":
        b = SQLiteBackend(tmp_path / "bench.sqlite3")
    else:
        b = RedisBackend(redis_server.url, prefix="bench:")
    yield b
    b.clear()
    b.close()


def _record(benchmark: Any, op: str, kind: str, n: int) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        _results[(op, kind, n)] = stats.stats.median


@pytest.fixture(scope="module", autouse=True)
def _ratio_table() -> Iterator[None]:
    yield
    if not _results:
        return
    print("\n\nbackend medians (ratio to memory in the same run)")
    for op, n in itertools.product(
        ("fetch", "ttfc", "replay", "store", "stream-ttfc", "stream-replay"), SIZES
    ):
        base = _results.get((op, "memory", n))
        cells = []
        for kind in BACKENDS:
            t = _results.get((op, kind, n))
            if t is not None:
                ratio = f" x{t / base:.1f}" if base else ""
                cells.append(f"{kind} {t * 1e6:9.1f} us{ratio}")
        print(f"  {op:13} {n:5} chunks: " + " | ".join(cells))


@pytest.mark.parametrize("n", SIZES)
def test_hit_time_to_first_chunk(
    benchmark: Any, backend: Any, kind: str, encoded: dict[int, bytes], n: int
) -> None:
    backend.set("k", encoded[n], None, TAGS)

    def first_chunk() -> Any:
        data = backend.get("k")
        return next(SERIALIZER.iter_batches(data, 64))[0]

    assert benchmark(first_chunk).choices[0].delta.role == "assistant"
    _record(benchmark, "ttfc", kind, n)


@pytest.mark.parametrize("n", SIZES)
def test_hit_full_replay(
    benchmark: Any, backend: Any, kind: str, encoded: dict[int, bytes], n: int
) -> None:
    backend.set("k", encoded[n], None, TAGS)

    def replay() -> int:
        data = backend.get("k")
        return sum(len(batch) for batch in SERIALIZER.iter_batches(data))

    assert benchmark(replay) == n + 2
    _record(benchmark, "replay", kind, n)


@pytest.mark.parametrize("n", SIZES)
def test_hit_fetch_only(
    benchmark: Any, backend: Any, kind: str, encoded: dict[int, bytes], n: int
) -> None:
    """The backend's own share of a hit: fetching the encoded bytes, no decoding."""
    backend.set("k", encoded[n], None, TAGS)
    assert benchmark(backend.get, "k") == encoded[n]
    _record(benchmark, "fetch", kind, n)


@pytest.mark.parametrize("n", SIZES)
def test_store(benchmark: Any, backend: Any, kind: str, encoded: dict[int, bytes], n: int) -> None:
    keys = (f"k{i}" for i in itertools.count())
    benchmark(lambda: backend.set(next(keys), encoded[n], 3600, TAGS))
    _record(benchmark, "store", kind, n)


@pytest.mark.parametrize("n", SIZES)
def test_streaming_cache_hit(benchmark: Any, backend: Any, kind: str, n: int) -> None:
    """The user's view: `get_or_stream` on a hit, first chunk and whole stream."""
    chunks = list(openai_chunks(n))
    cache = StreamingResponseCache(CacheManager(backend=backend))
    messages = [{"role": "user", "content": f"bench {n}"}]
    assert list(cache.get_or_stream(messages, lambda m: iter(chunks), model_id="m")) == chunks
    assert cache.stats()["stores"] == 1

    def first() -> Any:
        for chunk in cache.get_or_stream(messages, lambda m: iter(()), model_id="m"):
            return chunk  # leaving the loop closes the replay at once (refcount)
        raise AssertionError("miss")

    assert first() == chunks[0]
    benchmark(first)
    _record(benchmark, "stream-ttfc", kind, n)
    times = []
    for _ in range(3):  # best of 3: one GC pass can double a single replay
        t0 = time.perf_counter()
        replayed = sum(1 for _ in cache.get_or_stream(messages, lambda m: iter(()), model_id="m"))
        times.append(time.perf_counter() - t0)
        assert replayed == len(chunks)
    _results[("stream-replay", kind, n)] = min(times)


def test_redis_round_trips_per_hit_and_store(
    redis_server: RedisServer, encoded: dict[int, bytes]
) -> None:
    b = RedisBackend(redis_server.url, prefix="bench-rt:")
    b.set("warm", b"x")
    before = b.stats()["round_trips"]
    for i in range(100):
        b.set(f"k{i}", encoded[5000], 3600, TAGS)
    stores = b.stats()["round_trips"]
    for i in range(100):
        assert b.get(f"k{i}") is not None
    after = b.stats()["round_trips"]
    per_store, per_hit = (stores - before) / 100, (after - stores) / 100
    print(f"\nredis round trips: {per_hit:.2f} per hit, {per_store:.2f} per store (target 1 and 1)")
    assert per_hit == per_store == 1.0
    b.clear()
    b.close()
