"""`RedisBackend`: a cache shared by many processes and machines, on Redis >= 7 (or Valkey).

Keys (``prefix`` defaults to ``"chengeta:"``; one prefix per namespace)::

    {prefix}k:<key>     STRING   the encoded entry, native expiry (SET ... PX ttl)
    {prefix}tag:<tag>   ZSET     member <key>, score = the entry's expiry in unix ms (+inf: none)

Round trips. ``get`` is one ``GET``. ``set`` is one ``SET`` without tags, else one Lua script
(``EVALSHA``; atomic and all-or-nothing): it first checks that every tag key is a sorted set or
absent (a ``MULTI`` is not rolled back: a tag key of another type, left by another program,
would fail its ``ZADD`` after the ``SET`` ran, storing an entry that is reported not stored and
that ``invalidate`` cannot reach; the script writes nothing and fails instead), then runs the
``SET`` and, per tag, ``ZADD``, ``ZREMRANGEBYSCORE`` (drops members whose entries expired more
than ``tag_prune_grace`` seconds ago, so a busy tag never grows without bound) and two
``PEXPIRE``: ``NX`` gives a new tag set an expiry, ``GT`` extends it, so a tag set always
outlives its longest-lived member (an entry without TTL gives its tags an expiry of ~100 years,
never ``PERSIST``, so ``NX``/``GT`` stay exact). A server or user that refuses scripts (an ACL
without ``@scripting``, scripting turned off) gets the same all-or-nothing store without one:
``WATCH`` the tag sets, check their types, then one ``MULTI`` (a few more round trips; chosen
once per backend, at the first refusal). ``invalidate`` reads the members (one ``ZRANGE``)
and then, per 500 members, ``UNLINK``s the entries and ``ZREM``s exactly those members in one
``MULTI``: a key tagged concurrently after the read keeps its registration, so none is lost.
`stats` counts round trips.

Namespaces (managers with different ``CacheKeyBuilder`` namespaces on one backend; see
`chengeta_ai.backends.base`). ``invalidate_namespace`` reads the scoped tag set and the bare
one in one pipelined round trip, keeps the bare set's members of the namespace's keys only, and
removes them like ``invalidate``. ``clear_namespace`` SCANs (never ``KEYS``) the entries under
``{prefix}k:{namespace}:`` and ``UNLINK``s them, then SCANs the namespace's scoped tag sets
``{prefix}tag:\x1f{namespace}:*`` and removes their members' entries and registrations like
``invalidate``; glob characters in the prefix and namespace are escaped. Bare tag sets (entries
stored before tags were scoped) may keep members of cleared keys: harmless, as above.

Trade-offs of MULTI without reads: re-setting a key with *different* tags leaves it registered
under its old tags too (until the old score passes), so invalidating an old tag also drops it.
That errs toward a miss, never toward stale data; chengeta_ai derives tags from the request that
also determines the key, so in practice a key's tags never change. ``delete`` leaves harmless
stale members behind.

Redis Cluster. ``MULTI``, scripts and multi-key commands need every key in one hash slot. With a
prefix containing a hash tag, e.g. ``prefix="{chengeta}:"``, every key of the namespace hashes
to the same slot: ``set`` with tags and ``invalidate`` keep working unchanged (and stay atomic),
at the cost of putting one namespace on one shard (spread load by using several namespaces, each
its own ``{...}``). The alternative, per-key slots with tag sets on other shards, would make a
``set`` span several nodes (several round trips, no atomicity: a crash between them loses tag
registrations), which is why it was not chosen. A plain ``"chengeta:"`` prefix is for standalone
/ Sentinel deployments. Pass a ``redis.cluster.RedisCluster`` as ``client`` to use a cluster
(not tested here: no cluster in CI; the one-slot property of the keys is tested).

Failure. Timeouts are short (``socket_connect_timeout=0.5``, ``socket_timeout=1.0`` seconds)
and a command is retried once only on a connection error (a pooled socket broken by a server
restart), so an unreachable server costs one failed connect, not redis-py's default backoff.
After a connection failure, operations raise `BackendError` at once without I/O for
``down_backoff`` seconds (0.5 s), so a dead server stalls no caller; then the next call tries
again and redis-py reconnects. All driver errors surface as `BackendError`.

Async. Under asyncio the async twins use ``redis.asyncio`` (one client per event loop, no
threads). ``redis.asyncio`` only runs on asyncio, so under trio they run the sync client in an
anyio worker thread. Values are opaque bytes: nothing here ever unpickles.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import urllib.parse
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from chengeta_ai._optional import missing_extra
from chengeta_ai.backends.base import (
    BaseBackend,
    namespace_key_prefix,
    namespace_tag_prefix,
    scoped_tag,
)
from chengeta_ai.errors import BackendError

try:
    import redis
    import redis.asyncio
    import redis.asyncio.retry
    import redis.backoff
    import redis.retry
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without redis
    raise missing_extra("redis", "RedisBackend") from exc

__all__ = ["RedisBackend"]

_FOREVER_MS = 100 * 365 * 24 * 3600 * 1000  # tag-set expiry for entries without TTL
_INVALIDATE_BATCH = 500
_SCAN_BATCH = 1000
_TAG_SET_BATCH = 100  # tag sets read per pipelined round trip by clear_namespace


#: ``set`` with tags. KEYS: the entry, then its tag sets; ARGV: value, PX in ms ("" = none),
#: member, score, prune cutoff, tag-set expiry in ms. Nothing is written unless every tag key
#: is a sorted set or absent.
_SET_TAGGED = """
for i = 2, #KEYS do
  local kind = redis.call('TYPE', KEYS[i])['ok']
  if kind ~= 'zset' and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE tag set ' .. KEYS[i] .. ' holds a ' .. kind
      .. ', not a sorted set: nothing written')
  end
