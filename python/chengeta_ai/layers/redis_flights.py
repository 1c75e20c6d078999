"""`RedisFlights`: one upstream stream per key across processes and machines, through Redis.

The in-process flight machinery (`fanout`, `flights`, `flight_state`) is unchanged: every process
still has one local flight per key, fanned out to its local consumers with the usual log,
cursors and backpressure. Redis only changes *what the local flight reads*: this module is an
upstream adapter put in front of ``stream_fn`` when a process leads its local flight.

Keys (one hash tag per key, so that every key of one stream lives in one Cluster slot)::

    {prefix}fl:{<key>}:lease       STRING  the producer's token "<gen>.<nonce>", PX lease;
                                           "=<token>" for a short while after a stored end
    {prefix}fl:{<key>}:gen         STRING  INCR counter of generations, PX log_ttl
    {prefix}fl:{<key>}:log:<token> STREAM  one entry per batch of chunks ``d`` (compact codec,
                                           a list), then one final entry ``f`` (+ ``m``)
    {prefix}fl:{<key>}:w           ZSET    follower readers, score = registration expiry (ms)

Election. The local leader runs `ACQUIRE`: if the lease key exists, it follows that token's
log; otherwise it INCRs the generation, sets ``lease = "<gen>.<nonce>" NX PX lease`` (in one
script, so one winner) and produces. Every write of a producer (`APPEND`, `FINISH`) is one Lua
script that first checks that the lease still holds its token: a producer whose lease lapsed
(killed, paused, partitioned) can never write again, and a new producer writes a new log.

Producer. Its flight reads the real upstream through a tee: each chunk is encoded (a pristine
copy, before any consumer sees it) into the pending batch and handed to the producer's writer
thread, which sends *everything pending* in one `APPEND` (one round trip per batch of chunks
that arrived while the previous one was in flight; the same script renews the lease and the
log's TTL and returns how many follower readers are registered). With no chunk for
``lease / 3`` the writer renews the lease alone. Under ``on_abandon="cancel"``, a producer whose
last local consumer left keeps reading (the flight drains) and its writer appends with
``cancel_if_alone``: the script that counts the live follower readers writes the final
``cancel`` record and drops the lease when there is none, and only then is the local upstream
cancelled (on the flight's event loop, for an async flight). The check runs at once and at every
later append, so the upstream closes when the last reader in any process leaves. At the
upstream's end the tee flushes and checks the fence before the flight stores (the lease is
renewed during the store); a fenced producer does not store. After the store, `Flight.on_end`
has the writer append the final record (``done``, ``error``, ``cancel`` or ``abandon``); after a
stored ``done`` the lease becomes ``=<token>`` for ``done_ttl`` seconds so that callers that
missed the store replay the log instead of calling the upstream again; the log expires
``log_ttl`` seconds later.

Follower. Its flight reads the producer's log from the first entry (``0-0``, never ``$``) with
``XREAD BLOCK`` (at most ``block`` seconds per call), decodes each batch and yields its chunks:
one reader, so one Redis connection, per key per process, whatever the number of local
consumers. Before its first read it registers in the ``w`` set with a script that checks the
lease: the cancel decision and the registration are serialised by Redis, so a follower is either
counted by the producer's decision or, registering after it, finds the lease gone, has read
nothing, and elects again. The guarantee: the producer cancels only when no registration is
live, and a follower never receives chunks of a stream cancelled under it while it stays
registered. One keeper thread per `RedisFlights` renews every registration every ``lease / 3``
seconds whether or not the reader reads (its local consumers may hold it back) and extends the
log's TTL with it, so a follower held back by a slow consumer still finds the whole log.

Failure. After an empty ``XREAD`` the follower checks the lease: gone or another token without
a final record means the producer was lost. A follower that has yielded nothing elects again
(and may become the producer: the transparent restart); one that has yielded chunks raises
`UpstreamLost`. A final ``error`` record raises `UpstreamLost` naming the producer's error; a
final ``cancel`` or ``abandon`` is treated like a loss. A lost producer may have died between its
store and its ``done`` record: before electing again or raising, a follower looks for the stored
entry and, if there is one, continues from it (all of it for one that has yielded nothing; the
rest, after checking that the chunks it has yielded are the entry's first ones, for one that
has). Redis errors never reach a caller: the
election falls back to the local upstream (an in-process flight, counted ``redis_fallbacks``);
a producer whose writes fail stops publishing and carries on locally; a follower whose reads
fail calls the upstream itself and, if it had already yielded chunks, skips them after checking
that the new stream starts with the same chunks (else `UpstreamLost`: a different answer cannot
be spliced). After a failure the client is not used for ``down_backoff`` seconds.

Threads. Every Redis call uses the *sync* redis-py client: directly from sync flights, and in an
anyio worker thread (``anyio.to_thread.run_sync``) from async flights, so asyncio and trio share
one code path and the event loop never blocks (``redis.asyncio`` does not run on trio). Each
producer has a writer thread for the life of its stream.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from chengeta_ai._optional import missing_extra
from chengeta_ai.core.cache_manager import unframe
from chengeta_ai.errors import UpstreamLost

try:
    import redis
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without redis
    raise missing_extra("redis", "RedisFlights") from exc

from chengeta_ai.layers.fanout import (
    Flight,
    _aclose_upstream,
    _open_upstream,
)
from chengeta_ai.layers.flight_state import Phase
from chengeta_ai.layers.upstream import check_sync_stream
from chengeta_ai.logs import warn
from chengeta_ai.serializers import ChunkSink, CompactSerializer, decode_cap

__all__ = ["RedisFlights"]

logger = logging.getLogger("chengeta_ai")

# KEYS: lease, gen, the key's removal time; ARGV: lease_ms, nonce, log_ttl_ms, the namespace's
# removal time (ms, Redis's clock; read by the caller: another Cluster slot). A token is
# "<gen>.<nonce>@<ms>": when its producer was elected, by Redis's clock (none in tokens of
# earlier versions: 0). A lease without a TTL (planted, or PERSISTed) is nobody's: taken over,
# never followed. A lease of a stream elected no later than the key's or the namespace's last
# removal is never followed: a stored end's ("=<token>") is taken over; a live producer's is
# left to it (2: the caller reads the upstream locally).
_ACQUIRE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local removed = math.max(tonumber(ARGV[4]) or 0, tonumber(redis.call('GET', KEYS[3])) or 0)
local cur = redis.call('GET', KEYS[1])
if cur and redis.call('PTTL', KEYS[1]) >= 0 then
  local began = tonumber(string.match(cur, '@(%d+)$')) or 0
  if began > removed then return {0, cur} end
  if string.sub(cur, 1, 1) ~= '=' then return {2, cur} end
end
local g = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local tok = tostring(g) .. '.' .. ARGV[2] .. '@' .. tostring(now)
redis.call('SET', KEYS[1], tok, 'PX', ARGV[1])
return {1, tok}
"""

