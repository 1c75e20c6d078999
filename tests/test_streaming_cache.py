"""StreamingResponseCache: miss, hit and failure semantics, on sync, asyncio and trio.

One test body drives every twin through `drive` (sync generator, or the async generator run
under ``anyio.run`` on asyncio or trio).
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import anyio
import pytest
from tests.helpers import Boom, Heartbeat, Upstream, collect

from chengeta_ai import (
    CacheKeyBuilder,
    CacheManager,
    CompactSerializer,
    InMemoryBackend,
    JsonSerializer,
    PickleSerializer,
)
from chengeta_ai.backends.base import BaseBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache
from chengeta_ai.testing import openai_chunks

MESSAGES = [{"role": "user", "content": "Explain caching in 3 sentences"}]


@pytest.fixture(params=["sync", "asyncio", "trio"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def drive(
    mode: str,
    cache: StreamingResponseCache,
    upstream: Upstream,
    messages: Any = MESSAGES,
    *,
    stop_after: int | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Consumes one get_or_stream / aget_or_stream call; ``stop_after`` breaks early."""
    if mode == "sync":
        out: list[Any] = []
        gen = cache.get_or_stream(messages, upstream.sync, **kwargs)
        for chunk in gen:
            out.append(chunk)
            if stop_after is not None and len(out) >= stop_after:
                gen.close()
                break
        return out

    async def main() -> list[Any]:
        agen = cache.aget_or_stream(messages, upstream.asyncgen, **kwargs)
        if stop_after is None:
            return await collect(agen)
        got: list[Any] = []
        async for chunk in agen:
            got.append(chunk)
            if len(got) >= stop_after:
                await agen.aclose()
                break
        return got

    return anyio.run(main, backend=mode)


def new_cache(**kwargs: Any) -> StreamingResponseCache:
    manager_kwargs = {k: kwargs.pop(k) for k in ("default_ttl", "backend") if k in kwargs}
    manager = CacheManager(
        backend=manager_kwargs.pop("backend", InMemoryBackend()),
        key_builder=CacheKeyBuilder(),
        **manager_kwargs,
    )
    return StreamingResponseCache(manager, **kwargs)


def test_miss_then_hit_replays_equal_chunks_of_the_same_type(mode: str) -> None:
    chunks = openai_chunks(40)
    cache = new_cache()
    up = Upstream(chunks)
    first = drive(mode, cache, up, model_id="gpt-4o")
    second = drive(mode, cache, up, model_id="gpt-4o")
    assert up.calls == 1
    assert first == chunks
    assert second == chunks
    for a, b in zip(second, chunks, strict=True):
        assert type(a) is type(b)
        assert a.model_dump(exclude_unset=True) == b.model_dump(exclude_unset=True)
        assert a.obfuscation == b.obfuscation
    assert "".join(c.choices[0].delta.content or "" for c in second if c.choices)
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["stores"]) == (1, 1, 1)
    assert stats["stored_chunks"] == len(chunks)
    assert stats["stored_bytes"] > 0


def test_each_chunk_reaches_the_caller_before_the_next_is_read(mode: str) -> None:
    cache = new_cache()
    up = Upstream(list(range(10)))
    seen: list[tuple[int, int]] = []
    if mode == "sync":
        for chunk in cache.get_or_stream(MESSAGES, up.sync):
            seen.append((chunk, up.produced))
    else:

        async def main() -> None:
            async for chunk in cache.aget_or_stream(MESSAGES, up.asyncgen):
                seen.append((chunk, up.produced))

        # a paced upstream: the pump cannot run ahead while the chunk is on its way
        up.delay = 0.002
        anyio.run(main, backend=mode)
    for chunk, produced in seen:
        assert produced <= chunk + 2, (chunk, produced)


