"""Cache keys for LLM requests.

A key is ``"{namespace}:{kind}:{hex digest}"``. The digest is
:func:`chengeta_ai._core.hash_request` (BLAKE3 over a canonical, typed encoding) of the tuple
``(KEY_FORMAT, namespace, str(version), kind, model_id, messages, params or {})``, so:

- everything that changes the upstream response belongs in the key, and is in it: the model,
  the messages *and the params* (``temperature``, ``tools``, ``response_format``, ...). Two
  requests that differ only in a param never share a cache entry; ``params=None`` and
  ``params={}`` are the same request;
- dict order never matters, lists and tuples hash alike, ``1``, ``1.0``, ``True`` and ``"1"``
  are different requests;
- a pydantic model, a dataclass or a named tuple hashes as what will be sent: its class
  (module and qualname) and *every* field value, defaults included (and a model's extras).
  Two models of different classes with equal fields, a subclass and its base, a model and
  the dict of its fields are different requests; a model and its ``model_copy``, or a default
  left unset and the same value passed explicitly, are the same one (see ``hash_request``);
- bumping ``version`` retires every key made with the old one (the old entries simply stop
  being found and age out of the backend);
- ``namespace`` and ``kind`` are also readable in the key, so a backend can list or purge
  them by prefix.

A *partition* (``build(partition=...)``, what a call's ``CacheControl(namespace=...)`` sets, e.g.
a tenant) splits one builder's keys further: the key becomes
``"{namespace}:{kind}:{partition}:{hex digest}"`` and the partition is hashed too (as an eighth
item of the tuple, only when given, so that every key built without one is unchanged).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chengeta_ai._core import KeyDeriver, hash_request

__all__ = ["KEY_FORMAT", "CacheKeyBuilder"]

#: Version of the key derivation itself. Bump it (next: ``chengeta-key/5``) whenever the canonical
#: encoding, what is hashed of it or the tuple hashed below changes: every stored key changes
#: with it, on purpose. Format 3 hashes records (models, dataclasses, named tuples) with their
#: class and every field; format 4 hashes the same encoding with the last part over 1 KiB
#: zero-padded to a power of two (BLAKE3 then hashes its chunks side by side: see rust/keys.rs).
KEY_FORMAT = "chengeta-key/4"

# The name of each item of the hashed tuple, for hash_request's error messages
# ("cannot hash object of type 'set' at messages[0]['content']").
_NAMES = ("key_format", "namespace", "version", "kind", "model_id", "messages", "params")
_NAMES_PARTITIONED = (*_NAMES, "partition")


def _check_label(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    if ":" in value:
        raise ValueError(
            f"{what} must not contain ':' (it separates the parts of a key): {value!r}"
        )
    return value


class CacheKeyBuilder:
    """Builds cache keys ``"{namespace}:{kind}:{64 hex digits}"`` for chat requests.

    Args:
        namespace: first part of every key; non-empty, no ``':'``.
        version: part of the digest only; change it to retire every existing key.
        kind: default second part of the key (``"stream"``); non-empty, no ``':'``.
            ``build(kind=...)`` overrides it per call.

    Raises ``ValueError`` (or ``TypeError`` for a non-str) on an invalid namespace or kind.
    Instances are immutable and safe to share between threads and tasks.
    """

    __slots__ = (
        "_derive",
        "_deriver",
        "_kind",
        "_namespace",
        "_version",
        "_version_str",
    )

    _derive: Callable[[Any, Any, Any], str]
    _deriver: KeyDeriver
    _namespace: str
    _version: str | int
    _version_str: str
    _kind: str

    def __init__(
        self, namespace: str = "chengeta", *, version: str | int = 1, kind: str = "stream"
    ) -> None:
        if isinstance(version, bool) or not isinstance(version, (str, int)):
            raise TypeError(f"version must be a str or an int, not {type(version).__name__}")
        object.__setattr__(self, "_namespace", _check_label("namespace", namespace))
        object.__setattr__(self, "_kind", _check_label("kind", kind))
        object.__setattr__(self, "_version", version)
        object.__setattr__(self, "_version_str", str(version))
        # `build`'s common call (default kind, no partition), whole in the extension: the same
        # digest as `_digest`, the tuple's fixed items encoded once.
        deriver = KeyDeriver(KEY_FORMAT, self._namespace, self._version_str, self._kind)
        # (and a cached SDK client's common call, split and keyed whole: `ClientCache.split`)
        object.__setattr__(self, "_deriver", deriver)
        object.__setattr__(self, "_derive", deriver.key)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    @property
    def namespace(self) -> str:
        """First part of every key."""
        return self._namespace

    @property
    def version(self) -> str | int:
        """Hashed into every digest; changing it retires every key."""
        return self._version

    @property
    def kind(self) -> str:
        """Default second part of the key."""
        return self._kind

    def digest(
        self,
        messages: Any,
        model_id: str = "default",
        params: Any = None,
        *,
        kind: str | None = None,
        partition: str | None = None,
    ) -> bytes:
        """The 32-byte digest of a request (the hex part of :meth:`build`).

        Raises ``TypeError`` naming the unsupported value and where it sits, e.g.
        ``cannot hash object of type 'set' at messages[0]['content']``.
        """
        kind = self._kind if kind is None else _check_label("kind", kind)
        if partition is not None:
            _check_label("partition", partition)
        return self._digest(messages, model_id, params, kind, partition)

    def _digest(
        self, messages: Any, model_id: Any, params: Any, kind: str, partition: str | None = None
    ) -> bytes:
        request = (
            KEY_FORMAT,
            self._namespace,
            self._version_str,
            kind,
            model_id,
            messages,
            {} if params is None else params,
        )
        if partition is None:
            return hash_request(request, names=_NAMES)
        return hash_request((*request, partition), names=_NAMES_PARTITIONED)

    def build(
        self,
        messages: Any,
        model_id: str = "default",
        params: Any = None,
        *,
        kind: str | None = None,
        partition: str | None = None,
    ) -> str:
        """The cache key of a request: ``"{namespace}:{kind}:{hex digest}"``, or
        ``"{namespace}:{kind}:{partition}:{hex digest}"`` with a ``partition``.

        ``messages`` and ``params`` may hold dicts, lists, tuples, str, int, float, bool, None,
        bytes, pydantic models, dataclasses and named tuples (a record hashes as its class and
        every field value, defaults included). ``params`` is part of the key.
        """
        if kind is None and partition is None:
            return self._derive(model_id, messages, params)
        kind = self._kind if kind is None else _check_label("kind", kind)
        if partition is None:
            digest = self._digest(messages, model_id, params, kind)
            return f"{self._namespace}:{kind}:{digest.hex()}"
        _check_label("partition", partition)
        digest = self._digest(messages, model_id, params, kind, partition)
        return f"{self._namespace}:{kind}:{partition}:{digest.hex()}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(namespace={self._namespace!r}, "
            f"version={self._version!r}, kind={self._kind!r})"
        )


def build_key(
    builder: Any, messages: Any, model_id: str, params: Any, partition: str | None
) -> str:
    """``builder.build(...)`` for one call. ``partition`` (a call's namespace) is passed only
    when there is one, so a key builder written against the seed's ``build(messages,
    model_id, params)`` keeps working; asked for a namespace, such a builder is a clear
    `TypeError` naming the fix."""
    if partition is None:
        if type(builder) is CacheKeyBuilder:
            # `build`'s common call, without its frame (the key is a str already)
            return builder._derive(model_id, messages, params)
        return str(builder.build(messages, model_id, params))
    try:
        return str(builder.build(messages, model_id, params, partition=partition))
    except TypeError as exc:
        if "partition" not in str(exc):
            raise
        raise TypeError(
            f"cache_control namespace={partition!r} needs a key builder whose build() takes "
            f"partition= (as CacheKeyBuilder.build does); {type(builder).__name__}.build does not"
        ) from exc
