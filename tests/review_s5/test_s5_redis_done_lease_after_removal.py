"""Finding (high): with `RedisFlights`, a stream stored just before a removal is served again
after the removal returned, for ``done_ttl`` seconds (5 s by default), replayed from its Redis
log.

After a stored end the producer's lease becomes ``=<token>`` for ``done_ttl`` so that callers
that missed the store replay the log. A removal (``delete``, ``invalidate``, ``clear``) does
not touch that lease: the next caller finds no entry (removed), leads a local flight, elects,
finds the ``=<token>`` lease and replays the removed answer (outcome ``follower``; its
stream_fn is never called), in this very process. A removal must make the key's done lease
(and log) unreachable too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from tests.redis_flights.conftest import Fleet

MODEL = "gpt-4o"


def _old(_m: Any) -> Iterator[str]:
    yield from ["old", "answer"]


def _fresh(_m: Any) -> Iterator[str]:
    yield "new answer"


REMOVALS = {
    "invalidate": lambda cache: cache.manager.invalidate(f"model:{MODEL}"),
    "delete": lambda cache: cache.manager.delete(cache.manager.key_builder.build(["q"], MODEL)),
    "clear": lambda cache: cache.manager.clear(),
}


@pytest.mark.parametrize("removal", sorted(REMOVALS))
def test_a_removed_answer_is_not_replayed_from_the_done_lease(fleet: Fleet, removal: str) -> None:
    cache = fleet.cache()
    assert list(cache.get_or_stream(["q"], _old, model_id=MODEL)) == ["old", "answer"]
    assert cache.stats().stores == 1
    REMOVALS[removal](cache)
    after = cache.get_or_stream(["q"], _fresh, model_id=MODEL)
    assert list(after) == ["new answer"], after.cache_info


@pytest.mark.anyio
@pytest.mark.parametrize("removal", sorted(REMOVALS))
async def test_async_a_removed_answer_is_not_replayed_from_the_done_lease(
    fleet: Fleet, removal: str
) -> None:
    cache = fleet.cache()

    async def old(_m: Any) -> AsyncIterator[str]:
        for c in ("old", "answer"):
            yield c

    async def fresh(_m: Any) -> AsyncIterator[str]:
        yield "new answer"

    assert [c async for c in cache.aget_or_stream(["q"], old, model_id=MODEL)] == [
        "old",
        "answer",
    ]
    if removal == "invalidate":
        await cache.manager.ainvalidate(f"model:{MODEL}")
    elif removal == "delete":
        await cache.manager.adelete(cache.manager.key_builder.build(["q"], MODEL))
    else:
        await cache.manager.aclear()
    after = cache.aget_or_stream(["q"], fresh, model_id=MODEL)
    assert [c async for c in after] == ["new answer"], after.cache_info
