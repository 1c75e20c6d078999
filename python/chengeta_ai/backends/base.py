"""The storage backend protocol every chengeta_ai backend implements.

Backends store opaque, already-encoded ``bytes`` under string keys, with an optional TTL and
tags. They never see Python objects and never (un)pickle anything: encoding is the
serializer's job, one layer up in `CacheManager`.

Each operation has a sync and an async twin. Async twins must not block the event loop:
`BaseBackend` provides defaults that run the sync twin in a worker thread (anyio), which suits
file-based backends; network backends override them with a native async client.

Failures are raised as `chengeta_ai.errors.BackendError` (wrapping the driver's exception);
`CacheManager` turns them into misses / skipped stores, logs and counts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import anyio.to_thread

__all__ = ["Backend", "BaseBackend"]


@runtime_checkable
class Backend(Protocol):
    """What `CacheManager` needs from a storage backend."""

    def get(self, key: str) -> bytes | None: ...
    def set(
        self, key: str, value: bytes, ttl: float | None = None, tags: Sequence[str] = ()
    ) -> None: ...
    def delete(self, key: str) -> bool: ...
    def exists(self, key: str) -> bool: ...
    def invalidate(self, tag: str) -> int: ...
    def clear(self) -> None: ...
    def close(self) -> None: ...
    def stats(self) -> dict[str, Any]: ...

    async def aget(self, key: str) -> bytes | None: ...
    async def aset(
        self, key: str, value: bytes, ttl: float | None = None, tags: Sequence[str] = ()
    ) -> None: ...
    async def adelete(self, key: str) -> bool: ...
    async def aexists(self, key: str) -> bool: ...
    async def ainvalidate(self, tag: str) -> int: ...
    async def aclear(self) -> None: ...
    async def aclose(self) -> None: ...


class BaseBackend:
    """Mixin: async twins that run the sync operation in a worker thread.

    Subclasses implement the sync operations; ``ttl`` is in seconds (``None`` or ``<= 0``
    means no expiry), ``tags`` are strings, ``invalidate`` returns how many entries it removed.
    """

    def get(self, key: str) -> bytes | None:
        raise NotImplementedError

    def set(
        self, key: str, value: bytes, ttl: float | None = None, tags: Sequence[str] = ()
    ) -> None:
        raise NotImplementedError

    def delete(self, key: str) -> bool:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def invalidate(self, tag: str) -> int:
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}

    async def aget(self, key: str) -> bytes | None:
        return await anyio.to_thread.run_sync(self.get, key)

    async def aset(
        self, key: str, value: bytes, ttl: float | None = None, tags: Sequence[str] = ()
    ) -> None:
        await anyio.to_thread.run_sync(self.set, key, value, ttl, tuple(tags))

    async def adelete(self, key: str) -> bool:
        return await anyio.to_thread.run_sync(self.delete, key)

    async def aexists(self, key: str) -> bool:
        return await anyio.to_thread.run_sync(self.exists, key)

    async def ainvalidate(self, tag: str) -> int:
        return await anyio.to_thread.run_sync(self.invalidate, tag)

    async def aclear(self) -> None:
        await anyio.to_thread.run_sync(self.clear)

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.close)
