# ruff: noqa
"""Review s5b probe (not a test): see the module body; run with .venv/bin/python."""

import random
import sys
import threading
import time

from chengeta_ai import CacheManager, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache


class SlowBackend(InMemoryBackend):
    def set(self, *a, **k):
        time.sleep(random.random() * 0.003)
        super().set(*a, **k)
        time.sleep(random.random() * 0.003)

    def delete(self, key):
        time.sleep(random.random() * 0.002)
        return super().delete(key)


backend = SlowBackend()
cache = StreamingResponseCache(CacheManager(backend=backend))
KEYS = ["a", "b", "c"]
gen = {k: 0 for k in KEYS}
min_ok = {k: 0 for k in KEYS}
lock = threading.Lock()
violations = []
stop = time.monotonic() + float(sys.argv[1] if len(sys.argv) > 1 else 10)


def reader():
    while time.monotonic() < stop:
        k = random.choice(KEYS)
        with lock:
            floor = min_ok[k]

        def up(_m, k=k):
            g = gen[k]
            for i in range(random.randint(1, 4)):
                if random.random() < 0.3:
                    time.sleep(0.001)
                yield g

        cc = {"no_cache": True} if random.random() < 0.1 else None
        s = cache.get_or_stream([k], up, model_id="m", cache_control=cc)
        try:
            got = []
            for c in s:
                got.append(c)
                if random.random() < 0.05:
                    break
        except Exception as e:
            violations.append(("exc", repr(e)))
            continue
        finally:
            close = getattr(s, "close", None)
            if close:
                close()
        if s.cache_info.status == "hit" and got and got[0] < floor:
            violations.append(("stale hit", k, got[0], floor))


def remover():
    while time.monotonic() < stop:
        k = random.choice(KEYS)
        with lock:
            gen[k] += 1
            g = gen[k]
        op = random.random() * float(sys.argv[3])
        if op < 0.6:
            cache.manager.delete(cache.manager.key_builder.build([k], "m"))
        elif op < 0.9:
            cache.manager.invalidate("model:m")
            with lock:
                for kk in KEYS:
                    gen[kk] += 1
        else:
            cache.manager.clear()
        with lock:
            if op < 0.6:
                min_ok[k] = max(min_ok[k], g)
            else:
                # streams begun before this removal started had gen < their value at start
                for kk in KEYS:
                    min_ok[kk] = max(min_ok[kk], gen[kk] - (1 if kk != k else 1))
        time.sleep(random.random() * 0.005)


ts = [threading.Thread(target=reader) for _ in range(8)] + [
    threading.Thread(target=remover) for _ in range(int(sys.argv[2]))
]
for t in ts:
    t.start()
for t in ts:
    t.join()
time.sleep(0.5)
print("violations", len(violations), violations[:5])
print(
    "stores", dict(cache.flights._stores), "live", cache.flights.live, "slots", len(cache.flights)
)
print(
    {
        k: v
        for k, v in cache.stats().as_dict().items()
        if k.startswith("not_stored") or k in ("stores", "hits", "misses")
    }
)