end
if ARGV[2] == '' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[i], ARGV[4], ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', '(' .. ARGV[5])
  redis.call('PEXPIRE', KEYS[i], ARGV[6], 'NX')
  redis.call('PEXPIRE', KEYS[i], ARGV[6], 'GT')
end
return 1
"""
_SET_TAGGED_SHA = hashlib.sha1(_SET_TAGGED.encode()).hexdigest()


_WATCH_TRIES = 5


def _scripting_refused(exc: redis.ResponseError) -> bool:
    """The server or the user's ACL refuses scripts (not an error of the script itself)."""
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return True
    text = str(exc)
    return any(word in text for word in ("NOPERM", "no permissions", "unknown command", "disabled"))


def _split_script_args(args: list[Any]) -> tuple[list[Any], list[Any]]:
    """`_SET_TAGGED`'s ``numkeys, *keys, *argv`` as ``(keys, argv)``."""
    n = args[0]
    return list(args[1 : 1 + n]), list(args[1 + n :])


def _check_tag_kind(tag_key: str, kind: Any) -> None:
    if kind not in (b"zset", b"none", "zset", "none"):
        raise redis.ResponseError(
            f"WRONGTYPE tag set {tag_key} holds a {kind!r}, not a sorted set: nothing written"
        )


def _queue_tagged(
    pipe: Any, keys: list[Any], value: Any, px: Any, member: Any, score: Any, cutoff: Any,
    tag_ms: Any,
) -> None:  # fmt: skip
    """`_SET_TAGGED`'s writes, queued on a ``MULTI`` pipeline (sync or async)."""
    pipe.set(keys[0], value, px=px or None)
    for tag_key in keys[1:]:
        pipe.zadd(tag_key, {member: score})
        pipe.zremrangebyscore(tag_key, "-inf", f"({cutoff}")
        pipe.pexpire(tag_key, tag_ms, nx=True)
        pipe.pexpire(tag_key, tag_ms, gt=True)


def _redact(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rpartition("@")
        user = parts.username or ""
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))
    except ValueError:
        return "<unparsable url>"


