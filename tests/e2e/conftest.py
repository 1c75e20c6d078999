"""Fixtures for the end-to-end tests: a real `LocalOpenAIServer` and the real ``openai`` client.

The server is shared by the whole session and paced fast; tests that count upstream requests
use deltas of ``server.request_count`` and their own prompts, so they do not depend on order.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from chengeta_ai.demo.server import LocalOpenAIServer

TOKENS = 20


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test here runs on asyncio and on trio."""
    return str(request.param)


@pytest.fixture(scope="session")
def server() -> Iterator[LocalOpenAIServer]:
    with LocalOpenAIServer(first_token_delay=0.01, token_interval=0.001, tokens=TOKENS) as srv:
        yield srv


@pytest.fixture
def prompt(request: pytest.FixtureRequest) -> list[dict[str, str]]:
    """Messages unique to the test (and its parameters), so cache keys never collide."""
    return [{"role": "user", "content": f"Explain caching in 3 sentences ({request.node.nodeid})"}]
