"""Exceptions raised by chengeta_ai. Defined once in the Rust core, re-exported here."""

from chengeta_ai._core import ChengetaError, ConsumerLagged, DecodeError, EncodeError

__all__ = ["BackendError", "ChengetaError", "ConsumerLagged", "DecodeError", "EncodeError"]


class BackendError(ChengetaError):
    """A storage backend failed (server unreachable, file locked, ...).

    Raised by backends to the cache layers, which log it, count it and step aside: callers of
    `get_or_stream` never see it.
    """