# KEYS: a removal-time key; ARGV: its TTL in ms (0: none). Sets it to Redis's clock now (ms):
# streams elected no later than this are followed and stored by nobody.
_MARK_REMOVAL = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if tonumber(ARGV[1]) > 0 then
  redis.call('SET', KEYS[1], now, 'PX', ARGV[1])
else
  redis.call('SET', KEYS[1], now)
end
return now
"""

#: How long a key's removal time is kept: longer than any stream elected before it can last.
_KEY_REMOVAL_TTL_MS = 24 * 3600 * 1000

# KEYS: lease, log, watchers; ARGV: token, lease_ms, log_ttl_ms, cancel_if_alone[, batch]
# Returns the live follower readers, -1 if fenced, -2 if it cancelled: with cancel_if_alone
# ("1": the producer has no local consumer left, under on_abandon="cancel") and no live reader,
# it writes the final ``cancel`` record and drops the lease in the same script, so a follower
# registering (`_WATCH`, same slot) is either counted here or finds the lease gone.
_APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if #ARGV >= 5 then redis.call('XADD', KEYS[2], '*', 'd', ARGV[5]) end
local t = redis.call('TIME')
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', t[1] * 1000 + math.floor(t[2] / 1000))
local n = redis.call('ZCARD', KEYS[3])
if n == 0 and ARGV[4] == '1' then
  redis.call('XADD', KEYS[2], '*', 'f', 'cancel', 'm', 'no consumer left in any process')
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  redis.call('DEL', KEYS[1])
  return -2
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return n
"""

# KEYS: lease, log; ARGV: token, kind, message, log_ttl_ms, done_ms
_FINISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('XADD', KEYS[2], '*', 'f', ARGV[2], 'm', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
if tonumber(ARGV[5]) > 0 then
  redis.call('SET', KEYS[1], '=' .. ARGV[1], 'PX', ARGV[5])
else
  redis.call('DEL', KEYS[1])
end
return 1
"""

# KEYS: lease, log, watchers; ARGV: token, reader id, registration_ms, ttl_ms
# A follower's registration (and its renewals, every lease / 3 from a timer, see `_Keeper`):
# 0 if the producer is gone without a final record worth reading (no lease, or a final
# ``cancel``/``abandon``): the reader has read nothing yet and elects again. Registered, the
# reader also keeps the log alive (a follower held back by a slow consumer still finds it).
# Times are Redis's own (TIME): no clock skew between machines.
_WATCH = """
local cur = redis.call('GET', KEYS[1])
if cur ~= ARGV[1] and cur ~= '=' .. ARGV[1] then
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
  if not last or last[2][1] ~= 'f' or last[2][2] == 'cancel' or last[2][2] == 'abandon' then
    return 0
  end
end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[3], t[1] * 1000 + math.floor(t[2] / 1000) + ARGV[3], ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""

#: What a failing Redis (standalone or Cluster) raises: fail-open on all of them.
_REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)

#: Chunks taken per XREAD entry batch (entries, each a batch of chunks).
_XREAD_COUNT = 64


class _Lost(Exception):
    """Internal: the producer is gone (lease lapsed, cancelled); ``delivered`` decides."""


class _Fallback(Exception):
    """Internal: Redis failed; read the upstream locally."""


class _Corrupt(Exception):
    """Internal: Redis holds something this code never writes (a corrupt or planted lease or
    log entry): handled like a Redis failure (the upstream is read locally)."""


#: A producer closed, or its process going away (Ctrl-C, sys.exit): for the other processes a
#: lost producer (``cancel``: who has nothing elects again), not an upstream error.
_GONE = (GeneratorExit, KeyboardInterrupt, SystemExit)

#: What makes a flight step aside to a local upstream read.
_STEP_ASIDE = (*_REDIS_ERRORS, _Corrupt)


