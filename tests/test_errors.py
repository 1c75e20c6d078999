"""The exception hierarchy: one funnel (`ChengetaError`), the builtins kept, picklable."""

from __future__ import annotations

import pickle

import pytest

import chengeta_ai
from chengeta_ai import _core, errors
from chengeta_ai.serializers import CompactSerializer

EXPORTED = [getattr(errors, name) for name in errors.__all__]


def test_every_exported_exception_is_a_chengeta_error() -> None:
    assert sorted(errors.__all__) == sorted(
        name
        for name in chengeta_ai.__all__
        if name.endswith("Error") or name in ("CacheMiss", "ConsumerLagged", "UpstreamLost")
    )
    for exc in EXPORTED:
        assert issubclass(exc, errors.ChengetaError), exc
        assert issubclass(exc, Exception), exc


def test_builtin_bases_are_kept() -> None:
    assert issubclass(errors.DecodeError, ValueError)
    assert issubclass(errors.EncodeError, TypeError)
    assert not issubclass(errors.DecodeError, TypeError)
    assert not issubclass(errors.EncodeError, ValueError)
    assert issubclass(errors.CacheMiss, LookupError)
    assert not issubclass(errors.CacheMiss, ValueError)


@pytest.mark.parametrize("exc", EXPORTED, ids=lambda e: e.__name__)
def test_defined_once_in_the_core_under_the_package_name(exc: type[Exception]) -> None:
    assert getattr(_core, exc.__name__) is exc
    assert getattr(chengeta_ai, exc.__name__) is exc
    assert exc.__module__ == "chengeta_ai"
    assert exc.__qualname__ == exc.__name__
    assert exc.__doc__


@pytest.mark.parametrize("exc", EXPORTED, ids=lambda e: e.__name__)
def test_pickle_round_trip(exc: type[Exception]) -> None:
    original = exc("something failed", 42)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        copy = pickle.loads(pickle.dumps(original, protocol=protocol))
        assert type(copy) is exc
        assert copy.args == original.args
        assert str(copy) == str(original)


def test_codec_errors_are_caught_by_either_base() -> None:
    compact = CompactSerializer()
    with pytest.raises(ValueError):
        _core.decode(b"not an encoding")
    with pytest.raises(errors.ChengetaError):
        _core.decode(b"not an encoding")
    with pytest.raises(TypeError):
        _core.encode(object())
    with pytest.raises(errors.ChengetaError):
        _core.encode(object())
    with pytest.raises(errors.DecodeError):
        compact.loads(b"\x00garbage")


def test_raised_from_rust_with_the_message() -> None:
    with pytest.raises(errors.EncodeError) as info:
        _core.encode(object())
    assert type(info.value) is errors.EncodeError
    assert "object" in str(info.value)
