"""Per-call controls (`CacheControl`) and per-call status (`CacheInfo`) of the streaming cache.

What a call may ask, and the HTTP ``Cache-Control`` word each mirrors:

- ``no_cache`` (``no-cache``): do not answer from a stored entry; read the upstream, or join a
  stream of the key that started *after* this call, and replace the entry when it ends (status
  ``refresh``). A stream of the key already in flight when the call was made is superseded: it
  goes on for its consumers and is not stored.
- ``no_store`` (``no-store``): read and join as usual, but this call's miss is not stored. A
  stream is stored when any of its callers wants it stored (a ``no_store`` leader's stream is
  stored if a caller without ``no_store`` joins it, and the reverse).
- ``only_if_cached`` (``only-if-cached``): never call the upstream. A stored entry is replayed
  and a stream of the key in flight in this process is joined (it costs no upstream call);
  otherwise `CacheMiss` is raised when iteration starts, before any chunk.
- ``ttl`` (``max-age`` of what is stored), ``tags`` (as the ``ttl``/``tags`` arguments).
- ``namespace``: a label that partitions keys per call (a tenant, a user): the key becomes
  ``"{manager namespace}:{kind}:{namespace}:{digest}"`` and the label is hashed with it.
- ``replay``: ``"instant"`` (default) or ``"recorded"``: a hit replays each chunk at the time it
  arrived when the entry was recorded (time to first chunk and gaps), divided by ``speed``.

The stream a call returns is still a plain iterator (or async iterator) of chunks: iterating it
hands out the inner generator itself, so the per-chunk path is unchanged. ``cache_info`` is
None until iteration starts, set (status, key, age) before the first chunk is handed out, and
final (``outcome`` set) once the stream ended.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from chengeta_ai.core.cache_manager import check_tags, check_ttl

__all__ = [
    "AsyncCacheStream",
    "CacheControl",
    "CacheInfo",
    "CacheOutcome",
    "CacheStatus",
    "CacheStream",
    "InfoBox",
]

#: How a call was answered.
CacheStatus = Literal["hit", "miss", "join", "bypass", "refresh"]

#: What became of a call's stream once it ended: ``stored`` (it is now the entry),
#: ``replayed`` (a hit, replayed whole), ``bypass``, ``follower`` (another process produced and
#: stores it, `RedisFlights`), or why it was not stored: ``error`` (the upstream raised),
#: ``abandoned`` (this caller left before the end), ``oversized``, ``unserializable``,
#: ``incomplete``, ``backend_error``, ``interrupted``, ``no_store``, ``superseded`` (a
#: ``no_cache`` call started a newer stream of the key), ``invalidated`` (``delete``,
#: ``invalidate`` or ``clear`` removed the key or its tags while it streamed), ``fenced``
#: (`RedisFlights`: this process lost the key's lease while producing, so another process may
#: store it).
CacheOutcome = Literal[
    "stored",
    "replayed",
    "bypass",
    "follower",
    "error",
    "abandoned",
    "oversized",
    "unserializable",
    "incomplete",
    "backend_error",
    "interrupted",
    "no_store",
    "superseded",
    "invalidated",
    "fenced",
]

Replay = Literal["instant", "recorded"]


#: Slowest and fastest replay pacing accepted: a recorded stream (at most an hour) replays in at
#: most 100 hours, and a delay is never a number `time.sleep` cannot take.
MIN_SPEED = 0.01
MAX_SPEED = 1e6

#: Longest ``namespace`` label accepted, in characters.
MAX_NAMESPACE = 256


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """What the cache did for one call (``stream.cache_info``)."""

    #: ``hit``, ``miss``, ``join``, ``bypass`` or ``refresh``.
    status: CacheStatus
    #: The cache key of the request.
    key: str
    #: Seconds since the replayed entry was written (hits of entries that record it), else None.
    age: float | None = None
    #: None while the stream runs; once it ended, what became of it (see `CacheOutcome`).
    outcome: CacheOutcome | None = None

    @property
    def done(self) -> bool:
        """The stream ended (normally, with an error, or left early)."""
        return self.outcome is not None

    @property
    def stored(self) -> bool | None:
        """True if the stream was stored as the entry, False if not, None while it runs."""
        return None if self.outcome is None else self.outcome == "stored"

    def ended(self, outcome: str) -> CacheInfo:
        return CacheInfo(self.status, self.key, self.age, outcome)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheControl:
    """Per-call cache directives (see the module docstring); also accepted as a plain mapping
    of the same names (``cache_control={"no_store": True}``)."""

    no_cache: bool = False
    no_store: bool = False
    only_if_cached: bool = False
    ttl: float | None = None
    tags: tuple[str, ...] | None = None
    namespace: str | None = None
    replay: Replay = "instant"
    speed: float = 1.0

    def __post_init__(self) -> None:
        for name in ("no_cache", "no_store", "only_if_cached"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"CacheControl.{name} must be a bool")
        if self.no_cache and self.only_if_cached:
            raise ValueError("CacheControl: no_cache and only_if_cached contradict each other")
        object.__setattr__(self, "ttl", check_ttl(self.ttl))
        if self.tags is not None:
            object.__setattr__(self, "tags", check_tags(self.tags))
        if self.namespace is not None:
            if not isinstance(self.namespace, str) or not self.namespace:
                raise TypeError("CacheControl.namespace must be a non-empty str or None")
            if ":" in self.namespace:
                raise ValueError(f"CacheControl.namespace must not contain ':': {self.namespace!r}")
            if len(self.namespace) > MAX_NAMESPACE or not self.namespace.isprintable():
                raise ValueError(
                    f"CacheControl.namespace must be at most {MAX_NAMESPACE} printable characters "
                    f"(it is part of the key and of log lines), got {self.namespace!r:.80}"
                )
        if self.replay not in get_args(Replay):
            raise ValueError(
                f"CacheControl.replay must be 'instant' or 'recorded', got {self.replay!r}"
            )
        speed = self.speed
        if isinstance(speed, bool) or not isinstance(speed, (int, float)):
            raise TypeError("CacheControl.speed must be a number")
        if not MIN_SPEED <= speed <= MAX_SPEED:  # NaN fails too; a huge int compares exactly
            raise ValueError(
                f"CacheControl.speed must be between {MIN_SPEED} and {MAX_SPEED:g}, "
                f"got {speed!r:.40}"
            )
        object.__setattr__(self, "speed", float(speed))

    @classmethod
    def coerce(cls, value: CacheControl | Mapping[str, Any] | None) -> CacheControl | None:
        """``value`` as a `CacheControl`: a mapping's unknown keys are a ``TypeError``."""
        if value is None or isinstance(value, CacheControl):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(
                "cache_control must be a CacheControl, a mapping or None, got "
                f"{type(value).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in value if k not in known)
        if unknown:
            raise TypeError(f"unknown cache_control keys {unknown}; known: {sorted(known)}")
        return cls(**value)


class InfoBox:
    """Where a call's generator publishes its `CacheInfo` for the stream object (the generator
    holds the box, not the stream: no reference cycle, so dropping the stream still closes
    the generator at once)."""

    __slots__ = ("info",)

    def __init__(self) -> None:
        self.info: CacheInfo | None = None


class CacheStream(Iterator[Any]):
    """The iterator `get_or_stream` returns: the chunks, plus ``cache_info``.

    ``iter(stream)`` (what a ``for`` loop calls) returns the inner generator itself, so each
    chunk costs what it did before; ``next(stream)`` and ``close()`` work on it directly.
    """

    __slots__ = ("_box", "_gen")

    def __init__(self, gen: Generator[Any, None, None], box: InfoBox) -> None:
        self._gen = gen
        self._box = box

    def __iter__(self) -> Generator[Any, None, None]:
        return self._gen

    def __next__(self) -> Any:
        return next(self._gen)

    def close(self) -> None:
        """Stops the stream now (as leaving a ``for`` loop and dropping it would)."""
        self._gen.close()

    @property
    def cache_info(self) -> CacheInfo | None:
        """What the cache did for this call: None until iteration starts (see `CacheInfo`)."""
        return self._box.info

    def __repr__(self) -> str:
        return f"<CacheStream {self._box.info!r}>"


class AsyncCacheStream(AsyncIterator[Any]):
    """The async iterator `aget_or_stream` returns: the chunks, plus ``cache_info``.

    ``aiter(stream)`` (what ``async for`` calls) returns the inner async generator itself;
    ``anext(stream)`` and ``aclose()`` work on it directly.
    """

    __slots__ = ("_agen", "_box")

    def __init__(self, agen: AsyncGenerator[Any, None], box: InfoBox) -> None:
        self._agen = agen
        self._box = box

    def __aiter__(self) -> AsyncGenerator[Any, None]:
        return self._agen

    def __anext__(self) -> Any:
        return self._agen.__anext__()

    async def aclose(self) -> None:
        """Stops the stream now (detaches from its flight at once, not at garbage collection)."""
        await self._agen.aclose()

    @property
    def cache_info(self) -> CacheInfo | None:
        """What the cache did for this call: None until iteration starts (see `CacheInfo`)."""
        return self._box.info

    def __repr__(self) -> str:
        return f"<AsyncCacheStream {self._box.info!r}>"
