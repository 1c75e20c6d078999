"""Upstreams with observable behaviour, for the streaming and fan-out tests."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio


class Boom(RuntimeError):
    """The upstream's own error type."""


class Upstream:
    """A fake LLM stream: sync and async, counting calls, optionally failing or pausing.

    ``gate``: if set, the async upstream waits for ``gate`` to be set before chunk ``pause_at``.
    """

    def __init__(
        self,
        chunks: list[Any],
        *,
        fail_at: int | None = None,
        delay: float = 0.0,
        pause_at: int | None = None,
    ) -> None:
        self.chunks = chunks
        self.fail_at = fail_at
        self.delay = delay
        self.pause_at = pause_at
        self.calls = 0
        self.produced = 0
        self.closed = 0
        self.completed = 0
        self._lock = threading.Lock()
        self.gate: anyio.Event | None = None
        self.thread_gate = threading.Event()

    def _count_call(self) -> None:
        with self._lock:
            self.calls += 1

    def sync(self, messages: Any) -> Iterator[Any]:
        self._count_call()
        return self._sync_gen()

    def _sync_gen(self) -> Iterator[Any]:
        try:
            for i, chunk in enumerate(self.chunks):
                if i == self.pause_at:
                    self.thread_gate.wait(10)
                if i == self.fail_at:
                    raise Boom(f"upstream failed at chunk {i}")
                if self.delay:
                    import time

                    time.sleep(self.delay)
                with self._lock:
                    self.produced += 1
                yield chunk
            self.completed += 1
        finally:
            with self._lock:
                self.closed += 1

    def asyncgen(self, messages: Any) -> AsyncIterator[Any]:
        self._count_call()
        return self._async_gen()

    async def _async_gen(self) -> AsyncIterator[Any]:
        try:
            for i, chunk in enumerate(self.chunks):
                if i == self.pause_at and self.gate is not None:
                    await self.gate.wait()
                if i == self.fail_at:
                    raise Boom(f"upstream failed at chunk {i}")
                if self.delay:
                    await anyio.sleep(self.delay)
                self.produced += 1
                yield chunk
            self.completed += 1
        finally:
            self.closed += 1


async def collect(aiter: AsyncIterator[Any]) -> list[Any]:
    return [chunk async for chunk in aiter]


class Heartbeat:
    """Records the largest gap between ticks of a task that sleeps 1 ms in a loop."""

    def __init__(self) -> None:
        self.max_gap = 0.0
        #: ticks so far (read from other threads: proof that the loop is running)
        self.ticks = 0
        self._stop = False

    async def run(self) -> None:
        last = anyio.current_time()
        while not self._stop:
            await anyio.sleep(0.001)
            now = anyio.current_time()
            self.max_gap = max(self.max_gap, now - last)
            self.ticks += 1
            last = now

    def stop(self) -> None:
        self._stop = True


@contextlib.contextmanager
def held_in_another_thread(lock: Any) -> Iterator[None]:
    """Holds ``lock`` in another thread for the duration of the block."""
    held, done = threading.Event(), threading.Event()

    def holder() -> None:
        with lock:
            held.set()
            done.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(5)
    try:
        yield
    finally:
        done.set()
        t.join(5)
