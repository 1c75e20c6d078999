"""Finding (medium-low): when the removal epoch cannot be incremented (Redis stalls or errs at
that moment; or the epoch key holds a value Redis cannot INCR but Python reads as a number:
``""``, a negative or out-of-int64 number), the removal warns and returns *success*, and the
removed answer is then replayed from the stored stream's ``=<token>`` lease for ``done_ttl``,
in this very process: exactly review s5 finding 2, back whenever one INCR fails.

Here Redis pauses writes for 1.5 s (``CLIENT PAUSE ... WRITE``, a real Redis feature that
stands for a failover or a stalled primary): the INCR times out, the backend delete succeeds,
``delete()`` returns; once Redis answers again, the next caller follows the done lease and gets
the deleted answer. The corrupt-value variants show that `RedisFlights.epoch` and Redis's INCR
disagree on what a number is (``int(b"" or 0)`` is 0; ``-3`` is read but the _ACQUIRE script's
``':(%d+)$'`` does not match ``:-3``, so the old token counts as epoch 0 >= -2).

Fix direction: a removal whose epoch bump failed must not leave the done leases followable:
raise `BackendError` after the local removal (the removal contract: "a caller who asked for
data to be gone must know it is not"), or mark ``down`` so no election follows until the bump
succeeded; parse the epoch strictly (``^[0-9]+$``; anything else is corrupt and is reset by a
SET of a fresh value, which also repairs it).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from tests.redis_flights.conftest import Fleet

from chengeta_ai import BackendError

MODEL = "m"


@pytest.fixture
def slow_done_fleet(flights_redis: object) -> Iterator[Fleet]:
    f = Fleet(flights_redis.url, done_ttl=8.0, log_ttl=10.0)  # type: ignore[attr-defined]
    yield f
    f.close()


def test_removal_during_a_redis_stall_then_removed_answer_replayed(
    slow_done_fleet: Fleet,
) -> None:
    cache = slow_done_fleet.cache()
    r = redis.Redis.from_url(slow_done_fleet.url)
    assert list(cache.get_or_stream(["q"], lambda _m: iter(["old"]), model_id=MODEL)) == ["old"]
    key = cache.manager.key_builder.build(["q"], MODEL)
    r.execute_command("CLIENT", "PAUSE", 1500, "WRITE")  # Redis stalls writes for 1.5 s
    # (fixed: the removal says it could not tell the fleet, so the caller knows to retry)
    with pytest.raises(BackendError, match="could not be told"):
        cache.manager.delete(key)
    resumed = threading.Event()
    threading.Timer(1.6, resumed.set).start()
    assert resumed.wait(5)
    cache.manager.delete(key)  # the retry, with Redis back
    after = cache.get_or_stream(["q"], lambda _m: iter(["new"]), model_id=MODEL)
    assert list(after) == ["new"], after.cache_info


@pytest.mark.parametrize("value", [b"", b"-3", b"99999999999999999999999"])
def test_unincrementable_epoch_then_removed_answer_replayed(fleet: Fleet, value: bytes) -> None:
    cache = fleet.cache()
    r = redis.Redis.from_url(fleet.url)
    r.set(cache.remote_flights.removal_key("chengeta"), value)  # type: ignore[union-attr]
    assert list(cache.get_or_stream(["q"], lambda _m: iter(["old"]), model_id=MODEL)) == ["old"]
    cache.manager.delete(cache.manager.key_builder.build(["q"], MODEL))
    after = cache.get_or_stream(["q"], lambda _m: iter(["new"]), model_id=MODEL)
    assert list(after) == ["new"], after.cache_info


@pytest.mark.anyio
@pytest.mark.parametrize("value", [b"", b"-3"])
async def test_unincrementable_epoch_then_removed_answer_replayed_async(
    fleet: Fleet, value: bytes
) -> None:
    cache = fleet.cache()
    r = redis.Redis.from_url(fleet.url)
    r.set(cache.remote_flights.removal_key("chengeta"), value)  # type: ignore[union-attr]

    def answer(text: str) -> object:
        async def gen(_m: object) -> AsyncIterator[str]:
            yield text

        return gen

    first = cache.aget_or_stream(["q"], answer("old"), model_id=MODEL)
    assert [c async for c in first] == ["old"]
    await cache.manager.adelete(cache.manager.key_builder.build(["q"], MODEL))
    after = cache.aget_or_stream(["q"], answer("new"), model_id=MODEL)
    assert [c async for c in after] == ["new"], after.cache_info
