"""Review s4b, finding (seen while testing the Redis fixes; older than them): RedisBackend
writes the Redis password into log lines, exceptions and its repr (MEDIUM).

``RedisBackend(url)`` keeps the URL as given and formats it into every `BackendError`
(``f"redis at {self.url}: ..."`` in ``_guard``), into ``repr(backend)`` and so into the
cache's stats/repr, and `StreamingResponseCache` logs those errors at WARNING ("backend set
failed for ...: BackendError('redis at redis://user:PASSWORD@host...')"). A URL with
credentials (``redis://default:<password>@...``, ``rediss://`` to a managed service: the usual
form, often from an environment variable) therefore ends up in application logs, error
trackers and tracebacks whenever Redis blips or refuses a command. Observed on main: the
password appears in the WARNING log, in the BackendError text and in ``repr``.

Fix direction: keep a redacted form of the URL for messages and repr (``redis://user:***@host
:port/db``, e.g. via ``urllib.parse`` or redis-py's connection kwargs), never the raw one.
"""

from __future__ import annotations

import logging

import pytest
from tests.redis_fixture import free_port

from chengeta_ai import BackendError, CacheManager, RedisBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

SECRET = "s3cret-pa55word"


def test_the_redis_password_stays_out_of_logs_errors_and_repr(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a Redis that is down for a moment (nothing listens on the port)
    backend = RedisBackend(f"redis://app:{SECRET}@127.0.0.1:{free_port()}/0")
    cache = StreamingResponseCache(CacheManager(backend=backend))
    try:
        with caplog.at_level(logging.DEBUG, logger="chengeta_ai"):
            assert list(cache.get_or_stream(["q"], lambda m: ["a"])) == ["a"]
        with pytest.raises(BackendError) as caught:
            backend.get("k")
        shown = {
            "log": caplog.text,
            "error": str(caught.value),
            "repr": repr(backend),
            "stats": repr(cache.stats()),
        }
    finally:
        backend.close()
    leaked = sorted(where for where, text in shown.items() if SECRET in text)
    # observed on main: ['error', 'log', 'repr', 'stats']
    assert not leaked, f"the Redis password appears in: {leaked}"
