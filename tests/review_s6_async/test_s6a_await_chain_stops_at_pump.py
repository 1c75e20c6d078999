"""Finding (low, debuggability): while the flight's task waits inside the upstream, its await
chain stops at `AsyncPump`: trio's ``Task.iter_await_frames()`` (what task-tree dumps use)
and a walk of ``cr_await`` on asyncio end at `AsyncFlight._pump`, and the upstream's frames
(where a hung stream is actually stuck) are no longer visible. On main the chain reaches the
upstream's frame. `AsyncPump` exposes nothing to follow (no ``cr_await``/``gi_yieldfrom``, no
GC referents, as it does not traverse).

Fix direction: expose the awaitable being driven (e.g. a ``cr_await``-like attribute, or
GC traversal of ``current`` so that the referent walk trio uses for ``async_generator_asend``
finds it).
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator
from types import FrameType
from typing import Any

import anyio
import pytest
import sniffio

from chengeta_ai import CacheKeyBuilder, CacheManager, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "where is it stuck"}]


def await_frames(coro: Any) -> Iterator[FrameType]:
    """The frames down a coroutine's await chain (trio's `Task.iter_await_frames` walk)."""
    while coro is not None:
        if hasattr(coro, "cr_frame"):
            if coro.cr_frame is not None:
                yield coro.cr_frame
            coro = coro.cr_await
        elif hasattr(coro, "gi_frame"):
            if coro.gi_frame is not None:
                yield coro.gi_frame
            coro = coro.gi_yieldfrom
        elif type(coro).__name__ in ("async_generator_athrow", "async_generator_asend"):
            for referent in gc.get_referents(coro):
                if hasattr(referent, "ag_frame"):
                    yield referent.ag_frame
                    coro = referent.ag_await
                    break
            else:
                return
        else:
            return


def flight_task_chain() -> list[str]:
    """Frame names of the task running `AsyncFlight._run`, down its await chain."""
    if sniffio.current_async_library() == "trio":
        import trio

        def tasks(task: trio.lowlevel.Task) -> Iterator[trio.lowlevel.Task]:
            yield task
            for nursery in task.child_nurseries:
                for child in nursery.child_tasks:
                    yield from tasks(child)

        chains = [
            [frame.f_code.co_name for frame, _ in task.iter_await_frames()]
            for task in tasks(trio.lowlevel.current_root_task())
        ]
    else:
        import asyncio

        chains = [
            [frame.f_code.co_name for frame in await_frames(task.get_coro())]
            for task in asyncio.all_tasks()
        ]
    found = [chain for chain in chains if "_pump" in chain]
    assert len(found) == 1, chains
    return found[0]


async def test_flight_task_await_chain_reaches_the_upstream() -> None:
    cache = StreamingResponseCache(
        CacheManager(backend=InMemoryBackend(), key_builder=CacheKeyBuilder())
    )
    stuck = anyio.Event()
    release = anyio.Event()

    async def hung_upstream(messages: Any) -> AsyncIterator[str]:
        yield "first"
        stuck.set()
        await release.wait()
        yield "second"

    got: list[str] = []

    async def consumer() -> None:
        async for chunk in cache.aget_or_stream(MESSAGES, hung_upstream):
            got.append(chunk)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer)
        await stuck.wait()
        await anyio.lowlevel.checkpoint()
        chain = flight_task_chain()
        release.set()
    assert got == ["first", "second"]
    assert "hung_upstream" in chain, f"the flight task's await chain ends at {chain[-1]!r}"
