"""Fixtures of the seventh review (`PullLock`, `AttrReader`, the cheaper per-chunk clock of
s7-pump-lean): the cached-client fixtures (a real `LocalOpenAIServer`, the real SDK clients
over HTTP).

``anyio_backend`` (asyncio and trio) comes from tests/conftest.py.
"""

from __future__ import annotations

from tests.clients.conftest import oai, server, text

__all__ = ["oai", "server", "text"]
