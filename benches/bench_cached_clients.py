"""The cached clients (issue 8): adapter cost per chunk, key building, bytes per stored event.

Run for real: ``pytest benches/bench_cached_clients.py -q -s`` on a release build (``make
bench``); smoke: ``pytest benches --benchmark-disable`` (every path once, sizes scaled down).

- Adapter overhead per streamed chunk, against the raw ``openai`` client on the same local
  server (Starlette + uvicorn on loopback, no pacing: every figure is CPU), Chat Completions
  with 500 tokens: ``raw`` = the SDK's own stream read to the end; ``miss`` = the cached client,
  a new prompt each round (key, upstream, encode, store, all on the caller's path); ``hit`` = the
  cached client replaying the entry (no HTTP at all). Per chunk: the round's time over the
  number of chunks, medians over rounds, rounds interleaved.
- Key building for a 2 KB and a 100 KB Responses API request: what the cached client does per
  call to key it (`ClientCache.split`: the client's identity checked, the arguments split, the
  params and the key made, the common call in one call into the extension), against
  ``sha256(json.dumps(kwargs, sort_keys=True))`` of the same keyword arguments (targets: >= 5x
  and >= 10x). The key is checked to be the one the cache makes of the split call.
- A whole call's object for each caller of a live call (the miss and its joiners share the one
  the upstream produced; each gets its own, `chengeta_ai.clients.recorded.own_copy`): a deep
  ``model_copy`` per caller, against decoding a compact copy per caller (plus encoding it once),
  for a 500-token ``ChatCompletion``, ``Response`` and ``Message`` from the local server.
- Bytes per event stored for a 500-event Responses API stream and a 500-event Anthropic stream
  (read from the local server through the SDKs): the entry the cached client stores (frame,
  HTTP head and events, compact codec), against ``pickle`` of the same events (protocol 5, one
  pickle of the list: pickle's best case, with its memo shared by every event).

No assertions on time.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import statistics
import time
import timeit
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import openai
import pytest

from chengeta_ai import CacheManager, cached
from chengeta_ai.clients.calls import ClientCache
from chengeta_ai.clients.recorded import own_copy, register_head
from chengeta_ai.core.key_builder import CacheKeyBuilder, build_key
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache
from chengeta_ai.serializers import CompactSerializer

pytestmark = pytest.mark.filterwarnings(
    r"ignore:Async generator '(openai|anthropic|httpx2?|httpcore2?)\.:ResourceWarning"
)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[LocalOpenAIServer]:
    smoke = bool(request.config.getoption("benchmark_disable", False))
    with LocalOpenAIServer(
        first_token_delay=0.0, token_interval=0.0, tokens=20 if smoke else 500
    ) as srv:
        yield srv


def test_adapter_overhead_per_chunk(
    server: LocalOpenAIServer, smoke: bool, summary: Callable[..., None]
) -> None:
    rounds = 2 if smoke else 15
    raw_client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
    cache = StreamingResponseCache(CacheManager())
    client = cached(raw_client, cache)
    hit_messages = [{"role": "user", "content": "the hit prompt"}]
    list(client.chat.completions.create(model="m", messages=hit_messages, stream=True))
    # (wall seconds, caller-thread CPU seconds, chunks) per round; the server runs in another
    # thread of this process, so the caller's CPU time is the adapter's cost without the
    # server's (wall time includes both, and the GIL they share)
    runs: dict[str, list[tuple[float, float, int]]] = {"raw": [], "miss": [], "hit": []}

    def timed(kind: str, read: Callable[[], int]) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        n = read()
        runs[kind].append((time.perf_counter() - wall, time.thread_time() - cpu, n))

    def read_raw(messages: list[dict[str, str]]) -> int:
        return len(
            list(raw_client.chat.completions.create(model="m", messages=messages, stream=True))
        )

    def read_cached(messages: list[dict[str, str]]) -> int:
        with client.chat.completions.create(model="m", messages=messages, stream=True) as s:
            return len(list(s))

    for i in range(rounds):
        timed("raw", lambda i=i: read_raw([{"role": "user", "content": f"round {i}"}]))
        timed("miss", lambda i=i: read_cached([{"role": "user", "content": f"miss round {i}"}]))
        timed("hit", lambda: read_cached(hit_messages))
    assert cache.stats()["hits"] == rounds and cache.stats()["stores"] == rounds + 1

    def per_chunk(kind: str, index: int) -> float:
        return statistics.median(r[index] / r[2] for r in runs[kind]) * 1e6

    chunks = runs["raw"][0][2]
    for index, what in ((1, "caller CPU"), (0, "wall")):
        r, m, h = (per_chunk(kind, index) for kind in ("raw", "miss", "hit"))
        summary(
            f"cached client miss, us/chunk {what} ({chunks} chunks)",
            f"{m:.1f}",
            f"raw SDK {r:.1f}",
            f"+{m - r:.1f} us/chunk ({m / r:.2f}x)",
        )
        summary(
            f"cached client hit, us/chunk {what} ({chunks} chunks)",
            f"{h:.1f}",
            f"raw SDK {r:.1f}",
            f"{r / h:.1f}x less",
        )
    raw_client.close()


@pytest.mark.parametrize("api", ["chat", "responses", "anthropic"])
def test_whole_call_copy_per_caller(
    api: str, server: LocalOpenAIServer, smoke: bool, summary: Callable[..., None]
) -> None:
    register_head()
    if api == "anthropic":
        with anthropic.Anthropic(
            base_url=server.anthropic_base_url, api_key="k", max_retries=0
        ) as claude:
            whole: Any = claude.messages.create(
                model="claude-sonnet-4-6",
                max_tokens=4096,
                messages=[{"role": "user", "content": "copy"}],
            )
    else:
        with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as oai:
            if api == "chat":
                whole = oai.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "copy"}]
                )
            else:
                whole = oai.responses.create(model="gpt-4o", input="copy")
    codec = CompactSerializer()
    blob = codec.dumps([whole])
    assert own_copy(whole) == whole == codec.loads(blob)[0]
    number, repeat = (5, 2) if smoke else (500, 15)
    best = {"copy": float("inf"), "decode": float("inf"), "encode": float("inf")}
    for _ in range(repeat):  # interleaved, best of each
        for name, fn in (
            ("copy", lambda: own_copy(whole)),
            ("decode", lambda: codec.loads(blob)),
            ("encode", lambda: codec.dumps([whole])),
        ):
            best[name] = min(best[name], timeit.timeit(fn, number=number) / number)
    copy_us, decode_us, encode_us = (best[k] * 1e6 for k in ("copy", "decode", "encode"))
    summary(
        f"whole call, own object per caller, {type(whole).__name__}",
        f"deep copy {copy_us:.1f} us",
        f"decode {decode_us:.1f} us (+ encode once {encode_us:.1f} us)",
        f"{decode_us / copy_us:.2f}x per caller; 1 caller {(decode_us + encode_us) / copy_us:.2f}x",
    )


def _responses_request(target_bytes: int) -> dict[str, Any]:
    items: list[dict[str, Any]] = []
    turn = 0
    while len(json.dumps(items)) < target_bytes:
        role = "user" if turn % 2 == 0 else "assistant"
        text = f"Turn {turn}: could you explain step {turn} of the plan in more detail? " * 3
        items.append({"role": role, "content": [{"type": "input_text", "text": text}]})
        turn += 1
    return {
        "model": "gpt-4o",
        "input": items,
        "instructions": "You are a helpful assistant. Answer concisely.",
        "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}],
        "temperature": 0.7,
        "max_output_tokens": 512,
        "reasoning": {"effort": "low"},
        "stream": True,
    }


@pytest.mark.parametrize("size", [2_000, 100_000], ids=["2KB", "100KB"])
def test_key_building(size: int, smoke: bool, summary: Callable[..., None]) -> None:
    kwargs = _responses_request(size)
    client = openai.OpenAI(base_url="http://127.0.0.1:1/v1", api_key="k")
    calls = ClientCache(
        client, StreamingResponseCache(CacheManager()), isolate_api_keys=True, is_async=False
    )

    def ours() -> str | None:  # as `ClientCache.call` keys a call (no cache_control)
        return calls.split("openai.responses", kwargs, None)[2]

    # the key the cache itself would give the split call: the same
    req, params, key = calls.split("openai.responses", kwargs, None)
    assert key == build_key(CacheKeyBuilder(), req.request, req.model_id, params, None)

    def baseline() -> bytes:
        return hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode()).digest()

    number = 5 if smoke else (2000 if size < 10_000 else 100)
    repeat = 3 if smoke else 15
    # rounds interleaved (the machine's load drifts), best of each
    t_ours = t_base = float("inf")
    for _ in range(repeat):
        t_ours = min(t_ours, timeit.timeit(ours, number=number) / number)
        t_base = min(t_base, timeit.timeit(baseline, number=number) / number)
    summary(
        f"cached client key, Responses request {size // 1000} KB",
        f"{t_ours * 1e6:.1f} us",
        f"sha256(json) {t_base * 1e6:.1f} us",
        f"{t_base / t_ours:.1f}x",
    )
    client.close()


@pytest.mark.parametrize("api", ["responses", "anthropic"])
def test_bytes_per_event(api: str, smoke: bool, summary: Callable[..., None]) -> None:
    target = 60 if smoke else 500
    # the number of tokens that makes a stream of `target` events: Responses adds 8 events
    # around the deltas, Anthropic 6 (message_start, block start, ping, block stop, delta, stop)
    tokens = target - (8 if api == "responses" else 6)
    with LocalOpenAIServer(first_token_delay=0.0, token_interval=0.0, tokens=tokens) as srv:
        cache = StreamingResponseCache(CacheManager())
        if api == "responses":
            oai = openai.OpenAI(base_url=srv.base_url, api_key="k", max_retries=0)
            client = cached(oai, cache)
            with client.responses.create(model="gpt-4o", input="bytes", stream=True) as s:
                events = list(s)
            oai.close()
        else:
            claude = anthropic.Anthropic(
                base_url=srv.anthropic_base_url, api_key="k", max_retries=0
            )
            client = cached(claude, cache)
            with client.messages.create(
                model="claude-sonnet-4-6",
                max_tokens=4096,
                messages=[{"role": "user", "content": "bytes"}],
                stream=True,
            ) as s:
                events = list(s)
            claude.close()
    stored = cache.stats()["stored_bytes"]
    pickled = len(pickle.dumps(events, protocol=5))
    n = len(events)
    summary(
        f"bytes/event stored, {api} stream ({n} events)",
        f"{stored / n:.1f} B",
        f"pickle {pickled / n:.1f} B",
        f"{pickled / stored:.1f}x smaller",
    )
