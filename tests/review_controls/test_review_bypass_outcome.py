"""Review: the outcome of a ``bypass=True`` call whose upstream raises a `BaseException`.

README: outcome ``error`` = "the upstream raised", ``abandoned`` = "this caller left before the
end". The bypass path catches only ``Exception`` (`_get_or_stream` / `_aget_or_stream`:
``except Exception: outcome = "error"``), so an upstream raising a `BaseException` that is not
an `Exception` (``KeyboardInterrupt`` inside the SDK's read, ``SystemExit``, a library's own
fatal error) reports ``abandoned``, while the same upstream on a miss reports ``error``; the
OpenTelemetry ``chengeta_ai.stream.outcomes`` counter gets the wrong label too. (Decided
since: a KeyboardInterrupt in the main thread is Ctrl-C, ``abandoned`` on both paths.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from chengeta_ai import CacheManager, InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

M = [{"role": "user", "content": "bypass"}]


class Fatal(BaseException):
    """An upstream failure that is not an Exception."""


def sync_upstream(exc: BaseException) -> Any:
    def fn(messages: Any) -> Iterator[str]:
        yield "a1"
        raise exc

    return fn


def async_upstream(exc: BaseException) -> Any:
    async def fn(messages: Any) -> AsyncIterator[str]:
        yield "a1"
        raise exc

    return fn


@pytest.mark.parametrize("bypass", [False, True])
@pytest.mark.parametrize("exc_type", [Fatal, KeyboardInterrupt, SystemExit])
def test_an_upstream_base_exception_is_an_error_outcome_sync(
    exc_type: type[BaseException], bypass: bool
) -> None:
    cache = StreamingResponseCache(CacheManager(backend=InMemoryBackend()))
    stream = cache.get_or_stream(M, sync_upstream(exc_type()), bypass=bypass)
    got: list[Any] = []
    with pytest.raises(exc_type):
        for chunk in stream:
            got.append(chunk)
    assert got == ["a1"]
    assert stream.cache_info is not None
    assert stream.cache_info.status == ("bypass" if bypass else "miss")
    # a KeyboardInterrupt in the main thread is a Ctrl-C of this caller, wherever it lands
    # (in the SDK's read or in the caller's loop): the caller left, the upstream did not fail
    interrupted = exc_type is KeyboardInterrupt
    assert stream.cache_info.outcome == ("abandoned" if interrupted else "error")


@pytest.mark.anyio
@pytest.mark.parametrize("bypass", [False, True])
async def test_an_upstream_base_exception_is_an_error_outcome_async(bypass: bool) -> None:
    cache = StreamingResponseCache(CacheManager(backend=InMemoryBackend()))
    stream = cache.aget_or_stream(M, async_upstream(Fatal()), bypass=bypass)
    got: list[Any] = []
    with pytest.raises(Fatal):
        async for chunk in stream:
            got.append(chunk)
    assert got == ["a1"]
    assert stream.cache_info is not None
    assert stream.cache_info.status == ("bypass" if bypass else "miss")
    assert stream.cache_info.outcome == "error"
