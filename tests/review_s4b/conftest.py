"""Fixtures of the fourth review, second pass (review s4b): the cached-client fixtures (a real
`LocalOpenAIServer`, the real SDK clients over HTTP) and a real ``redis-server`` on loopback.

``anyio_backend`` (asyncio and trio) comes from tests/conftest.py.
"""

from __future__ import annotations

from tests.backends.conftest import redis_server, restartable_redis
from tests.clients.conftest import aclaude, aoai, cache, claude, oai, server, text

__all__ = [
    "aclaude",
    "aoai",
    "cache",
    "claude",
    "oai",
    "redis_server",
    "restartable_redis",
    "server",
    "text",
]