def _escape_glob(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


def _batches(
    tag_sets: Sequence[tuple[str | bytes, list[bytes]]],
) -> Iterator[tuple[str | bytes, list[bytes]]]:
    """``(tag set, members)`` in slices of at most `_INVALIDATE_BATCH` members, none empty."""
    for tag_key, members in tag_sets:
        for i in range(0, len(members), _INVALIDATE_BATCH):
            yield tag_key, members[i : i + _INVALIDATE_BATCH]


class RedisBackend(BaseBackend):
    """Entries and tag sets in Redis (see the module doc for the key layout and guarantees).

    ``client`` / ``async_client`` may be given (they are then not closed by `close`); otherwise
    both are built from ``url`` with the timeouts below. Values must be ``bytes``.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "chengeta:",
        client: redis.Redis | None = None,
        async_client: redis.asyncio.Redis | None = None,
        socket_timeout: float = 1.0,
        socket_connect_timeout: float = 0.5,
        down_backoff: float = 0.5,
        max_connections: int | None = None,
        tag_prune_grace: float = 60.0,
    ) -> None:
        self.url = url
        #: ``url`` without its password, for logs, errors, ``repr`` and ``stats``.
        self.safe_url = _redact(url)
        self.prefix = prefix
        self.down_backoff = down_backoff
        self.tag_prune_grace = tag_prune_grace
        self._client_kwargs: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_connect_timeout,
            "max_connections": max_connections,
        }
        self._owns_client = client is None
        self._client: redis.Redis = (
            client
            if client is not None
            else redis.Redis.from_url(
                url,
                retry=redis.retry.Retry(
                    redis.backoff.NoBackoff(), 1, supported_errors=(redis.ConnectionError,)
                ),
                **self._client_kwargs,
            )
        )
        for given in (client, async_client):
            get_encoder = getattr(given, "get_encoder", None)
            if get_encoder is not None and getattr(get_encoder(), "decode_responses", False):
                raise ValueError(
                    "RedisBackend needs clients without decode_responses (entries are bytes; "
                    "a decoding client fails every read): pass a client made without it, or "
                    "the URL"
                )
        self._async_client = async_client
        # One redis.asyncio client per event loop: its connections are bound to the loop.
        self._aclients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, redis.asyncio.Redis
        ] = weakref.WeakKeyDictionary()
        # Guards the counters, the circuit state and _aclients; never held across I/O.
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._closed = False
        #: False once the server refused the store script (ACL, scripting off): WATCH/MULTI.
        self._scripting = True
        self._counts = dict.fromkeys(
            ("round_trips", "errors", "short_circuited", "gets", "hits", "sets", "invalidations"),
            0,
        )

    def __repr__(self) -> str:
        return f"RedisBackend({self.safe_url!r}, prefix={self.prefix!r})"

    # -- keys --------------------------------------------------------------------------------

    def entry_key(self, key: str) -> str:
        """The Redis key holding ``key``'s entry."""
        return f"{self.prefix}k:{key}"

    def tag_key(self, tag: str) -> str:
        """The Redis key of the sorted set of keys tagged ``tag``."""
        return f"{self.prefix}tag:{tag}"

    # -- plumbing shared by the sync and async twins -----------------------------------------

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, n in deltas.items():
                self._counts[name] += n

    @contextmanager
    def _guard(self, round_trips: int = 1) -> Iterator[None]:
        """Count a round trip; short-circuit while down; map driver errors to BackendError."""
        if self._closed:
            raise BackendError(f"{self!r} is closed")
        if time.monotonic() < self._down_until:
            self._count(short_circuited=1, errors=1)
            raise BackendError(f"redis at {self.safe_url} unavailable (backing off)")
        self._count(round_trips=round_trips)
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            with self._lock:
                self._counts["errors"] += 1
                self._down_until = time.monotonic() + self.down_backoff
            raise BackendError(f"redis at {self.safe_url}: {exc}") from exc
        except redis.RedisError as exc:
            self._count(errors=1)
            raise BackendError(f"redis at {self.safe_url}: {exc}") from exc

    def _set_command(
        self, key: str, value: bytes, ttl: float | None, tags: Sequence[str]
    ) -> tuple[str, list[Any]]:
        """The one command that stores an entry: ``("SET", [key, value, px])`` without tags, else
        ``("SCRIPT", numkeys + keys + args)`` of `_SET_TAGGED` (sync or async client)."""
        ek = self.entry_key(key)
        ttl_ms = max(1, int(ttl * 1000)) if ttl is not None and ttl > 0 else None
        if not tags:
            return "SET", [ek, value, ttl_ms]
        now_ms = int(time.time() * 1000)
        if ttl_ms is not None:
            score = str(now_ms + ttl_ms)
            tag_ms = ttl_ms + int(self.tag_prune_grace * 1000)
        else:
            score = "+inf"
            tag_ms = _FOREVER_MS
        cutoff = now_ms - int(self.tag_prune_grace * 1000)
        tag_keys = [self.tag_key(tag) for tag in dict.fromkeys(tags)]
        args = [value, "" if ttl_ms is None else ttl_ms, key, score, cutoff, tag_ms]
        return "SCRIPT", [1 + len(tag_keys), ek, *tag_keys, *args]

    def _queue_invalidate(self, pipe: Any, tag_key: str | bytes, members: Sequence[bytes]) -> None:
        pipe.unlink(*(self.entry_key(m.decode()) for m in members))
        pipe.zrem(tag_key, *members)

    def _namespace_tag_sets(
        self, namespace: str, tag: str, scoped: list[bytes], bare: list[bytes]
    ) -> list[tuple[str | bytes, list[bytes]]]:
        """The members `invalidate_namespace` removes, by tag set: all of the scoped set, the
        bare set's members that are keys of the namespace (entries stored before scoping)."""
        prefix = namespace_key_prefix(namespace).encode()
        return [
            (self.tag_key(scoped_tag(namespace, tag)), scoped),
            (self.tag_key(tag), [m for m in bare if m.startswith(prefix)]),
        ]

    def _namespace_matches(self, namespace: str) -> tuple[str, str]:
        """SCAN patterns of the namespace's entries and of its scoped tag sets."""
        entries = _escape_glob(self.entry_key(namespace_key_prefix(namespace))) + "*"
        tag_sets = _escape_glob(self.tag_key(namespace_tag_prefix(namespace))) + "*"
        return entries, tag_sets

    def _aclient(self) -> redis.asyncio.Redis | None:
        """The asyncio client for the running loop, or None: not on asyncio (trio), or a sync
        ``client`` was given without an ``async_client`` (the async twins then run the given
        client in a worker thread: a client built from ``url`` could be another server)."""
        if self._async_client is not None:
            return self._async_client
        if not self._owns_client:
            return None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        with self._lock:
            client = self._aclients.get(loop)
            if client is None:
                client = redis.asyncio.Redis.from_url(
                    self.url,
                    retry=redis.asyncio.retry.Retry(
                        redis.backoff.NoBackoff(), 1, supported_errors=(redis.ConnectionError,)
                    ),
                    **self._client_kwargs,
                )
                self._aclients[loop] = client
        return client

    # -- sync --------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        with self._guard():
            value = self._client.get(self.entry_key(key))
        self._count(gets=1, hits=value is not None)
        return value  # type: ignore[return-value]

    def set(
        self, key: str, value: bytes, ttl: float | None = None, tags: Sequence[str] = ()
    ) -> None:
        kind, args = self._set_command(key, value, ttl, tags)
        with self._guard():
            if kind == "SET":
                self._client.set(args[0], args[1], px=args[2])
            elif self._scripting:
                try:
                    self._client.evalsha(_SET_TAGGED_SHA, *args)
                except redis.exceptions.NoScriptError:
                    self._client.eval(_SET_TAGGED, *args)
                except redis.ResponseError as exc:
                    if not _scripting_refused(exc):
                        raise
                    self._scripting = False
                    self._set_watched(args)
            else:
                self._set_watched(args)
        self._count(sets=1)

    def _set_watched(self, args: list[Any]) -> None:
        """`_SET_TAGGED` without scripting (a user whose ACL leaves out ``@scripting``, a
        server with scripting off): ``WATCH`` the tag sets, check their types, then one
        ``MULTI``; all or nothing as well (``EXEC`` aborts if a tag set changed meanwhile;
        retried). A few more round trips per store."""
        keys, (value, px, member, score, cutoff, tag_ms) = _split_script_args(args)
        with self._client.pipeline(transaction=True) as pipe:
            for _ in range(_WATCH_TRIES):
                try:
                    pipe.watch(*keys[1:])  # type: ignore[no-untyped-call]
                    for tag_key in keys[1:]:
                        _check_tag_kind(tag_key, pipe.type(tag_key))
                    pipe.multi()
                    _queue_tagged(pipe, keys, value, px, member, score, cutoff, tag_ms)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue
        raise redis.ResponseError("tag sets kept changing during the store: not stored")

    def delete(self, key: str) -> bool:
        with self._guard():
            return bool(self._client.unlink(self.entry_key(key)))

    def exists(self, key: str) -> bool:
        with self._guard():
            return bool(self._client.exists(self.entry_key(key)))

    def invalidate(self, tag: str) -> int:
        """Delete every entry tagged ``tag``; return how many existed."""
        with self._guard():
            members: list[bytes] = self._client.zrange(self.tag_key(tag), 0, -1)  # type: ignore[assignment]
        self._count(invalidations=1)
        return self._remove_members([(self.tag_key(tag), members)])

    def invalidate_namespace(self, namespace: str, tag: str) -> int:
        """Delete the entries tagged ``tag`` in ``namespace`` (see the module doc)."""
        with self._guard(), self._client.pipeline(transaction=False) as pipe:
            pipe.zrange(self.tag_key(scoped_tag(namespace, tag)), 0, -1)
            pipe.zrange(self.tag_key(tag), 0, -1)
            scoped, bare = pipe.execute()
        self._count(invalidations=1)
        return self._remove_members(self._namespace_tag_sets(namespace, tag, scoped, bare))

    def _remove_members(self, tag_sets: Sequence[tuple[str | bytes, list[bytes]]]) -> int:
        """UNLINK the members' entries and ZREM exactly those members, per batch in a MULTI."""
        removed = 0
        for tag_key, batch in _batches(tag_sets):
            with self._guard(), self._client.pipeline(transaction=True) as pipe:
                self._queue_invalidate(pipe, tag_key, batch)
                removed += pipe.execute()[0]
        return removed

    def clear_namespace(self, namespace: str) -> None:
        """Delete ``namespace``'s entries and scoped tag sets (SCAN, see the module doc)."""
        entries, tag_sets = self._namespace_matches(namespace)
        with self._guard():
            self._unlink_matching(entries)
            tag_keys: list[bytes] = list(self._client.scan_iter(match=tag_sets, count=1000))
        for i in range(0, len(tag_keys), _TAG_SET_BATCH):
            chunk = tag_keys[i : i + _TAG_SET_BATCH]
            with self._guard(), self._client.pipeline(transaction=False) as pipe:
                for tag_key in chunk:
                    pipe.zrange(tag_key, 0, -1)
                members = pipe.execute()
            self._remove_members(list(zip(chunk, members, strict=True)))

    def _unlink_matching(self, match: str) -> None:
        batch: list[bytes] = []
        for k in self._client.scan_iter(match=match, count=1000):
            batch.append(k)
            if len(batch) >= _SCAN_BATCH:
                self._client.unlink(*batch)
                batch = []
        if batch:
            self._client.unlink(*batch)

    def clear(self) -> None:
        """Delete every key under this backend's prefix (SCAN + UNLINK; other prefixes stay),
        whatever its namespace: `CacheManager.clear` uses `clear_namespace` instead."""
        with self._guard():
            self._unlink_matching(_escape_glob(self.prefix) + "*")

    def close(self) -> None:
        """Close the clients this backend created (asyncio ones are dropped: see `aclose`)."""
        self._closed = True
        with self._lock:
            self._aclients.clear()
        if self._owns_client:
            self._client.close()

    def stats(self) -> dict[str, Any]:
        """Counters of this instance: ``round_trips`` (network round trips issued), ``gets``,
        ``hits``, ``sets``, ``invalidations``, ``errors``, ``short_circuited`` (calls refused
        without I/O while the server was down). Entry counts would need a SCAN: not reported."""
        with self._lock:
            out: dict[str, Any] = {"backend": "redis", "url": self.safe_url, "prefix": self.prefix}
            out.update(self._counts)
            out["down"] = time.monotonic() < self._down_until
        return out

    # -- async: redis.asyncio on asyncio, the sync client in a worker thread elsewhere --------

    async def aget(self, key: str) -> bytes | None:
        client = self._aclient()
        if client is None:
            return await super().aget(key)
        with self._guard():
            value = await client.get(self.entry_key(key))
        self._count(gets=1, hits=value is not None)
        return value  # type: ignore[return-value]

    async def aset(
        self, key: str, value: bytes, ttl: float | None = None, tags: Sequence[str] = ()
    ) -> None:
        client = self._aclient()
        if client is None:
            return await super().aset(key, value, ttl, tags)
        kind, args = self._set_command(key, value, ttl, tags)
        with self._guard():
            if kind == "SET":
                await client.set(args[0], args[1], px=args[2])
            elif self._scripting:
                try:
                    await client.evalsha(_SET_TAGGED_SHA, *args)
                except redis.exceptions.NoScriptError:
                    await client.eval(_SET_TAGGED, *args)
                except redis.ResponseError as exc:
                    if not _scripting_refused(exc):
                        raise
                    self._scripting = False
                    await self._aset_watched(client, args)
            else:
                await self._aset_watched(client, args)
        self._count(sets=1)

    async def _aset_watched(self, client: redis.asyncio.Redis, args: list[Any]) -> None:
        """Async twin of `_set_watched`."""
        keys, (value, px, member, score, cutoff, tag_ms) = _split_script_args(args)
        async with client.pipeline(transaction=True) as pipe:
            for _ in range(_WATCH_TRIES):
                try:
                    await pipe.watch(*keys[1:])
                    for tag_key in keys[1:]:
                        _check_tag_kind(tag_key, await pipe.type(tag_key))
                    pipe.multi()  # type: ignore[no-untyped-call]
                    _queue_tagged(pipe, keys, value, px, member, score, cutoff, tag_ms)
                    await pipe.execute()
                    return
                except redis.WatchError:
                    continue
        raise redis.ResponseError("tag sets kept changing during the store: not stored")

    async def adelete(self, key: str) -> bool:
        client = self._aclient()
        if client is None:
            return await super().adelete(key)
        with self._guard():
            return bool(await client.unlink(self.entry_key(key)))

    async def aexists(self, key: str) -> bool:
        client = self._aclient()
        if client is None:
            return await super().aexists(key)
        with self._guard():
            return bool(await client.exists(self.entry_key(key)))

    async def ainvalidate(self, tag: str) -> int:
        client = self._aclient()
        if client is None:
            return await super().ainvalidate(tag)
        with self._guard():
            members: list[bytes] = await client.zrange(self.tag_key(tag), 0, -1)  # type: ignore[assignment]
        self._count(invalidations=1)
        return await self._aremove_members(client, [(self.tag_key(tag), members)])

    async def ainvalidate_namespace(self, namespace: str, tag: str) -> int:
        client = self._aclient()
        if client is None:
            return await super().ainvalidate_namespace(namespace, tag)
        with self._guard():
            async with client.pipeline(transaction=False) as pipe:
                pipe.zrange(self.tag_key(scoped_tag(namespace, tag)), 0, -1)
                pipe.zrange(self.tag_key(tag), 0, -1)
                scoped, bare = await pipe.execute()
        self._count(invalidations=1)
        tag_sets = self._namespace_tag_sets(namespace, tag, scoped, bare)
        return await self._aremove_members(client, tag_sets)

    async def _aremove_members(
        self, client: redis.asyncio.Redis, tag_sets: Sequence[tuple[str | bytes, list[bytes]]]
    ) -> int:
        removed = 0
        for tag_key, batch in _batches(tag_sets):
            with self._guard():
                async with client.pipeline(transaction=True) as pipe:
                    self._queue_invalidate(pipe, tag_key, batch)
                    removed += (await pipe.execute())[0]
        return removed

    async def aclear_namespace(self, namespace: str) -> None:
        client = self._aclient()
        if client is None:
            return await super().aclear_namespace(namespace)
        entries, tag_sets = self._namespace_matches(namespace)
        with self._guard():
            await self._aunlink_matching(client, entries)
            tag_keys: list[bytes] = [k async for k in client.scan_iter(match=tag_sets, count=1000)]
        for i in range(0, len(tag_keys), _TAG_SET_BATCH):
            chunk = tag_keys[i : i + _TAG_SET_BATCH]
            with self._guard():
                async with client.pipeline(transaction=False) as pipe:
                    for tag_key in chunk:
                        pipe.zrange(tag_key, 0, -1)
                    members = await pipe.execute()
            await self._aremove_members(client, list(zip(chunk, members, strict=True)))

    async def _aunlink_matching(self, client: redis.asyncio.Redis, match: str) -> None:
        batch: list[bytes] = []
        async for k in client.scan_iter(match=match, count=1000):
            batch.append(k)
            if len(batch) >= _SCAN_BATCH:
                await client.unlink(*batch)
                batch = []
        if batch:
            await client.unlink(*batch)

    async def aclear(self) -> None:
        client = self._aclient()
        if client is None:
            return await super().aclear()
        with self._guard():
            await self._aunlink_matching(client, _escape_glob(self.prefix) + "*")

    async def aclose(self) -> None:
        """Close the running loop's asyncio client (if created here) and the sync client."""
        client = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            with self._lock:
                client = self._aclients.pop(loop, None)
        self.close()
        if client is not None:
            await client.aclose()
