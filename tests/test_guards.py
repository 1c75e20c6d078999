"""Guards against quiet misuse: a clear error at the call, and nothing stored.

- ``stream_fn`` returning a whole response instead of a stream (``stream=True`` forgotten: a
  ``ChatCompletion``), a mapping, a ``str`` or ``bytes``: `TypeError` naming the type and the
  likely cause, on sync, asyncio and trio, through the real openai client too;
- ``CacheManager(backend=...)`` given something that is not a backend;
- a blocking sync iterator (an ``openai.Stream``, a generator) inside ``aget_or_stream``: read
  in a worker thread, the event loop keeps running (heartbeat), sharing, cancellation and
  backpressure still hold;
- a missing optional dependency: `ImportError` naming the extra to install.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import aclosing
from typing import Any

import anyio
import openai
import pytest
from openai.types.chat import ChatCompletion
from tests.helpers import Boom, Heartbeat, collect

from chengeta_ai import CacheKeyBuilder, CacheManager, InMemoryBackend
from chengeta_ai.backends.base import BaseBackend
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache
from chengeta_ai.layers.upstream import ThreadedIterator, in_memory
from chengeta_ai.testing import openai_chunks

MESSAGES = [{"role": "user", "content": "Explain caching in 3 sentences"}]


def new_cache(**kw: Any) -> StreamingResponseCache:
    return StreamingResponseCache(
        CacheManager(backend=InMemoryBackend(), key_builder=CacheKeyBuilder()), **kw
    )


def entries(cache: StreamingResponseCache) -> int:
    return int(cache.manager.backend.stats()["entries"])


def completion() -> ChatCompletion:
    return ChatCompletion.construct(
        id="chatcmpl-1",
        object="chat.completion",
        created=1,
        model="gpt-4o",
        choices=[
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "hi"},
            }
        ],
    )


# -- stream_fn returning something that is not a stream ------------------------------------------

NOT_STREAMS = {
    "pydantic model": (completion, "ChatCompletion"),
    "dict": (lambda: {"choices": []}, "dict"),
    "str": (lambda: "a whole answer", "str"),
    "bytes": (lambda: b"data: {}\n\n", "bytes"),
}


@pytest.fixture(params=["sync", "asyncio", "trio"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run_call(mode: str, cache: StreamingResponseCache, stream_fn: Any, **kw: Any) -> list[Any]:
    if mode == "sync":
        return list(cache.get_or_stream(MESSAGES, stream_fn, **kw))

    async def main() -> list[Any]:
        return await collect(cache.aget_or_stream(MESSAGES, stream_fn, **kw))

    return anyio.run(main, backend=mode)


@pytest.mark.parametrize("bypass", [False, True], ids=["cached", "bypass"])
@pytest.mark.parametrize("what", list(NOT_STREAMS))
def test_a_response_instead_of_a_stream_is_a_type_error(mode: str, what: str, bypass: bool) -> None:
    make, type_name = NOT_STREAMS[what]
    cache = new_cache()
    with pytest.raises(TypeError, match=rf"{type_name}\b.*did you pass stream=True\?"):
        run_call(mode, cache, lambda m: make(), bypass=bypass)
    assert entries(cache) == 0
    assert cache.stats()["stores"] == 0
    assert cache.stats()["in_flight"] == 0
    # the key is not poisoned: a real stream afterwards is cached
    chunks = openai_chunks(3)
    assert run_call(mode, cache, lambda m: chunks) == chunks
    assert cache.stats()["stores"] == 1


def test_an_awaitable_resolving_to_a_response_is_a_type_error() -> None:
    cache = new_cache()

    async def create(messages: Any) -> ChatCompletion:  # AsyncOpenAI without stream=True
        return completion()

    async def main() -> None:
        with pytest.raises(TypeError, match=r"ChatCompletion.*did you pass stream=True"):
            await collect(cache.aget_or_stream(MESSAGES, create))

    anyio.run(main)
    assert entries(cache) == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda chunks: chunks,
        lambda chunks: tuple(chunks),
        lambda chunks: iter(chunks),
        lambda chunks: (c for c in chunks),
    ],
    ids=["list", "tuple", "iterator", "generator"],
)
def test_plain_iterables_of_chunks_stay_accepted(mode: str, make: Any) -> None:
    chunks = openai_chunks(5)
    cache = new_cache()
    assert run_call(mode, cache, lambda m: make(chunks)) == chunks
    assert run_call(mode, cache, lambda m: make(chunks)) == chunks
    assert cache.stats()["hits"] == 1 and cache.stats()["stores"] == 1


def test_one_whole_object_is_cached_when_wrapped_in_a_list(mode: str) -> None:
    cache = new_cache()
    answer = completion()
    assert run_call(mode, cache, lambda m: [answer]) == [answer]
    assert run_call(mode, cache, lambda m: [answer]) == [answer]
    assert cache.stats()["hits"] == 1


@pytest.fixture(scope="module")
def server() -> Iterator[LocalOpenAIServer]:
    with LocalOpenAIServer(first_token_delay=0.01, token_interval=0.005, tokens=12) as srv:
        yield srv


def test_the_real_client_without_stream_true(server: LocalOpenAIServer) -> None:
    """The mistake as users make it: the real openai client, ``stream=True`` forgotten."""
    cache = new_cache()
    client = openai.OpenAI(base_url=server.base_url, api_key="x")

    def stream_fn(messages: Any) -> Any:
        return client.chat.completions.create(model="gpt-4o", messages=messages)

    with pytest.raises(TypeError, match=r"ChatCompletion.*did you pass stream=True"):
        list(cache.get_or_stream(MESSAGES, stream_fn, model_id="gpt-4o"))
    assert entries(cache) == 0


@pytest.mark.anyio
async def test_the_real_async_client_without_stream_true(server: LocalOpenAIServer) -> None:
    cache = new_cache()
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x") as client:

        def stream_fn(messages: Any) -> Any:
            return client.chat.completions.create(model="gpt-4o", messages=messages)

        with pytest.raises(TypeError, match=r"ChatCompletion.*did you pass stream=True"):
            await collect(cache.aget_or_stream(MESSAGES, stream_fn, model_id="gpt-4o"))
    assert entries(cache) == 0


def test_sync_stream_fn_returning_an_async_stream_says_which_twin() -> None:
    cache = new_cache()

    async def agen(messages: Any) -> Any:
        yield 1

    with pytest.raises(TypeError, match="use aget_or_stream"):
        list(cache.get_or_stream(MESSAGES, agen))


# -- CacheManager(backend=...) ------------------------------------------------------------------


def test_a_backend_named_by_a_string_is_refused() -> None:
    with pytest.raises(TypeError, match=r"not the string 'memory'.*InMemoryBackend\(\)"):
        CacheManager(backend="memory")  # type: ignore[arg-type]


def test_a_backend_class_instead_of_an_instance_is_refused() -> None:
    with pytest.raises(TypeError, match=r"pass InMemoryBackend\(\.\.\.\)"):
        CacheManager(backend=InMemoryBackend)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"the class dict does not implement .*missing: aclear"):
        CacheManager(backend=dict)  # type: ignore[arg-type]


def test_an_object_missing_backend_methods_is_refused_naming_them() -> None:
    class Half:
        def get(self, key: str) -> bytes | None:
            return None

        def set(self, key: str, value: bytes, ttl: Any = None, tags: Any = ()) -> None:
            pass

    with pytest.raises(TypeError, match=r"Half does not implement .*missing: .*aget.*delete"):
        CacheManager(backend=Half())  # type: ignore[arg-type]


def test_custom_backends_on_base_backend_are_accepted() -> None:
    class Dict(BaseBackend):
        def __init__(self) -> None:
            self.d: dict[str, bytes] = {}

        def get(self, key: str) -> bytes | None:
            return self.d.get(key)

        def set(self, key: str, value: bytes, ttl: Any = None, tags: Any = ()) -> None:
            self.d[key] = value

    manager = CacheManager(backend=Dict())
    manager.set("k", [1, 2])
    assert manager.get("k") == [1, 2]


def test_a_key_builder_that_is_not_one_is_refused() -> None:
    with pytest.raises(TypeError, match="key_builder must be a CacheKeyBuilder"):
        CacheManager(key_builder="chengeta")  # type: ignore[arg-type]


# -- blocking sync iterators inside aget_or_stream ----------------------------------------------


class BlockingStream:
    """A sync iterator that blocks in ``next()`` the way a socket read does, until the event
    loop has ticked a few more times: it proves the loop runs while a read blocks (on the loop
    thread it would wait for ticks that never come, and it refuses to run there at all)."""

    def __init__(self, chunks: list[Any], beat: Heartbeat, loop_thread: int) -> None:
        self.chunks = list(chunks)
        self.beat = beat
        self.loop_thread = loop_thread
        self.reads = 0
        self.closed = 0
        self.release = threading.Event()
        self.release.set()
        #: next() blocks on ``release`` before reading this chunk (``gated`` set meanwhile)
        self.gate_at: int | None = None
        self.gated = threading.Event()

    def __iter__(self) -> BlockingStream:
        return self

    def __next__(self) -> Any:
        if threading.get_ident() == self.loop_thread:
            raise AssertionError("next() of a blocking upstream ran on the event loop thread")
        index = self.reads
        if index == self.gate_at:
            self.gated.set()
            assert self.release.wait(10)
        start = self.beat.ticks
        deadline = time.monotonic() + 10
        while self.beat.ticks < start + 2:  # the loop goes on while this read blocks
            if time.monotonic() > deadline:
                raise AssertionError("the event loop did not run while next() blocked")
            time.sleep(0.0005)
        self.reads += 1
        if index >= len(self.chunks):
            raise StopIteration
        return self.chunks[index]

    def close(self) -> None:
        self.closed += 1


@pytest.mark.anyio
async def test_a_blocking_sync_iterator_is_read_off_the_loop() -> None:
    chunks = openai_chunks(20)
    cache = new_cache()
    beat = Heartbeat()
    stream = BlockingStream(chunks, beat, threading.get_ident())
    async with anyio.create_task_group() as tg:
        tg.start_soon(beat.run)
        got = await collect(cache.aget_or_stream(MESSAGES, lambda m: stream))
        beat.stop()
    assert got == chunks
    assert cache.stats()["stores"] == 1
    assert stream.closed == 1  # closed once, at its end
    print(f"\nlargest loop gap while reading a blocking iterator: {beat.max_gap * 1e3:.1f} ms")


@pytest.mark.anyio
async def test_a_sync_generator_is_read_off_the_loop() -> None:
    chunks = openai_chunks(10)
    cache = new_cache()
    loop_thread = threading.get_ident()
    threads: set[int] = set()
    closed = []

    def gen(messages: Any) -> Iterator[Any]:
        try:
            for chunk in chunks:
                threads.add(threading.get_ident())
                time.sleep(0.002)  # a blocking read
                yield chunk
        finally:
            closed.append(True)

    assert await collect(cache.aget_or_stream(MESSAGES, gen)) == chunks
    assert threads and loop_thread not in threads
    assert closed == [True]


def test_lists_and_tuples_are_read_inline() -> None:
    assert in_memory([1]) and in_memory((1,)) and in_memory(iter([1])) and in_memory(range(3))
    assert not in_memory(c for c in [1])
    assert not in_memory(BlockingStream([], Heartbeat(), 0))


@pytest.mark.anyio
async def test_a_real_sync_openai_stream_inside_aget_or_stream(server: LocalOpenAIServer) -> None:
    """The issue's case: ``openai.OpenAI`` (sync) streaming inside ``aget_or_stream``. Ten
    concurrent callers share one upstream call read in a worker thread; then a hit."""
    client = openai.OpenAI(base_url=server.base_url, api_key="x")
    expected = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    want = "".join(c.choices[0].delta.content or "" for c in expected if c.choices)
    cache = new_cache()
    beat = Heartbeat()

    def stream_fn(messages: Any) -> Any:
        return client.chat.completions.create(model="gpt-4o", messages=messages, stream=True)

    texts: list[str] = []

    async def one() -> None:
        chunks = await collect(cache.aget_or_stream(MESSAGES, stream_fn, model_id="gpt-4o"))
        texts.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))

    before = server.request_count
    async with anyio.create_task_group() as tg:
        tg.start_soon(beat.run)
        async with anyio.create_task_group() as callers:
            for _ in range(10):
                callers.start_soon(one)
        beat.stop()
    assert texts == [want] * 10
    assert server.request_count - before == 1
    stats = cache.stats()
    assert stats["streams_led"] == 1 and stats["joins"] == 9 and stats["stores"] == 1
    await one()  # a hit
    assert server.request_count - before == 1 and cache.stats()["hits"] == 1
    client.close()
    print(f"\nlargest loop gap, sync openai.Stream in aget_or_stream: {beat.max_gap * 1e3:.1f} ms")


@pytest.mark.anyio
async def test_cancelling_a_threaded_read_closes_the_iterator_and_stores_nothing() -> None:
    """The only caller leaves while the worker thread is blocked in ``next()``: the caller
    returns at once (it does not wait for the read), the key is free again, and the thread
    closes the iterator as soon as its read returns, starting no further read."""
    chunks = openai_chunks(10)
    cache = new_cache()
    beat = Heartbeat()
    stream = BlockingStream(chunks, beat, threading.get_ident())
    stream.gate_at = 3
    stream.release.clear()
    async with anyio.create_task_group() as tg:
        tg.start_soon(beat.run)
        got = []
        async with aclosing(cache.aget_or_stream(MESSAGES, lambda m: stream)) as agen:
            async for chunk in agen:
                got.append(chunk)
                if len(got) == 3:
                    break
            # leave once the worker thread is blocked in the read of chunk 3
            with anyio.fail_after(10):
                while not stream.gated.is_set():
                    await anyio.sleep(0.001)
        # left while the read of chunk 3 blocks: nothing waited for it
        assert not stream.release.is_set()
        with anyio.fail_after(5):
            while cache.stats()["in_flight"]:
                await anyio.sleep(0.001)
        assert cache.stats()["abandoned_cancelled"] == 1
        assert stream.closed == 0  # the read is still running: closing would race it
        stream.release.set()
        with anyio.fail_after(10):
            while not stream.closed:
                await anyio.sleep(0.001)
        await anyio.sleep(0.05)
        beat.stop()
    assert got == chunks[:3]
    assert stream.closed == 1
    assert stream.reads == 4  # the blocked read finished; no read after it
    assert entries(cache) == 0 and cache.stats()["stores"] == 0


@pytest.mark.anyio
async def test_an_error_in_a_threaded_read_reaches_every_caller() -> None:
    class Failing:
        closed = 0
        reads = 0

        def __iter__(self) -> Failing:
            return self

        def __next__(self) -> Any:
            self.reads += 1
            if self.reads == 3:
                raise Boom("socket reset")
            time.sleep(0.005)
            return self.reads

        def close(self) -> None:
            self.closed += 1

    stream = Failing()
    cache = new_cache()
    errors: list[BaseException] = []

    async def one() -> None:
        try:
            await collect(cache.aget_or_stream(MESSAGES, lambda m: stream))
        except Boom as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(one)
    assert len(errors) == 3
    assert stream.closed == 1
    assert entries(cache) == 0


@pytest.mark.anyio
async def test_backpressure_holds_for_threaded_reads() -> None:
    """``slow_consumer="wait"``: a consumer that stops reading stops the worker thread too;
    nothing is read ahead beyond the log's bound."""
    chunks = openai_chunks(200)
    max_lag = 4
    cache = new_cache(max_lag=max_lag, slow_consumer="wait")
    beat = Heartbeat()
    stream = BlockingStream(chunks, beat, threading.get_ident())
    async with anyio.create_task_group() as tg:
        tg.start_soon(beat.run)
        async with aclosing(cache.aget_or_stream(MESSAGES, lambda m: stream)) as agen:
            await agen.__anext__()
            await anyio.sleep(0.3)  # a slow consumer: the pump must wait for it
            reads_while_paused = stream.reads
            got = [chunk async for chunk in agen]
        beat.stop()
    assert reads_while_paused <= 2 * max_lag + 2
    assert len(got) == len(chunks) - 1
    assert cache.stats()["stores"] == 1