class RedisFlights:
    """Shares in-flight streams among every process pointed at the same Redis.

    Pass it to `StreamingResponseCache` as ``flights=``. ``url_or_client``: a ``redis://`` URL
    or a sync ``redis.Redis`` / ``redis.cluster.RedisCluster`` (not closed by `close`).

    Args:
        lease: seconds a producer's lease lasts without renewal (renewed every ``lease / 3``);
            followers notice a lost producer within ``lease + block`` seconds.
        block: longest single ``XREAD BLOCK``, seconds.
        log_ttl: seconds a stream's log outlives its last write.
        done_ttl: seconds after a stored end during which callers that missed the store replay
            the log instead of electing a new producer.
        max_entry_bytes: bound on one stream's log in Redis (None: the cache's
            ``max_entry_bytes``); past it the producer stops publishing (followers that already
            have chunks get `UpstreamLost`, the others read the upstream themselves).
        down_backoff: seconds Redis is not used after a failure (every flight is local).
    """

    def __init__(
        self,
        url_or_client: str | Any = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "chengeta:",
        lease: float = 3.0,
        block: float = 0.25,
        log_ttl: float = 10.0,
        done_ttl: float = 5.0,
        max_entry_bytes: int | None = None,
        socket_timeout: float = 1.0,
        socket_connect_timeout: float = 0.5,
        down_backoff: float = 1.0,
    ) -> None:
        if lease <= 0 or block <= 0 or log_ttl <= 0 or done_ttl < 0:
            raise ValueError("lease, block and log_ttl must be > 0, done_ttl >= 0")
        if done_ttl > max(log_ttl, lease):
            # callers that missed the store would follow a log that has already expired
            raise ValueError(f"done_ttl ({done_ttl}) must not exceed log_ttl ({log_ttl})")
        self.prefix = prefix
        self.lease = lease
        self.block = block
        self.log_ttl = max(log_ttl, lease)
        self.done_ttl = done_ttl
        self.max_entry_bytes = max_entry_bytes
        self.down_backoff = down_backoff
        if isinstance(url_or_client, str):
            self.url = url_or_client
            self._owns_client = True
            # a blocking XREAD must end before the socket times out
            self.client: Any = redis.Redis.from_url(
                url_or_client,
                socket_timeout=max(socket_timeout, block + 1.0),
                socket_connect_timeout=socket_connect_timeout,
            )
        else:
            self.url = repr(url_or_client)
            self._owns_client = False
            self.client = url_or_client
            known, timeout = _socket_timeout(url_or_client)
            if known and (timeout is None or timeout <= block):
                # Fail-open needs every call to end: a client that may wait forever on a
                # stalled Redis (a frozen VM, a dropped path) would make its callers wait too,
                # and one that times out within an XREAD BLOCK would take every wait for a
                # failure. Refused here rather than patched: the client is the user's.
                raise ValueError(
                    f"RedisFlights needs a client with a socket_timeout above block ({block} s),"
                    f" got {timeout!r}: e.g. redis.Redis.from_url(url, socket_timeout=2.0)"
                    ", or pass the URL"
                )
        encoder = getattr(self.client, "get_encoder", None)
        if encoder is not None and getattr(encoder(), "decode_responses", False):
            raise ValueError(
                "RedisFlights needs a client without decode_responses (its logs are bytes)"
            )
        self._acquire = self.client.register_script(_ACQUIRE)
        self._append = self.client.register_script(_APPEND)
        self._finish = self.client.register_script(_FINISH)
        self._watch = self.client.register_script(_WATCH)
        self._mark_removal = self.client.register_script(_MARK_REMOVAL)
        #: One removal announcer per namespace (`removal_listener`).
        self._fleet_listeners: dict[str, _FleetRemovals] = {}
        self._codec = CompactSerializer()
        self._keeper = _Keeper(self)
        self._lock = threading.Lock()  # guards _down_until and _producers
        self._down_until = 0.0
        #: Producers whose writer thread still runs (`close` waits for their final records).
        self._producers: set[_Producer] = set()
        #: Longest a final record may take (a last append, then the record itself).
        self._final_wait = 2 * max(socket_timeout, block + 1.0)
        _INSTANCES.add(self)
        self._counts = dict.fromkeys(
            ("producer_round_trips", "chunks_published", "batches", "reader_round_trips"), 0
        )

    def __repr__(self) -> str:
        return f"RedisFlights({self.url}, prefix={self.prefix!r}, lease={self.lease})"

    def close(self, timeout: float = 5.0) -> None:
        """Waits (up to ``timeout`` seconds) for producers to write their final records, then
        closes the client this object created."""
        deadline = time.monotonic() + timeout
        with self._lock:
            producers = list(self._producers)
        for producer in producers:
            producer.thread.join(max(0.0, deadline - time.monotonic()))
        if self._owns_client:
            self.client.close()
            self.client.connection_pool.disconnect()

    def stats(self) -> dict[str, int]:
        """Round trips of this process: ``producer_round_trips`` (appends, renewals, final
        records), ``batches`` and ``chunks_published`` (so round trips per chunk is
        ``producer_round_trips / chunks_published``), ``reader_round_trips`` (XREADs)."""
        with self._lock:
            return dict(self._counts)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, n in deltas.items():
                self._counts[name] += n

    # -- keys ----------------------------------------------------------------------------------

    def base(self, key: str) -> str:
        return f"{self.prefix}fl:{{{key}}}"

    def lease_key(self, key: str) -> str:
        return self.base(key) + ":lease"

    def log_key(self, key: str, token: str) -> str:
        return f"{self.base(key)}:log:{token}"

    def watchers_key(self, key: str) -> str:
        return self.base(key) + ":w"

    # -- failure bookkeeping ---------------------------------------------------------------------

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def _failed(self, flight: Flight, what: str, exc: BaseException) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self.down_backoff
        flight.count("redis_fallbacks")
        warn(
            "chengeta_ai: redis flights %s failed for %s (%r): in-process",
            what,
            flight.key,
            exc,
            cause=what,
        )

    # -- sync Redis operations (called directly, or in a worker thread) ---------------------------

    def removal_key(self, namespace: str) -> str:
        """When ``invalidate``/``clear`` last ran in the namespace (ms, Redis's clock)."""
        return f"{self.prefix}fl:removals:{namespace}"

    def key_removal_key(self, key: str) -> str:
        """When ``delete`` last removed ``key`` (ms, Redis's clock; in the key's slot)."""
        return self.base(key) + ":rm"

    def removed_at(self, namespace: str, key: str | None = None) -> int:
        """The last removal covering ``key`` (or the namespace), ms by Redis's clock; 0: none.
        A value this code never writes is corrupt (`_Corrupt`: the flight steps aside)."""
        if key is None:
            values = [self.client.get(self.removal_key(namespace))]
        else:  # one round trip (a pipeline, not a transaction: two Cluster slots)
            pipe = self.client.pipeline(transaction=False)
            pipe.get(self.removal_key(namespace))
            pipe.get(self.key_removal_key(key))
            values = pipe.execute()
        latest = 0
        for raw in values:
            try:
                latest = max(latest, int(raw or 0))
            except ValueError as exc:
                raise _Corrupt(f"a removal time that is not a number: {raw[:64]!r}") from exc
        return latest

    def mark_removal(self, namespace: str, key: str | None) -> None:
        """A removal is about to run (``delete`` of ``key``, or ``invalidate``/``clear`` in
        ``namespace``): streams elected before it, in any process, are followed and stored by
        nobody from now on. Raises if Redis fails (the removal reports it)."""
        if key is None:
            self._mark_removal(keys=[self.removal_key(namespace)], args=[0])
        else:
            self._mark_removal(keys=[self.key_removal_key(key)], args=[_KEY_REMOVAL_TTL_MS])

    def removal_listener(self, namespace: str) -> _FleetRemovals:
        """What a `StreamingResponseCache` over these flights registers with its manager (one
        per namespace: a removal tells Redis once, however many caches share these flights)."""
        with self._lock:
            listener = self._fleet_listeners.get(namespace)
            if listener is None:
                listener = self._fleet_listeners[namespace] = _FleetRemovals(self, namespace)
            return listener

    def elect(self, key: str, namespace_removed_at: int = 0) -> tuple[str, str]:
        """``(role, token)``: ``"lead"`` (this caller produces ``token``'s log), ``"follow"``
        (it follows it) or ``"local"`` (the key's producer was elected before a removal of the
        key or, ``namespace_removed_at``, of its namespace: the caller reads the upstream
        itself)."""
        nonce = os.urandom(8).hex()
        won, token = self._acquire(
            keys=[self.lease_key(key), self.base(key) + ":gen", self.key_removal_key(key)],
            args=[
                int(self.lease * 1000),
                nonce,
                int(self.log_ttl * 1000),
                namespace_removed_at,
            ],
        )
        try:
            token = token.decode() if isinstance(token, bytes) else str(token)
        except UnicodeDecodeError as exc:
            raise _Corrupt(f"a lease that is not UTF-8: {token[:64]!r}") from exc
        role = {0: "follow", 1: "lead", 2: "local"}.get(int(won))
        if role is None:  # pragma: no cover - the script returns only these
            raise _Corrupt(f"unexpected election result {won!r}")
        return role, token.removeprefix("=")

    def append(
        self, key: str, token: str, batch: bytes | None, lease: float, cancel_if_alone: bool
    ) -> int:
        """Appends a batch (None: renews only); the number of follower readers, -1 if fenced,
        -2 if ``cancel_if_alone`` and no reader was registered: the final ``cancel`` record is
        written and the lease dropped (see `_APPEND`)."""
        args: list[Any] = [
            token,
            int(lease * 1000),
            int(self.log_ttl * 1000),
            "1" if cancel_if_alone else "0",
        ]
        if batch is not None:
            args.append(batch)
        keys = [self.lease_key(key), self.log_key(key, token), self.watchers_key(key)]
        return int(self._append(keys=keys, args=args))

    def watch(self, key: str, token: str, rid: str) -> int:
        """Registers (or renews) follower reader ``rid`` of ``token``'s log; 0: the producer
        is gone (see `_WATCH`)."""
        keys = [self.lease_key(key), self.log_key(key, token), self.watchers_key(key)]
        args = [token, rid, int(self.lease * 1000), int(self.log_ttl * 1000)]
        return int(self._watch(keys=keys, args=args))

    def finish(self, key: str, token: str, kind: str, message: str, keep: bool) -> bool:
        """Writes the final record; ``keep``: the lease becomes ``=token`` for ``done_ttl``."""
        done_ms = int(self.done_ttl * 1000) if keep else 0
        keys = [self.lease_key(key), self.log_key(key, token)]
        args = [token, kind, message[:1000], int(self.log_ttl * 1000), done_ms]
        return int(self._finish(keys=keys, args=args)) == 1

    # -- the adapters --------------------------------------------------------------------------

    def sync_upstream(
        self, flight: Flight, stream_fn: Callable[[Any], Iterable[Any]]
    ) -> Callable[[Any], Iterator[Any]]:
        """``stream_fn`` for a sync flight that leads its key in this process."""

        def checked(messages: Any) -> Iterable[Any]:
            return check_sync_stream(stream_fn(messages))

        return lambda messages: self._sync_stream(flight, checked, messages)

    def async_upstream(
        self, flight: Flight, stream_fn: Callable[[Any], Any]
    ) -> Callable[[Any], AsyncIterator[Any]]:
        """``stream_fn`` for an async flight that leads its key in this process."""
        return lambda messages: self._async_stream(flight, stream_fn, messages)

    def _role(self, flight: Flight) -> tuple[str, str]:
        """("lead" | "follow", token) or ("local", "")."""
        if self.down:
            flight.count("redis_fallbacks")
            return "local", ""
        try:
            role, token = self.elect(flight.key, self.removed_at(_namespace(flight)))
        except _STEP_ASIDE as exc:
            self._failed(flight, "election", exc)
            return "local", ""
        if role == "local":  # the key's producer began before a removal: not followed
            flight.count("redis_fallbacks")
            return "local", ""
        return role, token

    def _become(self, flight: Flight, role: str, first: bool) -> None:
        follower = role == "follow"
        with flight.settings.table.lock:
            flight.state.follow(follower)
        if follower and first:
            flight.count("remote_joins")
        elif role == "lead":
            flight.count("remote_leads")

    def _from_store(self, flight: Flight, delivered: int) -> list[Any] | None:
        """The producer was lost, but maybe after its store (killed between the store and its
        ``done`` record): the stored entry's chunks after the ``delivered`` ones, once those
        are checked equal to what this flight delivered (with a chunk joiner, only for a
        follower that delivered nothing: the entry is the joined object). None: no such entry.
        """
        settings = flight.settings
        if delivered and settings.chunk_joiner is not None:
            return None
        raw = settings.manager.get_raw(flight.key)  # fail-open: None if the backend fails
        if raw is None:
            return None
        try:
            cap = decode_cap(settings.max_entry_bytes)
            chunks = [
                chunk
                for batch in settings.serializer.iter_batches(
                    bytes(unframe(raw)), 256, max_decoded_bytes=cap
                )
                for chunk in batch
            ]
        except Exception as exc:  # corrupt: the cache's next hit drops it
            warn(
                "chengeta_ai: stored entry of %s unreadable: %r",
                flight.key,
                exc,
                cause="stored_entry",
            )
            return None
        if delivered:
            prefix = flight.log.snapshot()
            if prefix is None or chunks[:delivered] != prefix[:delivered]:
                return None
        logger.info(
            "chengeta_ai: producer of %s lost after its store: %d chunks from the stored entry",
            flight.key,
            len(chunks) - delivered,
        )
        return chunks[delivered:]

    def _lost(self, flight: Flight, message: str) -> UpstreamLost:
        flight.count("upstream_lost")
        return UpstreamLost(f"{flight.key}: {message}")

    # sync

    def _sync_stream(
        self, flight: Flight, stream_fn: Callable[[Any], Iterable[Any]], messages: Any
    ) -> Iterator[Any]:
        delivered = 0
        first = True
        while True:
            role, token = self._role(flight)
            self._become(flight, role, first)
            first = False
            if role == "local":
                yield from _local(flight, stream_fn(messages), delivered, self)
                return
            if role == "lead":
                yield from self._produce_sync(flight, token, lambda: stream_fn(messages))
                return
            reader = _Reader(self, flight, token)
            try:
                while True:
                    try:
                        got = reader.read()
                    except _STEP_ASIDE as exc:
                        self._failed(flight, "read", exc)
                        raise _Fallback from exc
                    if got is None:
                        continue
                    for chunk in got:
                        delivered += 1
                        yield chunk
            except _Lost as lost:
                rest = self._from_store(flight, delivered)
                if rest is None:
                    if delivered:
                        raise self._lost(flight, str(lost)) from None
                    continue  # nothing yielded yet: elect again, maybe produce
                yield from rest
                return
            except _Fallback:
                yield from _local(flight, stream_fn(messages), delivered, self)
                return
            except _Done:
                return
            finally:
                reader.close()

    def _produce_sync(
        self, flight: Flight, token: str, open_source: Callable[[], Iterable[Any]]
    ) -> Iterator[Any]:
        # the writer first: an upstream that fails to open still gets its final record
        producer = _Producer(self, flight, token, _call_here)
        producer.wait_final = True
        source: Any = None
        upstream: Any = None
        ended = False
        try:
            source = open_source()
            upstream = iter(source)
            for chunk in upstream:
                producer.push(chunk)
                yield chunk
            ended = True
        except _GONE:
            producer.end("cancel", "")
            raise
        except BaseException as exc:
            producer.end("error", repr(exc))
            producer.wait_written()
            raise
        finally:
            if not ended and upstream is not None:
                _close_sync(upstream, source)
        producer.before_store()

    # async

    async def _async_stream(
        self, flight: Flight, stream_fn: Callable[[Any], Any], messages: Any
    ) -> AsyncIterator[Any]:
        delivered = 0
        first = True
        limiter = anyio.CapacityLimiter(1)  # one Redis call at a time per flight

        async def call(fn: Callable[..., Any], *args: Any) -> Any:
            return await anyio.to_thread.run_sync(
                fn, *args, abandon_on_cancel=True, limiter=limiter
            )

        while True:
            role, token = await call(self._role, flight)
            self._become(flight, role, first)
            first = False
            if role == "local":
                async for chunk in _alocal(flight, stream_fn, messages, delivered, self):
                    yield chunk
                return
            if role == "lead":
                on_loop = functools.partial(_call_on_loop, anyio.lowlevel.current_token())
                producer = _Producer(self, flight, token, on_loop)
                upstream = await _open_upstream(stream_fn, messages)
                ended = False
                try:
                    if hasattr(upstream, "__anext__"):
                        while True:
                            try:
                                chunk = await upstream.__anext__()
                            except StopAsyncIteration:
                                break
                            producer.push(chunk)
                            yield chunk
                    else:
                        for chunk in upstream:
                            producer.push(chunk)
                            yield chunk
                    ended = True
                except BaseException as exc:
                    if isinstance(exc, (*_GONE, anyio.get_cancelled_exc_class())):
                        producer.end("cancel", "")
                    else:
                        producer.end("error", repr(exc))
                        with anyio.CancelScope(shield=True), anyio.move_on_after(self._final_wait):
                            await anyio.to_thread.run_sync(
                                producer.wait_written, abandon_on_cancel=True
                            )
                    raise
                finally:
                    if not ended:
                        await _aclose_upstream(upstream)
                await call(producer.before_store)
                return
            reader = _Reader(self, flight, token)
            try:
                while True:
                    try:
                        got = await call(reader.read)
                    except _STEP_ASIDE as exc:
                        self._failed(flight, "read", exc)
                        raise _Fallback from exc
                    if got is None:
                        continue
                    for chunk in got:
                        delivered += 1
                        yield chunk
            except _Lost as lost:
                rest = await call(self._from_store, flight, delivered)
                if rest is None:
                    if delivered:
                        raise self._lost(flight, str(lost)) from None
                    continue
                for chunk in rest:
                    yield chunk
                return
            except _Fallback:
                async for chunk in _alocal(flight, stream_fn, messages, delivered, self):
                    yield chunk
                return
            except _Done:
                return
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    await anyio.to_thread.run_sync(reader.close, abandon_on_cancel=True)


