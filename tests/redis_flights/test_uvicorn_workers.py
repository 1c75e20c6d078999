"""The FastAPI recipe (examples/fastapi_app.py) under a real `uvicorn --workers 4`, 50 httpx
clients asking the same prompt at once, the local OpenAI-compatible server as the upstream:
exactly one upstream call."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from chengeta_ai.demo.server import LocalOpenAIServer
from redis_fixture import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def upstream() -> Iterator[LocalOpenAIServer]:
    with LocalOpenAIServer(first_token_delay=0.5, token_interval=0.01, tokens=40) as srv:
        yield srv


@pytest.fixture
def uvicorn_4(flights_redis: RedisServer, upstream: LocalOpenAIServer) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "OPENAI_BASE_URL": upstream.base_url,
        "OPENAI_API_KEY": "local",
        "CHENGETA_REDIS_URL": flights_redis.url,
        "CHENGETA_PREFIX": f"u-{uuid.uuid4().hex[:8]}:",
        "PYTHONPATH": str(ROOT),
    }
    argv = ["--workers", "4", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", *argv], cwd=ROOT, env=env
    )
    base = f"http://127.0.0.1:{port}"
    try:
        # up when several workers answer (each one imports openai and builds its cache)
        # (a new connection each time: one kept alive would stay with one worker)
        pids: set[int] = set()
        # (generous: four interpreters importing openai on a busy 2-core machine)
        deadline = time.monotonic() + 120
        while len(pids) < 4 and time.monotonic() < deadline:
            assert proc.poll() is None, "uvicorn exited"
            try:
                pids.add(httpx.get(base + "/health", timeout=2).json()["pid"])
            except httpx.TransportError:
                time.sleep(0.1)
        assert len(pids) >= 2, pids
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


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
    assert len(texts) == 1 and next(iter(texts))
    assert len({pid for pid, _ in answers}) >= 2  # served by several processes
    assert upstream.request_count - before == 1
