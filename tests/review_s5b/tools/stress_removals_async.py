# ruff: noqa
"""Review s5b probe (not a test): see the module body; run with .venv/bin/python."""

import random
import sys
import time

import anyio

from chengeta_ai import CacheManager, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache


class SlowBackend(InMemoryBackend):
    async def aset(self, key, value, ttl=None, tags=()):
        await anyio.sleep(random.random() * 0.003)
        InMemoryBackend.set(self, key, value, ttl, tags)
        await anyio.sleep(random.random() * 0.003)

    async def adelete(self, key):
        await anyio.sleep(random.random() * 0.002)
        return InMemoryBackend.delete(self, key)


lib, secs, removers = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
backend = SlowBackend()
m = CacheManager(backend=backend)
caches = [StreamingResponseCache(m), StreamingResponseCache(m, on_abandon="finish")]
KEYS = ["a", "b", "c"]
gen = {k: 0 for k in KEYS}
min_ok = {k: 0 for k in KEYS}
viol = []


async def reader(stop):
    while time.monotonic() < stop:
        k = random.choice(KEYS)
        floor = min_ok[k]
        cache = random.choice(caches)

        async def up(_m, k=k):
            g = gen[k]
            for i in range(random.randint(1, 4)):
                if random.random() < 0.3:
                    await anyio.sleep(0.001)
                yield g

        cc = {"no_cache": True} if random.random() < 0.1 else None
        got = []
        with anyio.move_on_after(random.choice([0.0005, 0.002, 1.0, 1.0, 1.0])):
            s = cache.aget_or_stream([k], up, model_id="m", cache_control=cc)
            try:
                async for c in s:
                    got.append(c)
                    if random.random() < 0.05:
                        break
            finally:
                await s.aclose()
            if s.cache_info.status == "hit" and got and got[0] < floor:
                viol.append((k, got[0], floor))


async def remover(stop):
    while time.monotonic() < stop:
        k = random.choice(KEYS)
        gen[k] += 1
        g = gen[k]
        with anyio.CancelScope() as sc:
            if random.random() < 0.1:
                sc.cancel()  # a cancelled removal
            await m.adelete(m.key_builder.build([k], "m"))
        if not sc.cancelled_caught:
            min_ok[k] = max(min_ok[k], g)
        await anyio.sleep(random.random() * 0.005)


async def main():
    stop = time.monotonic() + secs
    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(reader, stop)
        for _ in range(removers):
            tg.start_soon(remover, stop)
    await anyio.sleep(0.5)
    for c in caches:
        print(
            lib, "stores", dict(c.flights._stores), "live", c.flights.live, "slots", len(c.flights)
        )
    print(lib, "violations", len(viol), viol[:5])
    print(
        {
            k: v
            for k, v in caches[1].stats().as_dict().items()
            if (k.startswith("not_stored") and v) or k in ("stores", "hits")
        }
    )


anyio.run(main, backend=lib)