class _Done(Exception):
    """Internal: the producer's final ``done`` record was read."""


class _Reader:
    """A follower's reader of one producer's log (sync; async flights call it in a thread)."""

    def __init__(self, rf: RedisFlights, flight: Flight, token: str) -> None:
        self.rf = rf
        self.flight = flight
        self.token = token
        self.key = flight.key
        self.log = rf.log_key(flight.key, token)
        self.last = "0-0"  # from the first entry, never "$"
        self.rid = f"{os.getpid()}.{os.urandom(6).hex()}"
        self._registered = False
        #: Serialises a renewal with `close` (no registration renewed after it was removed).
        self._renew_lock = threading.Lock()
        self._closed = False
        self._final: tuple[str, str] | None = None
        #: A producer never writes more than this to a log (`_Producer.max_bytes`): a log that
        #: holds more was not written by one, and is not decoded.
        cap = rf.max_entry_bytes or flight.settings.max_entry_bytes
        self.max_bytes = cap if cap is not None else 1 << 62
        self.max_decoded = decode_cap(cap)
        self.nbytes = 0

    def read(self) -> list[Any] | None:
        """Chunks of the next entries; None after an empty wait (the lease was alive). Raises
        `_Done` at a final ``done``, `_Lost` when the producer is gone, `UpstreamLost` at a
        final ``error``."""
        if self._final is not None:
            return self._at_final()
        rf = self.rf
        client = rf.client
        if not self._registered:
            # Before the first read: a producer that cancelled (no reader registered) before
            # this registration dropped its lease in the same script, so this reader, having
            # read nothing, elects again instead of taking chunks and then the cancel.
            if not rf.watch(self.key, self.token, self.rid):
                raise _Lost("the producer stopped before this reader registered")
            self._registered = True
            rf._keeper.add(self)
        rf._count(reader_round_trips=1)
        resp = client.xread({self.log: self.last}, count=_XREAD_COUNT, block=int(rf.block * 1000))
        if not resp:
            lease = client.get(rf.lease_key(self.key))
            if lease is not None and lease.removeprefix(b"=") == self.token.encode():
                return None
            # A final record is written in one script with the lease's change: one written
            # since the empty read is in the log now, and is no loss.
            resp = client.xread({self.log: self.last}, count=_XREAD_COUNT)
            if not resp:
                raise _Lost("the producing process was lost (its lease lapsed without an end)")
        chunks: list[Any] = []
        for entry_id, fields in resp[0][1]:
            self.last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            data = fields.get(b"d")
            try:
                if data is not None:
                    self.nbytes += len(data)
                    if self.nbytes > self.max_bytes:
                        raise ValueError(f"the log holds more than {self.max_bytes} bytes")
                    chunks.extend(rf._codec.loads(data, max_decoded_bytes=self.max_decoded))
                    continue
                kind = fields.get(b"f")
                if kind is None:
                    raise ValueError(f"neither a batch nor a final record: {list(fields)[:4]!r}")
                self._final = (kind.decode(), fields.get(b"m", b"").decode())
            except Exception as exc:  # DecodeError, UnicodeDecodeError, ...
                raise _Corrupt(f"a corrupt entry {self.last} in {self.log}: {exc!r}") from exc
            break
        if chunks:  # a final record read with them is handled at the next read
            return chunks
        return self._at_final()

    def _at_final(self) -> list[Any] | None:
        if self._final is None:
            return None
        kind, message = self._final
        if kind == "done":
            raise _Done
        if kind == "error":
            raise self.rf._lost(
                self.flight, f"the upstream failed in the producing process: {message}"
            )
        raise _Lost(f"the producing process stopped ({kind}: {message})")

    def renew(self) -> None:
        """Renews the registration and the log's TTL (the keeper's timer, every lease / 3,
        whether or not the reader reads: its local consumers may hold it back)."""
        with self._renew_lock:
            if not self._closed:
                self.rf.watch(self.key, self.token, self.rid)

    def close(self) -> None:
        if self._registered:
            self.rf._keeper.discard(self)
            with self._renew_lock:
                self._closed = True
                try:
                    self.rf.client.zrem(self.rf.watchers_key(self.key), self.rid)
                except _REDIS_ERRORS:
                    pass  # it expires


