"""A worker process for test_s5b_join_in_other_process_after_removal: one cache (RedisBackend
+ RedisFlights, ``--prefix``), one caller of the prompt ``p`` whose upstream yields
``old-0..old-19`` 0.1 s apart; once the Redis key ``<prefix>go-late`` exists (the test process
removed the key), a second caller of the same prompt with an upstream yielding ``new``. Prints
one JSON line: the late caller's chunks and cache_info."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import anyio
import redis

from chengeta_ai import CacheKeyBuilder, CacheManager, RedisBackend, RedisFlights
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

PROMPT = [{"role": "user", "content": "p"}]


def main() -> None:
    url, prefix, mode = sys.argv[1:4]
    r = redis.Redis.from_url(url)
    backend = RedisBackend(url, prefix=prefix)
    rf = RedisFlights(url, prefix=prefix, lease=1.0, block=0.1)
    cache = StreamingResponseCache(
        CacheManager(backend=backend, key_builder=CacheKeyBuilder()), flights=rf
    )

    def go_late() -> None:
        while not r.exists(f"{prefix}go-late"):
            time.sleep(0.005)

    if mode == "threads":

        def old(_m: Any) -> Any:
            for i in range(20):
                time.sleep(0.1)
                yield f"old-{i}"

        first = cache.get_or_stream(PROMPT, old)
        t = threading.Thread(target=lambda: list(first))
        t.start()
        go_late()
        late = cache.get_or_stream(PROMPT, lambda _m: iter(["new"]))
        got = list(late)
        t.join()
        info = late.cache_info
    else:

        async def run() -> tuple[list[str], Any]:
            async def old(_m: Any) -> Any:
                for i in range(20):
                    await anyio.sleep(0.1)
                    yield f"old-{i}"

            async def new(_m: Any) -> Any:
                yield "new"

            async def read_first() -> None:
                [c async for c in cache.aget_or_stream(PROMPT, old)]

            async with anyio.create_task_group() as tg:
                tg.start_soon(read_first)
                await anyio.to_thread.run_sync(go_late)
                late = cache.aget_or_stream(PROMPT, new)
                got = [c async for c in late]
            return got, late.cache_info

        got, info = anyio.run(run, backend=mode)
    print(json.dumps({"late": got, "status": info.status, "outcome": info.outcome}), flush=True)
    rf.close()
    backend.close()


if __name__ == "__main__":
    main()
