"""The guards of tests/test_guards.py hold when the cache shares flights through Redis: a
response instead of a stream is a `TypeError` naming the cause, nothing is stored, the key is
free for the next call; a blocking sync iterator is read off the event loop."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from openai.types.chat import ChatCompletion
from tests.helpers import collect
from tests.redis_flights.conftest import Fleet

from chengeta_ai.testing import openai_chunks

MESSAGES = [{"role": "user", "content": "guards across processes"}]


def completion() -> ChatCompletion:
    return ChatCompletion.construct(
        id="c", object="chat.completion", created=1, model="m", choices=[]
    )


def test_sync_response_instead_of_a_stream(fleet: Fleet) -> None:
    cache = fleet.cache()
    with pytest.raises(TypeError, match=r"ChatCompletion.*did you pass stream=True"):
        list(cache.get_or_stream(MESSAGES, lambda m: completion()))
    assert cache.stats()["stores"] == 0
    # (another request: the failed flight's final record reaches Redis from the producer's
    # writer thread a moment later, and a caller of the same key in that moment would follow
    # it and get UpstreamLost: a RedisFlights race outside these guards)
    chunks = openai_chunks(3)
    assert (
        list(cache.get_or_stream([*MESSAGES, {"role": "user", "content": "2"}], lambda m: chunks))
        == chunks
    )
    assert cache.stats()["stores"] == 1


@pytest.mark.anyio
async def test_async_response_instead_of_a_stream(fleet: Fleet) -> None:
    cache = fleet.cache()

    async def create(messages: Any) -> ChatCompletion:
        return completion()

    with pytest.raises(TypeError, match=r"ChatCompletion.*did you pass stream=True"):
        await collect(cache.aget_or_stream(MESSAGES, create))
    assert cache.stats()["stores"] == 0


@pytest.mark.anyio
async def test_a_blocking_sync_iterator_is_read_off_the_loop(fleet: Fleet) -> None:
    caches = [fleet.cache() for _ in range(2)]
    chunks = openai_chunks(10)
    loop_thread = threading.get_ident()
    threads: set[int] = set()

    def gen(messages: Any) -> Iterator[Any]:
        for chunk in chunks:
            threads.add(threading.get_ident())
            time.sleep(0.002)  # a blocking read
            yield chunk

    results: list[list[Any]] = []

    async def one(i: int) -> None:
        results.append(await collect(caches[i % 2].aget_or_stream(MESSAGES, gen)))

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(one, i)
    assert results == [chunks] * 4
    assert threads and loop_thread not in threads
    assert sum(c.stats()["stores"] for c in caches) == 1
