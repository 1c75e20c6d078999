"""RedisFlights across real processes (tests/redis_flights/worker.py) on a real redis-server:
one upstream call for a fleet, late joiners, kill -9 and SIGSTOP of the producer, Redis killed."""

from __future__ import annotations

import json
import signal
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

from chengeta_ai import CacheKeyBuilder, CacheManager, RedisBackend
from redis_fixture import RedisServer

WORKER = Path(__file__).with_name("worker.py")
LEASE = 1.0


class Worker:
    """A worker process; its output goes to a file (a pipe could fill up and block it)."""

    def __init__(self, url: str, prefix: str, *argv: str) -> None:
        self.out = Path(tempfile.mkstemp(prefix="chengeta-worker-", suffix=".out")[1])
        self.err = self.out.with_suffix(".err")
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER), "--url", url, "--prefix", prefix, *argv],
                stdout=out,
                stderr=err,
            )
        deadline = time.monotonic() + 30
        while "ready" not in self.out.read_text():
            assert self.proc.poll() is None, self.err.read_text()
            assert time.monotonic() < deadline, "worker did not start"
            time.sleep(0.01)

    def rounds(self, timeout: float = 60) -> list[dict[str, Any]]:
        self.proc.wait(timeout)
        assert self.proc.returncode == 0, self.err.read_text()
        lines = self.out.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith('{"round"')]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def remove_files(self) -> None:
        self.out.unlink(missing_ok=True)
        self.err.unlink(missing_ok=True)


@pytest.fixture
def prefix() -> str:
    return f"p-{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def spawn(flights_redis: RedisServer, prefix: str) -> Iterator[Callable[..., Worker]]:
    made: list[Worker] = []

    def start(*argv: str, url: str | None = None) -> Worker:
        w = Worker(url or flights_redis.url, prefix, "--lease", str(LEASE), *argv)
        made.append(w)
        return w

    yield start
    for w in made:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGCONT)
        w.kill()
        w.remove_files()


def names(tag: str, n: int, r: int = 0) -> list[str]:
    return [f"{tag}-{r}-{i}" for i in range(n)]


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def log_entries(client: redis.Redis, prefix: str) -> int:
    return sum(int(client.xlen(k)) for k in client.scan_iter(match=f"{prefix}fl:*:log:*"))


def stored(url: str, prefix: str, prompt: str = "p") -> Any:
    backend = RedisBackend(url, prefix=prefix)
    try:
        manager = CacheManager(backend=backend, key_builder=CacheKeyBuilder())
        key = manager.key_builder.build([{"role": "user", "content": prompt}], "default", None)
        return manager.get(key)
    finally:
        backend.close()


def assert_flight_keys_expire(client: redis.Redis, prefix: str) -> None:
    for k in client.scan_iter(match=f"{prefix}fl:*"):
        assert int(client.pttl(k)) > 0, k


@pytest.fixture
def client(flights_redis: RedisServer) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(flights_redis.url)
    yield c
    c.close()


@pytest.mark.parametrize(("mode", "rounds"), [("asyncio", 50), ("trio", 10), ("threads", 10)])
def test_four_processes_25_callers_one_upstream(
    spawn: Callable[..., Worker], client: redis.Redis, prefix: str, mode: str, rounds: int
) -> None:
    argv = ("--mode", mode, "--consumers", "25", "--rounds", str(rounds), "--barrier", "4")
    workers = [spawn(*argv, "--chunks", "30") for _ in range(4)]
    reports = [w.rounds(timeout=240) for w in workers]
    stores_before = [0] * 4
    for r in range(rounds):
        calls = sum(rep[r]["calls"] for rep in reports)
        assert calls == 1, (r, [rep[r]["calls"] for rep in reports])
        results = [res for rep in reports for res in rep[r]["results"]]
        assert len(results) == 100
        assert all(res == names("up", 30, r) for res in results), r
        stores = 0
        for i, rep in enumerate(reports):
            stores += rep[r]["stats"]["stores"] - stores_before[i]
            stores_before[i] = rep[r]["stats"]["stores"]
        assert stores == 1, r
    assert sum(rep[-1]["stats"]["redis_fallbacks"] for rep in reports) == 0
    assert_flight_keys_expire(client, prefix)


