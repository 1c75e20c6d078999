"""A worker process for the cross-process flight tests (and benches): one StreamingResponseCache
with RedisFlights and a RedisBackend, ``--consumers`` concurrent callers of one prompt per round.

Prints one JSON line per round: ``{"round", "calls", "results": [[chunks] | {"error", "at",
"chunks"}], "stats"}``. ``--barrier N``: every round starts when N workers reached it (a Redis
counter polled every 0.2 ms, so the workers start within about a millisecond of each other);
``--wait-entries N``: starts once the producer's log in Redis holds N entries (a late joiner).

Upstreams: ``--chunks`` chunks ``"<tag>-<round>-<i>"``, ``--delay`` seconds apart;
``--stall-before``: sleeps 60 s before the first chunk; ``--stall-after N``: after N chunks.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import anyio
import anyio.to_thread
import redis

from chengeta_ai import (
    CacheKeyBuilder,
    CacheManager,
    RedisBackend,
    RedisFlights,
    StreamingResponseCache,
)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--mode", choices=["asyncio", "trio", "threads"], default="asyncio")
    p.add_argument("--consumers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--barrier", type=int, default=0)
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--delay", type=float, default=0.001)
    p.add_argument("--tag", default="up")
    p.add_argument("--prompt", default="p")
    p.add_argument("--stall-before", action="store_true")
    p.add_argument("--stall-after", type=int, default=-1)
    p.add_argument("--lease", type=float, default=1.0)
    p.add_argument("--block", type=float, default=0.1)
    p.add_argument("--log-ttl", type=float, default=10.0)
    p.add_argument("--done-ttl", type=float, default=5.0)
    p.add_argument("--cluster", action="store_true")
    p.add_argument("--wait-entries", type=int, default=0)
    # benches: chunks are time.monotonic_ns() at upstream time, callers report latencies (ns)
    # and counts instead of chunks; --local: no RedisFlights (the in-process baseline)
    p.add_argument("--latency", action="store_true")
    p.add_argument("--local", action="store_true")
    p.add_argument("--quiet", action="store_true")  # report chunk counts, not chunks
    return p.parse_args()


class Up:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.calls = 0
        self.lock = threading.Lock()
        self.round = 0

    def names(self) -> list[str]:
        a = self.args
        return [f"{a.tag}-{self.round}-{i}" for i in range(a.chunks)]

    def sync(self, messages: Any) -> Any:
        with self.lock:
            self.calls += 1
        a = self.args
        if a.stall_before:
            time.sleep(60)
        for i, name in enumerate(self.names()):
            if i == a.stall_after:
                time.sleep(60)
            if a.delay:
                time.sleep(a.delay)
            yield time.monotonic_ns() if a.latency else name

    async def asyncgen(self, messages: Any) -> Any:
        with self.lock:
            self.calls += 1
        a = self.args
        if a.stall_before:
            await anyio.sleep(60)
        for i, name in enumerate(self.names()):
            if i == a.stall_after:
                await anyio.sleep(60)
            if a.delay:
                await anyio.sleep(a.delay)
            yield time.monotonic_ns() if a.latency else name


def make(args: argparse.Namespace) -> tuple[StreamingResponseCache, RedisBackend, RedisFlights]:
    if args.cluster:
        from redis.cluster import RedisCluster

        client: Any = RedisCluster.from_url(args.url)
        backend = RedisBackend(args.url, prefix="{" + args.prefix + "}", client=client)
        rf = RedisFlights(client, prefix=args.prefix, lease=args.lease, block=args.block)
    else:
        backend = RedisBackend(args.url, prefix=args.prefix)
        rf = RedisFlights(
            args.url,
            prefix=args.prefix,
            lease=args.lease,
            block=args.block,
            log_ttl=args.log_ttl,
            done_ttl=args.done_ttl,
        )
    manager = CacheManager(backend=backend, key_builder=CacheKeyBuilder())
    return StreamingResponseCache(manager, flights=None if args.local else rf), backend, rf


def barrier(client: Any, args: argparse.Namespace, r: int) -> None:
    if args.wait_entries:  # a late joiner: starts once the producer's log has this many entries
        pattern = f"{args.prefix}fl:*:log:*"
        while sum(int(client.xlen(k)) for k in client.scan_iter(match=pattern)) < args.wait_entries:
            time.sleep(0.001)
    if not args.barrier:
        return
    key = f"{args.prefix}barrier:{r}"
    client.incr(key)
    client.expire(key, 60)
    while int(client.get(key) or 0) < args.barrier:
        time.sleep(0.0002)


def summarise(got: list[Any], args: argparse.Namespace) -> Any:
    """The chunks, or under --latency their count and latencies (the first caller's only)."""
    if args.quiet:
        return len(got)
    if not args.latency:
        return got
    return {"n": len(got), "lat": got}


def outcome(chunks: list[Any], exc: BaseException | None) -> Any:
    if exc is None:
        return chunks
    return {"error": type(exc).__name__, "at": time.time(), "chunks": chunks}


def main() -> None:
    faulthandler.register(signal.SIGUSR1)  # a stuck worker's stacks, for debugging
    args = parse()
    cache, backend, rf = make(args)
    up = Up(args)
    client: Any = rf.client
    messages = [{"role": "user", "content": args.prompt}]
    print(json.dumps({"ready": os.getpid()}), flush=True)

    started = [0.0]

    def report(r: int, calls: int, results: list[Any]) -> None:
        elapsed = time.perf_counter() - started[0]
        stats = cache.stats().as_dict()
        stats.pop("manager", None)
        line = {
            "round": r,
            "calls": calls,
            "results": results,
            "stats": stats,
            "elapsed": elapsed,
            "flights": rf.stats(),
        }
        print(json.dumps(line), flush=True)

    def prompt(r: int) -> Any:
        return [{"role": "user", "content": f"{args.prompt}-{r}"}] if args.rounds > 1 else messages

    if args.mode == "threads":
        for r in range(args.rounds):
            up.round = r
            before = up.calls
            results: list[Any] = []
            msgs = prompt(r)
            barrier(client, args, r)
            started[0] = time.perf_counter()

            def caller(msgs: Any, results: list[Any]) -> None:
                got: list[Any] = []
                try:
                    for chunk in cache.get_or_stream(msgs, up.sync):
                        got.append(time.monotonic_ns() - chunk if args.latency else chunk)
                except Exception as exc:
                    results.append(outcome(got, exc))
                else:
                    results.append(summarise(got, args))

            threads = [
                threading.Thread(target=caller, args=(msgs, results)) for _ in range(args.consumers)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            report(r, up.calls - before, results)
    else:

        async def run() -> None:
            for r in range(args.rounds):
                up.round = r
                before = up.calls
                results: list[Any] = []
                msgs = prompt(r)
                await anyio.to_thread.run_sync(barrier, client, args, r)
                started[0] = time.perf_counter()

                async def caller(msgs: Any, results: list[Any]) -> None:
                    got: list[Any] = []
                    try:
                        async for chunk in cache.aget_or_stream(msgs, up.asyncgen):
                            got.append(time.monotonic_ns() - chunk if args.latency else chunk)
                    except Exception as exc:
                        results.append(outcome(got, exc))
                    else:
                        results.append(summarise(got, args))

                async with anyio.create_task_group() as tg:
                    for _ in range(args.consumers):
                        tg.start_soon(caller, msgs, results)
                report(r, up.calls - before, results)
            await backend.aclose()

        anyio.run(run, backend=args.mode)
    rf.close()
    backend.close()


if __name__ == "__main__":
    try:
        main()
    except redis.RedisError as exc:  # pragma: no cover - reported to the test
        print(json.dumps({"fatal": repr(exc)}), flush=True)
        raise
