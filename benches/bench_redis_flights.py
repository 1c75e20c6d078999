"""RedisFlights across real processes on a real loopback redis-server, with baselines from the
same run.

- Latency upstream -> consumer (`time.monotonic_ns()`, one clock for every process on the
  machine): a consumer in *another* process (the follower) against a consumer of the same
  stream in the producer's process (in-process fan-out), and against Redis's own round trip
  (``PING``, redis-py, same client settings). Target: p99 within 2 ms of a round trip.
- Producer round trips per chunk: chunks arriving back to back (the writer batches what queued
  while a round trip was in flight) and one at a time (one round trip each, by design).
- Deliveries per second, 4 processes x 250 consumers, 1,000 chunks, against one process with
  the same 1,000 consumers in-process (no Redis).

Smoke mode (``--benchmark-disable``, `make test`) runs every path once on small sizes.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # redis_fixture

from chengeta_ai import CacheManager, InMemoryBackend, RedisFlights, StreamingResponseCache
from redis_fixture import RedisServer

WORKER = Path(__file__).resolve().parents[1] / "tests" / "redis_flights" / "worker.py"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-flights-bench"))
    server.start()
    yield server
    server.stop()


def run_workers(url: str, n: int, *argv: str, timeout: float = 300) -> list[dict[str, Any]]:
    """``n`` workers started together (a barrier); each one's single round."""
    prefix = f"b-{uuid.uuid4().hex[:8]}:"
    outs, procs = [], []
    for _ in range(n):
        out = Path(tempfile.mkstemp(prefix="chengeta-bench-", suffix=".out")[1])
        with out.open("w") as f:
            cmd = [sys.executable, str(WORKER), "--url", url, "--prefix", prefix]
            procs.append(subprocess.Popen([*cmd, "--barrier", str(n), *argv], stdout=f))
        outs.append(out)
    rounds = []
    for proc, out in zip(procs, outs, strict=True):
        proc.wait(timeout)
        lines = [json.loads(x) for x in out.read_text().splitlines() if x.startswith('{"round"')]
        out.unlink()
        assert proc.returncode == 0 and lines
        rounds.append(lines[0])
    return rounds


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_latency_to_a_consumer_in_another_process(
    redis_server: RedisServer, smoke: bool, summary: Callable[..., None]
) -> None:
    chunks = 50 if smoke else 1000
    reps = run_workers(
        redis_server.url, 2, "--latency", "--chunks", str(chunks), "--delay", "0.002"
    )
    leader = next(r for r in reps if r["stats"]["remote_leads"] == 1)
    follower = next(r for r in reps if r["stats"]["remote_joins"] == 1)
    local = [ns / 1000 for ns in leader["results"][0]["lat"]]
    remote = [ns / 1000 for ns in follower["results"][0]["lat"]]
    assert len(remote) == len(local) == chunks
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.ping()
        rtt = []
        for _ in range(200 if smoke else 5000):
            t = time.perf_counter_ns()
            client.ping()
            rtt.append((time.perf_counter_ns() - t) / 1000)
    finally:
        client.close()
    rows = {
        "other process": remote,
        "same process (in-process fan-out)": local,
        "redis PING round trip": rtt,
    }
    for name, values in rows.items():
        print(
            f"\n{name}: p50 {pct(values, 0.5):.0f} us, p99 {pct(values, 0.99):.0f} us, "
            f"mean {statistics.fmean(values):.0f} us"
        )
    summary(
        "latency upstream->consumer in another process, p50 / p99",
        f"{pct(remote, 0.5):.0f} / {pct(remote, 0.99):.0f} us",
        f"in-process {pct(local, 0.5):.0f} / {pct(local, 0.99):.0f} us",
        f"p99 +{pct(remote, 0.99) - pct(local, 0.99):.0f} us",
    )
    summary(
        "same, against a Redis round trip (PING) p50 / p99",
        f"{pct(remote, 0.5):.0f} / {pct(remote, 0.99):.0f} us",
        f"{pct(rtt, 0.5):.0f} / {pct(rtt, 0.99):.0f} us",
        f"p99 - RTT p99 = {(pct(remote, 0.99) - pct(rtt, 0.99)) / 1000:.2f} ms (target <= 2)",
    )


def _produce(url: str, chunks: int, delay: float) -> dict[str, int]:
    rf = RedisFlights(url, prefix=f"b-{uuid.uuid4().hex[:8]}:")
    cache = StreamingResponseCache(CacheManager(backend=InMemoryBackend()), flights=rf)

    def upstream(messages: Any) -> Iterator[int]:
        for i in range(chunks):
            if delay:
                time.sleep(delay)
            yield i

    try:
        assert len(list(cache.get_or_stream([{"role": "user", "content": "x"}], upstream))) == (
            chunks
        )
    finally:
        rf.close()
    return rf.stats()


