"""Review s4, finding: ``StreamingResponseCache(max_entry_bytes=...)`` is not checked; a bad
value crashes every call later with an internal error (MEDIUM).

``CacheManager(max_entry_bytes=0 or -5)`` raises ``ValueError: max_entry_bytes must be positive
or None`` at construction. The same parameter of ``StreamingResponseCache`` (README table:
"``max_entry_bytes`` | ``int | None`` | the manager's (16 MiB) | bound on an in-flight stream's
retained log and on a stored entry") is accepted as is, and then:

- ``-5``: every ``get_or_stream`` / ``aget_or_stream`` raises ``OverflowError: can't convert
  negative int to unsigned`` (from the Rust chunk log) before its first chunk;
- ``1.5``: ``TypeError: argument 'max_bytes': 'float' object cannot be interpreted as an
  integer``; ``"10"``: ``TypeError: '<' not supported between instances of 'str' and 'int'``;
- ``0``: accepted, and every stream is "oversized" (never stored), where the manager refuses 0.

The mistake is reported far from where it was made, as an internal error that breaks the
caller's stream.

Fix direction: validate it in ``StreamingResponseCache.__init__`` with the manager's check (a
positive int or None).
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from chengeta_ai import CacheManager
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

BAD = {"negative": -5, "zero": 0, "float": 1.5, "str": "10"}


@pytest.mark.parametrize("bad", list(BAD.values()), ids=list(BAD))
def test_refused_at_construction(bad: Any) -> None:
    # observed on main: accepted (then OverflowError / TypeError on the first call)
    with pytest.raises((TypeError, ValueError), match="max_entry_bytes"):
        StreamingResponseCache(CacheManager(), max_entry_bytes=bad)


@pytest.mark.anyio
async def test_async_call_does_not_crash_with_an_internal_error() -> None:
    try:
        cache = StreamingResponseCache(CacheManager(), max_entry_bytes=-5)
    except (TypeError, ValueError):
        return  # refused at construction: the fix
    # observed on main: OverflowError: can't convert negative int to unsigned
    chunks = [c async for c in cache.aget_or_stream(["review s4"], lambda m: ["a", "b"])]
    await anyio.lowlevel.checkpoint()
    assert chunks == ["a", "b"]
