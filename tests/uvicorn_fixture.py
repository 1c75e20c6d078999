"""The FastAPI recipe (examples/fastapi_app.py) served by a real ``uvicorn`` process on loopback.

Shared by the recipe's end-to-end test (tests/e2e/test_fastapi_recipe.py, one worker) and the
multi-worker test (tests/redis_flights/test_uvicorn_workers.py, ``--workers 4`` on Redis).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from tests.redis_fixture import free_port

__all__ = ["ROOT", "serve_recipe", "sse_events"]

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def serve_recipe(
    upstream_url: str,
    *,
    workers: int = 1,
    env: dict[str, str] | None = None,
    startup_timeout: float = 120,
) -> Iterator[str]:
    """Runs ``uvicorn examples.fastapi_app:app`` with ``workers`` processes, its OpenAI client
    pointed at ``upstream_url``; yields the base URL once it answers (with several workers:
    once at least two processes answer, within ``startup_timeout`` seconds)."""
    port = free_port()
    full_env = {
        **os.environ,
        "OPENAI_BASE_URL": upstream_url,
        "OPENAI_API_KEY": "local",
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    if not (env or {}).get("CHENGETA_REDIS_URL"):
        full_env.pop("CHENGETA_REDIS_URL", None)
    argv = ["--host", "127.0.0.1", "--port", str(port), "--log-level", "error"]
    if workers > 1:
        argv += ["--workers", str(workers)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", *argv],
        cwd=ROOT,
        env=full_env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        # a new connection each time: one kept alive would stay with one worker
        pids: set[int] = set()
        # (generous: each process imports openai and fastapi; on a busy 2-core machine four of
        # them took more than 30 s)
        deadline = time.monotonic() + startup_timeout
        while len(pids) < min(workers, 4) and time.monotonic() < deadline:
            assert proc.poll() is None, "uvicorn exited"
            try:
                pids.add(httpx.get(base + "/health", timeout=2).json()["pid"])
            except httpx.TransportError:
                time.sleep(0.1)
        assert len(pids) >= min(workers, 2), pids
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def sse_events(body: str) -> list[str]:
    """The ``data:`` payloads of a server-sent-events body, in order."""
    events = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        lines = [line[len("data: ") :] for line in block.split("\n") if line.startswith("data: ")]
        assert lines, f"an SSE event without data: {block!r}"
        events.append("\n".join(lines))
    return events
