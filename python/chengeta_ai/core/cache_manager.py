"""`CacheManager`: one backend, one key builder, one serializer, and the fail-open rules.

Every stored value is framed, so that a corrupt or foreign entry is recognised before a single
chunk is replayed: it is treated as a miss, deleted, logged and counted. Two frame versions:

- v1, ``b"\\xc6\\x01" + crc32(payload) + payload`` (6 bytes): values stored with `set`;
- v2, ``b"\\xc6\\x02" + crc32(body) + body`` with ``body = varint(len(meta)) + meta + payload``
  and ``meta = varint(written_at, unix ms) + timing``: streams. ``timing`` (possibly empty) is
  the chunks' recorded arrival times (`chengeta_ai._core.decode_timing`; 1-2 bytes per chunk),
  for replay at the recorded pace; ``written_at`` gives a hit its age.

Readers accept both; a reader older than v2 refuses a v2 entry as "bad magic" (a miss: it is
dropped and streamed afresh), never misreads it.

Backend failures on reads and writes are misses and skipped stores (logged, counted): the cache
never breaks the code that uses it. Explicit removals (`delete`, `invalidate`, `clear`) do raise
`BackendError` when the backend fails, because a caller who asked for data to be gone must know
it was not.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from chengeta_ai.backends.base import (
    Backend,
    namespace_key_prefix,
    namespace_tag_prefix,
    scoped_tag,
)
from chengeta_ai.backends.memory_backend import InMemoryBackend
from chengeta_ai.core.key_builder import CacheKeyBuilder
from chengeta_ai.core.stats import Counters, ManagerStats, counter_names
from chengeta_ai.errors import BackendError, DecodeError
from chengeta_ai.logs import warn
from chengeta_ai.models import report_unregistered
from chengeta_ai.serializers import CompactSerializer, Serializer, check_serializer, decode_cap

__all__ = ["DEFAULT_MAX_ENTRY_BYTES", "CacheManager", "Entry", "frame", "unframe", "unframe_entry"]

logger = logging.getLogger("chengeta_ai")

DEFAULT_MAX_ENTRY_BYTES = 16 * 2**20
_FRAME_MAGIC = b"\xc6\x01"
_FRAME_MAGIC_V2 = b"\xc6\x02"
_FRAME_HEADER = 6
_MISSING = object()
_T = TypeVar("_T")


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _read_varint(data: memoryview, pos: int, what: str) -> tuple[int, int]:
    """``(value, next position)``; `DecodeError` if truncated or longer than 10 bytes."""
    value = shift = 0
    for i in range(pos, min(pos + 10, len(data))):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    raise DecodeError(f"corrupt entry frame: bad varint in {what}")


@dataclass(frozen=True, slots=True)
class Entry:
    """An unframed entry: its payload, and (v2 frames) when it was written and its timing."""

    payload: memoryview
    #: Unix time the entry was written, or None (a v1 frame).
    written_at: float | None = None
    #: The recorded timing section (see `chengeta_ai._core.decode_timing`), or None.
    timing: memoryview | None = None
    #: Where the payload starts in the framed bytes (``payload`` is ``data[start:]``).
    start: int = _FRAME_HEADER

    def age(self) -> float | None:
        """Seconds since the entry was written (never negative), or None if unknown."""
        if self.written_at is None:
            return None
        return max(0.0, time.time() - self.written_at)


def frame(payload: bytes, *, written_at: float | None = None, timing: bytes | None = None) -> bytes:
    """Wraps an encoded value with the magic and checksum every entry carries: a v1 frame, or a
    v2 frame when ``written_at`` (unix seconds) or ``timing`` is given."""
    if written_at is None and timing is None:
        return _FRAME_MAGIC + zlib.crc32(payload).to_bytes(4, "little") + payload
    stamp = time.time() if written_at is None else written_at
    meta = _varint(max(0, round(stamp * 1000))) + (timing or b"")
    body = _varint(len(meta)) + meta + payload
    return _FRAME_MAGIC_V2 + zlib.crc32(body).to_bytes(4, "little") + body


#: Framed ``bytes`` objects whose frame checked (`unframe_entry` with ``remember``), by id: the
#: object itself (held, so no other object can take its id while it is here) and its `Entry`.
#: Insertion order; the oldest goes first beyond `_UNFRAMED_MAX` objects or `_UNFRAMED_BYTES`.
_UNFRAMED: dict[int, tuple[bytes, Entry]] = {}
_UNFRAMED_MAX = 256
_UNFRAMED_BYTES = 32 * 2**20
_unframed_bytes = 0
_unframed_lock = threading.Lock()
#: Entries smaller than this are checked every time (the checksum costs less than a lookup).
_REMEMBER_MIN = 4096


def unframe_entry(data: bytes, *, remember: bool = False) -> Entry:
    """The parts of a framed entry (v1 or v2); `DecodeError` if the frame, its checksum or its
    header is wrong. The timing section is only located here (decoded on demand).

    ``remember=True``: the caller will be handed this same ``bytes`` object again (an
    in-process backend returns the object it stores); the checked entry is kept by the
    object's identity (bounded: 256 objects, 32 MiB), and the next call with it skips the
    checksum. A ``bytes`` object never changes, so its verdict cannot go stale."""
    if remember:
        known = _UNFRAMED.get(id(data))
        if known is not None and known[0] is data:
            return known[1]
    entry = _unframe(data)
    if remember and type(data) is bytes and len(data) >= _REMEMBER_MIN:
        _remember(data, entry)
    return entry


def _remember(data: bytes, entry: Entry) -> None:
    global _unframed_bytes
    size = len(data)
    if size > _UNFRAMED_BYTES:
        return
    with _unframed_lock:
        old = _UNFRAMED.pop(id(data), None)
        if old is not None:
            _unframed_bytes -= len(old[0])
        _UNFRAMED[id(data)] = (data, entry)
        _unframed_bytes += size
        while len(_UNFRAMED) > _UNFRAMED_MAX or _unframed_bytes > _UNFRAMED_BYTES:
            gone = _UNFRAMED.pop(next(iter(_UNFRAMED)))
            _unframed_bytes -= len(gone[0])


def _unframe(data: bytes) -> Entry:
    if len(data) < _FRAME_HEADER:
        raise DecodeError("not a chengeta_ai entry (bad magic)")
    magic = data[:2]
    if magic != _FRAME_MAGIC and magic != _FRAME_MAGIC_V2:
        raise DecodeError("not a chengeta_ai entry (bad magic)")
    body = memoryview(data)[_FRAME_HEADER:]
    if zlib.crc32(body) != int.from_bytes(data[2:6], "little"):
        raise DecodeError("entry checksum mismatch (corrupt or truncated entry)")
    if magic == _FRAME_MAGIC:
        return Entry(body)
    meta_len, pos = _read_varint(body, 0, "meta length")
    if meta_len > len(body) - pos:
        raise DecodeError(f"corrupt entry frame: meta of {meta_len} bytes overruns the entry")
    meta = body[pos : pos + meta_len]
    written_ms, tpos = _read_varint(meta, 0, "written_at")
    timing = meta[tpos:] if tpos < len(meta) else None
    start = pos + meta_len
    return Entry(body[start:], written_ms / 1000.0, timing, _FRAME_HEADER + start)


def unframe(data: bytes) -> memoryview:
    """The payload of a framed entry (v1 or v2); `DecodeError` if the frame or its checksum is
    wrong."""
    return unframe_entry(data).payload


#: Longest ttl accepted (100 years): every backend can expire it (Redis keeps PX in a signed
#: 64-bit count of milliseconds from now).
MAX_TTL = 100 * 365.25 * 86400


def check_ttl(ttl: float | None) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"ttl must be a number of seconds or None, got {type(ttl).__name__}")
    if not 0 < ttl <= MAX_TTL:  # NaN fails too; an int too large for a float is compared exactly
        raise ValueError(
            f"ttl must be a positive number of seconds up to {MAX_TTL:.0f} (100 years) or None, "
            f"got {ttl!r:.40}"
        )
    return float(ttl)


def check_tags(tags: Iterable[str] | None) -> tuple[str, ...]:
    if tags is None:
        return ()
    if isinstance(tags, (str, bytes, Mapping)):
        raise TypeError(
            f"tags must be a list of strings, not a {type(tags).__name__} "
            "(a str or bytes would be taken as its characters, a mapping as its keys)"
        )
    out = tuple(tags)
    for tag in out:
        if not isinstance(tag, str) or not tag:
            raise TypeError(f"every tag must be a non-empty str, got {tag!r}")
    return out


def check_key(key: object) -> str:
    """``key`` if it is a non-empty ``str`` (what every backend stores under); else a
    `TypeError` naming the argument, not an internal error from deeper down."""
    if type(key) is not str and not isinstance(key, str):
        raise TypeError(f"key must be a non-empty str, got {type(key).__name__}: {key!r:.60}")
    if not key:
        raise TypeError("key must be a non-empty str, got ''")
    return key


_BACKENDS_HINT = (
    "pass a backend instance, e.g. InMemoryBackend(), SQLiteBackend(path) or "
    "RedisBackend(url) (from chengeta_ai), or your own class implementing "
    "chengeta_ai.backends.base.Backend"
)


#: The methods of the `Backend` protocol (sync and async twins).
_BACKEND_METHODS = tuple(sorted(name for name in vars(Backend) if not name.startswith("_")))


def _check_backend(backend: object) -> Backend:
    """``backend`` if it implements the `Backend` protocol; else `TypeError` saying what to
    pass (a backend named by a string, a class instead of an instance, a missing method)."""
    if isinstance(backend, type) and all(hasattr(backend, name) for name in _BACKEND_METHODS):
        raise TypeError(
            f"backend must be an instance, got the class {backend.__name__}: "
            f"pass {backend.__name__}(...)"
        )
    if isinstance(backend, (str, bytes)):
        raise TypeError(
            f"backend must be a backend object, not the string {backend!r}: {_BACKENDS_HINT}"
        )
    missing = [name for name in _BACKEND_METHODS if not callable(getattr(backend, name, None))]
    if missing:
        what = (
            f"the class {backend.__name__}" if isinstance(backend, type) else type(backend).__name__
        )
        raise TypeError(
            f"backend {what} does not implement the Backend protocol "
            f"(missing: {', '.join(missing)}): {_BACKENDS_HINT}"
        )
    return backend  # type: ignore[return-value]


#: The entry a rewrite puts back: ``(framed bytes, ttl, caller's tags)``; empty bytes: removed.
RewriteEntry = tuple[bytes, float | None, tuple[str, ...]]


#: Guards every listener set (`weakref.WeakSet` is not safe to iterate while another thread adds).
_LISTENERS_LOCK = threading.Lock()
#: id(backend object) -> (namespace -> the flight tables of the streaming caches over them).
#: Keyed by identity (a backend need not be hashable or weakly referenceable); an entry whose
#: sets are all empty is pruned when another is made (a live cache keeps its backend alive, so
#: an id in use is never reused).
_LISTENERS: dict[int, dict[str, weakref.WeakSet[Any]]] = {}


def _removal_listeners_of(backend: Any, namespace: str) -> weakref.WeakSet[Any]:
    """The listener set shared by every manager of ``backend`` (this very object) and
    ``namespace``: a removal through any of them reaches the streams in flight of all."""
    with _LISTENERS_LOCK:
        by_namespace = _LISTENERS.get(id(backend))
        if by_namespace is None:
            for dead in [k for k, sets in _LISTENERS.items() if not any(sets.values())]:
                del _LISTENERS[dead]
            by_namespace = _LISTENERS[id(backend)] = {}
        return by_namespace.setdefault(namespace, weakref.WeakSet())


class RemovalAnnouncer(Protocol):
    """What tells other processes of a removal before it runs (`RedisFlights`: ``remote`` is
    True; it does I/O, so an async removal calls it in a worker thread, and its failure fails
    the removal once the local removal ran). ``key``: the key a ``delete`` removes (None:
    ``invalidate``/``clear``)."""

    remote: bool

    def begin_removal(
        self, matches: Callable[[str, tuple[str, ...]], bool], key: str | None = None
    ) -> list[str]: ...


class RemovalListener(RemovalAnnouncer, Protocol):
    """What learns of removals before they run in this process (a streaming cache's
    `FlightTable`): streams of the removed keys or tags in flight must not be stored after the
    removal; it returns the keys whose writes the removal raced, which it then waits for."""

    def writes_under_way(self, racing: list[str]) -> bool: ...

    def wait_writes(self, racing: list[str], timeout: float) -> bool: ...

    def undo_orphans(self, racing: list[str]) -> list[str]: ...


#: How long a removal waits for the writes it raced to undo themselves before it returns (a
#: write that takes longer still undoes itself when it returns).
REMOVAL_WAIT = 10.0


class CacheManager:
    """Gets and sets cached values on a backend, with keys, serialization and fail-open rules.

    Args:
        backend: where entries live; `InMemoryBackend()` if omitted.
        key_builder: builds keys from requests; `CacheKeyBuilder()` if omitted.
        serializer: encodes values; the Rust `CompactSerializer` if omitted (never unpickles).
        default_ttl: seconds an entry lives when a call gives no ``ttl``; None = no expiry.
        max_entry_bytes: entries larger than this once encoded are not stored (counted).

    Namespaces. Managers whose key builders have different namespaces may share a backend:
    their removals stay apart. Tags are stored scoped to the namespace (`scoped_tag`), so
    ``invalidate("model:gpt-4o")`` reaches only this namespace's entries; ``clear()`` removes
    the keys starting with ``"{namespace}:"`` and the entries stored through a manager of the
    namespace under other keys (they carry the namespace's tag). Entries stored before tags
    were scoped (bare tags) are still reached by ``invalidate`` when their key is in the
    namespace. Both use the backend's ``invalidate_namespace`` / ``clear_namespace``
    (`NamespacedBackend`); on a backend without them, ``invalidate`` falls back to the
    backend's ``invalidate`` of the scoped tag (logged once: bare-tagged entries are not
    reached) and ``clear`` raises `BackendError` rather than empty every namespace.
    """

    def __init__(
        self,
        backend: Backend | None = None,
        key_builder: CacheKeyBuilder | None = None,
        *,
        serializer: Serializer | None = None,
        default_ttl: float | None = None,
        max_entry_bytes: int | None = DEFAULT_MAX_ENTRY_BYTES,
    ) -> None:
        if max_entry_bytes is not None and (
            type(max_entry_bytes) is not int or max_entry_bytes < 1
        ):
            raise ValueError(
                f"max_entry_bytes must be a positive int or None, got {max_entry_bytes!r}"
            )
        self.backend: Backend = InMemoryBackend() if backend is None else _check_backend(backend)
        if key_builder is not None and not callable(getattr(key_builder, "build", None)):
            raise TypeError(
                "key_builder must be a CacheKeyBuilder (or have its build() method), got "
                f"{type(key_builder).__name__}"
            )
        self.key_builder = key_builder if key_builder is not None else CacheKeyBuilder()
        self.serializer: Serializer = (
            CompactSerializer()
            if serializer is None
            else check_serializer(serializer, streams=False)
        )
        self.default_ttl = check_ttl(default_ttl)
        self.max_entry_bytes = max_entry_bytes
        self._counters = Counters(counter_names(ManagerStats))
        self._warned_unscoped = False
        #: The flight tables of the streaming caches over this manager's backend object and
        #: namespace (any manager of them): told of removals (`_removal_listeners_of`).
        self._removal_listeners = _removal_listeners_of(
            self.backend, getattr(self.key_builder, "namespace", "")
        )

    def __repr__(self) -> str:
        return (
            f"CacheManager(backend={self.backend!r}, key_builder={self.key_builder!r}, "
            f"serializer={type(self.serializer).__name__}, default_ttl={self.default_ttl!r})"
        )

    # -- shared rules (both twins call these; the twins only do the I/O) ------------------

    def resolve_ttl(self, ttl: float | None) -> float | None:
        return self.default_ttl if ttl is None else check_ttl(ttl)

    def count(self, name: str, n: int = 1) -> None:
        self._counters.add(name, n)

    def backend_failed(self, op: str, key: str, exc: BaseException) -> None:
        self.count("backend_errors")
        warn("chengeta_ai: backend %s failed for %s: %r", op, key, exc, cause=op)

    def corrupt(self, key: str, exc: BaseException) -> None:
        self.count("corrupt_entries")
        # an entry naming a class this process never registered: reported once per class
        if report_unregistered(str(exc)):
            logger.debug("chengeta_ai: corrupt entry %s dropped: %s", key, exc)
        else:
            warn("chengeta_ai: corrupt entry %s dropped: %s", key, exc)

    def _encode(self, key: str, value: Any, serializer: Serializer | None) -> bytes | None:
        try:
            payload = (serializer or self.serializer).dumps(value)
        except Exception as exc:  # an unserializable value is a skipped store, never an error
            self.count("encode_errors")
            if report_unregistered(str(exc)):
                logger.debug("chengeta_ai: value for %s not cached, cannot encode: %s", key, exc)
            else:
                warn("chengeta_ai: value for %s not cached, cannot encode: %s", key, exc)
            return None
        return self.fit(key, frame(payload))

    def fit(self, key: str, data: bytes) -> bytes | None:
        """``data`` if it is within ``max_entry_bytes`` and within the backend's own bound on
        its total size (``max_bytes`` of `InMemoryBackend` / `SQLiteBackend`: an entry larger
        than that can never be read back), else None (counted, logged)."""
        bound = self.store_bound()
        if bound is not None and len(data) > bound:
            self.count("oversized_entries")
            logger.info(
                "chengeta_ai: entry %s not cached: %d bytes > %d (max_entry_bytes=%s, the "
                "backend's max_bytes=%s)",
                key,
                len(data),
                bound,
                self.max_entry_bytes,
                getattr(self.backend, "max_bytes", None),
            )
            return None
        return data

    def store_bound(self) -> int | None:
        """The largest entry a store may write: ``max_entry_bytes``, or less when the backend
        bounds its total size below it (read at each store: a bound changed later counts)."""
        bound = self.max_entry_bytes
        backend_max = getattr(self.backend, "max_bytes", None)
        if isinstance(backend_max, int) and not isinstance(backend_max, bool):
            bound = backend_max if bound is None else min(bound, backend_max)
        return bound

    def _decode(self, raw: bytes | None, serializer: Serializer | None) -> Any:
        """The value in a framed entry, `_MISSING`, or the `DecodeError` it raised."""
        if raw is None:
            self.count("misses")
            return _MISSING
        try:
            value = (serializer or self.serializer).loads(
                bytes(unframe(raw)), max_decoded_bytes=decode_cap(self.max_entry_bytes)
            )
        except DecodeError as exc:
            self.count("misses")
            return exc
        self.count("hits")
        return value

    # -- raw (framed bytes) access, used by the streaming layer ---------------------------

    def get_raw(self, key: str) -> bytes | None:
        """The framed bytes under ``key``, or None on a miss or a backend failure."""
        try:
            return self.backend.get(key)
        except Exception as exc:
            self.backend_failed("get", key, exc)
            return None

    async def aget_raw(self, key: str) -> bytes | None:
        try:
            return await self.backend.aget(key)
        except Exception as exc:
            self.backend_failed("get", key, exc)
            return None

    def scope_tags(self, key: str, tags: tuple[str, ...]) -> tuple[str, ...]:
        """``tags`` as stored: scoped to the namespace, plus the namespace's own tag when
        ``key`` is not one of its keys (so that ``clear`` finds it)."""
        namespace = self.key_builder.namespace
        scoped = tuple([scoped_tag(namespace, tag) for tag in tags])
        if key.startswith(namespace_key_prefix(namespace)):
            return scoped
        return (*scoped, namespace_tag_prefix(namespace))

    def set_raw(self, key: str, data: bytes, ttl: float | None, tags: tuple[str, ...]) -> bool:
        """Stores framed ``data``; ``tags`` as given by the caller (they are scoped here)."""
        tags = self.scope_tags(key, tags)
        try:
            self.backend.set(key, data, ttl, tags)
        except Exception as exc:
            self.backend_failed("set", key, exc)
            return False
        self.count("sets")
        return True

    async def aset_raw(
        self, key: str, data: bytes, ttl: float | None, tags: tuple[str, ...]
    ) -> bool:
        tags = self.scope_tags(key, tags)
        try:
            await self.backend.aset(key, data, ttl, tags)
        except Exception as exc:
            self.backend_failed("set", key, exc)
            return False
        self.count("sets")
        return True

    def rewrite_raw(self, key: str, entry: RewriteEntry) -> None:
        """Writes ``entry`` again as the last of overlapping writes of ``key`` (see
        `chengeta_ai.layers.flights`); an empty entry removes the key. Fails open."""
        if entry[0]:
            self.set_raw(key, *entry)
            return
        try:
            self.backend.delete(key)
        except Exception as exc:
            self.backend_failed("delete", key, exc)

    async def arewrite_raw(self, key: str, entry: RewriteEntry) -> None:
        if entry[0]:
            await self.aset_raw(key, *entry)
            return
        try:
            await self.backend.adelete(key)
        except Exception as exc:
            self.backend_failed("delete", key, exc)

    def watch_removals(self, listener: RemovalListener | RemovalAnnouncer) -> None:
        """``listener`` (a streaming cache's flight table) is told of every removal through
        this manager before it runs (held weakly)."""
        with _LISTENERS_LOCK:
            self._removal_listeners.add(listener)

    def _listeners(self) -> tuple[list[RemovalListener], list[RemovalAnnouncer]]:
        """(local flight tables, remote announcers) registered for this backend and
        namespace."""
        with _LISTENERS_LOCK:
            listeners = list(self._removal_listeners)
        local = [x for x in listeners if not x.remote]
        return local, [x for x in listeners if x.remote]

    def _begin_removal(
        self,
        local: list[RemovalListener],
        matches: Callable[[str, tuple[str, ...]], bool],
        key: str | None,
        racing: list[tuple[RemovalListener, list[str]]],
    ) -> None:
        """Tells the local flight tables of a removal about to run; the keys whose writes it
        raced are appended to ``racing`` (see `_wait_racing`)."""
        for table in local:
            keys = table.begin_removal(matches, key)
            if keys:
                racing.append((table, keys))

    @staticmethod
    def _announce(
        remote: list[RemovalAnnouncer],
        matches: Callable[[str, tuple[str, ...]], bool],
        key: str | None,
    ) -> BaseException | None:
        """Tells the other processes (`RedisFlights`); the first failure, if any."""
        failure: BaseException | None = None
        for announcer in remote:
            try:
                announcer.begin_removal(matches, key)
            except Exception as exc:
                failure = failure or exc
        return failure

    def _wait_racing(self, racing: list[tuple[RemovalListener, list[str]]]) -> None:
        """Waits (at most `REMOVAL_WAIT`) for the writes the removal raced to undo themselves,
        so that nothing it covers can be read once it returned. Not on an event loop's thread,
        where those writes may be waiting for this very thread (they still undo themselves)."""
        if not racing or _on_event_loop():
            return
        deadline = time.monotonic() + REMOVAL_WAIT
        for table, keys in racing:
            if not table.wait_writes(keys, max(0.0, deadline - time.monotonic())):
                self._wait_timed_out(len(keys))
                return
        self._undo_orphans(racing)

    async def _await_racing(self, racing: list[tuple[RemovalListener, list[str]]]) -> None:
        """`_wait_racing` for the async removals: polls (the writes may run on this loop, in
        threads or on other loops), with a growing pause."""
        if not racing:
            return
        import anyio

        deadline = time.monotonic() + REMOVAL_WAIT
        pause = 0.0005
        for table, keys in racing:
            while table.writes_under_way(keys):
                if time.monotonic() >= deadline:
                    self._wait_timed_out(len(keys))
                    return
                await anyio.sleep(pause)
                pause = min(pause * 2, 0.05)
        for table, keys in racing:
            for key in table.undo_orphans(keys):
                try:
                    await self.backend.adelete(key)
                except Exception as exc:
                    self.backend_failed("delete", key, exc)

    def _undo_orphans(self, racing: list[tuple[RemovalListener, list[str]]]) -> None:
        """Removes again the keys whose last racing write was interrupted before it could."""
        for table, keys in racing:
            for key in table.undo_orphans(keys):
                try:
                    self.backend.delete(key)
                except Exception as exc:
                    self.backend_failed("delete", key, exc)

    @staticmethod
    def _wait_timed_out(n: int) -> None:
        warn(
            "chengeta_ai: a removal returns while %d write(s) it raced are still under way; "
            "each removes its entry again when it returns",
            n,
            cause="removal_wait",
        )

    def drop_corrupt(self, key: str, exc: BaseException) -> None:
        self.corrupt(key, exc)
        try:
            self.backend.delete(key)
        except Exception as del_exc:
            self.backend_failed("delete", key, del_exc)

    async def adrop_corrupt(self, key: str, exc: BaseException) -> None:
        self.corrupt(key, exc)
        try:
            await self.backend.adelete(key)
        except Exception as del_exc:
            self.backend_failed("delete", key, del_exc)

    # -- public API: sync ------------------------------------------------------------------

    def get(self, key: str, default: Any = None, *, serializer: Serializer | None = None) -> Any:
        """The value under ``key``, or ``default`` on a miss (backend failures are misses)."""
        value = self._decode(self.get_raw(check_key(key)), serializer)
        if isinstance(value, DecodeError):
            self.drop_corrupt(key, value)
            return default
        return default if value is _MISSING else value

    def set(
        self,
        key: str,
        value: Any,
        ttl: float | None = None,
        tags: Iterable[str] | None = None,
        *,
        serializer: Serializer | None = None,
    ) -> bool:
        """Stores ``value``; returns False if it was not stored (unencodable, too large, backend
        failure: each logged and counted)."""
        ttl, tag_tuple = self.resolve_ttl(ttl), check_tags(tags)
        data = self._encode(check_key(key), value, serializer)
        return data is not None and self.set_raw(key, data, ttl, tag_tuple)

    def delete(self, key: str) -> bool:
        """Removes ``key``; True if it existed. Raises `BackendError` if the backend fails."""
        check_key(key)
        return self._removal("delete", self.backend.delete, key, lambda k, _tags: k == key)

    def exists(self, key: str) -> bool:
        check_key(key)
        try:
            return self.backend.exists(key)
        except Exception as exc:
            self.backend_failed("exists", key, exc)
            return False

    def invalidate(self, tag: str) -> int:
        """Removes every entry of this namespace carrying ``tag``; returns how many. Raises
        `BackendError`."""
        check_tags([tag])
        return self._removal(
            "invalidate", self._invalidate_namespace, tag, lambda _key, tags: tag in tags
        )

    def clear(self) -> None:
        """Removes every entry of this namespace (see the class doc); other namespaces' stay.
        Raises `BackendError` if the backend fails or cannot clear one namespace only."""
        self._removal("clear", self._clear_namespace, self.key_builder.namespace, _every_entry)

    def _invalidate_namespace(self, tag: str) -> int:
        namespace = self.key_builder.namespace
        scoped = getattr(self.backend, "invalidate_namespace", None)
        if scoped is not None:
            try:
                return int(scoped(namespace, tag))
            except NotImplementedError:
                pass
        self._unscoped_fallback()
        return self.backend.invalidate(scoped_tag(namespace, tag))

    def _clear_namespace(self, namespace: str) -> None:
        scoped = getattr(self.backend, "clear_namespace", None)
        if scoped is not None:
            try:
                scoped(namespace)
                return
            except NotImplementedError:
                pass
        raise self._cannot_clear(namespace)

    def _unscoped_fallback(self) -> None:
        if not self._warned_unscoped:
            self._warned_unscoped = True
            warn(
                "chengeta_ai: %s has no invalidate_namespace(): invalidating namespace %r's "
                "scoped tags only; entries it stored under bare tags (before tags were "
                "scoped) are not removed",
                type(self.backend).__name__,
                self.key_builder.namespace,
            )

    def _cannot_clear(self, namespace: str) -> BackendError:
        return BackendError(
            f"{type(self.backend).__name__} has no clear_namespace(): cannot remove namespace "
            f"{namespace!r} alone; implement it (see chengeta_ai.backends.base."
            "NamespacedBackend), or empty the whole store with manager.backend.clear()"
        )

    def close(self) -> None:
        self.backend.close()

    def _removal(
        self,
        op: str,
        fn: Callable[[str], _T],
        arg: str,
        matches: Callable[[str, tuple[str, ...]], bool],
    ) -> _T:
        """Runs a removal: streams in flight that it covers are not stored after it (here, and
        with `RedisFlights` in every process)."""
        racing: list[tuple[RemovalListener, list[str]]] = []
        local, remote = self._listeners()
        key = arg if op == "delete" else None
        self._begin_removal(local, matches, key, racing)
        unannounced = self._announce(remote, matches, key) if remote else None
        try:
            result = fn(arg)
        except BackendError:
            self.count("backend_errors")
            raise
        except Exception as exc:
            self.count("backend_errors")
            raise BackendError(f"backend {op} failed for {arg}: {exc!r}") from exc
        self._wait_racing(racing)
        if unannounced is not None:
            raise self._unannounced(op, arg, unannounced)
        return result

    def _unannounced(self, op: str, arg: str, exc: BaseException) -> BackendError:
        self.count("backend_errors")
        error = BackendError(
            f"{op} {arg}: removed from the backend, but the other processes could not be told "
            f"(RedisFlights): a stream of theirs begun before it may still be served: {exc!r}"
        )
        error.__cause__ = exc
        return error

    # -- public API: async twins ------------------------------------------------------------

    async def aget(
        self, key: str, default: Any = None, *, serializer: Serializer | None = None
    ) -> Any:
        value = self._decode(await self.aget_raw(check_key(key)), serializer)
        if isinstance(value, DecodeError):
            await self.adrop_corrupt(key, value)
            return default
        return default if value is _MISSING else value

    async def aset(
        self,
        key: str,
        value: Any,
        ttl: float | None = None,
        tags: Iterable[str] | None = None,
        *,
        serializer: Serializer | None = None,
    ) -> bool:
        ttl, tag_tuple = self.resolve_ttl(ttl), check_tags(tags)
        data = self._encode(check_key(key), value, serializer)
        return data is not None and await self.aset_raw(key, data, ttl, tag_tuple)

    async def adelete(self, key: str) -> bool:
        check_key(key)
        return await self._aremoval("delete", self.backend.adelete, key, lambda k, _t: k == key)

    async def aexists(self, key: str) -> bool:
        check_key(key)
        try:
            return await self.backend.aexists(key)
        except Exception as exc:
            self.backend_failed("exists", key, exc)
            return False

    async def ainvalidate(self, tag: str) -> int:
        check_tags([tag])
        return await self._aremoval(
            "invalidate", self._ainvalidate_namespace, tag, lambda _key, tags: tag in tags
        )

    async def aclear(self) -> None:
        await self._aremoval(
            "clear", self._aclear_namespace, self.key_builder.namespace, _every_entry
        )

    async def _ainvalidate_namespace(self, tag: str) -> int:
        namespace = self.key_builder.namespace
        scoped = getattr(self.backend, "ainvalidate_namespace", None)
        if scoped is not None:
            try:
                return int(await scoped(namespace, tag))
            except NotImplementedError:
                pass
        self._unscoped_fallback()
        return await self.backend.ainvalidate(scoped_tag(namespace, tag))

    async def _aclear_namespace(self, namespace: str) -> None:
        scoped = getattr(self.backend, "aclear_namespace", None)
        if scoped is not None:
            try:
                await scoped(namespace)
                return
            except NotImplementedError:
                pass
        raise self._cannot_clear(namespace)

    async def aclose(self) -> None:
        await self.backend.aclose()

    async def _aremoval(
        self,
        op: str,
        fn: Callable[[str], Awaitable[_T]],
        arg: str,
        matches: Callable[[str, tuple[str, ...]], bool],
    ) -> _T:
        racing: list[tuple[RemovalListener, list[str]]] = []
        local, remote = self._listeners()
        key = arg if op == "delete" else None
        self._begin_removal(local, matches, key, racing)
        unannounced = None
        if remote:  # Redis I/O: never on the event loop's thread
            import anyio.to_thread

            unannounced = await anyio.to_thread.run_sync(self._announce, remote, matches, key)
        try:
            result = await fn(arg)
        except BackendError:
            self.count("backend_errors")
            raise
        except Exception as exc:
            self.count("backend_errors")
            raise BackendError(f"backend {op} failed for {arg}: {exc!r}") from exc
        await self._await_racing(racing)
        if unannounced is not None:
            raise self._unannounced(op, arg, unannounced)
        return result

    def stats(self) -> ManagerStats:
        """A typed snapshot of this manager's counters plus ``backend``: the backend's own
        stats (or its error); see `ManagerStats`."""
        try:
            backend: Any = self.backend.stats()
        except Exception as exc:
            backend = {"error": repr(exc)}
        return self._counters.snapshot(ManagerStats, backend=backend)


def _every_entry(_key: str, _tags: tuple[str, ...]) -> bool:
    """`CacheManager.clear` removes every entry of its namespace."""
    return True


def _on_event_loop() -> bool:
    """Whether this thread runs an asyncio or trio event loop (a sync removal called from
    async code: waiting here would hold up the writes it waits for)."""
    import asyncio
    import sys

    if asyncio._get_running_loop() is not None:
        return True
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_trio_token()  # per thread: raises outside trio.run's thread
    except RuntimeError:
        return False
    return True