class _Keeper:
    """Renews every registered follower reader of one `RedisFlights` every ``lease / 3``, from
    one thread (started with the first reader, ended when none is left), whether or not the
    reader reads: a reader held back by its slow local consumers stays registered (a producer
    under on_abandon="cancel" keeps reading for it) and keeps its log alive until it has read
    it (a log otherwise expires ``log_ttl`` after the producer's last write)."""

    def __init__(self, rf: RedisFlights) -> None:
        self.rf = rf
        self.lock = threading.Lock()  # guards readers and thread
        self.readers: set[_Reader] = set()
        self.thread: threading.Thread | None = None

    def add(self, reader: _Reader) -> None:
        with self.lock:
            self.readers.add(reader)
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self._run, name="chengeta-redis-keeper", daemon=True
                )
                self.thread.start()

    def discard(self, reader: _Reader) -> None:
        with self.lock:
            self.readers.discard(reader)

    def _run(self) -> None:
        every = self.rf.lease / 3
        while True:
            time.sleep(every)
            with self.lock:
                readers = list(self.readers)
                if not readers:
                    self.thread = None
                    return
            for reader in readers:
                try:
                    reader.renew()
                except Exception as exc:  # Redis failed: the reader's own reads notice
                    logger.debug("chengeta_ai: renewing a reader of %s: %r", reader.key, exc)


