"""Backends whose first write blocks until released, for the review s5 tests: a stream's write
stays under way while a removal runs."""

from __future__ import annotations

import threading
from typing import Any

import anyio

from chengeta_ai.backends.memory_backend import InMemoryBackend


class FirstSetBlocks(InMemoryBackend):
    """The first ``set`` blocks until ``release`` (a thread's write stays under way)."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = threading.Event()
        self.release = threading.Event()
        self.first = True

    def set(self, key: str, value: bytes, ttl: float | None = None, tags: Any = ()) -> None:
        if self.first:
            self.first = False
            self.writing.set()
            assert self.release.wait(10)
        super().set(key, value, ttl, tags)


class FirstASetBlocks(InMemoryBackend):
    """The first ``aset`` waits for ``release`` (a task's write stays under way)."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = anyio.Event()
        self.release = anyio.Event()
        self.first = True

    async def aset(self, key: str, value: bytes, ttl: float | None = None, tags: Any = ()) -> None:
        if self.first:
            self.first = False
            self.writing.set()
            await self.release.wait()
        super().set(key, value, ttl, tags)