def test_producer_round_trips_per_chunk(
    redis_server: RedisServer, smoke: bool, summary: Callable[..., None]
) -> None:
    n = 100 if smoke else 5000
    back_to_back = _produce(redis_server.url, n, 0.0)
    one_at_a_time = _produce(redis_server.url, 20 if smoke else 200, 0.005)
    b2b = back_to_back["producer_round_trips"] / back_to_back["chunks_published"]
    single = one_at_a_time["producer_round_trips"] / one_at_a_time["chunks_published"]
    print(f"\nproducer round trips per chunk: back to back {b2b:.3f}, one at a time {single:.3f}")
    print(f"back to back: {back_to_back}\none at a time: {one_at_a_time}")
    summary(
        "producer round trips per chunk, back to back / one at a time",
        f"{b2b:.3f} / {single:.2f}",
        "one per chunk: 1 / 1",
        f"{1 / b2b:.0f}x fewer / -",
    )


def test_deliveries_per_second_4_processes(
    redis_server: RedisServer, smoke: bool, summary: Callable[..., None]
) -> None:
    consumers, chunks = (10, 50) if smoke else (250, 1000)
    argv = ("--quiet", "--delay", "0", "--chunks", str(chunks))
    fleet = run_workers(redis_server.url, 4, "--consumers", str(consumers), *argv)
    assert all(n == chunks for r in fleet for n in r["results"])
    assert sum(r["calls"] for r in fleet) == 1
    fleet_rate = 4 * consumers * chunks / max(r["elapsed"] for r in fleet)
    (alone,) = run_workers(redis_server.url, 1, "--local", "--consumers", str(4 * consumers), *argv)
    alone_rate = 4 * consumers * chunks / alone["elapsed"]
    print(f"\ndeliveries/s: 4 processes {fleet_rate:,.0f}, one process {alone_rate:,.0f}")
    summary(
        f"deliveries/s, 4 processes x {consumers} consumers, {chunks} chunks",
        f"{fleet_rate / 1e6:.2f} M/s",
        f"1 process x {4 * consumers}, in-process: {alone_rate / 1e6:.2f} M/s",
        f"{fleet_rate / alone_rate:.2f}x",
    )


def test_keys_left_after_streams_with_random_producer_kills(
    redis_server: RedisServer, smoke: bool, summary: Callable[..., None]
) -> None:
    """Streams run by worker processes that are SIGKILLed at random moments (mid-stream, mid
    store, between streams): every flight key carries a TTL whenever looked at, and once the
    longest TTL has passed none is left."""
    target = 30 if smoke else 1000
    rng = random.Random(7)
    prefix = f"k-{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(redis_server.url)
    done = kills = launches = without_ttl = 0
    try:
        while done < target:
            out = Path(tempfile.mkstemp(prefix="chengeta-bench-", suffix=".out")[1])
            argv = [
                *(sys.executable, str(WORKER), "--url", redis_server.url, "--prefix", prefix),
                *("--rounds", str(target - done), "--chunks", "5", "--delay", "0.004"),
                *("--quiet", "--prompt", f"launch-{launches}", "--consumers", "2"),
                *("--lease", "0.5", "--log-ttl", "1", "--done-ttl", "0.5"),
            ]
            with out.open("w") as f:
                proc = subprocess.Popen(argv, stdout=f)
            launches += 1
            while "ready" not in out.read_text():
                time.sleep(0.01)
            time.sleep(rng.uniform(0.05, 0.6))
            if proc.poll() is None:
                proc.kill()
                kills += 1
            proc.wait(30)
            done += sum(1 for x in out.read_text().splitlines() if x.startswith('{"round"'))
            out.unlink()
            for k in client.scan_iter(match=f"{prefix}fl:*"):
                without_ttl += int(client.pttl(k)) == -1
        time.sleep(1.6)  # the longest flight TTL (log_ttl 1 s, lease 0.5 s) has passed
        left = sum(1 for _ in client.scan_iter(match=f"{prefix}fl:*"))
    finally:
        client.close()
    print(f"\n{done} streams, {kills} producer kills: {left} flight keys left after the TTLs")
    assert without_ttl == 0
    assert left == 0
    summary(
        f"flight keys left in Redis after {done} streams, {kills} random kills",
        f"{left} (after the TTLs)",
        "every key seen had a TTL",
        "-",
    )
