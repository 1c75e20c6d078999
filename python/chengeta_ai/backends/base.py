"""The storage backend protocol every chengeta_ai backend implements.

Backends store opaque, already-encoded ``bytes`` under string keys, with an optional TTL and
tags. They never see Python objects and never (un)pickle anything: encoding is the
serializer's job, one layer up in `CacheManager`.

Each operation has a sync and an async twin. Async twins must not block the event loop:
`BaseBackend` provides defaults that run the sync twin in a worker thread (anyio), which suits
file-based backends; network backends override them with a native async client.

Failures are raised as `chengeta_ai.errors.BackendError` (wrapping the driver's exception);
`CacheManager` turns them into misses / skipped stores, logs and counts them.

Namespaces. Several `CacheManager`s, each with its own ``CacheKeyBuilder(namespace=...)``, may
share one backend; removals through a manager must stay in its namespace. Keys built for
namespace ``ns`` start with ``"ns:"`` (`namespace_key_prefix`); the manager stores every tag
scoped to its namespace (`scoped_tag`: ``"\\x1fns:" + tag``; namespaces never contain ``':'``,
so no two namespaces share a scoped tag, and the leading unit separator keeps scoped tags apart
from the bare tags stored before tags were scoped, or by code calling a backend directly). An
entry stored through a manager under a key outside ``"ns:"`` also carries the bare scope
``"\\x1fns:"`` (`namespace_tag_prefix`), so that it belongs to the namespace too.
`NamespacedBackend` adds the two scoped removals: ``invalidate_namespace`` and
``clear_namespace``. The plain ``invalidate`` and ``clear`` act on the whole store, for whoever
calls a backend directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import anyio.to_thread

__all__ = [
    "Backend",
    "BaseBackend",
    "NamespacedBackend",
    "namespace_key_prefix",
    "namespace_tag_prefix",
    "scoped_tag",
]

_SCOPE = "\x1f"


def namespace_key_prefix(namespace: str) -> str:
    """What every key of ``namespace`` starts with: ``"ns:"`` (see `CacheKeyBuilder`)."""
    return f"{namespace}:"


def namespace_tag_prefix(namespace: str) -> str:
    """What every tag scoped to ``namespace`` starts with: ``"\\x1fns:"``. On its own, it is
    the tag of the entries a manager stored under keys outside the namespace's key prefix."""
    return f"{_SCOPE}{namespace}:"


def scoped_tag(namespace: str, tag: str) -> str:
    """``tag`` as stored for ``namespace``: ``"\\x1fns:" + tag``."""
    return f"{_SCOPE}{namespace}:{tag}"


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


@runtime_checkable
class NamespacedBackend(Backend, Protocol):
    """A `Backend` that can remove one namespace's entries only (see the module doc).

    `CacheManager` uses these when the backend has them; a backend without them still works
    (its ``invalidate`` is given the scoped tag; ``CacheManager.clear`` raises `BackendError`).
    """

    def invalidate_namespace(self, namespace: str, tag: str) -> int:
        """Remove the entries tagged ``scoped_tag(namespace, tag)``, and those tagged with the
        bare ``tag`` (stored before tags were scoped) whose key starts with
        ``namespace_key_prefix(namespace)``; return how many live ones there were."""
        ...

    def clear_namespace(self, namespace: str) -> None:
        """Remove every entry whose key starts with ``namespace_key_prefix(namespace)`` or
        that carries a tag starting with ``namespace_tag_prefix(namespace)``; other namespaces'
        entries stay."""
        ...

    async def ainvalidate_namespace(self, namespace: str, tag: str) -> int: ...
    async def aclear_namespace(self, namespace: str) -> None: ...


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
        """Remove every entry of the store, whatever its namespace."""
        raise NotImplementedError

    def invalidate_namespace(self, namespace: str, tag: str) -> int:
        """See `NamespacedBackend`; NotImplementedError here (the manager then falls back)."""
        raise NotImplementedError

    def clear_namespace(self, namespace: str) -> None:
        """See `NamespacedBackend`; NotImplementedError here (the manager's clear raises)."""
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

    async def ainvalidate_namespace(self, namespace: str, tag: str) -> int:
        return await anyio.to_thread.run_sync(self.invalidate_namespace, namespace, tag)

    async def aclear_namespace(self, namespace: str) -> None:
        await anyio.to_thread.run_sync(self.clear_namespace, namespace)

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.close)