def test_upstream_error_reaches_the_caller_and_nothing_is_stored(mode: str) -> None:
    cache = new_cache()
    up = Upstream(list(range(10)), fail_at=5)
    got: list[Any] = []
    with pytest.raises(Boom, match="chunk 5"):
        if mode == "sync":
            for chunk in cache.get_or_stream(MESSAGES, up.sync):
                got.append(chunk)
        else:

            async def main() -> None:
                async for chunk in cache.aget_or_stream(MESSAGES, up.asyncgen):
                    got.append(chunk)

            anyio.run(main, backend=mode)
    assert got == [0, 1, 2, 3, 4]
    assert cache.stats()["stores"] == 0
    up.fail_at = None
    assert drive(mode, cache, up) == list(range(10))
    assert up.calls == 2, "a failed stream is never served as a hit"
    assert drive(mode, cache, up) == list(range(10))
    assert up.calls == 2


def test_caller_stopping_early_closes_the_upstream_and_stores_nothing(mode: str) -> None:
    cache = new_cache()
    up = Upstream(list(range(100)))
    assert drive(mode, cache, up, stop_after=3) == [0, 1, 2]
    assert up.closed == 1
    assert up.completed == 0
    assert up.produced < 100
    assert cache.stats()["stores"] == 0
    assert drive(mode, cache, up) == list(range(100))
    assert up.calls == 2


def test_chunk_joiner_stores_the_joined_value_and_replays_it(mode: str) -> None:
    chunks = openai_chunks(20)
    manager = CacheManager(backend=InMemoryBackend(), key_builder=CacheKeyBuilder())
    cache = StreamingResponseCache(
        manager,
        chunk_joiner=lambda cs: "".join(c.choices[0].delta.content or "" for c in cs),
    )
    up = Upstream(chunks)
    assert drive(mode, cache, up) == chunks
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert drive(mode, cache, up) == [text]
    assert up.calls == 1

    listing = StreamingResponseCache(manager, chunk_joiner=lambda cs: [len(cs), "done"])
    up2 = Upstream([1, 2, 3])
    assert drive(mode, listing, up2, model_id="other") == [1, 2, 3]
    assert drive(mode, listing, up2, model_id="other") == [3, "done"]


def test_params_and_model_are_part_of_the_key(mode: str) -> None:
    cache = new_cache()
    up = Upstream([1, 2])
    drive(mode, cache, up, model_id="a", params={"temperature": 0})
    drive(mode, cache, up, model_id="a", params={"temperature": 1})
    drive(mode, cache, up, model_id="b", params={"temperature": 0})
    assert up.calls == 3
    drive(mode, cache, up, model_id="a", params={"temperature": 0})
    assert up.calls == 3


def test_default_tags_are_the_model_and_invalidate_removes_them(mode: str) -> None:
    cache = new_cache()
    up = Upstream([1, 2])
    drive(mode, cache, up, model_id="gpt-4o")
    drive(mode, cache, up, model_id="gpt-4o-mini", tags=["team:a"])
    assert cache.manager.invalidate("model:gpt-4o") == 1
    assert cache.manager.invalidate("team:a") == 1
    drive(mode, cache, up, model_id="gpt-4o")
    drive(mode, cache, up, model_id="gpt-4o-mini")
    assert up.calls == 4


def test_ttl_expires_entries(mode: str) -> None:
    cache = new_cache(default_ttl=0.05)
    up = Upstream([1])
    drive(mode, cache, up)
    drive(mode, cache, up)
    assert up.calls == 1
    import time

    time.sleep(0.08)
    drive(mode, cache, up)
    assert up.calls == 2
    drive(mode, cache, up, model_id="long", ttl=60)
    time.sleep(0.08)
    drive(mode, cache, up, model_id="long")
    assert up.calls == 3


