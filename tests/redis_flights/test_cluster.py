"""RedisFlights and RedisBackend on a real three-master Redis Cluster (redis-py's cluster
client): every key of a stream in one slot, the backend's hash-tagged prefix, and the
cross-process test (4 processes x 25 callers -> one upstream call, one store)."""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot

sys.path.insert(0, str(Path(__file__).resolve().parent))

from redis_cluster import RedisCluster3
from test_processes import Worker, names

from chengeta_ai import (
    CacheKeyBuilder,
    CacheManager,
    RedisBackend,
    RedisFlights,
    StreamingResponseCache,
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster3]:
    c = RedisCluster3(tmp_path_factory.mktemp("cluster"))
    c.start()
    yield c
    c.stop()


@pytest.fixture
def cluster_client(cluster: RedisCluster3) -> Iterator[Any]:
    client = RedisCluster.from_url(cluster.url)
    yield client
    client.close()


def test_a_streams_keys_share_one_slot(cluster_client: Any) -> None:
    rf = RedisFlights(cluster_client, prefix="c:")
    keys = [
        rf.lease_key("k1"),
        rf.base("k1") + ":gen",
        rf.log_key("k1", "1.ab"),
        rf.watchers_key("k1"),
    ]
    assert len({key_slot(k.encode()) for k in keys}) == 1
    slots = {key_slot(rf.lease_key(f"key-{i}").encode()) for i in range(50)}
    assert len(slots) > 10  # different keys spread over the shards


def test_flights_and_backend_work_through_the_cluster_client(cluster_client: Any) -> None:
    prefix = f"c-{uuid.uuid4().hex[:6]}:"
    backend = RedisBackend("cluster", prefix="{" + prefix + "}", client=cluster_client)
    manager = CacheManager(backend=backend, key_builder=CacheKeyBuilder())
    caches = [
        StreamingResponseCache(manager, flights=RedisFlights(cluster_client, prefix=prefix))
        for _ in range(2)
    ]
    calls = []

    def upstream(messages: Any) -> Iterator[str]:
        calls.append(1)
        for i in range(10):
            time.sleep(0.02)
            yield f"c{i}"

    messages = [{"role": "user", "content": "cluster"}]
    first: list[Any] = []
    producer = threading.Thread(
        target=lambda: first.extend(caches[0].get_or_stream(messages, upstream))
    )
    producer.start()
    time.sleep(0.1)
    follower = list(caches[1].get_or_stream(messages, upstream))  # joins through Redis
    producer.join(10)
    assert first == follower == [f"c{i}" for i in range(10)]
    assert len(calls) == 1
    assert caches[1].stats()["remote_joins"] == 1
    assert sum(c.stats()["redis_fallbacks"] for c in caches) == 0
    assert manager.get(manager.key_builder.build(messages, "default", None)) == follower


@pytest.mark.parametrize("mode", ["threads", "trio"])
def test_four_processes_on_the_cluster_one_upstream(
    cluster: RedisCluster3, mode: str, tmp_path: Path
) -> None:
    prefix = f"cp-{uuid.uuid4().hex[:6]}:"
    argv = ("--mode", mode, "--consumers", "25", "--rounds", "5", "--barrier", "4", "--cluster")
    workers = [Worker(cluster.url, prefix, "--lease", "1.0", *argv) for _ in range(4)]
    try:
        reports = [w.rounds(timeout=240) for w in workers]
    finally:
        for w in workers:
            w.kill()
            w.remove_files()
    stores_before = [0] * 4
    for r in range(5):
        assert sum(rep[r]["calls"] for rep in reports) == 1, r
        results = [res for rep in reports for res in rep[r]["results"]]
        assert len(results) == 100 and all(res == names("up", 20, r) for res in results)
        stores = 0
        for i, rep in enumerate(reports):
            stores += rep[r]["stats"]["stores"] - stores_before[i]
            stores_before[i] = rep[r]["stats"]["stores"]
        assert stores == 1, r
    assert sum(rep[-1]["stats"]["redis_fallbacks"] for rep in reports) == 0
