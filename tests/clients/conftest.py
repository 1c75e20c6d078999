"""Fixtures for the cached-client tests: a real `LocalOpenAIServer` (Starlette + uvicorn on
loopback), the real ``openai`` / ``anthropic`` clients, a fresh cache per test.

``anyio_backend`` (asyncio and trio) comes from tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import anthropic
import openai
import pytest

from chengeta_ai import CacheManager
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache


@pytest.fixture(scope="session")
def server() -> Iterator[LocalOpenAIServer]:
    with LocalOpenAIServer(first_token_delay=0.01, token_interval=0.001, tokens=12) as srv:
        yield srv


@pytest.fixture
def cache() -> StreamingResponseCache:
    return StreamingResponseCache(CacheManager())


@pytest.fixture
def text(request: pytest.FixtureRequest) -> str:
    """A prompt unique to the test (and its parameters)."""
    return f"Explain caching in 3 sentences ({request.node.nodeid})"


@pytest.fixture
def oai(server: LocalOpenAIServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="sk-local", max_retries=0) as c:
        yield c


@pytest.fixture
def claude(server: LocalOpenAIServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        base_url=server.anthropic_base_url, api_key="sk-ant-local", max_retries=0
    ) as c:
        yield c


@pytest.fixture
async def aoai(server: LocalOpenAIServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-local", max_retries=0) as c:
        yield c


@pytest.fixture
async def aclaude(server: LocalOpenAIServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=server.anthropic_base_url, api_key="sk-ant-local", max_retries=0
    ) as c:
        yield c
