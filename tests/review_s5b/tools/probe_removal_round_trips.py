# ruff: noqa
"""Review s5b probe (not a test): see the module body; run with .venv/bin/python."""

import statistics
import sys
import time
import uuid

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import redis

from chengeta_ai import CacheKeyBuilder, CacheManager, InMemoryBackend, RedisFlights
from chengeta_ai.layers.streaming_cache import StreamingResponseCache
from redis_fixture import RedisServer

srv = RedisServer()
srv.start()
try:
    rf = RedisFlights(srv.url, prefix=f"b-{uuid.uuid4().hex[:8]}:")
    cache = StreamingResponseCache(
        CacheManager(backend=InMemoryBackend(), key_builder=CacheKeyBuilder()), flights=rf
    )
    cl = redis.Redis.from_url(srv.url)
    real_epoch = rf.removed_at
    N = 3000

    def miss(i):
        t = time.perf_counter_ns()
        list(
            cache.get_or_stream(
                [{"role": "user", "content": f"x{i}-{uuid.uuid4().hex}"}], lambda m: iter([1, 2, 3])
            )
        )
        return (time.perf_counter_ns() - t) / 1000

    with_e, without_e, ping, elect_e, elect_0 = [], [], [], [], []
    for i in range(N):
        rf.removed_at = real_epoch
        with_e.append(miss(i))
        rf.removed_at = lambda ns, key=None: 0
        without_e.append(miss(i))
        t = time.perf_counter_ns()
        cl.ping()
        ping.append((time.perf_counter_ns() - t) / 1000)
        k = f"k{i}"
        t = time.perf_counter_ns()
        rf.elect(k, real_epoch("chengeta"))
        elect_e.append((time.perf_counter_ns() - t) / 1000)
        t = time.perf_counter_ns()
        rf.elect(k + "b", 0)
        elect_0.append((time.perf_counter_ns() - t) / 1000)
    med = statistics.median
    print(
        f"miss via RedisFlights, sync, 3 chunks: with epoch GETs p50 {med(with_e):.0f} us, without {med(without_e):.0f} us, ratio {med(with_e) / med(without_e):.3f}, delta {med(with_e) - med(without_e):.0f} us"
    )
    print(
        f"election alone: with epoch GET p50 {med(elect_e):.0f} us, without {med(elect_0):.0f} us (ratio {med(elect_e) / med(elect_0):.2f})"
    )
    print(f"PING p50 {med(ping):.0f} us")
    rf.close()
finally:
    srv.stop()