class FlakyBackend(InMemoryBackend):
    """A real in-memory backend whose operations can be made to fail (backend down)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_get = False
        self.fail_set = False

    def get(self, key: str) -> bytes | None:
        if self.fail_get:
            raise ConnectionError("backend down (get)")
        return super().get(key)

    def set(self, key: str, value: bytes, ttl: float | None = None, tags: Any = ()) -> None:
        if self.fail_set:
            raise ConnectionError("backend down (set)")
        super().set(key, value, ttl, tags)

    aget = BaseBackend.aget  # type: ignore[assignment]
    aset = BaseBackend.aset  # type: ignore[assignment]


def test_backend_failures_are_misses_and_skipped_stores(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = FlakyBackend()
    cache = new_cache(backend=backend)
    up = Upstream(list(range(20)))
    backend.fail_set = True
    with caplog.at_level(logging.WARNING, logger="chengeta_ai"):
        assert drive(mode, cache, up) == list(range(20))
    assert "backend down (set)" in caplog.text
    backend.fail_set = False
    assert drive(mode, cache, up) == list(range(20))
    assert up.calls == 2
    backend.fail_get = True
    assert drive(mode, cache, up) == list(range(20))
    assert up.calls == 3
    stats = cache.stats()
    assert stats["manager"]["backend_errors"] >= 2
    assert stats["not_stored_backend_error"] == 1


class Opaque:
    """Not encodable by any serializer."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque)

    __hash__ = object.__hash__


def test_unserializable_chunk_is_delivered_and_not_cached(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = new_cache()
    chunks: list[Any] = [1, Opaque(), 3]
    up = Upstream(chunks)
    with caplog.at_level(logging.WARNING, logger="chengeta_ai"):
        assert drive(mode, cache, up) == chunks
        assert drive(mode, cache, up) == chunks
    assert up.calls == 2
    assert cache.stats()["not_stored_unserializable"] == 2
    assert "Opaque" in caplog.text
    # the warning names the chunk that failed (the one appended with it, not the next)
    assert "chunk 1 cannot be encoded: chunk 1: unsupported type 'Opaque'" in caplog.text


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 10, b"\xc6\x01\x00\x00\x00\x00junk"])
def test_corrupt_entry_is_a_miss_and_is_deleted(mode: str, garbage: bytes) -> None:
    cache = new_cache()
    up = Upstream([1, 2, 3])
    drive(mode, cache, up)
    key = cache.manager.key_builder.build(MESSAGES, "default", None)
    cache.manager.backend.set(key, garbage)
    assert drive(mode, cache, up) == [1, 2, 3]
    assert up.calls == 2
    assert cache.stats()["corrupt_entries"] == 1
    assert drive(mode, cache, up) == [1, 2, 3]
    assert up.calls == 2, "the fresh stream was stored again"


def test_bypass_neither_joins_nor_stores(mode: str) -> None:
    cache = new_cache()
    up = Upstream([1, 2])
    drive(mode, cache, up)
    assert drive(mode, cache, up, bypass=True) == [1, 2]
    assert up.calls == 2
    assert cache.stats()["bypasses"] == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ttl": -1}, ValueError, "ttl"),
        ({"ttl": "10"}, TypeError, "ttl"),
        ({"tags": "model:x"}, TypeError, "list of strings"),
        ({"tags": [1]}, TypeError, "tag"),
        ({"model_id": None}, TypeError, "model_id"),
        ({"params": [1]}, TypeError, "params"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict[str, Any], error: type, match: str) -> None:
    cache = new_cache()
    with pytest.raises(error, match=match):
        cache.get_or_stream(MESSAGES, Upstream([1]).sync, **kwargs)
    with pytest.raises(error, match=match):
        cache.aget_or_stream(MESSAGES, Upstream([1]).asyncgen, **kwargs)
    with pytest.raises(TypeError, match="stream_fn"):
        cache.get_or_stream(MESSAGES, "not callable")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="set"):
        cache.get_or_stream([{"content": {1, 2}}], Upstream([1]).sync)
    with pytest.raises(ValueError, match="slow_consumer"):
        StreamingResponseCache(cache.manager, slow_consumer="drop")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_stream_fn_may_return_an_awaitable_or_a_plain_iterable() -> None:
    cache = new_cache()

    async def awaitable_stream(messages: Any) -> Any:
        return Upstream([1, 2, 3]).asyncgen(messages)

    assert await collect(cache.aget_or_stream(MESSAGES, awaitable_stream, model_id="a")) == [
        1,
        2,
        3,
    ]
    assert await collect(cache.aget_or_stream(MESSAGES, lambda m: [4, 5], model_id="b")) == [4, 5]
    assert await collect(cache.aget_or_stream(MESSAGES, lambda m: [9], model_id="b")) == [4, 5]
    with pytest.raises(TypeError, match="stream_fn must return"):
        await collect(cache.aget_or_stream(MESSAGES, lambda m: 42, model_id="c"))


