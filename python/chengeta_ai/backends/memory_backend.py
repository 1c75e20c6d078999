"""In-process backend: a thread-safe LRU of encoded bytes with TTL, tags and two bounds."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from chengeta_ai.backends.base import (
    BaseBackend,
    namespace_key_prefix,
    namespace_tag_prefix,
    scoped_tag,
)

__all__ = ["InMemoryBackend"]


class _Entry(NamedTuple):
    value: bytes
    expires_at: float | None  # time.monotonic() deadline
    tags: tuple[str, ...]


class InMemoryBackend(BaseBackend):
    """Stores encoded entries in this process, bounded by entry count and by bytes.

    Values are ``bytes`` (the serializer's output), never live objects: a thousand cached
    streams held as objects would be walked by every full garbage collection; as bytes they
    cost the collector nothing. Least recently used entries are evicted first when either
    bound would be exceeded; an entry larger than ``max_bytes`` on its own is not stored.
    Expired entries vanish at once (checked on access) and are purged as eviction meets them.

    Thread-safe (one lock, held for dictionary work only); the async twins run inline since
    no operation blocks.
    """

    #: `get` returns the very ``bytes`` object `set` stored (never a copy): a reader may
    #: remember what it checked about that object by its identity.
    returns_stored_bytes = True

    def __init__(self, max_entries: int | None = 10_000, max_bytes: int | None = 256 * 2**20):
        if max_entries is not None and max_entries < 1:
            raise ValueError(f"max_entries must be a positive int or None, got {max_entries!r}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._tags: dict[str, set[str]] = {}
        self._bytes = 0
        self._evictions = 0
        self._expirations = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"InMemoryBackend(max_entries={self.max_entries!r}, max_bytes={self.max_bytes!r}, "
            f"entries={len(self._entries)})"
        )

    # -- internals, called with the lock held ---------------------------------------------

    def _remove(self, key: str) -> _Entry | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry.value)
            for tag in entry.tags:
                keys = self._tags.get(tag)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._tags[tag]
        return entry

    def _live(self, key: str) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at is not None and entry.expires_at <= time.monotonic():
            self._remove(key)
            self._expirations += 1
            return None
        return entry

    # -- operations ----------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._live(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry.value

    def set(
        self, key: str, value: bytes, ttl: float | None = None, tags: Sequence[str] = ()
    ) -> None:
        size = len(value)
        expires_at = time.monotonic() + ttl if ttl is not None and ttl > 0 else None
        entry = _Entry(bytes(value), expires_at, tuple(dict.fromkeys(tags)))
        with self._lock:
            self._remove(key)
            if self.max_bytes is not None and size > self.max_bytes:
                self._evictions += 1
                return
            self._entries[key] = entry
            self._bytes += size
            for tag in entry.tags:
                self._tags.setdefault(tag, set()).add(key)
            while (self.max_entries is not None and len(self._entries) > self.max_entries) or (
                self.max_bytes is not None and self._bytes > self.max_bytes
            ):
                oldest = next(iter(self._entries))
                self._remove(oldest)
                self._evictions += 1

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._remove(key) is not None

    def exists(self, key: str) -> bool:
        with self._lock:
            return self._live(key) is not None

    def invalidate(self, tag: str) -> int:
        with self._lock:
            keys = list(self._tags.get(tag, ()))
            for key in keys:
                self._remove(key)
            return len(keys)

    def invalidate_namespace(self, namespace: str, tag: str) -> int:
        """Delete the entries tagged ``tag`` in ``namespace`` (see `NamespacedBackend`)."""
        prefix = namespace_key_prefix(namespace)
        with self._lock:
            keys = set(self._tags.get(scoped_tag(namespace, tag), ()))
            keys.update(k for k in self._tags.get(tag, ()) if k.startswith(prefix))
            return self._remove_counting_live(keys)

    def clear_namespace(self, namespace: str) -> None:
        """Delete ``namespace``'s entries (see `NamespacedBackend`): one walk over the keys and
        one over the tags, under the lock."""
        prefix, tag_prefix = namespace_key_prefix(namespace), namespace_tag_prefix(namespace)
        with self._lock:
            keys = {k for k in self._entries if k.startswith(prefix)}
            for tag, tagged in self._tags.items():
                if tag.startswith(tag_prefix):
                    keys.update(tagged)
            self._remove_counting_live(keys)

    def _remove_counting_live(self, keys: Iterable[str]) -> int:
        """Remove ``keys`` (lock held); how many of them had not expired."""
        now, live = time.monotonic(), 0
        for key in keys:
            entry = self._remove(key)
            if entry is not None and (entry.expires_at is None or entry.expires_at > now):
                live += 1
        return live

    def clear(self) -> None:
        """Delete every entry, whatever its namespace."""
        with self._lock:
            self._entries.clear()
            self._tags.clear()
            self._bytes = 0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "backend": "memory",
                "entries": len(self._entries),
                "bytes": self._bytes,
                "tags": len(self._tags),
                "evictions": self._evictions,
                "expirations": self._expirations,
            }

    # Nothing here blocks: run the async twins inline instead of in a worker thread.

    async def aget(self, key: str) -> bytes | None:
        return self.get(key)

    async def aset(
        self, key: str, value: bytes, ttl: float | None = None, tags: Sequence[str] = ()
    ) -> None:
        self.set(key, value, ttl, tags)

    async def adelete(self, key: str) -> bool:
        return self.delete(key)

    async def aexists(self, key: str) -> bool:
        return self.exists(key)

    async def ainvalidate(self, tag: str) -> int:
        return self.invalidate(tag)

    async def aclear(self) -> None:
        self.clear()

    async def ainvalidate_namespace(self, namespace: str, tag: str) -> int:
        return self.invalidate_namespace(namespace, tag)

    async def aclear_namespace(self, namespace: str) -> None:
        self.clear_namespace(namespace)

    async def aclose(self) -> None:
        self.close()
