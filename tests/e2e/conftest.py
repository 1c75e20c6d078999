"""Fixtures for the end-to-end tests: a real `LocalOpenAIServer` (Starlette + uvicorn on
loopback) and the real ``openai`` / ``anthropic`` clients.

``anyio_backend`` (asyncio and trio) comes from tests/conftest.py.

The server is shared by the whole session and paced fast; tests that count upstream requests
use deltas of ``server.request_count`` and their own prompts, so they do not depend on order.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from chengeta_ai.demo.server import LocalOpenAIServer


@pytest.fixture(scope="session")
def server() -> Iterator[LocalOpenAIServer]:
    with LocalOpenAIServer(first_token_delay=0.01, token_interval=0.001, tokens=20) as srv:
        yield srv


@pytest.fixture
def prompt(request: pytest.FixtureRequest) -> list[dict[str, str]]:
    """Messages unique to the test (and its parameters), so cache keys never collide."""
    return [{"role": "user", "content": f"Explain caching in 3 sentences ({request.node.nodeid})"}]
