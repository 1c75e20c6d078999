"""Exceptions raised by chengeta_ai. Defined once in the Rust core, re-exported here.

Every one derives from `ChengetaError`; `DecodeError` is also a `ValueError`, `EncodeError`
also a `TypeError` and `CacheMiss` also a `LookupError`, so code that catches those builtins
keeps working.
"""

from chengeta_ai._core import (
    BackendError,
    CacheMiss,
    ChengetaError,
    ConsumerLagged,
    DecodeError,
    EncodeError,
    UpstreamLost,
)

__all__ = [
    "BackendError",
    "CacheMiss",
    "ChengetaError",
    "ConsumerLagged",
    "DecodeError",
    "EncodeError",
    "UpstreamLost",
]
