"""The miss path's per-chunk steps, before and after `SoloPull` / `AsyncPump` (issue 7, item 4),
interleaved in one process: the caller's CPU time per chunk (``time.thread_time``, so that other
jobs on the machine weigh less) from the call to the last chunk in hand, over the bare upstream,
for 5,000 chunks. "old" runs main's Python steps (the sync pull branch, the async ``_pump``
loop, copied below); "new" this tree's.

    .venv/bin/python scripts/probe_miss_steps.py MODE KIND [ROUNDS]

MODE: sync, asyncio or trio; KIND: str or openai.

Run on a release build (``make build-release``).
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benches.streams import MODEL, async_upstream, chunks, fresh_messages, new_cache, sync_upstream

from chengeta_ai.layers import fanout
from chengeta_ai.layers.fanout import (
    _NO_HEADROOM,
    _OVERFLOWED,
    _UNENCODED,
    CHECKPOINT_EVERY,
    UNENCODED_CHUNK_BYTES,
    AsyncFlight,
)


async def old_pump(self: Any, upstream: Any) -> None:
    """`AsyncFlight._pump` before `AsyncPump`."""
    read = upstream.__anext__
    append = self.append
    record = self._record
    since_checkpoint = 0
    while True:
        try:
            chunk = await read()
        except StopAsyncIteration:
            if since_checkpoint:
                await anyio.lowlevel.checkpoint()
            return
        encoder = self._core_encoder
        if encoder is not None:
            bits = record(chunk, encoder, UNENCODED_CHUNK_BYTES)
            if bits & (_OVERFLOWED | _UNENCODED):
                self._after_record(bits)
                await anyio.lowlevel.checkpoint_if_cancelled()
        else:
            bits = append(chunk)
        if self._data is not None:
            self._wake_data()
        since_checkpoint += 1
        if (bits & _NO_HEADROOM and await self._hold()) or since_checkpoint >= CHECKPOINT_EVERY:
            if since_checkpoint >= CHECKPOINT_EVERY:
                await anyio.lowlevel.checkpoint()
            since_checkpoint = 0


class NoSoloPull:
    """A `SoloPull` that is spent at once: `SyncFlight.consume` runs main's Python step."""

    taken = 0
    spent = True

    def __init__(self, *args: Any) -> None:
        pass

    def __iter__(self) -> Any:
        return iter(())


NEW_PUMP, NEW_SOLO = AsyncFlight._pump, fanout.SoloPull
N = 5000


def main() -> None:
    mode, kind = sys.argv[1], sys.argv[2]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 11
    items = chunks(N) if kind == "openai" else [f"tok{i} " for i in range(N)]
    afn, sfn = async_upstream(items), sync_upstream(items)
    cache = new_cache()
    res: dict[str, list[float]] = {"bare": [], "old": [], "new": []}

    def use(side: str) -> None:
        fanout.SoloPull = NEW_SOLO if side == "new" else NoSoloPull  # type: ignore[misc]
        AsyncFlight._pump = NEW_PUMP if side == "new" else old_pump  # type: ignore[method-assign]

    def run_sync(make: Any) -> float:
        gc.collect()
        clock = time.thread_time
        t = last = clock()
        for i, _ in enumerate(make()):
            if i == N - 1:
                last = clock()  # the last chunk in hand (the store after it is not timed)
        return (last - t) / N * 1e6

    async def run_async(make: Any) -> float:
        gc.collect()
        clock = time.thread_time
        t = last = clock()
        i = 0
        async for _ in make():
            i += 1
            if i == N:
                last = clock()
        return (last - t) / N * 1e6

    async def run_all() -> None:
        for _ in range(rounds):
            res["bare"].append(await run_async(lambda: afn(None)))
            for side in ("old", "new"):
                use(side)
                res[side].append(
                    await run_async(
                        lambda: cache.aget_or_stream(fresh_messages(), afn, model_id=MODEL)
                    )
                )

    if mode == "sync":
        for _ in range(rounds):
            res["bare"].append(run_sync(lambda: sfn(None)))
            for side in ("old", "new"):
                use(side)
                res[side].append(
                    run_sync(lambda: cache.get_or_stream(fresh_messages(), sfn, model_id=MODEL))
                )
    else:
        anyio.run(run_all, backend=mode)
    bare = statistics.median(res["bare"])
    old, new = (statistics.median(res[s]) - bare for s in ("old", "new"))
    print(
        f"{mode:7} {kind:6}: old {old:.3f}  new {new:.3f} us/chunk over the upstream "
        f"({bare:.3f})  new/old {new / old:.2f}x"
    )


if __name__ == "__main__":
    main()
