"""Review s4, finding: ``get_or_stream`` refuses a coroutine but leaves it unawaited (LOW).

README, "Mistakes caught at the call": "``get_or_stream`` given an async stream or a coroutine:
``TypeError`` naming ``aget_or_stream``". It does raise that, but the coroutine ``stream_fn``
returned (``lambda m: async_client.chat.completions.create(...)``, the mistake in question) is
dropped without ``close()``: when it is collected Python emits ``RuntimeWarning: coroutine ...
was never awaited``, an extra, misleading warning next to the clear error (and an unraisable
exception under ``-W error`` / pytest's ``filterwarnings = error``, this project's own setting).
An async generator returned by mistake is likewise left for the collector.

Fix direction: ``close()`` the refused coroutine (``aclose`` is not possible synchronously for
an async generator, but a never-started one needs nothing) before raising the ``TypeError``.
"""

from __future__ import annotations

import gc
import warnings
from typing import Any

import pytest

from chengeta_ai import CacheManager
from chengeta_ai.layers.streaming_cache import StreamingResponseCache


async def _whole_call(messages: Any) -> list[str]:
    return ["a"]


def test_refused_coroutine_is_closed() -> None:
    cache = StreamingResponseCache(CacheManager())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match="aget_or_stream"):
            list(cache.get_or_stream(["review s4"], _whole_call))
        gc.collect()
    never_awaited = [w for w in caught if "was never awaited" in str(w.message)]
    # observed on main: RuntimeWarning: coroutine '_whole_call' was never awaited
    assert never_awaited == []
