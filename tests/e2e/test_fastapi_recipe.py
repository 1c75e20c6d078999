"""The README's FastAPI server-sent-events recipe (examples/fastapi_app.py), end to end.

A real ``uvicorn`` process on loopback (one worker, the in-memory cache), real httpx clients,
the local OpenAI-compatible server as the upstream, through the real ``openai`` client:

- 50 concurrent clients asking one prompt: one upstream call, 50 identical, whole SSE streams;
- a client that disconnects mid-stream: the others complete, the entry stored is whole;
- the only client disconnecting mid-stream: the upstream call is closed and nothing is stored;
  the next request streams afresh.

(The multi-worker variant, ``--workers 4`` on Redis, is tests/redis_flights/
test_uvicorn_workers.py.)
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from tests.uvicorn_fixture import serve_recipe, sse_events

from chengeta_ai.demo.server import LocalOpenAIServer

MODEL = "gpt-4o-mini"


@pytest.fixture(scope="module")
def upstream() -> Iterator[LocalOpenAIServer]:
    # a 0.2 s first token, then 40 tokens 10 ms apart: long enough to join and to leave mid-way
    with LocalOpenAIServer(first_token_delay=0.2, token_interval=0.01, tokens=40) as srv:
        yield srv


@pytest.fixture(scope="module")
def recipe(upstream: LocalOpenAIServer) -> Iterator[str]:
    with serve_recipe(upstream.base_url) as base:
        yield base


def expected_text(upstream: LocalOpenAIServer, prompt: str) -> str:
    """The answer fetched directly from the upstream (deterministic per prompt)."""
    with openai.OpenAI(base_url=upstream.base_url, api_key="x") as client:
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def text_of(body: str) -> str:
    """The answer carried by an SSE body; checks its shape (JSON chunks, then [DONE])."""
    events = sse_events(body)
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def ask(base: str, prompt: str) -> httpx.Response:
    with httpx.Client(base_url=base, timeout=30) as client:
        r = client.post("/chat", json={"prompt": prompt, "model": MODEL})
        r.raise_for_status()
        assert r.headers["content-type"].startswith("text/event-stream")
        return r


def stats(base: str) -> dict[str, Any]:
    return dict(httpx.get(base + "/stats", timeout=10).json())


def leave_after(base: str, prompt: str, events: int, left: threading.Event) -> None:
    """Streams the answer and disconnects (closes the connection) after ``events`` events."""
    with httpx.Client(base_url=base, timeout=30) as client:
        with client.stream("POST", "/chat", json={"prompt": prompt, "model": MODEL}) as r:
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen == events:
                        break
    assert seen == events
    left.set()


def wait_until(pred: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_50_concurrent_clients_one_upstream_call(recipe: str, upstream: LocalOpenAIServer) -> None:
    prompt = "fifty clients, one upstream call"
    want = expected_text(upstream, prompt)
    before, stats_before = upstream.request_count, stats(recipe)

    with ThreadPoolExecutor(50) as pool:
        bodies = list(pool.map(lambda _: ask(recipe, prompt).text, range(50)))

    assert len(set(bodies)) == 1  # byte for byte the same stream for everybody
    assert text_of(bodies[0]) == want
    assert upstream.request_count - before == 1
    after = stats(recipe)
    assert after["streams_led"] - stats_before["streams_led"] == 1
    shared = (after["joins"] + after["hits"]) - (stats_before["joins"] + stats_before["hits"])
    assert shared == 49
    assert after["stores"] - stats_before["stores"] == 1


def test_a_client_leaving_mid_stream_does_not_disturb_the_others(
    recipe: str, upstream: LocalOpenAIServer
) -> None:
    prompt = "one client leaves, nine stay"
    want = expected_text(upstream, prompt)
    before, stats_before = upstream.request_count, stats(recipe)
    left = threading.Event()

    with ThreadPoolExecutor(10) as pool:
        leaver = pool.submit(leave_after, recipe, prompt, 3, left)
        stayers = [pool.submit(lambda: ask(recipe, prompt).text) for _ in range(9)]
        bodies = [f.result() for f in stayers]
        leaver.result()

    assert left.is_set()
    assert {text_of(b) for b in bodies} == {want}
    assert upstream.request_count - before == 1
    wait_until(lambda: stats(recipe)["in_flight"] == 0)
    after = stats(recipe)
    assert after["stores"] - stats_before["stores"] == 1
    # what was stored is the whole answer: a hit replays it, no upstream call
    assert text_of(ask(recipe, prompt).text) == want
    assert upstream.request_count - before == 1
    assert stats(recipe)["hits"] - after["hits"] == 1


def test_the_only_client_leaving_closes_the_upstream_and_stores_nothing(
    recipe: str, upstream: LocalOpenAIServer
) -> None:
    prompt = "the only client leaves"
    want = expected_text(upstream, prompt)
    before, stats_before = upstream.request_count, stats(recipe)

    leave_after(recipe, prompt, 3, threading.Event())
    wait_until(lambda: stats(recipe)["in_flight"] == 0)
    after = stats(recipe)
    assert after["abandoned_cancelled"] - stats_before["abandoned_cancelled"] == 1
    assert after["stores"] == stats_before["stores"]  # no truncated entry

    # the next request is a miss that streams the whole answer afresh, and is stored
    assert text_of(ask(recipe, prompt).text) == want
    assert upstream.request_count - before == 2
    assert stats(recipe)["stores"] - stats_before["stores"] == 1