class _Producer:
    """The writer of one produced stream: batches pending chunks, renews the lease, writes the
    final record, in its own thread (so the flight never waits for Redis but at the end)."""

    def __init__(
        self,
        rf: RedisFlights,
        flight: Flight,
        token: str,
        on_owner: Callable[[Callable[[], None]], None],
    ) -> None:
        self.rf = rf
        self.flight = flight
        self.token = token
        self.key = flight.key
        #: Runs a function where the flight may be driven: directly for a sync flight, on the
        #: flight's event loop for an async one (its cancel scope is the loop's).
        self.on_owner = on_owner
        self.cond = threading.Condition(threading.Lock())
        #: The flight was abandoned and drains: ask Redis now whether anybody still reads.
        self.recheck = False
        self.encoder: ChunkSink | None = rf._codec.stream_encoder()
        self.pending = 0
        self.final: tuple[str, str, bool] | None = None
        self.sync_wanted = 0
        self.sync_done = 0
        #: "live" until fenced, broken (Redis failed), stopped (oversized) or closed.
        self.status = "live"
        self.sent_bytes = 0
        cap = rf.max_entry_bytes or flight.settings.max_entry_bytes
        self.max_bytes = cap if cap is not None else 1 << 62
        #: A sync flight's end waits for the final record (see `on_end`).
        self.wait_final = False
        flight.on_end = self.on_end
        flight.on_drain = self.on_drain
        with flight.settings.table.lock:
            flight.state.publishing = True
        self.thread = threading.Thread(
            target=self._run_tracked, name="chengeta-redis-producer", daemon=True
        )
        with rf._lock:
            rf._producers.add(self)
        self.thread.start()

    # called by the tee (any thread), never blocking on Redis

    def push(self, chunk: Any) -> None:
        with self.cond:
            if self.status != "live" or self.encoder is None:
                return
            try:
                self.encoder.push(chunk)
            except Exception as exc:  # not encodable: other processes cannot have it
                self.encoder = None
                self.final = ("abandon", f"a chunk cannot be encoded: {exc}", False)
            self.pending += 1
            self.cond.notify()

    def end(self, kind: str, message: str, keep: bool = False) -> None:
        with self.cond:
            if self.final is None:
                self.final = (kind, message, keep)
            self.cond.notify()

    def wait_written(self) -> None:
        """Waits (bounded) until the writer has written the final record and stopped. Called
        before an upstream error reaches the local callers: they see it only once the other
        processes can, so a caller retrying at once elects afresh instead of following this
        dead stream from its first chunk (and getting `UpstreamLost`)."""
        if threading.current_thread() is not self.thread:
            self.thread.join(self.rf._final_wait)

    def on_drain(self) -> None:
        """The flight's last local consumer left and it drains: the writer asks Redis now."""
        with self.cond:
            self.recheck = True
            self.cond.notify()

    def _alone(self) -> bool:
        """Under on_abandon="cancel", no local consumer is left (none rejoined since)."""
        flight = self.flight
        state = flight.state
        with flight.settings.table.lock:
            return (
                state.abandoned
                and state.on_abandon == "cancel"
                and state.phase is Phase.RUNNING
                and flight.log.consumers == 0
            )

    def _unpublish(self) -> None:
        """The writer stopped (the stream ended, or Redis failed, or the lease was lost, or
        the cancel was written): from now on the flight decides a cancel alone, and an
        abandoned flight that no local consumer rejoined is cancelled now."""
        flight = self.flight
        state = flight.state
        with flight.settings.table.lock:
            state.publishing = False
            pending = (
                state.abandoned and state.on_abandon == "cancel" and state.phase is Phase.RUNNING
            )
        if not pending:
            return
        self.wait_final = False  # nothing left to write: a flight's end never waits for it

        def cancel() -> None:
            log = flight.log
            flight.perform(flight.transition(lambda: state.abandoned_everywhere(log.consumers)))

        try:
            self.on_owner(cancel)
        except Exception as exc:  # the flight's event loop is gone: nothing to cancel
            logger.debug("chengeta_ai: cancelling %s after its writer: %r", self.key, exc)

    def on_end(self, flight: Flight) -> None:
        """The flight ended (after its store): the final record."""
        state = flight.state
        if state.error is not None:
            self.end("error", repr(state.error))
        elif state.abandoned and state.not_stored == "abandoned":
            self.end("cancel", "")
        else:
            self.end("done", "", keep=state.not_stored is None)
        if self.wait_final and threading.current_thread() is not self.thread:
            # The callers' streams end with the record written: a process that exits as soon
            # as it has its stream (a script, a multiprocessing worker) still leaves it, and
            # the other processes' followers do not take a finished stream for a lost one.
            self.thread.join(self.rf._final_wait)

    def before_store(self) -> None:
        """At the upstream's end: every chunk written and the fence checked (the writer keeps
        renewing the lease while the flight stores). A producer that lost its lease does not
        store."""
        with self.cond:
            self.sync_wanted += 1
            wanted = self.sync_wanted
            self.cond.notify()
            while self.sync_done < wanted and self.status == "live":
                self.cond.wait(0.05)
        if self.status == "fenced":
            self.flight.transition(lambda: self.flight.state.keep_from_store("fenced"))
            return
        # a removal of the key or its namespace ran (in any process) since this stream was
        # elected: not stored, and no "=<token>" lease (`on_end`) for callers that missed it
        try:
            removed = self.rf.removed_at(_namespace(self.flight), self.key) >= _elected_at(
                self.token
            )
        except _STEP_ASIDE as exc:  # Redis failed: stores as a local flight would
            logger.debug("chengeta_ai: removal time of %s unread: %r", self.key, exc)
            removed = False
        if removed:
            self.flight.transition(lambda: self.flight.state.keep_from_store("invalidated"))

    # the writer thread

    def _run_tracked(self) -> None:
        try:
            self._run()
        finally:
            with self.rf._lock:
                self.rf._producers.discard(self)
            self._unpublish()

    def _run(self) -> None:
        rf = self.rf
        renew_every = rf.lease / 3
        next_renew = time.monotonic() + renew_every
        while True:
            with self.cond:
                while (
                    not self.pending
                    and self.final is None
                    and self.sync_done == self.sync_wanted
                    and not self.recheck
                    and time.monotonic() < next_renew
                ):
                    self.cond.wait(max(0.0, next_renew - time.monotonic()))
                batch: bytes | None = None
                if self.pending and self.encoder is not None:
                    batch = self.encoder.finish()
                    self.encoder = rf._codec.stream_encoder()
                chunks = self.pending
                self.pending = 0
                final = self.final
                sync = self.sync_wanted
                self.recheck = False
            try:
                if batch is not None and self.sent_bytes + len(batch) > self.max_bytes:
                    batch = None
                    final = ("abandon", "the stream exceeded max_entry_bytes", False)
                if batch is not None or final is None or sync != self.sync_done:
                    lease = rf.lease  # still renewed while the flight stores
                    rf._count(
                        producer_round_trips=1,
                        batches=batch is not None,
                        chunks_published=chunks if batch is not None else 0,
                    )
                    alone = final is None and self._alone()
                    readers = rf.append(self.key, self.token, batch, lease, alone)
                    if readers == -2:  # cancelled for every process: the local cancel follows
                        self._stop("closed")
                        return
                    if readers < 0:
                        self._stop("fenced")
                        self.flight.count("fenced")
                        warn(
                            "chengeta_ai: lost the lease of %s: no longer publishing or storing",
                            self.key,
                        )
                        return
                    if batch is not None:
                        self.sent_bytes += len(batch)
                next_renew = time.monotonic() + renew_every
                with self.cond:
                    self.sync_done = sync
                    self.cond.notify_all()
                if final is not None:
                    kind, message, keep = final
                    rf._count(producer_round_trips=1)
                    rf.finish(self.key, self.token, kind, message, keep)
                    self._stop("closed")
                    return
            except Exception as exc:  # Redis failed (or a bug): stop publishing, never crash
                rf._failed(self.flight, "publish", exc)
                self._stop("broken")
                return

    def _stop(self, status: str) -> None:
        with self.cond:
            self.status = status
            self.encoder = None
            self.cond.notify_all()


