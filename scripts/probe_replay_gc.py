"""Sync 5,000-chunk hit that does not keep its chunks: collections per replay by generation
(``gc.callbacks``) and CPU / wall time per chunk (medians of 15 replays, each after an untimed
``gc.collect()``).

    .venv/bin/python scripts/probe_replay_gc.py                  # this tree
    PYTHONPATH=/tmp/old/python .venv/bin/python scripts/probe_replay_gc.py   # another tree:
    # git archive REV python | tar -x -C /tmp/old; copy this tree's _core*.so next to it
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from benches.streams import MODEL, chunks, fresh_messages, new_cache, sync_upstream

import chengeta_ai

N = 5000


def main() -> None:
    cache = new_cache()
    messages = fresh_messages()
    list(cache.get_or_stream(messages, sync_upstream(chunks(N)), model_id=MODEL))
    never = sync_upstream([])
    started = [0, 0, 0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[info["generation"]] += 1

    cols: list[tuple[int, ...]] = []
    cpu: list[float] = []
    wall: list[float] = []
    for _ in range(15):
        gc.collect()
        started[:] = [0, 0, 0]
        gc.callbacks.append(on_gc)
        c0, w0 = time.thread_time(), time.perf_counter()
        for _ in cache.get_or_stream(messages, never, model_id=MODEL):
            pass
        cpu.append((time.thread_time() - c0) / N * 1e6)
        wall.append((time.perf_counter() - w0) / N * 1e6)
        gc.callbacks.remove(on_gc)
        cols.append(tuple(started))
    print(chengeta_ai.__file__)
    print(
        "collections gen0/1/2 per replay (median):",
        [statistics.median(c[g] for c in cols) for g in range(3)],
    )
    print(
        f"CPU us/chunk median {statistics.median(cpu):.2f} min {min(cpu):.2f}; "
        f"wall median {statistics.median(wall):.2f} min {min(wall):.2f}"
    )


if __name__ == "__main__":
    main()
