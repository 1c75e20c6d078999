"""Fixtures of the fourth review, second pass (review s4b): the same as the first pass's
(tests/review_s4/conftest.py: the cached-client fixtures and a real ``redis-server``).

``anyio_backend`` (asyncio and trio) comes from tests/conftest.py.
"""

from __future__ import annotations

from tests.review_s4.conftest import (
    aclaude,
    aoai,
    cache,
    claude,
    oai,
    redis_server,
    restartable_redis,
    server,
    text,
)

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
