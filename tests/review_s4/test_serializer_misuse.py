"""Review s4, finding: a serializer that is not one is accepted, then every miss crashes (MEDIUM).

README, "Mistakes caught at the call": ``CacheManager(backend="memory")``, a backend class
instead of an instance, an object missing backend methods: "``TypeError`` at construction
saying what to pass". The ``serializer=`` of ``CacheManager`` and ``StreamingResponseCache``
(the seed page's table: "serializer | Serializer | None | PickleSerializer") has no such check:

- ``StreamingResponseCache(manager, serializer=PickleSerializer)`` (the class, as the seed's
  table reads) is accepted; the first miss raises ``TypeError:
  PickleSerializer.stream_encoder() missing 1 required positional argument: 'self'`` out of
  ``get_or_stream`` / ``aget_or_stream``;
- ``serializer="pickle"`` / ``CacheManager(serializer="json")`` / any object: accepted; the first
  miss raises ``AttributeError: 'str' object has no attribute 'stream_encoder'``.

So the mistake surfaces far from where it was made, as an internal AttributeError, and it
breaks the caller's stream (every miss raises before its first chunk) instead of being refused
at construction with what to pass.

Fix direction: check ``serializer`` at construction like the backend (an instance with
``dumps``/``loads``/``stream_encoder``/``iter_batches``; a class: "pass PickleSerializer()";
a string: name the serializer classes).
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from chengeta_ai import CacheManager, PickleSerializer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

NOT_SERIALIZERS = {"the-class": PickleSerializer, "a-string": "pickle", "an-object": object()}


@pytest.mark.parametrize("bad", list(NOT_SERIALIZERS.values()), ids=list(NOT_SERIALIZERS))
def test_streaming_cache_refuses_a_non_serializer(bad: Any) -> None:
    # observed on main: accepted (the first miss raises TypeError / AttributeError)
    with pytest.raises(TypeError, match="serializer"):
        StreamingResponseCache(CacheManager(), serializer=bad)


@pytest.mark.parametrize("bad", list(NOT_SERIALIZERS.values()), ids=list(NOT_SERIALIZERS))
def test_manager_refuses_a_non_serializer(bad: Any) -> None:
    with pytest.raises(TypeError, match="serializer"):
        CacheManager(serializer=bad)


@pytest.mark.anyio
async def test_async_miss_does_not_crash_on_the_seed_style_serializer() -> None:
    """If it is accepted, a miss must at least not break the caller's stream (fail open)."""
    the_class: Any = PickleSerializer  # (as the seed page's table reads)
    try:
        cache = StreamingResponseCache(CacheManager(), serializer=the_class)
    except TypeError:
        return  # refused at construction: the fix
    # observed on main: TypeError: PickleSerializer.stream_encoder() missing ... 'self'
    chunks = [c async for c in cache.aget_or_stream(["review s4"], lambda m: ["a", "b"])]
    await anyio.lowlevel.checkpoint()
    assert chunks == ["a", "b"]