def test_late_joiner_in_another_process_gets_every_chunk(
    spawn: Callable[..., Worker], client: redis.Redis, prefix: str
) -> None:
    late = spawn("--consumers", "3", "--mode", "trio", "--wait-entries", "5")
    producer = spawn("--consumers", "2", "--chunks", "30", "--delay", "0.02")
    (p,) = producer.rounds()
    (f,) = late.rounds()
    assert p["calls"] == 1 and f["calls"] == 0
    assert p["results"] == [names("up", 30)] * 2
    assert f["results"] == [names("up", 30)] * 3
    assert f["stats"]["remote_joins"] == 1


def test_kill9_producer_followers_with_chunks_get_upstream_lost(
    spawn: Callable[..., Worker], client: redis.Redis, prefix: str, flights_redis: RedisServer
) -> None:
    followers = [
        spawn("--consumers", "3", "--mode", mode, "--wait-entries", "1")
        for mode in ("asyncio", "threads")
    ]
    producer = spawn("--consumers", "2", "--stall-after", "10")
    time.sleep(0.5)  # the followers have the 10 chunks
    killed_at = time.time()
    producer.kill()
    for w in followers:
        (f,) = w.rounds()
        assert f["calls"] == 0
        for res in f["results"]:
            assert res["error"] == "UpstreamLost"
            assert res["chunks"] == names("up", 10)
            assert res["at"] - killed_at <= LEASE + 1.0
        assert f["stats"]["upstream_lost"] >= 1
    assert stored(flights_redis.url, prefix) is None  # nothing truncated is stored
    (again,) = spawn("--consumers", "2").rounds()  # the next call streams afresh
    assert again["calls"] == 1 and again["results"] == [names("up", 20)] * 2
    assert stored(flights_redis.url, prefix) == names("up", 20)
    assert_flight_keys_expire(client, prefix)


def test_kill9_before_any_chunk_followers_elect_a_new_producer(
    spawn: Callable[..., Worker], client: redis.Redis, prefix: str
) -> None:
    producer = spawn("--consumers", "2", "--stall-before")
    wait_for(lambda: bool(list(client.scan_iter(match=f"{prefix}fl:*:lease"))))
    followers = [spawn("--consumers", "3", "--mode", m) for m in ("asyncio", "trio", "threads")]
    time.sleep(0.3)
    producer.kill()
    reports = [w.rounds()[0] for w in followers]
    assert sum(r["calls"] for r in reports) == 1  # one of them took over
    for r in reports:
        assert r["results"] == [names("up", 20)] * 3


def test_stale_producer_paused_past_its_lease_cannot_append_or_store(
    spawn: Callable[..., Worker], client: redis.Redis, prefix: str, flights_redis: RedisServer
) -> None:
    stale = spawn("--consumers", "2", "--chunks", "40", "--delay", "0.03", "--tag", "stale")
    wait_for(lambda: log_entries(client, prefix) >= 3)
    stale.signal(signal.SIGSTOP)
    frozen_entries = log_entries(client, prefix)
    time.sleep(LEASE + 0.5)
    (fresh,) = spawn("--consumers", "2", "--tag", "fresh").rounds()
    assert fresh["calls"] == 1 and fresh["results"] == [names("fresh", 20)] * 2
    assert stored(flights_redis.url, prefix) == names("fresh", 20)
    entries_after_fresh = log_entries(client, prefix)
    stale.signal(signal.SIGCONT)
    (old,) = stale.rounds()
    # its own callers still get their whole stream; it neither appended nor stored
    assert old["results"] == [names("stale", 40)] * 2
    assert old["stats"]["fenced"] == 1 and old["stats"]["stores"] == 0
    assert log_entries(client, prefix) <= entries_after_fresh
    assert frozen_entries >= 3
    assert stored(flights_redis.url, prefix) == names("fresh", 20)


def test_redis_killed_mid_stream_every_caller_gets_every_chunk(
    spawn: Callable[..., Worker], tmp_path: Path, prefix: str
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        own = redis.Redis.from_url(server.url)
        follower = spawn(
            "--consumers",
            "3",
            "--mode",
            "trio",
            "--wait-entries",
            "3",
            "--chunks",
            "40",
            url=server.url,
        )
        threads = spawn(
            "--consumers",
            "3",
            "--mode",
            "threads",
            "--wait-entries",
            "3",
            "--chunks",
            "40",
            url=server.url,
        )
        producer = spawn("--consumers", "3", "--chunks", "40", "--delay", "0.02", url=server.url)
        wait_for(lambda: log_entries(own, prefix) >= 8)
        own.close()
        time.sleep(0.05)
        server.kill()
        for w in (producer, follower, threads):
            (r,) = w.rounds()
            assert r["results"] == [names("up", 40)] * 3
        assert r["stats"]["redis_fallbacks"] >= 1
    finally:
        server.stop()
