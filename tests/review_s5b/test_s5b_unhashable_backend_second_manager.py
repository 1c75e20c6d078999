"""Finding (low-medium): review s5 finding 10 (a removal through a second manager of the same
backend object and namespace does not reach the streams in flight of a cache over the first)
is fixed only for backends that are hashable and weakly referenceable. `_removal_listeners_of`
keys its registry by the backend object in a `WeakKeyDictionary`; a backend that cannot be a
key gets a fresh listener set per manager. A ``@dataclass`` backend (``eq=True`` sets
``__hash__`` to None: the default for a user's dataclass wrapper) or one with ``__slots__`` and
no ``__weakref__`` is enough: the admin manager's ``delete`` returns and the stream in flight
is stored right after it and served as a hit.

Fix direction: key the registry by ``id(backend)`` (dropping the entry when the last manager
of it is collected, `weakref.finalize` on the managers), or keep the listener set on the
backend object itself when it cannot be a weak key.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

from chengeta_ai import CacheManager
from chengeta_ai.backends.memory_backend import InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

MODEL = "gpt-4o"


@dataclasses.dataclass
class LabelledBackend(InMemoryBackend):
    """A user's backend written as a dataclass (unhashable: ``eq=True``)."""

    label: str = "primary"

    def __post_init__(self) -> None:
        InMemoryBackend.__init__(self)


def test_second_manager_of_an_unhashable_backend_reaches_the_stream_threads() -> None:
    backend = LabelledBackend()
    cache = StreamingResponseCache(CacheManager(backend=backend))
    admin = CacheManager(backend=backend)
    started, go = threading.Event(), threading.Event()

    def upstream(_m: Any) -> Iterator[str]:
        yield "old-1"
        started.set()
        assert go.wait(10)
        yield "old-2"

    stream = cache.get_or_stream(["q"], upstream, model_id=MODEL)
    reader = threading.Thread(target=lambda: list(stream))
    reader.start()
    assert started.wait(10)
    admin.delete(admin.key_builder.build(["q"], MODEL))
    go.set()
    reader.join(10)
    assert stream.cache_info.outcome == "invalidated", stream.cache_info
    after = cache.get_or_stream(["q"], lambda _m: iter(["new"]), model_id=MODEL)
    assert list(after) == ["new"], after.cache_info


@pytest.mark.anyio
async def test_second_manager_of_an_unhashable_backend_reaches_the_stream_async() -> None:
    backend = LabelledBackend()
    cache = StreamingResponseCache(CacheManager(backend=backend))
    admin = CacheManager(backend=backend)
    started, go = anyio.Event(), anyio.Event()

    async def upstream(_m: Any) -> AsyncIterator[str]:
        yield "old-1"
        started.set()
        await go.wait()
        yield "old-2"

    async def new(_m: Any) -> AsyncIterator[str]:
        yield "new"

    stream = cache.aget_or_stream(["q"], upstream, model_id=MODEL)

    async def read() -> None:
        [c async for c in stream]

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        await started.wait()
        await admin.adelete(admin.key_builder.build(["q"], MODEL))
        go.set()
    assert stream.cache_info.outcome == "invalidated", stream.cache_info
    after = cache.aget_or_stream(["q"], new, model_id=MODEL)
    assert [c async for c in after] == ["new"], after.cache_info
