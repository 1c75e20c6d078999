"""Exceptions raised by chengeta_ai. Defined once in the Rust core, re-exported here.

Every one derives from `ChengetaError`; `DecodeError` is also a `ValueError` and `EncodeError`
also a `TypeError`, so code that catches those builtins keeps working.
"""

from __future__ import annotations

from chengeta_ai._core import (
    BackendError,
    ChengetaError,
    ConsumerLagged,
    DecodeError,
    EncodeError,
    UpstreamLost,
)

__all__ = [
    "BackendError",
    "ChengetaError",
    "ConsumerLagged",
    "DecodeError",
    "EncodeError",
    "UpstreamLost",
    "missing_extra",
]


def missing_extra(package: str, feature: str, extra: str | None = None) -> ModuleNotFoundError:
    """The error for an optional dependency that is not installed, naming the extra that
    installs it: ``RedisBackend needs the 'redis' package: pip install 'chengeta_ai[redis]'``.
    A `ModuleNotFoundError` (so an `ImportError`), like the one it replaces."""
    return ModuleNotFoundError(
        f"{feature} needs the {package!r} package, which is not installed: "
        f"pip install 'chengeta_ai[{extra or package}]'",
        name=package,
    )