class _FleetRemovals:
    """Registered with a cache's manager (`CacheManager.watch_removals`): a removal first
    records its time in Redis (`RedisFlights.mark_removal`: for a ``delete``, the key's; else
    the namespace's), so that no process follows or stores a stream elected before it. (The
    local streams are the flight table's business; this holds no write to wait for.) One Redis
    round trip per removal, in a worker thread for an async removal; a failure (or Redis known
    down) fails the removal once the local removal ran (`CacheManager`)."""

    #: Does I/O: see `chengeta_ai.core.cache_manager.RemovalListener`.
    remote = True

    def __init__(self, rf: RedisFlights, namespace: str) -> None:
        self.rf = rf
        self.namespace = namespace

    def begin_removal(
        self, matches: Callable[[str, tuple[str, ...]], bool], key: str | None = None
    ) -> list[str]:
        if self.rf.down:
            raise ConnectionError(f"{self.rf!r} is down (a recent failure)")
        self.rf.mark_removal(self.namespace, key)
        return []


def _namespace(flight: Flight) -> str:
    return str(getattr(flight.settings.manager.key_builder, "namespace", ""))


def _elected_at(token: str) -> int:
    """When a producer's token was elected, ms by Redis's clock (0 for earlier versions')."""
    _, sep, tail = token.rpartition("@")
    return int(tail) if sep and tail.isdigit() else 0