@pytest.mark.anyio
@pytest.mark.parametrize("phase", ["miss", "hit"])
async def test_a_5000_chunk_stream_never_stalls_the_event_loop(phase: str) -> None:
    chunks = openai_chunks(5000)
    cache = new_cache()
    up = Upstream(chunks)
    if phase == "hit":
        assert await collect(cache.aget_or_stream(MESSAGES, up.asyncgen)) == chunks
    beat = Heartbeat()
    # A full garbage collection walks every live object of the process (openai's and pydantic's
    # classes, this test's 5,000 original chunks) and can take tens of ms whoever allocates:
    # freeze what exists, as servers do after start-up, so the gap measured is the cache's.
    gc.collect()
    gc.freeze()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(beat.run)
            await anyio.sleep(0.005)
            got = await collect(cache.aget_or_stream(MESSAGES, up.asyncgen))
            await anyio.sleep(0.005)
            beat.stop()
    finally:
        gc.unfreeze()
    assert got == chunks
    assert cache.stats()["stores"] == 1
    # generous for a loaded CI machine; benches/bench_streaming.py reports the real figure
    assert beat.max_gap < 0.05, f"event loop stalled for {beat.max_gap * 1000:.1f} ms"


@pytest.mark.parametrize("serializer", [PickleSerializer(), JsonSerializer(), CompactSerializer()])
def test_every_serializer_streams_stores_and_replays(mode: str, serializer: Any) -> None:
    manager = CacheManager(backend=InMemoryBackend(), serializer=serializer)
    cache = StreamingResponseCache(manager)
    chunks = [{"delta": "a"}, {"delta": "b"}, {"delta": "c"}]
    up = Upstream(chunks)
    assert drive(mode, cache, up) == chunks
    assert drive(mode, cache, up) == chunks
    assert up.calls == 1
    assert cache.stats()["stores"] == 1


class _SizelessPushSerializer(PickleSerializer):
    """A third-party-style serializer whose sink's ``push`` returns None (the protocol allows
    it): the streaming layer reads ``nbytes`` instead."""

    def stream_encoder(self) -> Any:
        sink = super().stream_encoder()

        class Sink:
            nbytes = 0

            def push(self, item: Any) -> None:
                self.nbytes = sink.push(item)

            def finish(self) -> bytes:
                return sink.finish()

        return Sink()


def test_a_sink_whose_push_returns_none_is_sized_by_nbytes(mode: str) -> None:
    manager = CacheManager(backend=InMemoryBackend(), serializer=_SizelessPushSerializer())
    cache = StreamingResponseCache(manager, max_entry_bytes=60)
    up = Upstream([{"delta": "x" * 10} for _ in range(20)])
    # 20 chunks of ~25 pickled bytes overflow 60 bytes: only nbytes can tell
    assert len(drive(mode, cache, up)) == 20
    assert cache.stats()["stores"] == 0
    small = Upstream([{"delta": "a"}])
    assert drive(mode, cache, small) == [{"delta": "a"}]
    assert drive(mode, cache, small) == [{"delta": "a"}]
    assert small.calls == 1
