"""How cached values and chunk streams become bytes.

`CompactSerializer` (the default) wraps the Rust codec: exact round trips of pydantic models
(OpenAI/Anthropic chunks) at a few bytes per chunk, lazy replay. `PickleSerializer` is opt-in:
it unpickles, so only use it for a cache that nobody else can write to. `JsonSerializer` stores
JSON-native values only (no models: JSON would lose their types).

Every ``loads`` raises `chengeta_ai.errors.DecodeError` on foreign or corrupt bytes; every
``dumps``/``push`` raises `chengeta_ai.errors.EncodeError` on input it cannot store.

Decoding is bounded: ``loads`` and ``iter_batches`` take ``max_decoded_bytes`` (default
`DEFAULT_MAX_DECODED_BYTES`; `CacheManager` passes ``decode_cap(max_entry_bytes)``), and data
that would decode to more is a `DecodeError`, raised before anything large is allocated.
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Iterator
from typing import Any, Protocol

import orjson

from chengeta_ai import _core, models
from chengeta_ai.errors import DecodeError, EncodeError

__all__ = [
    "DEFAULT_MAX_DECODED_BYTES",
    "ChunkSink",
    "CompactSerializer",
    "JsonSerializer",
    "PickleSerializer",
    "Serializer",
    "decode_cap",
]

#: The multiple of an entry's size its decoded body may reach (see `decode_cap`).
DECODE_CAP_RATIO = 64
#: `decode_cap` never returns less than this (16 MiB) ...
DECODE_CAP_FLOOR = 16 * 2**20
#: ... nor more than this (1 GiB), which is also the cap when entries are unbounded.
DECODE_CAP_CEILING = 2**30


def decode_cap(max_entry_bytes: int | None) -> int:
    """The cap on decoded bytes for entries of at most ``max_entry_bytes`` stored bytes.

    Rule: ``64 * max_entry_bytes``, at least 16 MiB and at most 1 GiB (1 GiB when
    ``max_entry_bytes`` is None). zstd legitimately compresses a lot: realistic OpenAI streams
    shrink 3-26x (26x without the random ``obfuscation`` padding), so 64x leaves room for
    repetitive content at the largest entry; the floor keeps small entry caps from refusing
    ordinary entries, the ceiling bounds what one entry can make a reader allocate. Independently
    of this cap, the compact codec refuses a zstd frame that would expand more than 256x its
    size plus 1 MiB (its encoder never writes one), so a few-KB entry cannot decode to more
    than about 2 MiB whatever the cap.
    """
    if max_entry_bytes is None:
        return DECODE_CAP_CEILING
    return max(DECODE_CAP_FLOOR, min(DECODE_CAP_CEILING, DECODE_CAP_RATIO * max_entry_bytes))


#: The decode cap for `CacheManager`'s default ``max_entry_bytes`` (16 MiB): 1 GiB.
DEFAULT_MAX_DECODED_BYTES = decode_cap(16 * 2**20)


def _check_size(data: Any, max_decoded_bytes: int | None) -> None:
    """For serializers whose decoded size follows their input: refuse oversized input."""
    cap = DEFAULT_MAX_DECODED_BYTES if max_decoded_bytes is None else max_decoded_bytes
    if isinstance(data, (bytes, bytearray, memoryview)) and len(data) > cap:
        raise DecodeError(f"entry of {len(data)} bytes exceeds the decoding limit of {cap} bytes")


class ChunkSink(Protocol):
    """Accumulates a stream's items; ``finish`` returns the encoded sequence.

    ``nbytes`` is the encoded size so far: the streaming layer bounds in-flight streams with it.
    ``push`` may return it (saving the streaming layer a second call per chunk); a sink whose
    ``push`` returns None has its ``nbytes`` read instead.
    """

    def push(self, item: Any) -> int | None: ...

    def finish(self) -> bytes: ...

    @property
    def nbytes(self) -> int: ...


class _PythonSink:
    """What the pickle and JSON sinks share: one-shot finish, poisoned by a failed push."""

    def __init__(self) -> None:
        self._error: str | None = None
        self._done = False
        self.nbytes = 0

    def _check(self) -> None:
        if self._done:
            raise EncodeError("stream encoder already finished")
        if self._error is not None:
            raise EncodeError(f"stream encoder poisoned by: {self._error}")

    def _fail(self, message: str) -> EncodeError:
        self._error = message
        return EncodeError(message)


class Serializer(Protocol):
    """A way to turn values and item sequences into bytes and back."""

    name: str

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes, *, max_decoded_bytes: int | None = None) -> Any:
        """The value; `DecodeError` if corrupt or if it would decode to more than
        ``max_decoded_bytes`` (None: `DEFAULT_MAX_DECODED_BYTES`)."""
        ...

    def stream_encoder(self) -> ChunkSink: ...

    def iter_batches(
        self, data: bytes, batch_size: int = 256, *, max_decoded_bytes: int | None = None
    ) -> Iterator[list[Any]]:
        """Decoded items in batches; `DecodeError` (as for `loads`) is raised by this call,
        before the first batch, wherever the data can be checked up front."""
        ...


#: What a manager needs of a serializer (whole values), and what a streaming cache needs.
_VALUE_METHODS = ("dumps", "loads")
_STREAM_METHODS = ("dumps", "loads", "stream_encoder", "iter_batches")


def check_serializer(serializer: object, *, streams: bool) -> Serializer:
    """``serializer`` if it has the methods its user calls (``streams``: a streaming cache's,
    else a manager's); else a `TypeError` at construction saying what to pass (a class instead
    of an instance, a name, an object missing methods), not an AttributeError at the first
    miss."""
    choices = "CompactSerializer() (the default), PickleSerializer() or JsonSerializer()"
    if isinstance(serializer, type):
        raise TypeError(
            f"serializer must be an instance, got the class {serializer.__name__}: "
            f"pass {serializer.__name__}()"
        )
    if isinstance(serializer, (str, bytes)):
        raise TypeError(
            f"serializer must be a serializer object, not the name {serializer!r}: pass "
            f"{choices} (from chengeta_ai.serializers)"
        )
    needed = _STREAM_METHODS if streams else _VALUE_METHODS
    missing = [m for m in needed if not callable(getattr(serializer, m, None))]
    if missing:
        raise TypeError(
            f"serializer {type(serializer).__name__} lacks {', '.join(missing)}: pass {choices} "
            "or an object implementing chengeta_ai.serializers.Serializer"
        )
    return serializer  # type: ignore[return-value]


def _batches_of_list(items: list[Any], batch_size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), batch_size):
        yield items[i : i + batch_size]


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _cap(max_decoded_bytes: int | None) -> int:
    cap = DEFAULT_MAX_DECODED_BYTES if max_decoded_bytes is None else max_decoded_bytes
    if cap < 0:
        raise ValueError(f"max_decoded_bytes must be >= 0 or None, got {max_decoded_bytes!r}")
    return cap


#: `models.register_known_models` has returned (it is idempotent; this spares the import).
_known_models_ready = False


class CompactSerializer:
    """The compact Rust codec (default).

    Registers the known SDK model classes (`models.register_known_models`) when constructed,
    at start-up rather than inside the first request (where importing the SDKs' type modules
    would stall an event loop); other pydantic models must be registered with
    `chengeta_ai.register_model`. Bodies of at least ``compress_min_bytes`` are
    zstd-compressed at ``level``.
    """

    name = "compact"

    def __init__(self, *, compress_min_bytes: int = 2048, level: int = 3) -> None:
        self.compress_min_bytes = compress_min_bytes
        self.level = level
        self._ready()

    @staticmethod
    def _ready() -> None:
        global _known_models_ready
        if _known_models_ready:  # every miss creates an encoder: no import statement per call
            return
        from chengeta_ai import models

        models.register_known_models()
        _known_models_ready = True

    def dumps(self, value: Any) -> bytes:
        self._ready()
        return _core.encode(value, compress_min_bytes=self.compress_min_bytes, level=self.level)

    def loads(self, data: bytes, *, max_decoded_bytes: int | None = None) -> Any:
        self._ready()
        return _core.decode(data, max_decoded_bytes=_cap(max_decoded_bytes))

    def stream_encoder(self) -> ChunkSink:
        self._ready()
        return _core.StreamEncoder(compress_min_bytes=self.compress_min_bytes, level=self.level)

    def iter_batches(
        self, data: bytes, batch_size: int = 256, *, max_decoded_bytes: int | None = None
    ) -> Iterator[list[Any]]:
        """Decoded items in batches. The whole entry is validated by this call (structure,
        references, strings, model class names against this process's registry, size within
        ``max_decoded_bytes``), so it raises `DecodeError` before any batch exists, and a
        replay that starts cannot fail on corrupt data half way."""
        _check_batch_size(batch_size)
        self._ready()
        decoder = _core.StreamDecoder(data, max_decoded_bytes=_cap(max_decoded_bytes))
        return self._iter(decoder, batch_size)

    def iter_batches_at(
        self,
        data: bytes,
        offset: int,
        batch_size: int = 256,
        *,
        max_decoded_bytes: int | None = None,
        remember: bool = False,
    ) -> Iterator[list[Any]]:
        """`iter_batches` of ``data[offset:]``, without copying it. ``remember=True``: the
        caller will be handed this same ``bytes`` object again (an in-process backend returns
        the object it stores), so its decompressed, validated body is kept by the object's
        identity (bounded: 256 objects, 32 MiB) and the next decoder of it starts there."""
        if batch_size < 1:
            _check_batch_size(batch_size)
        if not models.known_models_registered():
            self._ready()
        if max_decoded_bytes is None or max_decoded_bytes < 0:
            max_decoded_bytes = _cap(max_decoded_bytes)
        decoder = _core.StreamDecoder(
            data, offset=offset, max_decoded_bytes=max_decoded_bytes, remember=remember
        )
        return self._iter(decoder, batch_size)

    @staticmethod
    def _iter(decoder: _core.StreamDecoder, batch_size: int) -> Iterator[list[Any]]:
        if decoder.is_sequence:
            # the first chunk alone: it is out before anything else is decoded (a hit's time to
            # first chunk; 16 chunks cost ~45 us more with cold caches at 5,000 OpenAI chunks)
            n = 1
            while batch := decoder.take(n):
                yield batch
                n = batch_size
            return
        (value,) = decoder.take(1)
        if isinstance(value, list):
            yield from _batches_of_list(value, batch_size)
        else:
            yield [value]


_PICKLE_MAGIC = b"CGPK\x01"
_PICKLE_SEQ = b"S"


class _PickleSink(_PythonSink):
    """Pickles each pushed item into one stream (shared memo), so errors surface at `push`."""

    def __init__(self, protocol: int) -> None:
        super().__init__()
        self._buf = io.BytesIO()
        self._buf.write(_PICKLE_MAGIC + _PICKLE_SEQ)
        self._pickler = pickle.Pickler(self._buf, protocol=protocol)

    def push(self, item: Any) -> int:
        self._check()
        try:
            self._pickler.dump(item)
        except Exception as exc:
            raise self._fail(f"cannot pickle {type(item).__qualname__}: {exc}") from exc
        self.nbytes = self._buf.tell()
        return self.nbytes

    def finish(self) -> bytes:
        self._check()
        self._done = True
        return self._buf.getvalue()


class PickleSerializer:
    """Opt-in pickle storage: ``b"CGPK\\x01"`` then a pickle (or ``b"S"`` and one pickle per item).

    Warning: ``loads`` UNPICKLES, which runs code named by the data. Use it only for a cache
    that nobody but you can write to. Data without the magic prefix is rejected.
    """

    name = "pickle"

    def __init__(self, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        if protocol < 2:  # protocol 2+ pickles start with b"\x80", never with _PICKLE_SEQ
            raise ValueError("PickleSerializer needs pickle protocol >= 2")
        self.protocol = protocol

    def dumps(self, value: Any) -> bytes:
        try:
            return _PICKLE_MAGIC + pickle.dumps(value, protocol=self.protocol)
        except Exception as exc:
            raise EncodeError(f"cannot pickle {type(value).__qualname__}: {exc}") from exc

    def stream_encoder(self) -> ChunkSink:
        return _PickleSink(self.protocol)

    def _body(self, data: bytes) -> memoryview:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise DecodeError(f"expected bytes, got {type(data).__qualname__}")
        view = memoryview(data)
        if view[: len(_PICKLE_MAGIC)] != _PICKLE_MAGIC:
            raise DecodeError("not a chengeta_ai pickle encoding (bad magic)")
        return view[len(_PICKLE_MAGIC) :]

    def _iter_items(self, body: memoryview) -> Iterator[Any]:
        stream = io.BytesIO(body[1:])
        end = len(body) - 1
        unpickler = pickle.Unpickler(stream)
        while stream.tell() < end:
            try:
                yield unpickler.load()
            except Exception as exc:
                raise DecodeError(f"corrupt pickle data: {exc}") from exc

    def loads(self, data: bytes, *, max_decoded_bytes: int | None = None) -> Any:
        _check_size(data, max_decoded_bytes)
        body = self._body(data)
        if body[:1] == _PICKLE_SEQ:
            return list(self._iter_items(body))
        try:
            return pickle.loads(body)
        except Exception as exc:
            raise DecodeError(f"corrupt pickle data: {exc}") from exc

    def iter_batches(
        self, data: bytes, batch_size: int = 256, *, max_decoded_bytes: int | None = None
    ) -> Iterator[list[Any]]:
        """Items in batches, unpickled lazily: only the magic and the input size are checked
        up front (a pickle cannot be validated without running it)."""
        _check_batch_size(batch_size)
        _check_size(data, max_decoded_bytes)
        body = self._body(data)
        if body[:1] == _PICKLE_SEQ:
            return self._iter_seq(body, batch_size)
        value = self.loads(data, max_decoded_bytes=max_decoded_bytes)
        return _batches_of_list(value, batch_size) if isinstance(value, list) else iter([[value]])

    def _iter_seq(self, body: memoryview, batch_size: int) -> Iterator[list[Any]]:
        batch: list[Any] = []
        for item in self._iter_items(body):
            batch.append(item)
            if len(batch) >= batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


_JSON_MAGIC = b"CGJS\x01"
_JSON_OPTS = (
    orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def _json_reject(value: Any) -> Any:
    if hasattr(type(value), "__pydantic_fields__"):
        raise TypeError(
            f"pydantic model {type(value).__qualname__} is not supported by JsonSerializer "
            "(JSON would lose its type); use CompactSerializer"
        )
    raise TypeError(f"unsupported type '{type(value).__qualname__}' (not JSON-native)")


def _json_dumps(value: Any) -> bytes:
    try:
        out = orjson.dumps(value, default=_json_reject, option=_JSON_OPTS)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        cause = exc.__cause__  # what _json_reject raised, when it was called
        raise EncodeError(str(cause if isinstance(cause, TypeError) else exc)) from exc
    # orjson writes nan and the infinities as null: a value read back wrong. Looked for only
    # when the document holds a null (orjson already bounded the depth to 255)
    if b"null" in out and _has_non_finite(value):
        raise EncodeError("JSON cannot hold nan or an infinity (orjson would write null)")
    return out


def _has_non_finite(value: Any) -> bool:
    if type(value) is float or isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_non_finite(v) for v in value)
    return False


class _JsonSink(_PythonSink):
    def __init__(self) -> None:
        super().__init__()
        self._parts: list[bytes] = []

    def push(self, item: Any) -> int:
        self._check()
        try:
            part = _json_dumps(item)
        except EncodeError as exc:
            raise self._fail(f"chunk {len(self._parts)}: {exc}") from exc
        self._parts.append(part)
        self.nbytes += len(part) + 1
        return self.nbytes

    def finish(self) -> bytes:
        self._check()
        self._done = True
        return _JSON_MAGIC + b"[" + b",".join(self._parts) + b"]"


class JsonSerializer:
    """JSON (orjson) storage of JSON-native values: ``b"CGJS\\x01"`` then the document.

    Only None, bool, int (64-bit), float, str, list, tuple (read back as a list) and dicts with
    str keys; pydantic models and anything else raise `EncodeError`. A sequence is stored as a
    JSON array.
    """

    name = "json"

    def dumps(self, value: Any) -> bytes:
        return _JSON_MAGIC + _json_dumps(value)

    def loads(self, data: bytes, *, max_decoded_bytes: int | None = None) -> Any:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise DecodeError(f"expected bytes, got {type(data).__qualname__}")
        _check_size(data, max_decoded_bytes)
        view = memoryview(data)
        if view[: len(_JSON_MAGIC)] != _JSON_MAGIC:
            raise DecodeError("not a chengeta_ai JSON encoding (bad magic)")
        try:
            return orjson.loads(view[len(_JSON_MAGIC) :])
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"corrupt JSON data: {exc}") from exc

    def stream_encoder(self) -> ChunkSink:
        return _JsonSink()

    def iter_batches(
        self, data: bytes, batch_size: int = 256, *, max_decoded_bytes: int | None = None
    ) -> Iterator[list[Any]]:
        """Decoded whole by this call (so every error is raised before the first batch)."""
        _check_batch_size(batch_size)
        value = self.loads(data, max_decoded_bytes=max_decoded_bytes)
        return _batches_of_list(value, batch_size) if isinstance(value, list) else iter([[value]])