#: Every RedisFlights of this process, for `_write_final_records_at_exit`.
_INSTANCES: weakref.WeakSet[RedisFlights] = weakref.WeakSet()


@atexit.register
def _write_final_records_at_exit(timeout: float = 2.0) -> None:
    """At interpreter exit, lets writers that have a final record to write write it (their
    threads are daemons: without this, a process exiting right after a stream, e.g. after
    ``asyncio.run``, leaves followers in other processes waiting for a lease to lapse)."""
    deadline = time.monotonic() + timeout
    for rf in list(_INSTANCES):
        with rf._lock:
            producers = [p for p in rf._producers if p.final is not None]
        for producer in producers:
            producer.thread.join(max(0.0, deadline - time.monotonic()))


def _socket_timeout(client: Any) -> tuple[bool, float | None]:
    """``(known, socket_timeout)`` of a redis-py client (`redis.Redis` or `RedisCluster`);
    ``known`` is False for a client whose settings cannot be read."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
    if not isinstance(kwargs, dict):
        kwargs = getattr(getattr(client, "nodes_manager", None), "connection_kwargs", None)
    if not isinstance(kwargs, dict):
        return False, None
    if "socket_timeout" in kwargs:
        timeout = kwargs["socket_timeout"]
    else:  # a cluster passes its nodes only what it was given: the default of redis.Redis
        timeout = inspect.signature(redis.Redis.__init__).parameters["socket_timeout"].default
    return True, None if timeout is None else float(timeout)


def _call_here(fn: Callable[[], None]) -> None:
    fn()


def _call_on_loop(loop: anyio.lowlevel.EventLoopToken, fn: Callable[[], None]) -> None:
    anyio.from_thread.run_sync(fn, token=loop)


def _close_sync(*objs: Any) -> None:
    for obj in dict.fromkeys(objs):
        closer = getattr(obj, "close", None)
        if closer is not None:
            try:
                closer()
            except Exception as exc:
                logger.debug("chengeta_ai: closing upstream raised %r", exc)


def _check_prefix(flight: Flight, delivered: int, index: int, chunk: Any, prefix: Any) -> None:
    if prefix is None or prefix[index] != chunk:
        raise UpstreamLost(
            f"{flight.key}: Redis failed mid-stream and the upstream, called again, "
            "did not repeat the chunks already delivered"
        )


def _local(
    flight: Flight, source: Iterable[Any], delivered: int, rf: RedisFlights
) -> Iterator[Any]:
    """The upstream read in this process (Redis failed), skipping the ``delivered`` chunks
    after checking that they are the same."""
    prefix = flight.log.snapshot() if delivered else None
    upstream = iter(source)
    ended = False
    try:
        for index, chunk in enumerate(upstream):
            if index < delivered:
                _check_prefix(flight, delivered, index, chunk, prefix)
                continue
            yield chunk
        ended = True
    finally:
        if not ended:
            _close_sync(upstream, source)


async def _alocal(
    flight: Flight, stream_fn: Callable[[Any], Any], messages: Any, delivered: int, rf: RedisFlights
) -> AsyncIterator[Any]:
    prefix = flight.log.snapshot() if delivered else None
    upstream = await _open_upstream(stream_fn, messages)
    ended = False
    index = 0
    try:
        if hasattr(upstream, "__anext__"):
            while True:
                try:
                    chunk = await upstream.__anext__()
                except StopAsyncIteration:
                    break
                if index < delivered:
                    _check_prefix(flight, delivered, index, chunk, prefix)
                else:
                    yield chunk
                index += 1
        else:
            for chunk in upstream:
                if index < delivered:
                    _check_prefix(flight, delivered, index, chunk, prefix)
                else:
                    yield chunk
                index += 1
        ended = True
    finally:
        if not ended:
            await _aclose_upstream(upstream)
