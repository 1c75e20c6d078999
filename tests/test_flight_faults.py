"""Faults that must never produce a truncated answer (issue 7): an upstream raising any
`BaseException`, an upstream that swallows its cancellation, an interrupt between reading a
chunk and logging it, an SDK stream that ends cleanly without its terminal event; and the
chunk objects consumers share.

Each test failed on the code before the flight state machine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any

import anyio
import pytest
from openai.types.chat import ChatCompletionChunk
from tests.helpers import collect

from chengeta_ai import CacheKeyBuilder, CacheManager, ChengetaError, InMemoryBackend
from chengeta_ai._core import ChunkLog
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

MESSAGES = [{"role": "user", "content": "faults"}]

pytestmark = pytest.mark.anyio


def new_cache(**kwargs: Any) -> StreamingResponseCache:
    manager = CacheManager(backend=InMemoryBackend(), key_builder=CacheKeyBuilder())
    return StreamingResponseCache(manager, **kwargs)


def stored_raw(cache: StreamingResponseCache) -> bytes | None:
    return cache.manager.get_raw(cache.manager.key_builder.build(MESSAGES, "default", None))


class Halt(BaseException):
    """A `BaseException` that is not an `Exception`, as a library might define one."""


# -- 1. an async upstream raising a BaseException that is not an Exception -----------------


@pytest.mark.parametrize("exc_type", [Halt, KeyboardInterrupt, SystemExit, GeneratorExit])
async def test_async_upstream_base_exception_reaches_every_consumer(
    exc_type: type[BaseException],
) -> None:
    cache = new_cache()
    gate = anyio.Event()

    async def upstream(_: Any) -> AsyncIterator[Any]:
        yield 0
        yield 1
        await gate.wait()
        raise exc_type("upstream stopped")

    outcomes: list[tuple[list[Any], BaseException | None]] = []

    async def consumer() -> None:
        got: list[Any] = []
        try:
            async for chunk in cache.aget_or_stream(MESSAGES, upstream):
                got.append(chunk)
        except BaseException as exc:
            outcomes.append((got, exc))
        else:
            outcomes.append((got, None))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(consumer)
        await anyio.sleep(0.05)
        gate.set()
    assert len(outcomes) == 3
    for got, exc in outcomes:
        assert got == [0, 1]
        assert exc is not None, "a truncated stream ended normally"
        if exc_type is GeneratorExit:
            assert isinstance(exc, ChengetaError)
            assert isinstance(exc.__cause__, GeneratorExit)
        else:
            assert isinstance(exc, exc_type)
    assert stored_raw(cache) is None
    assert cache.stats()["in_flight"] == 0


# -- 2. an upstream that swallows the cancellation of its read --------------------------------


def swallowing_upstream(started: anyio.Event) -> Any:
    async def upstream(_: Any) -> AsyncIterator[Any]:
        yield 0
        yield 1
        started.set()
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            return  # swallows the cancellation: ends "normally" half way
        yield 2

    return upstream


async def test_swallowed_cancellation_on_leaving_async_with_is_not_stored() -> None:
    cache = new_cache()
    started = anyio.Event()
    upstream = swallowing_upstream(started)
    got: list[Any] = []
    error: list[BaseException] = []

    async def consumer() -> None:
        try:
            async for chunk in cache.aget_or_stream(MESSAGES, upstream):
                got.append(chunk)
        except ChengetaError as exc:
            error.append(exc)

    async with anyio.create_task_group() as outer:
        async with cache:
            outer.start_soon(consumer)
            await started.wait()
        # leaving `async with cache` cancelled the pump; the upstream swallowed it
        with anyio.fail_after(5):
            while not error and len(got) < 3:
                await anyio.sleep(0.01)
    assert got == [0, 1]
    assert error, "the consumer of a cancelled read ended normally"
    assert stored_raw(cache) is None
    assert cache.stats()["stores"] == 0


async def test_swallowed_cancellation_on_abandon_is_not_stored() -> None:
    cache = new_cache(on_abandon="cancel")
    started = anyio.Event()
    upstream = swallowing_upstream(started)
    async with aclosing(cache.aget_or_stream(MESSAGES, upstream)) as chunks:
        async for chunk in chunks:
            if chunk == 1:
                break
    with anyio.fail_after(5):
        while cache.stats()["in_flight"]:
            await anyio.sleep(0.01)
    assert stored_raw(cache) is None
    # the next call streams afresh instead of replaying a truncated entry
    started2 = anyio.Event()
    async with aclosing(cache.aget_or_stream(MESSAGES, swallowing_upstream(started2))) as it:
        assert await it.__anext__() == 0
    assert cache.stats()["hits"] == 0


# -- 3. an interrupt between next(upstream) and the log, on a shared sync flight ----------------


def test_interrupt_between_reading_and_logging_a_chunk_fails_every_consumer() -> None:
    cache = new_cache()
    upstream_chunks = list(range(10))

    def upstream(_: Any) -> Iterator[Any]:
        yield from upstream_chunks

    a = cache.get_or_stream(MESSAGES, upstream)
    b = cache.get_or_stream(MESSAGES, upstream)
    assert next(a) == 0  # a leads and pulls chunk 0
    assert next(b) == 0  # b joins and reads it from the log
    # the interrupt lands once chunk 1 has left the upstream, before the log has it
    flight = next(iter(cache.flights.values()))
    # (`_record` is the log's per-chunk step, `ChunkLog.record`, which `append` calls)
    original = flight._record
    calls = {"n": 0}

    def interrupted_record(chunk: Any, *args: Any) -> int:
        calls["n"] += 1
        if chunk == 1:
            raise KeyboardInterrupt
        return original(chunk, *args)

    flight._record = interrupted_record
    with pytest.raises(KeyboardInterrupt):
        next(a)
    rest: list[Any] = []
    with pytest.raises(BaseException) as info:
        rest.extend(b)
    # the interrupted read broke the upstream for everyone, but only a's caller was
    # interrupted: b gets a clear error naming it (see SyncFlight._pull_one)
    assert isinstance(info.value, ChengetaError), info.value
    assert isinstance(info.value.__cause__, KeyboardInterrupt)
    assert 2 not in rest, "b silently skipped chunk 1"
    assert stored_raw(cache) is None


# -- 4. an SDK stream that ends cleanly without its terminal event ----------------------------


def chat_chunk(i: int, content: str | None, finish: str | None = None) -> ChatCompletionChunk:
    return ChatCompletionChunk.model_validate(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-4o",
            "choices": [
                {
                    "index": i,
                    "delta": {"content": content} if content is not None else {},
                    "finish_reason": finish,
                }
            ],
        }
    )


def test_chat_stream_cut_before_finish_reason_is_delivered_not_stored() -> None:
    cache = new_cache()
    cut = [chat_chunk(0, "Hel"), chat_chunk(0, "lo")]
    got = list(cache.get_or_stream(MESSAGES, lambda _: iter(cut)))
    assert got == cut
    assert stored_raw(cache) is None
    assert cache.stats()["not_stored_incomplete"] == 1
    whole = [*cut, chat_chunk(0, None, "stop")]
    assert list(cache.get_or_stream(MESSAGES, lambda _: iter(whole))) == whole
    assert stored_raw(cache) is not None


async def test_async_chat_stream_with_one_choice_unfinished_is_not_stored() -> None:
    cache = new_cache()
    # n=2: choice 1 never got its finish_reason
    cut = [chat_chunk(0, "a"), chat_chunk(1, "b"), chat_chunk(0, None, "stop"), chat_chunk(1, "c")]

    async def upstream(_: Any) -> AsyncIterator[Any]:
        for chunk in cut:
            yield chunk

    assert await collect(cache.aget_or_stream(MESSAGES, upstream)) == cut
    assert stored_raw(cache) is None
    assert cache.stats()["not_stored_incomplete"] == 1


def test_anthropic_stream_without_message_stop_is_not_stored() -> None:
    anthropic_types = pytest.importorskip("anthropic.types")
    adapter = __import__("pydantic").TypeAdapter(anthropic_types.RawMessageStreamEvent)
    start = adapter.validate_python(
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": "claude",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 1, "output_tokens": 1},
            },
        }
    )
    delta = adapter.validate_python(
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "hi"},
        }
    )
    stop = adapter.validate_python({"type": "message_stop"})
    cache = new_cache()
    assert list(cache.get_or_stream(MESSAGES, lambda _: iter([start, delta]))) == [start, delta]
    assert stored_raw(cache) is None
    assert list(cache.get_or_stream(MESSAGES, lambda _: iter([start, delta, stop])))
    assert stored_raw(cache) is not None


def test_empty_stream_is_not_stored() -> None:
    cache = new_cache()
    assert list(cache.get_or_stream(MESSAGES, lambda _: iter([]))) == []
    assert stored_raw(cache) is None
    assert cache.stats()["not_stored_incomplete"] == 1


def test_custom_completeness_rule() -> None:
    cache = new_cache(is_complete=lambda chunks: bool(chunks) and chunks[-1] == "[DONE]")
    assert list(cache.get_or_stream(MESSAGES, lambda _: iter(["a", "b"]))) == ["a", "b"]
    assert stored_raw(cache) is None
    assert list(cache.get_or_stream(MESSAGES, lambda _: iter(["a", "[DONE]"])))
    assert stored_raw(cache) is not None


# -- 6. consumers share chunk objects; the cache stores what the upstream produced ------------


async def test_a_consumer_mutating_its_chunks_does_not_change_what_a_joiner_stores() -> None:
    cache = new_cache(chunk_joiner=lambda chunks: [c["text"] for c in chunks])

    async def upstream(_: Any) -> AsyncIterator[Any]:
        for text in ("a", "b", "c"):
            yield {"text": text}

    async for chunk in cache.aget_or_stream(MESSAGES, upstream):
        chunk["text"] = "MUTATED"
    key = cache.manager.key_builder.build(MESSAGES, "default", None)
    assert cache.manager.get(key) == ["a", "b", "c"]


def test_a_consumer_mutating_its_chunks_does_not_change_the_stored_chunks() -> None:
    cache = new_cache()
    for chunk in cache.get_or_stream(MESSAGES, lambda _: iter([{"t": 1}, {"t": 2}])):
        chunk["t"] = 0
    assert list(cache.get_or_stream(MESSAGES, lambda _: iter([]))) == [{"t": 1}, {"t": 2}]


# -- the two mutations that used to survive the test run ----------------------------------------


def test_a_released_laggard_that_catches_up_holds_the_producer_again() -> None:
    log = ChunkLog(2, None)
    fast, slow = log.attach(), log.attach()
    assert fast is not None and slow is not None
    log.push(0, 1)
    log.push(1, 1)
    assert log.read(fast, 10) == [0, 1]
    assert log.read(fast, 10) == []  # acknowledges 0 and 1
    assert log.headroom() == 0  # the slow one holds the producer back
    assert log.release_slowest() == 1
    assert log.headroom() == 2  # only the fast one holds it now
    log.push(2, 1)
    log.push(3, 1)
    assert log.read(fast, 10) == [2, 3]
    assert log.read(fast, 10) == []
    assert log.read(slow, 10) == [0, 1, 2, 3]
    assert log.read(slow, 10) == []  # at the live edge: the laggard holds the producer again
    log.push(4, 1)
    assert log.read(fast, 10) == [4]
    assert log.read(fast, 10) == []
    assert log.headroom() == 1, "a laggard that caught up no longer holds the producer back"


async def test_a_caller_never_joins_a_flight_that_is_being_cancelled() -> None:
    cache = new_cache(on_abandon="cancel")
    closing = anyio.Event()
    release_close = anyio.Event()
    calls = {"n": 0}

    class SlowToClose:
        """An upstream whose close takes a while (an HTTP stream draining its socket)."""

        def __init__(self) -> None:
            calls["n"] += 1
            self.i = 0

        def __aiter__(self) -> SlowToClose:
            return self

        async def __anext__(self) -> int:
            self.i += 1
            if self.i > 3:
                await anyio.sleep(30)
            return self.i

        async def aclose(self) -> None:
            closing.set()
            await release_close.wait()

    async with aclosing(cache.aget_or_stream(MESSAGES, lambda _: SlowToClose())) as first:
        assert await first.__anext__() == 1
    await closing.wait()  # abandoned: its upstream is being closed, the key still held
    got: list[Any] = []

    async def second() -> None:
        async with aclosing(cache.aget_or_stream(MESSAGES, lambda _: SlowToClose())) as it:
            got.append(await it.__anext__())

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await anyio.sleep(0.05)
        assert got == [], "a caller joined a flight that was being cancelled"
        release_close.set()
    assert got == [1]
    assert calls["n"] == 2


# -- 4 (issue 7). a hit never fails half way ------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "asyncio", "trio"])
def test_hit_naming_an_unregistered_late_class_falls_back_to_the_live_stream(mode: str) -> None:
    import importlib
    import sys

    # the module pytest collected (as "test_codec_bounds"), not a second import of it as
    # "tests.test_codec_bounds": that would register its model classes twice and fail
    bounds = sys.modules.get("test_codec_bounds") or importlib.import_module(
        "tests.test_codec_bounds"
    )
    late_class_entry = bounds.late_class_entry
    from chengeta_ai.core.cache_manager import frame

    cache = new_cache()
    key = cache.manager.key_builder.build(MESSAGES, "default", None)
    # as if another process, which registered a class this one did not, had written it
    assert cache.manager.set_raw(key, frame(late_class_entry()), None, ())
    live = [f"live {i}" for i in range(5)]
    if mode == "sync":
        got = list(cache.get_or_stream(MESSAGES, lambda _: iter(live)))
    else:

        async def main() -> list[Any]:
            async def upstream(_: Any) -> AsyncIterator[Any]:
                for chunk in live:
                    yield chunk

            return await collect(cache.aget_or_stream(MESSAGES, upstream))

        got = anyio.run(main, backend=mode)
    assert got == live, "a hit gave some chunks and then failed"
    stats = cache.stats()
    assert stats["corrupt_entries"] == 1 and stats["hits"] == 0 and stats["misses"] == 1
    # the entry was replaced by the live stream
    assert list(cache.get_or_stream(MESSAGES, lambda _: iter([]))) == live
