"""The FastAPI recipe (examples/fastapi_app.py) under a real `uvicorn --workers 4`, 50 httpx
clients asking the same prompt at once, the local OpenAI-compatible server as the upstream:
exactly one upstream call."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from tests.uvicorn_fixture import serve_recipe, sse_events

from chengeta_ai.demo.server import LocalOpenAIServer
from redis_fixture import RedisServer


@pytest.fixture
def upstream() -> Iterator[LocalOpenAIServer]:
    with LocalOpenAIServer(first_token_delay=0.5, token_interval=0.01, tokens=40) as srv:
        yield srv


@pytest.fixture
def uvicorn_4(flights_redis: RedisServer, upstream: LocalOpenAIServer) -> Iterator[str]:
    env = {"CHENGETA_REDIS_URL": flights_redis.url, "CHENGETA_PREFIX": f"u-{uuid.uuid4().hex[:8]}:"}
    with serve_recipe(upstream.base_url, workers=4, env=env) as base:
        yield base


def test_uvicorn_4_workers_50_clients_one_upstream_call(
    uvicorn_4: str, upstream: LocalOpenAIServer
) -> None:
    before = upstream.request_count

    def ask(_: int) -> tuple[str, str]:
        with httpx.Client(base_url=uvicorn_4, timeout=30) as client:
            r = client.post("/chat", json={"prompt": "one call for the fleet"})
            r.raise_for_status()
            return r.headers["x-worker-pid"], r.text

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(ask, range(50)))
    texts = {text for _, text in answers}
    assert len(texts) == 1
    events = sse_events(next(iter(texts)))
    assert len(events) > 2 and events[-1] == "[DONE]"
    assert len({pid for pid, _ in answers}) >= 2  # served by several processes
    assert upstream.request_count - before == 1
