"""Review s4, finding: ``JsonSerializer`` stores NaN and infinities as ``null`` (MEDIUM).

README ("Serializers"): ``JsonSerializer`` stores "JSON-native values"; its docstring lists
"None, bool, int (64-bit), float, str, list, tuple (read back as a list) and dicts with str
keys; ... anything else raise[s] `EncodeError`". It refuses what JSON cannot hold (an int above
64 bits, a dict with int keys: the stream is delivered and not stored, ``unserializable``). But
a float that JSON cannot hold (``nan``, ``inf``, ``-inf``) is written by orjson as ``null``:
the stream is reported ``stored`` and every hit replays ``None`` where the live stream had the
float. A wrong value is served, silently; for a ``chunk_joiner`` that sums or scores chunks (a
``-inf`` log-probability, a ``nan`` metric) the stored answer is not the answer.

Fix direction: refuse non-finite floats in `JsonSerializer.dumps` / its stream encoder
(``EncodeError``, so the stream is not stored, as for the other values JSON cannot hold), or
encode them losslessly.
"""

from __future__ import annotations

import math
from typing import Any

import anyio
import pytest

from chengeta_ai import CacheManager, JsonSerializer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("value", list(VALUES.values()), ids=list(VALUES))
def test_a_hit_replays_what_the_live_stream_gave(value: float) -> None:
    cache = StreamingResponseCache(CacheManager(), serializer=JsonSerializer())
    chunks = [{"token": "a", "logprob": value}]
    live = list(cache.get_or_stream(["review s4"], lambda m: chunks))
    hit = cache.get_or_stream(["review s4"], lambda m: chunks)
    replayed = list(hit)
    assert live == chunks
    if hit.cache_info is not None and hit.cache_info.status == "hit":
        # observed on main: {'token': 'a', 'logprob': None}
        assert _same(replayed[0]["logprob"], value), f"served {replayed[0]!r}"


@pytest.mark.anyio
async def test_async_a_hit_replays_what_the_live_stream_gave() -> None:
    cache = StreamingResponseCache(CacheManager(), serializer=JsonSerializer())
    chunks = [{"token": "a", "logprob": -math.inf}]
    _ = [c async for c in cache.aget_or_stream(["review s4"], lambda m: chunks)]
    hit = cache.aget_or_stream(["review s4"], lambda m: chunks)
    replayed = [c async for c in hit]
    await anyio.lowlevel.checkpoint()
    if hit.cache_info is not None and hit.cache_info.status == "hit":
        assert _same(replayed[0]["logprob"], -math.inf), f"served {replayed[0]!r}"