@pytest.mark.anyio
async def test_threaded_iterator_closes_once() -> None:
    class Stream:
        closed = 0

        def __init__(self) -> None:
            self.items = iter([1, 2])

        def __iter__(self) -> Iterator[int]:
            return self.items

        def close(self) -> None:
            self.closed += 1

    stream = Stream()
    it = ThreadedIterator(stream)
    assert await it.__anext__() == 1
    await it.aclose()
    await it.aclose()
    assert stream.closed == 1
    with pytest.raises(StopAsyncIteration):
        await it.__anext__()


# -- missing optional dependencies -------------------------------------------------------------


def _without(module: str, code: str) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a fresh interpreter where ``module`` cannot be imported."""
    prelude = f"import sys\nsys.modules[{module!r}] = None  # as if not installed\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("name", ["RedisBackend", "RedisFlights"])
def test_redis_features_without_redis_name_the_extra(name: str) -> None:
    proc = _without(
        "redis",
        f"""
        try:
            from chengeta_ai import {name}
        except ModuleNotFoundError as exc:
            assert exc.name == "redis", exc.name
            print(exc)
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        f"{name} needs the 'redis' package, which is not installed: "
        "pip install 'chengeta_ai[redis]'"
    )


def test_the_cache_works_without_redis_installed() -> None:
    proc = _without(
        "redis",
        """
        from chengeta_ai import CacheManager, StreamingResponseCache
        cache = StreamingResponseCache(CacheManager())
        for _ in range(2):
            assert list(cache.get_or_stream([1], lambda m: [1, 2, 3])) == [1, 2, 3]
        assert cache.stats()["hits"] == 1
        print("ok")
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_the_local_server_without_uvicorn_names_the_extra() -> None:
    proc = _without(
        "uvicorn",
        """
        from chengeta_ai.demo.server import LocalOpenAIServer
        try:
            LocalOpenAIServer().start()
        except ImportError as exc:
            print(exc)
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'chengeta_ai[demo]'" in proc.stdout
